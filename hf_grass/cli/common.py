"""What every command shares: exit codes, the usage error, argument types and small helpers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "hf-grass"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A problem with the command line itself: reported as a usage error (exit code 2)."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # unreachable


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def status(message: str) -> None:
    """Progress notes go to stderr, so stdout stays clean for tables and ``--json``."""
    print(message, file=sys.stderr, flush=True)


def existing_file(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"{what} {path!r} does not exist")
    if not p.is_file():
        raise UsageError(f"{what} {path!r} is not a file")
    return p


def check_output_file(path: str, what: str) -> Path:
    """An output file whose directory exists (checked before any long computation)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{what} {path!r} is a directory; give a file name such as scores.png")
    if not p.parent.exists():
        raise UsageError(f"the directory of {what} {path!r} does not exist")
    return p


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"

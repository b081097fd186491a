"""Helpers shared by the benchmark scripts: the machine's description, the git commit, the
interleaved timer and the JSON report."""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (recorded with every report: numbers depend on it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> dict[str, Any]:
    """The commit the benchmark ran at and whether tracked files differed from it (``dirty``), so a
    number can be traced to its code; both ``None`` without git or outside a checkout."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise OSError(done.stderr.strip())
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))  # reports written here don't count
    except (OSError, subprocess.SubprocessError):  # no git executable, not a checkout, git too slow
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def parse_with_smoke(
    parser: argparse.ArgumentParser, argv: list[str] | None, sizes: dict[str, Any]
) -> argparse.Namespace:
    """Add ``--smoke`` to ``parser`` and parse ``argv``. With ``--smoke`` the defaults become
    ``sizes`` (explicit flags still win): tiny sizes that run every step of the script in seconds,
    for CI (tests/test_benchmarks_smoke.py); its numbers mean nothing."""
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes, to check that the script runs: {sizes}")
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(**sizes)
    return parser.parse_args(argv)


def emit_report(report: dict[str, Any], json_out: Path | None) -> dict[str, Any]:
    """Print the JSON report and, with ``--json-out``, also write it to that file; the report gets
    the git state (``git_state``) under ``"git"``."""
    report["git"] = git_state()
    text = json.dumps(report, indent=2)
    print("\n" + text)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
    return report


@dataclass
class Timings:
    """Seconds per timed call of each variant: wall clock and this process's CPU time."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]


def time_interleaved(
    calls: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    around: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None,
    progress: bool = False,
) -> Timings:
    """Time every call ``repeats`` times, round robin with the first variant rotating each repeat,
    so drift of a shared machine hits all variants alike, after ``warmup`` untimed calls each.

    ``around(name)`` is entered outside the timed region of each call (set-up and tear-down that
    must not count, e.g. attaching hooks). With ``progress`` each repeat prints a line.
    """
    names = list(calls)
    scope = around or (lambda name: contextlib.nullcontext())
    for name in names:
        for _ in range(warmup):
            with scope(name):
                calls[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for i in range(len(names)):
            name = names[(rep + i) % len(names)]
            with scope(name):
                start, start_cpu = time.perf_counter(), time.process_time()
                calls[name]()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        if progress:
            print(
                f"    repeat {rep + 1}/{repeats}: "
                + ", ".join(f"{n} {wall[n][-1]:.2f}s (cpu {cpu[n][-1]:.2f}s)" for n in names),
                flush=True,
            )
    return Timings(wall, cpu)

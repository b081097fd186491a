"""Checking a cache's files against the sha256 its manifest lists, and remembering it.

A verification is remembered in ``.verified.json`` beside the manifest: the size, mtime, ctime and
inode of each file whose sha256 matched. A later check re-hashes only the files whose stat changed
since (any write changes ctime, which user code cannot set back), so opening a large cache again
costs a ``stat`` per file; ``full=True`` re-hashes everything.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hf_grass.cache.files import CacheError, atomic_write_json, sha256_file

VERIFIED = ".verified.json"


def verify_files(
    root: Path,
    files: list[tuple[Path, str]],
    source: str | None,
    *,
    full: bool = False,
    remember: bool = True,
    skip: Callable[[str, Path], bool] | None = None,
) -> None:
    """Check ``files`` (``(path, expected sha256)``) of the cache at ``root``; raises ``CacheError``
    naming the first bad file. ``source``: how to name a downloaded cache (its repo and revision) in
    messages, None for a local one. ``skip(rel, path)``: files not to check now."""
    stamps = {} if full else _stamps(root)
    fresh: dict[str, list[Any]] = {}
    for path, expected in files:
        rel = path.relative_to(root.resolve()).as_posix()
        if skip is not None and skip(rel, path):
            continue
        if not path.is_file():
            raise CacheError(_missing_message(source, rel, path))
        stat = _stat_key(path)
        if stamps.get(rel) == [*stat, expected]:
            fresh[rel] = stamps[rel]
            continue
        actual = sha256_file(path)
        if actual != expected:
            raise CacheError(_mismatch_message(source, rel, path, expected, actual))
        fresh[rel] = [*stat, expected]
    if remember and fresh != stamps:
        with contextlib.suppress(OSError):  # a read-only cache is verified, just not remembered
            atomic_write_json(root / VERIFIED, fresh)


def _stamps(root: Path) -> dict[str, list[Any]]:
    try:
        stamps = json.loads((root / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _missing_message(source: str | None, rel: str, path: Path) -> str:
    if source is None:
        return f"{path} is missing from the cache; rebuild it (or pull the cache again)"
    return (
        f"{rel} is listed in the manifest of {source} but is missing (looked for {path}); "
        "the repo is incomplete: push the cache again."
    )


def _mismatch_message(source: str | None, rel: str, path: Path, expected: str, actual: str) -> str:
    if source is None:
        return (
            f"{path} does not match its sha256 in the manifest: it is corrupt or was altered. Rebuild "
            "that shard by running the same build command again with verification (hf-grass build --verify, "
            "or build_gradient_cache(..., verify_existing=True)), or pull the cache again."
        )
    return (
        f"{rel} of {source} does not match the sha256 in its manifest (expected {expected[:16]}..., "
        f"got {actual[:16]}... for {path}): the repo's copy or the downloaded copy was altered, so "
        "nothing was loaded. Pull again with force_download=True; if it still fails, the repo "
        "itself is damaged: push the cache again."
    )

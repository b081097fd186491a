"""Crash safety (SIGKILL at random moments), a full disk, and what the library never does."""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from crash_worker import build

from hf_grass.cache import CacheError, GradientCache

WORKER = Path(__file__).with_name("crash_worker.py")
PACKAGE = Path(__file__).resolve().parents[1] / "hf_grass"


def cache_bytes(path: Path) -> dict[str, bytes]:
    cache = GradientCache(path, verify=True)
    files = {str(p.relative_to(path)): p.read_bytes() for p, _ in cache.files()}
    files["manifest.json"] = (path / "manifest.json").read_bytes()
    return files


def test_sigkill_twenty_times_then_identical(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    build(str(reference))
    target = tmp_path / "killed"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")]),
    )
    rng = random.Random(0)
    kills = 0
    for _ in range(20):
        proc = subprocess.Popen([sys.executable, str(WORKER), str(target), "0.03"], env=env)
        time.sleep(rng.uniform(0.3, 3.0))  # start-up is ~1 s, a full run ~2-3 s: kills land everywhere
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if (target / "manifest.json").exists():  # whatever survived is a valid, checksummed cache
            GradientCache(target, verify=True)
    assert kills >= 10, f"only {kills} of 20 runs were killed mid-way; the worker is too fast"
    build(str(target))  # finish
    assert GradientCache(target).manifest["complete"]
    assert cache_bytes(target) == cache_bytes(reference)
    leftovers = [p.name for p in target.rglob("*") if ".tmp-" in p.name]
    assert not leftovers, leftovers


def test_disk_full_stops_cleanly_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = tmp_path / "reference"
    build(str(reference))
    target = tmp_path / "full"
    real_fsync = os.fsync
    calls = {"n": 0}

    def failing_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] >= 25:  # the disk fills up part way through the pass
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(CacheError, match="no space left.*resume"):
        build(str(target))
    monkeypatch.setattr(os, "fsync", real_fsync)
    partial = GradientCache(target, verify=True)  # the last complete shard and the manifest are valid
    assert 0 < partial.num_rows < 36 and not partial.manifest["complete"]
    build(str(target))  # space is back: resume
    assert cache_bytes(target) == cache_bytes(reference)


def test_damaged_shards_are_named_and_rebuilt(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    build(str(reference))
    target = tmp_path / "damaged"
    build(str(target))
    shards = sorted((target / "shards").glob("*.safetensors"))
    altered = bytearray(shards[2].read_bytes())
    altered[-1] ^= 0x01
    shards[2].write_bytes(bytes(altered))  # same size: only the checksum tells
    shards[5].write_bytes(shards[5].read_bytes()[:-7])  # truncated
    (target / "shards" / "shard-000007.jsonl").unlink()  # documents lost
    with pytest.raises(CacheError, match="shard-000005.safetensors .*truncated"):
        GradientCache(target)
    build(str(target))  # a plain resume repairs what it can see without hashing
    with pytest.raises(CacheError, match="shard-000002.safetensors does not match its sha256.*build"):
        GradientCache(target, verify=True)
    build(str(target), verify_existing=True)
    assert cache_bytes(target) == cache_bytes(reference)


def test_nothing_is_unpickled_and_no_remote_code_by_default() -> None:
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    assert not re.search(r"\bpickle\b|torch\.load\(|np\.load\(", source)
    assert not re.search(r"trust_remote_code\s*=\s*True", source)

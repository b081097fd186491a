"""Crash safety (SIGKILL at every durable step), a full disk, temp files on shared filesystems, and
what the library never does."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from crash_worker import build, cache_bytes
from crash_worker import config as worker_config

from hf_grass.cache import CacheError, GradientCache
from hf_grass.cache import files as cache_files
from hf_grass.cache.files import atomic_write_bytes, durable_step_count, temp_owner, temp_path
from hf_grass.cache.writer import CacheWriter

WORKER = Path(__file__).with_name("crash_worker.py")
PACKAGE = Path(__file__).resolve().parents[1] / "hf_grass"
STEP_KINDS = {"create", "write", "fsync", "rename", "fsync-dir", "unlink"}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(WORKER.parent), os.environ.get("PYTHONPATH")) if p)
    return env


def test_sigkill_at_every_durable_step_then_identical(tmp_path: Path) -> None:
    """A build is killed (a real SIGKILL, in a child process) right before each of its durable steps
    in turn, then resumed; every resumed cache must be byte-identical to an uninterrupted build.

    No timing is involved: the fault is injected by step number (``arm_fault``), and every step of
    the build is covered, none strided over. See tests/crash_worker.py.
    """
    proc = subprocess.run(
        [sys.executable, str(WORKER), "sweep", str(tmp_path / "sweep")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert records and "steps" in records[-1], proc.stdout[-3000:] + proc.stderr[-3000:]
    summary, steps = records[-1], records[:-1]
    assert [r["step"] for r in steps] == list(range(1, summary["steps"] + 1)), "every step, in order"
    bad = [r for r in steps if not r["killed"] or r["problems"]]
    assert not bad, json.dumps(bad[:5], indent=1) + proc.stderr[-3000:]
    assert proc.returncode == 0 and summary["failures"] == 0
    kinds = {r["kind"].split()[0] for r in steps}
    assert kinds == STEP_KINDS, kinds
    # the commit of every kind of file was interrupted: shards, documents, stats, parts, manifest
    names = " ".join(r["kind"] for r in steps)
    for what in (
        "shard-000001.safetensors",
        "shard-000001.jsonl",
        "stats/",
        "parts/",
        "manifest.json",
        "eigenbasis",
    ):
        assert what in names, what


def test_fault_env_kills_at_the_named_step(tmp_path: Path) -> None:
    """``HF_GRASS_FAULT_AT=N`` (read at import) SIGKILLs the process right before its N-th step."""
    target = tmp_path / "out.bin"
    code = (
        f"from hf_grass.cache.files import atomic_write_bytes; atomic_write_bytes({str(target)!r}, b'x' * 10)"
    )
    for step, survivors in ((2, {"tmp": 0}), (4, {"tmp": 10})):
        for p in tmp_path.iterdir():
            p.unlink()
        proc = subprocess.run(
            [sys.executable, "-c", code], env=_env(HF_GRASS_FAULT_AT=str(step)), timeout=120
        )
        assert proc.returncode == -signal.SIGKILL, step
        # killed before "write" (step 2): an empty temp file; before "rename" (4): a full one. The
        # target never exists half-written
        left = {("tmp" if ".tmp-" in p.name else p.name): p.stat().st_size for p in tmp_path.iterdir()}
        assert left == survivors, (step, left)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(HF_GRASS_FAULT_AT="soon"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "HF_GRASS_FAULT_AT must be a step number" in proc.stderr


def test_durable_steps_are_counted(tmp_path: Path) -> None:
    cache_files.arm_fault(None)
    trace = cache_files.trace_durable_steps()
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        cache_files.durable_unlink(tmp_path / "a.json")
        assert durable_step_count() == 6
        assert [t.split()[0] for t in trace] == ["create", "write", "fsync", "rename", "fsync-dir", "unlink"]
    finally:
        cache_files.trace_durable_steps(False)
    with pytest.raises(ValueError, match=">= 1"):
        cache_files.arm_fault(0)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_files_carry_host_and_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    renamed = []
    real_replace = os.replace

    def spy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        renamed.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic_write_bytes(tmp_path / "x.json", b"{}")
    assert renamed == [temp_path(tmp_path / "x.json").name]
    assert temp_owner(renamed[0]) == (cache_files.host_tag(), os.getpid())
    assert temp_owner(".x.json.tmp-12345") is None  # older versions' names carry no host
    assert temp_owner(".x.json.tmp-node-7.cluster-12") == ("node-7.cluster", 12)
    monkeypatch.setattr(socket, "gethostname", lambda: "gpu node/3")
    assert cache_files.host_tag() == "gpu_node_3"


def test_cleanup_removes_only_this_hosts_dead_temp_files(tmp_path: Path) -> None:
    """On a shared filesystem another node's pids mean nothing here: only this host's temp files of
    processes that are gone are removed."""
    build(str(tmp_path / "cache"), n_examples=3)
    root = tmp_path / "cache"
    dead, me = _dead_pid(), cache_files.host_tag()
    files = {
        "mine_dead": root / "shards" / f".shard-000009.safetensors.tmp-{me}-{dead}",
        "mine_live": root / "shards" / f".shard-000008.safetensors.tmp-{me}-{os.getpid()}",
        "other_host_dead": root / "shards" / f".shard-000007.safetensors.tmp-{me}x-{dead}",
        "other_host_manifest": root / f".manifest.json.tmp-node-b-{dead}",
        "old_format": root / "parts" / f".rank0-of1.json.tmp-{dead}",
    }
    for path in files.values():
        path.write_bytes(b"partial")
    writer = CacheWriter(root, worker_config(), _header_of(root))
    try:
        writer.cleanup_orphans()
    finally:
        writer.close()
    assert {name for name, path in files.items() if path.exists()} == {
        "mine_live",
        "other_host_dead",
        "other_host_manifest",
        "old_format",
    }


def _header_of(root: Path) -> dict:
    manifest = json.loads((root / "manifest.json").read_text())
    keys = ("model", "modules", "dim", "num_examples", "dataset", "library_version")
    return {k: manifest[k] for k in keys}


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

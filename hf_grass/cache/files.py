"""Small, careful file primitives: atomic writes, checksums, locks, memory-mapped safetensors.

Nothing here unpickles: tensors are safetensors, metadata is JSON.

**Durable steps and fault injection.** Every operation of the cache writer that changes what is on
disk goes through :func:`atomic_write_bytes` or :func:`durable_unlink`, and each of their steps
(create a temp file, write it, fsync it, rename it into place, fsync the directory; delete a file)
calls :func:`durable_step` first. That makes crash safety testable without timing: with
``HF_GRASS_FAULT_AT=N`` in the environment (read at import), or after :func:`arm_fault(N)
<arm_fault>`, the process SIGKILLs itself right before its N-th step, leaving on disk exactly what
a crash at that point would. ``tests/test_reliability.py`` counts the steps of a build
(:func:`durable_step_count`, :func:`trace_durable_steps`), kills a build at each one and checks that
the resumed cache is byte-identical. Unset, a step costs one integer increment and one comparison.

**Temp files** are named ``.{name}.tmp-{host}-{pid}``, so a writer can tell its own leftovers from
those of another node on a shared filesystem (see :func:`temp_owner`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_save

_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "F16": (np.dtype("<f2"), torch.float16),
    "BF16": (np.dtype("<i2"), torch.bfloat16),  # numpy has no bf16: map as int16, view in torch
    "F32": (np.dtype("<f4"), torch.float32),
    "F64": (np.dtype("<f8"), torch.float64),
    "I64": (np.dtype("<i8"), torch.int64),
    "I32": (np.dtype("<i4"), torch.int32),
    "I8": (np.dtype("i1"), torch.int8),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CacheError(RuntimeError):
    """The cache on disk is unusable as it is (corrupt, mixed, locked); the message says how to fix it."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---- durable steps and fault injection -------------------------------------------------------------

FAULT_ENV = "HF_GRASS_FAULT_AT"


def _fault_from_env() -> int | None:
    value = os.environ.get(FAULT_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{FAULT_ENV} must be a step number >= 1 (or unset); got {value!r}")
    return int(value)


class _Steps:
    """This process's durable-step counter, the armed fault, and an optional trace of step names."""

    count = 0
    fault_at: int | None = _fault_from_env()
    trace: list[str] | None = None


def durable_step(kind: str, path: Path) -> None:
    """Count one durable step (``kind`` on ``path``); SIGKILL this process if it is the armed one.

    A real SIGKILL: no ``finally`` block, ``atexit`` handler or buffered write runs, and the kernel
    releases the process's locks, as in a crash.
    """
    _Steps.count += 1
    if _Steps.trace is not None:
        _Steps.trace.append(f"{kind} {path.parent.name}/{path.name}")
    if _Steps.count == _Steps.fault_at:
        os.kill(os.getpid(), signal.SIGKILL)


def arm_fault(at: int | None) -> None:
    """Restart the step count and SIGKILL this process right before step ``at`` (None: never)."""
    if at is not None and at < 1:
        raise ValueError(f"the fault step must be >= 1, got {at}")
    _Steps.count = 0
    _Steps.fault_at = at


def durable_step_count() -> int:
    """Durable steps taken since the process started or :func:`arm_fault` was last called."""
    return _Steps.count


def trace_durable_steps(enabled: bool = True) -> list[str]:
    """Start (or stop) recording each step as ``"kind dir/file"``; returns the list being filled."""
    _Steps.trace = [] if enabled else None
    return _Steps.trace if _Steps.trace is not None else []


# ---- temp files ------------------------------------------------------------------------------------


def host_tag() -> str:
    """This machine's name as it appears in temp file names (file-name safe, at most 64 characters)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "unknown-host"


def temp_path(path: Path) -> Path:
    """The temp file of ``path`` for this process: ``.{name}.tmp-{host}-{pid}`` beside it."""
    return path.with_name(f".{path.name}.tmp-{host_tag()}-{os.getpid()}")


def temp_owner(name: str) -> tuple[str, int] | None:
    """``(host, pid)`` of a temp file name written by :func:`temp_path`, or None for any other name
    (including temp files of older versions, named ``.{name}.tmp-{pid}`` without a host)."""
    if not name.startswith(".") or ".tmp-" not in name:
        return None
    host, _, pid = name.rsplit(".tmp-", 1)[1].rpartition("-")
    if not host or not pid.isdigit():
        return None
    return host, int(pid)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``.

    A crash leaves either the old file or the new one, never a partial one. On failure (e.g. ENOSPC)
    the temp file is removed and the error is raised with the path in the message.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        durable_step("create", path)
        with open(tmp, "wb") as fh:
            durable_step("write", path)
            fh.write(data)
            fh.flush()
            durable_step("fsync", path)
            os.fsync(fh.fileno())
        durable_step("rename", path)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if err.errno == errno.ENOSPC:
            raise CacheError(
                f"no space left on the device while writing {path}; the cache is still valid up to its "
                "last complete shard: free space and run the same command again to resume."
            ) from err
        raise
    durable_step("fsync-dir", path)
    _fsync_dir(path.parent)


def durable_unlink(path: str | os.PathLike) -> None:
    """Delete ``path`` if it exists (one durable step)."""
    path = Path(path)
    durable_step("unlink", path)
    path.unlink(missing_ok=True)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> str:
    """Atomically write a safetensors file; returns its sha256."""
    data = safetensors_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header without reading the data: (header, data offset)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise CacheError(f"{path} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CacheError(f"{path} has an invalid or truncated safetensors header")
        header = json.loads(fh.read(n))
    end = max((info["data_offsets"][1] for k, info in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CacheError(
            f"{path} is {size} bytes but its header describes {8 + n + end}: truncated or altered"
        )
    return header, 8 + n


def mmap_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Memory-map every tensor of a safetensors file (read-only, no copy until used)."""
    header, offset = read_header(path)
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise CacheError(f"{path}: unsupported dtype {info['dtype']} for {name}")
        np_dtype, torch_dtype = _DTYPES[info["dtype"]]
        start, stop = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape)) if shape else 1
        if stop - start != count * np_dtype.itemsize:
            raise CacheError(f"{path}: tensor {name} has inconsistent offsets")
        if count == 0:
            out[name] = torch.empty(shape, dtype=torch_dtype)
            continue
        arr = np.memmap(path, dtype=np_dtype, mode="r", offset=offset + start, shape=shape)
        with warnings.catch_warnings():
            # read-only memmaps are fine: we never write through these tensors
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(arr)
        out[name] = tensor.view(torch_dtype) if torch_dtype == torch.bfloat16 else tensor
    return out


class FileLock:
    """An exclusive, non-blocking ``flock`` on a file; released on close or process death."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> FileLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheError(
                f"another process is writing this cache (lock {self.path} is held); wait for it to finish "
                "or use another cache_dir. Two writers are never interleaved."
            ) from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

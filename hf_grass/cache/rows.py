"""Reading cached rows as float32: blocks in row order, and gathers of arbitrary rows.

**One conversion.** ``rows_to_float32`` is the only function that turns stored rows into float32
numbers; every reader of rows (the exact scan, the FAISS index build, the two-stage re-rank, the
batched queries, ``GradientCache.load``) goes through it. A change of the storage format (e.g. int8
rows with a per-row scale) changes this function and the two places that fetch the stored tensors
of a row range (``CacheRows.iter_shards`` for whole shards, ``gather_rows`` for gathers).

Row *positions* number the cached rows ``0 .. num_rows - 1`` in shard order (shards sorted by id,
rows in file order); ``GradientCache.indices[position]`` is the dataset index of that row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch


def rows_to_float32(stored: Mapping[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, dim]`` float32 rows from the stored tensors of ``n`` rows (``{"grads": [n, dim]}``).

    With ``out`` (a float32 ``[n, dim]`` buffer) the rows are written into it and it is returned:
    a reused buffer keeps the conversion in the CPU cache (see ``hf_grass.scoring.chunk_rows``).
    """
    grads = stored["grads"]
    if out is None:
        out = grads.to(torch.float32)
    else:
        out.copy_(grads)
    scales = stored.get("scales")
    if scales is not None:  # int8 rows: row = stored * scale (hf_grass.cache.writer.encode_rows)
        out.mul_(scales.to(torch.float32)[:, None])
    return out


class StoredShard(NamedTuple):
    """One shard's tensors as stored."""

    indices: torch.Tensor  # [rows] int64 dataset indices
    grads: torch.Tensor  # [rows, dim] in the storage dtype
    scales: torch.Tensor | None  # [rows] float32 for int8 rows (row = grads * scale)
    norms: torch.Tensor | None  # [rows, 2] float32: exact gradient and preconditioned norms

    def rows(self) -> torch.Tensor:
        """The rows: memory-mapped as they are, or decoded to float32 for int8."""
        return self.grads if self.scales is None else rows_to_float32(self.stored())

    def stored(self) -> dict[str, torch.Tensor]:
        """The tensors ``hf_grass.cache.rows`` converts (grads, and scales / norms when present)."""
        out = {"grads": self.grads}
        if self.scales is not None:
            out["scales"] = self.scales
        if self.norms is not None:
            out["norms"] = self.norms
        return out


@dataclass
class RowBlock:
    """Consecutive rows of one shard: positions ``start .. start + len(indices) - 1``."""

    start: int  # row position of the first row
    indices: torch.Tensor  # [n] int64 dataset indices
    rows: torch.Tensor  # [n, dim] float32; a reused buffer, valid until the next block
    norms: torch.Tensor | None = None  # [n, 2] float32 exact norms (gradient, preconditioned)


def iter_blocks(
    shards: Iterator[tuple[int, torch.Tensor, Mapping[str, torch.Tensor]]], rows_per_block: int, dim: int
) -> Iterator[RowBlock]:
    """Blocks of at most ``rows_per_block`` rows from ``(start position, indices, stored tensors)``
    per shard, converted into one reused float32 buffer. Blocks never span two shards."""
    if rows_per_block <= 0:
        raise ValueError(f"rows_per_block must be positive, got {rows_per_block}")
    buf = torch.empty(rows_per_block, dim, dtype=torch.float32)
    for first, indices, stored in shards:
        grads, norms = stored["grads"], stored.get("norms")
        for lo in range(0, grads.shape[0], rows_per_block):
            hi = min(lo + rows_per_block, grads.shape[0])
            part = {key: t[lo:hi] for key, t in stored.items() if key != "norms"}
            rows = rows_to_float32(part, buf[: hi - lo])
            yield RowBlock(first + lo, indices[lo:hi], rows, None if norms is None else norms[lo:hi])


def gather_rows(
    shard_tensors: Callable[[int], Mapping[str, torch.Tensor]],
    offsets: torch.Tensor,
    positions: torch.Tensor,
    dim: int,
    key: str = "grads",
) -> torch.Tensor:
    """``[len(positions), dim]`` float32 rows at the given row positions (any order, repeats allowed);
    with ``key="norms"`` the rows' stored exact norms ``[len(positions), 2]`` instead.

    Memory: the selected rows in their storage format (``gather_stored``), and the float32 result
    they are decoded into once.
    """
    positions = torch.as_tensor(positions, dtype=torch.int64).reshape(-1)
    if positions.numel() == 0:
        return torch.empty(0, dim, dtype=torch.float32)
    stored = gather_stored(shard_tensors, offsets, positions, keys=("norms",) if key != "grads" else None)
    if key != "grads":
        if key not in stored:
            raise ValueError(f"the shards store no {key!r}")
        return stored[key].to(torch.float32)
    # one decode, straight into the result: no float32 copy of the rows beside it
    return rows_to_float32(stored, out=torch.empty(positions.shape[0], dim, dtype=torch.float32))


def gather_stored(
    shard_tensors: Callable[[int], Mapping[str, torch.Tensor]],
    offsets: torch.Tensor,
    positions: torch.Tensor,
    keys: tuple[str, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """The stored tensors (``grads``, and ``scales`` / ``norms`` when present) of the rows at the
    given positions (any order, repeats allowed), still in the storage format: int8 rows cost one
    byte a number here. ``keys``: only these tensors (default: all but ``indices``).

    ``shard_tensors(s)``: the stored (memory-mapped) tensors of shard position ``s``; only the
    selected rows are copied out of it. ``offsets``: ``[n_shards + 1]`` first row position of each
    shard (cumulative row counts).
    """
    positions = torch.as_tensor(positions, dtype=torch.int64).reshape(-1)
    total = int(offsets[-1])
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= total):
        raise IndexError(f"row positions must lie in [0, {total}); got {positions.min()}..{positions.max()}")
    # numpy bookkeeping and one take per shard: this runs per query in a two-stage lookup, where
    # per-shard torch calls cost more than the copies (~15 ms of a 30 ms lookup at 10^6 rows)
    unique, inverse = np.unique(positions.numpy(), return_inverse=True)
    bounds = offsets.numpy()
    shard_of = np.searchsorted(bounds, unique, side="right") - 1
    cuts = np.flatnonzero(np.diff(shard_of)) + 1
    stage: dict[str, np.ndarray] = {}
    kinds: dict[str, torch.dtype] = {}
    for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), unique.shape[0]]):
        s = int(shard_of[lo])
        local = unique[lo:hi] - bounds[s]
        for name, tensor in shard_tensors(s).items():
            if name == "indices" or (keys is not None and name not in keys):
                continue
            arr = _numpy(tensor)
            if name not in stage:
                stage[name] = np.empty((unique.shape[0], *arr.shape[1:]), dtype=arr.dtype)
                kinds[name] = tensor.dtype
            np.take(arr, local, axis=0, out=stage[name][lo:hi])
    inverse = inverse.reshape(-1)
    if unique.shape[0] != inverse.shape[0] or not np.array_equal(unique, positions.numpy()):
        stage = {name: arr[inverse] for name, arr in stage.items()}  # repeats or another order
    return {name: _torch(arr, kinds[name]) for name, arr in stage.items()}


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view (bf16, which numpy lacks, as int16)."""
    return tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def _torch(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    out = torch.from_numpy(arr)
    return out.view(torch.bfloat16) if dtype == torch.bfloat16 else out


def indices_from_manifest(shard: dict) -> torch.Tensor | None:
    """A shard's dataset indices without reading it: shard ``s`` holds its examples in order minus
    the skipped ones (None when the manifest does not say enough)."""
    first, last, skipped = shard.get("first_index"), shard.get("last_index"), set(shard["skipped"])
    if shard["rows"] == 0:
        return torch.empty(0, dtype=torch.int64)
    if first is None or last is None:
        return None
    out = torch.tensor([i for i in range(first, last + 1) if i not in skipped], dtype=torch.int64)
    return out if out.numel() == shard["rows"] else None

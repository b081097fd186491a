"""`CacheRows`: a cache's rows (``GradientCache.rows``), read memory-mapped from its shard files.

It owns the shard files: their header checks, the download of a lazily pulled shard before its
first read, the memory maps kept open for gathers, and every way of reading rows (whole shards,
blocks in row order, gathers at row positions). The row format itself (int8 with a scale, the
float32 conversion) is ``hf_grass.cache.rows``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hf_grass.cache import rows as row_io
from hf_grass.cache.files import CacheError, mmap_tensors, read_header
from hf_grass.cache.manifest import safe_path
from hf_grass.cache.rows import RowBlock, StoredShard

if TYPE_CHECKING:
    from hf_grass.cache.hub import RemoteFiles

MAX_OPEN_SHARDS = 256  # memory maps kept open for gathers; the least recently used is closed first
_HEADER_DTYPES = {"int8": "I8", "float16": "F16", "bfloat16": "BF16", "float32": "F32"}


class CacheRows:
    """The rows of one cache, shard by shard (reached as ``cache.rows``).

    Row *positions* number the rows ``0 .. num_rows - 1`` in shard order; ``indices[position]`` is
    the dataset index of that row.

    Args:
        path: the cache directory.
        manifest: its validated manifest (the shard list, the row width and the storage dtype).
        remote: the Hub files of a lazily pulled cache, whose shards are downloaded when first read.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], remote: RemoteFiles | None = None):
        self.path = path
        self.shards: list[dict[str, Any]] = manifest["shards"]
        self.dim: int = manifest["dim"]
        self._header_dtype = _HEADER_DTYPES[manifest["dtype"]]
        self.remote = remote
        self.paths = [safe_path(path, s["file"]) for s in self.shards]  # the shard files, in row order
        self._checked = [False] * len(self.shards)  # headers checked (a lazy cache: once fetched)
        counts = torch.tensor([0] + [s["rows"] for s in self.shards], dtype=torch.int64)
        self.row_offsets = counts.cumsum(0)  # first row position of each shard, then num_rows
        self._maps: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()

    def check_headers(self) -> None:
        """Check the size and safetensors header of every shard file here (a lazily pulled cache's
        missing shards are checked when fetched). Called after the checksums, never before."""
        for pos, shard_path in enumerate(self.paths):
            if self.remote is not None and not shard_path.is_file():
                continue  # fetched (and checked) when first read
            self._checked[pos] = self._check_header(pos)

    def _check_header(self, pos: int) -> bool:
        shard, path = self.shards[pos], self.paths[pos]
        if not path.is_file():
            raise CacheError(
                f"shard file {path} is missing; rebuild shard {shard['id']}: run the same build command on "
                "this cache again, it recomputes missing or damaged shards"
            )
        header, _ = read_header(path)
        grads, indices = header.get("grads"), header.get("indices")
        if grads is None or indices is None:
            raise CacheError(f"{path} lacks the 'grads' or 'indices' tensor; rebuild shard {shard['id']}")
        expected_dtype = self._header_dtype
        if grads["shape"] != [shard["rows"], self.dim] or grads["dtype"] != expected_dtype:
            raise CacheError(
                f"{path} holds {grads['dtype']}{grads['shape']}, but the manifest says "
                f"{expected_dtype}[{shard['rows']}, {self.dim}]; rebuild shard {shard['id']}"
            )
        if indices["shape"] != [shard["rows"]] or indices["dtype"] != "I64":
            raise CacheError(f"{path} has an invalid 'indices' tensor; rebuild shard {shard['id']}")
        scales = header.get("scales")
        if (expected_dtype == "I8") != (scales is not None) or (
            scales is not None and (scales["shape"] != [shard["rows"]] or scales["dtype"] != "F32")
        ):
            raise CacheError(f"{path} has a missing or invalid 'scales' tensor; rebuild shard {shard['id']}")
        norms = header.get("norms")
        if norms is None or norms["shape"] != [shard["rows"], 2] or norms["dtype"] != "F32":
            raise CacheError(f"{path} has a missing or invalid 'norms' tensor; rebuild shard {shard['id']}")
        return True

    def _local_shard(self, pos: int) -> Path:
        """The shard file at position ``pos``, downloaded first if this is a lazy Hub cache."""
        path = self.paths[pos]
        if not self._checked[pos]:
            if self.remote is not None:
                shard = self.shards[pos]
                self.remote.fetch([(shard["file"], shard["sha256"]), (shard["docs"], shard["docs_sha256"])])
            self._checked[pos] = self._check_header(pos)
        return path

    def _mapped(self, pos: int) -> dict[str, torch.Tensor]:
        """The memory-mapped tensors of shard ``pos``, kept open (up to ``MAX_OPEN_SHARDS``, least
        recently used closed first) so that gathering scattered rows costs no re-open per query."""
        maps = self._maps
        if pos in maps:
            maps.move_to_end(pos)
        else:
            maps[pos] = mmap_tensors(self._local_shard(pos))
            if len(maps) > MAX_OPEN_SHARDS:
                maps.popitem(last=False)
        return maps[pos]

    def iter_stored(self, shards: list[int] | None = None) -> Iterator[StoredShard]:
        """One ``StoredShard`` per shard (``shards``: only these positions), memory-mapped, as
        stored: a row is ``grads * scale`` for int8 caches, ``grads`` otherwise (convert with
        ``hf_grass.cache.rows.rows_to_float32``, or read ``iter_row_blocks``)."""
        for pos in range(len(self.shards)) if shards is None else shards:
            t = mmap_tensors(self._local_shard(pos))
            yield StoredShard(t["indices"], t["grads"], t.get("scales"), t.get("norms"))

    def iter_shards(self, shards: list[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields ``(indices [rows] int64, grads [rows, dim])`` per shard: memory-mapped, or, for int8
        caches, decoded to float32 one shard at a time. ``shards``: only these positions."""
        for shard in self.iter_stored(shards):
            yield shard.indices, shard.rows()

    def iter_row_blocks(self, rows_per_block: int, shards: list[int] | None = None) -> Iterator[RowBlock]:
        """Float32 rows in blocks of at most ``rows_per_block`` (never spanning shards), in row order.

        Each block's ``rows`` is one reused buffer, valid until the next block: copy what you keep.
        ``shards``: only these shard positions (e.g. one rank's share).
        """
        order = list(range(len(self.shards))) if shards is None else list(shards)
        stream = (
            (int(self.row_offsets[pos]), shard.indices, shard.stored())
            for pos, shard in zip(order, self.iter_stored(order))
        )
        return row_io.iter_blocks(stream, rows_per_block, self.dim)

    def rows_at(self, positions: torch.Tensor) -> torch.Tensor:
        """``[n, dim]`` float32 rows at these row positions (see ``hf_grass.cache.rows``): reads only
        those rows (a lazily pulled cache downloads only the shards holding them)."""
        return row_io.gather_rows(self._mapped, self.row_offsets, positions, self.dim)

    def stored_at(self, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows at these positions as stored (``grads``, and ``scales`` / ``norms`` when
        present; decode blocks of them with ``hf_grass.cache.rows.rows_to_float32``): one byte a
        number for int8 rows, where ``rows_at`` makes four."""
        return row_io.gather_stored(self._mapped, self.row_offsets, positions)

    def norms_at(self, positions: torch.Tensor) -> torch.Tensor:
        """``[n, 2]`` float32: the exact gradient and preconditioned norms of the rows at these
        positions (stored by the pass; for unit-normalised scores)."""
        return row_io.gather_rows(self._mapped, self.row_offsets, positions, 2, key="norms")

    @cached_property
    def indices(self) -> torch.Tensor:
        """Dataset index of every row, in row order (read once)."""
        parts = [self._shard_indices(pos) for pos in range(len(self.shards))]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def _shard_indices(self, pos: int) -> torch.Tensor:
        if not self._checked[pos]:  # not downloaded (lazy): from the manifest if it tells
            out = row_io.indices_from_manifest(self.shards[pos])
            if out is not None:
                return out
        return mmap_tensors(self._local_shard(pos))["indices"].clone()

    def load(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All rows in memory (small caches and tests): ``[num_rows, dim]``."""
        blocks = [row_io.rows_to_float32({"grads": grads}).to(dtype) for _, grads in self.iter_shards()]
        return torch.cat(blocks) if blocks else torch.empty(0, self.dim, dtype=dtype)

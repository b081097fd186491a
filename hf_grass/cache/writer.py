"""`CacheWriter`: shard-by-shard, crash-safe writing of a gradient cache by one process.

Every shard is committed in this order: shard tensors, shard documents, running statistics (each
written to a temp file, fsynced and renamed), then this process's manifest part (atomic rename),
then the previous statistics file is deleted. A crash at any point leaves the part pointing at
complete, checksummed files; files written after the last part update are ignored and overwritten
on resume. A lock file per rank prevents two uncoordinated writers.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_grass.cache.files import (
    CacheError,
    FileLock,
    atomic_write_bytes,
    atomic_write_json,
    durable_unlink,
    host_tag,
    read_header,
    save_tensors,
    sha256_bytes,
    sha256_file,
    temp_owner,
)
from hf_grass.cache.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PARTS_DIR,
    carry_indexes,
    load_json,
    merge_parts,
    part_name,
    shard_names,
)
from hf_grass.config import GraSSConfig

# Child of the `transformers` logger: `transformers.logging.set_verbosity_info()` shows our
# resume/skip messages too, and capture/cache stay free of a transformers import.
logger = logging.getLogger("transformers.hf_grass")


def num_shards(num_examples: int, shard_size: int) -> int:
    return -(-num_examples // shard_size)


def encode_rows(rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows in the storage dtype, and for int8 the per-row scales (``row = q * scale``).

    int8 rows are scaled so that their largest entry is 127: the rounding error is at most half a
    step of each row's own range (measured to change no ranking metric, docs/benchmarks.md).
    """
    if dtype != torch.int8:
        return rows.to(dtype), None
    rows = rows.to(torch.float32)
    scales = rows.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


@dataclass
class ShardContent:
    """What one shard holds: its rows in the storage dtype, with their dataset ``indices``, their
    documents (``{"index", "text", "id"}``) and, for int8 rows, their per-row ``scales``; the examples
    ``skipped`` (no supervised token) and ``truncated``; ``norms [rows, 2]`` (gradient,
    preconditioned; default: the stored vectors' own); ``prefix``: the special token ids every
    document of the shard begins with (``None``: not known), merged into ``documents.prefix``."""

    indices: list[int]
    rows: torch.Tensor
    docs: list[dict[str, Any]]
    skipped: list[int] = field(default_factory=list)
    scales: torch.Tensor | None = None
    norms: torch.Tensor | None = None
    truncated: int = 0
    prefix: list[int] | None = None


class CacheWriter:
    """Writes (or resumes) the shards of one rank.

    Args:
        cache_dir: the cache directory (created if needed).
        config: the run's configuration; its ``cache_hash`` must match an existing cache.
        header: the identity of the run, recorded in the manifest and compared on resume:
            ``model`` (fingerprint dict), ``modules`` (list of module dicts), ``dim``,
            ``num_examples``, ``dataset`` (fingerprint string) and, for a user's loss, ``loss``
            (its name).
        rank, world_size: this process and the number of writers.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        config: GraSSConfig,
        header: dict[str, Any],
        rank: int = 0,
        world_size: int = 1,
    ):
        self.root = Path(cache_dir)
        self.config = config
        self.rank = rank
        self.world_size = world_size
        for sub in ("shards", "stats", PARTS_DIR):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(self.root / f".lock-rank{rank}").acquire()
        try:
            self.part = self._open_part(header)
        except BaseException:
            self.lock.release()
            raise

    # ---- opening / resuming ---------------------------------------------------------------------

    def _new_part(self, header: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "config_hash": self.config.cache_hash(),
            "dtype": self.config.dtype,
            "shard_size": self.config.shard_size,
            "world_size": self.world_size,
            "rank": self.rank,
            "shards": [],
            "stats": [],
            "eigenbasis": None,
            "complete": False,
            **header,
        }

    def _open_part(self, header: dict[str, Any]) -> dict[str, Any]:
        existing = sorted((self.root / PARTS_DIR).glob("rank*-of*.json"))
        others = [p for p in existing if not p.name.endswith(f"-of{self.world_size}.json")]
        if others:
            raise CacheError(
                f"{self.root} was written by {others[0].name.split('-of')[1].split('.')[0]} processes; resume it "
                f"with the same number of processes (now {self.world_size}), or use a new cache_dir."
            )
        path = self.root / part_name(self.rank, self.world_size)
        fresh = self._new_part(header)
        if not path.exists():
            manifest = self.root / MANIFEST
            if manifest.exists() and not existing:
                # a cache from elsewhere (or a deleted parts/ folder): still refuse to mix
                self._check_compatible(load_json(manifest), fresh, manifest)
                raise CacheError(
                    f"{self.root} holds a finished cache without writer parts; use a new cache_dir to build again."
                )
            return fresh
        part = load_json(path)
        self._check_compatible(part, fresh, path)
        part["complete"] = False
        if part["shards"]:
            logger.info(
                "Resuming gradient cache %s (rank %d): %d shards already complete.",
                self.root,
                self.rank,
                len(part["shards"]),
            )
        return part

    def _check_compatible(self, old: dict[str, Any], new: dict[str, Any], where: Path) -> None:
        checks = [
            ("config_hash", "configuration (compressor, proj_dim, seed, targets, dtype, ...)"),
            ("model", "model (class, name, weights or module shapes)"),
            ("modules", "target modules"),
            ("dim", "gradient dimension"),
            ("num_examples", "dataset size"),
            ("dataset", "dataset content"),
            ("loss", "per-example loss (per_example_loss)"),
        ]
        for key, what in checks:
            if old.get(key) != new.get(key):
                detail = ""
                if key == "config_hash":
                    changed = sorted(
                        k for k, v in self.config.cache_dict().items() if old.get("config", {}).get(k) != v
                    )
                    detail = f" (changed: {', '.join(changed)})" if changed else ""
                raise CacheError(
                    f"{where} was written with another {what}{detail}; refusing to mix it with this run. "
                    "Use a new cache_dir, or delete the old cache."
                )

    # ---- state ----------------------------------------------------------------------------------

    @property
    def completed(self) -> set[int]:
        return {s["id"] for s in self.part["shards"]}

    def damaged_shards(self, verify: bool = False) -> list[int]:
        """Shards this rank lists whose files are missing, truncated or (``verify``) altered."""
        damaged = []
        for entry in self.part["shards"]:
            tensors, docs = self.root / entry["file"], self.root / entry["docs"]
            try:
                header, _ = read_header(tensors)
                ok = (
                    header.get("grads", {}).get("shape") == [entry["rows"], self.part["dim"]]
                    and docs.is_file()
                )
                if ok and verify:
                    ok = sha256_file(tensors) == entry["sha256"] and sha256_file(docs) == entry["docs_sha256"]
            except (OSError, CacheError, ValueError):
                ok = False
            if not ok:
                damaged.append(entry["id"])
        return damaged

    @property
    def stats_file(self) -> Path | None:
        mine = [s for s in self.part["stats"] if s["rank"] == self.rank]
        return self.root / mine[0]["file"] if mine else None

    def eigenbasis_entry(self) -> dict[str, Any] | None:
        return self.part.get("eigenbasis")

    @property
    def eigenbasis_path(self) -> Path:
        return self.root / "eigenbasis.safetensors"

    def record_eigenbasis(self, digest: str) -> None:
        self.part["eigenbasis"] = {"file": "eigenbasis.safetensors", "sha256": digest}
        self._write_part()

    # ---- committing ------------------------------------------------------------------------------

    def commit_shard(self, shard_id: int, content: ShardContent, stats: dict[str, torch.Tensor] | None = None) -> None:
        """Write one complete shard (``ShardContent``: rows already in the storage dtype, with their
        per-row scales for int8, see ``encode_rows``) and checkpoint the statistics ``stats``."""
        indices, rows, docs, scales = content.indices, content.rows, content.docs, content.scales
        if rows.shape[0] != len(indices) or len(docs) != len(indices):
            raise ValueError("rows, indices and docs of a shard must have the same length")
        if (rows.dtype == torch.int8) != (scales is not None):
            raise ValueError("int8 rows need their per-row scales (and only int8 rows have them)")
        norms = content.norms
        if norms is None:  # nothing better known: the stored vectors' own norms, in both columns
            decoded = rows.to(torch.float32) * (scales[:, None] if scales is not None else 1.0)
            norms = decoded.norm(dim=1, keepdim=True).expand(-1, 2)
        tensor_file, docs_file = shard_names(shard_id)
        tensors = {"grads": rows.contiguous(), "indices": torch.tensor(indices, dtype=torch.int64)}
        if scales is not None:
            tensors["scales"] = scales.to(torch.float32).contiguous()
        if tuple(norms.shape) != (len(indices), 2):
            raise ValueError("norms of a shard must be [rows, 2] (gradient, preconditioned)")
        tensors["norms"] = norms.to(torch.float32).contiguous()
        digest = save_tensors(self.root / tensor_file, tensors)
        blob = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()
        atomic_write_bytes(self.root / docs_file, blob)
        entry = {
            "id": shard_id,
            "file": tensor_file,
            "docs": docs_file,
            "rows": len(indices),
            "sha256": digest,
            "docs_sha256": sha256_bytes(blob),
            "skipped": content.skipped,
            "truncated": content.truncated,
            "prefix": content.prefix,
            "first_index": indices[0] if indices else None,
            "last_index": indices[-1] if indices else None,
            "norms": True,  # the shard stores its rows' norms (format 2: always)
        }
        old_stats = self.stats_file
        if stats is not None:
            seq = len(self.part["shards"]) + 1
            stats_rel = f"stats/rank{self.rank}-{seq:06d}.safetensors"
            stats_digest = save_tensors(self.root / stats_rel, stats)
            self.part["stats"] = [s for s in self.part["stats"] if s["rank"] != self.rank] + [
                {"file": stats_rel, "sha256": stats_digest, "rank": self.rank}
            ]
        self.part["shards"] = [s for s in self.part["shards"] if s["id"] != shard_id] + [entry]
        self.part["shards"].sort(key=lambda s: s["id"])
        self._write_part()
        if (
            old_stats is not None
            and stats is not None
            and old_stats != self.stats_file
            and old_stats.exists()
        ):
            durable_unlink(old_stats)

    def _write_part(self) -> None:
        atomic_write_json(self.root / part_name(self.rank, self.world_size), self.part)
        if self.world_size == 1:
            atomic_write_json(self.root / MANIFEST, carry_indexes(self.root, merge_parts([self.part])))

    def finish(self, complete: bool) -> None:
        """Mark this rank's part complete (rank 0 merges all parts once every rank has finished)."""
        self.part["complete"] = complete
        self._write_part()

    def merge(self) -> dict[str, Any]:
        """Rank 0, after a barrier: write ``manifest.json`` from every rank's part."""
        parts = [load_json(self.root / part_name(r, self.world_size)) for r in range(self.world_size)]
        manifest = carry_indexes(self.root, merge_parts(parts))
        atomic_write_json(self.root / MANIFEST, manifest)
        return manifest

    def cleanup_orphans(self) -> None:
        """Remove stats files of this rank that no part references, and temp files of dead
        processes of this host (after a crash).

        Temp files are named by host and pid (``.{name}.tmp-{host}-{pid}``). A pid says nothing about
        a process on another node of a shared filesystem, so only this host's temp files whose pid
        is no longer running are removed; another host's, and unparseable names (temp files of
        older versions, which carried no host), are left alone.
        """
        referenced = {s["file"] for s in self.part["stats"]}
        for path in (self.root / "stats").glob(f"rank{self.rank}-*.safetensors"):
            if f"stats/{path.name}" not in referenced:
                durable_unlink(path)
        me = host_tag()
        for path in self.root.rglob(".*.tmp-*"):
            owner = temp_owner(path.name)
            if owner is not None and owner[0] == me and not _pid_alive(owner[1]):
                durable_unlink(path)

    def close(self) -> None:
        self.lock.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

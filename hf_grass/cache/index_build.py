"""Building a cache's FAISS index (``hf_grass.cache.index`` describes the index and loads it).

**Memory.** Full rows are read in chunks of ``READ_BYTES`` of float32 and turned into the index's
vectors (projected to ``IndexSettings.projection`` numbers) chunk by chunk; the training sample is
held as those vectors, at most ``train_bytes`` of them. A build of 10^6 rows of 31,744 numbers
then holds about 64 MB of rows, a 256 MB training sample and the index itself, not an 8 GB sample.

**Crash-safe and resumable.** A new index gets a new file name, the manifest is updated
(atomically) only once the file is complete, and the old file is deleted last, so a crash leaves
the old index or the new one. The build checkpoints the trained (empty) index and then the partial
index every ``checkpoint_rows`` rows (``index/.build/``); run it again to continue from the last
checkpoint. A checkpoint of other shards or other settings is discarded.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from hf_grass.cache.files import CacheError, FileLock, atomic_write_bytes, atomic_write_json, sha256_bytes
from hf_grass.cache.index import (
    BUILD_DIR,
    DEFAULT_SHORTLIST,
    INDEX_DIR,
    PRINCIPAL_ROWS,
    READ_BYTES,
    IndexSettings,
    default_factory,
    default_search,
    faiss_module,
    index_vectors,
    shard_fingerprint,
    stale_reason,
    update_manifest,
)
from hf_grass.cache.manifest import load_json
from hf_grass.cache.projection import METHOD, RowProjection, principal_directions

logger = logging.getLogger("transformers.hf_grass")


def build_index(
    cache: Any,
    kind: str = "auto",
    *,
    rebuild: bool = False,
    checkpoint_rows: int = 1 << 18,
    threads: int | None = None,
    progress: bool = False,
    **fields: Any,
) -> dict[str, Any]:
    """Build (or resume building) the cache's FAISS index; returns its manifest entry.

    Args:
        kind: ``auto``, ``ivfpq``, ``hnsw-sq8``, ``hnsw`` or ``flat``; ``fields`` are the other ``IndexSettings``
            (``factory``, ``cosine``, ``nlist``, ``pq_m``, ``hnsw_m``, ``projection``, ``shortlist``,
            ``train_rows``, ``train_bytes``, ``search``, ``seed``).
        rebuild: build anew even if a current index of these settings exists.
        checkpoint_rows: rows added between checkpoints of a resumable build.
        threads: FAISS threads (default: FAISS's, i.e. OpenMP's).
        progress: print the build's steps.
    """
    settings = IndexSettings.of(kind, fields)
    faiss = faiss_module()
    root = Path(cache.path)
    if not cache.manifest["complete"]:
        raise CacheError(f"{root} is an unfinished build; finish it (run the build again) before indexing")
    if cache.num_rows == 0:
        raise ValueError(f"{root} holds no rows; there is nothing to index")
    job = _Build(cache, _plan(cache, settings), checkpoint_rows, progress)
    existing = cache.manifest.get("index")
    if existing and not rebuild and _same(existing, job.plan) and stale_reason(existing, cache.manifest) is None:
        return existing
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    (root / BUILD_DIR).mkdir(parents=True, exist_ok=True)
    with FileLock(root / INDEX_DIR / ".lock"):
        start = time.perf_counter()
        index, next_shard, top = job.resume()
        if index is None:
            job.fit_projection()
            index = faiss.index_factory(job.width, job.plan["factory"], faiss.METRIC_INNER_PRODUCT)
            _no_polysemous_training(index, faiss)
            if not index.is_trained:
                job.train(index)
            next_shard, top = 0, _empty_shortlist()
            job.checkpoint(index, 0, top)
        top = job.add_rows(index, next_shard, top)
        files, data_bytes = job.write(index, top)
        entry = {
            "engine": "faiss",
            "faiss_version": faiss.__version__,
            "kind": job.plan["label"],
            "factory": job.plan["factory"],
            "metric": "inner_product",
            "cosine": job.plan["cosine"],
            "dim": cache.dim,
            "projection": job.plan["projection"],
            "rows": int(index.ntotal),
            "search": {**default_search(index), **(settings.search or {})},
            "shortlist_rows": job.plan["shortlist_rows"],
            "files": files,
            "bytes": data_bytes,
            "built_from": job.plan["built_from"],
            "build_seconds": round(time.perf_counter() - start, 3),
        }
        old = update_manifest(cache, "index", entry)
        if old:
            for f in old["files"]:
                if f["file"] not in {g["file"] for g in files}:
                    (root / f["file"]).unlink(missing_ok=True)
        shutil.rmtree(root / BUILD_DIR, ignore_errors=True)
    logger.info("Built the %s index of %s (%d rows, %d bytes).", entry["factory"], root, entry["rows"], data_bytes)
    return entry


def _plan(cache: Any, settings: IndexSettings) -> dict[str, Any]:
    """Everything the index's bytes depend on (a checkpoint of another plan is discarded)."""
    manifest = cache.manifest
    cosine = bool(cache.config.cosine if settings.cosine is None else settings.cosine)
    shortlist = settings.shortlist if settings.shortlist is not None else (0.0 if cosine else DEFAULT_SHORTLIST)
    width = settings.width(cache.dim)
    projection = None
    if width != cache.dim:  # the basis is fitted in the build; the manifest records this and its file
        principal = min(settings.principal, width // 2)
        projection = {"method": METHOD, "dim": cache.dim, "width": width, "principal": principal, "seed": settings.seed}
    kind = settings.resolved_kind(cache.dim)
    return {
        "label": "custom" if settings.factory else kind,  # names the file
        "factory": default_factory(settings, kind, cache.num_rows, width),
        "cosine": cosine,
        "seed": settings.seed,
        "projection": projection,
        "train_rows": settings.train_rows,
        "train_bytes": settings.train_bytes,
        "shortlist_rows": round(shortlist * cache.num_rows),
        "built_from": {"config_hash": manifest["config_hash"], "dim": manifest["dim"], "shards": shard_fingerprint(manifest)},
    }


def _same(existing: dict[str, Any], plan: dict[str, Any]) -> bool:
    """Whether an index entry was built with this plan's settings (then building is a no-op)."""
    return (
        existing["factory"] == plan["factory"]
        and existing["cosine"] == plan["cosine"]
        and existing.get("shortlist_rows", 0) == plan["shortlist_rows"]
        and existing.get("projection") == plan["projection"]
    )


def _empty_shortlist() -> dict[str, torch.Tensor]:
    return {"norms": torch.empty(0), "positions": torch.empty(0, dtype=torch.int64)}


def _no_polysemous_training(index: Any, faiss: Any) -> None:
    """The factory turns on polysemous training for IVF-PQ (a code reordering for Hamming-distance
    filtering, which the lookup does not use); it took 200 s of a 206 s train on 8192 rows."""
    with contextlib.suppress(RuntimeError):
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False


@dataclass
class _Build:
    """One build of ``plan`` over ``cache``: its steps share the plan and the projection."""

    cache: Any
    plan: dict[str, Any]
    checkpoint_rows: int
    progress: bool

    def __post_init__(self) -> None:
        spec = self.plan["projection"]
        self.projection: RowProjection | None = None  # fitted (fit_projection) or resumed
        self.width = self.cache.dim if spec is None else spec["width"]
        self.root = Path(self.cache.path)
        # full rows per read: READ_BYTES of float32 (528 rows of 31,744 numbers)
        self.read_rows = max(1, READ_BYTES // (4 * self.cache.dim))

    def sample(self, size: int, salt: int = 0) -> torch.Tensor:
        """``size`` distinct row positions drawn from the seed, sorted."""
        rng = np.random.default_rng([self.plan["seed"], salt])
        return torch.from_numpy(np.sort(rng.choice(self.cache.num_rows, size=size, replace=False)))

    def fit_projection(self) -> None:
        """The principal directions of a sample of the rows (at most ``PRINCIPAL_ROWS`` of them and
        ``train_bytes`` of float32 full rows), and the projection they make."""
        spec = self.plan["projection"]
        if spec is None:
            return
        size = min(self.cache.num_rows, PRINCIPAL_ROWS, max(1, self.plan["train_bytes"] // (4 * self.cache.dim)))
        positions = self.sample(size, salt=1)
        rows = torch.empty(size, self.cache.dim, dtype=torch.float32)
        for lo in range(0, size, self.read_rows):
            part = positions[lo : lo + self.read_rows]
            rows[lo : lo + part.shape[0]] = self.cache.rows.rows_at(part)
        if self.progress:
            print(f"hf-grass: {spec['principal']} principal directions of {size} sampled rows", flush=True)
        basis = principal_directions(rows, spec["principal"], spec["seed"])
        del rows
        self.projection = RowProjection.drawn(basis, spec["width"], spec["seed"])

    def vectors(self, positions: torch.Tensor) -> torch.Tensor:
        """The index's vectors of the rows at ``positions``, read a chunk at a time."""
        out = torch.empty(positions.shape[0], self.width, dtype=torch.float32)
        for lo in range(0, positions.shape[0], self.read_rows):
            rows = self.cache.rows.rows_at(positions[lo : lo + self.read_rows])
            out[lo : lo + rows.shape[0]] = index_vectors(rows, self.projection, self.plan["cosine"])
        return out

    def train(self, index: Any) -> None:
        faiss, n = faiss_module(), self.cache.num_rows
        want, nlist = self.plan["train_rows"], None
        with contextlib.suppress(RuntimeError):
            nlist = faiss.extract_index_ivf(index).nlist
        if want is None and nlist is not None:
            want = min(1 << 17, 64 * nlist)
        fits = max(1, self.plan["train_bytes"] // (4 * self.width))  # the sample's bound in bytes
        want = min(n, want or n, fits)
        if nlist is not None and want < nlist:
            raise ValueError(
                f"train_bytes={self.plan['train_bytes']} holds {want} training rows of {self.width} numbers, "
                f"fewer than the {nlist} inverted lists; raise train_bytes or lower nlist"
            )
        if self.progress:
            print(f"hf-grass: training the index on {want} sampled rows", flush=True)
        index.train(np.ascontiguousarray(self.vectors(self.sample(want)).numpy()))

    def add_rows(self, index: Any, first: int, top: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add the rows of shards ``first ..`` in row order (FAISS ids = row positions); keeps the
        running shortlist (the ``shortlist_rows`` largest norms of the full rows) and returns it."""
        cache, m = self.cache, self.plan["shortlist_rows"]
        if int(index.ntotal) != int(cache.rows.row_offsets[first]):
            raise CacheError("the index checkpoint does not match its recorded position; rebuild it")
        since = 0
        for block in cache.rows.iter_row_blocks(self.read_rows, shards=list(range(first, len(cache.shards)))):
            index.add(np.ascontiguousarray(index_vectors(block.rows, self.projection, self.plan["cosine"]).numpy()))
            if m:
                norms = torch.cat([top["norms"], block.rows.norm(dim=1)])
                positions = torch.cat([top["positions"], torch.arange(block.rows.shape[0]) + block.start])
                keep = norms.topk(min(m, norms.numel())).indices
                top = {"norms": norms[keep], "positions": positions[keep]}
            since += block.rows.shape[0]
            end = block.start + block.rows.shape[0]
            shard = int(torch.searchsorted(cache.rows.row_offsets, torch.tensor([end - 1]), right=True)[0]) - 1
            if since >= self.checkpoint_rows and end == int(cache.rows.row_offsets[shard + 1]):
                self.checkpoint(index, shard + 1, top)
                since = 0
                if self.progress:
                    print(f"hf-grass: indexed {end} of {cache.num_rows} rows", flush=True)
        return top

    def write(self, index: Any, top: dict[str, torch.Tensor]) -> tuple[list[dict[str, str]], int]:
        """Write the index file and the shortlist; their manifest entries and total bytes."""
        data = faiss_module().serialize_index(index).tobytes()
        digest = sha256_bytes(data)
        rel = f"{INDEX_DIR}/faiss-{self.plan['label']}-{digest[:12]}.index"
        atomic_write_bytes(self.root / rel, data)
        files = [{"file": rel, "sha256": digest}]
        total = len(data)
        if self.plan["shortlist_rows"]:
            positions = top["positions"].sort().values
            blob = safetensors_save({"positions": positions, "vectors": self.vectors(positions)})
            short = f"{INDEX_DIR}/shortlist-{sha256_bytes(blob)[:12]}.safetensors"
            atomic_write_bytes(self.root / short, blob)
            files.append({"file": short, "sha256": sha256_bytes(blob), "role": "shortlist"})
            total += len(blob)
        if self.projection is not None:
            blob = safetensors_save({"basis": self.projection.basis})
            rel = f"{INDEX_DIR}/projection-{sha256_bytes(blob)[:12]}.safetensors"
            atomic_write_bytes(self.root / rel, blob)
            files.append({"file": rel, "sha256": sha256_bytes(blob), "role": "projection"})
            total += len(blob)
        return files, total

    # ---- checkpoints ----------------------------------------------------------------------------

    def resume(self) -> tuple[Any, int, dict[str, torch.Tensor]]:
        """The checkpointed partial index of this plan, the next shard to add and the running norm
        shortlist (None, 0, empty if there is no usable checkpoint)."""
        build = self.root / BUILD_DIR
        paths = [build / name for name in ("state.json", "partial.index", "shortlist.st", "projection.st")]
        if not all(path.is_file() for path in paths):
            return None, 0, _empty_shortlist()
        try:
            state = load_json(paths[0])
            data, short, basis = (path.read_bytes() for path in paths[1:])
            if (
                state.get("plan") != self.plan
                or sha256_bytes(data) != state.get("sha256")
                or sha256_bytes(short) != state.get("shortlist_sha256")
                or sha256_bytes(basis) != state.get("projection_sha256")
            ):
                logger.warning("Discarding an index checkpoint of other settings or shards in %s.", self.root)
                return None, 0, _empty_shortlist()
            index = faiss_module().deserialize_index(np.frombuffer(data, dtype=np.uint8))
            top = safetensors_load(short)
            spec = self.plan["projection"]
            if spec is not None:
                self.projection = RowProjection.drawn(safetensors_load(basis)["basis"], spec["width"], spec["seed"])
        except (CacheError, OSError, RuntimeError, ValueError, KeyError):
            return None, 0, _empty_shortlist()
        logger.info("Resuming the index build of %s at shard %d.", self.root, state["next_shard"])
        return index, int(state["next_shard"]), top

    def checkpoint(self, index: Any, next_shard: int, top: dict[str, torch.Tensor]) -> None:
        data = faiss_module().serialize_index(index).tobytes()
        short = safetensors_save(top)
        basis = safetensors_save({"basis": self.projection.basis if self.projection is not None else torch.empty(0)})
        atomic_write_bytes(self.root / BUILD_DIR / "partial.index", data)
        atomic_write_bytes(self.root / BUILD_DIR / "shortlist.st", short)
        atomic_write_bytes(self.root / BUILD_DIR / "projection.st", basis)
        state = {
            "plan": self.plan,
            "next_shard": next_shard,
            "ntotal": int(index.ntotal),
            "sha256": sha256_bytes(data),
            "shortlist_sha256": sha256_bytes(short),
            "projection_sha256": sha256_bytes(basis),
        }
        atomic_write_json(self.root / BUILD_DIR / "state.json", state)

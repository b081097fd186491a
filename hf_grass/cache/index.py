"""A FAISS index of a cache's rows for maximum inner product search, stored inside the cache.

``GradientCache.build_index`` (and ``hf-grass index``) builds it; the two-stage lookup
(``hf_grass.scoring``) takes candidates from it and re-scores them exactly from the cache rows, so
the reported scores never come from the index. Kinds (FAISS factory strings, inner-product metric):

- ``ivfpq`` (default): ``IVF{nlist},PQ{m}``, an inverted file over product-quantised codes:
  ``m`` bytes per row (``dim / 16`` by default, 3 % of an fp16 row), ``nprobe`` lists scanned;
- ``hnsw``: ``HNSW{M},Flat``, a graph over the float32 rows (twice the size of an fp16 cache);
- ``flat``: ``Flat``, the exact inner product in FAISS (the baseline; as large as a float32 copy);
- any other FAISS factory string with ``factory=``.

Which is the default was chosen by measurement (``benchmarks/index.py``, docs/benchmarks.md).

**The norm shortlist.** Gradient rows have heavy-tailed norms (on the benchmark's real rows the
largest norm is 29x the median) and the rows of largest norm take a large share of every query's
extreme scores; product quantisation, trained on typical rows, estimates exactly those worst. So
the ``shortlist`` fraction of rows with the largest norms (1 % by default) is kept beside the index
as float32 and scored exactly for every query (a matrix-vector product), and the index's candidates
fill the rest. On the real rows this raised recall@10 at 10^5 rows from 0.91 to 0.98 (helpful) and
from 0.67 to 0.92 (harmful) at the same search cost (benchmarks/index.py, docs/benchmarks.md).

**Cosine.** With ``cosine=True`` the index holds unit-normalised rows (and queries are normalised),
so its candidates are those of cosine scores; an index answers only the scores it was built for
and ``load_index`` refuses the other kind.

**Storage.** ``index/faiss-<kind>-<sha256[:12]>.index`` (``faiss.serialize_index`` bytes, written
atomically) and ``index/shortlist-<sha256[:12]>.safetensors`` (``positions``, ``rows``), listed in the manifest under ``"index"`` with its sha256 and the shard checksums it was
built from. A new index gets a new file name, the manifest is updated (atomically) only once the
file is complete, and the old file is deleted last, so a crash leaves the old index or the new one.
An index built from other shards than the cache now holds is *stale* and refused.

**Resume.** The build checkpoints the trained (empty) index and then the partial index every
``checkpoint_rows`` rows (``index/.build/``); run it again to continue from the last checkpoint. A
checkpoint of other shards or other settings is discarded.

Nothing here imports the reader: functions take the ``GradientCache`` as ``cache``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from hf_grass.cache.files import (
    CacheError,
    FileLock,
    atomic_write_bytes,
    atomic_write_json,
    sha256_bytes,
)
from hf_grass.cache.manifest import MANIFEST, load_json, safe_path

logger = logging.getLogger("transformers.hf_grass")

INDEX_DIR = "index"
BUILD_DIR = f"{INDEX_DIR}/.build"
KINDS = ("ivfpq", "hnsw", "flat")
DEFAULT_SHORTLIST = 0.01  # of the rows, by norm (benchmarks/index.py)
MANIFEST_KEYS = ("index", "lexical_index")  # the FAISS index, the BM25 index (cache/lexical.py)


def index_files(manifest: dict[str, Any]) -> list[dict[str, str]]:
    """``{"file", "sha256"}`` of every index file the manifest lists (FAISS and BM25)."""
    out = []
    for key in MANIFEST_KEYS:
        entry = manifest.get(key)
        if entry:
            out += [{"file": f["file"], "sha256": f["sha256"]} for f in entry["files"]]
    return out


def shard_fingerprint(manifest: dict[str, Any]) -> list[list[Any]]:
    """What an index is built from: ``[id, sha256, rows]`` of every shard, in order."""
    return [[s["id"], s["sha256"], s["rows"]] for s in manifest["shards"]]


def stale_reason(entry: dict[str, Any], manifest: dict[str, Any], what: str = "index") -> str | None:
    """Why ``entry`` does not describe the cache of ``manifest`` (None: it does)."""
    built = entry["built_from"]
    if built.get("dim") != manifest["dim"] or built.get("config_hash") != manifest["config_hash"]:
        return f"the {what} was built for another configuration or row width"
    if built["shards"] != shard_fingerprint(manifest):
        old = {s[0]: s[1] for s in built["shards"]}
        new = {s[0]: s[1] for s in shard_fingerprint(manifest)}
        changed = sorted(i for i in old.keys() | new.keys() if old.get(i) != new.get(i))
        return (
            f"the cache changed since the {what} was built (shards {changed[:8]}"
            f"{'...' if len(changed) > 8 else ''} differ)"
        )
    return None


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("the index needs FAISS: pip install faiss-cpu") from err
    return faiss


# ---- settings -----------------------------------------------------------------------------------


def _divisor_near(dim: int, target: int) -> int:
    """The divisor of ``dim`` closest to ``target`` (PQ needs ``dim % m == 0``)."""
    divisors = [d for d in range(1, dim + 1) if dim % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), d))


def default_factory(kind: str, rows: int, dim: int, nlist: int | None, pq_m: int | None, hnsw_m: int) -> str:
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{hnsw_m},Flat"
    if kind != "ivfpq":
        raise ValueError(f"kind must be one of {', '.join(KINDS)} (or give factory=...), got {kind!r}")
    if nlist is None:  # about sqrt(rows) lists, a power of two, with >= 64 training rows per list
        nlist = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(rows)))))
        nlist = max(1, min(nlist, rows // 64))
    m = pq_m or _divisor_near(dim, max(1, dim // 16))
    if dim % m:
        raise ValueError(f"pq_m={m} must divide the row width {dim}")
    if rows < 256 * 39:  # 8-bit codes need 256 centroids per sub-quantiser, trained on >= 39 rows each
        bits = max(1, min(8, int(math.log2(max(2, rows // 39)))))
        return f"IVF{nlist},PQ{m}x{bits}"
    return f"IVF{nlist},PQ{m}"


def default_search(index: Any) -> dict[str, int]:
    faiss = _faiss()
    with contextlib.suppress(RuntimeError):
        ivf = faiss.extract_index_ivf(index)
        # 1/16 of the lists, at least 64: at 10^6 real rows (1024 lists) the setting that met every
        # target (benchmarks/index.py); nprobe=128 gains recall for 7 ms more per query
        return {"nprobe": max(1, min(ivf.nlist, max(64, ivf.nlist // 16)))}
    if hasattr(index, "hnsw"):
        return {"efSearch": 256}
    return {}


# ---- the index object ---------------------------------------------------------------------------


@dataclass
class FaissIndex:
    """A loaded index: ``search`` returns the row positions of the best candidates."""

    index: Any
    entry: dict[str, Any]
    shortlist_positions: torch.Tensor | None = None  # [m] row positions of the largest norms
    shortlist_rows: torch.Tensor | None = None  # [m, dim] float32: scored exactly for every query
    shortlist_mask: torch.Tensor | None = None  # [num_rows] bool: row position is in the shortlist

    @property
    def cosine(self) -> bool:
        return bool(self.entry["cosine"])

    def search(self, queries: torch.Tensor, n: int, params: dict[str, int] | None = None) -> torch.Tensor:
        """``[n_query, n]`` int64 row positions with the largest inner products (``-1``: none)."""
        faiss = _faiss()
        q = np.ascontiguousarray(queries.detach().to(torch.float32).cpu().numpy())
        if self.cosine:
            faiss.normalize_L2(q)
        space = faiss.ParameterSpace()
        for key, value in {**self.entry.get("search", {}), **(params or {})}.items():
            space.set_index_parameter(self.index, key, int(value))
        n = min(n, self.index.ntotal)
        _, ids = self.index.search(q, n)
        return torch.from_numpy(ids.astype(np.int64))


def load_index(cache: Any) -> FaissIndex | None:
    """The cache's FAISS index (None when none is built), checked: its sha256, and that it was built
    from the shards the cache holds now (``CacheError`` otherwise, saying how to fix it)."""
    entry = cache.manifest.get("index")
    if not entry:
        return None
    reason = stale_reason(entry, cache.manifest)
    if reason:
        raise CacheError(
            f"the index of {cache.path} is stale: {reason}. Rebuild it (hf-grass index {cache.path} "
            "--rebuild, or cache.build_index(rebuild=True)), or query with search='exact'."
        )
    data = _checked_bytes(cache, entry["files"][0])
    index = _faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))
    if index.ntotal != cache.num_rows or index.d != cache.dim:
        name = entry["files"][0]["file"]
        raise CacheError(f"the index file {name} holds {index.ntotal} x {index.d}, not the cache's rows")
    out = FaissIndex(index, entry)
    for f in entry["files"][1:]:
        if f.get("role") == "shortlist":
            short = safetensors_load(_checked_bytes(cache, f))
            out.shortlist_positions, out.shortlist_rows = short["positions"], short["rows"]
            out.shortlist_mask = torch.zeros(cache.num_rows, dtype=torch.bool)
            out.shortlist_mask[out.shortlist_positions] = True
    return out


def _checked_bytes(cache: Any, file: dict[str, str]) -> bytes:
    """The bytes of an index file, refused (``CacheError``, naming the fix) if missing or altered."""
    path = safe_path(cache.path, file["file"])
    if not path.is_file() and getattr(cache, "remote", None) is not None:
        cache.remote.fetch([(file["file"], file["sha256"])])
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CacheError(
            f"the index file {path} listed in the manifest is missing; rebuild it (hf-grass index "
            f"{cache.path} --rebuild) or query with search='exact'"
        ) from None
    if sha256_bytes(data) != file["sha256"]:
        raise CacheError(
            f"the index file {path} does not match its sha256 in the manifest: it is damaged. Rebuild it "
            f"(hf-grass index {cache.path} --rebuild) or query with search='exact'."
        )
    return data


# ---- building -----------------------------------------------------------------------------------


def build_index(
    cache: Any,
    kind: str = "ivfpq",
    *,
    factory: str | None = None,
    cosine: bool | None = None,
    nlist: int | None = None,
    pq_m: int | None = None,
    hnsw_m: int = 32,
    train_rows: int | None = None,
    search: dict[str, int] | None = None,
    rebuild: bool = False,
    checkpoint_rows: int = 1 << 18,
    threads: int | None = None,
    seed: int = 0,
    progress: bool = False,
    shortlist: float | None = None,
) -> dict[str, Any]:
    """Build (or resume building) the cache's FAISS index; returns its manifest entry.

    Args:
        kind: ``ivfpq``, ``hnsw`` or ``flat`` (module docstring), ignored with ``factory``.
        factory: a FAISS ``index_factory`` string (inner-product metric).
        cosine: index unit-normalised rows, for cosine scores (default: the cache's ``cosine``).
        nlist, pq_m, hnsw_m: ``ivfpq`` lists and bytes per row, ``hnsw`` links per node.
        train_rows: rows sampled (seeded) to train the index (default ``64 * nlist``, max 2^17).
        search: default search parameters stored with the index (``nprobe``, ``efSearch``).
        rebuild: build anew even if a current index exists.
        checkpoint_rows: rows added between checkpoints of a resumable build.
        threads: FAISS threads (default: FAISS's, i.e. OpenMP's).
        shortlist: the fraction of rows with the largest norms kept beside the index as float32 and
            scored exactly for every query (default 0.01; 0 for a cosine index, whose rows all have
            norm 1). See the module docstring.
    """
    faiss = _faiss()
    root = Path(cache.path)
    manifest = cache.manifest
    if not manifest["complete"]:
        raise CacheError(f"{root} is an unfinished build; finish it (run the build again) before indexing")
    if cache.num_rows == 0:
        raise ValueError(f"{root} holds no rows; there is nothing to index")
    cosine = bool(cache.config.cosine if cosine is None else cosine)
    if shortlist is None:
        shortlist = 0.0 if cosine else DEFAULT_SHORTLIST
    if not 0 <= shortlist <= 1:
        raise ValueError(f"shortlist must be a fraction of the rows in [0, 1], got {shortlist}")
    label = "custom" if factory else kind
    factory = factory or default_factory(kind, cache.num_rows, cache.dim, nlist, pq_m, hnsw_m)
    existing = manifest.get("index")
    if (
        existing
        and not rebuild
        and existing["factory"] == factory
        and existing["cosine"] == cosine
        and existing.get("shortlist_rows", 0) == round(shortlist * cache.num_rows)
        and stale_reason(existing, manifest) is None
    ):
        return existing
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    (root / BUILD_DIR).mkdir(parents=True, exist_ok=True)
    with FileLock(root / INDEX_DIR / ".lock"):
        plan = {
            "factory": factory,
            "cosine": cosine,
            "seed": seed,
            "train_rows": train_rows,
            "shortlist_rows": round(shortlist * cache.num_rows),
            "built_from": {
                "config_hash": manifest["config_hash"],
                "dim": manifest["dim"],
                "shards": shard_fingerprint(manifest),
            },
        }
        start = time.perf_counter()
        index, next_shard, top = _resume(root, plan)
        if index is None:
            index = faiss.index_factory(cache.dim, factory, faiss.METRIC_INNER_PRODUCT)
            _no_polysemous_training(index, faiss)
            if not index.is_trained:
                _train(cache, index, plan, faiss, progress)
            next_shard, top = 0, _empty_shortlist()
            _checkpoint(root, plan, index, 0, top, faiss)
        top = _add_rows(cache, index, plan, next_shard, top, checkpoint_rows, faiss, progress)
        data = faiss.serialize_index(index).tobytes()
        digest = sha256_bytes(data)
        rel = f"{INDEX_DIR}/faiss-{label}-{digest[:12]}.index"
        atomic_write_bytes(root / rel, data)
        files = [{"file": rel, "sha256": digest}]
        short_bytes = 0
        if plan["shortlist_rows"]:
            positions = top["positions"].sort().values
            blob = safetensors_save({"positions": positions, "rows": cache.rows_at(positions)})
            short = f"{INDEX_DIR}/shortlist-{sha256_bytes(blob)[:12]}.safetensors"
            atomic_write_bytes(root / short, blob)
            files.append({"file": short, "sha256": sha256_bytes(blob), "role": "shortlist"})
            short_bytes = len(blob)
        entry = {
            "engine": "faiss",
            "faiss_version": faiss.__version__,
            "kind": label,
            "factory": factory,
            "metric": "inner_product",
            "cosine": cosine,
            "dim": cache.dim,
            "rows": int(index.ntotal),
            "search": {**default_search(index), **(search or {})},
            "shortlist_rows": plan["shortlist_rows"],
            "files": files,
            "bytes": len(data) + short_bytes,
            "built_from": plan["built_from"],
            "build_seconds": round(time.perf_counter() - start, 3),
        }
        old = update_manifest(cache, "index", entry)
        if old:
            for f in old["files"]:
                if f["file"] not in {g["file"] for g in files}:
                    (root / f["file"]).unlink(missing_ok=True)
        shutil.rmtree(root / BUILD_DIR, ignore_errors=True)
    logger.info("Built the %s index of %s (%d rows, %d bytes).", factory, root, entry["rows"], len(data))
    return entry


def update_manifest(cache: Any, key: str, entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """Set ``manifest[key] = entry`` on disk (atomically) and in ``cache``; returns the old entry.

    Refuses if the shards on disk changed while the index was being built."""
    root = Path(cache.path)
    current = load_json(root / MANIFEST)
    if entry is not None and stale_reason(entry, current):
        raise CacheError(f"{root} changed while its index was being built; build the index again")
    old = current.get(key)
    if entry is None:
        current.pop(key, None)
    else:
        current[key] = entry
    atomic_write_json(root / MANIFEST, current)
    if entry is None:
        cache.manifest.pop(key, None)
    else:
        cache.manifest[key] = entry
    return old


def _empty_shortlist() -> dict[str, torch.Tensor]:
    return {"norms": torch.empty(0), "positions": torch.empty(0, dtype=torch.int64)}


def _resume(root: Path, plan: dict[str, Any]) -> tuple[Any, int, dict[str, torch.Tensor]]:
    """The checkpointed partial index of this plan, the next shard to add and the running norm
    shortlist (None, 0, empty if there is no usable checkpoint)."""
    build = root / BUILD_DIR
    state_path, index_path, short_path = build / "state.json", build / "partial.index", build / "shortlist.st"
    if not state_path.is_file() or not index_path.is_file() or not short_path.is_file():
        return None, 0, _empty_shortlist()
    try:
        state = load_json(state_path)
        data, short = index_path.read_bytes(), short_path.read_bytes()
        if (
            state.get("plan") != plan
            or sha256_bytes(data) != state.get("sha256")
            or sha256_bytes(short) != state.get("shortlist_sha256")
        ):
            logger.warning("Discarding an index checkpoint of other settings or shards in %s.", root)
            return None, 0, _empty_shortlist()
        index = _faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))
        top = safetensors_load(short)
    except (CacheError, OSError, RuntimeError, ValueError):
        return None, 0, _empty_shortlist()
    logger.info("Resuming the index build of %s at shard %d.", root, state["next_shard"])
    return index, int(state["next_shard"]), top


def _checkpoint(
    root: Path, plan: dict[str, Any], index: Any, next_shard: int, top: dict[str, torch.Tensor], faiss: Any
) -> None:
    data = faiss.serialize_index(index).tobytes()
    short = safetensors_save(top)
    atomic_write_bytes(root / BUILD_DIR / "partial.index", data)
    atomic_write_bytes(root / BUILD_DIR / "shortlist.st", short)
    state = {
        "plan": plan,
        "next_shard": next_shard,
        "ntotal": int(index.ntotal),
        "sha256": sha256_bytes(data),
        "shortlist_sha256": sha256_bytes(short),
    }
    atomic_write_json(root / BUILD_DIR / "state.json", state)


def _prepare(rows: torch.Tensor, cosine: bool, faiss: Any) -> np.ndarray:
    x = np.ascontiguousarray(rows.numpy(), dtype=np.float32)
    if cosine:
        faiss.normalize_L2(x)
    return x


def _no_polysemous_training(index: Any, faiss: Any) -> None:
    """The factory turns on polysemous training for IVF-PQ (a code reordering for Hamming-distance
    filtering, which the lookup does not use); it took 200 s of a 206 s train on 8192 rows."""
    with contextlib.suppress(RuntimeError):
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False


def _train(cache: Any, index: Any, plan: dict[str, Any], faiss: Any, progress: bool) -> None:
    n = cache.num_rows
    want = plan["train_rows"]
    if want is None:
        with contextlib.suppress(RuntimeError):
            want = min(1 << 17, 64 * faiss.extract_index_ivf(index).nlist)
    want = min(n, want or n)
    rng = np.random.default_rng(plan["seed"])
    positions = np.sort(rng.choice(n, size=want, replace=False))
    if progress:
        print(f"hf-grass: training the index on {want} sampled rows", flush=True)
    index.train(_prepare(cache.rows_at(torch.from_numpy(positions)), plan["cosine"], faiss))


def _add_rows(
    cache: Any,
    index: Any,
    plan: dict[str, Any],
    first: int,
    top: dict[str, torch.Tensor],
    checkpoint_rows: int,
    faiss: Any,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """Add the rows of shards ``first ..`` in row order (FAISS ids = row positions); keeps the
    running shortlist (the ``shortlist_rows`` largest norms) and returns it."""
    if int(index.ntotal) != int(cache.row_offsets[first]):
        raise CacheError("the index checkpoint does not match its recorded position; rebuild it")
    since = 0
    shards = list(range(first, len(cache.shards)))
    m = plan["shortlist_rows"]
    for block in cache.iter_row_blocks(1 << 14, shards=shards):
        index.add(_prepare(block.rows, plan["cosine"], faiss))
        if m:
            norms = torch.cat([top["norms"], block.rows.norm(dim=1)])
            positions = torch.cat([top["positions"], torch.arange(block.rows.shape[0]) + block.start])
            keep = norms.topk(min(m, norms.numel())).indices
            top = {"norms": norms[keep], "positions": positions[keep]}
        since += block.rows.shape[0]
        end = block.start + block.rows.shape[0]
        shard = int(torch.searchsorted(cache.row_offsets, torch.tensor([end - 1]), right=True)[0]) - 1
        if since >= checkpoint_rows and end == int(cache.row_offsets[shard + 1]):
            _checkpoint(Path(cache.path), plan, index, shard + 1, top, faiss)
            since = 0
            if progress:
                print(f"hf-grass: indexed {end} of {cache.num_rows} rows", flush=True)
    return top

"""A FAISS index of a cache's rows for maximum inner product search, stored inside the cache.

``GradientCache.build_index`` (and ``hf-grass index``) builds it (``hf_grass.cache.index_build``); the
two-stage lookup (``hf_grass.scoring``) takes candidates from it and re-scores them exactly from the
cache rows, so the reported scores never come from the index. Kinds (FAISS factory strings,
inner-product metric):

- ``auto`` (default): ``hnsw-sq8`` for projected rows (wider than ``DEFAULT_PROJECTION``: the
  default 31,744-wide row), ``ivfpq`` for rows indexed as they are;
- ``ivfpq``: ``IVF{nlist},PQ{m}``, an inverted file over product-quantised codes: ``m`` bytes per
  row (``width / 16`` by default), ``nprobe`` lists scanned;
- ``hnsw-sq8``: ``HNSW{M},SQ8``, a graph over the vectors stored as 8-bit scalars (one byte a
  number: 1 KB a row at width 1024, 3 % of an int8 row of 31,744);
- ``hnsw``: ``HNSW{M},Flat``, a graph over the float32 vectors;
- ``flat``: ``Flat``, the exact inner product in FAISS (the baseline; as large as a float32 copy);
- any other FAISS factory string with ``factory=``.

The defaults were chosen by measurement (``benchmarks/index.py``, docs/benchmarks.md): on
1024-wide fp16 rows, IVF-PQ met every target at 10^6 rows; on the projections of 31,744-wide rows,
product quantisation lost too much of scores that differ by little (recall@10 0.87 at 300
candidates, 2 x 10^4 rows) where the graph over 8-bit vectors kept 0.98.

**The projection.** Rows wider than ``DEFAULT_PROJECTION`` (1024; the default row is 31,744 wide)
are not indexed as they are: the index holds a projection of each row to 1024 numbers, the rows'
256 principal directions kept exactly and a seeded sparse JL map of the rest
(``hf_grass.cache.projection``: an unbiased estimate of inner products, whose error scales with
what the principal directions leave), and queries are projected by the same map. The index, its
training sample and its shortlist then do not grow with the row budget; the exact re-rank reads
the full rows.

**The norm shortlist.** Gradient rows have heavy-tailed norms (on the benchmark's real rows the
largest norm is 29x the median) and the rows of largest norm take a large share of every query's
extreme scores; product quantisation, trained on typical rows, estimates exactly those worst. So
the ``shortlist`` fraction of rows with the largest norms (1 % by default) is kept beside the index
as float32 vectors of the index's space (the projected rows), memory-mapped, and searched exactly
for every query (a matrix-vector product); its best candidates join the index's before the exact
re-rank. On the real rows this raised recall@10 at 10^5 rows from 0.91 to 0.98 (helpful) and from
0.67 to 0.92 (harmful) at the same search cost (benchmarks/index.py, docs/benchmarks.md).

**Cosine.** With ``cosine=True`` the index holds unit-normalised vectors (and queries are
normalised), so its candidates are those of cosine scores; an index answers only the scores it was
built for and ``load_index`` refuses the other kind.

**Storage.** ``index/faiss-<kind>-<sha256[:12]>.index`` (``faiss.serialize_index`` bytes, written
atomically) and ``index/shortlist-<sha256[:12]>.safetensors`` (``positions``, ``vectors``), listed
in the manifest under ``"index"`` with their sha256, and ``index/projection-<sha256[:12]>.safetensors``
(``basis``, the principal directions) when the rows are projected; the entry records the projection
and the shard checksums the index was built from. An index built from other shards than the cache now holds is *stale* and refused.

**Checked when loaded.** The index is optional: opening a cache does not read or hash its files,
so a missing or damaged index leaves the exact scan working; ``load_index`` checks the sha256 of
every file it reads (``GradientCache.verify()`` checks them too) and names the fix.

Nothing here imports the reader: functions take the ``GradientCache`` as ``cache``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_grass.cache.files import CacheError, atomic_write_json, mmap_tensors, sha256_bytes, sha256_file
from hf_grass.cache.manifest import MANIFEST, load_json, safe_path
from hf_grass.cache.projection import METHOD, RowProjection

INDEX_DIR = "index"
BUILD_DIR = f"{INDEX_DIR}/.build"
KINDS = ("auto", "ivfpq", "hnsw-sq8", "hnsw", "flat")
DEFAULT_SHORTLIST = 0.01  # of the rows, by norm (benchmarks/index.py)
DEFAULT_PROJECTION = 1024  # index width of wider rows (benchmarks/index.py at the default 31,744)
DEFAULT_PRINCIPAL = 256  # of them, the rows' principal directions kept exactly (cache/projection.py)
PRINCIPAL_ROWS = 8192  # rows sampled to find those directions (at most train_bytes of them)
# The rows sampled to train an index are held as float32 vectors of the index's width: at most this
# many bytes (64 * nlist rows of 31,744 float32 numbers would be 8 GB at 10^6 documents).
DEFAULT_TRAIN_BYTES = 1 << 30
# Full rows are read (and projected) in chunks of at most this many float32 bytes.
READ_BYTES = 64 << 20
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


def faiss_module() -> Any:
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("the index needs FAISS: pip install faiss-cpu") from err
    return faiss


# ---- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexSettings:
    """What an index is built as (``build_index(cache, kind, **fields)`` takes these fields).

    Args:
        kind: ``auto``, ``ivfpq``, ``hnsw-sq8``, ``hnsw`` or ``flat`` (module docstring), ignored
            with ``factory``.
        factory: a FAISS ``index_factory`` string (inner-product metric).
        cosine: index unit-normalised rows, for cosine scores (default: the cache's ``cosine``).
        nlist, pq_m, hnsw_m: ``ivfpq`` lists and bytes per row, ``hnsw`` links per node.
        projection: the index's width: rows wider than it are indexed as their projection to this
            many numbers (default ``DEFAULT_PROJECTION`` = 1024; 0: the rows as they are).
        principal: of those numbers, the rows' principal directions kept exactly (default 256;
            0: a sparse JL map alone).
        shortlist: the fraction of rows with the largest norms kept beside the index and searched
            exactly for every query (default 0.01; 0 for a cosine index, whose rows all have norm 1).
        train_rows: rows sampled (seeded) to train the index (default ``64 * nlist``, max 2^17).
        train_bytes: bound on the training sample, in float32 bytes of the index's width.
        search: default search parameters stored with the index (``nprobe``, ``efSearch``).
        seed: the seed of the training sample and of the projection.
    """

    kind: str = "auto"
    factory: str | None = None
    cosine: bool | None = None
    nlist: int | None = None
    pq_m: int | None = None
    hnsw_m: int = 32
    projection: int | None = None
    principal: int = DEFAULT_PRINCIPAL
    shortlist: float | None = None
    train_rows: int | None = None
    train_bytes: int = DEFAULT_TRAIN_BYTES
    search: dict[str, int] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.factory is None and self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)} (or give factory=...), got {self.kind!r}")
        if self.shortlist is not None and not 0 <= self.shortlist <= 1:
            raise ValueError(f"shortlist must be a fraction of the rows in [0, 1], got {self.shortlist}")
        for name in ("nlist", "pq_m", "train_rows"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.projection is not None and (not isinstance(self.projection, int) or self.projection < 0):
            raise ValueError(f"projection must be an int >= 0 (0: no projection), got {self.projection!r}")
        if not isinstance(self.principal, int) or self.principal < 0:
            raise ValueError(f"principal must be an int >= 0, got {self.principal!r}")
        if not isinstance(self.train_bytes, int) or self.train_bytes <= 0:
            raise ValueError(f"train_bytes must be a positive int, got {self.train_bytes!r}")

    @classmethod
    def of(cls, kind: str, fields: dict[str, Any]) -> IndexSettings:
        """``IndexSettings(kind, **fields)``; an unknown field is a ``TypeError`` naming the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(f"unknown index settings {unknown}; known: {sorted(known)}")
        return cls(kind=kind, **fields)

    def width(self, dim: int) -> int:
        """The index's width for rows of ``dim`` numbers."""
        target = DEFAULT_PROJECTION if self.projection is None else self.projection
        return dim if target == 0 or dim <= target else target

    def resolved_kind(self, dim: int) -> str:
        """The kind for rows of ``dim`` numbers (``auto``: the measured default of their width)."""
        if self.kind != "auto":
            return self.kind
        return "hnsw-sq8" if self.width(dim) < dim else "ivfpq"


def _divisor_near(dim: int, target: int) -> int:
    """The divisor of ``dim`` closest to ``target`` (PQ needs ``dim % m == 0``)."""
    divisors = [d for d in range(1, dim + 1) if dim % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), d))


def default_factory(settings: IndexSettings, kind: str, rows: int, width: int) -> str:
    """The FAISS factory string of ``settings`` (of ``kind``) for ``rows`` vectors of ``width`` numbers."""
    if settings.factory:
        return settings.factory
    if kind == "flat":
        return "Flat"
    if kind in ("hnsw", "hnsw-sq8"):
        return f"HNSW{settings.hnsw_m},{'SQ8' if kind == 'hnsw-sq8' else 'Flat'}"
    nlist = settings.nlist
    if nlist is None:  # about sqrt(rows) lists, a power of two, with >= 64 training rows per list
        nlist = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(rows)))))
        nlist = max(1, min(nlist, rows // 64))
    m = settings.pq_m or _divisor_near(width, max(1, width // 16))
    if width % m:
        raise ValueError(f"pq_m={m} must divide the index's width {width}")
    if rows < 256 * 39:  # 8-bit codes need 256 centroids per sub-quantiser, trained on >= 39 rows each
        bits = max(1, min(8, int(math.log2(max(2, rows // 39)))))
        return f"IVF{nlist},PQ{m}x{bits}"
    return f"IVF{nlist},PQ{m}"


def default_search(index: Any) -> dict[str, int]:
    faiss = faiss_module()
    with contextlib.suppress(RuntimeError):
        ivf = faiss.extract_index_ivf(index)
        # 1/16 of the lists, at least 64: at 10^6 real rows (1024 lists) the setting that met every
        # target (benchmarks/index.py); nprobe=128 gains recall for 7 ms more per query
        return {"nprobe": max(1, min(ivf.nlist, max(64, ivf.nlist // 16)))}
    if hasattr(index, "hnsw"):
        # on the projections of 10^5 default rows, recall@10 (helpful, harmful) was 0.88 / 0.92 at 512,
        # 0.96 / 0.98 at 2048 and 0.97 / 0.99 at 4096, for 47, 45 and 55 ms of CPU per lookup
        # (benchmarks/index.py): the graph search is a small part of a lookup
        return {"efSearch": 4096}
    return {}


# ---- the index's space --------------------------------------------------------------------------


def load_projection(cache: Any, entry: dict[str, Any]) -> RowProjection | None:
    """The projection an index entry records (None: the index holds the rows as they are), its
    principal directions read from the index's ``projection`` file (checked)."""
    spec = entry.get("projection")
    if not spec:
        return None
    files = [f for f in entry["files"] if f.get("role") == "projection"]
    if spec.get("method") != METHOD or not files:
        raise CacheError(f"unknown index projection {spec!r}; rebuild the index (hf-grass index {cache.path} --rebuild)")
    path = _checked_path(cache, files[0])
    if sha256_file(path) != files[0]["sha256"]:
        raise CacheError(_damaged(cache, files[0]))
    basis = mmap_tensors(path)["basis"].clone()
    return RowProjection.drawn(basis, int(spec["width"]), int(spec["seed"]))


def index_vectors(rows: torch.Tensor, projection: RowProjection | None, cosine: bool) -> torch.Tensor:
    """Rows (or queries) ``[n, dim]`` as the index's float32 vectors: projected, unit-normalised for a
    cosine index (a zero row stays zero)."""
    out = projection.apply(rows) if projection is not None else rows.to(torch.float32)
    if cosine:
        out = out / out.norm(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return out


# ---- the loaded index ---------------------------------------------------------------------------


@dataclass
class FaissIndex:
    """A loaded index: ``candidates`` returns the row positions of the best candidates."""

    index: Any
    entry: dict[str, Any]
    projection: RowProjection | None = None
    shortlist_positions: torch.Tensor | None = None  # [m] row positions of the largest norms
    shortlist_vectors: torch.Tensor | None = None  # [m, width] float32, memory-mapped, the index's space

    @property
    def cosine(self) -> bool:
        return bool(self.entry["cosine"])

    def vectors(self, queries: torch.Tensor) -> torch.Tensor:
        """Queries in the index's space (projected, normalised for a cosine index)."""
        return index_vectors(queries.detach().cpu(), self.projection, self.cosine)

    def search(self, queries: torch.Tensor, n: int, params: dict[str, int] | None = None) -> torch.Tensor:
        """``[n_query, n]`` int64 row positions with the largest inner products in the FAISS index
        (``-1``: none)."""
        return self._faiss_search(self.vectors(queries), n, params)

    def candidates(self, queries: torch.Tensor, n: int, params: dict[str, int] | None = None) -> torch.Tensor:
        """``[n_query, <= 2 n]`` row positions: the FAISS index's ``n`` best, then the shortlist's
        ``n`` best by exact inner product in the index's space (``-1``: none; repeats possible)."""
        q = self.vectors(queries)
        found = self._faiss_search(q, n, params)
        if self.shortlist_vectors is None or self.shortlist_positions is None or not len(self.shortlist_positions):
            return found
        scores = q @ self.shortlist_vectors.T
        best = scores.topk(min(n, scores.shape[1]), dim=1).indices
        return torch.cat([found, self.shortlist_positions[best]], dim=1)

    def _faiss_search(self, q: torch.Tensor, n: int, params: dict[str, int] | None) -> torch.Tensor:
        faiss = faiss_module()
        space = faiss.ParameterSpace()
        for key, value in {**self.entry.get("search", {}), **(params or {})}.items():
            space.set_index_parameter(self.index, key, int(value))
        n = min(n, self.index.ntotal)
        _, ids = self.index.search(np.ascontiguousarray(q.numpy(), dtype=np.float32), n)
        return torch.from_numpy(ids.astype(np.int64))


def load_index(cache: Any) -> FaissIndex | None:
    """The cache's FAISS index (None when none is built), checked: the sha256 of each file as it is
    read, and that it was built from the shards the cache holds now (``CacheError`` otherwise,
    saying how to fix it). The shortlist is memory-mapped."""
    entry = cache.manifest.get("index")
    if not entry:
        return None
    reason = stale_reason(entry, cache.manifest)
    if reason:
        raise CacheError(
            f"the index of {cache.path} is stale: {reason}. Rebuild it (hf-grass index {cache.path} "
            "--rebuild, or cache.build_index(rebuild=True)), or query with search='exact'."
        )
    data = _checked_path(cache, entry["files"][0]).read_bytes()
    if sha256_bytes(data) != entry["files"][0]["sha256"]:  # the bytes deserialised are the bytes checked
        raise CacheError(_damaged(cache, entry["files"][0]))
    index = faiss_module().deserialize_index(np.frombuffer(data, dtype=np.uint8))
    del data
    projection = load_projection(cache, entry)
    width = cache.dim if projection is None else projection.width
    if index.ntotal != cache.num_rows or index.d != width:
        name = entry["files"][0]["file"]
        raise CacheError(f"the index file {name} holds {index.ntotal} x {index.d}, not the cache's rows; rebuild it")
    out = FaissIndex(index, entry, projection)
    for f in entry["files"][1:]:
        if f.get("role") == "shortlist":
            path = _checked_path(cache, f)
            if sha256_file(path) != f["sha256"]:
                raise CacheError(_damaged(cache, f))
            short = mmap_tensors(path)
            out.shortlist_positions = short["positions"].clone()
            # written before the projection existed: the float32 rows themselves
            out.shortlist_vectors = short["vectors"] if "vectors" in short else short["rows"]
    return out


def _checked_path(cache: Any, file: dict[str, str]) -> Path:
    """The path of an index file (fetched first for a lazy Hub cache), refused if missing."""
    path = safe_path(cache.path, file["file"])
    if not path.is_file() and getattr(cache, "remote", None) is not None:
        cache.remote.fetch([(file["file"], file["sha256"])])
    if not path.is_file():
        raise CacheError(
            f"the index file {path} listed in the manifest is missing; rebuild it (hf-grass index "
            f"{cache.path} --rebuild) or query with search='exact'"
        )
    return path


def _damaged(cache: Any, file: dict[str, str]) -> str:
    return (
        f"the index file {safe_path(cache.path, file['file'])} does not match its sha256 in the manifest: it "
        f"is damaged. Rebuild it (hf-grass index {cache.path} --rebuild) or query with search='exact'."
    )


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

"""Two-stage lookup: candidates from an index (FAISS) or BM25, then the exact re-rank from the
cache rows, so the reported scores stay exact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hf_grass.cache.reader import GradientCache
from hf_grass.cache.rows import rows_to_float32
from hf_grass.scoring.options import Search
from hf_grass.scoring.streaming import (
    Normalisation,
    ScanResult,
    TopK,
    block_scores,
    check_k,
    chunk_rows,
    scan,
)

# The candidate rows of one batch of queries, gathered in their storage format: at most this many
# bytes (2^15 candidate rows of 31,744 numbers, copied twice as float32, took 8-9 GB). They are
# decoded a block at a time into one small float32 buffer.
CANDIDATE_BYTES = 256 << 20


def query_batch_size(row_bytes: int, per_query: int) -> int:
    """Queries per candidate gather: their ``per_query`` candidate rows of ``row_bytes`` each (as
    stored) fit in ``CANDIDATE_BYTES`` (at least 1, at most 256 queries)."""
    rows = CANDIDATE_BYTES // max(row_bytes, 1)
    return max(1, min(256, rows // max(per_query, 1)))


def default_candidates(k: int) -> int:
    """Candidates re-scored per list by default: 300 for k <= 10 (benchmarks/index.py: at 10^6 real
    rows 1000 candidates gained <= 0.005 recall@10 over 300, for 8-13 ms more per query)."""
    return max(300, 30 * k)


@dataclass
class Candidates:
    """Where a two-stage lookup takes its candidates: the FAISS ``index``, the BM25 ``lexical`` index
    (with the queries' ``texts``), or both; ``method`` names them in the result."""

    index: Any = None
    lexical: Any = None
    texts: list[str] | None = None
    method: str = "index"


def lookup(
    cache: GradientCache,
    queries: torch.Tensor,
    k: int,
    *,
    top: bool = True,
    bottom: bool = False,
    search: Search | str | None = None,
    norms: Normalisation | None = None,
    texts: list[str] | None = None,
) -> ScanResult:
    """Top-k / bottom-k per query, from the index when there is one, else by the exact scan.

    ``search`` (``Search``, or its method name): ``"auto"`` uses the FAISS index if the cache has one,
    else the exact scan; ``"exact"`` always scans every row; ``"index"``, ``"bm25"`` (BM25 candidates
    from the documents' text, needs the queries' ``texts``) or ``"index+bm25"`` (both candidate sets
    joined). Whatever finds the candidates, the reported scores are exact: every candidate is
    re-scored from its cache row.
    """
    search = Search.of(search)
    k = check_k(k, cache.num_rows)
    method = search.method
    if method == "auto":
        method = "index" if cache.manifest.get("index") else "exact"
    if method == "exact":
        return scan(cache, queries, k, top=top, bottom=bottom, norms=norms)
    sources = Candidates(method=method, texts=texts)
    if "index" in method:
        sources.index = cache.index()
        if sources.index is None:
            raise ValueError(
                f"search={method!r} but {cache.path} has no index: build it with `hf-grass index "
                f"{cache.path}` (or cache.build_index()), or use search='exact'"
            )
        cosine = norms is not None  # unit-normalised scores: the index of unit rows
        if sources.index.cosine != cosine:
            raise ValueError(
                f"the index of {cache.path} was built for {'cosine' if sources.index.cosine else 'inner-product'} "
                f"scores but this query asks for {'cosine' if cosine else 'inner-product'} scores; rebuild "
                f"it (hf-grass index {cache.path} --rebuild {'--cosine' if cosine else '--no-cosine'}) or "
                "use search='exact'"
            )
    if "bm25" in method:
        sources.lexical = cache.indexes.lexical()
        if sources.lexical is None:
            raise ValueError(
                f"search={method!r} but {cache.path} has no BM25 index: build it with `hf-grass index "
                f"{cache.path} --bm25` (or cache.indexes.build_lexical())"
            )
        if texts is None or len(texts) != queries.shape[0]:
            raise ValueError("BM25 candidates need the text of every query (texts)")
    return two_stage(cache, queries, k, sources, top=top, bottom=bottom, search=search, norms=norms)


def two_stage(
    cache: GradientCache,
    queries: torch.Tensor,
    k: int,
    sources: Candidates,
    *,
    top: bool = True,
    bottom: bool = False,
    search: Search | None = None,
    norms: Normalisation | None = None,
) -> ScanResult:
    """Candidates per query, then the exact score of each from its cache row, then the top-k.

    Highest-score candidates are the index's maximum inner products with ``q``; lowest-score ones are
    its maximum inner products with ``-q`` (the most negative scores), a second search of the same
    index. The index's shortlist (the rows of largest norm, ``hf_grass.cache.index``) adds its
    best ``n`` per list. BM25 candidates join both lists. Rows are read once per query batch for the
    union of its candidates (``candidate_scores``: only those rows, only those shards, in their
    storage format, decoded a block at a time); a batch (default) holds at most ``CANDIDATE_BYTES``
    of candidate rows, so memory is bounded by the row width and the candidates, not by the cache
    or the number of queries.
    """
    search = search or Search()
    index, lexical = sources.index, sources.lexical
    queries = queries.to(torch.float32)
    n = search.candidates or default_candidates(k)
    if n < k:
        raise ValueError(f"candidates={n} must be at least k={k}")
    wanted = [largest for largest, on in ((True, top), (False, bottom)) if on]
    # candidate lists per query and list: the index's, its shortlist's, BM25's
    count = (index is not None) * (1 + (getattr(index, "shortlist_vectors", None) is not None)) + (lexical is not None)
    row_bytes = cache.dim * cache.dtype.itemsize + 12  # the row, its int8 scale, its two norms
    query_batch = search.query_batch or query_batch_size(row_bytes, n * len(wanted) * count)
    parts: dict[bool, list[TopK]] = {largest: [] for largest in wanted}
    for lo in range(0, queries.shape[0], query_batch):
        q = queries[lo : lo + query_batch]
        found: dict[bool, list[torch.Tensor]] = {largest: [] for largest in wanted}
        if index is not None:
            signed = torch.cat([q if largest else -q for largest in wanted])
            hits = index.candidates(signed, n, search.params)
            for i, largest in enumerate(wanted):
                found[largest].append(hits[i * q.shape[0] : (i + 1) * q.shape[0]])
        if lexical is not None:
            assert sources.texts is not None
            hits = lexical.search(sources.texts[lo : lo + query_batch], n)
            for largest in wanted:
                found[largest].append(hits)
        cand = {largest: _dedupe(torch.cat(found[largest], dim=1)) for largest in wanted}
        union = torch.unique(torch.cat([c[c >= 0] for c in cand.values()]))
        sub = norms.select(slice(lo, lo + query_batch)) if norms is not None else None
        exact = candidate_scores(cache, q, union, sub)  # [b, |union|]
        for largest in wanted:
            c = cand[largest]
            cols = torch.searchsorted(union, c.clamp(min=0))
            scores = exact.gather(1, cols.clamp(max=max(union.numel() - 1, 0)))
            fill = float("-inf") if largest else float("inf")
            scores = scores.masked_fill(c < 0, fill)
            values, pos = scores.topk(min(k, c.shape[1]), dim=1, largest=largest, sorted=True)
            positions = c.gather(1, pos)
            short = (positions < 0).any(dim=1)
            if bool(short.any()):  # fewer than k candidates: those queries get the exact scan
                again = scan(cache, q[short], k, top=largest, bottom=not largest,
                             norms=sub.select(short) if sub is not None else None)  # fmt: skip
                lists = again.top if largest else again.bottom
                assert lists is not None
                values[short] = lists.scores
                positions[short] = _positions_of(cache, lists.indices)
            parts[largest].append(TopK(values, cache.indices[positions]))
    lists = {largest: TopK(torch.cat([p.scores for p in v]), torch.cat([p.indices for p in v]))
             for largest, v in parts.items()}  # fmt: skip
    return ScanResult(top=lists.get(True), bottom=lists.get(False), method=sources.method)


def candidate_scores(
    cache: GradientCache, queries: torch.Tensor, positions: torch.Tensor, norms: Normalisation | None
) -> torch.Tensor:
    """``[n_query, len(positions)]`` exact scores of the rows at ``positions``: gathered in their
    storage format, then decoded a block at a time into one reused float32 buffer, the way the
    exact scan reads (a fresh ``[n, dim]`` float32 tensor per query costs page faults, and four
    bytes a number where int8 rows take one)."""
    stored = cache.rows.stored_at(positions)
    row_norms = stored.pop("norms", None)
    if norms is None or norms.geometry == "vectors":
        row_norms = None
    n = positions.shape[0]
    out = torch.empty(queries.shape[0], n, dtype=torch.float32)
    step = chunk_rows(queries.shape[0], cache.dim)
    buf = torch.empty(min(step, n), cache.dim, dtype=torch.float32)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        rows = rows_to_float32({key: t[lo:hi] for key, t in stored.items()}, out=buf[: hi - lo])
        out[:, lo:hi] = block_scores(queries, rows, norms, None if row_norms is None else row_norms[lo:hi])
    return out


def _dedupe(cand: torch.Tensor) -> torch.Tensor:
    """Candidate positions per row with repeats (the same row found twice) set to ``-1``."""
    cand, _ = cand.sort(dim=1)
    repeat = torch.zeros_like(cand, dtype=torch.bool)
    repeat[:, 1:] = cand[:, 1:] == cand[:, :-1]
    return cand.masked_fill(repeat, -1)


def _positions_of(cache: GradientCache, indices: torch.Tensor) -> torch.Tensor:
    """Row positions of dataset indices (the inverse of ``cache.indices``)."""
    order = torch.argsort(cache.indices)
    return order[torch.searchsorted(cache.indices[order], indices)]


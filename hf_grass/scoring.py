"""Influence scores: query gradients (preconditioned) against the cached train rows.

``score(q, i) = sum_l (H_l^-1 g_ql) . g_il``; positive = helpful (upweighting example i lowers the
query loss), negative = harmful. ``scan`` reads the cache once per set of queries and yields what is
asked of that read: the streaming top-k (most helpful), bottom-k (most harmful) and the dense score
rows, with memory independent of the cache size for the lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_grass.cache.reader import GradientCache
from hf_grass.capture.engine import GradientComputer, NonFiniteError
from hf_grass.capture.hooks import CaptureRequest
from hf_grass.distributed import Distributed
from hf_grass.precondition.eigenbasis import is_whitened, whiten_query
from hf_grass.precondition.preconditioner import Preconditioner


# Rows converted from the storage dtype to float32 at a time, into one reused buffer small enough to
# stay in the CPU cache: a fresh multi-MB tensor per chunk made page faults, not the matmul, the
# bottleneck (benchmarks/query.py: 0.54x -> 1.18x of an in-RAM numpy matmul at 8 queries). More
# queries amortise a bigger chunk better.
def chunk_rows(n_query: int, dim: int) -> int:
    target = (1 << 20) if n_query <= 8 else (1 << 22)  # bytes of float32 rows
    return max(16, target // (4 * max(dim, 1)))


def query_gradients(
    computer: GradientComputer,
    batches: Iterable[Mapping[str, torch.Tensor]],
    preconditioner: Preconditioner,
    basis: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[n_query, dim]`` float32: the preconditioned, compressed gradient of each query's loss.

    ``basis``: the warm-up fit of a K-FAC cache, whose train rows are whitened
    (``S (whiten * R g'_i)``); the query then goes through ``S (R H^-1 g'_q / whiten)`` so that the
    whitening cancels and ``<q, row_i>`` estimates ``g'_q^T H^-1 g'_i`` with balanced noise.
    """
    whitened = is_whitened(basis)
    factor = preconditioner.needs_factor_grads or whitened
    out = []
    with computer.session():
        for batch in batches:
            try:
                grads = computer.compute(batch, CaptureRequest(rows=not factor, factor_grads=factor))
            except NonFiniteError as err:
                raise ValueError(f"non-finite {err.what} for query rows {err.rows} of this batch") from None
            rows = torch.zeros(grads.losses.shape[0], computer.total_dim, device=computer.device)
            for name, (start, stop) in computer.offsets.items():
                if not factor:
                    assert grads.rows is not None
                    rows[:, start:stop] = preconditioner.apply_rows(name, grads.rows[:, start:stop]).float()
                    continue
                pre = grads.factor_grads[name]
                if preconditioner.needs_factor_grads:
                    pre = preconditioner.apply_factor(name, pre)
                if whitened:
                    assert basis is not None
                    pre = whiten_query(basis, name, pre)
                rows[:, start:stop] = computer.compressors[name].project_factor(pre.float()).float()  # type: ignore[attr-defined]
            out.append(rows.cpu())
    return torch.cat(out) if out else torch.empty(0, computer.total_dim)


def shard_scores(
    cache: GradientCache, queries: torch.Tensor, cosine: bool = False, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(indices [rows], scores [n_query, rows])`` per shard (this rank's shards only).

    Memory: one shard's scores plus a small conversion buffer, whatever the cache size. Rows come
    from ``GradientCache.iter_row_blocks`` (the one float32 conversion, ``hf_grass.cache.rows``).
    """
    queries = queries.to(torch.float32)
    step = chunk_rows(queries.shape[0], cache.dim)
    qn = _norms(queries) if cosine else None
    mine = [pos for pos in range(len(cache.shards)) if pos % world_size == rank]
    for pos in mine:  # another rank scores the other shards
        first, rows = int(cache.row_offsets[pos]), cache.shards[pos]["rows"]
        block = torch.empty(queries.shape[0], rows, dtype=torch.float32)
        indices = torch.empty(rows, dtype=torch.int64)
        for part in cache.iter_row_blocks(step, shards=[pos]):
            lo, hi = part.start - first, part.start - first + part.rows.shape[0]
            block[:, lo:hi] = block_scores(queries, part.rows, qn)
            indices[lo:hi] = part.indices
        yield indices, block


def block_scores(queries: torch.Tensor, rows: torch.Tensor, qn: torch.Tensor | None = None) -> torch.Tensor:
    """``[n_query, n]`` scores of float32 ``rows`` (``qn``: the query norms, for cosine scores)."""
    out = queries @ rows.T
    if qn is not None:
        out /= qn * rows.norm(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
    return out


def _norms(queries: torch.Tensor) -> torch.Tensor:
    return queries.norm(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


@dataclass
class TopK:
    """Best (``largest=True``: most helpful) or worst rows per query."""

    scores: torch.Tensor  # [n_query, k] float32, sorted
    indices: torch.Tensor  # [n_query, k] int64 dataset indices


@dataclass
class ScanResult:
    """What one read of the cache gave (``None`` for what was not asked)."""

    top: TopK | None = None  # most helpful first
    bottom: TopK | None = None  # most harmful (lowest score) first
    dense: torch.Tensor | None = None  # [n_query, num_examples], columns = dataset indices
    method: str = "exact"  # how the lists were found: "exact" or the two-stage candidates used


def check_k(k: object, rows: int) -> int:
    """``k`` as a list length over a cache of ``rows`` rows, or a ``ValueError`` saying what fits."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > rows:
        raise ValueError(
            f"k={k} exceeds the {rows} rows of the cache (a list cannot be larger than the number of "
            f"cached rows); use k <= {rows}"
        )
    return k


class TopKAccumulator:
    """The streaming top-k (most helpful) and bottom-k (most harmful) of each query over blocks of
    rows from any source: cache shards, rows computed during a pass, another rank's lists.

    ``add_rows`` scores float32 rows (matrix-matrix products, pending scores flushed into the running
    lists every ``flush_rows`` rows, so memory is ``O(n_query * (k + flush_rows))`` whatever the
    number of rows); ``add_scores`` takes scores already computed; ``merge_ranks`` combines the
    lists of every process through ``Distributed``; ``result`` gives the sorted lists.
    """

    def __init__(
        self,
        queries: torch.Tensor,
        k: int,
        *,
        top: bool = True,
        bottom: bool = False,
        cosine: bool = False,
        flush_rows: int = 8192,
    ):
        self.queries = queries.to(torch.float32)
        self.k = k
        self.qn = _norms(self.queries) if cosine else None
        nq = self.queries.shape[0]
        self.lists = {largest: _Running(nq, largest) for largest, on in ((True, top), (False, bottom)) if on}
        self.flush_rows = flush_rows
        self._scores: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []
        self._pending = 0

    def add_rows(self, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Score ``rows`` ``[n, dim]`` (dataset ``indices`` ``[n]``); returns their scores."""
        scores = block_scores(self.queries, rows, self.qn)
        self._scores.append(scores)
        self._indices.append(indices.clone())
        self._pending += rows.shape[0]
        if self._pending >= self.flush_rows:
            self._flush()
        return scores

    def add_scores(self, indices: torch.Tensor, scores: torch.Tensor) -> None:
        """Merge scores ``[n_query, n]`` of rows with dataset ``indices`` ``[n]`` (or ``[n_query, n]``)."""
        idx = indices if indices.dim() == 2 else indices.unsqueeze(0).expand(scores.shape[0], -1)
        for running in self.lists.values():
            running.add(scores, idx, self.k)

    def _flush(self) -> None:
        if self._scores:
            self.add_scores(torch.cat(self._indices), torch.cat(self._scores, dim=1))
        self._scores, self._indices, self._pending = [], [], 0

    def merge_ranks(self, dist: Distributed) -> None:
        """Every rank's lists merged: afterwards each rank holds the same, global lists."""
        self._flush()
        if dist.world_size > 1:
            for running in self.lists.values():
                running.merge_ranks(dist, self.k)

    def result(self) -> ScanResult:
        self._flush()
        top, bottom = self.lists.get(True), self.lists.get(False)
        return ScanResult(
            top=top.result() if top else None, bottom=bottom.result() if bottom else None
        )


def scan(
    cache: GradientCache,
    queries: torch.Tensor,
    k: int | None = None,
    *,
    top: bool = True,
    bottom: bool = False,
    dense: bool = False,
    cosine: bool = False,
    dist: Distributed | None = None,
    disable_progress: bool = True,
) -> ScanResult:
    """Score ``queries`` against every cached row in one read of the cache (the exact scan).

    Args:
        cache: the train rows.
        queries: ``[n_query, dim]`` query vectors (``query_gradients``).
        k: list length for ``top`` / ``bottom``.
        top, bottom: keep the ``k`` highest / lowest scores per query (streaming; memory
            ``O(n_query * (k + block))`` whatever the cache size; matrix-matrix products over blocks
            of rows, so many queries cost little more than one).
        dense: also return every score, ``[n_query, num_examples]`` (skipped examples score 0).
        cosine: divide each score by both vectors' norms.
        dist: several processes (``torch.distributed`` initialised): each rank scores every
            ``world_size``-th shard and the results are merged, so every rank returns the same.
    """
    if top or bottom:
        k = check_k(k, cache.num_rows)
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    queries = queries.to(torch.float32)
    nq = queries.shape[0]
    acc = TopKAccumulator(queries, k or 1, top=top, bottom=bottom, cosine=cosine)
    scores = torch.zeros(nq, cache.manifest["num_examples"]) if dense else None
    mine = [pos for pos in range(len(cache.shards)) if pos % world == rank]
    step = chunk_rows(nq, cache.dim)
    with tqdm(total=cache.num_rows, desc="hf-grass: scoring", unit="row", disable=disable_progress) as bar:
        for block in cache.iter_row_blocks(step, shards=mine):
            if top or bottom:
                part = acc.add_rows(block.indices, block.rows)
            else:
                part = block_scores(queries, block.rows, acc.qn)
            if scores is not None:
                scores[:, block.indices] = part
            bar.update(block.rows.shape[0])
    if world > 1:
        assert dist is not None
        acc.merge_ranks(dist)
        if scores is not None:  # each rank filled the columns of its own shards, zeros elsewhere
            scores = dist.all_reduce_sum({"scores": scores})["scores"]
    result = acc.result()
    result.dense = scores
    return result


class _Running:
    """The running top-k (or bottom-k) of a stream of score blocks."""

    def __init__(self, n_query: int, largest: bool):
        self.largest = largest
        self.fill = float("-inf") if largest else float("inf")
        self.scores = torch.full((n_query, 0), self.fill)
        self.indices = torch.zeros((n_query, 0), dtype=torch.int64)

    def add(self, block: torch.Tensor, block_idx: torch.Tensor, k: int) -> None:
        if block.shape[1] > k:  # the block's own best k first: the merge then sorts 2k, not k + block
            values, pos = block.topk(k, dim=1, largest=self.largest, sorted=False)
            block, block_idx = values, block_idx.gather(1, pos)
        merged = torch.cat([self.scores, block], dim=1)
        merged_idx = torch.cat([self.indices, block_idx], dim=1)
        values, pos = merged.topk(min(k, merged.shape[1]), dim=1, largest=self.largest, sorted=True)
        self.scores, self.indices = values, merged_idx.gather(1, pos)

    def merge_ranks(self, dist: Distributed, k: int) -> None:
        """All-gather every rank's list and keep the best ``k``: the same result on every rank."""
        nq = self.scores.shape[0]
        pad = k - self.scores.shape[1]  # exactly k per rank, so every rank sends the same shape
        scores = torch.cat([self.scores, torch.full((nq, pad), self.fill)], dim=1)
        indices = torch.cat([self.indices, torch.full((nq, pad), -1, dtype=torch.int64)], dim=1)
        all_scores, all_indices = dist.all_gather(scores), dist.all_gather(indices)
        self.scores, self.indices = self.scores[:, :0], self.indices[:, :0]
        self.add(torch.cat(all_scores, 1), torch.cat(all_indices, 1), k)

    def result(self) -> TopK:
        return TopK(self.scores, self.indices)


def dense_scores(
    cache: GradientCache, queries: torch.Tensor, cosine: bool = False, disable_progress: bool = True
) -> torch.Tensor:
    """``[n_query, num_examples]`` scores, columns = dataset indices (skipped examples score 0)."""
    result = scan(cache, queries, top=False, dense=True, cosine=cosine, disable_progress=disable_progress)
    assert result.dense is not None
    return result.dense


def topk_scores(
    cache: GradientCache,
    queries: torch.Tensor,
    k: int,
    largest: bool = True,
    cosine: bool = False,
    disable_progress: bool = True,
    dist: Distributed | None = None,
) -> TopK:
    """The streaming top-k (``largest``) or bottom-k of ``scan``."""
    result = scan(
        cache, queries, k, top=largest, bottom=not largest, cosine=cosine, dist=dist,
        disable_progress=disable_progress,
    )  # fmt: skip
    out = result.top if largest else result.bottom
    assert out is not None
    return out


# ---- two-stage lookup: candidates from an index, then the exact re-rank --------------------------

SEARCHES = ("auto", "exact", "index", "bm25", "index+bm25")


def default_candidates(k: int) -> int:
    """Candidates re-scored per list by default: 300 for k <= 10 (benchmarks/index.py: at 10^6 real
    rows 1000 candidates gained <= 0.005 recall@10 over 300, for 8-13 ms more per query)."""
    return max(300, 30 * k)


def lookup(
    cache: GradientCache,
    queries: torch.Tensor,
    k: int,
    *,
    search: str = "auto",
    top: bool = True,
    bottom: bool = False,
    dense: bool = False,
    cosine: bool = False,
    query_texts: list[str] | None = None,
    candidates: int | None = None,
    search_params: dict[str, int] | None = None,
    dist: Distributed | None = None,
    disable_progress: bool = True,
) -> ScanResult:
    """Top-k / bottom-k per query, from the index when there is one, else by the exact scan.

    ``search``: ``"auto"`` (the FAISS index if the cache has one, else the exact scan), ``"exact"``
    (always scan every row), ``"index"``, ``"bm25"`` (BM25 candidates from the documents' text,
    needs ``query_texts``) or ``"index+bm25"`` (both candidate sets joined). Whatever finds the
    candidates, the reported scores are exact: every candidate is re-scored from its cache row.
    ``dense`` needs every score, so it always scans.
    """
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
    k = check_k(k, cache.num_rows)
    if search == "auto":
        search = "index" if cache.manifest.get("index") and not dense else "exact"
    if search == "exact" or dense:
        return scan(
            cache, queries, k, top=top, bottom=bottom, dense=dense, cosine=cosine, dist=dist,
            disable_progress=disable_progress,
        )  # fmt: skip
    index = lexical = None
    if "index" in search:
        index = cache.index()
        if index is None:
            raise ValueError(
                f"search={search!r} but {cache.path} has no index: build it with `hf-grass index "
                f"{cache.path}` (or cache.build_index()), or use search='exact'"
            )
        if index.cosine != cosine:
            raise ValueError(
                f"the index of {cache.path} was built for {'cosine' if index.cosine else 'inner-product'} "
                f"scores but this query asks for {'cosine' if cosine else 'inner-product'} scores; rebuild "
                f"it (hf-grass index {cache.path} --rebuild {'--cosine' if cosine else '--no-cosine'}) or "
                "use search='exact'"
            )
    if "bm25" in search:
        lexical = cache.lexical_index()
        if lexical is None:
            raise ValueError(
                f"search={search!r} but {cache.path} has no BM25 index: build it with `hf-grass index "
                f"{cache.path} --bm25` (or cache.build_lexical_index())"
            )
        if query_texts is None or len(query_texts) != queries.shape[0]:
            raise ValueError("BM25 candidates need the text of every query (query_texts)")
    return two_stage(
        cache, queries, k, index=index, lexical=lexical, query_texts=query_texts, top=top, bottom=bottom,
        cosine=cosine, candidates=candidates, search_params=search_params, method=search,
    )  # fmt: skip


def two_stage(
    cache: GradientCache,
    queries: torch.Tensor,
    k: int,
    *,
    index: Any = None,
    lexical: Any = None,
    query_texts: list[str] | None = None,
    top: bool = True,
    bottom: bool = False,
    cosine: bool = False,
    candidates: int | None = None,
    search_params: dict[str, int] | None = None,
    query_batch: int | None = None,
    method: str = "index",
) -> ScanResult:
    """Candidates per query, then the exact score of each from its cache row, then the top-k.

    Helpful candidates are the index's maximum inner products with ``q``; harmful ones are its
    maximum inner products with ``-q`` (the most negative scores), a second search of the same
    index. The index's shortlist (the rows of largest norm, ``hf_grass.cache.index``) is a
    candidate of every query, scored from its float32 copy. BM25 candidates (``lexical``) join both
    lists. Rows are read once per query batch for the
    union of its candidates (``GradientCache.rows_at``: only those rows, only those shards); the
    batch (default) holds at most ``2^15`` candidate rows, so memory is bounded by the candidates,
    not by the cache or the number of queries.
    """
    queries = queries.to(torch.float32)
    n = candidates or default_candidates(k)
    if n < k:
        raise ValueError(f"candidates={n} must be at least k={k}")
    wanted = [largest for largest, on in ((True, top), (False, bottom)) if on]
    sources = (index is not None) + (lexical is not None)
    # the index's rows of the largest norms, candidates of every query
    shortlisted = getattr(index, "shortlist_mask", None)
    query_batch = query_batch or max(1, min(256, (1 << 15) // (n * len(wanted) * sources)))
    parts: dict[bool, list[TopK]] = {largest: [] for largest in wanted}
    for lo in range(0, queries.shape[0], query_batch):
        q = queries[lo : lo + query_batch]
        found: dict[bool, list[torch.Tensor]] = {largest: [] for largest in wanted}
        if index is not None:
            signed = torch.cat([q if largest else -q for largest in wanted])
            hits = index.search(signed, n, search_params)
            for i, largest in enumerate(wanted):
                found[largest].append(hits[i * q.shape[0] : (i + 1) * q.shape[0]])
        if lexical is not None:
            assert query_texts is not None
            hits = lexical.search(query_texts[lo : lo + query_batch], n)
            for largest in wanted:
                found[largest].append(hits)
        cand = {largest: _dedupe(torch.cat(found[largest], dim=1)) for largest in wanted}
        if shortlisted is not None:  # scored below from the index's own float32 copy
            cand = {largest: c.masked_fill(shortlisted[c.clamp(min=0)] & (c >= 0), -1) for largest, c in cand.items()}
        union = torch.unique(torch.cat([c[c >= 0] for c in cand.values()]))
        rows = cache.rows_at(union)
        qn = _norms(q) if cosine else None
        exact = block_scores(q, rows, qn)  # [b, |union|]
        extra = block_scores(q, index.shortlist_rows, qn) if shortlisted is not None else None
        for largest in wanted:
            c = cand[largest]
            cols = torch.searchsorted(union, c.clamp(min=0))
            scores = exact.gather(1, cols.clamp(max=max(union.numel() - 1, 0)))
            fill = float("-inf") if largest else float("inf")
            scores = scores.masked_fill(c < 0, fill)
            if extra is not None:
                scores = torch.cat([scores, extra], dim=1)
                c = torch.cat([c, index.shortlist_positions.unsqueeze(0).expand(c.shape[0], -1)], dim=1)
            values, pos = scores.topk(min(k, c.shape[1]), dim=1, largest=largest, sorted=True)
            positions = c.gather(1, pos)
            short = (positions < 0).any(dim=1)
            if bool(short.any()):  # fewer than k candidates: those queries get the exact scan
                again = scan(cache, q[short], k, top=largest, bottom=not largest, cosine=cosine)
                lists = again.top if largest else again.bottom
                assert lists is not None
                values[short] = lists.scores
                positions[short] = _positions_of(cache, lists.indices)
            parts[largest].append(TopK(values, cache.indices[positions]))
    lists = {largest: TopK(torch.cat([p.scores for p in v]), torch.cat([p.indices for p in v]))
             for largest, v in parts.items()}  # fmt: skip
    return ScanResult(top=lists.get(True), bottom=lists.get(False), method=method)


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

"""The exact scan: every cached row scored against the queries in one read, with streaming top-k
and bottom-k lists (memory independent of the cache size) and, when asked, the dense scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hf_grass.cache.reader import GradientCache
from hf_grass.distributed import Distributed


# Rows converted from the storage dtype to float32 at a time, into one reused buffer small enough to
# stay in the CPU cache: a fresh multi-MB tensor per chunk made page faults, not the matmul, the
# bottleneck (benchmarks/query.py: 0.54x -> 1.18x of an in-RAM numpy matmul at 8 queries). More
# queries amortise a bigger chunk better.
def chunk_rows(n_query: int, dim: int) -> int:
    target = (1 << 20) if n_query <= 8 else (1 << 22)  # bytes of float32 rows
    return max(16, target // (4 * max(dim, 1)))



NORM_COLUMNS = {"gradient": 0, "preconditioned": 1}


@dataclass
class Normalisation:
    """Exact unit normalisation of scores: each is divided by the norms of both sides in one
    geometry, ``"gradient"`` (``||g||``) or ``"preconditioned"`` (``||H^-1/2 g||``): the queries'
    exact norms (``query_vectors``) and the ones the pass stored with every row."""

    query_norms: torch.Tensor  # [n_query, 2] float32 (gradient, preconditioned)
    geometry: str = "preconditioned"

    def __post_init__(self) -> None:
        if self.geometry not in NORM_COLUMNS:
            raise ValueError(f"normalisation geometry must be one of {sorted(NORM_COLUMNS)}, got {self.geometry!r}")
        tiny = torch.finfo(torch.float32).tiny
        self.column = NORM_COLUMNS[self.geometry]
        self.query = self.query_norms[:, self.column].to(torch.float32).clamp(min=tiny)[:, None]

    def select(self, rows: slice | torch.Tensor) -> Normalisation:
        """The normalisation of a subset of the queries."""
        return Normalisation(self.query_norms[rows], self.geometry)

    def apply(self, scores: torch.Tensor, row_norms: torch.Tensor | None) -> torch.Tensor:
        if row_norms is None:
            raise ValueError(
                "this cache stores no row norms (written before hf-grass 0.2): rebuild it for "
                "unit-normalised scores"
            )
        tiny = torch.finfo(torch.float32).tiny
        return scores / (self.query * row_norms[:, self.column].to(torch.float32).clamp(min=tiny))


def block_scores(
    queries: torch.Tensor,
    rows: torch.Tensor,
    qn: torch.Tensor | None = None,
    norms: Normalisation | None = None,
    row_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[n_query, n]`` scores of float32 ``rows``; with ``norms`` divided by the exact norms (the
    rows' own in ``row_norms``), or with ``qn`` (the query vectors' norms) by the vectors' norms."""
    out = queries @ rows.T
    if norms is not None:
        return norms.apply(out, row_norms)
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
        norms: Normalisation | None = None,
    ):
        self.queries = queries.to(torch.float32)
        self.k = k
        self.norms = norms
        self.qn = _norms(self.queries) if cosine and norms is None else None
        nq = self.queries.shape[0]
        self.lists = {largest: _Running(nq, largest) for largest, on in ((True, top), (False, bottom)) if on}
        self.flush_rows = flush_rows
        self._scores: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []
        self._pending = 0

    def add_rows(
        self, indices: torch.Tensor, rows: torch.Tensor, row_norms: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Score ``rows`` ``[n, dim]`` (dataset ``indices`` ``[n]``, exact ``row_norms [n, 2]`` when
        normalising); returns their scores."""
        scores = block_scores(self.queries, rows, self.qn, self.norms, row_norms)
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
    norms: Normalisation | None = None,
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
        cosine: divide each score by both compressed vectors' norms.
        norms: divide each score by both sides' exact norms instead (``Normalisation``).
        dist: several processes (``torch.distributed`` initialised): each rank scores every
            ``world_size``-th shard and the results are merged, so every rank returns the same.
    """
    if top or bottom:
        k = check_k(k, cache.num_rows)
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    queries = queries.to(torch.float32)
    nq = queries.shape[0]
    acc = TopKAccumulator(queries, k or 1, top=top, bottom=bottom, cosine=cosine, norms=norms)
    scores = torch.zeros(nq, cache.manifest["num_examples"]) if dense else None
    mine = [pos for pos in range(len(cache.shards)) if pos % world == rank]
    step = chunk_rows(nq, cache.dim)
    with tqdm(total=cache.num_rows, desc="hf-grass: scoring", unit="row", disable=disable_progress) as bar:
        for block in cache.iter_row_blocks(step, shards=mine):
            if top or bottom:
                part = acc.add_rows(block.indices, block.rows, block.norms)
            else:
                part = block_scores(queries, block.rows, acc.qn, norms, block.norms)
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



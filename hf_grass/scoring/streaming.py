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
GEOMETRIES = ("preconditioned", "gradient", "vectors")
_TINY = torch.finfo(torch.float32).tiny


@dataclass
class Normalisation:
    """Unit normalisation of scores (cosine): each score divided by the norms of both sides, in one
    geometry. ``"preconditioned"`` and ``"gradient"``: the queries' norms (``query_vectors``) and the
    norms the pass stored with every row, in the cache's whitened factor space or the gradient's own
    (``query_norms [n_query, 2]`` needed); ``"vectors"``: the norms of the compressed vectors
    themselves (an approximation, for rows from anywhere)."""

    geometry: str = "preconditioned"
    query_norms: torch.Tensor | None = None  # [n_query, 2] float32 (gradient, preconditioned)

    def __post_init__(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"normalisation geometry must be one of {', '.join(GEOMETRIES)}, got {self.geometry!r}")
        if self.geometry != "vectors" and self.query_norms is None:
            raise ValueError(f"the {self.geometry!r} normalisation needs the queries' norms (query_vectors)")

    def select(self, rows: slice | torch.Tensor) -> Normalisation:
        """The normalisation of a subset of the queries."""
        norms = self.query_norms[rows] if self.query_norms is not None else None
        return Normalisation(self.geometry, norms)

    def apply(
        self, scores: torch.Tensor, queries: torch.Tensor, rows: torch.Tensor, row_norms: torch.Tensor | None
    ) -> torch.Tensor:
        """``scores [n_query, n]`` of ``queries`` against ``rows`` divided by both sides' norms."""
        if self.geometry == "vectors":
            return scores / (queries.norm(dim=1, keepdim=True).clamp(min=_TINY) * rows.norm(dim=1).clamp(min=_TINY))
        assert self.query_norms is not None
        if row_norms is None:
            raise ValueError("these rows have no stored norms; use Normalisation('vectors')")
        column = NORM_COLUMNS[self.geometry]
        query = self.query_norms[:, column].to(torch.float32).clamp(min=_TINY)[:, None]
        return scores / (query * row_norms[:, column].to(torch.float32).clamp(min=_TINY))


def block_scores(
    queries: torch.Tensor,
    rows: torch.Tensor,
    norms: Normalisation | None = None,
    row_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[n_query, n]`` scores of float32 ``rows``, normalised by ``norms`` (with the rows' stored
    norms ``row_norms``) when given."""
    out = queries @ rows.T
    return norms.apply(out, queries, rows, row_norms) if norms is not None else out


@dataclass
class TopK:
    """The rows of the highest (``largest=True``) or lowest scores per query. Not filtered by sign:
    the highest scores may be negative and the lowest positive (``results.ranked_result`` keeps
    helpful > 0 and harmful < 0)."""

    scores: torch.Tensor  # [n_query, k] float32, sorted
    indices: torch.Tensor  # [n_query, k] int64 dataset indices


@dataclass
class ScanResult:
    """What one read of the cache gave (``None`` for what was not asked)."""

    top: TopK | None = None  # the highest scores, highest first
    bottom: TopK | None = None  # the lowest scores, lowest first
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
    """The streaming top-k (highest scores) and bottom-k (lowest) of each query over blocks of
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
        flush_rows: int = 8192,
        norms: Normalisation | None = None,
    ):
        self.queries = queries.to(torch.float32)
        self.k = k
        self.norms = norms
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
        scores = block_scores(self.queries, rows, self.norms, row_norms)
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
    norms: Normalisation | None = None,
    dist: Distributed | None = None,
    progress: bool = False,
) -> ScanResult:
    """Score ``queries`` against every cached row in one read of the cache (the exact scan).

    Args:
        cache: the train rows.
        queries: ``[n_query, dim]`` query vectors (``query_vectors``).
        k: list length for ``top`` / ``bottom``.
        top, bottom: keep the ``k`` highest / lowest scores per query (streaming; memory
            ``O(n_query * (k + block))`` whatever the cache size; matrix-matrix products over blocks
            of rows, so many queries cost little more than one).
        dense: also return every score, ``[n_query, num_examples]`` (skipped examples score 0).
        norms: divide each score by both sides' norms (``Normalisation``).
        dist: several processes (``torch.distributed`` initialised): each rank scores every
            ``world_size``-th shard and the results are merged, so every rank returns the same.
        progress: show a progress bar.
    """
    if top or bottom:
        k = check_k(k, cache.num_rows)
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    queries = queries.to(torch.float32)
    nq = queries.shape[0]
    acc = TopKAccumulator(queries, k or 1, top=top, bottom=bottom, norms=norms)
    scores = torch.zeros(nq, cache.manifest["num_examples"]) if dense else None
    mine = [pos for pos in range(len(cache.shards)) if pos % world == rank]
    step = chunk_rows(nq, cache.dim)
    with tqdm(total=cache.num_rows, desc="hf-grass: scoring", unit="row", disable=not progress) as bar:
        for block in cache.rows.iter_row_blocks(step, shards=mine):
            if top or bottom:
                part = acc.add_rows(block.indices, block.rows, block.norms)
            else:
                part = block_scores(queries, block.rows, norms, block.norms)
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


def dense_scores(cache: GradientCache, queries: torch.Tensor, norms: Normalisation | None = None) -> torch.Tensor:
    """``[n_query, num_examples]`` scores, columns = dataset indices (skipped examples score 0)."""
    result = scan(cache, queries, top=False, dense=True, norms=norms)
    assert result.dense is not None
    return result.dense


def topk_scores(
    cache: GradientCache,
    queries: torch.Tensor,
    k: int,
    largest: bool = True,
    norms: Normalisation | None = None,
    dist: Distributed | None = None,
) -> TopK:
    """The streaming top-k (``largest``) or bottom-k of ``scan``."""
    result = scan(cache, queries, k, top=largest, bottom=not largest, norms=norms, dist=dist)
    out = result.top if largest else result.bottom
    assert out is not None
    return out

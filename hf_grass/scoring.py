"""Influence scores: query gradients (preconditioned) against the cached train rows.

``score(q, i) = sum_l (H_l^-1 g_ql) . g_il``; positive = helpful (upweighting example i lowers the
query loss), negative = harmful. ``scan`` reads the cache once per set of queries and yields what is
asked of that read: the streaming top-k (most helpful), bottom-k (most harmful) and the dense score
rows, with memory independent of the cache size for the lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

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
    """``[n_query, dim]`` float32: the preconditioned, compressed gradient of each query's loss
    (``query_vectors`` without the norms)."""
    return query_vectors(computer, batches, preconditioner, basis)[0]


def query_vectors(
    computer: GradientComputer,
    batches: Iterable[Mapping[str, torch.Tensor]],
    preconditioner: Preconditioner,
    basis: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [n_query, dim] float32, norms [n_query, 2] float32)``: each query's preconditioned,
    compressed gradient, and its exact gradient norm ``||g'||`` and preconditioned norm
    ``sqrt(g'^T H^-1 g')`` in the factor space (for unit-normalised scores).

    ``basis``: the warm-up fit of a K-FAC cache, whose train rows are whitened
    (``S (whiten * R g'_i)``); the query then goes through ``S (R H^-1 g'_q / whiten)`` so that the
    whitening cancels and ``<q, row_i>`` estimates ``g'_q^T H^-1 g'_i`` with balanced noise.
    """
    whitened = is_whitened(basis)
    factor = preconditioner.needs_factor_grads or whitened
    factorised = all(c.factorised for c in computer.compressors.values())
    out, norms = [], []
    with computer.session():
        for batch in batches:
            request = CaptureRequest(rows=not factor, factor_grads=factor or factorised)
            try:
                grads = computer.compute(batch, request)
            except NonFiniteError as err:
                raise ValueError(f"non-finite {err.what} for query rows {err.rows} of this batch") from None
            n = grads.losses.shape[0]
            rows = torch.zeros(n, computer.total_dim, device=computer.device)
            raw = torch.zeros(n, dtype=torch.float64, device=computer.device)
            pre_sq = torch.zeros_like(raw)
            for gp in grads.factor_grads.values():
                raw += gp.double().square().flatten(1).sum(1)
            if not factor and preconditioner.kind == "identity":  # also the global layout's shared row
                assert grads.rows is not None
                rows = grads.rows.float()
                if not grads.factor_grads:
                    raw = rows.double().square().sum(1)
                pre_sq = raw
            for name, (start, stop) in computer.offsets.items():
                if not factor and preconditioner.kind == "identity":
                    break
                if not factor:  # fim: one block per module (the per-module layout)
                    assert grads.rows is not None
                    block = grads.rows[:, start:stop]
                    pre = preconditioner.apply_rows(name, block).float()
                    rows[:, start:stop] = pre
                    pre_sq += (pre.double() * block.double()).sum(1)
                    if not grads.factor_grads:
                        raw += block.double().square().sum(1)
                    continue
                gp = grads.factor_grads[name]
                pre = preconditioner.apply_factor(name, gp) if preconditioner.needs_factor_grads else gp
                pre_sq += (pre.double() * gp.double()).flatten(1).sum(1)
                if whitened:
                    assert basis is not None
                    pre = whiten_query(basis, name, pre)
                rows[:, start:stop] += computer.compressors[name].project_factor(pre.float()).float()  # type: ignore[attr-defined]
            out.append(rows.cpu())
            norms.append(torch.stack([raw.sqrt(), pre_sq.clamp(min=0).sqrt()], dim=1).float().cpu())
    if not out:
        return torch.empty(0, computer.total_dim), torch.empty(0, 2)
    return torch.cat(out), torch.cat(norms)


NORM_COLUMNS = {"gradient": 0, "preconditioned": 1}


def shard_scores(
    cache: GradientCache,
    queries: torch.Tensor,
    cosine: bool = False,
    rank: int = 0,
    world_size: int = 1,
    query_norms: torch.Tensor | None = None,
    normalize: str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(indices [rows], scores [n_query, rows])`` per shard (this rank's shards only).

    Normalisation: ``normalize="gradient"`` or ``"preconditioned"`` divides each score by the exact
    norms of both sides in that geometry (``query_norms [n_query, 2]`` from ``query_vectors``, and
    the norms the pass stored with every row); ``cosine=True`` alone divides by the norms of the
    compressed rows themselves (the cosine of the stored vectors). Memory: one shard's scores plus a
    small conversion buffer, whatever the cache size.
    """
    column = None
    if normalize is not None:
        if normalize not in NORM_COLUMNS:
            raise ValueError(f"normalize must be one of {sorted(NORM_COLUMNS)} or None, got {normalize!r}")
        if query_norms is None:
            raise ValueError("normalize needs the queries' norms (query_vectors gives them)")
        column = NORM_COLUMNS[normalize]
        qcol = query_norms[:, column].to(torch.float32).clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    queries = queries.to(torch.float32)
    step = chunk_rows(queries.shape[0], cache.dim)
    buf = torch.empty(step, cache.dim, dtype=torch.float32)
    qn = _norms(queries) if cosine else None
    for position, (indices, grads, scales, stored_norms) in enumerate(cache.iter_stored()):
        if position % world_size != rank:  # another rank scores this shard
            continue
        if column is not None and stored_norms is None:
            raise ValueError(
                f"{cache.path} stores no row norms (written before hf-grass 0.2): rebuild it for "
                "unit-normalised scores, or use the cosine of the stored rows"
            )
        block = torch.empty(queries.shape[0], grads.shape[0], dtype=torch.float32)
        for start in range(0, grads.shape[0], step):
            stop = min(start + step, grads.shape[0])
            rows = buf[: stop - start]
            rows.copy_(grads[start:stop])  # the only conversion of stored rows: int8/fp16 -> fp32
            part = queries @ rows.T
            if scales is not None:  # int8 rows: row = stored * scale, applied to the scores instead
                part *= scales[start:stop].to(torch.float32)
            if column is not None:
                assert stored_norms is not None
                tiny = torch.finfo(torch.float32).tiny
                part /= qcol * stored_norms[start:stop, column].to(torch.float32).clamp(min=tiny)
            elif cosine:
                norms = rows.norm(dim=1)
                if scales is not None:
                    norms = norms * scales[start:stop].to(torch.float32).abs()
                part /= qn * norms.clamp(min=torch.finfo(torch.float32).tiny)
            block[:, start:stop] = part
        yield indices, block


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
    query_norms: torch.Tensor | None = None,
    normalize: str | None = None,
) -> ScanResult:
    """Score ``queries`` against every cached row in one read of the cache.

    Args:
        cache: the train rows.
        queries: ``[n_query, dim]`` query vectors (``query_gradients``).
        k: list length for ``top`` / ``bottom``.
        top, bottom: keep the ``k`` highest / lowest scores per query (streaming; memory
            ``O(n_query * (k + shard_size))`` whatever the cache size).
        dense: also return every score, ``[n_query, num_examples]`` (skipped examples score 0).
        cosine: divide each score by the norms of both compressed vectors.
        query_norms, normalize: exact unit normalisation instead (see ``shard_scores``).
        dist: several processes (``torch.distributed`` initialised): each rank scores every
            ``world_size``-th shard and the results are merged, so every rank returns the same.
    """
    if top or bottom:
        k = check_k(k, cache.num_rows)
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    queries = queries.to(torch.float32)
    nq = queries.shape[0]
    lists = {largest: _Running(nq, largest) for largest, wanted in ((True, top), (False, bottom)) if wanted}
    scores = torch.zeros(nq, cache.manifest["num_examples"]) if dense else None
    with tqdm(total=cache.num_rows, desc="hf-grass: scoring", unit="row", disable=disable_progress) as bar:
        for indices, block in shard_scores(cache, queries, cosine, rank, world, query_norms, normalize):
            for running in lists.values():
                running.add(block, indices.unsqueeze(0).expand(nq, -1), k)
            if scores is not None:
                scores[:, indices] = block
            bar.update(len(indices))
    if world > 1:
        assert dist is not None
        for running in lists.values():
            running.merge_ranks(dist, k)
        if scores is not None:  # each rank filled the columns of its own shards, zeros elsewhere
            scores = dist.all_reduce_sum({"scores": scores})["scores"]
    return ScanResult(
        top=lists[True].result() if top else None,
        bottom=lists[False].result() if bottom else None,
        dense=scores,
    )


class _Running:
    """The running top-k (or bottom-k) of a stream of score blocks."""

    def __init__(self, n_query: int, largest: bool):
        self.largest = largest
        self.fill = float("-inf") if largest else float("inf")
        self.scores = torch.full((n_query, 0), self.fill)
        self.indices = torch.zeros((n_query, 0), dtype=torch.int64)

    def add(self, block: torch.Tensor, block_idx: torch.Tensor, k: int) -> None:
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

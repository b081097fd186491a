"""Influence scores: query gradients (preconditioned) against the cached train rows.

``score(q, i) = sum_l (H_l^-1 g_ql) . g_il``; positive = helpful (upweighting example i lowers the
query loss), negative = harmful. Dense scores for small caches, streaming top-k / bottom-k over the
shards (memory independent of the cache size) for large ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hf_grass.cache.build import Distributed
from hf_grass.cache.reader import GradientCache
from hf_grass.cache.stats import is_whitened, rotate
from hf_grass.capture.engine import GradientComputer, NonFiniteError
from hf_grass.capture.hooks import CaptureRequest
from hf_grass.precondition import Preconditioner


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
                    pre = rotate(basis, name, pre) / basis[f"{name}::whiten"].to(pre.device)
                rows[:, start:stop] = computer.compressors[name].project_factor(pre.float()).float()  # type: ignore[attr-defined]
            out.append(rows.cpu())
    return torch.cat(out) if out else torch.empty(0, computer.total_dim)


def shard_scores(
    cache: GradientCache, queries: torch.Tensor, cosine: bool = False, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(indices [rows], scores [n_query, rows])`` per shard (this rank's shards only).

    Memory: one shard's scores plus a small conversion buffer, whatever the cache size.
    """
    queries = queries.to(torch.float32)
    step = chunk_rows(queries.shape[0], cache.dim)
    buf = torch.empty(step, cache.dim, dtype=torch.float32)
    qn = _norms(queries) if cosine else None
    for position, (indices, grads) in enumerate(cache.iter_shards()):
        if position % world_size != rank:  # another rank scores this shard
            continue
        block = torch.empty(queries.shape[0], grads.shape[0], dtype=torch.float32)
        for start in range(0, grads.shape[0], step):
            stop = min(start + step, grads.shape[0])
            rows = buf[: stop - start]
            rows.copy_(grads[start:stop])
            block[:, start:stop] = queries @ rows.T
            if cosine:
                block[:, start:stop] /= qn * rows.norm(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
        yield indices, block


def _norms(queries: torch.Tensor) -> torch.Tensor:
    return queries.norm(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def dense_scores(
    cache: GradientCache, queries: torch.Tensor, cosine: bool = False, disable_progress: bool = True
) -> torch.Tensor:
    """``[n_query, num_examples]`` scores, columns = dataset indices (skipped examples score 0)."""
    scores = torch.zeros(queries.shape[0], cache.manifest["num_examples"])
    with tqdm(total=cache.num_rows, desc="hf-grass: scoring", unit="row", disable=disable_progress) as bar:
        for indices, block in shard_scores(cache, queries, cosine):
            scores[:, indices] = block
            bar.update(len(indices))
    return scores


@dataclass
class TopK:
    """Best (``largest=True``: most helpful) or worst rows per query."""

    scores: torch.Tensor  # [n_query, k] float32, sorted
    indices: torch.Tensor  # [n_query, k] int64 dataset indices


def topk_scores(
    cache: GradientCache,
    queries: torch.Tensor,
    k: int,
    largest: bool = True,
    cosine: bool = False,
    disable_progress: bool = True,
    dist: Distributed | None = None,
) -> TopK:
    """Streaming top-k over the shards; memory ``O(n_query * (k + shard_size))``, whatever the cache size.

    With ``dist`` (several processes, ``torch.distributed`` initialised), each rank scores every
    ``world_size``-th shard and the per-rank top-k lists are all-gathered and merged, so every rank
    returns the same result.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > cache.num_rows:
        raise ValueError(
            f"k={k} is larger than the number of cached rows ({cache.num_rows}); use k <= {cache.num_rows}"
        )
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    queries = queries.to(torch.float32)
    nq = queries.shape[0]
    fill = float("-inf") if largest else float("inf")
    best = torch.full((nq, 0), fill)
    best_idx = torch.zeros((nq, 0), dtype=torch.int64)
    with tqdm(total=cache.num_rows, desc="hf-grass: scoring", unit="row", disable=disable_progress) as bar:
        for indices, block in shard_scores(cache, queries, cosine, rank, world):
            best, best_idx = _merge(best, best_idx, block, indices.unsqueeze(0).expand(nq, -1), k, largest)
            bar.update(len(indices))
    if world > 1:
        # pad to exactly k so every rank contributes tensors of the same shape
        pad = k - best.shape[1]
        best = torch.cat([best, torch.full((nq, pad), fill)], dim=1)
        best_idx = torch.cat([best_idx, torch.full((nq, pad), -1, dtype=torch.int64)], dim=1)
        values = [torch.empty_like(best) for _ in range(world)]
        positions = [torch.empty_like(best_idx) for _ in range(world)]
        torch.distributed.all_gather(values, best)
        torch.distributed.all_gather(positions, best_idx)
        best, best_idx = _merge(
            best[:, :0], best_idx[:, :0], torch.cat(values, 1), torch.cat(positions, 1), k, largest
        )
    return TopK(best, best_idx)


def _merge(
    best: torch.Tensor,
    best_idx: torch.Tensor,
    block: torch.Tensor,
    block_idx: torch.Tensor,
    k: int,
    largest: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    merged = torch.cat([best, block], dim=1)
    merged_idx = torch.cat([best_idx, block_idx], dim=1)
    values, pos = merged.topk(min(k, merged.shape[1]), dim=1, largest=largest, sorted=True)
    return values, merged_idx.gather(1, pos)

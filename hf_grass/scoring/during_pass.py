"""Scoring during the pass: a dataset streamed through the attribution pass, each row scored against
the queries as soon as it is computed, and only each query's top-k and bottom-k kept. Nothing is
written, so this searches a corpus too large to cache, and ranks a candidate pool against a target
set (data selection, as LESS does).

The rows come from ``BatchRunner.encoded``, the code the attribution pass writes shards with, and
are decoded by ``rows_to_float32``, the code every cache reader goes through: a row scored here is
bit-identical to the row a cache of the same dataset would hold, and the lists equal those of
building that cache and querying it (``tests/test_during_pass.py``, ``tests/test_distributed.py``).

What fixes the scores comes from a *reference* cache: its configuration (compressors, seeds, storage
dtype), the K-FAC eigenbasis that whitens its rows, and the preconditioner fitted from its statistics
(which the query vectors already went through). The reference can be small: a cache of a sample of
the corpus is enough to fit the curvature.

Under torchrun / Accelerate / DeepSpeed every rank computes the shards ``s % world_size == rank``
(as the attribution pass does), keeps its own lists, and the lists are merged at the end, so every
rank returns the same result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_grass.attribution.batches import BatchRunner
from hf_grass.cache.rows import rows_to_float32
from hf_grass.cache.writer import num_shards
from hf_grass.precondition import Eigenbasis
from hf_grass.scoring.streaming import NORM_COLUMNS, Normalisation, ScanResult, TopK, TopKAccumulator, check_k


@dataclass
class PassScores(ScanResult):
    """The lists of a scoring pass (``top``, ``bottom``: indices into the scored dataset), and with
    ``select`` the chosen examples: the ``select`` highest mean scores over all queries."""

    selected: TopK | None = None  # [1, select]: mean score over the queries, highest first
    num_examples: int = 0  # examples streamed (all ranks)
    skipped: list[int] | None = None  # examples without supervised tokens (this rank's)


def selection_query(queries: torch.Tensor, norms: Normalisation | None) -> tuple[torch.Tensor, Normalisation | None]:
    """One query whose score is the mean of the queries' scores (scores are linear in the query);
    with unit normalisation, the mean of the unit-normalised queries and a query norm of 1."""
    if norms is None:
        return queries.mean(dim=0, keepdim=True), None
    if norms.geometry == "vectors":
        unit = queries / queries.norm(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        return unit.mean(dim=0, keepdim=True), norms
    assert norms.query_norms is not None
    column = NORM_COLUMNS[norms.geometry]
    scale = norms.query_norms[:, column].to(torch.float32).clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    return (queries / scale).mean(dim=0, keepdim=True), Normalisation(norms.geometry, torch.ones(1, 2))


def score_during_pass(
    runner: BatchRunner,
    queries: torch.Tensor,
    k: int,
    *,
    basis: Eigenbasis | None = None,
    norms: Normalisation | None = None,
    select: int | None = None,
    bottom: bool = True,
) -> PassScores:
    """Each query's ``k`` highest (and, with ``bottom``, lowest) scoring examples of the runner's source.

    Args:
        runner: the examples to score (indices ``0 .. len - 1``) through the reference cache's capture
            (``Attributor.computer``: its compressors, with the eigenbasis masks attached), with the
            batching and the process group to use (each rank scores its shards; lists merged at the end).
        queries: ``[n_query, dim]`` query vectors (``Attributor.query_vectors``).
        k: list length per query (at most the number of examples).
        basis: the reference cache's warm-up fit (K-FAC caches whiten their rows with it).
        norms: unit normalisation of the scores (``Normalisation``).
        select: also choose the ``select`` examples with the highest mean score over the queries.
        bottom: also keep the lowest scores.
    """
    n = len(runner.source)
    k = check_k(k, n)
    if select is not None:
        select = check_k(select, n)
    dist = runner.dist
    queries = queries.to(torch.float32)
    lists = TopKAccumulator(queries, k, top=True, bottom=bottom, norms=norms)
    chosen = None
    if select is not None:
        mean_query, mean_norms = selection_query(queries, norms)
        chosen = TopKAccumulator(mean_query, select, norms=mean_norms)
    skipped: list[int] = []
    plan = runner.plan(runner.my_shards(num_shards(n, runner.config.shard_size)))
    for _, rows, step_skipped in runner.encoded(plan, basis, desc="hf-grass: scoring during the pass"):
        skipped += step_skipped
        if rows is None:
            continue
        stored = {"grads": rows.stored}
        if rows.scales is not None:
            stored["scales"] = rows.scales
        decoded = rows_to_float32(stored)  # the cache readers' one conversion
        indices = torch.tensor(rows.batch.indices, dtype=torch.int64)
        lists.add_rows(indices, decoded, rows.norms)
        if chosen is not None:
            chosen.add_rows(indices, decoded, rows.norms)
    lists.merge_ranks(dist)
    found = lists.result()
    selected = None
    if chosen is not None:
        chosen.merge_ranks(dist)
        selected = chosen.result().top
    return PassScores(
        top=_rows_found(found.top),
        bottom=_rows_found(found.bottom),
        method="during-pass",
        selected=_rows_found(selected),
        num_examples=n,
        skipped=skipped,
    )


def _rows_found(lists: TopK | None) -> TopK | None:
    """The lists without the padding of ranks that had fewer rows than ``k`` (index -1); every
    query saw the same rows, so every list has the same length."""
    if lists is None:
        return None
    found = int((lists.indices[0] >= 0).sum()) if lists.indices.shape[0] else 0
    return TopK(lists.scores[:, :found], lists.indices[:, :found])

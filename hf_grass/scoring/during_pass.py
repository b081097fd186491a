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
from hf_grass.capture.engine import GradientComputer
from hf_grass.data import ExampleSource
from hf_grass.distributed import Distributed
from hf_grass.scoring.streaming import Normalisation, ScanResult, TopK, TopKAccumulator, check_k


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
    unit = (queries / norms.query).mean(dim=0, keepdim=True)
    return unit, Normalisation(torch.ones(1, 2), norms.geometry)


def score_during_pass(
    computer: GradientComputer,
    source: ExampleSource,
    queries: torch.Tensor,
    k: int,
    *,
    basis: dict[str, torch.Tensor] | None = None,
    norms: Normalisation | None = None,
    cosine: bool = False,
    select: int | None = None,
    bottom: bool = True,
    batch_size: int = 8,
    pad_token_id: int | None = 0,
    padding_side: str = "right",
    dist: Distributed | None = None,
    disable_progress: bool = True,
) -> PassScores:
    """Each query's ``k`` most helpful (and, with ``bottom``, most harmful) examples of ``source``.

    Args:
        computer: the capture of the reference cache (``Attributor.computer``: its compressors,
            with the eigenbasis masks attached).
        source: the examples to score (indices ``0 .. len - 1``).
        queries: ``[n_query, dim]`` query vectors (``Attributor.query_vectors``).
        k: list length per query (at most the number of examples).
        basis: the reference cache's warm-up fit (K-FAC caches whiten their rows with it).
        norms: exact unit normalisation (the queries' norms); ``cosine`` alone divides by the
            compressed vectors' norms.
        select: also choose the ``select`` examples with the highest mean score over the queries.
        dist: the process group (each rank scores its shards; lists merged at the end).
    """
    n = len(source)
    k = check_k(k, n)
    if select is not None:
        select = check_k(select, n)
    dist = dist or Distributed()
    runner = BatchRunner(
        computer,
        source,
        batch_size=batch_size,
        pad_token_id=pad_token_id,
        padding_side=padding_side,
        dist=dist,
        disable_progress=disable_progress,
    )
    queries = queries.to(torch.float32)
    lists = TopKAccumulator(queries, k, top=True, bottom=bottom, cosine=cosine, norms=norms)
    chosen = None
    if select is not None:
        mean_query, mean_norms = selection_query(queries, norms)
        chosen = TopKAccumulator(mean_query, select, cosine=cosine, norms=mean_norms)
    skipped: list[int] = []
    plan = runner.plan(runner.my_shards(num_shards(n, computer.config.shard_size)))
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

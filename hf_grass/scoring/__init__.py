"""Influence scores: query gradients (preconditioned) against the cached train rows.

``score(q, i) = sum_l (H_l^-1 g_ql) . g_il``; positive = helpful (upweighting example i lowers the
query loss), negative = harmful.

- ``queries``: the query vectors and their exact norms (``query_vectors``).
- ``streaming``: the exact scan (``scan``: one read of the cache gives the streaming top-k,
  bottom-k and, when asked, the dense scores), its lists (``TopKAccumulator``) and the
  normalisation of scores by exact norms (``Normalisation``).
- ``two_stage``: candidates from an index or BM25, then the exact re-rank (``lookup``).
"""

from hf_grass.scoring.queries import query_gradients, query_vectors
from hf_grass.scoring.streaming import (
    NORM_COLUMNS,
    Normalisation,
    ScanResult,
    TopK,
    TopKAccumulator,
    block_scores,
    check_k,
    chunk_rows,
    dense_scores,
    scan,
    shard_scores,
    topk_scores,
)
from hf_grass.scoring.two_stage import SEARCHES, default_candidates, lookup, two_stage

__all__ = [
    "NORM_COLUMNS",
    "SEARCHES",
    "Normalisation",
    "ScanResult",
    "TopK",
    "TopKAccumulator",
    "block_scores",
    "check_k",
    "chunk_rows",
    "default_candidates",
    "dense_scores",
    "lookup",
    "query_gradients",
    "query_vectors",
    "scan",
    "shard_scores",
    "topk_scores",
    "two_stage",
]

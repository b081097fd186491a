"""Influence scores: query gradients (preconditioned) against the cached train rows.

``score(q, i) = sum_l (H_l^-1 g_ql) . g_il``; positive = helpful (upweighting example i lowers the
query loss), negative = harmful.

- ``preconditioning``: a cache's preconditioner, fitted once on its statistics (``fitted_preconditioner``).
- ``queries``: the query vectors and their norms (``query_vectors``).
- ``streaming``: the exact scan (``scan``: one read of the cache gives the streaming top-k,
  bottom-k and, when asked, the dense scores), its lists (``TopKAccumulator``) and the
  normalisation of scores by exact norms (``Normalisation``).
- ``two_stage``: candidates from an index or BM25, then the exact re-rank (``lookup``).
- ``options``: how a lookup searches (``Search``) and what a user may set per cache (``ScoringOptions``).
"""

from hf_grass.scoring.options import SEARCHES, ScoringOptions, Search
from hf_grass.scoring.preconditioning import cache_eigenbasis, fitted_preconditioner
from hf_grass.scoring.queries import QueryVectors, query_vectors
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
    topk_scores,
)
from hf_grass.scoring.two_stage import Candidates, default_candidates, lookup, two_stage

__all__ = [
    "NORM_COLUMNS",
    "Candidates",
    "SEARCHES",
    "Normalisation",
    "QueryVectors",
    "ScanResult",
    "ScoringOptions",
    "Search",
    "TopK",
    "TopKAccumulator",
    "block_scores",
    "cache_eigenbasis",
    "check_k",
    "chunk_rows",
    "default_candidates",
    "dense_scores",
    "fitted_preconditioner",
    "lookup",
    "query_vectors",
    "scan",
    "topk_scores",
    "two_stage",
]

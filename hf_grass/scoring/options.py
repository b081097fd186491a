"""The options of a lookup, bundled so that they pass through the layers as one value.

- ``Search``: how the lists are found (the exact scan, or candidates from an index or BM25 re-scored
  exactly) and how many candidates.
- ``ScoringOptions``: everything a user may set for the queries of one cache (``Attributor``): the
  preconditioner and its damping, the normalisation, the search, the query batch size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from hf_grass.scoring.refine import check_refine_options

SEARCHES = ("auto", "exact", "index", "bm25", "index+bm25")


@dataclass(frozen=True)
class Search:
    """How a lookup finds its lists; scores are exact in every case (``two_stage``).

    Args:
        method: ``"auto"`` (the cache's FAISS index if it has one, else the exact scan), ``"exact"``,
            ``"index"``, ``"bm25"`` (BM25 candidates from the documents' text) or ``"index+bm25"``.
        candidates: rows re-scored per list (default ``default_candidates(k)``).
        params: FAISS search parameters (``nprobe``, ``efSearch``).
        query_batch: queries per candidate gather (default: bounded by the candidate rows).
    """

    method: str = "auto"
    candidates: int | None = None
    params: dict[str, int] | None = None
    query_batch: int | None = None

    def __post_init__(self) -> None:
        if self.method not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {self.method!r}")
        if self.candidates is not None and (isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates <= 0):
            raise ValueError(f"candidates must be a positive int, got {self.candidates!r}")

    @classmethod
    def of(cls, search: Search | str | None) -> Search:
        """A ``Search`` from itself, a method name, or None (the default)."""
        if isinstance(search, Search):
            return search
        return cls() if search is None else cls(search)


@dataclass(frozen=True)
class ScoringOptions:
    """What the queries of one cache may override (``None``: the cache's configuration).

    Args:
        preconditioner: a preconditioner name, one the cache's statistics allow (default: the cache's).
        damping: fraction of each module's mean eigenvalue.
        cosine: unit-normalise scores; ``cosine_norms`` names the geometry of the norms.
        search: how lists are found (``Search`` or its method name).
        candidates: rows re-scored per list in a two-stage lookup.
        batch_size: queries per forward/backward (default: the cache's batch size, or 8).
        disable_progress: no progress bars.
        refine_steps: refine each query's EK-FAC iHVP by this many conjugate-gradient steps with
            exact curvature products (``hf_grass.scoring.refine``; 0: EK-FAC alone). The first step
            only rescales EK-FAC's answer; query time grows with each step.
        refine_curvature: the curvature those products take: ``"gauss-newton"`` (the training
            loss's Gauss-Newton matrix, by forward- and reverse-mode products) or ``"empirical"``
            (the empirical Fisher of per-example gradients).
        refine_examples: the training documents (a seeded sample of the cache's, re-run from the
            text it stores) the curvature averages over.
    """

    preconditioner: str | None = None
    damping: float | None = None
    cosine: bool | None = None
    cosine_norms: str | None = None
    search: str = "auto"
    candidates: int | None = None
    batch_size: int | None = None
    disable_progress: bool = True
    refine_steps: int = 0
    refine_curvature: str = "gauss-newton"
    refine_examples: int = 32

    def __post_init__(self) -> None:
        Search(self.search, self.candidates)  # validates both
        check_refine_options(self.refine_steps, self.refine_curvature, self.refine_examples)
        if self.cosine_norms is not None and self.cosine_norms not in ("preconditioned", "gradient"):
            raise ValueError(f"cosine_norms must be 'preconditioned' or 'gradient', got {self.cosine_norms!r}")
        if self.cosine is not None and not isinstance(self.cosine, bool):
            raise TypeError(f"cosine must be True, False or None, got {self.cosine!r}")

    @property
    def lookup(self) -> Search:
        return Search(self.search, self.candidates)

    def replace(self, **changes: Any) -> ScoringOptions:
        """These options with some changed; an unknown name is a ``TypeError`` naming the known ones."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown scoring options {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)

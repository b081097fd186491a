"""Lookups over several caches and for the objects that hold a model and its caches.

- ``MultiCheckpointAttributor``: scores summed over the caches of several checkpoints (TracIn-CP),
  each with the query gradient taken at the weights its cache was built with.
- ``AttributionLookups``: ``attribute``, ``find_influential`` and ``score_dataset`` for
  ``AttributionTrainer`` and ``GraSSCallback``, written once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hf_grass.cache.reader import GradientCache, open_cache
from hf_grass.checkpoints import checkpoint_weights
from hf_grass.prompts import encode_query
from hf_grass.query import Attributor, make_result
from hf_grass.results import InfluenceResult
from hf_grass.scoring import ScanResult, TopK, check_k
from hf_grass.scoring.during_pass import PassScores


class MultiCheckpointAttributor:
    """Scores summed over several caches (TracIn-CP style), each with the query gradient taken at
    the weights its cache was built with.

    A cache whose weight fingerprint differs from the current model's must record the checkpoint
    directory it was built from (``GraSSCallback(every_save=True)`` does); those weights are loaded
    for its query gradient and the current weights restored afterwards. The completion of a prompt
    comes from the current model.

    Args:
        checkpoint_weights: ``"learning_rate"`` (default) weights each checkpoint's scores by the
            learning rate recorded with its cache, as TracIn-CP does (a cache without one counts 1);
            ``"uniform"`` sums them unweighted.
        kwargs: passed to each ``Attributor`` (preconditioner, damping, cosine, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        caches: list[GradientCache | str | os.PathLike],
        checkpoint_weights: str = "learning_rate",
        **kwargs: Any,
    ):
        if not caches:
            raise ValueError("no caches to attribute with")
        if checkpoint_weights not in ("learning_rate", "uniform"):
            raise ValueError(
                f"checkpoint_weights must be 'learning_rate' or 'uniform', got {checkpoint_weights!r}"
            )
        self.model, self.tokenizer, self.kwargs = model, tokenizer, kwargs
        self.caches = [open_cache(c) for c in caches]
        self.weights = [
            float(c.model_info.get("learning_rate") or 1.0) if checkpoint_weights == "learning_rate" else 1.0
            for c in self.caches
        ]

    def _each(self) -> Iterator[tuple[float, Attributor]]:
        """``(weight, attributor)`` per cache, with that cache's weights loaded while the caller
        works with the attributor (the caller must finish with it inside the loop body)."""
        for weight, cache in zip(self.weights, self.caches):
            with checkpoint_weights(self.model, cache):
                yield weight, Attributor(self.model, self.tokenizer, cache, **self.kwargs)

    def attribute(self, query_dataset: Any) -> torch.Tensor:
        """Scores ``[n_query, n_train]`` summed over the checkpoints, each weighted."""
        total: torch.Tensor | None = None
        for weight, attributor in self._each():
            scores = weight * attributor.attribute(query_dataset)
            total = scores if total is None else total + scores
        assert total is not None
        return total

    def attribute_top_k(self, query_dataset: Any, k: int = 10) -> ScanResult:
        """Each query's ``k`` highest and lowest summed scores (not filtered by sign)."""
        if len(self.caches) == 1:  # streaming (or two-stage) lists
            for _, attributor in self._each():  # the query gradients at the cache's own weights
                return attributor.attribute_top_k(query_dataset, k)
        # summed over checkpoints: the lists need every summed score, so they come from the dense sum
        check_k(k, self.caches[-1].num_rows)
        return self._dense_lists(self.attribute(query_dataset), k)

    def score_dataset(self, dataset: Any, query_dataset: Any, k: int = 10, **kwargs: Any) -> PassScores:
        """``Attributor.score_dataset`` with the one cache as the reference, at the weights it was
        built with (scores summed over checkpoints would need one pass per checkpoint)."""
        if len(self.caches) != 1:
            raise ValueError(
                f"scoring during the pass uses one reference cache, but there are {len(self.caches)} (one "
                "per checkpoint); use Attributor(model, tokenizer, cache).score_dataset(...) with the one "
                "to score with"
            )
        for _, attributor in self._each():
            return attributor.score_dataset(dataset, query_dataset, k, **kwargs)
        raise AssertionError("unreachable: one cache")

    def _dense_lists(self, total: torch.Tensor, k: int) -> ScanResult:
        """Top-k and bottom-k of summed dense scores; skipped examples (no row) are not candidates."""
        present = torch.zeros(total.shape[1], dtype=torch.bool)
        present[self.caches[-1].indices] = True
        return ScanResult(
            top=_dense_topk(total, present, k, largest=True), bottom=_dense_topk(total, present, k, largest=False)
        )

    def find_influential(
        self,
        prompt: str | list[dict[str, str]],
        k: int = 10,
        completion: str | None = None,
        *,
        tokens: bool = False,
        train_dataset: Any = None,
        **generate_kwargs: Any,
    ) -> InfluenceResult:
        check_k(k, self.caches[-1].num_rows)
        if tokens and len(self.caches) != 1:
            raise ValueError(
                f"token scores split one cache's scores, but these are summed over {len(self.caches)} checkpoints; "
                "use Attributor(model, tokenizer, cache).find_influential(..., tokens=True) with one of them"
            )
        # the completion comes from the current (final) model; its gradient is taken at every checkpoint
        prompt_text, text, batch = encode_query(
            self.model, self.tokenizer, prompt, completion, documents=self.caches[-1], **generate_kwargs
        )
        if len(self.caches) == 1:  # one read of the cache, streaming lists
            for weight, attributor in self._each():  # the query gradient at the cache's own weights
                return attributor.result_for(prompt_text, text, batch, k, weight=weight, tokens=tokens,
                                             train_dataset=train_dataset)  # fmt: skip
        total: torch.Tensor | None = None
        for weight, attributor in self._each():
            scores = attributor.scores(attributor.query_vectors([batch]), weight)
            total = scores if total is None else total + scores
        assert total is not None
        found = self._dense_lists(total, k)
        assert found.top is not None and found.bottom is not None
        return make_result(self.caches[-1], prompt_text, text, found.top, found.bottom)


def _dense_topk(scores: torch.Tensor, present: torch.Tensor, k: int, largest: bool) -> TopK:
    masked = scores.masked_fill(~present, float("-inf") if largest else float("inf"))
    values, indices = masked.topk(k, dim=1, largest=largest, sorted=True)
    return TopK(values, indices)


class AttributionLookups:
    """``attribute`` and ``find_influential`` for the objects that hold a model and its caches
    (``AttributionTrainer``, ``GraSSCallback``): they only say how to make the attributor."""

    def _attributor(self, **kwargs: Any) -> Attributor | MultiCheckpointAttributor:
        raise NotImplementedError

    def attribute(self, query_dataset: Any, **kwargs: Any) -> torch.Tensor:
        """Influence scores ``[n_query, n_train]`` of every query on every training example.

        ``kwargs``: ``ScoringOptions`` overrides (``preconditioner``, ``damping``, ``cosine``, ...) and
        ``check_model``.
        """
        return self._attributor(**kwargs).attribute(query_dataset)

    def attribute_top_k(self, query_dataset: Any, k: int = 10, **kwargs: Any) -> ScanResult:
        """Each query's ``k`` highest-scoring (``top``) and lowest-scoring (``bottom``) training
        documents, without the dense matrix (not filtered by sign); ``kwargs`` as in ``attribute``."""
        return self._attributor(**kwargs).attribute_top_k(query_dataset, k)

    def score_dataset(
        self, dataset: Any, query_dataset: Any, k: int = 10, select: int | None = None, **kwargs: Any
    ) -> PassScores:
        """Each query's top-k helpful and harmful examples of ``dataset``, scored during an attribution
        pass with nothing stored (``Attributor.score_dataset``; ``select``: data selection). The
        gradient cache is the reference that fixes the scores: build it first (a sample of the corpus
        is enough). ``kwargs``: ``bottom``, ``text_column``."""
        return self._attributor().score_dataset(dataset, query_dataset, k, select=select, **kwargs)

    def find_influential(
        self,
        prompt: str | list[dict[str, str]],
        k: int = 10,
        completion: str | None = None,
        *,
        tokens: bool = False,
        train_dataset: Any = None,
        **generate_kwargs: Any,
    ) -> InfluenceResult:
        """The top-k helpful and harmful training documents behind the model's completion of ``prompt``.

        ``tokens``: also their token scores (``Attributor.find_influential``), the documents re-run
        from ``train_dataset`` (default: the dataset this object built its cache from, else the
        cache's text)."""
        if tokens and train_dataset is None:
            train_dataset = self._cached_dataset()
        return self._attributor().find_influential(prompt, k=k, completion=completion, tokens=tokens,
                                                   train_dataset=train_dataset, **generate_kwargs)  # fmt: skip

    def _cached_dataset(self) -> Any:
        """The dataset the cache in use was built from, when this object built it (else None)."""
        return None

"""`find_influential`: from a prompt to the training documents behind the model's answer.

The completion is generated (greedy by default) unless given; its gradient, with the loss on the
completion tokens only, is compressed and preconditioned exactly like the train rows were, then
scored against the cache in one read. Positive scores are helpful documents (proponents), negative
harmful.

Path of a query: ``find_influential`` -> ``Attributor.find_influential`` -> ``encode_query`` (prompt
and completion tokens, loss on the completion) -> ``Attributor.query_vectors``
(``scoring.query_gradients``: hooks, factor-space gradient, preconditioner, final projection) ->
``scoring.lookup`` (the cache's index when it has one: candidates, then their exact scores; else
``scoring.scan``, one pass over the memory-mapped shards: top-k and bottom-k) -> ``make_result``
(the documents' text from the shards' JSON lines).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from hf_grass.attribution import example_source
from hf_grass.cache.reader import GradientCache, open_cache
from hf_grass.capture.engine import GradientComputer
from hf_grass.capture.fingerprint import weights_fingerprint
from hf_grass.capture.loss import PerExampleLoss, loss_name
from hf_grass.config import GraSSConfig
from hf_grass.data import ExampleSource, pad_token_id, padded_batches, padding_side
from hf_grass.distributed import Distributed, current_distributed
from hf_grass.precondition import preconditioner_class
from hf_grass.prompts import encode_query, generate, render_prompt  # noqa: F401 - public names
from hf_grass.results import InfluenceResult, ranked_result
from hf_grass.scoring import (
    NORM_COLUMNS,
    SEARCHES,
    Normalisation,
    QueryVectors,
    ScanResult,
    TopK,
    cache_eigenbasis,
    check_k,
    fitted_preconditioner,
    lookup,
    query_vectors,
    scan,
)
from hf_grass.scoring.during_pass import PassScores, score_during_pass

logger = logging.getLogger("transformers.hf_grass")


class Attributor:
    """Scores queries against one gradient cache with one model.

    Args:
        model: the model whose gradients the cache holds (checked against its fingerprint).
        tokenizer: tokenizes prompts and decodes completions.
        cache: a ``GradientCache``, a local path or a Hub repo id.
        preconditioner, damping, cosine: override the cache's config for scoring.
        check_model: refuse a model whose weights differ from the one that built the cache.
        per_example_loss: the ``fn(model, batch) -> [B]`` loss the cache was built with, if it was
            built with one (see ``GradientComputer``); queries take their gradient of the same loss.
        search: how lists are found: ``"auto"`` (the cache's FAISS index if it has one, else the
            exact scan), ``"exact"`` (force the scan), ``"index"``, ``"bm25"``, ``"index+bm25"``;
            scores are exact in every case (``hf_grass.scoring.lookup``).
        candidates: rows re-scored per list in a two-stage lookup (default
            ``scoring.default_candidates(k)``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        cache: GradientCache | str | os.PathLike,
        *,
        preconditioner: str | None = None,
        damping: float | None = None,
        cosine: bool | None = None,
        cosine_norms: str | None = None,
        check_model: bool = True,
        batch_size: int | None = None,
        disable_progress: bool = True,
        per_example_loss: PerExampleLoss | None = None,
        search: str = "auto",
        candidates: int | None = None,
    ):
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
        self.search, self.candidates = search, candidates
        self.cache = open_cache(cache)
        self.per_example_loss = per_example_loss
        _check_loss(self.cache, per_example_loss)
        self.model = model
        self.tokenizer = tokenizer
        cfg = self.cache.config
        self.config: GraSSConfig = cfg
        self.cosine = cfg.cosine if cosine is None else cosine
        # unit normalisation by the exact norms the pass stored with every row (in the geometry
        # cosine_norms names); caches written before they were stored fall back to the cosine of
        # the compressed rows
        self.normalize: str | None = None
        if self.cosine:
            self.normalize = cosine_norms or cfg.cosine_norms
            if self.normalize not in NORM_COLUMNS:
                raise ValueError(f"cosine_norms must be one of {sorted(NORM_COLUMNS)}, got {self.normalize!r}")
            if not self.cache.has_norms:
                logger.warning(
                    "%s stores no row norms (written before hf-grass 0.2): cosine falls back to the cosine "
                    "of the compressed rows; rebuild the cache for exact norms.",
                    self.cache.path,
                )
                self.normalize = None
        self.batch_size = batch_size or cfg.batch_size or 8
        self.disable_progress = disable_progress
        names = self.cache.module_names
        # rebuild the exact compressors of the cache (same config, same module names -> same seeds)
        self.computer = GradientComputer(
            model, cfg.replace(target_modules=names, exclude_modules=None), per_example_loss=per_example_loss
        )
        self._check_model(check_model)
        self.basis = cache_eigenbasis(self.cache)  # K-FAC caches: the whitening of their train rows
        chosen = preconditioner_class(preconditioner or cfg.preconditioner)
        if self.basis is not None and chosen.acts_on == "rows":
            # unbiased, but the query side then carries the whitening's inverse: measured far noisier
            # than gradient similarity on raw rows (docs/howto/choosing.md), so refuse, saying how
            raise ValueError(
                f"preconditioner={chosen.name!r} acts on raw rows, but {self.cache.path} stores rows whitened "
                f"for {cfg.preconditioner!r}: build a cache with GraSSConfig(preconditioner={chosen.name!r}) "
                f"for it, or query this one with {cfg.preconditioner!r} / 'kfac'."
            )
        self.preconditioner = fitted_preconditioner(self.cache, preconditioner, damping, self.basis)
        if self.basis is not None:
            self.basis.attach(self.computer.compressors)  # masks in the eigenbasis: their maps

    def _check_model(self, check_weights: bool) -> None:
        found = {t.name: (t.d_out, t.d_in, t.bias) for t in self.computer.targets}
        for m in self.cache.modules:
            if found.get(m["name"]) != (m["d_out"], m["d_in"], m["bias"]):
                raise ValueError(
                    f"the model does not match the cache: module {m['name']!r} is "
                    f"{found.get(m['name'])} in the model but {(m['d_out'], m['d_in'], m['bias'])} in the cache. "
                    "Use the model (and adapter) the cache was built with."
                )
        if check_weights:
            mine = weights_fingerprint(self.computer.model, self.computer.targets)
            if mine != self.cache.model_info.get("weights_sha256"):
                raise ValueError(
                    "the model's weights differ from those the cache was built with (fingerprint "
                    f"{mine} vs {self.cache.model_info.get('weights_sha256')}); scores would mix two models. "
                    "Load the same checkpoint, rebuild the cache, or pass check_model=False to proceed anyway."
                )

    # ---- queries --------------------------------------------------------------------------------

    def query_vectors(self, batches: list[dict[str, torch.Tensor]]) -> QueryVectors:
        """The queries' preconditioned, compressed gradients and their norms (``scoring.query_vectors``)."""
        return query_vectors(self.computer, batches, self.preconditioner, self.basis)

    def scan(
        self, encoded: tuple[torch.Tensor, torch.Tensor], k: int | None = None, weight: float = 1.0, **what: Any
    ) -> ScanResult:
        """The lists (and with ``dense=True`` every score) of encoded queries, with this attributor's
        search and normalisation (``scoring.lookup``; ``k=None``: the dense scan); ``what``: top,
        bottom, dense, query_texts, disable_progress."""
        rows, norms = encoded
        normalisation = self._normalisation(norms)
        if k is None:
            what.pop("query_texts", None)
            return scan(self.cache, weight * rows, None, cosine=self.cosine, norms=normalisation, **what)
        return lookup(
            self.cache, weight * rows, k, search=self.search, cosine=self.cosine, norms=normalisation,
            candidates=self.candidates, **what,
        )  # fmt: skip

    def _normalisation(self, query_norms: torch.Tensor) -> Normalisation | None:
        """The exact unit normalisation of these queries' scores, when ``cosine`` asks for it."""
        return Normalisation(query_norms, self.normalize) if self.normalize else None

    def attribute(self, query_dataset: Any, k: int | None = None) -> torch.Tensor | ScanResult:
        """Scores ``[n_query, n_train]`` (columns = training dataset indices), or with ``k`` only each
        query's ``k`` most helpful and most harmful documents (a ``ScanResult`` with ``top`` and
        ``bottom``), without the dense matrix: streamed over blocks of rows with matrix-matrix
        products (memory independent of the cache size), or two-stage with an index."""
        source, encoded = self._encode_dataset(query_dataset)
        if k is None:
            found = self.scan(encoded, top=False, dense=True, disable_progress=self.disable_progress)
            assert found.dense is not None
            return found.dense
        texts = None
        if "bm25" in self.search:
            texts = [source.example(i).get("text") or "" for i in range(len(source))]
        return self.scan(encoded, k, top=True, bottom=True, query_texts=texts, disable_progress=self.disable_progress)

    def _encode_dataset(self, query_dataset: Any) -> tuple[ExampleSource, tuple[torch.Tensor, torch.Tensor]]:
        """The queries of a dataset as examples, and their query vectors."""
        source = example_source(
            query_dataset,
            self.tokenizer,
            self.config,
            self.model,
            all_columns=self.per_example_loss is not None,
            prefix=self.cache.document_prefix,  # text queries begin as the documents do
        )
        return source, self.query_vectors(padded_batches(source, self.tokenizer, self.batch_size))

    def score_dataset(
        self,
        dataset: Any,
        query_dataset: Any,
        k: int = 10,
        *,
        select: int | None = None,
        bottom: bool = True,
        text_column: str = "text",
        dist: Distributed | None = None,
    ) -> PassScores:
        """Each query's ``k`` most helpful and most harmful examples of ``dataset``, scored while an
        attribution pass streams through it: nothing is stored, so ``dataset`` may be far larger
        than any cache (``hf_grass.scoring.during_pass``).

        This attributor's cache is the reference: its compressors, eigenbasis and preconditioner
        fix the scores, which equal those of caching ``dataset`` with the same configuration and
        querying it. ``select``: also choose the ``select`` examples with the highest mean score
        over the queries (data selection). Indices are positions in ``dataset``. Under torchrun /
        Accelerate each process scores its share and every process returns the merged lists.
        """
        _, (rows, norms) = self._encode_dataset(query_dataset)
        source = example_source(
            dataset, self.tokenizer, self.config, self.model, text_column,
            all_columns=self.per_example_loss is not None,
        )  # fmt: skip
        return score_during_pass(
            self.computer,
            source,
            rows,
            k,
            basis=self.basis,
            norms=self._normalisation(norms),
            cosine=self.cosine,
            select=select,
            bottom=bottom,
            batch_size=self.batch_size,
            pad_token_id=pad_token_id(self.tokenizer),
            padding_side=padding_side(self.tokenizer),
            dist=dist or current_distributed(),
            disable_progress=self.disable_progress,
        )

    def find_influential(
        self,
        prompt: str | list[dict[str, str]],
        k: int = 10,
        completion: str | None = None,
        all_scores: bool = False,
        **generate_kwargs: Any,
    ) -> InfluenceResult:
        """Top-k helpful and harmful training documents for the model's completion of ``prompt``.

        ``prompt`` may be a chat ``messages`` list, rendered with the tokenizer's chat template.
        Without ``completion`` the model generates one (greedy, 32 new tokens unless overridden).
        With ``all_scores`` the result also holds every cached row's score (e.g. to plot them),
        from the same query gradient.
        """
        check_k(k, self.cache.num_rows)
        prompt_text, text, batch = encode_query(
            self.model, self.tokenizer, prompt, completion, documents=self.cache, **generate_kwargs
        )
        found = self.scan(self.query_vectors([batch]), k, top=True, bottom=True, dense=all_scores,
                          query_texts=[prompt_text + text])  # fmt: skip
        assert found.top is not None and found.bottom is not None
        result = make_result(self.cache, prompt_text, text, found.top, found.bottom)
        if found.dense is not None:  # columns are dataset indices; skipped examples have no row
            result.scores = found.dense[0, self.cache.indices]
        return result


def _check_loss(cache: GradientCache, fn: PerExampleLoss | None) -> None:
    """Queries must take the gradient of the loss the train rows were computed with."""
    built, given = cache.manifest.get("loss"), loss_name(fn)
    if built is not None and fn is None:
        raise ValueError(
            f"this cache was built with per_example_loss={built}; pass the same function "
            "(per_example_loss=...) so that queries use the same loss"
        )
    if built is None and fn is not None:
        raise ValueError(
            f"this cache was built with the built-in per-example loss, but per_example_loss={given} was "
            "given; query without it, or rebuild the cache with it"
        )
    if built != given:
        logger.warning(
            "The cache was built with per_example_loss=%s and the query uses %s; make sure they compute "
            "the same loss.",
            built,
            given,
        )


def make_result(
    cache: GradientCache, prompt: str, completion: str, best: TopK, worst: TopK
) -> InfluenceResult:
    """An ``InfluenceResult`` of the first query's lists, with the documents' text read from the cache."""
    top = (best.scores[0].tolist(), best.indices[0].tolist())
    bottom = (worst.scores[0].tolist(), worst.indices[0].tolist())
    return ranked_result(prompt, completion, top, bottom, cache.documents(top[1] + bottom[1]))


def find_influential(
    prompt: str | list[dict[str, str]],
    *,
    model: nn.Module,
    tokenizer: Any,
    cache: GradientCache | str | os.PathLike,
    k: int = 10,
    completion: str | None = None,
    preconditioner: str | None = None,
    damping: float | None = None,
    check_model: bool = True,
    per_example_loss: PerExampleLoss | None = None,
    search: str = "auto",
    **generate_kwargs: Any,
) -> InfluenceResult:
    """One call from a prompt to its influential training documents (cache: object, path or Hub id).

    ``per_example_loss``: the loss the cache was built with, if it was built with one.
    ``search``: ``"auto"`` uses the cache's index when it has one (``"exact"`` forces the scan;
    ``"bm25"``, ``"index+bm25"`` add lexical candidates); see ``Attributor``.
    """
    attributor = Attributor(
        model,
        tokenizer,
        cache,
        preconditioner=preconditioner,
        damping=damping,
        check_model=check_model,
        per_example_loss=per_example_loss,
        search=search,
    )
    return attributor.find_influential(prompt, k=k, completion=completion, **generate_kwargs)

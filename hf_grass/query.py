"""`find_influential`: from a prompt to the training documents behind the model's answer.

The completion is generated (greedy by default) unless given; its gradient, with the loss on the
completion tokens only, is compressed and preconditioned exactly like the train rows were, then
scored against the cache in one read. Positive scores are helpful documents (proponents), negative
harmful.

Path of a query: ``find_influential`` -> ``Attributor.find_influential`` -> ``encode_query`` (prompt
and completion tokens, loss on the completion) -> ``Attributor.query_vectors``
(``scoring.query_gradients``: hooks, factor-space gradient, preconditioner, final projection) ->
``scoring.scan`` (one pass over the memory-mapped shards: top-k and bottom-k) -> ``make_result``
(the documents' text from the shards' JSON lines).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hf_grass.attribution import example_source
from hf_grass.cache.reader import GradientCache, open_cache
from hf_grass.capture.engine import GradientComputer, unwrap_model
from hf_grass.capture.fingerprint import weights_fingerprint
from hf_grass.capture.loss import PerExampleLoss, loss_name
from hf_grass.checkpoints import checkpoint_weights
from hf_grass.config import GraSSConfig
from hf_grass.data import (
    IGNORE_INDEX,
    collate,
    encode_text,
    leading_special,
    pad_token_id,
    padded_batches,
    padding_side,
    special_ids,
)
from hf_grass.precondition.eigenbasis import attach_basis, is_whitened
from hf_grass.precondition.preconditioner import Preconditioner
from hf_grass.results import InfluenceResult, InfluentialDocument
from hf_grass.scoring import NORM_COLUMNS, ScanResult, TopK, check_k, query_vectors, scan

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
    ):
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
        self.basis = self.cache.eigenbasis()  # K-FAC caches: the whitening of their train rows
        if preconditioner == "identity" and is_whitened(self.basis):
            # unbiased, but the query side then carries the whitening's inverse: measured far noisier
            # than gradient similarity on raw rows (docs/howto/choosing.md), so refuse, saying how
            raise ValueError(
                f"preconditioner='identity' (plain gradient similarity) needs raw rows, but {self.cache.path} "
                f"stores rows whitened for {cfg.preconditioner!r}: build a cache with "
                "GraSSConfig(preconditioner='identity') for gradient similarity, or query this one with "
                f"{cfg.preconditioner!r} / 'kfac'."
            )
        self.preconditioner = Preconditioner.fit(self.cache, preconditioner, damping)
        attach_basis(self.computer.compressors, self.basis)  # masks in the eigenbasis: their maps

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

    def query_vectors(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """``[n_query, dim]``: the queries' preconditioned, compressed gradients."""
        return self.encode(batches)[0]

    def encode(self, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(query rows, their exact norms [n_query, 2])`` (``scoring.query_vectors``)."""
        return query_vectors(self.computer, batches, self.preconditioner, self.basis)

    def scan(
        self, encoded: tuple[torch.Tensor, torch.Tensor], k: int | None = None, weight: float = 1.0, **what: Any
    ) -> ScanResult:
        """``scoring.scan`` of encoded queries with this attributor's normalisation; ``what``: top,
        bottom, dense, disable_progress."""
        rows, norms = encoded
        return scan(
            self.cache, weight * rows, k, cosine=self.cosine, query_norms=norms, normalize=self.normalize, **what
        )

    def attribute(self, query_dataset: Any) -> torch.Tensor:
        """Scores ``[n_query, n_train]`` (columns = training dataset indices)."""
        source = example_source(
            query_dataset,
            self.tokenizer,
            self.config,
            self.model,
            all_columns=self.per_example_loss is not None,
            prefix=self.cache.document_prefix,  # text queries begin as the documents do
        )
        encoded = self.encode(padded_batches(source, self.tokenizer, self.batch_size))
        found = self.scan(encoded, top=False, dense=True, disable_progress=self.disable_progress)
        assert found.dense is not None
        return found.dense

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
        found = self.scan(self.encode([batch]), k, top=True, bottom=True, dense=all_scores)
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
    """An ``InfluenceResult`` with the documents' text read from the cache."""
    docs = cache.documents(best.indices[0].tolist() + worst.indices[0].tolist())

    def make(scores: torch.Tensor, indices: torch.Tensor) -> list[InfluentialDocument]:
        out = []
        for s, i in zip(scores.tolist(), indices.tolist()):
            d = docs.get(i, {})
            out.append(InfluentialDocument(index=i, score=s, text=d.get("text"), id=d.get("id")))
        return out

    # "harmful" means score < 0 (DESIGN.md §2): the bottom of the list is not harmful when every
    # score is positive, so the harmful list holds only the negative ones (maybe none)
    negative = worst.scores[0] < 0
    harmful = make(worst.scores[0][negative], worst.indices[0][negative])
    return InfluenceResult(prompt, completion, make(best.scores[0], best.indices[0]), harmful)


def encode_query(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | list[dict[str, str]],
    completion: str | None,
    *,
    documents: GradientCache | None = None,
    **generate_kwargs: Any,
) -> tuple[str, str, dict[str, torch.Tensor]]:
    """(prompt text, completion text, a one-example batch whose loss covers the completion only).

    The query begins the way the cached ``documents`` begin (``GradientCache.document_prefix``):
    a string prompt starts with exactly the special token ids every document starts with, in place
    of those the tokenizer adds itself, so documents that begin with ``<eos>`` give a query that
    begins with ``<eos>``, and a tokenizer that adds ``<bos>`` does not put it in twice. A chat
    prompt is tokenized as its template renders it (the template holds its own special tokens);
    the documents' prefix goes in front only when the rendered prompt begins with no special token.
    Without a recorded prefix (older caches) the prompt is tokenized as the tokenizer does.
    """
    prompt_text = render_prompt(tokenizer, prompt)
    prefix = documents.document_prefix if documents is not None else None
    if isinstance(prompt, list):
        # a rendered chat template already holds its special tokens
        prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        if (
            prefix
            and prompt_ids[: len(prefix)] != prefix
            and not leading_special(prompt_ids, special_ids(tokenizer))
        ):
            prompt_ids = list(prefix) + prompt_ids
    else:
        if documents is not None and documents.chat_documents:
            logger.warning(
                "The cached documents begin the way the chat template begins a conversation; pass the "
                "prompt as a list of messages so that the query is encoded like them."
            )
        prompt_ids = encode_text(tokenizer, prompt_text, prefix)
    if completion is None:
        completion_ids = generate(model, tokenizer, prompt_ids, **generate_kwargs)
    else:
        if not isinstance(completion, str) or not completion:
            raise ValueError("completion must be a non-empty string (or None to generate one)")
        completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if not completion_ids:
        raise ValueError(
            "the completion is empty (the model generated nothing); pass completion=... explicitly"
        )
    text = tokenizer.decode(completion_ids, skip_special_tokens=True) if completion is None else completion
    example = {
        "input_ids": prompt_ids + completion_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    }
    return prompt_text, text, collate([example], pad_token_id(tokenizer), padding_side(tokenizer))


def generate(model: nn.Module, tokenizer: Any, prompt_ids: list[int], **generate_kwargs: Any) -> list[int]:
    """Greedy (by default) completion token ids of a prompt, without the EOS token."""
    model = unwrap_model(model)
    device = next(model.parameters()).device
    kwargs = {"max_new_tokens": 32, "do_sample": False, "pad_token_id": pad_token_id(tokenizer)}
    kwargs.update(generate_kwargs)
    ids = torch.tensor([prompt_ids], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    finally:
        model.train(was_training)
    new = out[0, len(prompt_ids) :].tolist()
    # generation stops at any of these; the stop token ends the answer but is not part of it
    stops = set(_as_list(kwargs.get("eos_token_id"))) | set(
        _as_list(getattr(tokenizer, "eos_token_id", None))
    )
    stops |= set(_as_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None)))
    for pos, token in enumerate(new):
        if token in stops:
            return new[:pos]
    return new


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


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
        total: torch.Tensor | None = None
        for weight, attributor in self._each():
            scores = weight * attributor.attribute(query_dataset)
            total = scores if total is None else total + scores
        assert total is not None
        return total

    def find_influential(
        self,
        prompt: str | list[dict[str, str]],
        k: int = 10,
        completion: str | None = None,
        **generate_kwargs: Any,
    ) -> InfluenceResult:
        check_k(k, self.caches[-1].num_rows)
        # the completion comes from the current (final) model; its gradient is taken at every checkpoint
        prompt_text, text, batch = encode_query(
            self.model, self.tokenizer, prompt, completion, documents=self.caches[-1], **generate_kwargs
        )
        if len(self.caches) == 1:  # one read of the cache, streaming lists
            for weight, attributor in self._each():  # the query gradient at the cache's own weights
                found = attributor.scan(attributor.encode([batch]), k, weight, top=True, bottom=True)
            assert found.top is not None and found.bottom is not None
            return make_result(self.caches[0], prompt_text, text, found.top, found.bottom)
        total: torch.Tensor | None = None
        for weight, attributor in self._each():
            dense = attributor.scan(attributor.encode([batch]), None, weight, top=False, dense=True).dense
            assert dense is not None
            scores = dense
            total = scores if total is None else total + scores
        assert total is not None
        present = torch.zeros(total.shape[1], dtype=torch.bool)
        present[self.caches[-1].indices] = True  # skipped examples are not candidates
        best = _dense_topk(total, present, k, largest=True)
        worst = _dense_topk(total, present, k, largest=False)
        return make_result(self.caches[-1], prompt_text, text, best, worst)


def _dense_topk(scores: torch.Tensor, present: torch.Tensor, k: int, largest: bool) -> TopK:
    masked = scores.masked_fill(~present, float("-inf") if largest else float("inf"))
    values, indices = masked.topk(k, dim=1, largest=largest, sorted=True)
    return TopK(values, indices)


def render_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> str:
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            raise ValueError(
                "a chat prompt must be a non-empty list of {'role': ..., 'content': ...} messages"
            )
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; pass the prompt as a string")
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: pass the text whose completion you want to explain")
    return prompt


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
    **generate_kwargs: Any,
) -> InfluenceResult:
    """One call from a prompt to its influential training documents (cache: object, path or Hub id).

    ``per_example_loss``: the loss the cache was built with, if it was built with one.
    """
    attributor = Attributor(
        model,
        tokenizer,
        cache,
        preconditioner=preconditioner,
        damping=damping,
        check_model=check_model,
        per_example_loss=per_example_loss,
    )
    return attributor.find_influential(prompt, k=k, completion=completion, **generate_kwargs)


class AttributionLookups:
    """``attribute`` and ``find_influential`` for the objects that hold a model and its caches
    (``AttributionTrainer``, ``GraSSCallback``): they only say how to make the attributor."""

    def _attributor(self, **kwargs: Any) -> Attributor | MultiCheckpointAttributor:
        raise NotImplementedError

    def attribute(self, query_dataset: Any, **kwargs: Any) -> torch.Tensor:
        """Influence scores ``[n_query, n_train]`` of every query on every training example.

        ``kwargs``: ``preconditioner``, ``damping``, ``cosine``, ``check_model`` overrides.
        """
        return self._attributor(**kwargs).attribute(query_dataset)

    def find_influential(
        self,
        prompt: str | list[dict[str, str]],
        k: int = 10,
        completion: str | None = None,
        **generate_kwargs: Any,
    ) -> InfluenceResult:
        """The top-k helpful and harmful training documents behind the model's completion of ``prompt``."""
        return self._attributor().find_influential(prompt, k=k, completion=completion, **generate_kwargs)

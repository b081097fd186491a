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

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hf_grass.attribution import example_source
from hf_grass.cache.reader import GradientCache, open_cache
from hf_grass.capture.engine import GradientComputer, unwrap_model
from hf_grass.capture.fingerprint import weights_fingerprint
from hf_grass.checkpoints import checkpoint_weights
from hf_grass.config import GraSSConfig
from hf_grass.data import IGNORE_INDEX, collate, pad_token_id, padded_batches, padding_side
from hf_grass.precondition.preconditioner import Preconditioner
from hf_grass.results import InfluenceResult, InfluentialDocument
from hf_grass.scoring import SEARCHES, ScanResult, TopK, check_k, dense_scores, lookup, query_gradients


class Attributor:
    """Scores queries against one gradient cache with one model.

    Args:
        model: the model whose gradients the cache holds (checked against its fingerprint).
        tokenizer: tokenizes prompts and decodes completions.
        cache: a ``GradientCache``, a local path or a Hub repo id.
        preconditioner, damping, cosine: override the cache's config for scoring.
        check_model: refuse a model whose weights differ from the one that built the cache.
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
        check_model: bool = True,
        batch_size: int | None = None,
        disable_progress: bool = True,
        search: str = "auto",
        candidates: int | None = None,
    ):
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
        self.search, self.candidates = search, candidates
        self.cache = open_cache(cache)
        self.model = model
        self.tokenizer = tokenizer
        cfg = self.cache.config
        self.config: GraSSConfig = cfg
        self.cosine = cfg.cosine if cosine is None else cosine
        self.batch_size = batch_size or cfg.batch_size or 8
        self.disable_progress = disable_progress
        names = self.cache.module_names
        # rebuild the exact compressors of the cache (same config, same module names -> same seeds)
        self.computer = GradientComputer(model, cfg.replace(target_modules=names, exclude_modules=None))
        self._check_model(check_model)
        self.preconditioner = Preconditioner.fit(self.cache, preconditioner, damping)
        self.basis = self.cache.eigenbasis()  # K-FAC caches: the whitening of their train rows

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
        return query_gradients(self.computer, batches, self.preconditioner, self.basis)

    def attribute(self, query_dataset: Any, k: int | None = None) -> torch.Tensor | ScanResult:
        """Scores ``[n_query, n_train]`` (columns = training dataset indices), or with ``k`` only each
        query's ``k`` most helpful and most harmful documents (a ``ScanResult`` with ``top`` and
        ``bottom``), without the dense matrix: streamed over blocks of rows with matrix-matrix
        products (memory independent of the cache size), or two-stage with an index."""
        source = example_source(query_dataset, self.tokenizer, self.config, self.model)
        queries = self.query_vectors(padded_batches(source, self.tokenizer, self.batch_size))
        if k is None:
            return dense_scores(self.cache, queries, cosine=self.cosine, disable_progress=self.disable_progress)
        texts = None
        if "bm25" in self.search:
            texts = [source.example(i).get("text") or "" for i in range(len(source))]
        return lookup(
            self.cache, queries, k, search=self.search, top=True, bottom=True, cosine=self.cosine,
            query_texts=texts, candidates=self.candidates, disable_progress=self.disable_progress,
        )  # fmt: skip

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
            self.model, self.tokenizer, prompt, completion, **generate_kwargs
        )
        query = self.query_vectors([batch])
        found = lookup(
            self.cache, query, k, search=self.search, top=True, bottom=True, dense=all_scores,
            cosine=self.cosine, query_texts=[prompt_text + text], candidates=self.candidates,
        )  # fmt: skip
        assert found.top is not None and found.bottom is not None
        result = make_result(self.cache, prompt_text, text, found.top, found.bottom)
        if found.dense is not None:  # columns are dataset indices; skipped examples have no row
            result.scores = found.dense[0, self.cache.indices]
        return result


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

    return InfluenceResult(
        prompt, completion, make(best.scores[0], best.indices[0]), make(worst.scores[0], worst.indices[0])
    )


def encode_query(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | list[dict[str, str]],
    completion: str | None,
    **generate_kwargs: Any,
) -> tuple[str, str, dict[str, torch.Tensor]]:
    """(prompt text, completion text, a one-example batch whose loss covers the completion only)."""
    prompt_text = render_prompt(tokenizer, prompt)
    # a rendered chat template already holds its special tokens
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=not isinstance(prompt, list))["input_ids"])
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
    """Scores summed over several caches, each with the query gradient at its own weights.

    A cache whose weight fingerprint differs from the current model's must record the checkpoint
    directory it was built from (``GraSSCallback(every_save=True)`` does); those weights are loaded
    for its query gradients and the current weights restored afterwards. With one cache this is a
    plain ``Attributor`` (streaming top-k).
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any, caches: list[GradientCache | str | os.PathLike], **kwargs: Any
    ):
        if not caches:
            raise ValueError("no caches to attribute with")
        self.model, self.tokenizer, self.kwargs = model, tokenizer, kwargs
        self.caches = [open_cache(c) for c in caches]

    def _each(self) -> Iterator[Attributor]:
        for cache in self.caches:
            with checkpoint_weights(self.model, cache):
                yield Attributor(self.model, self.tokenizer, cache, **self.kwargs)

    def attribute(self, query_dataset: Any, k: int | None = None) -> torch.Tensor | ScanResult:
        if k is not None and len(self.caches) == 1:  # streaming (or two-stage) top-k
            return next(self._each()).attribute(query_dataset, k=k)
        total: torch.Tensor | None = None
        for attributor in self._each():
            scores = attributor.attribute(query_dataset)
            assert isinstance(scores, torch.Tensor)
            total = scores if total is None else total + scores
        assert total is not None
        if k is None:
            return total
        # summed over checkpoints: the lists need every summed score, so they come from the dense sum
        check_k(k, self.caches[-1].num_rows)
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
        **generate_kwargs: Any,
    ) -> InfluenceResult:
        if len(self.caches) == 1:
            attributor = next(self._each())
            return attributor.find_influential(prompt, k=k, completion=completion, **generate_kwargs)
        check_k(k, self.caches[-1].num_rows)
        # the completion comes from the current (final) model; its gradient is taken at every checkpoint
        prompt_text, text, batch = encode_query(
            self.model, self.tokenizer, prompt, completion, **generate_kwargs
        )
        total: torch.Tensor | None = None
        for attributor in self._each():
            scores = dense_scores(
                attributor.cache, attributor.query_vectors([batch]), cosine=attributor.cosine
            )
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
    search: str = "auto",
    **generate_kwargs: Any,
) -> InfluenceResult:
    """One call from a prompt to its influential training documents (cache: object, path or Hub id).

    ``search``: ``"auto"`` uses the cache's index when it has one (``"exact"`` forces the scan;
    ``"bm25"``, ``"index+bm25"`` add lexical candidates); see ``Attributor``.
    """
    attributor = Attributor(
        model, tokenizer, cache, preconditioner=preconditioner, damping=damping, check_model=check_model,
        search=search,
    )  # fmt: skip
    return attributor.find_influential(prompt, k=k, completion=completion, **generate_kwargs)


class AttributionLookups:
    """``attribute`` and ``find_influential`` for the objects that hold a model and its caches
    (``AttributionTrainer``, ``GraSSCallback``): they only say how to make the attributor."""

    def _attributor(self, **kwargs: Any) -> Attributor | MultiCheckpointAttributor:
        raise NotImplementedError

    def attribute(self, query_dataset: Any, k: int | None = None, **kwargs: Any) -> torch.Tensor | ScanResult:
        """Influence scores ``[n_query, n_train]`` of every query on every training example, or with
        ``k`` each query's top-k helpful and harmful documents (``ScanResult``), without the dense matrix.

        ``kwargs``: ``preconditioner``, ``damping``, ``cosine``, ``check_model``, ``search`` overrides.
        """
        attributor = self._attributor(**kwargs)
        return attributor.attribute(query_dataset) if k is None else attributor.attribute(query_dataset, k=k)

    def find_influential(
        self,
        prompt: str | list[dict[str, str]],
        k: int = 10,
        completion: str | None = None,
        **generate_kwargs: Any,
    ) -> InfluenceResult:
        """The top-k helpful and harmful training documents behind the model's completion of ``prompt``."""
        return self._attributor().find_influential(prompt, k=k, completion=completion, **generate_kwargs)

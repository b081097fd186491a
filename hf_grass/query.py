"""`find_influential`: from a prompt to the training documents behind the model's answer.

The completion is generated (greedy by default) unless given; its gradient, with the loss on the
completion tokens only, is compressed and preconditioned exactly like the train rows were, then
scored against the cache in one read. Positive scores are helpful documents (proponents), negative
harmful.

Path of a query: ``find_influential`` -> ``Attributor.find_influential`` -> ``encode_query`` (prompt
and completion tokens, loss on the completion) -> ``Attributor.query_vectors``
(``scoring.query_vectors``: hooks, factor-space gradient, preconditioner, final projection) ->
``Attributor.lookup`` -> ``scoring.lookup`` (the cache's index when it has one: candidates, then their exact scores; else
``scoring.scan``, one pass over the memory-mapped shards: top-k and bottom-k) -> ``make_result``
(the documents' text from the shards' JSON lines).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from torch import nn

from hf_grass.attribution import Batching, BatchRunner, example_source
from hf_grass.cache.reader import GradientCache, open_cache
from hf_grass.capture.engine import GradientComputer, unwrap_model
from hf_grass.capture.fingerprint import weights_fingerprint
from hf_grass.capture.loss import PerExampleLoss, loss_name
from hf_grass.capture.targets import cache_targets
from hf_grass.data import IGNORE_INDEX, ExampleSource, padded_batches
from hf_grass.distributed import Distributed, current_distributed
from hf_grass.precondition import preconditioner_class
from hf_grass.prompts import encode_query, generate, render_prompt  # noqa: F401 - public names
from hf_grass.results import (
    InfluenceResult,
    InfluentialDocument,
    TokenScores,
    format_score,
    ranked_result,
    snippet,
)
from hf_grass.scoring import (
    Normalisation,
    QueryVectors,
    ScanResult,
    ScoringOptions,
    TopK,
    cache_eigenbasis,
    check_k,
    fitted_preconditioner,
    lookup,
    query_vectors,
    scan,
)
from hf_grass.scoring.during_pass import PassScores, score_during_pass
from hf_grass.scoring.refine import Refiner
from hf_grass.scoring.tokens import QueryTokens, check_factorised, document_tokens, query_tokens
from hf_grass.seeding import make_generator, sample_without_replacement

logger = logging.getLogger("transformers.hf_grass")


class Attributor:
    """Scores queries against one gradient cache with one model.

    Args:
        model: the model whose gradients the cache holds (checked against its fingerprint).
        tokenizer: tokenizes prompts and decodes completions.
        cache: a ``GradientCache``, a local path or a Hub repo id.
        options: ``ScoringOptions`` (preconditioner, damping, cosine, cosine_norms, search, candidates,
            batch_size, disable_progress); ``option_fields`` change single fields of it, e.g.
            ``Attributor(model, tok, cache, damping=0.1, search="exact")``. ``None`` fields follow
            the cache's configuration.
        check_model: refuse a model whose weights differ from the one that built the cache.
        per_example_loss: the ``fn(model, batch) -> [B]`` loss the cache was built with, if it was
            built with one (see ``GradientComputer``); queries take their gradient of the same loss.
        train_dataset: the dataset the cache was built from, for ``refine_steps``: its curvature
            re-runs a sample of it (default: the documents' text the cache stores).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        cache: GradientCache | str | os.PathLike,
        options: ScoringOptions | None = None,
        *,
        check_model: bool = True,
        per_example_loss: PerExampleLoss | None = None,
        train_dataset: Any = None,
        **option_fields: Any,
    ):
        self.options = (options or ScoringOptions()).replace(**option_fields)
        self.cache = open_cache(cache)
        self.per_example_loss = per_example_loss
        _check_loss(self.cache, per_example_loss)
        self.model = model
        self.tokenizer = tokenizer
        cfg = self.config = self.cache.config
        opts = self.options
        self.cosine = cfg.cosine if opts.cosine is None else opts.cosine
        # unit normalisation by the norms the pass stored with every row, in one geometry
        self.normalize: str | None = (opts.cosine_norms or cfg.cosine_norms) if self.cosine else None
        self.batch_size = opts.batch_size or cfg.batch_size or 8
        self.disable_progress = opts.disable_progress
        # rebuild the exact compressors of the cache (same config, same module names -> same seeds)
        self.computer = GradientComputer(
            model, cfg.replace(target_modules=self.cache.module_names, exclude_modules=None),
            targets=cache_targets(unwrap_model(model), self.cache.modules), per_example_loss=per_example_loss,
        )  # fmt: skip
        self._check_model(check_model)
        self.basis = cache_eigenbasis(self.cache)  # K-FAC caches: the whitening of their train rows
        chosen = preconditioner_class(opts.preconditioner or cfg.preconditioner)
        if self.basis is not None and chosen.acts_on == "rows":
            # unbiased, but the query side then carries the whitening's inverse: measured far noisier
            # than gradient similarity on raw rows (docs/howto/choosing.md), so refuse, saying how
            raise ValueError(
                f"preconditioner={chosen.name!r} acts on raw rows, but {self.cache.path} stores rows whitened "
                f"for {cfg.preconditioner!r}: build a cache with GraSSConfig(preconditioner={chosen.name!r}) "
                f"for it, or query this one with {cfg.preconditioner!r} / 'kfac'."
            )
        self.preconditioner = fitted_preconditioner(self.cache, opts.preconditioner, opts.damping, self.basis)
        if self.basis is not None:
            self.basis.attach(self.computer.compressors)  # masks in the eigenbasis: their maps
        self.refiner = self._refiner(train_dataset) if opts.refine_steps > 0 else None

    def _refiner(self, train_dataset: Any) -> Refiner:
        """The refined iHVP of ``refine_steps`` (``scoring.refine``), its curvature averaged over a
        seeded sample of ``refine_examples`` of the cache's documents: rows of ``train_dataset``, or
        the text the cache stores."""
        opts = self.options
        if self.basis is None or self.preconditioner.acts_on != "factors":
            raise ValueError(
                f"refine_steps refines a factor-space preconditioner ('ekfac' or 'kfac'), but this cache is queried "
                f"with {self.preconditioner.name!r}: build it with GraSSConfig(preconditioner='ekfac') (the default)"
            )
        indices = self.cache.indices
        n = min(opts.refine_examples, len(indices))
        chosen = indices[sample_without_replacement(len(indices), n, make_generator(self.config.seed, "", "refine"))]
        if train_dataset is None and self.per_example_loss is not None:
            raise ValueError(
                "refine_steps re-runs a sample of the training documents, which a per_example_loss reads "
                "from other columns than the cache's text: pass train_dataset=... (the dataset the cache was built from)"
            )
        docs = self.cache.documents(chosen.tolist())
        texts = [docs[i].get("text") if i in docs else None for i in chosen.tolist()]
        source = self._rerun_source(chosen.tolist(), texts, train_dataset, "sampled documents", "refine_steps")
        batches = list(padded_batches(source, self.tokenizer, self.batch_size))
        return Refiner(self.computer, self.preconditioner, self.basis, batches, opts.refine_steps,
                       opts.refine_curvature)  # fmt: skip

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
        return query_vectors(self.computer, batches, self.preconditioner, self.basis, self.refiner)

    def normalisation(self, queries: QueryVectors) -> Normalisation | None:
        """The unit normalisation of these queries' scores, when ``cosine`` asks for it."""
        return Normalisation(self.normalize, queries.norms) if self.normalize else None

    def lookup(
        self, queries: QueryVectors, k: int, *, weight: float = 1.0, texts: list[str] | None = None
    ) -> ScanResult:
        """Each query's ``k`` highest and ``k`` lowest scores with this attributor's search and
        normalisation (``scoring.lookup``: the exact scan, or an index's candidates re-scored exactly);
        ``weight`` scales the scores (checkpoint weights), ``texts`` are the queries' text (BM25)."""
        return lookup(self.cache, weight * queries.rows, k, top=True, bottom=True, search=self.options.lookup,
                      norms=self.normalisation(queries), texts=texts)  # fmt: skip

    def scores(self, queries: QueryVectors, weight: float = 1.0) -> torch.Tensor:
        """Every score ``[n_query, num_examples]`` (columns = dataset indices; skipped examples score
        0), from one read of the cache."""
        found = scan(self.cache, weight * queries.rows, top=False, dense=True, norms=self.normalisation(queries),
                     progress=not self.disable_progress)  # fmt: skip
        assert found.dense is not None
        return found.dense

    def attribute(self, query_dataset: Any) -> torch.Tensor:
        """Scores ``[n_query, n_train]`` of every query on every training example (columns = training
        dataset indices), from one read of the cache."""
        return self.scores(self._encode_dataset(query_dataset)[1])

    def attribute_top_k(self, query_dataset: Any, k: int = 10) -> ScanResult:
        """Each query's ``k`` highest-scoring (``top``) and ``k`` lowest-scoring (``bottom``)
        documents, without the dense matrix: streamed over blocks of rows with matrix-matrix products
        (memory independent of the cache size), or two-stage with an index. The lists are not
        filtered by sign (``results.ranked_result`` keeps helpful > 0 and harmful < 0)."""
        source, queries = self._encode_dataset(query_dataset)
        texts = None
        if "bm25" in self.options.search:
            texts = [source.example(i).get("text") or "" for i in range(len(source))]
        return self.lookup(queries, k, texts=texts)

    def _encode_dataset(self, query_dataset: Any) -> tuple[ExampleSource, QueryVectors]:
        """The queries of a dataset as examples, and their query vectors."""
        source = example_source(
            query_dataset,
            self.tokenizer,
            self.config,
            self.model,
            all_columns=self.per_example_loss is not None,
            prefix=self.cache.document_store.prefix,  # text queries begin as the documents do
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
        """Each query's ``k`` highest- and lowest-scoring examples of ``dataset``, scored while an
        attribution pass streams through it: nothing is stored, so ``dataset`` may be far larger
        than any cache (``hf_grass.scoring.during_pass``).

        This attributor's cache is the reference: its compressors, eigenbasis and preconditioner
        fix the scores, which equal those of caching ``dataset`` with the same configuration and
        querying it. ``select``: also choose the ``select`` examples with the highest mean score
        over the queries (data selection). Indices are positions in ``dataset``. Under torchrun /
        Accelerate each process scores its share and every process returns the merged lists.
        """
        _, queries = self._encode_dataset(query_dataset)
        source = example_source(
            dataset, self.tokenizer, self.config, self.model, text_column,
            all_columns=self.per_example_loss is not None,
        )  # fmt: skip
        batching = Batching.for_tokenizer(self.tokenizer, self.batch_size, self.disable_progress)
        runner = BatchRunner(self.computer, source, batching, dist or current_distributed())
        return score_during_pass(runner, queries.rows, k, basis=self.basis, norms=self.normalisation(queries),
                                 select=select, bottom=bottom)  # fmt: skip

    def find_influential(
        self,
        prompt: str | list[dict[str, str]],
        k: int = 10,
        completion: str | None = None,
        all_scores: bool = False,
        *,
        tokens: bool = False,
        train_dataset: Any = None,
        **generate_kwargs: Any,
    ) -> InfluenceResult:
        """The ``k`` most helpful (score > 0) and most harmful (score < 0) training documents for the
        model's completion of ``prompt``.

        ``prompt`` may be a chat ``messages`` list, rendered with the tokenizer's chat template.
        Without ``completion`` the model generates one (greedy, 32 new tokens unless
        ``generate_kwargs`` say otherwise: they go to ``model.generate``, which refuses the ones it
        does not know). With ``all_scores`` the result also holds every cached row's score (e.g. to
        plot them), from the same query gradient.

        ``tokens``: also split each listed document's score over its tokens (``token_scores``) and
        over the query's (``query_token_scores``), by re-running those documents and the query
        (``hf_grass.scoring.tokens``; nothing is added to the cache). The documents are re-run from
        ``train_dataset`` (the dataset the cache was built from) when given, else from the text the
        cache stores, tokenized as the pass tokenizes text.
        """
        check_k(k, self.cache.num_rows)
        if completion is not None and generate_kwargs:
            raise ValueError(
                f"{sorted(generate_kwargs)} would go to model.generate, but a completion was given, so "
                "nothing is generated: leave them out, or leave out the completion"
            )
        if tokens:
            check_factorised(self.computer)  # before generating anything
            if self.refiner is not None:
                raise ValueError(
                    "token scores split the EK-FAC query over its tokens, which a refined iHVP (refine_steps) "
                    "does not; query with refine_steps=0 for token scores"
                )
        prompt_text, text, batch = encode_query(
            self.model, self.tokenizer, prompt, completion, documents=self.cache, **generate_kwargs
        )
        return self.result_for(prompt_text, text, batch, k, all_scores=all_scores, tokens=tokens,
                               train_dataset=train_dataset)  # fmt: skip

    def result_for(
        self,
        prompt: str,
        completion: str,
        batch: dict[str, torch.Tensor],
        k: int,
        *,
        weight: float = 1.0,
        all_scores: bool = False,
        tokens: bool = False,
        train_dataset: Any = None,
    ) -> InfluenceResult:
        """``find_influential`` of an encoded query (``encode_query``'s prompt, completion and batch),
        scores scaled by ``weight`` (a checkpoint's weight)."""
        query = query_tokens(self.computer, batch, self.preconditioner, self.basis) if tokens else None
        queries = query.vectors if query is not None else self.query_vectors([batch])
        found = self.lookup(queries, k, weight=weight, texts=[prompt + completion])
        assert found.top is not None and found.bottom is not None
        result = make_result(self.cache, prompt, completion, found.top, found.bottom)
        if all_scores:  # columns are dataset indices; skipped examples have no row
            result.scores = self.scores(queries, weight)[0, self.cache.indices]
        if query is not None:
            self._add_token_scores(result, query, batch, weight, train_dataset)
        return result

    def _add_token_scores(
        self, result: InfluenceResult, query: QueryTokens, batch: dict[str, torch.Tensor], weight: float,
        train_dataset: Any,
    ) -> None:  # fmt: skip
        """Re-run the listed documents and split their scores over both sides' tokens."""
        docs = result.documents + result.harmful
        if not docs:
            return
        source = self._document_source(docs, train_dataset)
        batching = Batching.for_tokenizer(self.tokenizer, self.batch_size, disable_progress=True)
        found = document_tokens(self.computer, query, source, self.preconditioner, self.basis, batching=batching,
                                normalisation=self.normalisation(query.vectors), weight=weight)  # fmt: skip
        query_ids = batch["input_ids"][0].tolist()
        labels = batch["labels"][0].tolist()
        start = next((t for t, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        query_pieces = token_pieces(self.tokenizer, query_ids)
        for j, doc in enumerate(docs):
            ids, scores, score, query_scores = found.ids[j], found.documents[j], found.scores[j], found.query[j]
            if ids is None or scores is None or score is None or query_scores is None:
                logger.warning("Document %d has no supervised tokens when re-run: no token scores for it.", doc.index)
                continue
            doc.token_scores = TokenScores(token_pieces(self.tokenizer, ids), ids, scores.tolist(), score)
            doc.query_token_scores = TokenScores(query_pieces, query_ids, query_scores.tolist(), score, start)
        _check_reruns(docs)

    def _document_source(self, docs: list[InfluentialDocument], train_dataset: Any) -> ExampleSource:
        """The listed documents as the pass saw them (``_rerun_source``)."""
        return self._rerun_source([d.index for d in docs], [d.text for d in docs], train_dataset,
                                  "listed documents", "token scores")  # fmt: skip

    def _rerun_source(
        self, indices: list[int], texts: list[str | None], train_dataset: Any, what: str, purpose: str
    ) -> ExampleSource:
        """Cached documents (dataset ``indices``, the ``texts`` the cache holds) as the pass saw them:
        rows of ``train_dataset`` (checked against the cache's text), else the cache's text tokenized
        as the pass tokenizes text; ``what`` / ``purpose`` name them in the error without either."""
        if train_dataset is not None:
            rows = [train_dataset[i] for i in indices]
        elif any(t is None for t in texts):
            raise ValueError(
                f"the cache holds no text for some {what}, so they cannot be re-run for {purpose}: "
                "pass train_dataset=... (the dataset the cache was built from)"
            )
        else:
            rows = [{"text": t} for t in texts]
        source = example_source(rows, self.tokenizer, self.config, self.model,
                                all_columns=self.per_example_loss is not None)  # fmt: skip
        if train_dataset is not None:
            for j, (index, cached) in enumerate(zip(indices, texts)):
                text = source.example(j).get("text")
                if cached is not None and text is not None and text != cached:
                    raise ValueError(
                        f"train_dataset[{index}] is not the document the cache holds at index {index} "
                        f"({snippet(text, 40)!r} vs {snippet(cached, 40)!r}): pass the dataset the cache was built from"
                    )
        return source


def _check_reruns(docs: list[InfluentialDocument]) -> None:
    """Warn when a re-run document's score is far from its cached one: the storage dtype's rounding
    is small (int8: ~1% of the largest scores), so a larger gap means the re-run saw other tokens than
    the pass did (e.g. text re-tokenized differently, or labels the text does not carry)."""
    scale = max(abs(d.score) for d in docs)
    for doc in docs:
        if doc.token_scores is not None and abs(doc.token_scores.score - doc.score) > 0.05 * scale:
            logger.warning(
                "Document %d scores %s when re-run but %s in the cache: the re-run's tokens differ from those "
                "cached; pass train_dataset=... (the dataset the cache was built from) for exact token scores.",
                doc.index, format_score(doc.token_scores.score), format_score(doc.score),
            )  # fmt: skip


def token_pieces(tokenizer: Any, ids: list[int], context: int = 8) -> list[str]:
    """Each token as the text it adds to the decoded sequence (spaces and joined words right for
    any tokenizer), decoded with up to ``context`` tokens before it; special tokens included."""
    pieces = []
    for t, token in enumerate(ids):
        before = ids[max(0, t - context) : t]
        head = tokenizer.decode(before, clean_up_tokenization_spaces=False) if before else ""
        full = tokenizer.decode(before + [token], clean_up_tokenization_spaces=False)
        pieces.append(full[len(head) :] if full.startswith(head) else tokenizer.decode([token]))
    return pieces


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
    tokens: bool = False,
    train_dataset: Any = None,
    **kwargs: Any,
) -> InfluenceResult:
    """One call from a prompt to its influential training documents (cache: object, path or Hub id).

    ``tokens`` / ``train_dataset``: token scores, as in ``Attributor.find_influential``; the dataset
    also serves ``refine_steps`` (``Attributor``).
    ``kwargs``: the ``Attributor``'s (``check_model``, ``per_example_loss``, and the ``ScoringOptions``
    fields: ``preconditioner``, ``damping``, ``cosine``, ``search``, ...); the others go to
    ``model.generate`` when the completion is generated (``max_new_tokens=``, ...).
    """
    attributor_keys = {"check_model", "per_example_loss"} | {f.name for f in dataclasses.fields(ScoringOptions)}
    mine = {key: kwargs.pop(key) for key in list(kwargs) if key in attributor_keys}
    attributor = Attributor(model, tokenizer, cache, train_dataset=train_dataset, **mine)
    return attributor.find_influential(prompt, k=k, completion=completion, tokens=tokens,
                                       train_dataset=train_dataset, **kwargs)  # fmt: skip

"""The methods of the real-LLM suite: a registry name -> how to score, and the code that scores.

Add a configuration in one line of ``METHODS``:

- ``Method("grass", build={...}, query={...})``: hf_grass through its public path, the cache built
  with ``GraSSConfig(**build)`` (methods with equal ``build`` share one cache) and queried with
  ``Attributor(model, tokenizer, cache, **query).find_influential(prompt, completion=...)``;
- ``Method("bm25", answer=...)``: BM25 (``bm25s``) of the question (with ``answer``, question +
  answer) against the documents' text;
- ``Method("kronfluence", damping=..., options={...})``: kronfluence's uncompressed EK-FAC over
  every Linear module but ``lm_head`` (``options``: ``KronfluenceSettings`` fields, e.g.
  ``{"empirical_fisher": True}``; methods with equal options share one factor fit).
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import _bench_dev as bd
from benchmarks._llm_model import batch_of, check_query_encoding
from hf_grass.config import GraSSConfig
from hf_grass.query import Attributor


@dataclass(frozen=True)
class Method:
    kind: str  # grass | bm25 | kronfluence
    build: dict[str, Any] = field(default_factory=dict)
    query: dict[str, Any] = field(default_factory=dict)
    answer: bool = False
    damping: float | None = 1e-8
    options: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, Method] = {
    "default": Method("grass"),
    "per-module": Method("grass", build={"proj_dim": 1024}),
    "damping-0.1": Method("grass", query={"damping": 0.1}),
    # larger query dampings: where the effective dimension (Hu et al. 2026) would put it on SmolLM2
    "damping-0.3": Method("grass", query={"damping": 0.3}),
    "damping-1": Method("grass", query={"damping": 1.0}),
    "damping-10": Method("grass", query={"damping": 10.0}),
    "cosine": Method("grass", query={"cosine": True}),
    "identity": Method("grass", build={"preconditioner": "identity"}),
    # the default leaves an LLM's lm_head out (capture.targets.WIDE_OUTPUT): naming it puts it back
    "with-lm_head": Method("grass", build={"target_modules": r".*_proj|lm_head"}),
    "random-eigen-masks": Method("grass", build={"mask_basis": "eigen"}),
    "factor_dim-64": Method("grass", build={"factor_dim": 64}),
    "factor_dim-256": Method("grass", build={"factor_dim": 256}),
    # the per-module layout at the default's budget (SmolLM2: 210 modules x 144 = 30,240 numbers)
    "per-module-144": Method("grass", build={"proj_dim": 144}),
    # hf_grass 0.2.0's default: random eigen masks, lm_head included
    "v0.2-default": Method("grass", build={"mask_basis": "eigen", "target_modules": r".*_proj|lm_head"}),
    # the refined iHVP (hf_grass.scoring.refine): conjugate gradients on the default cache, query time only
    "refined-gn-4": Method("grass", query={"refine_steps": 4, "refine_examples": 8}),
    "refined-empirical-4": Method("grass", query={"refine_steps": 4, "refine_curvature": "empirical",
                                                  "refine_examples": 100}),
    "refined-empirical-16": Method("grass", query={"refine_steps": 16, "refine_curvature": "empirical",
                                                   "refine_examples": 100}),
    "bm25-q": Method("bm25"),
    "bm25-qa": Method("bm25", answer=True),
    "kronfluence": Method("kronfluence", damping=1e-8),  # its default: true Fisher, damping 1e-8
    "kronfluence-d0.1": Method("kronfluence", damping=None),  # 0.1 x each module's mean eigenvalue
}


# the package each kind of method needs beyond hf_grass's own dependencies (kronfluence: benchmarks only)
PACKAGES = {"kronfluence": "kronfluence"}


def missing_packages(names: list[str]) -> dict[str, str]:
    """The named methods whose package is not installed, each with that package."""
    out = {}
    for name in names:
        package = PACKAGES.get(METHODS[name].kind) if name in METHODS else None
        if package is not None and importlib.util.find_spec(package) is None:
            out[name] = package
    return out


@dataclass
class Corpus:
    rows: list[dict[str, Any]]  # encoded documents: input_ids, text
    texts: list[str]  # the documents' raw text (BM25)
    prompts: list[str]
    completions: list[str]
    queries: list[dict[str, list[int]]]  # encoded queries: input_ids, labels (completion only)


@dataclass
class Ranking:
    scores: torch.Tensor  # [n_query, n_docs] float64, higher = more helpful
    helpful: list[int | None]  # each query's top helpful document (score > 0), if any
    harmful: list[int | None]  # each query's top harmful document (score < 0), if any
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Context:
    model: Any
    tokenizer: Any
    corpus: Corpus
    build_cache: Callable[[GraSSConfig], Any]  # the library's pass over corpus.rows
    workdir: Path
    kron_query_batch: int = 8


def rank_all(names: list[str], ctx: Context) -> dict[str, Ranking]:
    """Every named method's ranking, grouped so that shared caches and factor fits are built once."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Ranking] = {}
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        m = METHODS[name]
        key = json.dumps(m.build if m.kind == "grass" else m.options, sort_keys=True)
        groups.setdefault((m.kind, key), []).append(name)
    for (kind, _), members in groups.items():
        runner = {"grass": _grass, "bm25": _bm25, "kronfluence": _kronfluence}[kind]
        out.update(runner(members, ctx))
        for name in members:
            print(f"  {name}: {out[name].seconds}", flush=True)
    return {name: out[name] for name in names}


def _extremes(scores: torch.Tensor) -> tuple[list[int | None], list[int | None]]:
    helpful = [int(s.argmax()) if float(s.max()) > 0 else None for s in scores]
    harmful = [int(s.argmin()) if float(s.min()) < 0 else None for s in scores]
    return helpful, harmful


def _grass(names: list[str], ctx: Context) -> dict[str, Ranking]:
    build = METHODS[names[0]].build
    folder = ctx.workdir / f"cache_{len(list(ctx.workdir.glob('cache_*')))}"
    start = time.perf_counter()
    cache = ctx.build_cache(GraSSConfig(cache_dir=str(folder), batch_size=8, **build))
    build_s = time.perf_counter() - start
    c = ctx.corpus
    check_query_encoding(ctx.model, ctx.tokenizer, cache, c.prompts[0], c.completions[0])
    rows_to_docs = cache.indices.long()
    out = {}
    for name in names:
        start = time.perf_counter()
        attributor = Attributor(ctx.model, ctx.tokenizer, cache, **METHODS[name].query)
        scores = torch.full((len(c.prompts), len(c.rows)), float("-inf"), dtype=torch.float64)
        helpful: list[int | None] = []
        harmful: list[int | None] = []
        for qi, (prompt, completion) in enumerate(zip(c.prompts, c.completions)):
            # all_scores ranks every document; k only sizes the lists (the top-1 below), which a
            # corpus smaller than 10 (--smoke) cannot fill
            result = attributor.find_influential(prompt, k=min(10, cache.num_rows), completion=completion,
                                                 all_scores=True)  # fmt: skip
            scores[qi, rows_to_docs] = result.scores.double()
            top = result.documents[0] if result.documents else None
            helpful.append(top.index if top is not None and top.score > 0 else None)
            harmful.append(result.harmful[0].index if result.harmful else None)
        seconds = {"build_s": build_s, "query_s": time.perf_counter() - start}
        out[name] = Ranking(scores, helpful, harmful, seconds)
    return out


def _bm25(names: list[str], ctx: Context) -> dict[str, Ranking]:
    import bm25s

    c = ctx.corpus
    out = {}
    for name in names:
        start = time.perf_counter()
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(c.texts, stopwords="en", show_progress=False), show_progress=False)
        texts = [p + c if METHODS[name].answer else p for p, c in zip(c.prompts, c.completions)]
        tokens = bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)
        scores = torch.from_numpy(np.stack([retriever.get_scores(t) for t in tokens])).double()
        helpful, _ = _extremes(scores)
        out[name] = Ranking(scores, helpful, [None] * len(texts), {"query_s": time.perf_counter() - start})
    return out


def _kronfluence(names: list[str], ctx: Context) -> dict[str, Ranking]:
    modules = [n for n, m in ctx.model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    dampings = tuple(dict.fromkeys(METHODS[n].damping for n in names))
    settings = bd.KronfluenceSettings(dampings=dampings, tracked_modules=modules, batch_size=4,
                                      query_batch_size=ctx.kron_query_batch, **METHODS[names[0]].options)  # fmt: skip
    pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
    torch.manual_seed(0)  # the true Fisher samples labels from the model
    start = time.perf_counter()
    scores = bd.kronfluence_run(ctx.model, ctx.corpus.rows, ctx.corpus.queries, lambda ex: batch_of(ex, pad), settings)
    seconds = time.perf_counter() - start
    out = {}
    for name in names:
        s = scores[METHODS[name].damping]
        helpful, harmful = _extremes(s)
        out[name] = Ranking(s, helpful, harmful, {"fit_and_score_s (all dampings)": seconds})
    return out


def recall(scores: torch.Tensor, source: list[int], k: int, subset: list[bool] | None = None) -> float | None:
    """Recall@k of each query's source, ties broken pessimistically; ``subset``: only those queries."""
    hits = []
    for qi, (s, src) in enumerate(zip(scores, source)):
        if subset is not None and not subset[qi]:
            continue
        rank = int((s > s[src]).sum()) + int((s == s[src]).sum()) - 1
        hits.append(rank < k)
    return sum(hits) / len(hits) if hits else None

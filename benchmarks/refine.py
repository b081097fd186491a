"""Why the refined iHVP moves little: its convergence on each bench-dev default cache, and the
damping at which EK-FAC's effective dimension equals the row width.

For each benchmark, the default cache is built and, for the first ``--queries`` test examples:

- ``curvature_ratio``: ``x^T C H C^T x / x^T EKFAC x`` along each query's factor gradient ``x``
  (Gauss-Newton ``H`` over ``--examples`` sampled training documents): how far EK-FAC's curvature is
  from the exact one where the query lives;
- per number of conjugate-gradient steps, the relative residual ``||A x_k - b|| / ||b||`` of the
  refined system ``A = C H C^T + D`` and the cosine of ``x_k`` to EK-FAC's answer (0 steps: EK-FAC's
  own answer; 1 step rescales it, so its residual is the best EK-FAC's direction allows);
- ``effective_dimension``: ``d_lambda = sum_j L_j / (L_j + damping * mean L)`` of the fitted EK-FAC
  eigenvalues, in rows, for a range of dampings, and the damping where it equals one row (Hu et al.
  2026: the row should hold the effective dimension), or None where no damping reaches it.

Usage::

    python -m benchmarks.refine                  # bench-dev's three benchmarks (about 2 minutes)
    python -m benchmarks.refine --smoke          # tiny stand-ins (CI; seconds)
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import _bench_dev as bd
from benchmarks import _bench_stand_in
from benchmarks._common import cpu_name, emit_report, parse_with_smoke
from hf_grass import GraSSConfig
from hf_grass.attribution import example_source, run_attribution_pass
from hf_grass.data import padded_batches
from hf_grass.precondition import Preconditioner
from hf_grass.query import Attributor
from hf_grass.scoring.queries import query_vectors

DAMPINGS = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench-dir", type=Path, default=bd.DEFAULT_BENCH_DIR, help="the bench-dev folder")
    p.add_argument("--benches", nargs="+", default=["tinylm", "fact_tracing", "digits_mlp"])
    p.add_argument("--queries", type=int, default=8, help="test examples whose systems are solved")
    p.add_argument(
        "--examples", type=int, default=32, help="training documents the Gauss-Newton averages over"
    )
    p.add_argument("--steps", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16])
    p.add_argument("--json-out", type=Path, default=None)
    return parse_with_smoke(p, argv, {"queries": 2, "examples": 4, "steps": [0, 1, 2]})


def effective_dimension(pre: Preconditioner, damping: float) -> float:
    """``sum_j L_j / (L_j + damping * mean L)`` over every module's EK-FAC eigenvalues."""
    total = 0.0
    for factors in pre.factors.values():
        eig = factors["eig"].double().flatten()
        total += float((eig / (eig + damping * eig.mean())).sum())
    return total


def damping_for_one_row(pre: Preconditioner, dim: int) -> float | None:
    """The damping where the effective dimension equals ``dim`` (bisection on a log scale), or None
    when even a vanishing damping leaves it below (the factor space fits the row)."""
    if effective_dimension(pre, 1e-12) <= dim:
        return None
    lo, hi = -12.0, 6.0
    if effective_dimension(pre, 10**hi) > dim:
        return math.inf
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if effective_dimension(pre, 10**mid) > dim else (lo, mid)
    return 10 ** ((lo + hi) / 2)


def _flat(blocks: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([blocks[n].flatten(1) for n in sorted(blocks)], dim=1)


def run_bench(common: Any, name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    bench = bd.load_bench(common, name)
    start = time.perf_counter()
    cache = run_attribution_pass(bench.model, bench.train, GraSSConfig(cache_dir=str(work / name)), bench.tokenizer,
                                 batch_size=16, disable_progress=True)  # fmt: skip
    attributor = Attributor(bench.model, bench.tokenizer, cache, train_dataset=bench.train, refine_steps=1,
                            refine_examples=args.examples)  # fmt: skip
    refiner, pre = attributor.refiner, attributor.preconditioner
    assert refiner is not None
    captured: dict[str, torch.Tensor] = {}
    solve = refiner.solve

    def grab(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        captured.update({k: v.clone() for k, v in b.items()})
        return solve(b)

    refiner.solve = grab  # type: ignore[method-assign]
    source = example_source(bench.test[: args.queries], bench.tokenizer, attributor.config, bench.model)
    query_vectors(
        attributor.computer, padded_batches(source, bench.tokenizer, 16), pre, attributor.basis, refiner
    )
    products = refiner.products(list(captured))
    b = _flat(captured)
    hb = _flat(products(captured))
    ekfac = _flat({n: v * pre.factors[n]["eig"].to(v.device) for n, v in captured.items()})
    ratio = (b * hb).sum(1) / (b * ekfac).sum(1)

    def system(x: dict[str, torch.Tensor]) -> torch.Tensor:
        hx = products(x)
        return _flat({n: hx[n] + refiner.damping(n) * x[n] for n in x})

    steps = {}
    base = _flat({n: pre.apply(n, v) for n, v in captured.items()})  # EK-FAC's answer
    for k in args.steps:
        refiner.steps = k
        x = solve(captured)
        residual = (system(x) - b).norm(dim=1) / b.norm(dim=1)
        cosine = torch.nn.functional.cosine_similarity(_flat(x), base, dim=1)
        steps[str(k)] = {"relative_residual": float(residual.mean()), "cosine_to_ekfac": float(cosine.mean())}
    dim = cache.dim
    return {
        "damping": pre.damping,
        "row": dim,
        "curvature_coordinates": sum(f["eig"].numel() for f in pre.factors.values()),
        "curvature_ratio": [float(r) for r in ratio],
        "steps": steps,
        "effective_dimension_rows": {str(d): effective_dimension(pre, d) / dim for d in DAMPINGS},
        "damping_for_one_row": damping_for_one_row(pre, dim),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common = _bench_stand_in if args.smoke else bd.load_common(args.bench_dir)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="refine_") as tmp:
        for name in args.benches:
            out[name] = run_bench(common, name, args, Path(tmp))
    print(f"\n{'bench':<14}{'damping':>9}{'GN/EKFAC':>10}  residual (cosine) per steps{'':<24}d=1 row at")
    for name, r in out.items():
        ratio = sum(r["curvature_ratio"]) / len(r["curvature_ratio"])
        cells = "  ".join(
            f"{k}: {s['relative_residual']:.3g} ({s['cosine_to_ekfac']:.3f})" for k, s in r["steps"].items()
        )
        print(f"{name:<14}{r['damping']:>9g}{ratio:>10.2f}  {cells}  {r['damping_for_one_row']}")
    settings = {**vars(args), "bench_dir": str(args.bench_dir), "json_out": None, "cpu": cpu_name(),
                "torch": torch.__version__, "threads": torch.get_num_threads()}  # fmt: skip
    return emit_report({"settings": settings, "benches": out}, args.json_out)


if __name__ == "__main__":
    main()

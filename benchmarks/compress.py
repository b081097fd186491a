"""Compression throughput of every compressor on GPT-2 small's linear layers, on the CPU.

For each k, each of the four linear modules of one GPT-2 small block (HF ``Conv1D`` with bias, so
``d_in`` counts the bias column, as the capture hooks build them) gets one set of random fp32 inputs
``x [B, T, d_in]`` and ``delta [B, T, d_out]``; every compressor's ``compress(x, delta)`` is then
timed on those same inputs, with the repeats interleaved across compressors (round robin), so all
of them see the same machine state. We report the median per call, tokens/s per module and for the
whole block (B*T tokens over the summed module times), and the ratio of each compressor's block
throughput to ``logra``'s.

    python -m benchmarks.compress                 # full: B=8, T=512, k in {256, 1024, 4096}
    python -m benchmarks.compress --quick         # T=128, k in {256, 4096}, 3 repeats
    python -m benchmarks.compress --smoke         # B=2, T=8, k=16, once: checks that it runs
    python -m benchmarks.compress --compressors logra factgrass --ks 4096 --threads 2 --json-out r.json
    python -m benchmarks.compress --compressors logra factgrass --eigen    # + masks in a basis (default config)

Run from the repository root (or with hf_grass installed). ``random`` keeps its dense [k, p] matrix
in memory only up to ``HF_GRASS_MAX_DENSE_BYTES`` (1 GiB by default); above that every call would
regenerate it block by block from the generator, so the benchmark skips those modules and says how
large the matrix is instead of timing random-number generation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import cpu_name, emit_report, parse_with_smoke, time_interleaved
from hf_grass.compressors import Compressor, make_compressor
from hf_grass.compressors.factor_maps import EigenMap
from hf_grass.config import COMPRESSORS, GraSSConfig

# (name, d_in without the bias column, d_out) of one GPT-2 small block
GPT2_MODULES: list[tuple[str, int, int]] = [
    ("attn.c_attn", 768, 2304),
    ("attn.c_proj", 768, 768),
    ("mlp.c_fc", 768, 3072),
    ("mlp.c_proj", 3072, 768),
]
BASELINE = "logra"
# The goal: factgrass at least this many times logra's throughput at k = GOAL_K.
GOAL_RATIO, GOAL_K = 3.0, 4096
SMOKE = {"ks": [16], "seq": 8, "batch": 2, "repeats": 1, "warmup": 0, "eigen": True}


@dataclass
class Measurement:
    """One compressor on one module at one k."""

    k: int
    compressor: str
    module: str
    d_in: int
    d_out: int
    seq: int
    materialises: bool = False  # compress() builds the [B, d_out, d_in] gradient
    status: str = "ok"  # ok | skipped
    reason: str = ""
    times_s: list[float] = field(default_factory=list)
    median_s: float | None = None
    tokens_per_s: float | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ks", type=int, nargs="+", default=None, help="proj_dim values (default 256 1024 4096)"
    )
    parser.add_argument("--batch", type=int, default=8, help="examples per call (default 8)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per example (default 512, quick 128)")
    parser.add_argument(
        "--materialise-seq",
        type=int,
        default=None,
        help="tokens per example for the compressors whose compress() builds the full gradient "
        "(random, fjlt, sjlt), if --seq is too slow or large for them (default: --seq)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per compressor (default 5, quick 3)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed calls per compressor first (default 1)"
    )
    parser.add_argument(
        "--compressors",
        nargs="+",
        default=list(COMPRESSORS),
        choices=COMPRESSORS,
        metavar="NAME",
        help=f"subset of {', '.join(COMPRESSORS)} (default all)",
    )
    parser.add_argument(
        "--sparsify-factor", type=int, default=4, help="k'/k for grass and factgrass (default 4)"
    )
    parser.add_argument(
        "--no-bias", action="store_true", help="modules without bias (default: with, as Conv1D)"
    )
    parser.add_argument(
        "--eigen",
        action="store_true",
        help="also time factgrass-eigen: masks taken in a basis (mask_basis='eigen', the default "
        "configuration's), here a random orthonormal one of the same shapes, which costs the same as a fitted one",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="small run: T=128, k in {256, 4096}, 3 repeats")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON report here")
    args = parse_with_smoke(parser, argv, SMOKE)
    # --quick only changes the defaults; explicit flags still win
    args.ks = args.ks or ([256, 4096] if args.quick else [256, 1024, 4096])
    args.seq = args.seq or (128 if args.quick else 512)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.materialise_seq = args.materialise_seq or args.seq
    for name in ("batch", "seq", "repeats", "threads", "materialise_seq", "sparsify_factor"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def materialises(c: Compressor) -> bool:
    """Whether ``compress`` builds the [B, d_out, d_in] gradient (it is not overridden)."""
    return type(c).compress is Compressor.compress


def skip_reason(c: Compressor) -> str:
    """Why a compressor cannot be timed meaningfully on this module, or ''."""
    if getattr(c, "resident", True):
        return ""
    # above HF_GRASS_MAX_DENSE_BYTES `random` regenerates its matrix block by block on every call:
    # timing that would measure the random number generator, for minutes per call
    return f"dense matrix of {c.output_dim * c.p * 4 / 2**30:.1f} GiB"


def bench_module(module: str, d_in: int, d_out: int, k: int, args: argparse.Namespace) -> list[Measurement]:
    bias = not args.no_bias
    width = d_in + int(bias)  # the gradient's d_in counts the implicit bias column
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.seq, d_in, generator=gen)
    delta = torch.randn(args.batch, args.seq, d_out, generator=gen)
    results: list[Measurement] = []
    calls: dict[str, Callable[[], torch.Tensor]] = {}
    for name in args.compressors:
        m = Measurement(k=k, compressor=name, module=module, d_in=width, d_out=d_out, seq=args.seq)
        results.append(m)
        try:
            config = GraSSConfig(compressor=name, proj_dim=k, sparsify_factor=args.sparsify_factor)
            comp = make_compressor(config, f"h.0.{module}", d_in=width, d_out=d_out, bias=bias)
        except ValueError as err:  # e.g. a k that is not a square for logra
            m.status, m.reason = "skipped", str(err)
            continue
        m.materialises = materialises(comp)
        if reason := skip_reason(comp):
            m.status, m.reason = "skipped", reason
            continue
        seq = args.materialise_seq if m.materialises else args.seq
        m.seq = seq
        xs, ds = (x, delta) if seq == args.seq else (x[:, :seq].contiguous(), delta[:, :seq].contiguous())
        calls[name] = lambda comp=comp, xs=xs, ds=ds: comp.compress(xs, ds)
        if name == "factgrass" and args.eigen:
            eigen = make_compressor(config, f"h.0.{module}", d_in=width, d_out=d_out, bias=bias)
            eigen.set_maps(  # type: ignore[attr-defined]
                EigenMap(torch.linalg.qr(torch.randn(width, eigen.m_in, generator=gen))[0], 1.0),  # type: ignore[attr-defined]
                EigenMap(torch.linalg.qr(torch.randn(d_out, eigen.m_out, generator=gen))[0], 1.0),  # type: ignore[attr-defined]
            )
            results.append(Measurement(k=k, compressor="factgrass-eigen", module=module, d_in=width, d_out=d_out, seq=seq))
            calls["factgrass-eigen"] = lambda comp=eigen: comp.compress(x, delta)

    with torch.inference_mode():  # as in the capture hooks: no autograd bookkeeping
        for name, fn in calls.items():
            out = fn()
            if out.shape != (args.batch, k) or not torch.isfinite(out).all():
                raise RuntimeError(f"{name} on {module}: bad output {tuple(out.shape)}")
        times = time_interleaved(calls, args.repeats, args.warmup).wall
    for m in results:
        if m.compressor in times:
            m.times_s = times[m.compressor]
            m.median_s = statistics.median(m.times_s)
            m.tokens_per_s = args.batch * m.seq / m.median_s
    return results


def block_summary(measurements: list[Measurement], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per (k, compressor): block tokens/s (B*T over the summed module times) and ratio to logra."""
    rows = []
    for k in args.ks:
        per_comp: dict[str, list[Measurement]] = {}
        for m in measurements:
            if m.k == k:
                per_comp.setdefault(m.compressor, []).append(m)
        block = {}
        for name, ms in per_comp.items():
            complete = all(m.status == "ok" for m in ms)
            # per-token time summed over modules; modules may differ in T (materialise-seq)
            block[name] = 1.0 / sum(m.median_s / (args.batch * m.seq) for m in ms) if complete else None
        base = block.get(BASELINE)
        for name, ms in per_comp.items():
            reasons = {m.reason for m in ms if m.status != "ok"}
            if len(reasons) == 1 and all(m.status != "ok" for m in ms):
                skipped = [f"all modules ({reasons.pop()})"]  # e.g. a config error, said once
            else:
                skipped = [f"{m.module} ({m.reason})" for m in ms if m.status != "ok"]
            tps = block[name]
            rows.append(
                {
                    "k": k,
                    "compressor": name,
                    "materialises": any(m.materialises for m in ms),
                    "seq": sorted({m.seq for m in ms}),
                    "block_tokens_per_s": tps,
                    "ratio_to_logra": tps / base if tps and base else None,
                    "modules_tokens_per_s": {m.module: m.tokens_per_s for m in ms},
                    "note": ("skipped " + ", ".join(skipped)) if skipped else "",
                }
            )
    return rows


def fmt_rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k"


def print_table(rows: list[dict[str, Any]]) -> None:
    modules = [name for name, _, _ in GPT2_MODULES]
    head = ["k", "compressor", "T"] + modules + ["block tok/s", f"x {BASELINE}"]
    widths = [5, 15, 4] + [max(11, len(m)) for m in modules] + [11, 8]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        ratio = "-" if r["ratio_to_logra"] is None else f"{r['ratio_to_logra']:.2f}"
        name = r["compressor"] + ("*" if r["materialises"] else "")
        cells = [str(r["k"]), name, "/".join(map(str, r["seq"]))]
        cells += [fmt_rate(r["modules_tokens_per_s"].get(m)) for m in modules]
        cells += [fmt_rate(r["block_tokens_per_s"]), ratio]
        line = "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))
        print(line + (f"   {r['note']}" if r["note"] else ""))
    print("* compress() builds the full [B, d_out, d_in] gradient; the others never do (mask and grass")
    print("  read only their k or k' kept coordinates; logra and factgrass work in their factor spaces)")
    if any("dense matrix" in r["note"] for r in rows):
        print(
            "- skipped `random` modules: the dense matrix is kept only up to HF_GRASS_MAX_DENSE_BYTES (1 GiB"
        )
        print(
            "  by default); above that each call regenerates it, which would time the RNG. No number given."
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {
        "batch": args.batch,
        "seq": args.seq,
        "materialise_seq": args.materialise_seq,
        "ks": args.ks,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "bias": not args.no_bias,
        "sparsify_factor": args.sparsify_factor,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "kernels": "torch reference (CPU)",
    }
    print(
        f"GPT-2 small block, B={args.batch}, T={args.seq} (materialising: T={args.materialise_seq}), fp32, "
        f"bias={'no' if args.no_bias else 'yes (d_in counts the bias column)'}, "
        f"threads={settings['threads']}, median of {args.repeats} after {args.warmup} warm-up, "
        f"torch {torch.__version__}, {settings['cpu']}",
        flush=True,
    )
    measurements: list[Measurement] = []
    for k in args.ks:
        for module, d_in, d_out in GPT2_MODULES:
            start = time.perf_counter()
            measurements += bench_module(module, d_in, d_out, k, args)
            print(f"  k={k} {module}: {time.perf_counter() - start:.1f}s", flush=True)
    rows = block_summary(measurements, args)
    print()
    print_table(rows)

    goal = next((r for r in rows if r["k"] == GOAL_K and r["compressor"] == "factgrass"), None)
    goal_report: dict[str, Any] = {"target": GOAL_RATIO, "k": GOAL_K, "ratio": None, "met": None}
    if goal is not None and goal["ratio_to_logra"] is not None:
        goal_report.update(ratio=goal["ratio_to_logra"], met=goal["ratio_to_logra"] >= GOAL_RATIO)
        verdict = "met" if goal_report["met"] else "NOT met"
        print(
            f"\ngoal factgrass >= {GOAL_RATIO:g}x logra at k={GOAL_K}: measured "
            f"{goal['ratio_to_logra']:.2f}x -> {verdict}"
        )
    report = {
        "settings": settings,
        "blocks": rows,
        "measurements": [asdict(m) for m in measurements],
        "goal": goal_report,
    }
    return emit_report(report, args.json_out)


if __name__ == "__main__":
    main()

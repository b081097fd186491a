"""Time the deterministic Triton kernels against the torch paths, on CUDA.

Shapes are GPT-2 small's linear layers (HF ``Conv1D`` with bias, so d_in counts the bias column) at
B=8 examples of T=512 tokens, with FactGraSS at k in {256, 1024, 4096} and sparsify_factor 4
(m_in = m_out = 2 sqrt(k)), plus a plain SJLT of an [8, 2**20] input. Every variant gets the same
inputs and the same compressor tensors (masks, SJLT map, drawn by ``make_compressor``):

* ``torch``: the library's torch path on CUDA (masked outer product with ``bmm``, then the SJLT
  gathered through the inverse index: deterministic);
* ``triton``: the default, deterministic Triton kernels (:mod:`hf_grass.kernels.triton_kernels`).

Earlier atomic-add Triton kernels (not deterministic) were removed before any GPU measurement; they
are in git history (commit 4b164a7, ``hf_grass/kernels/triton_atomic.py``) should a measurement here
show the gather kernels leave much on the table.

Before timing, each output is compared with the scatter reference (``index_add_``) to ``REL_TOL``,
and each deterministic variant is run ``REPEATS`` times: its outputs must be identical bit for bit.

    python -m benchmarks.gpu_kernels              # full table
    python -m benchmarks.gpu_kernels --quick      # one k, two modules, few repetitions
    python -m benchmarks.gpu_kernels --json out.json --dtype float16

Prints a table and a JSON blob (also written to ``--json``). Exits 0 without CUDA or Triton (nothing
to time), 1 when an output disagrees with the reference or a deterministic variant is not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import git_state
from hf_grass import kernels
from hf_grass.compressors import make_compressor
from hf_grass.compressors.sjlt import make_sjlt
from hf_grass.config import GraSSConfig
from hf_grass.kernels import SJLTMap, reference

# (module, d_in without bias, d_out) of one GPT-2 small block
GPT2_MODULES: list[tuple[str, int, int]] = [
    ("attn.c_attn", 768, 2304),
    ("attn.c_proj", 768, 768),
    ("mlp.c_fc", 768, 3072),
    ("mlp.c_proj", 3072, 768),
]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SJLT_N = 1 << 20
# fp32 accumulation in a different order: a few ulps of the output scale, with margin for T=512
REL_TOL = 1e-4
# runs of each deterministic variant whose outputs must agree bit for bit
REPEATS = 5
VARIANTS = ("torch", "triton")


def cuda_time_ms(fn: Callable[[], torch.Tensor], warmup: int, reps: int) -> float:
    """Median device time of ``fn`` in ms, from CUDA events around each call (after warm-up/JIT)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (so -0.0 differs from +0.0), not merely equal as numbers."""
    as_int = torch.int64 if a.dtype == torch.float64 else torch.int32
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(as_int), b.view(as_int))


def _with_kernels(mode: str, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` run with ``HF_GRASS_KERNELS=mode`` (the dispatcher reads it on every call)."""

    def run() -> torch.Tensor:
        previous = os.environ.get("HF_GRASS_KERNELS")
        os.environ["HF_GRASS_KERNELS"] = mode
        try:
            return fn()
        finally:
            if previous is None:
                os.environ.pop("HF_GRASS_KERNELS", None)
            else:
                os.environ["HF_GRASS_KERNELS"] = previous

    return run


def _variants(call: Callable[[], torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    return {
        "torch": _with_kernels("torch", call),
        "triton": _with_kernels("triton", call),
    }


def measure(
    runs: dict[str, Callable[[], torch.Tensor]], ref: torch.Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    """Errors against ``ref``, bit-for-bit repeatability, then the median time of every variant."""
    row: dict[str, Any] = {}
    ok = True
    for name, run in runs.items():
        outs = [run() for _ in range(REPEATS)]
        err = rel_error(outs[0], ref)
        repeatable = all(same_bits(o, outs[0]) for o in outs[1:])
        row[f"{name}_rel_err"] = err
        row[f"{name}_repeatable"] = repeatable
        ok = ok and err <= REL_TOL and repeatable
    for name, run in runs.items():
        row[f"{name}_ms"] = cuda_time_ms(run, args.warmup, args.reps)
    row["ok"] = ok
    return row


def bench_factgrass(name: str, d_in: int, d_out: int, k: int, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    config = GraSSConfig(compressor="factgrass", proj_dim=k, sparsify_factor=4)
    comp = make_compressor(config, f"h.0.{name}", d_in=d_in + 1, d_out=d_out, bias=True).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, args.seq, d_in, device=device, generator=gen).to(dtype)
    delta = torch.randn(args.batch, args.seq, d_out, device=device, generator=gen).to(dtype)
    sjlt: SJLTMap = comp.sjlt
    sjlt.gather_index()  # built once per map, outside the timed region (as in a real pass)
    bias = comp.mask_bias_index

    def call() -> torch.Tensor:
        return kernels.factgrass_project(x, delta, comp.in_idx, comp.out_idx, sjlt, bias)

    ref = reference.factgrass_project(x, delta, comp.in_idx, comp.out_idx, sjlt.rows, sjlt.signs, k, bias)
    return {
        "kernel": "factgrass",
        "module": name,
        "shape": f"{d_in}->{d_out}",
        "k": k,
        "m_in": comp.m_in,
        "m_out": comp.m_out,
        **measure(_variants(call), ref, args),
    }


def bench_sjlt(k: int, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda")
    sjlt = make_sjlt(torch.Generator().manual_seed(k), SJLT_N, k, args.sjlt_nnz).to(device)
    sjlt.gather_index()
    gen = torch.Generator(device=device).manual_seed(1)
    g = torch.randn(args.batch, SJLT_N, device=device, generator=gen).to(DTYPES[args.dtype])

    def call() -> torch.Tensor:
        return kernels.sjlt_project(g, sjlt)

    ref = reference.sjlt_project(g, sjlt.rows, sjlt.signs, k)
    return {
        "kernel": "sjlt",
        "module": f"[{args.batch}, {SJLT_N}] s={args.sjlt_nnz}",
        "shape": f"{SJLT_N}->{k}",
        "k": k,
        "m_in": None,
        "m_out": None,
        **measure(_variants(call), ref, args),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'kernel':<10} {'case':<24} {'shape':<16} {'k':>5} {'m_out x m_in':>12} "
    header += " ".join(f"{v + ' ms':>10}" for v in VARIANTS)
    header += f" {'torch/triton':>12} {'repeatable':>11} {'triton err':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        masks = f"{r['m_out']} x {r['m_in']}" if r["m_in"] is not None else "-"
        times = " ".join(f"{r[v + '_ms']:>10.3f}" for v in VARIANTS)
        tri = r["triton_ms"] if r["triton_ms"] > 0 else float("nan")
        repeat = "".join("y" if r[f"{v}_repeatable"] else "n" for v in VARIANTS)  # torch, triton
        flag = "" if r["ok"] else "  MISMATCH"
        print(
            f"{r['kernel']:<10} {r['module']:<24} {r['shape']:<16} {r['k']:>5} {masks:>12} {times} "
            f"{r['torch_ms'] / tri:>11.2f}x {repeat:>11} "
            f"{r['triton_rel_err']:>10.1e}{flag}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="k=1024 only, two modules, 3 warm-up / 10 timed runs"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of x, delta and g")
    parser.add_argument("--batch", type=int, default=8, help="examples per call (B)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per example (T)")
    parser.add_argument("--sjlt-nnz", type=int, default=1, help="non-zeros per column of the plain SJLT")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10, quick 3)")
    parser.add_argument(
        "--reps", type=int, default=None, help="timed calls, median reported (default 50, quick 10)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON blob to this file")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 3 if args.quick else 10
    if args.reps is None:
        args.reps = 10 if args.quick else 50
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels: CUDA is not available on this machine; nothing to benchmark (run it on a GPU).")
        return 0
    if not kernels.triton_available():
        print(
            "gpu_kernels: triton does not import; install it (pip install 'hf-grass[triton]') to benchmark."
        )
        return 0
    ks = [1024] if args.quick else [256, 1024, 4096]
    modules = GPT2_MODULES[:2] if args.quick else GPT2_MODULES
    results = []
    for k in ks:
        for name, d_in, d_out in modules:
            results.append(bench_factgrass(name, d_in, d_out, k, args))
        results.append(bench_sjlt(k, args))

    print(f"device: {torch.cuda.get_device_name()}  dtype: {args.dtype}  B={args.batch}  T={args.seq}")
    print_table(results)
    blob = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "warmup": args.warmup,
        "reps": args.reps,
        "rel_tol": REL_TOL,
        "repeats": REPEATS,
        "results": results,
        "git": git_state(),
    }
    text = json.dumps(blob, indent=None)
    print("JSON:", text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    bad = [r for r in results if not r["ok"]]
    if bad:
        print(
            f"gpu_kernels: {len(bad)} case(s) disagree with the reference (rel err > {REL_TOL}) or a "
            "deterministic variant gave different bits in two runs."
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

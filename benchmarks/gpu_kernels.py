"""Time the Triton kernels against the torch reference on a CUDA device.

Shapes are GPT-2 small's linear layers (HF ``Conv1D`` with bias, so d_in counts the bias column) at
B=8 examples of T=512 tokens, with FactGraSS at k in {256, 1024, 4096} and sparsify_factor 4
(m_in = m_out = 2 sqrt(k)), plus a plain SJLT of an [8, 2**20] input. Both paths get the same inputs
and the same compressor tensors (masks, SJLT rows and signs, drawn by ``make_compressor``); the two
outputs are compared before anything is timed.

    python -m benchmarks.gpu_kernels              # full table
    python -m benchmarks.gpu_kernels --quick      # one k, two modules, few repetitions
    python -m benchmarks.gpu_kernels --json out.json --dtype float16

Prints a table and a JSON blob (also written to ``--json``). Exits 0 without CUDA or Triton (nothing
to time), 1 when a Triton output disagrees with the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hf_grass import kernels
from hf_grass.compressors import make_compressor
from hf_grass.compressors.sjlt import draw_sjlt
from hf_grass.config import GraSSConfig
from hf_grass.kernels import reference

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


def bench_factgrass(
    name: str, d_in: int, d_out: int, k: int, args: argparse.Namespace, triton_kernels: Any
) -> dict[str, Any]:
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    config = GraSSConfig(compressor="factgrass", proj_dim=k, sparsify_factor=4)
    comp = make_compressor(config, f"h.0.{name}", d_in=d_in + 1, d_out=d_out, bias=True).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, args.seq, d_in, device=device, generator=gen).to(dtype)
    delta = torch.randn(args.batch, args.seq, d_out, device=device, generator=gen).to(dtype)
    call_args = (x, delta, comp.in_idx, comp.out_idx, comp.rows, comp.signs, k, comp.bias_index)

    def run_torch() -> torch.Tensor:
        return reference.factgrass_project(*call_args)

    def run_triton() -> torch.Tensor:
        return triton_kernels.factgrass_project(*call_args)

    err = rel_error(run_triton(), run_torch())
    return {
        "kernel": "factgrass",
        "module": name,
        "shape": f"{d_in}->{d_out}",
        "k": k,
        "m_in": comp.m_in,
        "m_out": comp.m_out,
        "torch_ms": cuda_time_ms(run_torch, args.warmup, args.reps),
        "triton_ms": cuda_time_ms(run_triton, args.warmup, args.reps),
        "rel_err": err,
        "ok": err <= REL_TOL,
    }


def bench_sjlt(k: int, args: argparse.Namespace, triton_kernels: Any) -> dict[str, Any]:
    device = torch.device("cuda")
    rows, signs = draw_sjlt(torch.Generator().manual_seed(k), SJLT_N, k, args.sjlt_nnz)
    rows, signs = rows.to(device), signs.to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    g = torch.randn(args.batch, SJLT_N, device=device, generator=gen).to(DTYPES[args.dtype])

    def run_torch() -> torch.Tensor:
        return reference.sjlt_project(g, rows, signs, k)

    def run_triton() -> torch.Tensor:
        return triton_kernels.sjlt_project(g, rows, signs, k)

    err = rel_error(run_triton(), run_torch())
    return {
        "kernel": "sjlt",
        "module": f"[{args.batch}, {SJLT_N}] s={args.sjlt_nnz}",
        "shape": f"{SJLT_N}->{k}",
        "k": k,
        "m_in": None,
        "m_out": None,
        "torch_ms": cuda_time_ms(run_torch, args.warmup, args.reps),
        "triton_ms": cuda_time_ms(run_triton, args.warmup, args.reps),
        "rel_err": err,
        "ok": err <= REL_TOL,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'kernel':<10} {'case':<24} {'shape':<16} {'k':>5} {'m_out x m_in':>12} "
    header += f"{'torch ms':>9} {'triton ms':>9} {'speedup':>8} {'rel err':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        masks = f"{r['m_out']} x {r['m_in']}" if r["m_in"] is not None else "-"
        speedup = r["torch_ms"] / r["triton_ms"] if r["triton_ms"] > 0 else float("inf")
        flag = "" if r["ok"] else "  MISMATCH"
        print(
            f"{r['kernel']:<10} {r['module']:<24} {r['shape']:<16} {r['k']:>5} {masks:>12} "
            f"{r['torch_ms']:>9.3f} {r['triton_ms']:>9.3f} {speedup:>7.2f}x {r['rel_err']:>9.1e}{flag}"
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
    from hf_grass.kernels import triton_kernels

    ks = [1024] if args.quick else [256, 1024, 4096]
    modules = GPT2_MODULES[:2] if args.quick else GPT2_MODULES
    results = []
    for k in ks:
        for name, d_in, d_out in modules:
            results.append(bench_factgrass(name, d_in, d_out, k, args, triton_kernels))
        results.append(bench_sjlt(k, args, triton_kernels))

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
        "results": results,
    }
    text = json.dumps(blob, indent=None)
    print("JSON:", text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    bad = [r for r in results if not r["ok"]]
    if bad:
        print(f"gpu_kernels: {len(bad)} Triton output(s) disagree with the reference (rel err > {REL_TOL}).")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

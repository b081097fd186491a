"""Compile the Triton kernels for NVIDIA targets on a machine without a GPU.

The interpreter checks run the kernels' math in numpy; they cannot see code-generation failures
(an fp64 ``tl.dot`` or atomic the backend rejects, an int64 loop bound, an integer argument the JIT
specialises to a constant 1). ``triton.compile`` with an explicit ``GPUTarget`` runs the whole
pipeline (TTIR, TTGIR, LLVM, PTX, ptxas) without a device, so this catches those here. Launch
configurations come from the same helpers the wrappers use.

Must run with ``TRITON_INTERPRET`` unset (it makes ``@triton.jit`` build interpreter objects), which
is why ``tests/test_kernels.py`` runs it in a subprocess. Prints one JSON line per variant; exits 1
if any fails, 77 if this triton has no NVIDIA backend.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("run with TRITON_INTERPRET unset: the interpreter replaces the compiled kernels")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hf_grass.kernels import triton_kernels as tk  # noqa: E402

NO_BACKEND = 77
PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}
TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]


def _signature(fn: Any, pointers: dict[str, str], constexprs: dict[str, Any], ints: dict[str, str]) -> dict:
    """Signature of ``fn``: pointers as given, constexprs, other ints i32 unless ``ints`` says otherwise."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers[name]
        else:
            sig[name] = ints.get(name, "i32")
    return sig


def _compile(
    fn: Any,
    pointers: dict,
    constexprs: dict,
    ints: dict,
    num_warps: int,
    target: GPUTarget,
    fp_fusion: bool = True,
) -> None:
    src = ASTSource(fn=fn, signature=_signature(fn, pointers, constexprs, ints), constexprs=constexprs)
    options = {"num_warps": num_warps, "enable_fp_fusion": fp_fusion}
    kernel = triton.compile(src, target=target, options=options)
    if not kernel.asm.get("cubin"):
        raise AssertionError("no cubin produced")


def _factgrass_variant(dtype: torch.dtype, m: int, bias: bool, ones: bool, target: GPUTarget) -> None:
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # the dtype the wrapper would hand tl.dot on a GPU (bf16 stays bf16 outside the interpreter)
    dot = dtype if dtype in (torch.float16, torch.bfloat16) else acc
    meta = tk._factgrass_meta(dot, m, m)
    num_warps = meta.pop("num_warps")
    constexprs: dict[str, Any] = {
        "HAS_BIAS": bias,
        "DOT_DTYPE": tk._TL_DTYPES[dot],
        "ACC_DTYPE": tk._TL_DTYPES[acc],
        "IEEE_DOT": dot in (torch.float32, torch.float64),
        **meta,
    }
    pointers = {
        "x_ptr": PTR[dtype],
        "delta_ptr": PTR[dtype],
        "in_idx_ptr": "*i64",
        "out_idx_ptr": "*i64",
    }
    # strides past 2**31 arrive as i64
    ints = {"stride_xb": "i64", "stride_db": "i64"}
    fn = tk._masked_outer_kernel
    pointers["gp_ptr"] = PTR[acc]
    ints.update({"stride_gpc": "i64", "stride_gpb": "i64"})
    may_be_one = ("T", "m_in", "m_out", "n_tchunks", "stride_xd", "stride_dd", "stride_gpb")
    if ones:
        # every integer argument that can be 1 at run time, as the JIT would specialise it
        for name in may_be_one:
            constexprs[name] = 1
    _compile(fn, pointers, constexprs, ints, num_warps, target)


def _sjlt_variant(dtype: torch.dtype, batch: int, ones: bool, target: GPUTarget) -> None:
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    meta = tk._sjlt_meta(batch)
    num_warps = meta.pop("num_warps")
    constexprs: dict[str, Any] = {"ACC_DTYPE": tk._TL_DTYPES[acc], **meta}
    if ones:
        names = ("B", "k", "width", "steps_per_program", "n_gparts", "stride_gb", "stride_gn", "stride_ob")
        for name in names:
            constexprs[name] = 1
    # g is factgrass's partial G' (accumulation dtype) or a plain input of any float dtype
    pointers = {"g_ptr": PTR[dtype], "cols_ptr": "*i64", "vals_ptr": "*fp32", "out_ptr": PTR[acc]}
    ints = {"stride_gp": "i64", "stride_gb": "i64", "stride_op": "i64"}
    # the wrapper launches it without FP contraction (a rounded product, then a rounded add)
    _compile(tk._sjlt_gather_kernel, pointers, constexprs, ints, num_warps, target, fp_fusion=False)


def variants() -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    sm90, sm80 = TARGETS
    for dtype, m in ((torch.bfloat16, 128), (torch.float16, 32), (torch.float32, 64), (torch.float64, 128)):
        label = str(dtype).removeprefix("torch.")
        out.append(
            (
                f"factgrass {label} m={m} bias sm90",
                lambda d=dtype, m=m: _factgrass_variant(d, m, True, False, sm90),
            )
        )
    out.append(
        (
            "factgrass bfloat16 m=20 no-bias sm80",
            lambda: _factgrass_variant(torch.bfloat16, 20, False, False, sm80),
        )
    )
    out.append(
        ("factgrass float64 m=64 bias sm80", lambda: _factgrass_variant(torch.float64, 64, True, False, sm80))
    )
    out.append(
        ("factgrass bfloat16 ints=1 sm90", lambda: _factgrass_variant(torch.bfloat16, 16, True, True, sm90))
    )
    for dtype, batch in ((torch.bfloat16, 8), (torch.float32, 3), (torch.float64, 1)):
        label = str(dtype).removeprefix("torch.")
        out.append(
            (f"sjlt {label} B={batch} sm90", lambda d=dtype, b=batch: _sjlt_variant(d, b, False, sm90))
        )
    out.append(("sjlt float16 ints=1 sm80", lambda: _sjlt_variant(torch.float16, 1, True, sm80)))
    return out


def main() -> int:
    try:
        from triton.backends import backends
    except ImportError:
        backends = {}
    if "nvidia" not in backends:
        print("this triton build has no NVIDIA backend", file=sys.stderr)
        return NO_BACKEND
    failed = 0
    for name, run in variants():
        try:
            run()
            ok, detail = True, "compiled"
        except Exception:
            ok, detail = False, traceback.format_exc()
            failed += 1
        print(json.dumps({"name": name, "ok": ok, "detail": detail}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

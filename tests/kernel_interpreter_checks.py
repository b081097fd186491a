"""Checks of the Triton kernels against the torch reference, run on CPU under the Triton interpreter.

The default kernels are deterministic, so they are checked twice: bit for bit against the torch
reference that adds in the same order (``reference.sjlt_project_gather`` over the kernel's own
partial sums: the masked outer product's ``tl.dot`` has no torch twin with its summation order, so
for factgrass only the SJLT stage is compared bit for bit, and the ``tl.dot`` stage to rounding), and
to float rounding against the plain reference (``index_add_``, the CPU path).

``tests/test_kernels.py`` runs this file in a subprocess, because ``TRITON_INTERPRET=1`` only takes
effect when it is set before ``triton`` is imported, and the pytest process may already have imported
it. It can also be run by hand::

    TRITON_INTERPRET=1 HF_GRASS_KERNELS=triton OMP_NUM_THREADS=1 \
        python tests/kernel_interpreter_checks.py [names | --list]

Each check prints one JSON line ``{"name": ..., "ok": ..., "detail": ...}``; the exit status is 1 when
any check fails. Shapes are tiny: the interpreter runs every program of the grid in Python.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("run with TRITON_INTERPRET=1 (it must be set before triton is imported)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hf_grass import kernels  # noqa: E402
from hf_grass.compressors import make_compressor  # noqa: E402
from hf_grass.config import GraSSConfig  # noqa: E402
from hf_grass.kernels import SJLTMap, reference  # noqa: E402
from hf_grass.kernels import triton_kernels as tk  # noqa: E402

CHECKS: dict[str, Callable[[], str]] = {}


def check(fn: Callable[[], str]) -> Callable[[], str]:
    CHECKS[fn.__name__] = fn
    return fn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mask(d: int, m: int, gen: torch.Generator) -> torch.Tensor:
    return torch.sort(torch.randperm(d, generator=gen)[:m]).values


def _sjlt_tables(n: int, k: int, s: int, gen: torch.Generator) -> SJLTMap:
    # the block construction of compressors.sjlt.draw_sjlt: s distinct rows per coordinate
    block = k // s
    rows = torch.randint(0, block, (s, n), generator=gen) + torch.arange(s).unsqueeze(1) * block
    signs = (torch.randint(0, 2, (s, n), generator=gen) * 2 - 1).to(torch.float32) / math.sqrt(s)
    return SJLTMap(rows, signs, k)


def _same_bits(out: torch.Tensor, ref: torch.Tensor, what: str) -> str:
    """Bit-for-bit equality (so -0.0 != +0.0 and NaN payloads count), dtype and shape included."""
    if out.dtype != ref.dtype or out.shape != ref.shape:
        raise AssertionError(
            f"{what}: got {out.dtype} {tuple(out.shape)}, reference {ref.dtype} {tuple(ref.shape)}"
        )
    as_int = torch.int64 if out.dtype == torch.float64 else torch.int32
    differ = int((out.contiguous().view(as_int) != ref.contiguous().view(as_int)).sum())
    if differ:
        raise AssertionError(f"{what}: {differ} of {out.numel()} outputs differ in their bits")
    return f"{what}: bit-identical"


def _ordered_factgrass(args: tuple, tokens_per_program: int, steps: int | None) -> torch.Tensor:
    """The SJLT stage in the kernel's order over the kernel's own partial ``G'`` (see the docstring)."""
    x, delta, in_idx, out_idx, sjlt, _, bias = args
    parts = tk._masked_outer_launch(x, delta, in_idx, out_idx, bias, tokens_per_program)
    return reference.sjlt_project_gather(reference.sum_parts(parts), *sjlt.gather_index(), steps)


def _ref_factgrass(args: tuple) -> torch.Tensor:
    x, delta, in_idx, out_idx, sjlt, k, bias = args
    return reference.factgrass_project(x, delta, in_idx, out_idx, sjlt.rows, sjlt.signs, k, bias)


def _compare(out: torch.Tensor, ref: torch.Tensor, what: str) -> str:
    """Equal up to accumulation-order rounding of the accumulation dtype, relative to the output scale."""
    if out.dtype != ref.dtype or out.shape != ref.shape:
        raise AssertionError(
            f"{what}: got {out.dtype} {tuple(out.shape)}, reference {ref.dtype} {tuple(ref.shape)}"
        )
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    # fp32: a few ulps of the output scale; the products of fp16/bf16 inputs are exact in fp32, so
    # low-precision inputs get the same bound (only the summation order differs)
    tol = (1e-12 if ref.dtype == torch.float64 else 1e-5) * max(scale, 1.0)
    err = float((out - ref).abs().max()) if ref.numel() else 0.0
    if not err <= tol:  # also catches NaN
        raise AssertionError(f"{what}: max abs error {err:.3e} > {tol:.3e} (output scale {scale:.3e})")
    return f"{what}: err {err:.1e} (scale {scale:.1e})"


# ---- factgrass ------------------------------------------------------------------------------------

# (B, T, d_in incl. bias column, d_out, m_in, m_out, s, k, bias, tokens_per_program, SJLT steps)
# tokens_per_program None: the kernel's fixed chunk; steps None: the split chosen for the device
FACT_CASES = [
    (2, 5, 24, 20, 7, 9, 1, 16, False, None, None),  # T < BLOCK_T, masks far below one tile
    (3, 17, 33, 41, 20, 19, 2, 64, True, None, 2),  # bias column in the mask, ragged everything
    (2, 40, 70, 50, 65, 33, 2, 32, True, 16, None),  # two i-tiles (64 + 1), split over tokens
    (3, 9, 48, 36, 17, 36, 1, 48, False, 1, 1),  # every token chunk is ragged; m_out = d_out
    (2, 150, 30, 26, 12, 10, 1, 16, True, None, 3),  # three of the kernel's own 64-token chunks
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def _fact_inputs(case: tuple, dtype_x: torch.dtype, dtype_d: torch.dtype, seed: int) -> tuple:
    batch, n_tok, d_in, d_out, m_in, m_out, s, k, bias, _, _ = case
    gen = _gen(seed)
    width = d_in - 1 if bias else d_in
    x = torch.randn(batch, n_tok, width, generator=gen).to(dtype_x)
    delta = torch.randn(batch, n_tok, d_out, generator=gen).to(dtype_d)
    in_idx = _mask(d_in, m_in, gen)
    if bias and int(in_idx[-1]) != d_in - 1:
        # make sure the implicit ones column is exercised
        in_idx[-1] = d_in - 1
        in_idx = torch.unique(in_idx)
    out_idx = _mask(d_out, m_out, gen)
    sjlt = _sjlt_tables(in_idx.numel() * m_out, k, s, gen)
    return x, delta, in_idx, out_idx, sjlt, k, (d_in - 1 if bias else None)


def _kernel_args(args: tuple) -> tuple:
    """(x, delta, in_idx, out_idx, sjlt, bias_index): the kernels' arguments of a ``_fact_inputs`` tuple."""
    x, delta, in_idx, out_idx, sjlt, _, bias = args
    return x, delta, in_idx, out_idx, sjlt, bias


def _run_fact_cases(dtype_x: torch.dtype, dtype_d: torch.dtype) -> str:
    notes = []
    for n, case in enumerate(FACT_CASES):
        args = _fact_inputs(case, dtype_x, dtype_d, seed=n)
        tokens = case[-2] or tk._TOKENS_PER_PROGRAM
        out = tk._factgrass_launch(*_kernel_args(args), tokens, case[-1])
        notes.append(_compare(out, _ref_factgrass(args), f"case {n}"))
        notes.append(_same_bits(out, _ordered_factgrass(args, tokens, case[-1]), f"case {n} in order"))
    return "; ".join(notes)


def _make_fact_check(label: str, dx: torch.dtype, dd: torch.dtype) -> None:
    def run() -> str:
        return _run_fact_cases(dx, dd)

    run.__name__ = f"factgrass_{label}"
    check(run)


for _label, _dt in DTYPES.items():
    _make_fact_check(_label, _dt, _dt)
# mixed operand dtypes go through the accumulation dtype
_make_fact_check("x_fp16_delta_fp32", torch.float16, torch.float32)
_make_fact_check("x_bf16_delta_fp64", torch.bfloat16, torch.float64)


@check
def factgrass_bias_index_not_in_mask() -> str:
    # bias_index given but the mask did not draw it: a plain gather, no ones column
    x, delta, _, out_idx, sjlt, k, _ = _fact_inputs(
        (2, 7, 30, 20, 9, 8, 1, 16, True, None, None), torch.float32, torch.float32, seed=11
    )
    in_idx = torch.tensor([0, 3, 4, 10, 11, 17, 20, 27, 28])
    out = tk.factgrass_project(x, delta, in_idx, out_idx, sjlt, bias_index=29)
    return _compare(out, _ref_factgrass((x, delta, in_idx, out_idx, sjlt, k, 29)), "no bias drawn")


@check
def factgrass_non_contiguous() -> str:
    gen = _gen(5)
    batch, n_tok, width, d_out = 2, 11, 29, 26
    # x stored [B, d, T] and viewed transposed; delta a strided slice of a wider buffer
    x = torch.randn(batch, width, n_tok, generator=gen).transpose(1, 2)
    delta = torch.randn(batch, n_tok, 2 * d_out, generator=gen)[:, :, ::2]
    in_idx, out_idx = _mask(width + 1, 12, gen), _mask(d_out, 10, gen)
    in_idx[-1] = width  # bias column
    in_idx = torch.unique(in_idx)
    sjlt = _sjlt_tables(in_idx.numel() * 10, 32, 2, gen)
    args = (x, delta, in_idx, out_idx, sjlt, 32, width)
    notes = [_compare(tk.factgrass_project(*_kernel_args(args)), _ref_factgrass(args), "strided")]
    # an expanded (stride-0) delta along T
    delta_e = torch.randn(batch, 1, d_out, generator=gen).expand(batch, n_tok, d_out)
    args = (x, delta_e, in_idx, out_idx, sjlt, 32, width)
    out = tk.factgrass_project(*_kernel_args(args))
    notes.append(_compare(out, _ref_factgrass(args), "expanded"))
    notes.append(_same_bits(out, _ordered_factgrass(args, tk._TOKENS_PER_PROGRAM, None), "expanded in order"))
    return "; ".join(notes)


@check
def factgrass_empty() -> str:
    x, delta, in_idx, out_idx, sjlt, k, bias = _fact_inputs(FACT_CASES[1], torch.float32, torch.float32, 3)
    out = tk.factgrass_project(x[:, :0], delta[:, :0], in_idx, out_idx, sjlt, bias)
    if out.shape != (x.shape[0], k) or out.abs().max() != 0:
        raise AssertionError(f"T=0 should give zeros [B, k], got {tuple(out.shape)}")
    out = tk.factgrass_project(x[:0], delta[:0], in_idx, out_idx, sjlt, bias)
    if out.shape != (0, k):
        raise AssertionError(f"B=0 should give [0, k], got {tuple(out.shape)}")
    return "T=0 and B=0 give zeros"


@check
def factgrass_shape_errors() -> str:
    x, delta, in_idx, out_idx, sjlt, k, bias = _fact_inputs(FACT_CASES[0], torch.float32, torch.float32, 4)
    short = SJLTMap(sjlt.rows[:, 1:], sjlt.signs[:, 1:], k)
    bad = [
        ((x[0], delta, in_idx, out_idx, sjlt, bias), ValueError),
        ((x, delta[:, :3], in_idx, out_idx, sjlt, bias), ValueError),
        ((x, delta, in_idx, out_idx, short, bias), ValueError),
        ((x.to(torch.int32), delta, in_idx, out_idx, sjlt, bias), TypeError),
    ]
    for n, (args, exc) in enumerate(bad):
        try:
            tk.factgrass_project(*args)
        except exc:
            continue
        raise AssertionError(f"bad input {n} did not raise {exc.__name__}")
    return f"{len(bad)} bad inputs rejected"


# ---- sjlt -----------------------------------------------------------------------------------------


def _sjlt_ref(g: torch.Tensor, sjlt: SJLTMap) -> torch.Tensor:
    return reference.sjlt_project(g, sjlt.rows, sjlt.signs, sjlt.k)


@check
def sjlt_dtypes() -> str:
    notes = []
    for n, (label, dtype) in enumerate(DTYPES.items()):
        for batch, n_in, k, s in ((1, 1, 4, 1), (3, 1500, 64, 2), (9, 777, 48, 4)):
            gen = _gen(100 + n)
            g = torch.randn(batch, n_in, generator=gen).to(dtype)
            sjlt = _sjlt_tables(n_in, k, s, gen)
            out = tk.sjlt_project(g, sjlt)
            what = f"{label} B={batch} n={n_in} s={s}"
            notes.append(_compare(out, _sjlt_ref(g, sjlt), what))
            notes.append(_same_bits(out, reference.sjlt_project_gather(g, *sjlt.gather_index()), what))
    return "; ".join(notes)


@check
def sjlt_bitwise_in_order() -> str:
    """Every split of the steps over programs, and inputs given as parts, against the ordered reference."""
    notes = []
    for n, (label, dtype) in enumerate(DTYPES.items()):
        gen = _gen(200 + n)
        sjlt = _sjlt_tables(1500, 40, 2, gen)  # ~75 inputs per output
        cols, vals = sjlt.gather_index()
        g = torch.randn(5, 1500, generator=gen).to(dtype)
        for steps in (1, 7, 32, cols.shape[0]):
            out = tk._sjlt_launch(g, cols, vals, steps)
            ref = reference.sjlt_project_gather(g, cols, vals, steps)
            notes.append(_same_bits(out, ref, f"{label} steps={steps}"))
        # [P, B, n] parts (factgrass's token chunks): added in order as they are read
        parts = torch.randn(3, 5, 1500, generator=gen).to(reference.accumulation_dtype(g))
        out = tk._sjlt_launch(parts, cols, vals, 9)
        ref = reference.sjlt_project_gather(reference.sum_parts(parts), cols, vals, 9)
        notes.append(_same_bits(out, ref, f"{label} 3 input parts"))
        # an infinite input reaches only the outputs it maps to: padding steps add nothing of it
        g_inf = g.clone()
        g_inf[:, 0] = float("inf")
        out = tk._sjlt_launch(g_inf, cols, vals, None)
        hit = (cols == 0).any(dim=0)
        if not (bool(out[:, hit].isinf().all()) and bool(out[:, ~hit].isfinite().all())):
            raise AssertionError(f"{label}: an infinite input leaked into outputs it does not map to")
        ref = reference.sjlt_project_gather(g_inf, cols, vals)
        notes.append(_same_bits(out[:, ~hit], ref[:, ~hit], f"{label} beside an inf"))
    return "; ".join(notes)


@check
def factgrass_exact_inputs_match_index_add() -> str:
    """Inputs whose every sum is exact in fp32 (small integers, signs +-1 or +-1/2): any order gives
    the same bits, so the whole kernel must equal the ``index_add_`` reference bit for bit."""
    notes = []
    for s in (1, 4):
        gen = _gen(300 + s)
        args = _fact_inputs(
            (3, 70, 30, 26, 12, 10, s, 16, True, None, None), torch.float32, torch.float32, 300 + s
        )
        x = torch.randint(-3, 4, args[0].shape, generator=gen).to(torch.float32)
        delta = torch.randint(-3, 4, args[1].shape, generator=gen).to(torch.float32)
        args = (x, delta, *args[2:])
        notes.append(_same_bits(tk.factgrass_project(*_kernel_args(args)), _ref_factgrass(args), f"s={s}"))
    return "; ".join(notes)


@check
def sjlt_non_contiguous() -> str:
    gen = _gen(7)
    g = torch.randn(4, 2 * 301, generator=gen)[:, ::2]  # column stride 2
    sjlt = _sjlt_tables(301, 30, 3, gen)
    notes = [_compare(tk.sjlt_project(g, sjlt), _sjlt_ref(g, sjlt), "strided")]
    gt = torch.randn(301, 4, generator=gen).t()  # row stride 1, column stride 4
    notes.append(_compare(tk.sjlt_project(gt, sjlt), _sjlt_ref(gt, sjlt), "transposed"))
    return "; ".join(notes)


# ---- 64-bit offsets -------------------------------------------------------------------------------

# A batch stride just above 2**30 elements puts example 2 at element offset > 2**31, where an int32
# `pid * stride` wraps. The storage is ~4 GiB of *virtual* memory from torch.empty: only the pages the
# views write are ever touched, so the resident cost is a few MiB.
_BIG_STRIDE = 2**30 + 64
_BIG_NUMEL = 2 * _BIG_STRIDE + 2**16


def _big_storage() -> torch.Tensor:
    return torch.empty(_BIG_NUMEL, dtype=torch.float16)


@check
def int64_offsets_factgrass() -> str:
    gen = _gen(9)
    big = _big_storage()
    batch, n_tok, width, d_out = 3, 6, 20, 18
    x = big.as_strided((batch, n_tok, width), (_BIG_STRIDE, width, 1), 0)
    delta = big.as_strided((batch, n_tok, d_out), (_BIG_STRIDE, d_out, 1), n_tok * width)
    x.copy_(torch.randn(batch, n_tok, width, generator=gen))
    delta.copy_(torch.randn(batch, n_tok, d_out, generator=gen))
    in_idx, out_idx = _mask(width, 9, gen), _mask(d_out, 8, gen)
    sjlt = _sjlt_tables(9 * 8, 16, 2, gen)
    ref = _ref_factgrass((x.clone(), delta.clone(), in_idx, out_idx, sjlt, 16, None))
    notes = [_compare(tk.factgrass_project(x, delta, in_idx, out_idx, sjlt), ref, "batch stride 2**30+64")]
    # token stride above 2**30: token 2 of the only example sits past 2**31
    x_t = big.as_strided((1, 3, width), (0, _BIG_STRIDE, 1), 0)
    d_t = big.as_strided((1, 3, d_out), (0, _BIG_STRIDE, 1), width)
    ref = _ref_factgrass((x_t.clone(), d_t.clone(), in_idx, out_idx, sjlt, 16, None))
    notes.append(
        _compare(tk.factgrass_project(x_t, d_t, in_idx, out_idx, sjlt), ref, "token stride 2**30+64")
    )
    return "; ".join(notes)


@check
def int64_offsets_sjlt() -> str:
    gen = _gen(10)
    big = _big_storage()
    g = big.as_strided((3, 257), (_BIG_STRIDE, 1), 0)
    g.copy_(torch.randn(3, 257, generator=gen))
    sjlt = _sjlt_tables(257, 32, 2, gen)
    return _compare(tk.sjlt_project(g, sjlt), _sjlt_ref(g.clone(), sjlt), "sjlt")


# ---- through the dispatcher and the compressor ----------------------------------------------------


class _kernels_env:
    """``HF_GRASS_KERNELS`` set to ``value`` inside the block, restored after."""

    def __init__(self, value: str):
        self.value, self.previous = value, os.environ.get("HF_GRASS_KERNELS")

    def __enter__(self) -> None:
        os.environ["HF_GRASS_KERNELS"] = self.value

    def __exit__(self, *exc: object) -> None:
        if self.previous is None:
            os.environ.pop("HF_GRASS_KERNELS", None)
        else:
            os.environ["HF_GRASS_KERNELS"] = self.previous


@check
def dispatcher_uses_triton() -> str:
    x = torch.randn(2, 3, 4)
    backend = kernels.backend_for(x)
    if backend != "triton":
        raise AssertionError(
            f"HF_GRASS_KERNELS=triton with TRITON_INTERPRET=1 should pick triton, got {backend}"
        )
    args = _fact_inputs(FACT_CASES[1], torch.float32, torch.float32, seed=12)
    out = kernels.factgrass_project(*_kernel_args(args))
    notes = [_compare(out, _ref_factgrass(args), "kernels.factgrass_project")]
    notes.append(
        _same_bits(out, tk.factgrass_project(*_kernel_args(args)), "= triton_kernels.factgrass_project")
    )
    return "; ".join(notes)


@check
def compressor_end_to_end() -> str:
    gen = _gen(13)
    notes = []
    for name, proj_dim in (("factgrass", 64), ("grass", 32), ("sjlt", 32)):
        comp = make_compressor(
            GraSSConfig(compressor=name, proj_dim=proj_dim), "m", d_in=33, d_out=40, bias=True
        )
        x = torch.randn(3, 10, 32, generator=gen)
        delta = torch.randn(3, 10, 40, generator=gen)
        with _kernels_env("triton"):
            out_triton = comp.compress(x, delta)
            again = comp.compress(x, delta)
        with _kernels_env("torch"):
            out_torch = comp.compress(x, delta)
        notes.append(_compare(out_triton, out_torch, f"{name} compress"))
        notes.append(_same_bits(again, out_triton, f"{name} twice"))
    return "; ".join(notes)


def main(names: list[str]) -> int:
    if names == ["--list"]:
        print("\n".join(CHECKS))
        return 0
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"unknown checks {unknown}; available: {sorted(CHECKS)}", file=sys.stderr)
        return 2
    failed = 0
    for name in names or list(CHECKS):
        try:
            detail, ok = CHECKS[name](), True
        except Exception:
            detail, ok = traceback.format_exc(), False
            failed += 1
        print(json.dumps({"name": name, "ok": ok, "detail": detail}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

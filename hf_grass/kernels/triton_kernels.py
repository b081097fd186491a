"""Deterministic Triton kernels of the two hot loops: no atomics, so every run gives the same bits.

* :func:`sjlt_project`: sparse JL transform ``[B, n] -> [B, k]`` as a *gather*. Each program owns a
  ``[BLOCK_B, BLOCK_K]`` tile of the output and walks, for each of its outputs, the input
  coordinates that map to it (the inverse index of :class:`~hf_grass.kernels.sjlt_map.SJLTMap`, in
  a fixed order), adding them one after another in registers. No two programs write one output.
* :func:`factgrass_project`: the FactGraSS map in two launches. The first gathers the masked columns
  of ``x`` and ``delta`` and forms the per-example masked outer-product sum
  ``G' = sum_t delta'_t x'_t^T`` tile by tile with ``tl.dot`` (fp32 accumulator, fp64 for fp64
  inputs), over fixed chunks of ``_TOKENS_PER_PROGRAM`` tokens, and stores each chunk's partial tile;
  the second is the SJLT gather above, which adds a coordinate's partial tiles in chunk order as it
  reads them. ``G'`` is ``sparsify_factor * k`` numbers per example and chunk: small next to ``x``.

Why the results are deterministic, and what they depend on:

* Every output is written by one program, and every sum has a fixed order: the SJLT adds inputs in
  the order of the inverse index, then its step parts in order; ``tl.dot`` compiles to a fixed
  instruction sequence; token chunks are added in order. The same inputs on the same GPU model, with
  the same Triton version, therefore give the same bits in every run (resume and repair rely on it).
* Split points depend only on the map and the device, never on the batch: token chunks are a fixed
  size, and the SJLT's step parts follow from ``k``, the row length and the SM count. A row is thus
  the same whatever else is in its batch (with right padding: padding adds exact zeros at the end).
* The SJLT kernel is compiled without FP contraction (``enable_fp_fusion=False``): each step is a
  rounded product then a rounded add, exactly the operations of
  :func:`~hf_grass.kernels.reference.sjlt_project_gather`. The ``tl.dot`` of the factgrass kernel
  sums in the hardware's order, so on a GPU its rows equal the CPU's only up to float rounding.

Conventions shared by both kernels:

* Everything that is multiplied by a stride or by ``k`` is int64 first (program ids, ``tl.arange``
  offsets, loaded indices): ``B*T*d`` and ``B*k`` can pass 2**31 on real models and int32 pointer
  offsets would silently wrap.
* Inputs are read through their strides, so non-contiguous views (slices, transposes, expands) cost
  no copy. The small constant tensors (masks, the inverse index) go through ``.contiguous()``, a
  no-op for the compressors' own tensors.

Importing this module imports ``triton``; the dispatcher in :mod:`hf_grass.kernels` only does so once
it has chosen the Triton path. On CPU tensors the kernels run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from hf_grass.kernels.reference import accumulation_dtype, sum_parts
from hf_grass.kernels.sjlt_map import SJLTMap

__all__ = ["factgrass_project", "sjlt_project"]

# CUDA caps grid axes 1 and 2 at 65535 programs (axis 0 at 2**31 - 1).
_MAX_GRID_YZ = 65535
# Tokens one factgrass program reduces before it stores its partial tile. Fixed (not chosen from B or
# T) so that a row does not depend on its batch; 64 tokens of dot work per BLOCK_O x BLOCK_I store.
_TOKENS_PER_PROGRAM = 64
# Fewest SJLT steps (inputs per output) one program takes before the steps are split over programs.
_MIN_STEPS_PER_PROGRAM = 32

_TL_DTYPES: dict[torch.dtype, tl.dtype] = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _TL_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {t.dtype}")


def _check_device(device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but the inputs are on {device}; move the compressor there"
            )


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs that keep the device busy: a few waves per SM on CUDA.

    Elsewhere (the interpreter runs programs one after another) 1, so work is never split there
    unless a caller of a ``_launch`` function asks for it.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 4 * _sm_count(index)
    return 1


def _tile(m: int) -> int:
    # tl.dot needs every dimension >= 16; 64 keeps a fp32/fp64 accumulator tile in registers while
    # m = 2 sqrt(k) (32 .. 256 for k = 256 .. 16384) wastes at most half a tile on masked lanes.
    return max(16, min(64, triton.next_power_of_2(m)))


# ---------------------------------------------------------------------------------------------------
# SJLT: gather through the inverse index
# ---------------------------------------------------------------------------------------------------


def _sjlt_meta(batch: int) -> dict[str, int]:
    """Tile sizes and warps of the SJLT gather kernel for a batch of ``batch`` rows."""
    # <= 512 outputs per program (4 per thread): the accumulator, a 64-bit pointer and the gathered
    # value of each stay in registers; 64 outputs make the index loads 512-byte rows
    block_b = min(8, triton.next_power_of_2(batch))
    return {"BLOCK_B": block_b, "BLOCK_K": 64, "num_warps": 4}


def _sjlt_steps_per_program(width: int, k: int, device: torch.device) -> int:
    """How many inputs per output one program adds: all of them unless the device would idle.

    Depends on the map (``width``, ``k``) and the device only, not on the batch, so a row's
    summation order does not depend on what else is in its batch.
    """
    k_tiles = triton.cdiv(k, _sjlt_meta(1)["BLOCK_K"])
    want = triton.cdiv(_target_programs(device), k_tiles)
    parts = max(1, min(want, width // _MIN_STEPS_PER_PROGRAM))
    return triton.cdiv(width, parts)


@triton.jit
def _sjlt_gather_kernel(
    g_ptr,
    cols_ptr,
    vals_ptr,
    out_ptr,
    B,
    k,
    width,
    steps_per_program,
    n_gparts,
    stride_gp,
    stride_gb,
    stride_gn,
    stride_op,
    stride_ob,
    ACC_DTYPE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # axis 0: a tile of outputs; axis 1: a tile of examples; axis 2: a part of each output's inputs.
    # g is [n_gparts, B, n]: the value of an input is its parts added in order (n_gparts = 1 for a
    # plain SJLT; the token chunks of G' for factgrass). out is [parts, B, k]: one partial per part.
    offs_k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    offs_b = tl.program_id(1).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    part = tl.program_id(2)
    mask_k = offs_k < k
    mask_b = offs_b < B
    n_steps = tl.minimum(steps_per_program, width - part * steps_per_program)
    # the inverse index is [width, k] row-major: step e of output r at e * k + r
    step0 = part.to(tl.int64) * steps_per_program
    cols_e = cols_ptr + step0 * k
    vals_e = vals_ptr + step0 * k
    g_rows = g_ptr + offs_b[:, None] * stride_gb
    acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC_DTYPE)
    for _ in range(0, n_steps):
        col = tl.load(cols_e + offs_k, mask=mask_k, other=-1)
        val = tl.load(vals_e + offs_k, mask=mask_k, other=0.0).to(ACC_DTYPE)
        valid = col >= 0  # -1 past the end of an output's list
        mask = mask_b[:, None] & valid[None, :]
        ptrs = g_rows + col.to(tl.int64)[None, :] * stride_gn
        v = tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
        for _p in range(1, n_gparts):
            ptrs += stride_gp
            v += tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
        # a padding step leaves the sum as it is, exactly as in the reference
        acc = tl.where(valid[None, :], acc + v * val[None, :], acc)
        cols_e += k
        vals_e += k
    out = out_ptr + part.to(tl.int64) * stride_op + offs_b[:, None] * stride_ob + offs_k[None, :]
    tl.store(out, acc, mask=mask_b[:, None] & mask_k[None, :])


def _sjlt_launch(
    g: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, steps_per_program: int | None
) -> torch.Tensor:
    """The SJLT gather of ``g`` (``[B, n]``, or ``[P, B, n]`` parts to add first) -> ``[B, k]``.

    ``steps_per_program=None`` chooses the split for the device (see :func:`_sjlt_steps_per_program`).
    """
    parts_in = g if g.dim() == 3 else g.unsqueeze(0)
    acc = accumulation_dtype(g)
    n_gparts, batch, _ = parts_in.shape
    width, k = cols.shape
    if batch == 0 or k == 0 or width == 0 or n_gparts == 0:
        return torch.zeros(batch, k, dtype=acc, device=g.device)
    if steps_per_program is None:
        steps_per_program = _sjlt_steps_per_program(width, k, g.device)
    if steps_per_program <= 0:
        raise ValueError(f"steps_per_program must be positive, got {steps_per_program}")
    n_parts = triton.cdiv(width, steps_per_program)
    meta = _sjlt_meta(batch)
    grid = (triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(batch, meta["BLOCK_B"]), n_parts)
    if grid[1] > _MAX_GRID_YZ or grid[2] > _MAX_GRID_YZ:
        raise ValueError(f"batch {batch} with {n_parts} step parts is too large for one launch; split it")
    out = torch.empty(n_parts, batch, k, dtype=acc, device=g.device)
    _sjlt_gather_kernel[grid](
        parts_in,
        cols.contiguous(),
        vals.contiguous(),
        out,
        batch,
        k,
        width,
        steps_per_program,
        n_gparts,
        parts_in.stride(0),
        parts_in.stride(1),
        parts_in.stride(2),
        out.stride(0),
        out.stride(1),
        ACC_DTYPE=_TL_DTYPES[acc],
        # a rounded product, then a rounded add: the reference's operations (no FMA contraction)
        enable_fp_fusion=False,
        **meta,
    )
    return sum_parts(out)


def sjlt_project(g: torch.Tensor, sjlt: SJLTMap) -> torch.Tensor:
    """Sparse JL transform: output ``r`` is the sum, in the inverse index's order, of its inputs.

    Args:
        g: ``[B, n]`` inputs (float16, bfloat16, float32 or float64; any strides).
        sjlt: the map (its inverse index is built on first use, on the map's device).

    Returns:
        ``[B, k]`` in float32 (float64 when ``g`` is float64), like the reference.
    """
    _check_float("g", g)
    if g.dim() != 2 or g.shape[1] != sjlt.n:
        raise ValueError(f"expected g [B, {sjlt.n}] for this SJLT; got {tuple(g.shape)}")
    _check_device(g.device, sjlt=sjlt.rows)
    cols, vals = sjlt.gather_index()
    return _sjlt_launch(g, cols, vals, None)


# ---------------------------------------------------------------------------------------------------
# FactGraSS: gather + masked outer-product sum per token chunk, then the SJLT gather
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _masked_outer_kernel(
    x_ptr,
    delta_ptr,
    in_idx_ptr,
    out_idx_ptr,
    gp_ptr,
    T,
    m_in,
    m_out,
    bias_index,
    n_tchunks,
    tokens_per_program,
    stride_xb,
    stride_xt,
    stride_xd,
    stride_db,
    stride_dt,
    stride_dd,
    stride_gpc,
    stride_gpb,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    # axis 0: (example b, token chunk c); axis 1: the (o, i) tile of G'. Each program stores the
    # partial tile of its chunk at gp[c, b, o * m_in + i]; the chunks are added later, in order.
    pid_bt = tl.program_id(0).to(tl.int64)
    pid_tile = tl.program_id(1)
    b = pid_bt // n_tchunks
    chunk = pid_bt % n_tchunks
    t_begin = chunk * tokens_per_program
    t_end = tl.minimum(t_begin + tokens_per_program, T)

    n_tiles_i = tl.cdiv(m_in, BLOCK_I)
    offs_o = (pid_tile // n_tiles_i).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    offs_i = (pid_tile % n_tiles_i).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    mask_o = offs_o < m_out
    mask_i = offs_i < m_in
    # the masks themselves: which columns of delta / x this tile gathers
    cols_o = tl.load(out_idx_ptr + offs_o, mask=mask_o, other=0).to(tl.int64)
    cols_i = tl.load(in_idx_ptr + offs_i, mask=mask_i, other=0).to(tl.int64)
    if HAS_BIAS:
        # like reference.gather_columns: only the last mask entry can be the implicit ones column
        # (x has no such column in memory, so it must not be loaded)
        is_bias = mask_i & (offs_i == m_in - 1) & (cols_i == bias_index)
        load_i = mask_i & ~is_bias
    else:
        load_i = mask_i

    x_row = x_ptr + b * stride_xb
    d_row = delta_ptr + b * stride_db
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=ACC_DTYPE)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        mask_t = offs_t < t_end
        # delta'^T tile [BLOCK_O, BLOCK_T] (loaded transposed, so no tl.trans) and x' tile [BLOCK_T, BLOCK_I]
        d_tile = tl.load(
            d_row + cols_o[:, None] * stride_dd + offs_t[None, :] * stride_dt,
            mask=mask_o[:, None] & mask_t[None, :],
            other=0.0,
        )
        x_tile = tl.load(
            x_row + offs_t[:, None] * stride_xt + cols_i[None, :] * stride_xd,
            mask=mask_t[:, None] & load_i[None, :],
            other=0.0,
        )
        if HAS_BIAS:
            # padding tokens (t >= t_end) stay 0 so they add nothing to the bias column
            x_tile = tl.where(mask_t[:, None] & is_bias[None, :], 1.0, x_tile)
        d_tile = d_tile.to(DOT_DTYPE)
        x_tile = x_tile.to(DOT_DTYPE)
        if IEEE_DOT:
            # fp32 / fp64 operands: full-precision FMA, not TF32, to match the reference bmm
            acc = tl.dot(d_tile, x_tile, acc, input_precision="ieee", out_dtype=ACC_DTYPE)
        else:
            # fp16 / bf16 operands: products are exact in the fp32 accumulator
            acc = tl.dot(d_tile, x_tile, acc, out_dtype=ACC_DTYPE)

    # G'[o, i] is coordinate o * m_in + i of the flattened factor gradient
    flat = offs_o[:, None] * m_in + offs_i[None, :]
    dest = gp_ptr + chunk * stride_gpc + b * stride_gpb + flat
    tl.store(dest, acc, mask=mask_o[:, None] & mask_i[None, :])


def _factgrass_meta(dot: torch.dtype, m_in: int, m_out: int) -> dict[str, int]:
    """Tile sizes and warps of the masked outer-product kernel for ``tl.dot`` operands of dtype ``dot``."""
    block_o, block_i = _tile(m_out), _tile(m_in)
    # register budget (ptxas for sm_90, no spills): fp32/fp64 operands take twice the registers of
    # fp16/bf16 per token, so they step 16 tokens at a time; tiles of >= 2048 outputs get 8 warps
    return {
        "BLOCK_T": 32 if dot in (torch.float16, torch.bfloat16) else 16,
        "BLOCK_O": block_o,
        "BLOCK_I": block_i,
        "num_warps": 8 if block_o * block_i >= 2048 else 4,
    }


def _dot_dtype(x: torch.Tensor, delta: torch.Tensor) -> torch.dtype:
    """Operand dtype of ``tl.dot``: the inputs' own when they agree on fp16/bf16, else the accumulator's.

    bf16 operands go through fp32 under the interpreter, which stores bf16 as raw uint16 and would
    multiply the bit patterns in ``tl.dot``; the products are exact in fp32 either way.
    """
    acc = accumulation_dtype(x, delta)
    if x.dtype == delta.dtype and x.dtype in (torch.float16, torch.bfloat16):
        if x.dtype == torch.bfloat16 and _interpreting():
            return torch.float32
        return x.dtype
    return acc


def _check_factgrass(
    x: torch.Tensor, delta: torch.Tensor, in_idx: torch.Tensor, out_idx: torch.Tensor, sjlt: SJLTMap
) -> None:
    _check_float("x", x)
    _check_float("delta", delta)
    if x.dim() != 3 or delta.dim() != 3 or x.shape[:2] != delta.shape[:2]:
        raise ValueError(
            f"expected x [B, T, d_in] and delta [B, T, d_out]; got {tuple(x.shape)}, {tuple(delta.shape)}"
        )
    if in_idx.dim() != 1 or out_idx.dim() != 1:
        raise ValueError("in_idx and out_idx must be 1-D index tensors")
    if sjlt.n != in_idx.numel() * out_idx.numel():
        raise ValueError(
            f"the SJLT must map the m_out * m_in = {out_idx.numel() * in_idx.numel()} masked coordinates; "
            f"it maps {sjlt.n}"
        )
    _check_device(x.device, delta=delta, in_idx=in_idx, out_idx=out_idx, sjlt=sjlt.rows)


def _masked_outer_launch(
    x: torch.Tensor,
    delta: torch.Tensor,
    in_idx: torch.Tensor,
    out_idx: torch.Tensor,
    bias_index: int | None,
    tokens_per_program: int = _TOKENS_PER_PROGRAM,
) -> torch.Tensor:
    """Partial ``G'`` per token chunk: ``[n_chunks, B, m_out * m_in]`` (chunks of ``tokens_per_program``).

    Their sum over chunks, in order (:func:`~hf_grass.kernels.reference.sum_parts`), is the masked
    outer product of :func:`~hf_grass.kernels.reference.masked_outer`, flattened.
    """
    acc = accumulation_dtype(x, delta)
    batch, n_tok = x.shape[:2]
    m_in, m_out = in_idx.numel(), out_idx.numel()
    if tokens_per_program <= 0:
        raise ValueError(f"tokens_per_program must be positive, got {tokens_per_program}")
    dot = _dot_dtype(x, delta)
    meta = _factgrass_meta(dot, m_in, m_out)
    # whole BLOCK_T steps per program, so only the last chunk of an example is ragged
    tokens_per_program = triton.cdiv(tokens_per_program, meta["BLOCK_T"]) * meta["BLOCK_T"]
    n_tchunks = max(1, triton.cdiv(n_tok, tokens_per_program))
    if batch == 0 or n_tok == 0 or m_in == 0 or m_out == 0:
        return torch.zeros(n_tchunks, batch, m_out * m_in, dtype=acc, device=x.device)
    # every entry is stored by exactly one program: no zero fill needed
    gp = torch.empty(n_tchunks, batch, m_out * m_in, dtype=acc, device=x.device)
    n_tiles = triton.cdiv(m_out, meta["BLOCK_O"]) * triton.cdiv(m_in, meta["BLOCK_I"])
    if n_tiles > _MAX_GRID_YZ:
        raise ValueError(
            f"m_out * m_in = {m_out * m_in} needs {n_tiles} tiles, over the grid limit {_MAX_GRID_YZ}"
        )
    grid = (batch * n_tchunks, n_tiles)
    _masked_outer_kernel[grid](
        x,
        delta,
        in_idx.contiguous(),
        out_idx.contiguous(),
        gp,
        n_tok,
        m_in,
        m_out,
        -1 if bias_index is None else int(bias_index),
        n_tchunks,
        tokens_per_program,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        delta.stride(0),
        delta.stride(1),
        delta.stride(2),
        gp.stride(0),
        gp.stride(1),
        HAS_BIAS=bias_index is not None,
        DOT_DTYPE=_TL_DTYPES[dot],
        ACC_DTYPE=_TL_DTYPES[acc],
        IEEE_DOT=dot in (torch.float32, torch.float64),
        **meta,
    )
    return gp


def factgrass_project(
    x: torch.Tensor,
    delta: torch.Tensor,
    in_idx: torch.Tensor,
    out_idx: torch.Tensor,
    sjlt: SJLTMap,
    bias_index: int | None = None,
) -> torch.Tensor:
    """Fused FactGraSS without scale: SJLT of vec(``sum_t delta[b,t,out_idx] x[b,t,in_idx]^T``) -> ``[B, k]``.

    Args:
        x: ``[B, T, d_in]`` module inputs without the bias column (any strides).
        delta: ``[B, T, d_out]`` output gradients (any strides).
        in_idx, out_idx: sorted integer masks of sizes m_in, m_out; the last entry of ``in_idx`` may
            equal ``bias_index``, which stands for an implicit column of ones. Entries are not
            range-checked (that would sync the device); out-of-range ones read arbitrary memory.
        sjlt: the SJLT of the ``m_out * m_in`` row-major ``(o, i)`` coordinates.
        bias_index: index of the implicit ones column, or None.

    Returns:
        ``[B, k]`` in float32 (float64 when an input is float64), like the reference.
    """
    return _factgrass_launch(x, delta, in_idx, out_idx, sjlt, bias_index, _TOKENS_PER_PROGRAM, None)


def _factgrass_launch(
    x: torch.Tensor,
    delta: torch.Tensor,
    in_idx: torch.Tensor,
    out_idx: torch.Tensor,
    sjlt: SJLTMap,
    bias_index: int | None,
    tokens_per_program: int,
    steps_per_program: int | None,
) -> torch.Tensor:
    """:func:`factgrass_project` with the token chunks and the SJLT step split exposed (for tests)."""
    _check_factgrass(x, delta, in_idx, out_idx, sjlt)
    gp = _masked_outer_launch(x, delta, in_idx, out_idx, bias_index, tokens_per_program)
    cols, vals = sjlt.gather_index()
    return _sjlt_launch(gp, cols, vals, steps_per_program)

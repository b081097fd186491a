"""The earlier, atomic Triton kernels: opt-in only (``HF_GRASS_KERNELS=triton_atomic``), not deterministic.

Both kernels scatter with relaxed ``tl.atomic_add``: :func:`sjlt_project` adds each input into its
rows, and :func:`factgrass_project` forms tiles of ``G'`` with ``tl.dot`` and adds each finished tile
straight into the ``k`` outputs, so ``[B, m_out, m_in]`` never reaches global memory. The adds
commute, but on a GPU the order in which they land, and so the float rounding of every output,
changes from run to run: rows are not bit-identical across runs, and a resumed or repaired cache is
not byte-identical to an uninterrupted one. The default kernels (:mod:`hf_grass.kernels.triton_kernels`)
are deterministic.

These are kept only so that ``benchmarks/gpu_kernels.py`` can measure what determinism costs on a
GPU. No measurement justifies them yet (none has been run); remove them unless one shows they are
worth it. Conventions (int64 offsets, strided inputs, tile sizes) are those of
:mod:`hf_grass.kernels.triton_kernels`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_grass.kernels.reference import accumulation_dtype
from hf_grass.kernels.triton_kernels import (
    _MAX_GRID_YZ,
    _TL_DTYPES,
    _check_device,
    _check_float,
    _dot_dtype,
    _factgrass_meta,
    _target_programs,
)

__all__ = ["factgrass_project", "sjlt_project"]

# Minimum tokens one factgrass program reduces before it scatters its tile. Every program ends with
# BLOCK_O * BLOCK_I * s atomics whatever its share of T, so splitting T finer than this buys
# parallelism with atomic traffic (and one extra rounding per chunk) for little dot work.
_MIN_TOKENS_PER_PROGRAM = 64


# ---------------------------------------------------------------------------------------------------
# SJLT
# ---------------------------------------------------------------------------------------------------


def _sjlt_meta(batch: int) -> dict[str, int]:
    """Tile sizes and warps of the SJLT kernel for a batch of ``batch`` rows."""
    # ~2048 elements per program (<= 1024 along n): larger tiles spill registers on sm_80/sm_90 once
    # the int64 row indices and 64-bit pointers of every element are live (checked with ptxas)
    block_b = min(8, triton.next_power_of_2(batch))
    return {"BLOCK_B": block_b, "BLOCK_N": min(1024, 2048 // block_b), "num_warps": 4}


@triton.jit
def _sjlt_kernel(
    g_ptr,
    rows_ptr,
    signs_ptr,
    out_ptr,
    B,
    n,
    s,
    stride_gb,
    stride_gn,
    stride_ob,
    ACC_DTYPE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # axis 0 walks the (long) input dimension, axis 1 the (short) batch: one program owns a
    # [BLOCK_B, BLOCK_N] tile of g, reads each rows/signs entry once and reuses it for BLOCK_B examples
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_b = tl.program_id(1).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    mask_n = offs_n < n
    mask = (offs_b < B)[:, None] & mask_n[None, :]
    g = tl.load(g_ptr + offs_b[:, None] * stride_gb + offs_n[None, :] * stride_gn, mask=mask, other=0.0)
    g = g.to(ACC_DTYPE)
    out_rows = out_ptr + offs_b[:, None] * stride_ob
    rows_r = rows_ptr
    signs_r = signs_ptr
    for _ in range(s):
        row = tl.load(rows_r + offs_n, mask=mask_n, other=0).to(tl.int64)
        sign = tl.load(signs_r + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)
        tl.atomic_add(out_rows + row[None, :], g * sign[None, :], mask=mask, sem="relaxed")
        # rows / signs are contiguous [s, n]: step the pointers by one row (never forms r * n,
        # which would overflow int32 once s * n >= 2**31)
        rows_r += n
        signs_r += n


def sjlt_project(g: torch.Tensor, rows: torch.Tensor, signs: torch.Tensor, k: int) -> torch.Tensor:
    """Sparse JL transform: input coordinate j adds ``signs[r, j] * g[:, j]`` to ``out[:, rows[r, j]]``.

    Args:
        g: ``[B, n]`` inputs (float16, bfloat16, float32 or float64; any strides).
        rows: ``[s, n]`` integer target rows in ``[0, k)`` (not range-checked: that would sync).
        signs: ``[s, n]`` float signs, already scaled by ``1/sqrt(s)``.
        k: output dimension.

    Returns:
        ``[B, k]`` in float32 (float64 when ``g`` is float64), like the reference.
    """
    _check_float("g", g)
    if g.dim() != 2 or rows.dim() != 2 or rows.shape != signs.shape or rows.shape[1] != g.shape[1]:
        raise ValueError(
            f"expected g [B, n] and rows, signs [s, n]; got {tuple(g.shape)}, {tuple(rows.shape)}, "
            f"{tuple(signs.shape)}"
        )
    _check_device(g.device, rows=rows, signs=signs)
    acc = accumulation_dtype(g)
    batch, n = g.shape
    s = rows.shape[0]
    out = torch.zeros(batch, k, dtype=acc, device=g.device)
    if batch == 0 or n == 0 or s == 0 or k == 0:
        return out
    rows = rows.contiguous()
    signs = signs.contiguous()
    meta = _sjlt_meta(batch)
    grid = (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(batch, meta["BLOCK_B"]))
    if grid[1] > _MAX_GRID_YZ:
        raise ValueError(f"batch {batch} is too large for one launch; split it into chunks")
    _sjlt_kernel[grid](
        g,
        rows,
        signs,
        out,
        batch,
        n,
        s,
        g.stride(0),
        g.stride(1),
        out.stride(0),
        ACC_DTYPE=_TL_DTYPES[acc],
        **meta,
    )
    return out


# ---------------------------------------------------------------------------------------------------
# FactGraSS: gather + masked outer-product sum + SJLT scatter, fused
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _factgrass_kernel(
    x_ptr,
    delta_ptr,
    in_idx_ptr,
    out_idx_ptr,
    rows_ptr,
    signs_ptr,
    out_ptr,
    T,
    m_in,
    m_out,
    n_proj,
    s,
    bias_index,
    n_tchunks,
    tokens_per_program,
    stride_xb,
    stride_xt,
    stride_xd,
    stride_db,
    stride_dt,
    stride_dd,
    stride_ob,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    # axis 0: (example b, token chunk); axis 1: the (o, i) tile of G'. The map is linear in G', so a
    # program may reduce only part of the tokens and scatter its partial tile: splitting T across
    # programs (split-K) keeps the GPU full when B * tiles is small, at the price of more atomics.
    pid_bt = tl.program_id(0).to(tl.int64)
    pid_tile = tl.program_id(1)
    b = pid_bt // n_tchunks
    t_begin = (pid_bt % n_tchunks) * tokens_per_program
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

    # scatter: G'[o, i] is coordinate o * m_in + i of the flattened factor gradient
    mask_oi = mask_o[:, None] & mask_i[None, :]
    flat = offs_o[:, None] * m_in + offs_i[None, :]
    out_row = out_ptr + b * stride_ob
    rows_r = rows_ptr
    signs_r = signs_ptr
    for _ in range(s):
        row = tl.load(rows_r + flat, mask=mask_oi, other=0).to(tl.int64)
        sign = tl.load(signs_r + flat, mask=mask_oi, other=0.0).to(ACC_DTYPE)
        tl.atomic_add(out_row + row, acc * sign, mask=mask_oi, sem="relaxed")
        # next SJLT row of the contiguous [s, n_proj] tables (pointer steps, no r * n_proj product)
        rows_r += n_proj
        signs_r += n_proj


def _factgrass_launch(
    x: torch.Tensor,
    delta: torch.Tensor,
    in_idx: torch.Tensor,
    out_idx: torch.Tensor,
    rows: torch.Tensor,
    signs: torch.Tensor,
    k: int,
    bias_index: int | None,
    tokens_per_program: int | None,
) -> torch.Tensor:
    """:func:`factgrass_project` with the token split exposed (``None``: chosen for the device)."""
    _check_float("x", x)
    _check_float("delta", delta)
    if x.dim() != 3 or delta.dim() != 3 or x.shape[:2] != delta.shape[:2]:
        raise ValueError(
            f"expected x [B, T, d_in] and delta [B, T, d_out]; got {tuple(x.shape)}, {tuple(delta.shape)}"
        )
    if in_idx.dim() != 1 or out_idx.dim() != 1:
        raise ValueError("in_idx and out_idx must be 1-D index tensors")
    m_in, m_out = in_idx.numel(), out_idx.numel()
    if rows.dim() != 2 or rows.shape != signs.shape or rows.shape[1] != m_in * m_out:
        raise ValueError(
            f"rows and signs must be [s, m_out * m_in] = [s, {m_out * m_in}]; got {tuple(rows.shape)}, "
            f"{tuple(signs.shape)}"
        )
    _check_device(x.device, delta=delta, in_idx=in_idx, out_idx=out_idx, rows=rows, signs=signs)
    acc = accumulation_dtype(x, delta)
    batch, n_tok = x.shape[:2]
    s = rows.shape[0]
    out = torch.zeros(batch, k, dtype=acc, device=x.device)
    if batch == 0 or n_tok == 0 or m_in == 0 or m_out == 0 or s == 0 or k == 0:
        return out

    dot = _dot_dtype(x, delta)
    meta = _factgrass_meta(dot, m_in, m_out)
    block_o, block_i, block_t = meta["BLOCK_O"], meta["BLOCK_I"], meta["BLOCK_T"]
    n_tiles = triton.cdiv(m_out, block_o) * triton.cdiv(m_in, block_i)
    if n_tiles > _MAX_GRID_YZ:
        raise ValueError(
            f"m_out * m_in = {m_out * m_in} needs {n_tiles} tiles, over the grid limit {_MAX_GRID_YZ}"
        )
    if tokens_per_program is None:
        # split T only as far as needed to fill the device, never below _MIN_TOKENS_PER_PROGRAM tokens
        want_chunks = triton.cdiv(_target_programs(x.device), batch * n_tiles)
        max_chunks = max(1, n_tok // _MIN_TOKENS_PER_PROGRAM)
        tokens_per_program = triton.cdiv(n_tok, max(1, min(want_chunks, max_chunks)))
    if tokens_per_program <= 0:
        raise ValueError(f"tokens_per_program must be positive, got {tokens_per_program}")
    # whole BLOCK_T steps per program, so only the last chunk of an example is ragged
    tokens_per_program = triton.cdiv(min(tokens_per_program, n_tok), block_t) * block_t
    n_tchunks = triton.cdiv(n_tok, tokens_per_program)

    grid = (batch * n_tchunks, n_tiles)
    _factgrass_kernel[grid](
        x,
        delta,
        in_idx.contiguous(),
        out_idx.contiguous(),
        rows.contiguous(),
        signs.contiguous(),
        out,
        n_tok,
        m_in,
        m_out,
        m_out * m_in,
        s,
        -1 if bias_index is None else int(bias_index),
        n_tchunks,
        tokens_per_program,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        delta.stride(0),
        delta.stride(1),
        delta.stride(2),
        out.stride(0),
        HAS_BIAS=bias_index is not None,
        DOT_DTYPE=_TL_DTYPES[dot],
        ACC_DTYPE=_TL_DTYPES[acc],
        IEEE_DOT=dot in (torch.float32, torch.float64),
        **meta,
    )
    return out


def factgrass_project(
    x: torch.Tensor,
    delta: torch.Tensor,
    in_idx: torch.Tensor,
    out_idx: torch.Tensor,
    rows: torch.Tensor,
    signs: torch.Tensor,
    k: int,
    bias_index: int | None = None,
) -> torch.Tensor:
    """Fused FactGraSS without scale: SJLT of vec(``sum_t delta[b,t,out_idx] x[b,t,in_idx]^T``) -> ``[B, k]``.

    Args:
        x: ``[B, T, d_in]`` module inputs without the bias column (any strides).
        delta: ``[B, T, d_out]`` output gradients (any strides).
        in_idx, out_idx: sorted integer masks of sizes m_in, m_out; the last entry of ``in_idx`` may
            equal ``bias_index``, which stands for an implicit column of ones. Entries are not
            range-checked (that would sync the device); out-of-range ones read arbitrary memory.
        rows, signs: the SJLT ``[s, m_out * m_in]`` of the row-major ``(o, i)`` coordinates.
        k: output dimension.
        bias_index: index of the implicit ones column, or None.

    Returns:
        ``[B, k]`` in float32 (float64 when an input is float64), like the reference.
    """
    return _factgrass_launch(x, delta, in_idx, out_idx, rows, signs, k, bias_index, None)

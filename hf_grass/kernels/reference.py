"""Torch reference implementations of the two hot loops.

These are the definitions the Triton kernels must match (see ``tests/test_kernels.py``); they run on
any device. Accumulation is float32, or float64 when the inputs are float64 (the oracle tests).

The SJLT has two equivalent forms here:

* :func:`sjlt_project` scatters: input coordinate ``j`` adds into its rows with ``index_add_``. On
  the CPU ``index_add_`` adds the coordinates of each output in a fixed order (replica ``r``, then
  ``j`` ascending), so it is deterministic; this is the CPU path, and every cache on disk was written
  with it. On CUDA ``index_add_`` uses atomics and its summation order changes from run to run.
* :func:`sjlt_project_gather` gathers: each output row walks its own list of input coordinates (the
  inverse index of :func:`sjlt_gather_index`, derived from the rows once) and adds them one after
  another. No two threads ever write one output, so it is deterministic on every device; it is the
  torch path on non-CPU devices and, step for step, what the deterministic Triton kernel computes.
"""

from __future__ import annotations

import torch

from hf_grass.kernels.onehot import OneHot


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def projection_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype of the dense projections of a model's activations (a factor map ``x @ B``, a wide
    side's outer-product sum): bfloat16 for a bfloat16 model, whose tensor cores do these products
    ~10x faster than float32 (GPU, Llama-8B shape: the conversions and float32 products were a third
    of the pass), with float32 accumulation inside the product and a relative rounding of ~2^-9 on
    its result, far below the int8 storage's; float32 otherwise (float16's range could overflow in a
    projection), float64 for float64 models (the oracle tests)."""
    if all(t.dtype == torch.bfloat16 for t in tensors):
        return torch.bfloat16
    return accumulation_dtype(*tensors)


def sjlt_project(g: torch.Tensor, rows: torch.Tensor, signs: torch.Tensor, k: int) -> torch.Tensor:
    """Sparse JL transform: input coordinate j adds ``signs[r, j] * g[:, j]`` to row ``rows[r, j]``.

    Args:
        g: ``[B, n]`` inputs (any float dtype).
        rows: ``[s, n]`` int64 target rows in ``[0, k)``.
        signs: ``[s, n]`` float32 signs, already scaled by ``1/sqrt(s)``.
        k: output dimension.

    Returns:
        ``[B, k]`` in the accumulation dtype.
    """
    acc = accumulation_dtype(g)
    g = g.to(acc)
    out = torch.zeros(g.shape[0], k, dtype=acc, device=g.device)
    for r in range(rows.shape[0]):
        # index_add_ along dim 1 measured fastest on CPU (vs CSR matmul or a transposed scatter)
        out.index_add_(1, rows[r], g * signs[r].to(acc))
    return out


def sjlt_gather_index(rows: torch.Tensor, signs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse index of an SJLT: for each output row, the input coordinates that map to it.

    Returns ``cols [L, k]`` (int64, ``-1`` past a row's end) and ``vals [L, k]`` (the signs, 0 there),
    where ``L`` is the longest row: entry ``(e, r)`` is the ``e``-th input of output ``r``. Inputs of
    a row are in the order ``index_add_`` adds them (replica ``r`` first, then ``j`` ascending), and a
    stable sort makes that order, and so the tables, a pure function of ``rows``: the same integers on
    every device. The ``[L, k]`` layout puts the ``e``-th inputs of neighbouring outputs side by side
    (coalesced loads on a GPU).
    """
    if rows.dim() != 2 or rows.shape != signs.shape:
        raise ValueError(f"rows and signs must both be [s, n]; got {tuple(rows.shape)}, {tuple(signs.shape)}")
    s, n = rows.shape
    flat = rows.reshape(-1).to(torch.int64)
    if flat.numel() == 0 or k == 0:
        empty = torch.empty(0, k, dtype=torch.int64, device=rows.device)
        return empty, torch.empty(0, k, dtype=torch.float32, device=rows.device)
    order = torch.argsort(flat, stable=True)  # entry r * n + j: replica-major, then j
    target = flat[order]
    counts = torch.bincount(flat, minlength=k)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(flat.numel(), device=rows.device) - starts[target]
    width = int(counts.max())
    cols = torch.full((width, k), -1, dtype=torch.int64, device=rows.device)
    vals = torch.zeros(width, k, dtype=torch.float32, device=rows.device)
    cols[position, target] = order % n
    vals[position, target] = signs.reshape(-1)[order].to(torch.float32)
    return cols, vals


def sjlt_project_gather(
    g: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, steps_per_part: int | None = None
) -> torch.Tensor:
    """:func:`sjlt_project` through the inverse index, in a fixed summation order (any device).

    Output ``r`` is ``((v_0 + v_1) + v_2) + ...`` with ``v_e = g[:, cols[e, r]] * vals[e, r]`` in
    the accumulation dtype, skipping padding. With ``steps_per_part`` the steps are summed in parts
    of that many, each from zero, and the parts are then added in order: the split the Triton kernel
    uses to spread long rows over programs. Rows are the same as :func:`sjlt_project`'s up to float
    rounding (bit for bit where both add in the same order, as with one part).
    """
    acc = accumulation_dtype(g)
    width, k = cols.shape
    g = g.to(acc)
    if steps_per_part is not None and steps_per_part <= 0:
        raise ValueError(f"steps_per_part must be positive, got {steps_per_part}")
    step = max(width, 1) if steps_per_part is None else steps_per_part
    out = torch.zeros(g.shape[0], k, dtype=acc, device=g.device)
    for start in range(0, width, step):
        part = torch.zeros_like(out)
        for e in range(start, min(start + step, width)):
            valid = cols[e] >= 0
            v = g.index_select(1, cols[e].clamp_min(0)) * vals[e].to(acc)
            # a padding step leaves the sum as it is: it must not add g[:, 0] * 0 (NaN if g is inf there)
            part = torch.where(valid, part + v, part)
        out = part if start == 0 else out + part
    return out


def sum_parts(parts: torch.Tensor) -> torch.Tensor:
    """``((parts[0] + parts[1]) + parts[2]) + ...`` over dim 0: partial sums added in a fixed order."""
    out = parts[0]
    for c in range(1, parts.shape[0]):
        out = out + parts[c]
    return out


def gather_columns(x: torch.Tensor, idx: torch.Tensor, bias_index: int | None) -> torch.Tensor:
    """``x[..., idx]``, where ``idx == bias_index`` stands for an implicit trailing column of ones.

    This lets a module with bias use the "input gets a trailing 1" convention without copying the
    whole activation to append that column.
    """
    if bias_index is None or idx.numel() == 0 or int(idx[-1]) != bias_index:
        return take_columns(x, idx)
    # idx is sorted, so only its last entry can be the bias column
    body = take_columns(x, idx[:-1])
    ones = torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
    return torch.cat([body, ones], dim=-1)


def take_columns(x: torch.Tensor | OneHot, idx: torch.Tensor) -> torch.Tensor:
    """``x[..., idx]`` via ``index_select`` on a 2-D view: ~3x faster than advanced indexing on CPU.
    A one-hot ``x`` (an embedding's ids) compares its ids with ``idx`` instead."""
    if isinstance(x, OneHot):
        return x.take_columns(idx)
    flat = x.reshape(-1, x.shape[-1]).index_select(1, idx)
    return flat.view(*x.shape[:-1], idx.numel())


def masked_outer(
    x: torch.Tensor,
    delta: torch.Tensor,
    in_idx: torch.Tensor,
    out_idx: torch.Tensor,
    bias_index: int | None,
) -> torch.Tensor:
    """``G'[b] = sum_t delta[b, t, out_idx] x[b, t, in_idx]^T`` -> ``[B, m_out, m_in]`` (fp32 accumulate)."""
    acc = accumulation_dtype(x, delta)
    xs = gather_columns(x, in_idx, bias_index).to(acc)
    ds = take_columns(delta, out_idx).to(acc)
    return torch.bmm(ds.transpose(1, 2), xs)


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
    """Fused FactGraSS without scale: SJLT of vec(masked_outer(...)) -> ``[B, k]``.

    Args:
        x: ``[B, T, d_in]`` module inputs (without the bias column).
        delta: ``[B, T, d_out]`` output gradients.
        in_idx, out_idx: sorted int64 masks of sizes m_in, m_out (``bias_index`` may be in in_idx).
        rows, signs: the SJLT of the ``m_out * m_in`` masked coordinates (row-major ``(o, i)``).
    """
    gp = masked_outer(x, delta, in_idx, out_idx, bias_index)
    return sjlt_project(gp.reshape(gp.shape[0], -1), rows, signs, k)

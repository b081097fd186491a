"""One-hot factors, kept as the token ids: the input of an ``nn.Embedding``.

An embedding is the linear map ``y_t = W^T e_{id_t}`` of a one-hot input, so its per-example gradient
factorises like a linear layer's (``sum_t delta_t e_{id_t}^T``), with a factor as wide as the
vocabulary. ``OneHot`` stands for that ``[B, T, width]`` factor without building it: every map a
compressor applies to a factor is then a gather (rows of a matrix, columns of a mask, buckets of a
hash) or an ``index_add`` over the tokens, and never costs O(T * width).

Id ``-1`` stands for a zero row: a token whose gradient does not reach the weight (an embedding's
``padding_idx``), or a padding slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OneHot:
    """The one-hot rows ``e_{ids[b, t]}`` of ``width`` coordinates, in ``dtype`` (``[B, T, width]``)."""

    ids: torch.Tensor  # [B, T] int64 in [-1, width)
    width: int
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.ids.shape, self.width))

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def dim(self) -> int:
        return self.ids.dim() + 1

    def to(self, target: torch.dtype | torch.device | str) -> OneHot:
        """A dtype changes the dtype of the rows (what ``accumulation_dtype`` reads); a device moves
        the ids."""
        if isinstance(target, torch.dtype):
            return OneHot(self.ids, self.width, target)
        return OneHot(self.ids.to(target), self.width, self.dtype)

    @property
    def valid(self) -> torch.Tensor:
        """``[B, T]`` bool: the rows that are not zero."""
        return self.ids >= 0

    def dense(self) -> torch.Tensor:
        """The explicit ``[B, T, width]`` rows (for compressors that build the gradient, and tests)."""
        out = torch.nn.functional.one_hot(self.ids.clamp(min=0), self.width).to(self.dtype)
        return out * self.valid.unsqueeze(-1).to(self.dtype)

    def __matmul__(self, mat: torch.Tensor) -> torch.Tensor:
        """``rows @ mat`` for ``mat [width, m]``: the rows ``mat[ids]`` (zero for id -1)."""
        if mat.dim() != 2 or mat.shape[0] != self.width:
            raise ValueError(
                f"a one-hot factor of width {self.width} cannot multiply a {tuple(mat.shape)} matrix"
            )
        out = mat.to(self.dtype)[self.ids.clamp(min=0)]
        return out * self.valid.unsqueeze(-1).to(out.dtype)

    def take_columns(self, idx: torch.Tensor) -> torch.Tensor:
        """``rows[..., idx]`` -> ``[B, T, m]``: 1 where a token's id is the kept coordinate."""
        return (self.ids.unsqueeze(-1) == idx.to(self.ids.device)).to(self.dtype)

    def scatter(self, buckets: torch.Tensor, weights: torch.Tensor, m: int) -> torch.Tensor:
        """``[B, T, m]``: each token's row adds ``weights[id]`` to bucket ``buckets[id]`` (a signed,
        weighted hash of the coordinates, ``factor_maps.HashMap``)."""
        ids = self.ids.clamp(min=0)
        values = weights.to(self.device, self.dtype)[ids] * self.valid.to(self.dtype)
        out = torch.zeros(*self.ids.shape, m, dtype=self.dtype, device=self.device)
        return out.scatter_(-1, buckets.to(self.device)[ids].unsqueeze(-1), values.unsqueeze(-1))

    def outer_sum(self, other: torch.Tensor) -> torch.Tensor:
        """``sum_t e_{id_t} other_t^T`` per example: ``other [B, T, n]`` -> ``[B, width, n]``, by
        ``index_add`` of the tokens' rows (the one-hot side's own coordinates, e.g. a hashed side's
        curvature space)."""
        batch, tokens = self.ids.shape
        if other.shape[:2] != (batch, tokens):
            raise ValueError(
                f"one-hot ids {tuple(self.ids.shape)} and factor {tuple(other.shape)} do not align"
            )
        keep = self.valid.reshape(-1)
        rows = (torch.arange(batch, device=self.device).unsqueeze(1) * self.width + self.ids).reshape(-1)[
            keep
        ]
        out = torch.zeros(batch * self.width, other.shape[-1], dtype=other.dtype, device=other.device)
        out.index_add_(0, rows.to(other.device), other.reshape(-1, other.shape[-1])[keep.to(other.device)])
        return out.view(batch, self.width, other.shape[-1])

    def select(self, mask: torch.Tensor | None) -> torch.Tensor:
        """The ids of the tokens ``mask`` keeps (all when ``mask`` does not fit), flattened."""
        if mask is not None and mask.shape == self.ids.shape:
            return self.ids[mask]
        return self.ids.reshape(-1)

    def counts(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[width]`` float64 token counts: the diagonal of ``sum_t e_t e_t^T`` (zero rows left out)."""
        ids = self.select(mask)
        return torch.bincount(ids[ids >= 0], minlength=self.width).to(torch.float64)


def factor_product(xs: torch.Tensor | OneHot, ds: torch.Tensor | OneHot) -> torch.Tensor:
    """``sum_t ds_t xs_t^T`` per example -> ``[B, c_out, c_in]``; a one-hot side (an embedding's
    vocabulary side, kept one-hot in curvature coordinates) is an ``index_add`` of the tokens."""
    if isinstance(xs, OneHot):
        return xs.outer_sum(ds).transpose(1, 2)  # type: ignore[arg-type]
    if isinstance(ds, OneHot):
        return ds.outer_sum(xs)
    return torch.bmm(ds.transpose(1, 2), xs)

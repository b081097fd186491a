"""`mask`: keep k gradient coordinates drawn uniformly without replacement, scaled by sqrt(p/k).

``compress(x, delta)`` reads only the k kept coordinates, ``sum_t delta[t, o_j] x[t, i_j]``, so its
cost is O(T k) per example and independent of the module size.
"""

from __future__ import annotations

import math

import torch

from hf_grass.compressors.base import Compressor, register_compressor
from hf_grass.kernels.reference import accumulation_dtype, take_columns
from hf_grass.seeding import sample_without_replacement


def masked_coordinates(
    x: torch.Tensor, delta: torch.Tensor, idx: torch.Tensor, d_in: int, bias_index: int | None
) -> torch.Tensor:
    """``[B, len(idx)]``: the coordinates ``idx`` of vec(sum_t delta_t x_t^T), without building G."""
    acc = accumulation_dtype(x, delta)
    out_rows, in_cols = idx // d_in, idx % d_in
    if bias_index is None:
        xs = take_columns(x, in_cols).to(acc)
    else:  # the bias column is implicit: gather the others, then write the ones
        xs = take_columns(x, in_cols.clamp(max=bias_index - 1)).to(acc)
        xs[..., in_cols == bias_index] = 1.0
    # an elementwise product summed over tokens: einsum would permute memory first
    return (take_columns(delta, out_rows).to(acc) * xs).sum(dim=1)


@register_compressor("mask")
class MaskCompressor(Compressor):
    def _draw(self) -> None:
        self.idx = sample_without_replacement(self.p, self.output_dim, self.generator("mask"))
        self.scale = math.sqrt(self.p / self.output_dim)

    def compress(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        self._check_factors(x, delta)
        return masked_coordinates(x, delta, self.idx, self.d_in, self.bias_index) * self.scale

    def _compress_flat(self, v: torch.Tensor) -> torch.Tensor:
        return v[:, self.idx].to(accumulation_dtype(v)) * self.scale

    def dense_matrix(self) -> torch.Tensor:
        mat = torch.zeros(self.output_dim, self.p, dtype=torch.float64)
        mat[torch.arange(self.output_dim), self.idx.cpu()] = self.scale
        return mat

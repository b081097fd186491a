"""`fjlt`: fast JL transform ``sqrt(P/k) S H D`` (TRAK's CUDA projector, in torch).

D: random signs; H: the normalised Walsh-Hadamard transform on the input zero-padded to P = 2^m;
S: k of the P rows drawn without replacement. The scale uses the padded size P so that
``E ||C g||^2 = ||g||^2`` holds exactly. O(P log P) per example.
"""

from __future__ import annotations

import math

import torch

from hf_grass.compressors.base import Compressor, register_compressor
from hf_grass.kernels.reference import accumulation_dtype
from hf_grass.seeding import random_signs, sample_without_replacement

# Hadamard factors are applied as small dense matmuls (BLAS-friendly) instead of log2(P) butterflies.
_FACTOR = 64


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Unnormalised Sylvester Hadamard matrix of size n (a power of two)."""
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def fwht(v: torch.Tensor) -> torch.Tensor:
    """Normalised Walsh-Hadamard transform along the last dim of ``[B, P]`` (P a power of two).

    H_P = H_{f1} ⊗ H_{f2} ⊗ ..., so we view the vector as a tensor with one axis per factor and
    apply each small Hadamard matrix along its axis.
    """
    batch, n = v.shape
    factors = []
    rest = n
    while rest > 1:
        f = min(_FACTOR, rest)
        factors.append(f)
        rest //= f
    out = v.reshape(batch, *factors)
    for axis, f in enumerate(factors, start=1):
        h = hadamard_matrix(f, v.dtype).to(v.device)
        out = torch.movedim(torch.tensordot(out, h, dims=([axis], [0])), -1, axis)
    return out.reshape(batch, n) / math.sqrt(n)


@register_compressor("fjlt")
class FJLTCompressor(Compressor):
    def _draw(self) -> None:
        self.padded = 1 << max(0, (self.p - 1).bit_length())
        self.signs = random_signs(self.p, self.generator("signs"))
        self.rows = sample_without_replacement(self.padded, self.output_dim, self.generator("rows"))
        self.scale = math.sqrt(self.padded / self.output_dim)

    def _compress_flat(self, v: torch.Tensor) -> torch.Tensor:
        acc = accumulation_dtype(v)
        padded = torch.zeros(v.shape[0], self.padded, dtype=acc, device=v.device)
        padded[:, : self.p] = v.to(acc) * self.signs.to(acc)
        return fwht(padded)[:, self.rows] * self.scale

    def dense_matrix(self) -> torch.Tensor:
        h = hadamard_matrix(self.padded) / math.sqrt(self.padded)
        return self.scale * h[self.rows.cpu(), : self.p] * self.signs.cpu().to(torch.float64)

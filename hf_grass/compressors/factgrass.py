"""`factgrass`: FactGraSS (Hu et al., 2025) — mask both factors, then SJLT the small outer product.

Masks ``S_in`` (m_in of the d_in input columns) and ``S_out`` (m_out of the d_out outputs), with
m_in * m_out = k' = sparsify_factor * k (each 2 sqrt(k) by default; clamped to the module's widths
with the product kept >= k'), give the masked gradient ``G' = sum_t delta_t[S_out] x_t[S_in]^T``
scaled by ``sqrt(d_in d_out / (m_in m_out))``; an SJLT maps vec(G') to k. Cost O(T k') per example,
with no dependence on d_in d_out, and G is never built. On CUDA two deterministic Triton kernels
do it: gather and outer-product sum per token chunk, then the SJLT gathered through its inverse
index (:mod:`hf_grass.kernels.triton_kernels`).
"""

from __future__ import annotations

import math

import torch

from hf_grass import kernels
from hf_grass.compressors.base import (
    CompressorSettings,
    FactorisedCompressor,
    nearest_square,
    register_compressor,
)
from hf_grass.compressors.sjlt import check_sjlt_settings, make_sjlt
from hf_grass.kernels.reference import accumulation_dtype, gather_columns, take_columns
from hf_grass.seeding import sample_without_replacement


def factor_sizes(k_prime: int, d_in: int, d_out: int) -> tuple[int, int]:
    """(m_in, m_out): sqrt(k') each where the module allows, else the product kept >= k' if possible."""
    m = math.isqrt(k_prime)
    m_in = min(d_in, m)
    m_out = min(d_out, math.ceil(k_prime / m_in))
    m_in = min(d_in, math.ceil(k_prime / m_out))
    return m_in, m_out


@register_compressor("factgrass")
class FactGraSSCompressor(FactorisedCompressor):
    @classmethod
    def check_config(cls, config: CompressorSettings) -> None:
        check_sjlt_settings(config)
        k_prime = config.sparsify_factor * config.proj_dim
        if math.isqrt(k_prime) ** 2 != k_prime:
            raise ValueError(
                f"factgrass masks both factors to sqrt(sparsify_factor*proj_dim) coordinates, so "
                f"sparsify_factor*proj_dim={k_prime} must be a perfect square. Use a square proj_dim "
                f"(e.g. {nearest_square(config.proj_dim)}) with sparsify_factor=4, or adjust both."
            )

    def _draw(self) -> None:
        k_prime = self.config.sparsify_factor * self.output_dim
        self.m_in, self.m_out = factor_sizes(k_prime, self.d_in, self.d_out)
        self.in_idx = sample_without_replacement(self.d_in, self.m_in, self.generator("mask_in"))
        self.out_idx = sample_without_replacement(self.d_out, self.m_out, self.generator("mask_out"))
        # pass the bias index on only when the mask drew the bias column (decided once, on the CPU,
        # so the hot path never syncs a device to check)
        drawn = self.bias and int(self.in_idx[-1]) == self.d_in - 1
        self.mask_bias_index = self.bias_index if drawn else None
        self.scale_in = math.sqrt(self.d_in / self.m_in)
        self.scale_out = math.sqrt(self.d_out / self.m_out)
        self.sjlt = make_sjlt(
            self.generator("sjlt"), self.m_in * self.m_out, self.output_dim, self.config.sjlt_nnz
        )

    def factors(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acc = accumulation_dtype(x, delta)
        xs = gather_columns(x, self.in_idx, self.mask_bias_index).to(acc) * self.scale_in
        return xs, take_columns(delta, self.out_idx).to(acc) * self.scale_out

    def compress(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        # factor path: gather + outer-product sum + SJLT (Triton on CUDA), scale applied once at the end
        self._check_factors(x, delta)
        out = kernels.factgrass_project(x, delta, self.in_idx, self.out_idx, self.sjlt, self.mask_bias_index)
        return out * (self.scale_in * self.scale_out)

    def factor_gradient_from_full(self, g: torch.Tensor) -> torch.Tensor:
        acc = accumulation_dtype(g)
        sub = g.to(acc)[:, self.out_idx][:, :, self.in_idx]
        return sub * (self.scale_in * self.scale_out)

    def project_factor(self, gp: torch.Tensor) -> torch.Tensor:
        return kernels.sjlt_project(gp.reshape(gp.shape[0], -1), self.sjlt)

    def project_factor_matrix(self) -> torch.Tensor:
        return self.sjlt.dense()

    def mask_matrix(self) -> torch.Tensor:
        """The explicit ``[m_out*m_in, p]`` float64 matrix of the scaled two-sided mask."""
        rows = torch.arange(self.m_out * self.m_in)
        cols = (self.out_idx.cpu()[:, None] * self.d_in + self.in_idx.cpu()[None, :]).reshape(-1)
        mat = torch.zeros(self.m_out * self.m_in, self.p, dtype=torch.float64)
        mat[rows, cols] = self.scale_in * self.scale_out
        return mat

    def dense_matrix(self) -> torch.Tensor:
        return self.project_factor_matrix() @ self.mask_matrix()

"""`factgrass`: FactGraSS (Hu et al., 2025) — mask both factors, then SJLT the small outer product.

Masks ``S_in`` (m_in of the d_in input columns) and ``S_out`` (m_out of the d_out outputs), with
m_in * m_out = k' = sparsify_factor * k (each 2 sqrt(k) by default; clamped to the module's widths
with the product kept >= k'), give the masked gradient ``G' = sum_t delta_t[S_out] x_t[S_in]^T``
scaled by ``sqrt(d_in d_out / (m_in m_out))``; an SJLT maps vec(G') to k. Cost O(T k') per example,
with no dependence on d_in d_out, and G is never built. On CUDA two deterministic Triton kernels
do it: gather and outer-product sum per token chunk, then the SJLT gathered through its inverse
index (:mod:`hf_grass.kernels.triton_kernels`).

Two layouts: per module (``proj_dim``: k' = sparsify_factor * k as above) or global (``total_dim``:
``factor_dim`` coordinates per side, and the SJLT maps into the row shared by every module).

Masks in a fitted basis (``mask_basis="eigen"``): after the warm-up K-FAC fit, ``set_basis`` gives
each side a ``[d, m]`` map whose columns are the eigen-directions the mask drew (or, for factors too
wide to eigendecompose, a signed hashing of the coordinates); the factors are then ``x @ B`` instead
of a gather, so the mask keeps whole eigen-directions of the full factor space. That costs
``m (d_in + d_out)`` per token, like LoGra, and measured far better rankings than masks in the
module's own coordinates (docs/benchmarks.md, "Attribution quality").
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
from hf_grass.kernels import SJLTMap
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
    def factor_widths(cls, config: CompressorSettings, d_in: int, d_out: int) -> tuple[int, int]:
        """``(m_in, m_out)`` of a module in the global layout (what ``_draw`` will use)."""
        return min(d_in, config.factor_dim), min(d_out, config.factor_dim)

    @classmethod
    def check_config(cls, config: CompressorSettings) -> None:
        check_sjlt_settings(config)
        if config.total_dim is not None:  # global layout: factor_dim coordinates per side
            return
        k_prime = config.sparsify_factor * config.proj_dim
        if math.isqrt(k_prime) ** 2 != k_prime:
            raise ValueError(
                f"factgrass masks both factors to sqrt(sparsify_factor*proj_dim) coordinates, so "
                f"sparsify_factor*proj_dim={k_prime} must be a perfect square. Use a square proj_dim "
                f"(e.g. {nearest_square(config.proj_dim)}) with sparsify_factor=4, or adjust both."
            )

    def _draw(self) -> None:
        if self.config.total_dim is None:
            k_prime = self.config.sparsify_factor * self.output_dim
            self.m_in, self.m_out = factor_sizes(k_prime, self.d_in, self.d_out)
        else:
            self.m_in, self.m_out = self.factor_widths(self.config, self.d_in, self.d_out)
        self.in_idx = sample_without_replacement(self.d_in, self.m_in, self.generator("mask_in"))
        self.out_idx = sample_without_replacement(self.d_out, self.m_out, self.generator("mask_out"))
        # pass the bias index on only when the mask drew the bias column (decided once, on the CPU,
        # so the hot path never syncs a device to check)
        drawn = self.bias and int(self.in_idx[-1]) == self.d_in - 1
        self.mask_bias_index = self.bias_index if drawn else None
        self.scale_in = math.sqrt(self.d_in / self.m_in)
        self.scale_out = math.sqrt(self.d_out / self.m_out)
        n = self.m_in * self.m_out
        if self.embed:  # the identity map: each factor coordinate keeps its own slot of the row
            self.output_dim = n
            self.sjlt = SJLTMap(torch.arange(n)[None], torch.ones(1, n), n)
        else:
            self.sjlt = make_sjlt(self.generator("sjlt"), n, self.output_dim, self.config.sjlt_nnz)
        self.basis_in: torch.Tensor | None = None  # [d_in, m_in] once set_basis is called
        self.basis_out: torch.Tensor | None = None  # [d_out, m_out]

    @property
    def rotated(self) -> bool:
        """Whether the masks are taken in a fitted basis (``set_basis``)."""
        return self.basis_in is not None

    def set_basis(
        self, basis_in: torch.Tensor, basis_out: torch.Tensor, scale_in: float, scale_out: float
    ) -> None:
        """Take the masks in a fitted basis: ``basis_in [d_in, m_in]`` (bias row last) and
        ``basis_out [d_out, m_out]`` map the factors, scaled by ``scale_in`` / ``scale_out`` (so that
        ``E ||C g||^2 = ||g||^2`` over the mask's draw)."""
        if tuple(basis_in.shape) != (self.d_in, self.m_in) or tuple(basis_out.shape) != (self.d_out, self.m_out):
            raise ValueError(
                f"{self.module_name}: a basis of shapes {tuple(basis_in.shape)} and {tuple(basis_out.shape)} "
                f"does not fit masks of [{self.d_in}, {self.m_in}] and [{self.d_out}, {self.m_out}]"
            )
        self.basis_in = basis_in.to(self.device, torch.float32)
        self.basis_out = basis_out.to(self.device, torch.float32)
        self.scale_in, self.scale_out = float(scale_in), float(scale_out)

    def factors(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acc = accumulation_dtype(x, delta)
        if self.basis_in is not None and self.basis_out is not None:
            b_in = self.basis_in.to(acc)
            xs = x.to(acc) @ b_in[: x.shape[-1]]
            if self.bias:  # the implicit column of ones maps to the basis's last row
                xs = xs + b_in[-1]
            return xs * self.scale_in, (delta.to(acc) @ self.basis_out.to(acc)) * self.scale_out
        xs = gather_columns(x, self.in_idx, self.mask_bias_index).to(acc) * self.scale_in
        return xs, take_columns(delta, self.out_idx).to(acc) * self.scale_out

    def compress(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.rotated:  # projections instead of gathers: no fused kernel
            return self.project_factor(self.factor_gradient(x, delta))
        # factor path: gather + outer-product sum + SJLT (Triton on CUDA), scale applied once at the end
        self._check_factors(x, delta)
        out = kernels.factgrass_project(x, delta, self.in_idx, self.out_idx, self.sjlt, self.mask_bias_index)
        return out * (self.scale_in * self.scale_out)

    def factor_gradient_from_full(self, g: torch.Tensor) -> torch.Tensor:
        acc = accumulation_dtype(g)
        if self.basis_in is not None and self.basis_out is not None:
            sub = self.basis_out.to(acc).T @ g.to(acc) @ self.basis_in.to(acc)
            return sub * (self.scale_in * self.scale_out)
        sub = g.to(acc)[:, self.out_idx][:, :, self.in_idx]
        return sub * (self.scale_in * self.scale_out)

    def project_factor(self, gp: torch.Tensor) -> torch.Tensor:
        return kernels.sjlt_project(gp.reshape(gp.shape[0], -1), self.sjlt)

    def project_factor_matrix(self) -> torch.Tensor:
        return self.sjlt.dense()

    def mask_matrix(self) -> torch.Tensor:
        """The explicit ``[m_out*m_in, p]`` float64 matrix of the scaled two-sided mask."""
        if self.basis_in is not None and self.basis_out is not None:
            kron = torch.kron(self.basis_out.cpu().double().T, self.basis_in.cpu().double().T)
            return kron * (self.scale_in * self.scale_out)
        rows = torch.arange(self.m_out * self.m_in)
        cols = (self.out_idx.cpu()[:, None] * self.d_in + self.in_idx.cpu()[None, :]).reshape(-1)
        mat = torch.zeros(self.m_out * self.m_in, self.p, dtype=torch.float64)
        mat[rows, cols] = self.scale_in * self.scale_out
        return mat

    def dense_matrix(self) -> torch.Tensor:
        return self.project_factor_matrix() @ self.mask_matrix()

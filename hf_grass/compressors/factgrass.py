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

Masks in a fitted basis (``mask_basis="eigen"``): after the warm-up K-FAC fit, ``set_maps`` gives
each side a map (``factor_maps``): the eigen-directions the mask drew, or, for factors too wide to
eigendecompose, a whitened signed hashing of the coordinates; the factors are then ``x @ B`` instead
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
from hf_grass.compressors.factor_maps import FactorMap, HashMap
from hf_grass.compressors.sjlt import check_sjlt_settings, make_sjlt
from hf_grass.kernels import SJLTMap
from hf_grass.kernels.onehot import OneHot, factor_product
from hf_grass.kernels.reference import accumulation_dtype, gather_columns, projection_dtype, take_columns
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
        self.map_in: FactorMap | None = None  # masks in a fitted basis: set_maps
        self.map_out: FactorMap | None = None

    @property
    def has_maps(self) -> bool:
        """Whether the masks are taken in a fitted basis (``set_maps``)."""
        return self.map_in is not None

    @property
    def hashed(self) -> bool:
        """Whether a side is hashed: its curvature is then known per coordinate, not per bucket."""
        return any(m is not None and m.hashed for m in (self.map_in, self.map_out))

    @property
    def curvature_shape(self) -> tuple[int, int]:
        """``(c_out, c_in)`` of ``curvature_gradient``: a hashed side's own width, else the factor's."""
        return (
            self.d_out if isinstance(self.map_out, HashMap) else self.m_out,
            self.d_in if isinstance(self.map_in, HashMap) else self.m_in,
        )

    def set_maps(self, map_in: FactorMap, map_out: FactorMap) -> None:
        """Take the masks in a fitted basis: ``map_in`` / ``map_out`` (``factor_maps``) map each side
        to its ``m_in`` / ``m_out`` factor coordinates (the input map's last row is the bias's)."""
        for label, fmap, d, m in (("input", map_in, self.d_in, self.m_in), ("output", map_out, self.d_out, self.m_out)):
            rows = fmap.d if isinstance(fmap, HashMap) else fmap.vectors.shape[0]
            if (rows, fmap.width) != (d, m):
                raise ValueError(
                    f"{self.module_name}: an {label} map of [{rows}, {fmap.width}] does not fit masks of [{d}, {m}]"
                )
        self.map_in, self.map_out = map_in.to(self.device), map_out.to(self.device)

    def to(self, device: torch.device | str) -> FactGraSSCompressor:
        super().to(device)
        if self.map_in is not None and self.map_out is not None:
            self.map_in, self.map_out = self.map_in.to(device), self.map_out.to(device)
        return self

    def factors(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acc = accumulation_dtype(x, delta)
        if self.map_in is not None and self.map_out is not None:
            # (a one-hot side, an embedding's ids, gathers rows of its map: OneHot.__matmul__)
            # the products in the model's dtype where that is bfloat16 (``projection_dtype``), the
            # small factors in the accumulation dtype
            prec = projection_dtype(x, delta)
            xs = self.map_in.apply(x.to(prec), bias=self.bias, dtype=acc)
            return xs, self.map_out.apply(delta.to(prec), dtype=acc)
        xs = gather_columns(x, self.in_idx, self.mask_bias_index).to(acc) * self.scale_in
        return xs, take_columns(delta, self.out_idx).to(acc) * self.scale_out

    def curvature_factors(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors with each hashed side in its own coordinates (``d`` wide, unweighted; the
        input's bias column appended), in ``projection_dtype``: where that side's curvature is known
        per coordinate. Each side is computed once (a hashed side is never hashed here)."""
        self._check_factors(x, delta)
        prec = projection_dtype(x, delta)
        sides = []
        for fmap, t, bias in ((self.map_in, x, self.bias), (self.map_out, delta, False)):
            if isinstance(fmap, HashMap):
                sides.append(self.with_bias_column(t.to(prec)) if bias else t.to(prec))
            else:
                assert fmap is not None, "curvature factors need the factor maps (set_maps)"
                sides.append(fmap.apply(t.to(prec), bias=bias))
        return sides[0], sides[1]

    def curvature_gradient(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``sum_t delta^c_t x^c_t^T`` of ``curvature_factors`` -> ``[B, c_out, c_in]`` in the
        accumulation dtype (the product in ``projection_dtype``)."""
        xs, ds = self.curvature_factors(x, delta)
        return factor_product(xs, ds).to(accumulation_dtype(x, delta))

    def to_factor_space(self, gp: torch.Tensor, query: bool = False) -> torch.Tensor:
        """Curvature-space gradients ``[B, c_out, c_in]`` -> factor space ``[B, m_out, m_in]``: each
        hashed side is hashed, with the train weights, or with the query weights (``query``)."""
        if isinstance(self.map_out, HashMap):
            gp = self.map_out.to_buckets(gp, dim=1, query=query)
        if isinstance(self.map_in, HashMap):
            gp = self.map_in.to_buckets(gp, dim=2, query=query)
        return gp

    def _dense_maps(self, query: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M_in [d_in, m_in], M_out [d_out, m_out])`` float64, scales included."""
        if self.map_in is not None and self.map_out is not None:
            return tuple(m.dense(query) if isinstance(m, HashMap) else m.dense() for m in (self.map_in, self.map_out))  # type: ignore[return-value]
        m_in = torch.zeros(self.d_in, self.m_in, dtype=torch.float64)
        m_in[self.in_idx.cpu(), torch.arange(self.m_in)] = self.scale_in
        m_out = torch.zeros(self.d_out, self.m_out, dtype=torch.float64)
        m_out[self.out_idx.cpu(), torch.arange(self.m_out)] = self.scale_out
        return m_in, m_out

    def compress(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.has_maps or isinstance(x, OneHot) or isinstance(delta, OneHot):  # no fused kernel
            return self.project_factor(self.factor_gradient(x, delta))
        # factor path: gather + outer-product sum + SJLT (Triton on CUDA), scale applied once at the end
        self._check_factors(x, delta)
        out = kernels.factgrass_project(x, delta, self.in_idx, self.out_idx, self.sjlt, self.mask_bias_index)
        return out * (self.scale_in * self.scale_out)

    def factor_gradient_from_full(self, g: torch.Tensor) -> torch.Tensor:
        acc = accumulation_dtype(g)
        if not self.has_maps:  # masks in the module's own coordinates: a gather
            sub = g.to(acc)[:, self.out_idx][:, :, self.in_idx]
            return sub * (self.scale_in * self.scale_out)
        m_in, m_out = self._dense_maps()
        return m_out.to(g.device, acc).T @ g.to(acc) @ m_in.to(g.device, acc)

    def curvature_gradient_from_full(self, g: torch.Tensor) -> torch.Tensor:
        """The curvature-space gradient of explicit gradients ``[B, d_out, d_in]`` (for oracles)."""
        acc = accumulation_dtype(g)
        m_in, m_out = self._dense_maps()
        if isinstance(self.map_in, HashMap):
            m_in = torch.eye(self.d_in, dtype=torch.float64)
        if isinstance(self.map_out, HashMap):
            m_out = torch.eye(self.d_out, dtype=torch.float64)
        return m_out.to(g.device, acc).T @ g.to(acc) @ m_in.to(g.device, acc)

    def project_factor(self, gp: torch.Tensor) -> torch.Tensor:
        return kernels.sjlt_project(gp.reshape(gp.shape[0], -1), self.sjlt)

    def project_factor_matrix(self) -> torch.Tensor:
        return self.sjlt.dense()

    def mask_matrix(self) -> torch.Tensor:
        """The explicit ``[m_out*m_in, p]`` float64 matrix of the scaled two-sided mask (train side)."""
        m_in, m_out = self._dense_maps()
        return torch.kron(m_out.T, m_in.T)

    def dense_matrix(self) -> torch.Tensor:
        return self.project_factor_matrix() @ self.mask_matrix()

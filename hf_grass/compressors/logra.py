"""`logra`: LoGra's Kronecker projection ``P_out G P_in^T`` (Choe et al., 2024).

Gaussian ``P_in [r, d_in]`` and ``P_out [r, d_out]`` with entries N(0, 1/r), r = sqrt(k), so
``E ||P_out G P_in^T||_F^2 = ||G||_F^2``. Computed as ``sum_t (P_out delta_t)(P_in x_t)^T``: the
per-example gradient is never built, but both factors cost a dense projection, O(T sqrt(k) (d_in+d_out)).
The factor space is the output space itself (``project_factor`` only flattens).
"""

from __future__ import annotations

import math

import torch

from hf_grass.compressors.base import (
    CompressorSettings,
    FactorisedCompressor,
    check_square,
    nearest_square,
    register_compressor,
)
from hf_grass.kernels.reference import accumulation_dtype


@register_compressor("logra")
class LoGraCompressor(FactorisedCompressor):
    @classmethod
    def check_config(cls, config: CompressorSettings) -> None:
        if math.isqrt(config.proj_dim) ** 2 != config.proj_dim:
            raise ValueError(
                f"logra factorises proj_dim into r_in*r_out with r_in=r_out, so it must be a perfect "
                f"square; got {config.proj_dim}. Try {nearest_square(config.proj_dim)}."
            )

    def _draw(self) -> None:
        r = check_square("proj_dim (logra)", self.output_dim)
        if r > self.d_in or r > self.d_out:
            raise ValueError(
                f"logra projects each factor of {self.module_name!r} to sqrt(proj_dim)={r}, larger than "
                f"its input ({self.d_in}) or output ({self.d_out}) width; lower proj_dim or exclude it."
            )
        self.m_in = self.m_out = r
        self.p_in = torch.randn(r, self.d_in, generator=self.generator("in")) / math.sqrt(r)
        self.p_out = torch.randn(r, self.d_out, generator=self.generator("out")) / math.sqrt(r)

    def factors(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acc = accumulation_dtype(x, delta)
        p_in = self.p_in.to(acc)
        # the bias column of ones projects to the last column of P_in: add it instead of copying x
        xs = x.to(acc) @ p_in[:, : x.shape[-1]].T
        if self.bias:
            xs = xs + p_in[:, -1]
        return xs, delta.to(acc) @ self.p_out.to(acc).T

    def factor_gradient_from_full(self, g: torch.Tensor) -> torch.Tensor:
        acc = accumulation_dtype(g)
        return self.p_out.to(acc) @ g.to(acc) @ self.p_in.to(acc).T

    def project_factor(self, gp: torch.Tensor) -> torch.Tensor:
        return gp.reshape(gp.shape[0], -1)

    def project_factor_matrix(self) -> torch.Tensor:
        return torch.eye(self.output_dim, dtype=torch.float64)

    def dense_matrix(self) -> torch.Tensor:
        return torch.kron(self.p_out.cpu().double(), self.p_in.cpu().double())

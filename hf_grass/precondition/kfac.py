"""`kfac`: Kronecker-factored curvature in the factor space, ``H ≈ S ⊗ A``.

``A = (1/N_tokens) sum_t x'_t x'_t^T`` and ``S = (1/n) sum_t delta'_t delta'_t^T`` of the factor-space
inputs and output gradients (kronfluence's normalisation), eigenvalues ``L_S ⊗ L_A``. A query's
factor gradient is rotated into the eigenbasis, divided by ``L + lambda`` and rotated back.

With masks in the module's own coordinates the factors are the pass's covariance sums of the masked
factors. With masks taken in the warm-up eigenbasis (``mask_basis="eigen"``) the factor space already
is the eigenbasis of the *full* covariances, and the eigenvalues come with the warm-up fit: per
curvature coordinate (a kept eigen-direction, or a coordinate of a hashed side).
"""

from __future__ import annotations

import torch

from hf_grass.precondition import linalg
from hf_grass.precondition.base import Preconditioner, register_preconditioner
from hf_grass.precondition.eigenbasis import Eigenbasis
from hf_grass.precondition.statistics import Statistics


@register_preconditioner("kfac")
class KFAC(Preconditioner):
    """Per module ``{"eig": L}`` (in the eigenbasis), with ``{"q_in", "q_out"}`` when the factor space
    must be rotated into it."""

    acts_on = "factors"
    whitens_rows = True

    @classmethod
    def statistics(cls, eigen_masks: bool) -> frozenset[str]:
        return frozenset() if eigen_masks else frozenset({"covariances"})

    @classmethod
    def fit(cls, stats: Statistics, basis: Eigenbasis | None) -> KFAC:
        factors = {}
        if basis is not None and basis.eigen_masks:
            for name, mod in basis.modules.items():
                assert mod.eig_in is not None and mod.eig_out is not None
                factors[name] = {"eig": torch.outer(mod.eig_out, mod.eig_in).to(torch.float64)}
            return cls(factors)
        for name, mod in stats.modules.items():
            assert mod.cov_in is not None and mod.cov_out is not None and mod.tokens is not None
            eig_in, q_in = linalg.eigh_psd(mod.cov_in / max(float(mod.tokens), 1.0))
            eig_out, q_out = linalg.eigh_psd(mod.cov_out / stats.examples)
            factors[name] = {"q_in": q_in, "q_out": q_out, "eig": torch.outer(eig_out, eig_in)}
        return cls(factors)

    def apply(self, name: str, t: torch.Tensor) -> torch.Tensor:
        f = self.factors[name]
        inv = self.inverse(f["eig"]).to(t.device)
        if "q_in" not in f:  # the factor space is the eigenbasis
            return t.to(torch.float64) * inv
        rotated = linalg.rotate(f["q_out"], f["q_in"], t)
        return linalg.unrotate(f["q_out"], f["q_in"], rotated * inv)

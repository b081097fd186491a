"""`ekfac`: the K-FAC eigenbasis with the eigenvalues corrected (George et al., 2018).

The eigenbasis is the warm-up K-FAC fit (``Eigenbasis``); its eigenvalues are replaced by
``(1/n) sum_i (Q_S^T G_i Q_A)^2``, the second moments of every example's factor gradient in that
basis, gathered during the pass. With masks taken in the eigenbasis the factor gradients are scaled
by ``sqrt(d/m)`` per side; the moments of the unscaled coordinates are theirs divided by the scales
squared, so the masked sum estimates the full-space score. A hashed side's moments are per coordinate
of the side, not per bucket (``Statistics``).
"""

from __future__ import annotations

from hf_grass.precondition.base import register_preconditioner
from hf_grass.precondition.eigenbasis import Eigenbasis
from hf_grass.precondition.kfac import KFAC
from hf_grass.precondition.statistics import Statistics


@register_preconditioner("ekfac")
class EKFAC(KFAC):
    """Per module ``{"eig": corrected L}``, with ``{"q_in", "q_out"}`` for masks in the module's own
    coordinates (the warm-up fit's rotation)."""

    @classmethod
    def statistics(cls, eigen_masks: bool) -> frozenset[str]:
        return KFAC.statistics(eigen_masks) | {"ekfac"}

    @classmethod
    def fit(cls, stats: Statistics, basis: Eigenbasis | None) -> EKFAC:
        if basis is None:
            raise ValueError("EK-FAC needs the warm-up eigenbasis; rebuild the cache with preconditioner='ekfac'")
        factors = {}
        for name, mod in basis.modules.items():
            sums = stats.modules[name].ekfac
            assert sums is not None
            eig = sums / stats.examples / mod.scale**2
            factors[name] = {"eig": eig} if mod.eigen_masks else {"q_in": mod.q_in, "q_out": mod.q_out, "eig": eig}
        return cls(factors)

"""`fim`: the block-diagonal Fisher of the compressed rows, ``F_l = (1/n) sum_i g_il g_il^T``.

Fitted as ``F_l = Q diag(L) Q^T`` once; ``H^-1 q = Q diag(1 / (L + lambda)) Q^T q`` per module block,
so it needs one block per module (the per-module layout) and works with every compressor.
"""

from __future__ import annotations

import torch

from hf_grass.precondition import linalg
from hf_grass.precondition.base import Preconditioner, register_preconditioner
from hf_grass.precondition.eigenbasis import Eigenbasis
from hf_grass.precondition.statistics import Statistics


@register_preconditioner("fim")
class BlockFisher(Preconditioner):
    """Per module ``{"q": Q, "eig": L}`` of the compressed rows' Fisher."""

    needs_module_blocks = True

    @classmethod
    def statistics(cls, eigen_masks: bool) -> frozenset[str]:
        return frozenset({"fisher"})

    @classmethod
    def fit(cls, stats: Statistics, basis: Eigenbasis | None) -> BlockFisher:
        factors = {}
        for name, mod in stats.modules.items():
            assert mod.fisher is not None
            eig, q = linalg.eigh_psd(mod.fisher / stats.examples)
            factors[name] = {"q": q, "eig": eig}
        return cls(factors)

    def apply(self, name: str, t: torch.Tensor) -> torch.Tensor:
        f = self.factors[name]
        q, inv = f["q"].to(t.device), self.inverse(f["eig"]).to(t.device)
        return ((t.to(torch.float64) @ q) * inv) @ q.T

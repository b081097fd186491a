"""`identity`: no curvature, plain gradient similarity ``g_q . g_i``."""

from __future__ import annotations

import torch

from hf_grass.precondition.base import Preconditioner, register_preconditioner
from hf_grass.precondition.eigenbasis import Eigenbasis
from hf_grass.precondition.statistics import Statistics


@register_preconditioner("identity")
class Identity(Preconditioner):
    """``H = I``: nothing is gathered, fitted or applied."""

    @classmethod
    def fit(cls, stats: Statistics, basis: Eigenbasis | None) -> Identity:
        return cls({})

    def apply(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float64)

    def precondition_rows(self, rows: torch.Tensor, offsets: dict[str, tuple[int, int]]) -> torch.Tensor:
        # the whole row at once: also the global layout's row, which every module shares
        return rows.to(torch.float64)

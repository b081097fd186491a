"""`SJLTMap`: the tables of one sparse JL transform, in the two forms the kernels read.

The forward form (``rows``, ``signs``: where each input coordinate goes) is what the compressors
draw from their seed and what the CPU path scatters with. The inverse form (for each output row,
the inputs that map to it; see :func:`hf_grass.kernels.reference.sjlt_gather_index`) is what the
deterministic paths gather with. It is a pure function of ``rows``, so it is derived once per map,
on first use, and follows the map to its device; a map that only ever runs on the CPU never builds it.
"""

from __future__ import annotations

import torch

from hf_grass.kernels import reference

__all__ = ["SJLTMap"]


class SJLTMap:
    """An SJLT ``R^n -> R^k``: input ``j`` adds ``signs[r, j] * g_j`` to output ``rows[r, j]``.

    Args:
        rows: ``[s, n]`` integer target rows in ``[0, k)``.
        signs: ``[s, n]`` float signs, already scaled by ``1/sqrt(s)``.
        k: output dimension.
    """

    def __init__(
        self,
        rows: torch.Tensor,
        signs: torch.Tensor,
        k: int,
        _index: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if rows.dim() != 2 or rows.shape != signs.shape:
            raise ValueError(
                f"rows and signs must both be [s, n]; got {tuple(rows.shape)}, {tuple(signs.shape)}"
            )
        if rows.device != signs.device:
            raise ValueError(f"rows are on {rows.device} but signs on {signs.device}")
        self.rows = rows
        self.signs = signs
        self.k = int(k)
        self._index = _index

    @property
    def n(self) -> int:
        return self.rows.shape[1]

    @property
    def s(self) -> int:
        return self.rows.shape[0]

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def gather_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cols [L, k], vals [L, k])`` on the map's device, built on first call and kept."""
        if self._index is None:
            # built where the rows are (a stable sort gives the same integers on every device);
            # one host sync for the row length L, once per map
            self._index = reference.sjlt_gather_index(self.rows, self.signs, self.k)
        return self._index

    def to(self, device: torch.device | str) -> SJLTMap:
        device = torch.device(device)
        index = None if self._index is None else (self._index[0].to(device), self._index[1].to(device))
        return SJLTMap(self.rows.to(device), self.signs.to(device), self.k, index)

    def dense(self) -> torch.Tensor:
        """The explicit ``[k, n]`` float64 matrix (for tests on small sizes)."""
        mat = torch.zeros(self.k, self.n, dtype=torch.float64)
        cols = torch.arange(self.n)
        for r in range(self.s):
            mat[self.rows[r].cpu(), cols] += self.signs[r].cpu().to(torch.float64)
        return mat

    def __repr__(self) -> str:
        return f"SJLTMap(n={self.n}, k={self.k}, s={self.s}, device={self.device})"

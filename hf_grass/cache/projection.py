"""The index's projection of wide rows: ``Px = [V^T x ; S (x - V V^T x)]``.

``V`` (``[dim, r]``, orthonormal columns) holds the ``r`` principal directions of a sample of the
rows, kept exactly; ``S`` is a seeded sparse JL map (one ``+-1`` per coordinate, into
``width - r`` buckets) of what is left. ``<Px, Pq> = <V^T x, V^T q> + <S r_x, S r_q>`` is an
unbiased estimate of ``<x, q>`` over the signs of ``S`` (``r_x = x - V V^T x``), whose error scales
with the norms of the *residuals*, not of the rows.

Why not the sparse JL map alone: on the benchmark's real rows at the default width (31,744), 98.5 %
of the rows' energy lies in 128 principal directions and 1.3 % of the (preconditioned) queries'
energy does, so a plain JL map's error, proportional to ``|x| |q|``, drowned the scores. At 2 x 10^4
rows and 300 candidates, recall@10 (helpful, harmful) was 0.35 and 0.47 through IVF-PQ over the
plain map, 0.87 and 0.87 through the same IVF-PQ over this projection (256 principal directions),
1.000 and 0.998 with exact search over it (benchmarks/index.py, docs/benchmarks.md).

``V`` is fitted by a randomized range finder with a seeded generator (deterministic for a given
sample and machine) and saved with the index; ``S`` is drawn from the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hf_grass.kernels import reference
from hf_grass.seeding import make_generator

METHOD = "pca+sjlt"


@dataclass
class RowProjection:
    """``[V^T x ; S (x - V V^T x)]`` (module docstring)."""

    basis: torch.Tensor  # [dim, r] float32, orthonormal columns (r may be 0)
    buckets: torch.Tensor  # [1, dim] int64 in [0, width - r)
    signs: torch.Tensor  # [1, dim] float32, +-1
    width: int

    def __post_init__(self) -> None:
        # S V: the sketch of the principal part, subtracted from S x (no [n, dim] reconstruction)
        self._sketched_basis = reference.sjlt_project(self.basis.T, self.buckets, self.signs, self.residual_width)

    @property
    def dim(self) -> int:
        return int(self.buckets.shape[1])

    @property
    def principal(self) -> int:
        return int(self.basis.shape[1])

    @property
    def residual_width(self) -> int:
        return self.width - self.principal

    @classmethod
    def drawn(cls, basis: torch.Tensor, width: int, seed: int) -> RowProjection:
        """The projection with principal directions ``basis`` and the sparse map of ``seed``."""
        dim, r = basis.shape
        if not 0 <= r < width:
            raise ValueError(f"{r} principal directions do not leave room in a projection of width {width}")
        gen = make_generator(seed, "index", "projection")
        buckets = torch.randint(0, width - r, (1, dim), generator=gen)
        signs = torch.randint(0, 2, (1, dim), generator=gen).to(torch.float32).mul_(2).sub_(1)
        return cls(basis.to(torch.float32).contiguous(), buckets, signs, width)

    def spec(self, seed: int) -> dict[str, Any]:
        """What the manifest records (the basis itself is a file of the index)."""
        return {"method": METHOD, "dim": self.dim, "width": self.width, "principal": self.principal, "seed": seed}

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        """``[n, dim]`` -> ``[n, width]`` float32."""
        rows = rows.to(torch.float32)
        kept = rows @ self.basis
        rest = reference.sjlt_project(rows, self.buckets, self.signs, self.residual_width)
        return torch.cat([kept, rest - kept @ self._sketched_basis], dim=1)


def principal_directions(sample: torch.Tensor, r: int, seed: int, oversample: int = 16, iters: int = 2) -> torch.Tensor:
    """``[dim, r]`` orthonormal: the top ``r`` right singular vectors of ``sample [n, dim]``, by a
    randomized range finder with ``iters`` power iterations (Halko et al., 2011) drawn from ``seed``."""
    n, dim = sample.shape
    r = min(r, n, dim)
    if r == 0:
        return torch.zeros(dim, 0)
    k = min(r + oversample, n, dim)
    gen = make_generator(seed, "index", "principal")
    x = sample.to(torch.float32)
    y = x @ torch.randn(dim, k, generator=gen)
    for _ in range(iters):
        y = x @ (x.T @ torch.linalg.qr(y).Q)
    q = torch.linalg.qr(y).Q  # [n, k]: the range of the sample's top directions
    _, _, vh = torch.linalg.svd(q.T @ x, full_matrices=False)
    return vh[:r].T.contiguous()

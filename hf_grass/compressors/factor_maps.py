"""Factor maps: how one side (input or output) of a module reaches FactGraSS's factor space when the
masks are taken in a fitted basis (``mask_basis="eigen"``).

Two kinds, chosen per side by the warm-up fit (``hf_grass.precondition.warmup``):

- ``EigenMap``: ``m`` eigen-directions of the side's full covariance, drawn uniformly by the mask,
  scaled by ``sqrt(d / m)``: ``x' = scale * Q[:, idx]^T x``. An unbiased subsample of the side in its
  K-FAC eigenbasis.
- ``HashMap``: a side too wide for a full covariance (``precondition.warmup.FULL_COVARIANCE_MAX_WIDTH``, e.g. a vocabulary)
  is hashed: coordinate ``j`` adds ``sign_j * c_j * x_j`` to bucket ``bucket_j``. The weights ``c_j``
  whiten the side by its diagonal variance *before* the hash (``c_j = (v_j + eps)^(-1/2)``), so that
  the buckets do not mix coordinates of very different scale. Such a side has two spaces: the
  buckets (what rows store) and its own ``d`` coordinates (where its curvature is known, one
  variance per coordinate). ``to_buckets(..., query=True)`` uses the weights ``sign_j / c_j`` instead:
  a train row weighted by ``c`` against a query weighted by ``1 / c`` makes the hashed inner product
  an unbiased estimate (over the signs) of the inner product in the side's own coordinates, whatever
  ``c`` is (docs/concepts.md, "Wide factors").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hf_grass.kernels.onehot import OneHot


@dataclass
class EigenMap:
    """``m`` columns of a side's eigenbasis (``vectors [d, m]``, bias row last), scaled by ``scale``."""

    vectors: torch.Tensor  # [d, m] float32
    scale: float

    @property
    def width(self) -> int:
        return self.vectors.shape[1]

    @property
    def hashed(self) -> bool:
        return False

    def to(self, device: torch.device | str) -> EigenMap:
        return EigenMap(self.vectors.to(device), self.scale)

    def apply(
        self, t: torch.Tensor | OneHot, bias: bool = False, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """``t [..., d(-1)] -> [..., m]``, the product in ``t``'s dtype and the result in ``dtype``
        (default ``t``'s); ``bias``: ``t`` lacks the trailing column of ones, which maps to the last
        row of ``vectors``. A one-hot ``t`` (an embedding's ids) gathers rows of ``vectors``."""
        vec = self.vectors.to(t.dtype)
        out = (t @ vec[: t.shape[-1]]).to(dtype or t.dtype)
        if bias:
            out = out + vec[-1].to(out.dtype)
        return out * self.scale

    def dense(self) -> torch.Tensor:
        """``[d, m]`` float64: the map as a matrix (``x' = M^T x``)."""
        return self.vectors.cpu().double() * self.scale


@dataclass
class HashMap:
    """A signed hashing of ``d`` coordinates into ``m`` buckets, each coordinate weighted by
    ``weights`` (``sign * c``) on the train side and ``sign / c`` on the query side."""

    buckets: torch.Tensor  # [d] int64 in [0, m)
    signs: torch.Tensor  # [d] float32, +-1
    whiten: torch.Tensor  # [d] float32, c_j > 0
    m: int

    @property
    def width(self) -> int:
        return self.m

    @property
    def hashed(self) -> bool:
        return True

    @property
    def d(self) -> int:
        return self.buckets.numel()

    def to(self, device: torch.device | str) -> HashMap:
        return HashMap(self.buckets.to(device), self.signs.to(device), self.whiten.to(device), self.m)

    def weights(self, query: bool = False) -> torch.Tensor:
        return self.signs / self.whiten if query else self.signs * self.whiten

    def apply(
        self, t: torch.Tensor | OneHot, bias: bool = False, dtype: torch.dtype | None = None, query: bool = False
    ) -> torch.Tensor:
        """``t [..., d(-1)] -> [..., m]`` bucket sums in ``dtype`` (default ``t``'s; train weights
        unless ``query``); a one-hot ``t`` (an embedding's ids) puts each token's weight in its id's
        bucket, a gather."""
        t = t.to(dtype or t.dtype)
        if isinstance(t, OneHot):
            if bias:
                raise ValueError("a one-hot factor has no bias column")
            return t.scatter(self.buckets, self.weights(query), self.m)
        if bias:
            t = torch.cat([t, torch.ones(*t.shape[:-1], 1, dtype=t.dtype, device=t.device)], dim=-1)
        return self.to_buckets(t, dim=-1, query=query)

    def to_buckets(self, t: torch.Tensor, dim: int, query: bool = False) -> torch.Tensor:
        """Hash dimension ``dim`` (``d`` wide) of ``t`` into ``m`` buckets."""
        dim = dim % t.dim()
        shape = [1] * t.dim()
        shape[dim] = self.d
        weighted = t * self.weights(query).to(t.device, t.dtype).reshape(shape)
        out_shape = list(t.shape)
        out_shape[dim] = self.m
        out = torch.zeros(out_shape, dtype=t.dtype, device=t.device)
        return out.index_add_(dim, self.buckets.to(t.device), weighted)

    def dense(self, query: bool = False) -> torch.Tensor:
        """``[d, m]`` float64: the map as a matrix (``x' = M^T x``)."""
        out = torch.zeros(self.d, self.m, dtype=torch.float64)
        out[torch.arange(self.d), self.buckets.cpu()] = self.weights(query).cpu().double()
        return out


FactorMap = EigenMap | HashMap


def eigen_scale(d: int, m: int) -> float:
    """The scale of a uniform mask of ``m`` of ``d`` directions: ``E ||x'||^2 = ||x||^2``."""
    return math.sqrt(d / m)


def map_tensors(prefix: str, fmap: FactorMap) -> dict[str, torch.Tensor]:
    """The tensors of a map, under ``prefix`` (``name::in`` / ``name::out``), for safetensors."""
    if isinstance(fmap, EigenMap):
        return {f"{prefix}::vectors": fmap.vectors, f"{prefix}::scale": torch.tensor(fmap.scale, dtype=torch.float64)}
    return {
        f"{prefix}::buckets": fmap.buckets,
        f"{prefix}::signs": fmap.signs,
        f"{prefix}::whiten": fmap.whiten,
        f"{prefix}::m": torch.tensor(fmap.m, dtype=torch.int64),
    }


def map_from_tensors(prefix: str, flat: dict[str, torch.Tensor]) -> FactorMap | None:
    """The map saved under ``prefix`` (``map_tensors``), or None when there is none."""
    if f"{prefix}::vectors" in flat:
        return EigenMap(flat[f"{prefix}::vectors"].to(torch.float32), float(flat[f"{prefix}::scale"]))
    if f"{prefix}::buckets" in flat:
        return HashMap(
            flat[f"{prefix}::buckets"].to(torch.int64),
            flat[f"{prefix}::signs"].to(torch.float32),
            flat[f"{prefix}::whiten"].to(torch.float32),
            int(flat[f"{prefix}::m"]),
        )
    return None

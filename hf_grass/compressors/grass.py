"""`grass`: ``sjlt_k ∘ mask_k'`` with k' = sparsify_factor * k (clamped to p).

The mask throws most coordinates away at O(k') cost, the SJLT then mixes the k' survivors into k
numbers, keeping JL-style guarantees on the masked sub-vector. ``compress(x, delta)`` reads only the
k' masked coordinates.
"""

from __future__ import annotations

import math

import torch

from hf_grass import kernels
from hf_grass.compressors.base import Compressor, register_compressor
from hf_grass.compressors.mask import masked_coordinates
from hf_grass.compressors.sjlt import check_sjlt_settings, make_sjlt
from hf_grass.seeding import sample_without_replacement


@register_compressor("grass")
class GraSSCompressor(Compressor):
    check_config = staticmethod(check_sjlt_settings)

    def _draw(self) -> None:
        self.k_prime = min(self.config.sparsify_factor * self.output_dim, self.p)
        self.idx = sample_without_replacement(self.p, self.k_prime, self.generator("mask"))
        self.scale = math.sqrt(self.p / self.k_prime)
        self.sjlt = make_sjlt(self.generator("sjlt"), self.k_prime, self.output_dim, self.config.sjlt_nnz)

    def compress(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        self._check_factors(x, delta)
        masked = masked_coordinates(x, delta, self.idx, self.d_in, self.bias_index)
        return kernels.sjlt_project(masked, self.sjlt) * self.scale

    def _compress_flat(self, v: torch.Tensor) -> torch.Tensor:
        return kernels.sjlt_project(v[:, self.idx], self.sjlt) * self.scale

    def dense_matrix(self) -> torch.Tensor:
        mask = torch.zeros(self.k_prime, self.p, dtype=torch.float64)
        mask[torch.arange(self.k_prime), self.idx.cpu()] = self.scale
        return self.sjlt.dense() @ mask

"""`random`: a dense projection with i.i.d. N(0,1)/sqrt(k) or ±1/sqrt(k) entries (TRAK's baseline).

O(k p) per example. The matrix is defined column block by column block, each block drawn from its
own generator, so it can be regenerated block-wise when it is too large to keep in memory (the
result is the same matrix either way; only the speed differs).
"""

from __future__ import annotations

import math
import os

import torch

from hf_grass.compressors.base import Compressor, register_compressor
from hf_grass.kernels.reference import accumulation_dtype

BLOCK_COLS = 1 << 16
# Keep the whole matrix in memory up to this many bytes (float32); above it, regenerate per call.
MAX_RESIDENT_BYTES = int(os.environ.get("HF_GRASS_MAX_DENSE_BYTES", str(1 << 30)))


@register_compressor("random")
class RandomCompressor(Compressor):
    def _draw(self) -> None:
        self.n_blocks = math.ceil(self.p / BLOCK_COLS)
        self.resident = self.output_dim * self.p * 4 <= MAX_RESIDENT_BYTES
        if self.resident:
            self.matrix = torch.cat([self._block(b) for b in range(self.n_blocks)], dim=1)

    def _block(self, b: int) -> torch.Tensor:
        start, stop = b * BLOCK_COLS, min((b + 1) * BLOCK_COLS, self.p)
        gen = self.generator(f"block{b}")
        shape = (self.output_dim, stop - start)
        if self.config.distribution == "gaussian":
            block = torch.randn(shape, generator=gen)
        else:
            block = torch.randint(0, 2, shape, generator=gen).to(torch.float32).mul_(2).sub_(1)
        return block.div_(math.sqrt(self.output_dim))

    def _compress_flat(self, v: torch.Tensor) -> torch.Tensor:
        acc = accumulation_dtype(v)
        v = v.to(acc)
        if self.resident:
            return v @ self.matrix.to(acc).T
        out = torch.zeros(v.shape[0], self.output_dim, dtype=acc, device=v.device)
        for b in range(self.n_blocks):
            start = b * BLOCK_COLS
            block = self._block(b).to(device=v.device, dtype=acc)
            out += v[:, start : start + block.shape[1]] @ block.T
        return out

    def dense_matrix(self) -> torch.Tensor:
        return torch.cat([self._block(b) for b in range(self.n_blocks)], dim=1).to(torch.float64)

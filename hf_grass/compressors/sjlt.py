"""`sjlt`: sparse Johnson-Lindenstrauss transform (Kane & Nelson's block construction).

Input coordinate j adds ``sigma_{j,r} g_j / sqrt(s)`` to one row in each of the s row blocks of size
k/s, so its s rows are distinct. Cost O(s p) per example, proportional to the input size.
"""

from __future__ import annotations

import math

import torch

from hf_grass import kernels
from hf_grass.compressors.base import Compressor, CompressorSettings, register_compressor
from hf_grass.kernels import SJLTMap


def check_sjlt_settings(config: CompressorSettings) -> None:
    """The SJLT puts one non-zero in each of ``sjlt_nnz`` row blocks of ``k / sjlt_nnz`` rows."""
    name, k = ("total_dim", config.total_dim) if config.total_dim is not None else ("proj_dim", config.proj_dim)
    if k is not None and k % config.sjlt_nnz != 0:
        raise ValueError(
            f"{name}={k} must be divisible by sjlt_nnz={config.sjlt_nnz} (the SJLT puts "
            f"one non-zero in each of sjlt_nnz row blocks); pick e.g. sjlt_nnz=1 or a multiple."
        )


def draw_sjlt(gen: torch.Generator, n: int, k: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[s, n]`` (int64) and signs ``[s, n]`` (float32, scaled by 1/sqrt(s)) of an SJLT R^n -> R^k."""
    if k % s:
        raise ValueError(f"the SJLT needs k={k} divisible by sjlt_nnz={s}")
    block = k // s
    offsets = torch.arange(s, dtype=torch.int64).unsqueeze(1) * block
    rows = torch.randint(0, block, (s, n), generator=gen) + offsets
    signs = torch.randint(0, 2, (s, n), generator=gen).to(torch.float32).mul_(2).sub_(1)
    return rows, signs / math.sqrt(s)


def make_sjlt(gen: torch.Generator, n: int, k: int, s: int) -> SJLTMap:
    """The SJLT R^n -> R^k drawn by :func:`draw_sjlt`, as the map the kernels take."""
    rows, signs = draw_sjlt(gen, n, k, s)
    return SJLTMap(rows, signs, k)


@register_compressor("sjlt")
class SJLTCompressor(Compressor):
    check_config = staticmethod(check_sjlt_settings)

    def _draw(self) -> None:
        self.sjlt = make_sjlt(self.generator("sjlt"), self.p, self.output_dim, self.config.sjlt_nnz)

    def _compress_flat(self, v: torch.Tensor) -> torch.Tensor:
        return kernels.sjlt_project(v, self.sjlt)

    def dense_matrix(self) -> torch.Tensor:
        return self.sjlt.dense()

"""Deterministic randomness: every random object is drawn from its own CPU generator.

The seed of a generator is a stable hash of ``(config.seed, module_name, role)``, so the same
configuration gives bit-identical projections in every process, on every device and after a resume,
independently of module order, global RNG state or the Python hash seed.
"""

from __future__ import annotations

import hashlib

import torch


def stable_seed(seed: int, module_name: str, role: str) -> int:
    """A 63-bit integer derived from ``(seed, module_name, role)`` with SHA-256."""
    blob = f"{int(seed)}\x00{module_name}\x00{role}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, module_name: str, role: str) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(stable_seed(seed, module_name, role))
    return gen


def sample_without_replacement(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A uniformly random k-subset of ``range(n)``, returned sorted (int64, on the CPU).

    For k close to n a permutation is cheapest; for k << n (a mask over millions of gradient
    coordinates) we draw with replacement and keep first occurrences, which gives the same
    distribution without an O(n) permutation.
    """
    if not 0 < k <= n:
        raise ValueError(f"cannot sample {k} distinct items out of {n}")
    if 4 * k >= n:
        return torch.randperm(n, generator=gen)[:k].sort().values
    seen = torch.empty(0, dtype=torch.int64)
    while seen.numel() < k:
        draw = torch.randint(0, n, (2 * (k - seen.numel()) + 16,), generator=gen)
        merged = torch.cat([seen, draw])
        # keep the first occurrence of every value, in draw order
        uniq, inverse = torch.unique(merged, return_inverse=True)
        first = torch.full((uniq.numel(),), merged.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(merged.numel()), reduce="amin")
        seen = merged[first.sort().values]
    return seen[:k].sort().values


def random_signs(n: int, gen: torch.Generator) -> torch.Tensor:
    """n independent +-1 values (float32)."""
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float32).mul_(2).sub_(1)

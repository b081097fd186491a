"""Helpers shared by the sections of ``benchmarks.gpu_suite``: synchronised timing, peak GPU
memory, the kernel switch, and the exception a section raises to say it does not apply here."""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch


class SectionSkipped(Exception):
    """A section that does not apply on this machine (its message says why); recorded as skipped."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` (synchronised), after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def rate(tokens: int, seconds: list[float]) -> dict[str, Any]:
    """Tokens/s of the median call, with every call's seconds."""
    median = statistics.median(seconds)
    return {"tokens_per_s": tokens / median, "median_s": median, "seconds": seconds, "tokens": tokens}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated since the last ``reset_peak`` (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def kernels_mode(mode: str | None) -> Iterator[None]:
    """``HF_GRASS_KERNELS=mode`` for the duration (the dispatcher reads it on every call)."""
    previous = os.environ.get("HF_GRASS_KERNELS")
    if mode is None:
        os.environ.pop("HF_GRASS_KERNELS", None)
    else:
        os.environ["HF_GRASS_KERNELS"] = mode
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_GRASS_KERNELS", None)
        else:
            os.environ["HF_GRASS_KERNELS"] = previous


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` in float64 (0 when both are zero)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = float(b.abs().max()) if b.numel() else 0.0
    diff = float((a - b).abs().max()) if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (so -0.0 differs from +0.0, and NaNs with the same payload are equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if not a.is_floating_point():
        return torch.equal(a, b)
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.view(as_int), b.view(as_int))

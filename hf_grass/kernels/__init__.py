"""Hot loops of the compressors, with a Triton path for CUDA tensors and a torch reference.

The path is chosen per call: Triton when the tensors are on CUDA and ``triton`` imports, the torch
reference otherwise. ``HF_GRASS_KERNELS=torch`` or ``=triton`` forces one path (``triton`` on CPU
tensors needs ``TRITON_INTERPRET=1``, which is how the tests run the kernels). Both paths compute the
same math; a failing kernel raises instead of silently falling back.
"""

from __future__ import annotations

import functools
import os

import torch

from hf_grass.kernels import reference

__all__ = ["backend_for", "factgrass_project", "sjlt_project", "triton_available"]


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails at import
        return False
    return True


def backend_for(t: torch.Tensor) -> str:
    """'triton' or 'torch' for a tensor, honouring ``HF_GRASS_KERNELS`` (auto | torch | triton)."""
    mode = os.environ.get("HF_GRASS_KERNELS", "").lower() or "auto"
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"HF_GRASS_KERNELS must be auto, torch or triton; got {mode!r}.")
    if mode == "torch":
        return "torch"
    if mode == "triton":
        if not triton_available():
            raise RuntimeError(
                "HF_GRASS_KERNELS=triton but triton does not import; pip install 'hf-grass[triton]'."
            )
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "HF_GRASS_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (set before import)."
            )
        return "triton"
    return "triton" if t.is_cuda and triton_available() else "torch"


def sjlt_project(g: torch.Tensor, rows: torch.Tensor, signs: torch.Tensor, k: int) -> torch.Tensor:
    if backend_for(g) == "triton":
        from hf_grass.kernels import triton_kernels

        return triton_kernels.sjlt_project(g, rows, signs, k)
    return reference.sjlt_project(g, rows, signs, k)


def factgrass_project(
    x: torch.Tensor,
    delta: torch.Tensor,
    in_idx: torch.Tensor,
    out_idx: torch.Tensor,
    rows: torch.Tensor,
    signs: torch.Tensor,
    k: int,
    bias_index: int | None = None,
) -> torch.Tensor:
    if backend_for(x) == "triton":
        from hf_grass.kernels import triton_kernels

        return triton_kernels.factgrass_project(x, delta, in_idx, out_idx, rows, signs, k, bias_index)
    return reference.factgrass_project(x, delta, in_idx, out_idx, rows, signs, k, bias_index)

"""Hot loops of the compressors, with a Triton path for CUDA tensors and a torch reference.

The path is chosen per call: Triton when the tensors are on CUDA and ``triton`` imports, torch
otherwise. ``HF_GRASS_KERNELS=torch`` or ``=triton`` forces one path (``triton`` on CPU tensors needs
``TRITON_INTERPRET=1``, which is how the tests run the kernels). A failing kernel raises instead of
silently falling back.

Every default path is deterministic (the same inputs give the same bits in every run):

* CPU tensors, torch: :func:`reference.sjlt_project` (``index_add_``, which adds in a fixed order on
  the CPU). Every cache written so far was written by this path; it is unchanged.
* CUDA (or other non-CPU) tensors, torch: the SJLT goes through the inverse index
  (:func:`reference.sjlt_project_gather`), because ``index_add_`` uses atomics there.
* CUDA tensors, Triton: :mod:`hf_grass.kernels.triton_kernels`, which uses no atomics.

The earlier kernels that scattered with atomic adds (rows changing by float rounding from run to
run) are gone: no GPU measurement has shown that they are worth their non-determinism.
"""

from __future__ import annotations

import functools
import os

import torch

from hf_grass.kernels import reference
from hf_grass.kernels.sjlt_map import SJLTMap

__all__ = ["SJLTMap", "backend_for", "factgrass_project", "sjlt_project", "triton_available"]

_MODES = ("auto", "torch", "triton")


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
    if mode not in _MODES:
        raise ValueError(f"HF_GRASS_KERNELS must be one of {', '.join(_MODES)}; got {mode!r}.")
    if mode == "torch":
        return "torch"
    if mode == "triton":
        if not triton_available():
            raise RuntimeError(
                f"HF_GRASS_KERNELS={mode} but triton does not import; pip install 'hf-grass[triton]'."
            )
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"HF_GRASS_KERNELS={mode} on CPU tensors needs TRITON_INTERPRET=1 (set before import)."
            )
        return mode
    return "triton" if t.is_cuda and triton_available() else "torch"


def _torch_sjlt(g: torch.Tensor, sjlt: SJLTMap) -> torch.Tensor:
    if g.device.type == "cpu":
        return reference.sjlt_project(g, sjlt.rows, sjlt.signs, sjlt.k)
    # index_add_ accumulates with atomics off the CPU: gather in the inverse index's order instead
    return reference.sjlt_project_gather(g, *sjlt.gather_index())


def sjlt_project(g: torch.Tensor, sjlt: SJLTMap) -> torch.Tensor:
    """The SJLT of ``g [B, n]`` -> ``[B, k]`` (accumulation dtype: float32, or float64 for float64)."""
    backend = backend_for(g)
    if backend == "triton":
        from hf_grass.kernels import triton_kernels

        return triton_kernels.sjlt_project(g, sjlt)
    return _torch_sjlt(g, sjlt)


def factgrass_project(
    x: torch.Tensor,
    delta: torch.Tensor,
    in_idx: torch.Tensor,
    out_idx: torch.Tensor,
    sjlt: SJLTMap,
    bias_index: int | None = None,
) -> torch.Tensor:
    """SJLT of vec(``sum_t delta[b, t, out_idx] x[b, t, in_idx]^T``) -> ``[B, k]`` (no scale)."""
    backend = backend_for(x)
    if backend == "triton":
        from hf_grass.kernels import triton_kernels

        return triton_kernels.factgrass_project(x, delta, in_idx, out_idx, sjlt, bias_index)
    if x.device.type == "cpu":
        return reference.factgrass_project(
            x, delta, in_idx, out_idx, sjlt.rows, sjlt.signs, sjlt.k, bias_index
        )
    gp = reference.masked_outer(x, delta, in_idx, out_idx, bias_index)
    return _torch_sjlt(gp.reshape(gp.shape[0], -1), sjlt)

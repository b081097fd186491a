"""Putting a cache's own weights back into a model: multi-checkpoint (TracIn-CP style) lookups take
each query gradient at the weights its cache was built with."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from hf_grass.cache.reader import GradientCache
from hf_grass.capture.engine import unwrap_model
from hf_grass.capture.fingerprint import weights_fingerprint
from hf_grass.capture.targets import find_target_modules


@contextlib.contextmanager
def checkpoint_weights(model: nn.Module, cache: GradientCache) -> Iterator[None]:
    """Temporarily load the weights a cache was built with, if they are not the current ones."""
    # fingerprinting needs only the target modules: no compressor is drawn for this check
    base = unwrap_model(model)
    targets = find_target_modules(base, cache.module_names)
    if weights_fingerprint(base, targets) == cache.model_info.get("weights_sha256"):
        yield
        return
    path = cache.model_info.get("checkpoint")
    if not path or not os.path.isdir(path):
        raise ValueError(
            f"the cache {cache.path} was built with other weights and records no checkpoint directory to load "
            "them from; query it with the model it was built with"
        )
    saved = {k: v.detach().clone() for k, v in base.state_dict().items()}
    load_checkpoint(base, path)
    try:
        yield
    finally:
        base.load_state_dict(saved)


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a Trainer checkpoint's weights (full model or PEFT adapter) into ``model`` in place."""
    from safetensors.torch import load_file

    path = Path(path)
    adapter = path / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
        return
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model.safetensors or adapter_model.safetensors in checkpoint {path}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    _, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint {path} holds weights the model lacks: {unexpected[:5]}")

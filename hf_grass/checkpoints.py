"""Putting a cache's own weights back into a model: multi-checkpoint (TracIn-CP style) lookups take
each query gradient at the weights its cache was built with.

The swap never holds a second copy of the model on its device: the current values of the tensors a
checkpoint replaces are kept on the CPU, the checkpoint's tensors are read one at a time and copied
into the parameters in place, and the kept values are copied back afterwards (bit-identical).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from hf_grass.cache.reader import GradientCache
from hf_grass.capture.engine import is_zero3, unwrap_model
from hf_grass.capture.fingerprint import weights_fingerprint
from hf_grass.capture.targets import find_target_modules

# where the current weights wait while a checkpoint's are in the model
HOST = torch.device("cpu")
_ADAPTER = "adapter::"  # marks the saved values of a PEFT adapter (restored through PEFT's names)


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
    if is_zero3(base):
        raise ValueError(
            f"the cache {cache.path} was built with the weights of checkpoint {path}, and DeepSpeed ZeRO-3 "
            "partitions this model's parameters over the processes, so they cannot be swapped in place: query "
            "that cache with a model loaded from the checkpoint (e.g. from_pretrained, outside ZeRO-3)"
        )
    saved = swap_in_checkpoint(base, path)
    try:
        yield
    finally:
        restore(base, saved)


def swap_in_checkpoint(
    model: nn.Module, path: str | os.PathLike, keep: bool = True
) -> dict[str, torch.Tensor]:
    """Copy a Trainer checkpoint's weights (full model or PEFT adapter) into ``model`` in place and
    return the replaced values, on the CPU, for ``restore`` (none when not ``keep``)."""
    path = Path(path)
    adapter = path / "adapter_model.safetensors"
    if adapter.is_file():  # adapters are small: PEFT maps their names, the CPU holds both copies
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file

        current = get_peft_model_state_dict(model) if keep else {}
        kept = {_ADAPTER + k: v.detach().to(HOST, copy=True) for k, v in current.items()}
        set_peft_model_state_dict(model, load_file(adapter))
        return kept
    live = model.state_dict(keep_vars=True)  # the model's own tensors, under their checkpoint names
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, tensor in _checkpoint_tensors(path, live):
                target = live[name]
                if keep and name not in saved:
                    saved[name] = target.detach().to(HOST, copy=True)
                target.copy_(tensor)
    except BaseException:
        restore(model, saved)
        raise
    return saved


def restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy the values ``swap_in_checkpoint`` returned back into the model's tensors."""
    adapter = {k[len(_ADAPTER) :]: v for k, v in saved.items() if k.startswith(_ADAPTER)}
    if adapter:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, adapter)
    live = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in saved.items():
            if not name.startswith(_ADAPTER):
                live[name].copy_(value)


def _checkpoint_tensors(path: Path, live: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """A full-model checkpoint's tensors, read one at a time (after every name and shape has been
    checked against the model, so that a mismatch changes nothing)."""
    from safetensors import safe_open

    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model.safetensors or adapter_model.safetensors in checkpoint {path}")
    names: dict[Path, list[str]] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            names[file] = list(handle.keys())
            unexpected = [k for k in names[file] if k not in live]
            if unexpected:
                raise ValueError(f"checkpoint {path} holds weights the model lacks: {unexpected[:5]}")
            shapes = {k: list(handle.get_slice(k).get_shape()) for k in names[file]}
            wrong = [
                f"{k} {v} (model: {list(live[k].shape)})"
                for k, v in shapes.items()
                if v != list(live[k].shape)
            ]
            if wrong:
                raise ValueError(
                    f"checkpoint {path} holds weights of other shapes than the model's: {wrong[:5]}"
                )
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in names[file]:
                yield key, handle.get_tensor(key)


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a Trainer checkpoint's weights (full model or PEFT adapter) into ``model`` in place."""
    swap_in_checkpoint(model, path, keep=False)

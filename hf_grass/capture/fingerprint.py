"""Which model a cache belongs to: class, name, revision, target shapes and a hash of the weights.

Queries compare a model's fingerprint with the one recorded in the cache, so scores never mix the
gradients of two models.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from hf_grass.capture.targets import TargetModule


def model_fingerprint(model: nn.Module, targets: list[TargetModule]) -> dict[str, Any]:
    """Class, name/path, revision, target shapes and a hash of the target weights.

    The weight hash reads the first 4096 values of each target weight, enough to tell a trained
    model from its base without hashing gigabytes.
    """
    cfg = getattr(model, "config", None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base_cfg = getattr(base, "config", cfg)
    digest = hashlib.sha256()
    shapes = hashlib.sha256()
    for t in targets:
        digest.update(_weight_head(t))
        shapes.update(f"{t.name}:{t.d_out}x{t.d_in}:{t.bias};".encode())
    return {
        "class": type(model).__name__,
        "name_or_path": getattr(base_cfg, "_name_or_path", None) or None,
        "revision": getattr(base_cfg, "_commit_hash", None),
        "modules_sha256": shapes.hexdigest()[:16],
        "weights_sha256": digest.hexdigest()[:16],
    }


def weights_fingerprint(model: nn.Module, targets: list[TargetModule]) -> str:
    """The weight hash alone (what tells two checkpoints of one model apart)."""
    return model_fingerprint(model, targets)["weights_sha256"]


def _weight_head(target: TargetModule) -> bytes:
    """The first 4096 values of a target's weight (an expert's: its slice) as float64 bytes (gathered
    when ZeRO-3 partitions it)."""
    weight = target.weight_parameter
    if hasattr(weight, "ds_id"):  # a DeepSpeed ZeRO-3 partition: gather the full weight briefly
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            return _head_bytes(target.weight_of(weight))
    return _head_bytes(target.weight_of(weight))


def _head_bytes(weight: torch.Tensor) -> bytes:
    return weight.detach().reshape(-1)[:4096].to("cpu", torch.float64).numpy().tobytes()

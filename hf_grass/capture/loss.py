"""Per-example losses, exactly as DESIGN.md §2 defines them.

``L_i = sum_{t in T_i} CE(t)`` over the supervised tokens (labels != -100) of example i, computed
from the logits of that example only, so it never depends on batch composition or padding.
Classification, regression and multi-label heads get the per-example form of the loss the
`transformers` head computes; any other objective is a user's ``PerExampleLoss``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_grass.data import IGNORE_INDEX

# A user's loss: ``fn(model, batch) -> [B]`` (see ``GradientComputer``).
PerExampleLoss = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def per_example_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "sum",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B]`` per-example losses from logits and labels.

    Causal LM: logits ``[B, T, V]``, labels ``[B, T]`` (token t predicts label t+1, HF's shift).
    With ``attention_mask``, a label is only supervised when the position predicting it is a real
    token: under left padding the first real token would otherwise be "predicted" from a pad.
    Classification: logits ``[B, C]``, integer labels ``[B]`` (cross-entropy).
    Regression (a head with one output): logits ``[B, 1]``, float labels ``[B]`` (squared error).
    Multi-label: logits ``[B, C]``, float labels ``[B, C]`` (binary cross-entropy summed over the C
    labels). These are the per-example terms of the losses `transformers`' sequence classification
    heads compute (for ``problem_type`` single-label, regression, multi-label).
    ``reduction="mean"`` divides each example's sum by its number of supervised tokens (labels).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if logits.dim() == 3 and labels.dim() == 2 and not labels.is_floating_point():
        if logits.shape[:2] != labels.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
        logits, labels = logits[:, :-1], shifted_labels(labels, attention_mask)
        token_loss = F.cross_entropy(
            _upcast(logits).reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            reduction="none",
            ignore_index=IGNORE_INDEX,
        ).view(labels.shape)
        losses = token_loss.sum(dim=1)
        if reduction == "mean":
            losses = losses / (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
        return losses
    if logits.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point():
        return F.cross_entropy(_upcast(logits), labels, reduction="none")
    if (
        logits.dim() == 2
        and logits.shape[1] == 1
        and labels.is_floating_point()
        and labels.numel() == len(logits)
    ):
        return (_upcast(logits)[:, 0] - labels.reshape(-1).to(_upcast(logits).dtype)).square()
    if logits.dim() == 2 and labels.is_floating_point() and labels.shape == logits.shape:
        logits = _upcast(logits)
        losses = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").sum(1)
        return losses / logits.shape[1] if reduction == "mean" else losses
    raise ValueError(
        "expected causal-LM logits [B,T,V] with labels [B,T], classification logits [B,C] with integer "
        "labels [B], regression logits [B,1] with float labels [B], or multi-label logits [B,C] with "
        f"float labels [B,C]; got logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
        f"({labels.dtype}). For any other objective pass per_example_loss=fn(model, batch) -> [B]."
    )


def model_logits(outputs: Any) -> torch.Tensor:
    """The logits of a forward's output: a dict / ModelOutput with ``logits``, or a tensor."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"the model's forward returned a {type(outputs).__name__} without 'logits'; return a dict or "
        "ModelOutput with logits, or pass per_example_loss=fn(model, batch) -> [B] to say what the loss is"
    )


def check_losses(losses: Any, batch_size: int) -> torch.Tensor:
    """A user's ``per_example_loss`` output must be one floating-point loss per example."""
    if not isinstance(losses, torch.Tensor) or not losses.is_floating_point():
        raise TypeError(
            f"per_example_loss must return a floating-point tensor of shape [{batch_size}], got "
            f"{type(losses).__name__}{'' if not isinstance(losses, torch.Tensor) else ' ' + str(losses.dtype)}"
        )
    if tuple(losses.shape) != (batch_size,):
        raise ValueError(
            f"per_example_loss must return one loss per example, shape [{batch_size}]; got "
            f"{tuple(losses.shape)} (a batch mean, reduction='mean', is not per example: use reduction='none')"
        )
    return losses


def loss_name(fn: PerExampleLoss | None) -> str | None:
    """How the manifest names a user's loss (``None``: the built-in loss)."""
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 logits go to fp32 for the softmax; fp64 stays fp64 (oracle tests)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def shifted_labels(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Labels aligned with the logits that predict them (``labels[:, 1:]``), pads' targets ignored."""
    shifted = labels[:, 1:]
    if attention_mask is not None:
        shifted = shifted.masked_fill(attention_mask[:, :-1].to(shifted.device) == 0, IGNORE_INDEX)
    return shifted


def supervised_tokens(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B]`` number of supervised tokens (after the causal shift for 2-D labels)."""
    if labels.dim() == 2 and not labels.is_floating_point():
        return (shifted_labels(labels, attention_mask) != IGNORE_INDEX).sum(dim=1)
    return torch.ones(labels.shape[0], dtype=torch.long, device=labels.device)

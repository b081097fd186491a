"""Per-example losses, exactly as DESIGN.md §2 defines them.

``L_i = sum_{t in T_i} CE(t)`` over the supervised tokens (labels != -100) of example i, computed
from the logits of that example only, so it never depends on batch composition or padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_grass.data import IGNORE_INDEX


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
    Classification: logits ``[B, C]``, labels ``[B]``.
    ``reduction="mean"`` divides each example's sum by its number of supervised tokens.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if logits.dim() == 3 and labels.dim() == 2:
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
    if logits.dim() == 2 and labels.dim() == 1:
        return F.cross_entropy(_upcast(logits), labels, reduction="none")
    raise ValueError(
        "expected causal-LM logits [B,T,V] with labels [B,T], or classification logits [B,C] with "
        f"labels [B]; got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
    )


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
    if labels.dim() == 2:
        return (shifted_labels(labels, attention_mask) != IGNORE_INDEX).sum(dim=1)
    return torch.ones(labels.shape[0], dtype=torch.long, device=labels.device)

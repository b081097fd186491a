"""What fraction of a model's trainable parameters the targets attribute, and what is left out, why.

Scores are inner products of the targets' gradients only, so a parameter left out is a part of
the model whose influence the scores do not see. The attribution pass logs this line and records it
in the manifest (``cache.model_info["coverage"]``), so it is never silent::

    attributing 134.5M of 134.5M trainable parameters (99.99%); left out: 17.9K numbers in 61 tensors
    (LlamaRMSNorm: an elementwise scale or shift, not a linear map of its input): model.norm.weight, ...

Each parameter counts once, also when two modules share it (tied embeddings). With no parameter
requiring grad (a fully frozen model), every parameter counts.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from hf_grass.capture.target_module import TargetModule
from hf_grass.capture.targets import WIDE_OUTPUT, candidates, is_lora_model, is_wide_output, output_layer

# reasons that only say what the configuration chose; any other reason is worth a warning
NOT_TARGETED = "not targeted (target_modules / exclude_modules)"
ELEMENTWISE = "an elementwise scale or shift, not a linear map of its input"
# embeddings are opt-in (capture.targets.default_targets)
EMBEDDING_DEFAULT = "embeddings are attributed only when target_modules names them"
# so is an LLM's output layer (capture.targets.WIDE_OUTPUT)
WIDE_OUTPUT_DEFAULT = (
    f"an output layer over more than {WIDE_OUTPUT} classes is attributed only when target_modules names it"
)
_EXPECTED = (NOT_TARGETED, ELEMENTWISE, EMBEDDING_DEFAULT, WIDE_OUTPUT_DEFAULT)
NAMES_SHOWN = 3  # parameter names shown per reason in the line (the manifest keeps up to 20)


@dataclass
class LeftOut:
    """Parameters left out for one reason."""

    reason: str
    names: list[str] = field(default_factory=list)
    numel: int = 0


@dataclass
class Coverage:
    """Attributed and trainable parameter counts (numbers, not tensors) and what is left out."""

    trainable: int
    attributed: int
    left_out: list[LeftOut]
    partial: list[str]  # attributed parameters with a use left out (a tied embedding's)
    frozen_model: bool = False  # no parameter requires grad: every parameter counted

    @property
    def fraction(self) -> float:
        return self.attributed / self.trainable if self.trainable else 1.0

    @property
    def level(self) -> int:
        """``logging.INFO`` when everything left out is elementwise, excluded by the configuration
        or an embedding (opt-in), ``logging.WARNING`` when hf_grass could not capture something."""
        expected = all(any(g.reason.endswith(e) for e in _EXPECTED) for g in self.left_out)
        expected = expected and all(p.endswith(f"({EMBEDDING_DEFAULT})") for p in self.partial)
        return logging.INFO if expected else logging.WARNING

    def line(self) -> str:
        what = (
            "parameters (none requires grad: counting all)" if self.frozen_model else "trainable parameters"
        )
        text = (
            f"attributing {human(self.attributed)} of {human(self.trainable)} {what} "
            f"({100 * self.fraction:.2f}%)"
        )
        if self.left_out:
            parts = []
            for g in self.left_out:
                shown = ", ".join(g.names[:NAMES_SHOWN]) + (", ..." if len(g.names) > NAMES_SHOWN else "")
                parts.append(f"{human(g.numel)} numbers in {len(g.names)} tensors ({g.reason}): {shown}")
            text += "; left out: " + "; ".join(parts)
        else:
            text += "; nothing left out"
        if self.partial:
            text += "; partly: " + "; ".join(self.partial)
        return text

    def as_dict(self) -> dict[str, Any]:
        """What the manifest records (``model.coverage``)."""
        return {
            "trainable": self.trainable,
            "attributed": self.attributed,
            "fraction": round(self.fraction, 6),
            "left_out": [
                {"reason": g.reason, "count": len(g.names), "numel": g.numel, "names": g.names[:20]}
                for g in self.left_out
            ],  # fmt: skip
            "partial": list(self.partial),
            "line": self.line(),
        }


def human(n: int) -> str:
    """``134515008`` -> ``"134.5M"``."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def coverage(model: nn.Module, targets: list[TargetModule]) -> Coverage:
    """The coverage of ``targets`` (``find_target_modules``) on ``model``."""
    found = candidates(model)
    covered: dict[int, int] = defaultdict(int)  # id(parameter) -> numbers the targets hold
    for t in targets:
        for p, n in t.covered():
            covered[id(p)] += n
    candidate_modules = {id(t.module) for t in found.targets} | {
        id(t.tied) for t in found.targets if t.tied is not None
    }
    lora = is_lora_model(model)
    output = output_layer(model)
    wide_output = any(is_wide_output(t, output) for t in found.targets)
    named = list(model.named_parameters())
    frozen = not any(p.requires_grad for _, p in named)
    modules = dict(model.named_modules())
    groups: dict[str, LeftOut] = {}
    trainable = attributed = 0
    for name, p in named:
        if not (p.requires_grad or frozen):
            continue
        numel = _numel(p)
        trainable += numel
        held = min(covered.get(id(p), 0), numel)
        attributed += held
        if held == numel:
            continue
        owner_name = name.rpartition(".")[0]
        owner = modules.get(owner_name)
        if wide_output and owner is output and id(owner) in candidate_modules and not lora:
            reason = f"{type(owner).__name__}: {WIDE_OUTPUT_DEFAULT}"
        else:
            reason = _reason(owner, owner_name, found.refused, id(owner) in candidate_modules, lora)
        group = groups.setdefault(reason, LeftOut(reason))
        group.names.append(name if held == 0 else f"{name} ({human(numel - held)} of {human(numel)})")
        group.numel += numel - held
    partial = [f"{t.name}.weight: {found.untied[t.name]}" for t in targets if t.name in found.untied]
    partial += [
        f"{t.name}.weight: its use by {found.aliases[t.name][-1]} is left out ({EMBEDDING_DEFAULT})"
        for t in targets
        if t.kind == "linear" and t.tied is None and t.name in found.aliases
    ]
    left = sorted(groups.values(), key=lambda g: -g.numel)
    return Coverage(trainable, attributed, left, partial, frozen)


def _numel(p: nn.Parameter) -> int:
    return math.prod(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partition: the full parameter's shape


def _reason(owner: nn.Module | None, name: str, refused: dict[str, str], candidate: bool, lora: bool) -> str:
    kind = type(owner).__name__ if owner is not None else "?"
    if name in refused:
        return f"{kind}: {refused[name]}"
    if candidate and lora:
        return f"{kind}: trainable, but a LoRA model's default targets are its LoRA layers"
    if candidate:
        return (
            f"{kind}: {EMBEDDING_DEFAULT}" if isinstance(owner, nn.Embedding) else f"{kind}: {NOT_TARGETED}"
        )
    if "norm" in kind.lower():
        return f"{kind}: {ELEMENTWISE}"
    return f"{kind}: hf_grass has no capture rule for this module type"

"""Which modules to attribute through: Linear, HF Conv1D and PEFT LoRA A/B.

Name syntax follows PEFT: a list of names, where an entry matches a module whose full name equals it
or ends with ``"." + entry``; or one string, a regex that must match the full name.

Names are the model's own, without activation-checkpointing wrappers: torch's ``CheckpointWrapper``
(FSDP / Accelerate activation checkpointing) inserts ``_checkpoint_wrapped_module`` into every name
below it. Names seed the projections, so a cache built under the wrapper must equal one built
without it (the wrapper's own ``state_dict`` strips the same component).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

_LORA_NAME = re.compile(r"(^|\.)lora_[AB]\.[^.]+$")
# torch.distributed.algorithms._checkpoint.checkpoint_wrapper's attribute for the wrapped module
CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module"


@dataclass(frozen=True)
class TargetModule:
    """A module whose per-example weight gradient is captured.

    ``d_in`` counts the bias column (the input gets a trailing 1 when ``bias``). ``transposed`` marks
    HF ``Conv1D``, whose weight is stored ``[d_in, d_out]``; captured gradients always follow the
    ``[d_out, d_in]`` convention of ``nn.Linear``.
    """

    name: str
    module: nn.Module
    d_in: int
    d_out: int
    bias: bool
    transposed: bool


def is_conv1d(module: nn.Module) -> bool:
    """HF's GPT-2 style ``Conv1D`` (checked by duck typing so capture needs no transformers import)."""
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and getattr(module, "weight", None) is not None
    )


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def describe(name: str, module: nn.Module) -> TargetModule:
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        d_in, d_out, transposed = module.in_features, module.out_features, False
    elif is_conv1d(module):
        # nx/nf rather than weight.shape: under ZeRO-3 the local weight is an empty partition
        d_in, d_out = module.nx, module.nf
        transposed = True
    else:
        raise TypeError(
            f"module {name!r} is a {type(module).__name__}; only nn.Linear and HF Conv1D are supported"
        )
    return TargetModule(name, module, int(d_in) + int(bias), int(d_out), bias, transposed)


def is_lora_model(model: nn.Module) -> bool:
    return any(_LORA_NAME.search(name) and isinstance(m, nn.Linear) for name, m in named_modules(model))


def canonical_name(name: str) -> str:
    """A module's name without checkpoint-wrapper components (what seeds its projections)."""
    if CHECKPOINT_WRAPPED not in name:
        return name
    return ".".join(part for part in name.split(".") if part != CHECKPOINT_WRAPPED)


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` under canonical names (the root, named ``""``, left out)."""
    return [(canonical_name(n), m) for n, m in model.named_modules() if n]


def _matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def find_target_modules(
    model: nn.Module,
    target_modules: list[str] | str | None = None,
    exclude_modules: list[str] | str | None = None,
) -> list[TargetModule]:
    """The modules to capture, in ``model.named_modules()`` order.

    Default: every ``nn.Linear`` and ``Conv1D`` (lm_head included); for a PEFT LoRA model only the
    LoRA A/B layers, since the base model is frozen. No match raises a ``ValueError`` that lists
    the candidate names.
    """
    modules = named_modules(model)
    candidates = [(n, m) for n, m in modules if is_supported(m)]
    if target_modules is None:
        if is_lora_model(model):
            chosen = [(n, m) for n, m in candidates if _LORA_NAME.search(n)]
        else:
            chosen = candidates
    else:
        named = [(n, m) for n, m in modules if _matches(n, target_modules)]
        unsupported = [f"{n} ({type(m).__name__})" for n, m in named if not is_supported(m)]
        chosen = [(n, m) for n, m in named if is_supported(m)]
        if not chosen:
            raise ValueError(
                f"target_modules={target_modules!r} matches no Linear/Conv1D module"
                + (f" (it matches unsupported modules: {', '.join(unsupported[:10])})" if unsupported else "")
                + f". Candidates: {_preview([n for n, _ in candidates])}"
            )
        if isinstance(target_modules, list):
            missing = [e for e in target_modules if not any(_matches(n, [e]) for n, _ in chosen)]
            if missing:
                raise ValueError(
                    f"target_modules entries {missing} match no Linear/Conv1D module. "
                    f"Candidates: {_preview([n for n, _ in candidates])}"
                )
    if exclude_modules is not None:
        chosen = [(n, m) for n, m in chosen if not _matches(n, exclude_modules)]
    if not chosen:
        raise ValueError(
            "no module left to attribute through (exclude_modules removed them all, or the model has no "
            f"Linear/Conv1D layers). Candidates: {_preview([n for n, _ in candidates])}"
        )
    return [describe(n, m) for n, m in chosen]


def _preview(names: list[str], limit: int = 25) -> str:
    if not names:
        return "(none)"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")

"""Which weights to attribute through: Linear, HF Conv1D, PEFT LoRA A/B, nn.Embedding (and the input
embedding tied to an output layer), and the experts and routers of transformers-5 MoE layers.

Name syntax follows PEFT: a list of names, where an entry matches a module whose full name equals it
or ends with ``"." + entry``; or one string, a regex that must match the full name. An expert's
weight is named ``<experts module>.<e>.<parameter>`` (``model.layers.0.mlp.experts.3.down_proj``) and
is also matched by its experts module's name; the output layer of tied embeddings is also matched by
its input embedding's name.

Names are the model's own, without activation-checkpointing wrappers: torch's ``CheckpointWrapper``
(FSDP / Accelerate activation checkpointing) inserts ``_checkpoint_wrapped_module`` into every name
below it. Names seed the projections, so a cache built under the wrapper must equal one built
without it (the wrapper's own ``state_dict`` strips the same component).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import nn

from hf_grass.capture.embedding import describe_embedding, embedding_problem, is_embedding, tie_problem
from hf_grass.capture.experts import describe_experts, describe_router, experts_problem, is_experts, is_router
from hf_grass.capture.target_module import TargetModule

__all__ = [
    "TargetModule",
    "cache_targets",
    "describe",
    "find_target_modules",
    "is_conv1d",
    "is_lora_model",
    "is_supported",
]

_LORA_NAME = re.compile(r"(^|\.)lora_[AB]\.[^.]+$")
# torch.distributed.algorithms._checkpoint.checkpoint_wrapper's attribute for the wrapped module
CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module"


def is_conv1d(module: nn.Module) -> bool:
    """HF's GPT-2 style ``Conv1D`` (checked by duck typing so capture needs no transformers import)."""
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and getattr(module, "weight", None) is not None
    )


def is_supported(module: nn.Module) -> bool:
    """A module captured as a plain linear map (``nn.Linear`` or ``Conv1D``)."""
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


@dataclasses.dataclass
class Candidates:
    """Everything a model offers to capture (``candidates``)."""

    targets: list[TargetModule]  # in named_modules order, tied output layers carrying their embedding
    aliases: dict[str, list[str]]  # target name -> the other names that select it
    refused: dict[str, str]  # module name -> why it cannot be captured (modules of a known kind)
    untied: dict[str, str]  # output layer -> why its tied embedding's use is left out

    def names(self, t: TargetModule) -> list[str]:
        return [t.name, *self.aliases.get(t.name, [])]


def candidates(model: nn.Module) -> Candidates:
    """The weights of ``model`` hf_grass can capture, and the reasons for those of a known kind it
    cannot (``refused``)."""
    targets: list[TargetModule] = []
    aliases: dict[str, list[str]] = {}
    refused: dict[str, str] = {}
    embeddings: list[tuple[str, nn.Module]] = []
    for name, module in named_modules(model):
        if is_supported(module):
            targets.append(describe(name, module))
        elif is_experts(module):
            for t in describe_experts(name, module):
                targets.append(t)
                aliases[t.name] = [name]
        elif is_router(module):
            targets.append(describe_router(name, module))
        elif is_embedding(module):
            embeddings.append((name, module))
            problem = embedding_problem(module)  # type: ignore[arg-type]
            if problem is not None:
                refused[name] = problem
            else:
                targets.append(describe_embedding(name, module))  # type: ignore[arg-type]
    # an embedding that reads an output layer's weight: one parameter, so one target, named after the
    # layer, that captures both uses
    layers = {id(t.weight_parameter): i for i, t in enumerate(targets) if t.kind == "linear"}
    untied: dict[str, str] = {}
    tied_embeddings = set()
    for name, module in embeddings:
        i = layers.get(id(module.weight))
        if i is None:
            continue
        tied_embeddings.add(id(module))
        problem = refused.get(name) or tie_problem(targets[i])
        if problem is not None:
            untied[targets[i].name] = f"its use by {name} is left out: {problem}"
        else:
            targets[i] = dataclasses.replace(targets[i], tied=module, tied_name=name)
            aliases[targets[i].name] = [name]
    targets = [t for t in targets if not (t.kind == "embedding" and id(t.module) in tied_embeddings)]
    return Candidates(targets, aliases, refused, untied)


# An output layer over more classes than this (a language model's vocabulary) is left out of the
# default targets. Its vocabulary side is hashed (as wide as precondition.warmup's
# FULL_COVARIANCE_MAX_WIDTH, 8192), and most of a vocabulary never occurs in a warm-up sample, so
# damping relative to the mean curvature is tiny against the rare tokens an answer holds: on SmolLM2
# (docs/benchmarks.md, "Real LLM"), the output layer's block held 97% of the preconditioned query's
# energy and ranked sources at recall@1 0.12 on its own, and leaving it out raised the unprojected
# ranking from 0.19 to 0.75 at the default damping; through the projection into one row that energy
# is noise on every other module's score. A small classification head stays a default target.
WIDE_OUTPUT = 8192


def _hf_module(model: nn.Module, getter: str) -> nn.Module | None:
    """The module an HF (or PEFT) model's ``getter`` returns, if it has one."""
    get = getattr(model, getter, None)
    if not callable(get):
        return None
    try:
        found = get()
    except (NotImplementedError, AttributeError):
        return None
    return found if isinstance(found, nn.Module) else None


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The module ``model.get_input_embeddings()`` returns (HF and PEFT models), if any."""
    return _hf_module(model, "get_input_embeddings")


def output_layer(model: nn.Module) -> nn.Module | None:
    """The module ``model.get_output_embeddings()`` returns (an HF language model's ``lm_head``), if any."""
    return _hf_module(model, "get_output_embeddings")


def is_wide_output(t: TargetModule, output: nn.Module | None) -> bool:
    """Whether ``t`` is an output layer over a vocabulary wider than ``WIDE_OUTPUT``."""
    return output is not None and t.module is output and t.d_out > WIDE_OUTPUT


def default_targets(pool: list[TargetModule], output: nn.Module | None = None) -> list[TargetModule]:
    """The default of a model that is not a LoRA model: every target but the embeddings' uses (the
    ``nn.Embedding`` targets and a tied output layer's second use) and an output layer over a
    vocabulary wider than ``WIDE_OUTPUT`` (``output``, see there). The embeddings' gradients lowered
    the rankings on bench-dev under the default EK-FAC (docs/benchmarks.md, "Every parameter"), so
    they are attributed only when ``target_modules`` names them; so is a wide output layer."""
    return [
        dataclasses.replace(t, tied=None, tied_name=None) if t.tied is not None else t
        for t in pool
        if t.kind != "embedding" and not is_wide_output(t, output)
    ]


def _matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def find_target_modules(
    model: nn.Module,
    target_modules: list[str] | str | None = None,
    exclude_modules: list[str] | str | None = None,
) -> list[TargetModule]:
    """The weights to capture, in ``model.named_modules()`` order.

    Default: every ``nn.Linear`` and ``Conv1D``, and the experts and routers of MoE layers; for a
    PEFT LoRA model only the LoRA A/B layers, since the base model is frozen. Embeddings
    (``nn.Embedding``, and the input embedding's use of a tied output layer) and an output layer
    over a vocabulary wider than ``WIDE_OUTPUT`` (an LLM's ``lm_head``) are attributed when
    ``target_modules`` names them (``default_targets`` says why); ``r".*"`` names
    every weight hf_grass can capture. No match raises a ``ValueError`` that lists the candidate
    names; so do MoE experts whose implementation cannot be captured.
    """
    found = candidates(model)
    pool = found.targets
    if target_modules is None:
        chosen = (
            [t for t in pool if _LORA_NAME.search(t.name)]
            if is_lora_model(model)
            else default_targets(pool, output_layer(model))
        )
    else:
        chosen = [t for t in pool if any(_matches(n, target_modules) for n in found.names(t))]
        if not chosen:
            unsupported = [
                f"{n} ({type(m).__name__}{_why(found, n)})"
                for n, m in named_modules(model)
                if _matches(n, target_modules)
            ]
            raise ValueError(
                f"target_modules={target_modules!r} matches no module hf_grass can capture"
                + (f" (it matches unsupported modules: {', '.join(unsupported[:10])})" if unsupported else "")
                + f". Candidates: {_preview([t.name for t in pool])}"
            )
        if isinstance(target_modules, list):
            missing = [
                e for e in target_modules if not any(_matches(n, [e]) for t in chosen for n in found.names(t))
            ]
            if missing:
                raise ValueError(
                    f"target_modules entries {missing} match no module hf_grass can capture. "
                    f"Candidates: {_preview([t.name for t in pool])}"
                )
    if exclude_modules is not None:
        chosen = [t for t in chosen if not _excluded(t, found, exclude_modules)]
        # excluding a tied output layer's input embedding leaves out that use only
        chosen = [
            dataclasses.replace(t, tied=None, tied_name=None)
            if t.tied_name is not None and _matches(t.tied_name, exclude_modules)
            else t
            for t in chosen
        ]
    if not chosen:
        raise ValueError(
            "no module left to attribute through (exclude_modules removed them all, or the model has no "
            f"module hf_grass can capture). Candidates: {_preview([t.name for t in pool])}"
        )
    for t in chosen:
        problem = experts_problem(t.module) if t.kind == "expert" else None
        if problem is not None:
            raise ValueError(
                f"cannot capture the MoE experts {t.name.rsplit('.', 2)[0]}: {problem}; or leave them out with "
                "exclude_modules=['experts']."
            )
    return chosen


def cache_targets(model: nn.Module, modules: list[dict[str, Any]]) -> list[TargetModule]:
    """The targets a cache's manifest lists (its ``modules`` entries), each captured as the cache
    captured it: a tied output layer with its embedding's use only where its entry records it
    (``"tied"``; caches written before hf_grass captured that use lack it)."""
    targets = find_target_modules(model, [m["name"] for m in modules])
    tied = {m["name"] for m in modules if m.get("tied")}
    return [
        t if t.tied is None or t.name in tied else dataclasses.replace(t, tied=None, tied_name=None)
        for t in targets
    ]


def _excluded(t: TargetModule, found: Candidates, spec: list[str] | str) -> bool:
    names = [t.name] if t.tied is not None else found.names(t)  # a tied layer is excluded by its own name
    return any(_matches(n, spec) for n in names)


def _why(found: Candidates, name: str) -> str:
    return f": {found.refused[name]}" if name in found.refused else ""


def _preview(names: list[str], limit: int = 25) -> str:
    if not names:
        return "(none)"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")

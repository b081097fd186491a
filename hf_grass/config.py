"""`GraSSConfig`: every knob of an attribution run, in one validated dataclass.

The dataclass is plain (no transformers import, and no torch import until a compressor is checked)
so the low stages can use it; every field carries ``metadata={"help": ...}`` so that
``transformers.HfArgumentParser`` turns it into command-line flags. Compressor and preconditioner
names come from their registries; what a compressor or a preconditioner needs of the other fields
it checks itself (``Compressor.check_config``, ``Preconditioner.check_config``).

The config keeps what the user gave: a field left at ``None`` means "the default for the rest of the
configuration". ``resolved()`` is the one place where those defaults are computed (layout, mask
basis, preconditioner); the pass and the lookups work on the resolved copy, and the cache's manifest
records it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from hf_grass.compressors import available_compressors, compressor_class
from hf_grass.precondition import available_preconditioners, default_preconditioner, preconditioner_class

COMPRESSORS = tuple(available_compressors())
PRECONDITIONERS = tuple(available_preconditioners())
DTYPES = ("int8", "float16", "bfloat16", "float32")
# "top" and "eigen" take the masks in the warm-up K-FAC eigenbasis (``GraSSConfig.eigen_masks``)
MASK_BASES = ("top", "eigen", "input")
# The default per-document budget: numbers per row across all modules (31 x 1024). int8 rows of
# 31744 numbers plus their scale, norms and index are 31,764 bytes: under 32 KB (32,768) on any
# model depth, with about 1 KB left for the document's text (docs/howto/choosing.md "Budget";
# measured in benchmarks/quality.py).
DEFAULT_TOTAL_DIM = 31744
# The per-module layout's default (proj_dim numbers per module), for the compressors without a
# global layout and for the block Fisher, which needs per-module blocks.
DEFAULT_PROJ_DIM = 1024
# ``damping`` left at None: 0.001 (chosen on bench-dev, where the masks are a random draw of
# eigen-directions), or TOP_MASKS_DAMPING where the masks keep the top ones (a real LLM:
# capture.engine.TOP_MASKS_MIN_RATIO), measured on SmolLM2 (docs/benchmarks.md, "Real LLM").
DEFAULT_DAMPING = 0.001
TOP_MASKS_DAMPING = 0.1


def default_damping(mask_basis: str) -> float:
    """The damping ``damping=None`` resolves to with these masks (see DEFAULT_DAMPING)."""
    return TOP_MASKS_DAMPING if mask_basis == "top" else DEFAULT_DAMPING
# The smallest damping the warm-up whitening uses: at 0 the whitening factors of near-null
# directions grow without bound (~1500x measured), which only adds noise to fp16/int8 rows.
MIN_WHITENING_DAMPING = 1e-3


# The fields that only affect scoring or I/O. Every other field changes what is written to the cache
# (a new field is part of the cache's identity unless it is added here), so a cache written with
# another value of one is refused on resume. ``damping`` is the default damping of queries, but a
# kfac/ekfac build also whitens its rows with it, so it is part of the cache (a query may still pass
# another damping: unbiased, a little noisier).
SCORING_FIELDS = frozenset({"cosine", "cosine_norms", "cache_dir", "batch_size"})


def _field(default: Any, help: str) -> Any:
    """A field with its help text (``HfArgumentParser`` turns the metadata into flag options)."""
    return field(default=default, metadata={"help": help})


@dataclass
class GraSSConfig:
    """Configuration of gradient compression, caching and scoring.

    ``GraSSConfig()`` is the measured default: FactGraSS with masks in the warm-up K-FAC eigenbasis,
    every module projected into one row of ``total_dim`` int8 numbers, EK-FAC. Giving ``proj_dim``
    instead selects the per-module layout (``proj_dim`` numbers per module), e.g.
    ``GraSSConfig(compressor="factgrass", proj_dim=1024, sparsify_factor=4, seed=0)``.
    Fields left at ``None`` follow the rest of the configuration; ``resolved()`` fills them in.
    Every field has a help text, so ``transformers.HfArgumentParser(GraSSConfig)`` makes flags of them.
    """

    compressor: str = _field("factgrass", f"Gradient compressor, one of {', '.join(COMPRESSORS)}.")
    proj_dim: int | None = _field(
        None,
        "Per-module layout: compressed numbers k_hat per module, so a row grows with the model's depth "
        "(logra needs a perfect square). Default: 1024 where the global layout (total_dim) does not "
        "apply (compressors other than factgrass, or a preconditioner with one block per module).",
    )
    total_dim: int | None = _field(
        None,
        "Global layout: numbers per document across all modules (every module's compressed gradient is "
        f"projected into one shared row), independent of depth. Default: {DEFAULT_TOTAL_DIM} for "
        "factgrass unless proj_dim is given or the preconditioner needs one block per module (fim).",
    )
    factor_dim: int = _field(
        128,
        "Global layout: coordinates kept per factor (input and output side) of each module before the "
        "projection into the row; the pass costs about factor_dim*(d_in+d_out) per token and module.",
    )
    mask_basis: str | None = _field(
        None,
        "Where factgrass draws its masks: 'top' (the factor_dim eigen-directions of largest eigenvalue "
        "of each warm-up K-FAC factor, whitened there; needs kfac/ekfac), 'eigen' (a seeded random "
        "subset of the eigen-directions, scaled: an unbiased estimate of the full-space score, "
        "measured noisier on a real LLM) or 'input' (the module's own coordinates, the original "
        "FactGraSS). Default: top in the global layout with kfac/ekfac, else input.",
    )
    sparsify_factor: int = _field(
        4,
        "k'/k_hat for grass and factgrass: the masked dimension before the final SJLT (factgrass needs "
        "sparsify_factor*proj_dim to be a perfect square).",
    )
    sjlt_nnz: int = _field(1, "Non-zeros s per input coordinate in the SJLT (proj_dim must be divisible by s).")
    distribution: str = _field("gaussian", "Entry distribution of the `random` compressor: gaussian or rademacher.")
    seed: int = _field(0, "Seed of every random projection and mask.")
    target_modules: list[str] | str | None = _field(
        None,
        "Modules to attribute through: a list of names (a name matches itself and any module ending in "
        "'.name') or one regex matched against the full name. Default: every Linear/Conv1D and MoE "
        "expert/router but an LLM's output layer (over more than 8192 classes), LoRA A/B only for PEFT "
        "models; embeddings and the output layer only when named (r'.*' names every weight).",
    )
    exclude_modules: list[str] | str | None = _field(None, "Modules to leave out, same syntax as target_modules.")
    dtype: str = _field(
        "int8",
        "Storage dtype of the cached rows: int8 (with a float32 scale per row), float16, bfloat16 or float32.",
    )
    loss_reduction: str = _field(
        "sum", "Per-example loss: 'sum' over supervised tokens, or 'mean' (divides by their count)."
    )
    preconditioner: str | None = _field(
        None,
        f"One of {', '.join(PRECONDITIONERS)}. Default: ekfac for factgrass/logra, fim otherwise.",
    )
    damping: float | None = _field(
        None,
        "Damping as a fraction of the mean eigenvalue of each module's preconditioner. Default: 0.001 "
        "(chosen on bench-dev), 0.1 where the masks keep the top eigen-directions (a real LLM; chosen "
        "on SmolLM2): docs/howto/choosing.md. A kfac/ekfac build also whitens its rows with it.",
    )
    cosine: bool = _field(
        False,
        "Unit-normalise scores: divide each by the norms of both sides, in the geometry cosine_norms "
        "names (TrackStar's and bergson's practice).",
    )
    cosine_norms: str = _field(
        "preconditioned",
        "The norms cosine divides by, both sides in one geometry: 'preconditioned' (the cache's "
        "whitened factor space: the build-time K-FAC at the build damping) or 'gradient' (the factor-"
        "space gradient norms, an unbiased estimate of ||g||^2 over the masks).",
    )
    ekfac_sample_size: int = _field(
        1024,
        "Examples used by the warm-up pass that fits the K-FAC eigenbasis (ekfac/kfac only); the "
        "eigenvalue corrections then use every example.",
    )
    warmup_tokens: int = _field(
        8192,
        "The warm-up sample also stops at this many tokens (the first examples, in dataset order, up to "
        "ekfac_sample_size examples): it bounds the warm-up's cost on long documents. An example without "
        "input_ids counts as one token.",
    )
    max_length: int | None = _field(
        None,
        "Truncate longer sequences to this many tokens (with a warning). Default: the model's context length.",
    )
    cache_dir: str = _field("grass_cache", "Directory of the gradient cache.")
    shard_size: int = _field(1024, "Rows (examples) per cache shard.")
    batch_size: int | None = _field(
        None, "Batch size of the attribution pass. Default: the Trainer's eval batch size, or 8."
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        _check_choice("compressor", self.compressor, COMPRESSORS)
        _check_choice("distribution", self.distribution, ("gaussian", "rademacher"))
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("loss_reduction", self.loss_reduction, ("sum", "mean"))
        for name in ("sparsify_factor", "sjlt_nnz", "shard_size", "ekfac_sample_size", "factor_dim", "warmup_tokens"):
            _check_positive_int(name, getattr(self, name))
        for name in ("proj_dim", "total_dim", "max_length", "batch_size"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {self.seed!r}.")
        if self.preconditioner is not None:
            _check_choice("preconditioner", self.preconditioner, PRECONDITIONERS)
        if self.mask_basis is not None:
            _check_choice("mask_basis", self.mask_basis, MASK_BASES)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise TypeError(
                    f"{name} must be None, a regex string or a list of non-empty module names; got {value!r}."
                )
            if not value:
                raise ValueError(f"{name} is an empty list; use None for the default, or name some modules.")
        if not isinstance(self.cosine, bool):
            raise TypeError(f"cosine must be True or False, got {self.cosine!r}.")
        _check_choice("cosine_norms", self.cosine_norms, ("preconditioned", "gradient"))
        if self.damping is not None:
            if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)):
                raise TypeError(f"damping must be a float (or None for the default), got {self.damping!r}.")
            if not math.isfinite(self.damping) or self.damping < 0:
                raise ValueError(f"damping must be a finite number >= 0 (or None), got {self.damping}.")
        self._check_resolved(self._resolved_values())

    # ---- the defaults that depend on other fields -----------------------------------------------

    def _resolved_values(self) -> dict[str, Any]:
        """The fields left at None, filled in from the others (see their help)."""
        preconditioner = self.preconditioner or default_preconditioner(compressor_class(self.compressor).factorised)
        cls = preconditioner_class(preconditioner)
        proj_dim, total_dim = self.proj_dim, self.total_dim
        if proj_dim is None and total_dim is None:
            if self.compressor == "factgrass" and not cls.needs_module_blocks:
                total_dim = DEFAULT_TOTAL_DIM
            else:
                proj_dim = DEFAULT_PROJ_DIM
        mask_basis = self.mask_basis
        if mask_basis is None:
            mask_basis = "top" if total_dim is not None and cls.whitens_rows else "input"
        damping = self.damping if self.damping is not None else default_damping(mask_basis)
        return {"preconditioner": preconditioner, "proj_dim": proj_dim, "total_dim": total_dim,
                "mask_basis": mask_basis, "damping": damping}  # fmt: skip

    def _check_resolved(self, values: dict[str, Any]) -> None:
        """Refuse combinations that cannot work, with a message saying how to fix them."""
        if self.proj_dim is not None and self.total_dim is not None:
            raise ValueError(
                f"give proj_dim (per-module layout) or total_dim (one row for all modules), not both; "
                f"got proj_dim={self.proj_dim}, total_dim={self.total_dim}."
            )
        if values["total_dim"] is not None and self.compressor != "factgrass":
            raise ValueError(
                f"total_dim (the global layout) is implemented for compressor='factgrass'; for "
                f"{self.compressor!r} give proj_dim (numbers per module) instead."
            )
        cls = preconditioner_class(values["preconditioner"])
        cls.check_config(
            factorised=compressor_class(self.compressor).factorised,
            global_layout=values["total_dim"] is not None,
            compressor=self.compressor,
        )
        if values["mask_basis"] in ("top", "eigen") and (self.compressor != "factgrass" or not cls.whitens_rows):
            raise ValueError(
                f"mask_basis={values['mask_basis']!r} takes factgrass's masks in the eigenbasis of the warm-up K-FAC fit, "
                "so it needs compressor='factgrass' and a preconditioner that fits it (kfac or ekfac); use "
                "mask_basis='input' otherwise."
            )
        # the compressor checks the resolved values (a plain namespace: a config would validate again)
        settings = SimpleNamespace(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        vars(settings).update(values)
        compressor_class(self.compressor).check_config(settings)  # type: ignore[arg-type]

    def resolved(self) -> GraSSConfig:
        """This configuration with every default that depends on the other fields filled in (the
        layout, the mask basis, the preconditioner): what a pass writes and a cache records."""
        values = self._resolved_values()
        if all(getattr(self, k) == v for k, v in values.items()):
            return self
        return dataclasses.replace(self, **values)

    @property
    def eigen_masks(self) -> bool:
        """Whether factgrass's masks are taken in the warm-up K-FAC eigenbasis (``mask_basis`` top or
        eigen; the resolved value)."""
        return self.resolved().mask_basis in ("top", "eigen")

    @property
    def layout(self) -> str:
        """``"global"``: every module projected into one shared row (``total_dim``); ``"module"``: a
        block of ``proj_dim`` per module. (A global layout whose factor spaces all fit the row stores
        them as they are, without projection: see ``GradientComputer.embedded``.)"""
        return "global" if self._resolved_values()["total_dim"] is not None else "module"

    @property
    def whitening_damping(self) -> float:
        """The damping of the warm-up whitening: ``damping``, floored (see MIN_WHITENING_DAMPING)."""
        return max(float(self.resolved().damping), MIN_WHITENING_DAMPING)  # type: ignore[arg-type]

    @property
    def torch_dtype(self):  # noqa: ANN201 - torch imported lazily to keep config import light
        import torch

        return {
            "int8": torch.int8,
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
            "float32": torch.float32,
        }[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraSSConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown GraSSConfig fields {unknown}; known fields are {sorted(known)}.")
        return cls(**data)

    def cache_dict(self) -> dict[str, Any]:
        """The resolved fields that determine the cache's content (what resume and append compare)."""
        resolved = self.resolved()
        return {f.name: getattr(resolved, f.name) for f in dataclasses.fields(self) if f.name not in SCORING_FIELDS}

    def cache_hash(self) -> str:
        blob = json.dumps(self.cache_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def replace(self, **changes: Any) -> GraSSConfig:
        """A copy with some fields changed; a field left at None keeps following the others."""
        return dataclasses.replace(self, **changes)


def factorised_compressors() -> list[str]:
    """The compressors with a factor space (where K-FAC / EK-FAC live)."""
    return [name for name in COMPRESSORS if compressor_class(name).factorised]


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r}.")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}.")

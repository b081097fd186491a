"""`GraSSConfig`: every knob of an attribution run, in one validated dataclass.

The dataclass is plain (no transformers import, and no torch import until a compressor is checked)
so the low stages can use it; every field carries ``metadata={"help": ...}`` so that
``transformers.HfArgumentParser`` turns it into command-line flags. Compressor names come from the
compressors' registry; what a compressor needs of the other fields it checks itself
(``Compressor.check_config``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from hf_grass.compressors import available_compressors, compressor_class

COMPRESSORS = tuple(available_compressors())
# the preconditioners, in one place: hf_grass.precondition applies them
PRECONDITIONERS = ("fim", "kfac", "ekfac", "identity")
DTYPES = ("int8", "float16", "bfloat16", "float32")
MASK_BASES = ("eigen", "input")
# The default per-document budget: numbers per row across all modules (31 x 1024). int8 rows of
# 31744 numbers plus their scale, norms and index are 31,764 bytes: under 32 KB (32,768) on any
# model depth, with about 1 KB left for the document's text (docs/howto/choosing.md "Budget";
# measured in benchmarks/quality.py).
DEFAULT_TOTAL_DIM = 31744
# The per-module layout's default (proj_dim numbers per module), for the compressors without a
# global layout and for the block Fisher, which needs per-module blocks.
DEFAULT_PROJ_DIM = 1024
# The smallest damping the warm-up whitening uses: at 0 the whitening factors of near-null
# directions grow without bound (~1500x measured), which only adds noise to fp16/int8 rows.
MIN_WHITENING_DAMPING = 1e-3

# Fields that change what is written to the cache. A cache written with other values of these is
# refused on resume; cosine, cache_dir and batch_size only affect scoring or I/O. damping is the
# default damping of queries, but a kfac/ekfac build also whitens its rows with it, so it is part
# of the cache (a query may still pass another damping: unbiased, a little noisier).
_CACHE_FIELDS = (
    "compressor",
    "proj_dim",
    "total_dim",
    "factor_dim",
    "mask_basis",
    "sparsify_factor",
    "sjlt_nnz",
    "distribution",
    "seed",
    "target_modules",
    "exclude_modules",
    "dtype",
    "loss_reduction",
    "preconditioner",
    "damping",
    "ekfac_sample_size",
    "warmup_tokens",
    "max_length",
    "shard_size",
)


@dataclass
class GraSSConfig:
    """Configuration of gradient compression, caching and scoring.

    ``GraSSConfig()`` is the measured default: FactGraSS with masks in the warm-up K-FAC eigenbasis,
    every module projected into one row of ``total_dim`` int8 numbers, EK-FAC. Giving ``proj_dim``
    instead selects the per-module layout (``proj_dim`` numbers per module), e.g.
    ``GraSSConfig(compressor="factgrass", proj_dim=1024, sparsify_factor=4, seed=0)``.
    Every field has a help text, so ``transformers.HfArgumentParser(GraSSConfig)`` makes flags of them.
    """

    compressor: str = field(
        default="factgrass",
        metadata={"help": f"Gradient compressor, one of {', '.join(COMPRESSORS)}."},
    )
    proj_dim: int | None = field(
        default=None,
        metadata={
            "help": "Per-module layout: compressed numbers k_hat per module, so a row grows with the "
            "model's depth (logra needs a perfect square). Default: 1024 where the global layout "
            "(total_dim) does not apply (compressors other than factgrass, or preconditioner fim)."
        },
    )
    total_dim: int | None = field(
        default=None,
        metadata={
            "help": "Global layout: numbers per document across all modules (every module's "
            f"compressed gradient is projected into one shared row), independent of depth. Default: "
            f"{DEFAULT_TOTAL_DIM} for factgrass unless proj_dim is given or preconditioner='fim'."
        },
    )
    factor_dim: int = field(
        default=128,
        metadata={
            "help": "Global layout: coordinates kept per factor (input and output side) of each module "
            "before the projection into the row; the pass costs about factor_dim*(d_in+d_out) per "
            "token and module."
        },
    )
    mask_basis: str | None = field(
        default=None,
        metadata={
            "help": "Where factgrass draws its masks: 'eigen' (eigen-directions of the warm-up K-FAC "
            "factors, whitened there; needs kfac/ekfac) or 'input' (the module's own coordinates, "
            "the original FactGraSS). Default: eigen in the global layout with kfac/ekfac, else input."
        },
    )
    sparsify_factor: int = field(
        default=4,
        metadata={
            "help": "k'/k_hat for grass and factgrass: the masked dimension before the final SJLT "
            "(factgrass needs sparsify_factor*proj_dim to be a perfect square)."
        },
    )
    sjlt_nnz: int = field(
        default=1,
        metadata={"help": "Non-zeros s per input coordinate in the SJLT (proj_dim must be divisible by s)."},
    )
    distribution: str = field(
        default="gaussian",
        metadata={"help": "Entry distribution of the `random` compressor: gaussian or rademacher."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of every random projection and mask."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules to attribute through: a list of names (a name matches itself and any "
            "module ending in '.name') or one regex matched against the full name. Default: every "
            "Linear/Conv1D (LoRA A/B only for PEFT models)."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules to leave out, same syntax as target_modules."},
    )
    dtype: str = field(
        default="int8",
        metadata={
            "help": "Storage dtype of the cached rows: int8 (with a float32 scale per row), float16, "
            "bfloat16 or float32."
        },
    )
    loss_reduction: str = field(
        default="sum",
        metadata={
            "help": "Per-example loss: 'sum' over supervised tokens, or 'mean' (divides by their count)."
        },
    )
    preconditioner: str | None = field(
        default=None,
        metadata={"help": "fim, kfac, ekfac or identity. Default: ekfac for factgrass/logra, fim otherwise."},
    )
    damping: float = field(
        default=0.001,
        metadata={
            "help": "Damping as a fraction of the mean eigenvalue of each module's preconditioner (chosen on "
            "bench-dev, docs/howto/choosing.md). A kfac/ekfac build also whitens its rows with it."
        },
    )
    cosine: bool = field(
        default=False,
        metadata={
            "help": "Unit-normalise scores: divide each by the exact norms of both sides, in the geometry "
            "cosine_norms names (TrackStar's and bergson's practice)."
        },
    )
    cosine_norms: str = field(
        default="preconditioned",
        metadata={
            "help": "The norms cosine divides by: 'preconditioned' (||H^-1/2 g||, unit-normalised "
            "influence; for the train side H is the cache's build-time K-FAC whitening) or 'gradient' "
            "(the raw gradient norms ||g||)."
        },
    )
    ekfac_sample_size: int = field(
        default=1024,
        metadata={
            "help": "Examples used by the warm-up pass that fits the K-FAC eigenbasis (ekfac/kfac only); "
            "the eigenvalue corrections then use every example."
        },
    )
    warmup_tokens: int = field(
        default=8192,
        metadata={
            "help": "The warm-up sample also stops at this many tokens (the first examples, in dataset "
            "order, up to ekfac_sample_size examples): it bounds the warm-up's cost on long documents. "
            "An example without input_ids counts as one token."
        },
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Truncate longer sequences to this many tokens (with a warning). Default: the "
            "model's context length."
        },
    )
    cache_dir: str = field(default="grass_cache", metadata={"help": "Directory of the gradient cache."})
    shard_size: int = field(default=1024, metadata={"help": "Rows (examples) per cache shard."})
    batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Batch size of the attribution pass. Default: the Trainer's eval batch size, or 8."
        },
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
        if self.preconditioner is None:
            self.preconditioner = default_preconditioner(self.compressor)
        _check_choice("preconditioner", self.preconditioner, PRECONDITIONERS)
        self._resolve_layout()
        compressor_class(self.compressor).check_config(self)
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
        if self.preconditioner in ("kfac", "ekfac") and not compressor_class(self.compressor).factorised:
            raise ValueError(
                f"preconditioner={self.preconditioner!r} needs Kronecker factors, which only the "
                f"factorised compressors ({', '.join(factorised_compressors())}) provide; use preconditioner='fim' "
                f"or 'identity' with compressor={self.compressor!r}."
            )
        if not isinstance(self.cosine, bool):
            raise TypeError(f"cosine must be True or False, got {self.cosine!r}.")
        _check_choice("cosine_norms", self.cosine_norms, ("preconditioned", "gradient"))
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)):
            raise TypeError(f"damping must be a float, got {self.damping!r}.")
        if not math.isfinite(self.damping) or self.damping < 0:
            raise ValueError(f"damping must be a finite number >= 0 (default 0.001), got {self.damping}.")

    def _resolve_layout(self) -> None:
        """Fill the layout fields left at None (see their help) and check they go together."""
        if self.proj_dim is not None and self.total_dim is not None:
            raise ValueError(
                f"give proj_dim (per-module layout) or total_dim (one row for all modules), not both; "
                f"got proj_dim={self.proj_dim}, total_dim={self.total_dim}."
            )
        if self.proj_dim is None and self.total_dim is None:
            if global_layout_applies(self.compressor, self.preconditioner):
                self.total_dim = DEFAULT_TOTAL_DIM
            else:
                self.proj_dim = DEFAULT_PROJ_DIM
        if self.total_dim is not None:
            if self.compressor != "factgrass":
                raise ValueError(
                    f"total_dim (the global layout) is implemented for compressor='factgrass'; for "
                    f"{self.compressor!r} give proj_dim (numbers per module) instead."
                )
            if self.preconditioner == "fim":
                raise ValueError(
                    "preconditioner='fim' fits one Fisher block per module, which needs the per-module "
                    "layout: give proj_dim (e.g. 1024) instead of total_dim, or use 'ekfac'/'kfac'."
                )
        if self.mask_basis is None:
            eigen = self.total_dim is not None and self.preconditioner in ("kfac", "ekfac")
            self.mask_basis = "eigen" if eigen else "input"
        _check_choice("mask_basis", self.mask_basis, MASK_BASES)
        if self.mask_basis == "eigen" and (
            self.compressor != "factgrass" or self.preconditioner not in ("kfac", "ekfac")
        ):
            raise ValueError(
                "mask_basis='eigen' takes factgrass's masks in the eigenbasis of the warm-up K-FAC fit, "
                "so it needs compressor='factgrass' and preconditioner='kfac' or 'ekfac'; use "
                "mask_basis='input' otherwise."
            )

    @property
    def row_dim(self) -> int | None:
        """Numbers per row of the global layout (``total_dim``), or None for the per-module layout."""
        return self.total_dim

    @property
    def output_dim(self) -> int:
        """What each module's compressor maps into: the shared row, or its own ``proj_dim`` slice."""
        return self.total_dim if self.total_dim is not None else int(self.proj_dim or DEFAULT_PROJ_DIM)

    @property
    def whitening_damping(self) -> float:
        """The damping of the warm-up whitening: ``damping``, floored (see MIN_WHITENING_DAMPING)."""
        return max(float(self.damping), MIN_WHITENING_DAMPING)

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
        """The fields that determine the cache's content (what resume and append compare)."""
        return {name: getattr(self, name) for name in _CACHE_FIELDS}

    def cache_hash(self) -> str:
        blob = json.dumps(self.cache_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def replace(self, **changes: Any) -> GraSSConfig:
        """A copy with some fields changed. A value that was a default stays "the default" when what
        it depends on changes: the preconditioner follows the compressor (ekfac for factgrass becomes
        fim for sjlt), and the layout and mask basis follow both."""
        if (
            "compressor" in changes
            and "preconditioner" not in changes
            and self.preconditioner == default_preconditioner(self.compressor)
        ):
            changes["preconditioner"] = None
        if {"compressor", "preconditioner"} & set(changes):
            if not {"proj_dim", "total_dim"} & set(changes) and self._default_layout():
                changes.update(proj_dim=None, total_dim=None)
            if "mask_basis" not in changes and self._default_mask_basis():
                changes["mask_basis"] = None
        return dataclasses.replace(self, **changes)

    def _default_layout(self) -> bool:
        if global_layout_applies(self.compressor, self.preconditioner):
            return self.total_dim == DEFAULT_TOTAL_DIM
        return self.proj_dim == DEFAULT_PROJ_DIM

    def _default_mask_basis(self) -> bool:
        eigen = self.total_dim is not None and self.preconditioner in ("kfac", "ekfac")
        return self.mask_basis == ("eigen" if eigen else "input")


def global_layout_applies(compressor: str, preconditioner: str | None) -> bool:
    """Whether the default layout is the global one (factgrass, any preconditioner but fim)."""
    return compressor == "factgrass" and preconditioner != "fim"


def default_preconditioner(compressor: str) -> str:
    """EK-FAC in the factor space for the factorised compressors, the block Fisher otherwise."""
    return "ekfac" if compressor_class(compressor).factorised else "fim"


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

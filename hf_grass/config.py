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
DTYPES = ("float16", "bfloat16", "float32")

# Fields that change what is written to the cache. A cache written with other values of these is
# refused on resume; cosine, cache_dir and batch_size only affect scoring or I/O. damping is a
# query-time choice, but a kfac/ekfac build also uses it for the warm-up whitening of its rows.
_CACHE_FIELDS = (
    "compressor",
    "proj_dim",
    "sparsify_factor",
    "sjlt_nnz",
    "distribution",
    "seed",
    "target_modules",
    "exclude_modules",
    "dtype",
    "loss_reduction",
    "preconditioner",
    "ekfac_sample_size",
    "max_length",
    "shard_size",
)


@dataclass
class GraSSConfig:
    """Configuration of gradient compression, caching and scoring.

    For example ``GraSSConfig(compressor="factgrass", proj_dim=1024, sparsify_factor=4, seed=0)``.
    Every field has a help text, so ``transformers.HfArgumentParser(GraSSConfig)`` makes flags of them.
    """

    compressor: str = field(
        default="factgrass",
        metadata={"help": f"Gradient compressor, one of {', '.join(COMPRESSORS)}."},
    )
    proj_dim: int = field(
        default=1024,
        metadata={"help": "Compressed dimension k_hat per module (logra needs a perfect square)."},
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
        default="float16",
        metadata={"help": "Storage dtype of the cached gradients: float16, bfloat16 or float32."},
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
        default=0.1,
        metadata={"help": "Damping as a fraction of the mean eigenvalue of each module's preconditioner."},
    )
    cosine: bool = field(
        default=False,
        metadata={"help": "Cosine-normalise scores (divide by the norms of both gradients)."},
    )
    ekfac_sample_size: int = field(
        default=1024,
        metadata={
            "help": "Examples used by the warm-up pass that fits the K-FAC eigenbasis (ekfac/kfac only); "
            "the eigenvalue corrections then use every example."
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
        for name in ("proj_dim", "sparsify_factor", "sjlt_nnz", "shard_size", "ekfac_sample_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("max_length", "batch_size"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {self.seed!r}.")
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
        if self.preconditioner is None:
            self.preconditioner = default_preconditioner(self.compressor)
        _check_choice("preconditioner", self.preconditioner, PRECONDITIONERS)
        if self.preconditioner in ("kfac", "ekfac") and not compressor_class(self.compressor).factorised:
            raise ValueError(
                f"preconditioner={self.preconditioner!r} needs Kronecker factors, which only the "
                f"factorised compressors ({', '.join(factorised_compressors())}) provide; use preconditioner='fim' "
                f"or 'identity' with compressor={self.compressor!r}."
            )
        if not isinstance(self.cosine, bool):
            raise TypeError(f"cosine must be True or False, got {self.cosine!r}.")
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)):
            raise TypeError(f"damping must be a float, got {self.damping!r}.")
        if not math.isfinite(self.damping) or self.damping < 0:
            raise ValueError(f"damping must be a finite number >= 0 (default 0.1), got {self.damping}.")

    @property
    def torch_dtype(self):  # noqa: ANN201 - torch imported lazily to keep config import light
        import torch

        return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[self.dtype]

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
        """A copy with some fields changed. A preconditioner that was the compressor's default stays
        "the default" when the compressor changes (ekfac for factgrass becomes fim for sjlt)."""
        if (
            "compressor" in changes
            and "preconditioner" not in changes
            and self.preconditioner == default_preconditioner(self.compressor)
        ):
            changes["preconditioner"] = None
        return dataclasses.replace(self, **changes)


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

"""GraSSConfig: help metadata, HfArgumentParser, validation messages, defaults and the cache hash."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

from hf_grass.config import COMPRESSORS, GraSSConfig, factorised_compressors

FACTORISED = tuple(factorised_compressors())

FIELDS = {f.name: f for f in dataclasses.fields(GraSSConfig)}


def test_every_field_has_help() -> None:
    for name, f in FIELDS.items():
        help_text = f.metadata.get("help")
        assert isinstance(help_text, str) and len(help_text) > 10, f"field {name!r} has no useful help"


def test_hf_argument_parser() -> None:
    transformers = pytest.importorskip("transformers")
    parser = transformers.HfArgumentParser(GraSSConfig)
    (cfg,) = parser.parse_args_into_dataclasses(["--compressor", "logra", "--proj_dim", "256"])
    assert isinstance(cfg, GraSSConfig)
    assert (cfg.compressor, cfg.proj_dim) == ("logra", 256)
    assert cfg.preconditioner is None  # the config keeps what was given ...
    assert cfg.resolved().preconditioner == "ekfac"  # ... and resolved() fills in the default
    assert cfg.sparsify_factor == FIELDS["sparsify_factor"].default

    (cfg,) = parser.parse_args_into_dataclasses(
        [
            "--compressor",
            "sjlt",
            "--max_length",
            "128",
            "--cosine",
            "--target_modules",
            r".*\.mlp\..*",
            "--damping",
            "0.01",
            "--dtype",
            "bfloat16",
        ]
    )
    assert cfg.max_length == 128 and cfg.cosine is True and cfg.damping == 0.01
    assert cfg.target_modules == r".*\.mlp\..*" and cfg.torch_dtype == torch.bfloat16
    assert cfg.resolved().preconditioner == "fim"

    # validation runs on parsed values too
    with pytest.raises(ValueError, match="perfect square"):
        parser.parse_args_into_dataclasses(["--compressor", "logra", "--proj_dim", "250"])


# (field, bad value, exception type). Every field that __post_init__ validates appears at least once.
INVALID: list[tuple[str, Any, type[Exception]]] = [
    ("compressor", "gauss", ValueError),
    ("compressor", None, ValueError),
    ("proj_dim", 0, ValueError),
    ("proj_dim", -4, ValueError),
    ("proj_dim", 16.0, TypeError),
    ("proj_dim", True, TypeError),
    ("sparsify_factor", 0, ValueError),
    ("sparsify_factor", "4", TypeError),
    ("sjlt_nnz", 0, ValueError),
    ("sjlt_nnz", 3, ValueError),  # 1024 is not divisible by 3
    ("distribution", "uniform", ValueError),
    ("seed", "0", TypeError),
    ("seed", 1.5, TypeError),
    ("seed", False, TypeError),
    ("target_modules", [""], TypeError),
    ("target_modules", ["q_proj", 3], TypeError),
    ("target_modules", 5, TypeError),
    ("exclude_modules", {"lm_head"}, TypeError),
    ("dtype", "float64", ValueError),
    ("dtype", torch.float16, ValueError),
    ("loss_reduction", "none", ValueError),
    ("preconditioner", "diag", ValueError),
    ("damping", -0.1, ValueError),
    ("damping", math.nan, ValueError),
    ("damping", math.inf, ValueError),
    ("damping", "0.1", TypeError),
    ("damping", True, TypeError),
    ("ekfac_sample_size", 0, ValueError),
    ("max_length", 0, ValueError),
    ("max_length", 12.5, TypeError),
    ("shard_size", -1, ValueError),
    ("batch_size", 0, ValueError),
]


@pytest.mark.parametrize(("name", "value", "exc"), INVALID, ids=[f"{n}={v!r}" for n, v, _ in INVALID])
def test_invalid_values_name_the_field(name: str, value: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc) as info:
        GraSSConfig(**{name: value})
    assert name in str(info.value), f"message does not name {name!r}: {info.value}"


def test_valid_optional_values() -> None:
    cfg = GraSSConfig(
        target_modules=("q_proj", "v_proj"),
        exclude_modules=r"lm_head",
        max_length=512,
        batch_size=2,
        damping=0,
    )
    assert cfg.target_modules == ["q_proj", "v_proj"]  # tuples are normalised to lists
    assert cfg.exclude_modules == "lm_head" and cfg.damping == 0


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_default_preconditioner(compressor: str) -> None:
    # proj_dim 1024 = 32^2 and 4 * 1024 = 64^2 is valid for every compressor
    cfg = GraSSConfig(compressor=compressor, proj_dim=1024)
    assert cfg.resolved().preconditioner == ("ekfac" if compressor in FACTORISED else "fim")


@pytest.mark.parametrize("preconditioner", ["kfac", "ekfac"])
@pytest.mark.parametrize("compressor", [c for c in COMPRESSORS if c not in FACTORISED])
def test_kronecker_preconditioner_needs_factorised(compressor: str, preconditioner: str) -> None:
    with pytest.raises(ValueError, match=f"preconditioner='{preconditioner}' needs Kronecker factors"):
        GraSSConfig(compressor=compressor, preconditioner=preconditioner)


@pytest.mark.parametrize("preconditioner", ["fim", "kfac", "ekfac", "identity"])
@pytest.mark.parametrize("compressor", FACTORISED)
def test_factorised_accept_every_preconditioner(compressor: str, preconditioner: str) -> None:
    cfg = GraSSConfig(compressor=compressor, preconditioner=preconditioner)
    assert cfg.preconditioner == cfg.resolved().preconditioner == preconditioner


# Base: the default config (factgrass, proj_dim 1024, sparsify_factor 4). Each alternative is valid
# on its own against that base.
CACHE_ALTERNATIVES: dict[str, Any] = {
    "compressor": "logra",  # 1024 = 32^2
    "proj_dim": 256,  # 4 * 256 = 32^2
    "sparsify_factor": 16,  # 16 * 1024 = 128^2
    "sjlt_nnz": 2,
    "distribution": "rademacher",
    "seed": 1,
    "target_modules": ["q_proj"],
    "exclude_modules": "lm_head",
    "dtype": "float32",
    "loss_reduction": "mean",
    "preconditioner": "kfac",
    "ekfac_sample_size": 512,
    "max_length": 128,
    "shard_size": 512,
    "total_dim": 16384,
    "factor_dim": 64,
    "warmup_tokens": 4096,
    "mask_basis": "input",
    # the build-time damping whitens kfac/ekfac rows, so it changes the cache's bytes (issue 10)
    "damping": 0.5,
}
# Fields that only affect scoring or I/O: a cache must stay reusable when they change.
NON_CACHE_ALTERNATIVES: dict[str, Any] = {
    "cosine": True,
    "cosine_norms": "gradient",
    "cache_dir": "elsewhere",
    "batch_size": 4,
}


def test_alternatives_cover_every_field() -> None:
    assert set(CACHE_ALTERNATIVES) == set(GraSSConfig().cache_dict())
    assert set(CACHE_ALTERNATIVES) | set(NON_CACHE_ALTERNATIVES) == set(FIELDS)


@pytest.mark.parametrize("name", list(CACHE_ALTERNATIVES))
def test_cache_hash_changes_with_cache_fields(name: str) -> None:
    base = GraSSConfig()
    changed = GraSSConfig(**{name: CACHE_ALTERNATIVES[name]})
    assert changed.cache_hash() != base.cache_hash()


@pytest.mark.parametrize("name", list(NON_CACHE_ALTERNATIVES))
def test_cache_hash_ignores_scoring_fields(name: str) -> None:
    changed = GraSSConfig(**{name: NON_CACHE_ALTERNATIVES[name]})
    assert getattr(changed, name) != getattr(GraSSConfig(), name)
    assert changed.cache_hash() == GraSSConfig().cache_hash()


def test_cache_hash_is_stable() -> None:
    h = GraSSConfig().cache_hash()
    assert len(h) == 16 and int(h, 16) >= 0
    # an explicit default preconditioner is the same cache as the implicit one
    assert GraSSConfig(preconditioner="ekfac").cache_hash() == h
    # a tuple is normalised to a list first, so both spellings name the same cache
    assert (
        GraSSConfig(target_modules=["a", "b"]).cache_hash()
        == GraSSConfig(target_modules=("a", "b")).cache_hash()
    )


def test_dict_round_trip() -> None:
    cfg = GraSSConfig(compressor="logra", proj_dim=256, target_modules=["q_proj"], seed=3)
    assert GraSSConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"Unknown GraSSConfig fields \['proj_dims'\]"):
        GraSSConfig.from_dict({**cfg.to_dict(), "proj_dims": 4})


def test_config_keeps_what_was_given() -> None:
    """Defaults that depend on other fields are filled in by ``resolved()`` alone, so ``replace``
    needs no guessing: a field left at None keeps following the others (issue 16 item 4)."""
    cfg = GraSSConfig()
    assert (cfg.preconditioner, cfg.proj_dim, cfg.total_dim, cfg.mask_basis) == (None, None, None, None)
    resolved = cfg.resolved()
    assert (resolved.preconditioner, resolved.total_dim, resolved.mask_basis) == ("ekfac", 31744, "top")
    assert resolved.resolved() is resolved and cfg.layout == "global"
    other = cfg.replace(compressor="sjlt").resolved()  # the preconditioner and layout follow
    assert (other.preconditioner, other.proj_dim, other.total_dim, other.mask_basis) == ("fim", 1024, None, "input")
    assert GraSSConfig(preconditioner="fim").layout == "module"
    # a resolved config is the same cache as the config it came from
    assert resolved.cache_hash() == cfg.cache_hash() and GraSSConfig.from_dict(resolved.to_dict()) == resolved

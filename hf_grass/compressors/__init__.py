"""Gradient compressors: one file per compressor, found by its name.

>>> from hf_grass.compressors import make_compressor
>>> c = make_compressor(config, module_name="model.layers.0.mlp.up_proj", d_in=64, d_out=32)
>>> c.compress(x, delta)            # x [B,T,d_in], delta [B,T,d_out] -> [B, config.proj_dim]
>>> c.compress_gradient(g)          # g [B,d_out,d_in] -> [B, config.proj_dim]

A compressor is a module of this package named like the compressor (``factgrass.py``), defining a
``Compressor`` subclass registered with ``@register_compressor("factgrass")``. Nothing else lists the
names: ``available_compressors()`` reads them off this folder, so adding a compressor is adding one
file. Listing the names imports nothing (``GraSSConfig`` and ``hf-grass --help`` stay free of torch);
a compressor's module is imported the first time it is used.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hf_grass.compressors.base import Compressor, CompressorSettings

# modules of this package that are not compressors
_SUPPORT = frozenset({"base", "factor_maps"})
_LAZY = {"Compressor", "CompressorSettings", "FactorisedCompressor", "register_compressor"}

__all__ = [
    "Compressor",
    "CompressorSettings",
    "FactorisedCompressor",
    "available_compressors",
    "compressor_class",
    "make_compressor",
    "register_compressor",
]


def available_compressors() -> list[str]:
    """The compressor names, sorted: one per module file of this package."""
    return list(_names())


@lru_cache(maxsize=1)
def _names() -> tuple[str, ...]:
    names = (m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg)
    return tuple(sorted(n for n in names if n not in _SUPPORT and not n.startswith("_")))


def compressor_class(name: str) -> type[Compressor]:
    """The class registered under ``name`` (its module is imported on first use)."""
    if name not in _names():
        raise ValueError(f"unknown compressor {name!r}; available: {', '.join(available_compressors())}")
    importlib.import_module(f"{__name__}.{name}")
    from hf_grass.compressors.base import registered

    return registered(name)


def make_compressor(
    config: CompressorSettings, module_name: str, d_in: int, d_out: int, bias: bool = False, embed: bool = False
) -> Compressor:
    """The compressor of ``config.compressor`` for one module.

    Args:
        config: the run's settings (a ``GraSSConfig``: compressor, proj_dim, seed, ...).
        module_name: full module name; it seeds the module's random objects.
        d_in: input width of the gradient, counting the bias column when ``bias=True``.
        d_out: output width.
        bias: whether the last input column is the implicit bias column (see ``base``).
        embed: put the factor space into the row as it is (global layout, when every module's
            factor space fits ``total_dim`` together; factorised compressors only).
    """
    return compressor_class(config.compressor)(config, module_name, d_in, d_out, bias=bias, embed=embed)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from hf_grass.compressors import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

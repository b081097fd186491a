"""Preconditioners: one file per preconditioner, found by name like the compressors.

>>> from hf_grass.precondition import preconditioner_class
>>> cls = preconditioner_class("ekfac")        # the class registered in ekfac.py
>>> pre = cls.fit(statistics, eigenbasis).with_damping(0.001)
>>> pre.apply("model.layers.0.mlp.up_proj", factor_gradients)

A preconditioner is a module of this package named like it (``ekfac.py``), defining a
``Preconditioner`` subclass registered with ``@register_preconditioner("ekfac")``. The class says what
it needs (the statistics the pass must gather, a factor space, whitened rows), how it is fitted
from those statistics and how it applies to query gradients (``base.py``). Nothing outside this
package compares preconditioner names: ``available_preconditioners()`` reads them off this folder,
without importing anything (``GraSSConfig`` and ``hf-grass --help`` stay free of torch).

Support modules (not preconditioners):

- ``linalg``: the float64 helpers every fit shares (symmetrise, eigh, Kronecker rotations);
- ``statistics``: the typed running sums gathered during the pass (``Statistics``);
- ``eigenbasis``: the typed warm-up fit of kfac/ekfac caches, which whitens their rows (``Eigenbasis``);
- ``warmup``: the warm-up's covariance sums and the fits that make an ``Eigenbasis`` of them.

This stage comes right after the compressors: it imports nothing of the capture, the cache or the
configuration, so that ``GraSSConfig`` can ask a preconditioner class what it needs.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hf_grass.precondition.base import Preconditioner

# modules of this package that are not preconditioners
_SUPPORT = frozenset({"base", "linalg", "statistics", "eigenbasis", "warmup"})
_LAZY = {
    "Preconditioner": "hf_grass.precondition.base",
    "register_preconditioner": "hf_grass.precondition.base",
    "Statistics": "hf_grass.precondition.statistics",
    "StatsAccumulator": "hf_grass.precondition.statistics",
    "ModuleSpec": "hf_grass.precondition.statistics",
    "Eigenbasis": "hf_grass.precondition.eigenbasis",
    "ModuleBasis": "hf_grass.precondition.eigenbasis",
}

__all__ = [
    "Eigenbasis",
    "ModuleBasis",
    "ModuleSpec",
    "Preconditioner",
    "Statistics",
    "StatsAccumulator",
    "available_preconditioners",
    "default_preconditioner",
    "preconditioner_class",
    "register_preconditioner",
]


def available_preconditioners() -> list[str]:
    """The preconditioner names, sorted: one per module file of this package."""
    return list(_names())


@lru_cache(maxsize=1)
def _names() -> tuple[str, ...]:
    names = (m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg)
    return tuple(sorted(n for n in names if n not in _SUPPORT and not n.startswith("_")))


def preconditioner_class(name: str) -> type[Preconditioner]:
    """The class registered under ``name`` (its module is imported on first use)."""
    if name not in _names():
        raise ValueError(f"unknown preconditioner {name!r}; available: {', '.join(available_preconditioners())}")
    importlib.import_module(f"{__name__}.{name}")
    from hf_grass.precondition.base import registered

    return registered(name)


def default_preconditioner(factorised: bool) -> str:
    """EK-FAC in the factor space for the factorised compressors, the block Fisher otherwise."""
    return "ekfac" if factorised else "fim"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The preconditioner interface and its registry.

A preconditioner approximates each module's block ``H_l`` of the curvature and applies ``H_l^-1`` to
query gradients at query time (train rows are never rewritten). A class declares:

- **what it needs**: the statistics the attribution pass must gather (``statistics``), whether the
  build fits the warm-up K-FAC eigenbasis and stores whitened rows (``whitens_rows``), whether it
  needs one row block per module (``needs_module_blocks``) and what it acts on (``acts_on``:
  compressed ``"rows"`` or factor-space ``"factors"``, which needs a factorised compressor);
- **how it fits**: ``fit(statistics, eigenbasis)``, eigendecompositions done once per cache;
- **how it applies**: ``apply(name, t)`` for one module, with the damping
  ``lambda_l = damping * mean(eigenvalues_l)`` added at use, so any damping can be tried without
  refitting (``with_damping``).

Fitted factors are plain float64 tensors per module (``tensors`` / ``from_tensors``), which the
scoring stage saves beside the cache (``hf_grass.scoring.preconditioning``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, TypeVar

import torch

from hf_grass.precondition.eigenbasis import Eigenbasis
from hf_grass.precondition.statistics import Statistics

_REGISTRY: dict[str, type[Preconditioner]] = {}
P = TypeVar("P", bound="Preconditioner")


def register_preconditioner(name: str):
    """Class decorator: make a preconditioner usable as ``GraSSConfig(preconditioner=name)``.

    ``name`` must be the name of the module that defines the class: that is how
    ``hf_grass.precondition.available_preconditioners()`` finds it without importing anything.
    """

    def wrap(cls: type[Preconditioner]) -> type[Preconditioner]:
        if name in _REGISTRY:
            raise ValueError(f"preconditioner {name!r} is registered twice")
        if cls.__module__.rpartition(".")[2] != name:
            raise ValueError(f"preconditioner {name!r} must be defined in a module named {name}.py")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered(name: str) -> type[Preconditioner]:
    """The class of an imported preconditioner module (``preconditioner_class`` imports it first)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"preconditioner module {name!r} registers no preconditioner class") from None


class Preconditioner(ABC):
    """Fitted per-module curvature of one kind, applied to query gradients with a damping.

    Args:
        factors: per module name, the fitted float64 tensors (each class documents its own).
        damping: fraction of each module's mean eigenvalue added before inverting.
    """

    name: ClassVar[str] = ""
    #: what ``apply`` takes: compressed ``"rows"`` (one block per module) or ``"factors"`` (the
    #: factor-space gradients ``[n, m_out, m_in]`` of a factorised compressor)
    acts_on: ClassVar[str] = "rows"
    #: the build fits the warm-up K-FAC eigenbasis and stores its rows whitened by it
    whitens_rows: ClassVar[bool] = False
    #: one row block per module is needed (the per-module layout, ``proj_dim``)
    needs_module_blocks: ClassVar[bool] = False

    def __init__(self, factors: dict[str, dict[str, torch.Tensor]] | None = None, damping: float = 0.1):
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
            raise ValueError(f"damping must be a number >= 0, got {damping!r}")
        self.factors = factors or {}
        self.damping = float(damping)

    # ---- what it needs --------------------------------------------------------------------------

    @classmethod
    def statistics(cls, eigen_masks: bool) -> frozenset[str]:
        """The running sums the pass gathers for it (``Statistics`` field names): ``"fisher"``,
        ``"covariances"``, ``"ekfac"``. ``eigen_masks``: the factgrass masks are taken in the
        warm-up eigenbasis, whose fit already holds the K-FAC eigenvalues."""
        return frozenset()

    @classmethod
    def check_config(cls, *, factorised: bool, global_layout: bool, compressor: str) -> None:
        """Refuse a configuration this preconditioner cannot serve (``ValueError`` saying how to fix it)."""
        if cls.acts_on == "factors" and not factorised:
            raise ValueError(
                f"preconditioner={cls.name!r} needs Kronecker factors, which only the factorised "
                f"compressors provide; use preconditioner='fim' or 'identity' with compressor={compressor!r}."
            )
        if cls.needs_module_blocks and global_layout:
            raise ValueError(
                f"preconditioner={cls.name!r} fits one block per module, which needs the per-module "
                "layout: give proj_dim (e.g. 1024) instead of total_dim, or use 'ekfac'/'kfac'."
            )

    @classmethod
    def unavailable(cls, built: type[Preconditioner], eigen_masks: bool) -> str | None:
        """Why a cache built for ``built`` cannot serve this preconditioner (None: it can)."""
        missing = cls.statistics(eigen_masks) - built.statistics(eigen_masks)
        if missing or (cls.acts_on == "factors" and not built.whitens_rows):
            return f"{cls.name!r} needs {', '.join(sorted(missing)) or 'the warm-up eigenbasis'}"
        return None

    # ---- fitting and application ----------------------------------------------------------------

    @classmethod
    @abstractmethod
    def fit(cls: type[P], stats: Statistics, basis: Eigenbasis | None) -> P:
        """Eigendecompose what ``stats`` (and the warm-up ``basis``) hold, once per cache."""

    def with_damping(self: P, damping: float) -> P:
        """The same fit with another damping (nothing is refitted)."""
        return type(self)(self.factors, damping)

    @abstractmethod
    def apply(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``H^-1 t`` for module ``name``: compressed rows ``[n, k]`` or factor gradients
        ``[n, m_out, m_in]`` (``acts_on``), float64."""

    def precondition_rows(self, rows: torch.Tensor, offsets: dict[str, tuple[int, int]]) -> torch.Tensor:
        """``H^-1`` of compressed query rows ``[n, dim]``, module block by module block."""
        out = torch.zeros_like(rows, dtype=torch.float64)
        for name, (start, stop) in offsets.items():
            out[:, start:stop] = self.apply(name, rows[:, start:stop])
        return out

    def inverse(self, eig: torch.Tensor) -> torch.Tensor:
        """``1 / (eig + lambda)`` with ``lambda = damping * mean(eig)``; 0 where the curvature is 0
        (a module that never received gradient: its query part stays 0)."""
        denom = eig + self.damping * float(eig.mean())
        return torch.where(denom > 0, 1.0 / denom.clamp(min=torch.finfo(denom.dtype).tiny), torch.zeros_like(denom))

    # ---- saving ---------------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fitted factors as one flat dict (``module::part``), for safetensors."""
        return {f"{m}::{k}": v for m, parts in self.factors.items() for k, v in parts.items()}

    @classmethod
    def from_tensors(cls: type[P], flat: dict[str, torch.Tensor], damping: float) -> P:
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            module, _, part = key.rpartition("::")
            factors.setdefault(module, {})[part] = value.clone()
        return cls(factors, damping)

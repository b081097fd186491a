"""The running float64 statistics gathered during the pass, from which preconditioners are fitted.

Per module (``ModuleStatistics``), what a preconditioner class asks for (``Preconditioner.statistics``):

- ``fisher``: ``sum_i g_i g_i^T`` of the compressed rows ``[k, k]`` (the block Fisher);
- ``covariances``: the token sums of ``x' x'^T`` and ``delta' delta'^T`` in the factor space (masked
  inputs / output gradients for factgrass, projected ones for logra), and the token count (K-FAC);
- ``ekfac``: ``sum_i (Q_out^T G_i Q_in)^2`` per example, the second moments in the warm-up
  eigenbasis that replace K-FAC's eigenvalues (EK-FAC). With masks taken in the eigenbasis the
  factor space already is that basis; a hashed (wide) side is kept in its own coordinates here
  (``curvature_grads``), so the moments are per coordinate, not per bucket.

All sums are plain tensors (``to_tensors``: ``examples``, ``name::fisher``, ``name::cov_in``,
``name::cov_out``, ``name::tokens``, ``name::lambda``), checkpointed with every shard and added over
the writer processes when read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from hf_grass.precondition.eigenbasis import Eigenbasis

_KEYS = {"fisher": "fisher", "cov_in": "cov_in", "cov_out": "cov_out", "tokens": "tokens", "ekfac": "lambda"}


@dataclass(frozen=True)
class ModuleSpec:
    """A module's name, its compressed width and its factor-space widths (0: not factorised)."""

    name: str
    dim: int
    m_in: int = 0
    m_out: int = 0


@dataclass
class ModuleStatistics:
    """The sums of one module (each ``None`` unless its preconditioner asked for it)."""

    fisher: torch.Tensor | None = None  # [k, k]
    cov_in: torch.Tensor | None = None  # [m_in, m_in]
    cov_out: torch.Tensor | None = None  # [m_out, m_out]
    tokens: torch.Tensor | None = None  # [] token count of the covariances
    ekfac: torch.Tensor | None = None  # [c_out, c_in] squared per-example gradients in the eigenbasis


@dataclass
class Statistics:
    """Every module's sums and the number of examples they are over."""

    examples: float = 0.0
    modules: dict[str, ModuleStatistics] = field(default_factory=dict)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"examples": torch.tensor(float(self.examples), dtype=torch.float64)}
        for name, mod in self.modules.items():
            for attr, key in _KEYS.items():
                value = getattr(mod, attr)
                if value is not None:
                    out[f"{name}::{key}"] = value.detach().cpu()
        return out

    @classmethod
    def from_tensors(cls, flat: Mapping[str, torch.Tensor]) -> Statistics:
        attrs = {key: attr for attr, key in _KEYS.items()}
        modules: dict[str, ModuleStatistics] = {}
        for key, value in flat.items():
            if key == "examples":
                continue
            name, _, part = key.rpartition("::")
            if part not in attrs:
                raise ValueError(f"unknown statistic {key!r}")
            setattr(modules.setdefault(name, ModuleStatistics()), attrs[part], value.to(torch.float64))
        return cls(float(flat.get("examples", 0.0)), modules)


class BatchStatistics(Protocol):
    """What one batch gives the accumulator (``hf_grass.capture.BatchGradients`` provides it)."""

    losses: torch.Tensor
    rows: torch.Tensor | None
    factor_grads: dict[str, torch.Tensor]
    curvature_grads: dict[str, torch.Tensor]
    cov_in: dict[str, torch.Tensor]
    cov_out: dict[str, torch.Tensor]
    tokens: dict[str, int]


class StatsAccumulator:
    """The running sums of ``needs`` (``Preconditioner.statistics``) over the batches of a pass.

    Args:
        modules: the modules, in row order (``dim``: each one's block of a per-module row).
        needs: which sums to keep: ``"fisher"``, ``"covariances"``, ``"ekfac"``.
        eigenbasis: the warm-up fit, in which EK-FAC's moments are taken (needed for ``"ekfac"``).
        device: where the sums live (the model's device: no transfer per batch).
    """

    def __init__(
        self,
        modules: list[ModuleSpec],
        needs: frozenset[str],
        eigenbasis: Eigenbasis | None = None,
        device: torch.device | str = "cpu",
    ):
        unknown = set(needs) - {"fisher", "covariances", "ekfac"}
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}")
        if "ekfac" in needs and eigenbasis is None:
            raise ValueError("EK-FAC statistics need the warm-up eigenbasis")
        self.modules, self.needs, self.eigenbasis = modules, needs, eigenbasis
        self.device = torch.device(device)
        f64 = {"dtype": torch.float64, "device": self.device}
        self.sums = Statistics()
        for m in modules:
            mod = self.sums.modules[m.name] = ModuleStatistics()
            if "fisher" in needs:
                mod.fisher = torch.zeros(m.dim, m.dim, **f64)
            if "covariances" in needs:
                mod.cov_in, mod.cov_out = torch.zeros(m.m_in, m.m_in, **f64), torch.zeros(m.m_out, m.m_out, **f64)
                mod.tokens = torch.zeros((), **f64)
            if "ekfac" in needs:
                assert eigenbasis is not None
                mod.ekfac = torch.zeros(eigenbasis.curvature_shape(m.name, (m.m_out, m.m_in)), **f64)
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for m in modules:
            self.offsets[m.name] = (start, start + m.dim)
            start += m.dim

    @property
    def needs_factor_grads(self) -> bool:
        return "ekfac" in self.needs

    @property
    def needs_covariances(self) -> bool:
        return "covariances" in self.needs

    @property
    def needs_curvature_grads(self) -> bool:
        """Per-coordinate EK-FAC moments of hashed (wide) sides need their unhashed gradients."""
        return "ekfac" in self.needs and self.eigenbasis is not None and self.eigenbasis.has_hashed_sides

    def update(self, grads: BatchStatistics, rotated: dict[str, torch.Tensor] | None = None) -> None:
        """Add one batch (all of its examples count). ``rotated``: the factor gradients already
        rotated into the eigenbasis (float64), when the caller computed them anyway."""
        self.sums.examples += grads.losses.shape[0]
        for m in self.modules:
            mod = self.sums.modules[m.name]
            if mod.fisher is not None:
                assert grads.rows is not None, "fisher statistics need the compressed rows"
                start, stop = self.offsets[m.name]
                block = grads.rows[:, start:stop].to(self.device, torch.float64)
                mod.fisher += block.T @ block
            if mod.cov_in is not None and m.name in grads.cov_in:
                assert mod.cov_out is not None and mod.tokens is not None
                mod.cov_in += grads.cov_in[m.name].to(self.device)
                mod.cov_out += grads.cov_out[m.name].to(self.device)
                mod.tokens += grads.tokens[m.name]
            if mod.ekfac is not None:
                assert self.eigenbasis is not None
                if m.name in grads.curvature_grads:  # a hashed side: moments per coordinate
                    turned = self.eigenbasis.rotate(m.name, grads.curvature_grads[m.name].to(self.device))
                elif rotated is not None and m.name in rotated:
                    turned = rotated[m.name].to(self.device)
                elif m.name in grads.factor_grads:
                    turned = self.eigenbasis.rotate(m.name, grads.factor_grads[m.name].to(self.device))
                else:  # not reached by this batch: zero gradient
                    continue
                mod.ekfac += turned.square().sum(dim=0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.sums.to_tensors()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        mine = self.state_dict()
        missing, extra = set(mine) - set(state), set(state) - set(mine)
        if missing or extra:
            raise ValueError(
                f"statistics do not match this cache: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}"
            )
        for key, value in mine.items():
            if state[key].shape != value.shape:
                raise ValueError(
                    f"statistic {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}"
                )
        loaded = Statistics.from_tensors({k: v.to(self.device).clone() for k, v in state.items()})
        loaded.modules = {m.name: loaded.modules.get(m.name, ModuleStatistics()) for m in self.modules}
        self.sums = loaded

"""Running float64 statistics gathered during the pass, from which the preconditioners are fitted.

- ``fim``: per module ``sum_i g_i g_i^T`` of the compressed rows ``[k, k]``.
- ``kfac``/``ekfac``: per module the token sums of ``x' x'^T`` and ``delta' delta'^T`` in the
  factor space (masked inputs / output gradients for factgrass, projected ones for logra), and the
  token count. ``ekfac`` also sums ``(Q_out^T G'_i Q_in)^2`` per example: the corrected eigenvalues
  in the eigenbasis of a warm-up fit (``eigenbasis``). With masks taken in the eigenbasis
  (``mask_basis="eigen"``) the K-FAC eigenvalues come from the warm-up fit itself, so only the
  EK-FAC sums are kept.
- ``FullCovariances``: the warm-up's sums of ``x x^T`` and ``delta delta^T`` in each module's full
  input and output space, which ``fit_rotated_masks`` eigendecomposes.

All sums are plain tensors in a ``state_dict`` so they are checkpointed with every shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_grass.capture.engine import BatchGradients
from hf_grass.compressors.base import Compressor
from hf_grass.precondition.eigenbasis import is_rotated, rotate


@dataclass(frozen=True)
class ModuleSpec:
    name: str
    dim: int  # compressed dimension k
    m_in: int = 0  # factor-space widths (0: not factorised)
    m_out: int = 0


def covariance_keys(name: str) -> tuple[str, str, str]:
    return f"{name}::cov_in", f"{name}::cov_out", f"{name}::tokens"


class StatsAccumulator:
    def __init__(
        self,
        modules: list[ModuleSpec],
        preconditioner: str,
        eigenbasis: dict[str, torch.Tensor] | None = None,
        device: torch.device | str = "cpu",
    ):
        self.modules = modules
        self.preconditioner = preconditioner
        self.eigenbasis = eigenbasis
        if preconditioner == "ekfac" and eigenbasis is None:
            raise ValueError("ekfac statistics need the warm-up eigenbasis")
        self.device = torch.device(device)
        # masks in the eigenbasis: K-FAC's eigenvalues come with the basis, no covariance to sum
        self.covariances_needed = preconditioner in ("kfac", "ekfac") and not is_rotated(eigenbasis)
        self.sums: dict[str, torch.Tensor] = {"examples": torch.zeros((), dtype=torch.float64)}
        f64 = {"dtype": torch.float64, "device": self.device}
        for m in modules:
            if preconditioner == "fim":
                self.sums[f"{m.name}::fisher"] = torch.zeros(m.dim, m.dim, **f64)
            if self.covariances_needed:
                k_in, k_out, k_tok = covariance_keys(m.name)
                self.sums[k_in] = torch.zeros(m.m_in, m.m_in, **f64)
                self.sums[k_out] = torch.zeros(m.m_out, m.m_out, **f64)
                self.sums[k_tok] = torch.zeros((), **f64)
            if preconditioner == "ekfac":
                self.sums[f"{m.name}::lambda"] = torch.zeros(m.m_out, m.m_in, **f64)
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for m in modules:
            self.offsets[m.name] = (start, start + m.dim)
            start += m.dim

    @property
    def request_kwargs(self) -> dict[str, bool]:
        """What the capture must compute for these statistics."""
        return {
            "factor_grads": self.preconditioner == "ekfac",
            "covariances": self.covariances_needed,
        }

    def update(self, grads: BatchGradients, rotated: dict[str, torch.Tensor] | None = None) -> None:
        """Add one batch (all of its examples count). ``rotated``: the factor gradients already
        rotated into the eigenbasis (float64), when the caller computed them anyway."""
        rows, factor_grads = grads.rows, grads.factor_grads
        cov_in, cov_out, tokens = grads.cov_in, grads.cov_out, grads.tokens
        self.sums["examples"] += grads.losses.shape[0]
        for m in self.modules:
            if self.preconditioner == "fim":
                assert rows is not None, "fim statistics need the compressed rows"
                start, stop = self.offsets[m.name]
                block = rows[:, start:stop].to(self.device, torch.float64)
                self.sums[f"{m.name}::fisher"] += block.T @ block
            if self.covariances_needed and m.name in cov_in:
                k_in, k_out, k_tok = covariance_keys(m.name)
                self.sums[k_in] += cov_in[m.name].to(self.device)
                self.sums[k_out] += cov_out[m.name].to(self.device)
                self.sums[k_tok] += tokens[m.name]
            if self.preconditioner == "ekfac" and m.name in factor_grads:
                assert self.eigenbasis is not None
                if rotated is not None and m.name in rotated:
                    turned = rotated[m.name].to(self.device)
                else:
                    turned = rotate(self.eigenbasis, m.name, factor_grads[m.name].to(self.device))
                self.sums[f"{m.name}::lambda"] += turned.square().sum(dim=0)

    def covariances(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float], float]:
        """``(cov_in, cov_out, tokens, examples)`` per module name: what ``fit_eigenbasis`` reads."""
        cov_in, cov_out, tokens = {}, {}, {}
        for m in self.modules:
            k_in, k_out, k_tok = covariance_keys(m.name)
            cov_in[m.name], cov_out[m.name] = self.sums[k_in], self.sums[k_out]
            tokens[m.name] = float(self.sums[k_tok])
        return cov_in, cov_out, tokens, float(self.sums["examples"])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.sums.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.sums) - set(state)
        extra = set(state) - set(self.sums)
        if missing or extra:
            raise ValueError(
                f"statistics do not match this cache: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}"
            )
        for k in self.sums:
            if state[k].shape != self.sums[k].shape:
                raise ValueError(
                    f"statistic {k} has shape {tuple(state[k].shape)}, expected {tuple(self.sums[k].shape)}"
                )
            self.sums[k] = state[k].to(self.device, torch.float64).clone()


class FullCovariances:
    """The warm-up sums of an eigen-basis cache: per module ``x x^T`` (bias column included) and
    ``delta delta^T`` over tokens in the full input and output spaces (a side stored as its diagonal
    when the capture kept only that), the token count, and the example count. Every rank holds the
    same keys and shapes, so the sums can be all-reduced."""

    def __init__(self, compressors: dict[str, Compressor], max_width: int):
        f64 = {"dtype": torch.float64}
        self.sums: dict[str, torch.Tensor] = {"examples": torch.zeros((), **f64)}
        for name, comp in compressors.items():
            for side, d in (("full_in", comp.d_in), ("full_out", comp.d_out)):
                shape = (d, d) if d <= max_width else (d,)
                self.sums[f"{name}::{side}"] = torch.zeros(shape, **f64)
            self.sums[f"{name}::tokens"] = torch.zeros((), **f64)
        self.names = list(compressors)

    def update(self, grads: BatchGradients) -> None:
        self.sums["examples"] += grads.losses.shape[0]
        for name in self.names:
            if name in grads.full_in:  # in place: no float64 copy of each batch's matrices
                self.sums[f"{name}::full_in"].add_(grads.full_in[name].to("cpu"))
                self.sums[f"{name}::full_out"].add_(grads.full_out[name].to("cpu"))
                self.sums[f"{name}::tokens"] += grads.tokens.get(name, 0)

    def parts(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float], float]:
        """``(full_in, full_out, tokens, examples)`` per module: what ``fit_rotated_masks`` reads."""
        full_in = {n: self.sums[f"{n}::full_in"] for n in self.names}
        full_out = {n: self.sums[f"{n}::full_out"] for n in self.names}
        tokens = {n: float(self.sums[f"{n}::tokens"]) for n in self.names}
        return full_in, full_out, tokens, float(self.sums["examples"])

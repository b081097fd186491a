"""Preconditioners of the query gradient: block-diagonal Fisher, K-FAC, EK-FAC, identity.

The preconditioner is applied to the query side at query time; train rows are never rewritten (a
K-FAC cache stores them whitened by its fixed warm-up fit, ``hf_grass.precondition.eigenbasis``,
which cancels exactly in expectation). Each module's curvature is
eigendecomposed once (``fit``) and saved under ``<cache>/preconditioner/``; the damping
``lambda_l = damping * mean(eigenvalues_l)`` is applied at query time, so any damping can be tried
without refitting.

- ``fim``: ``F_l = (1/n) sum_i g_il g_il^T`` of the compressed rows, ``F_l = Q diag(L) Q^T``.
- ``kfac``: ``A = (1/N_tokens) sum_t x'_t x'_t^T`` and ``S = (1/n) sum_t delta'_t delta'_t^T`` in the
  factor space (kronfluence's normalisation), ``H ≈ S ⊗ A`` with eigenvalues ``L_S ⊗ L_A``.
- ``ekfac``: the eigenbasis of the warm-up K-FAC factors with the eigenvalues replaced by
  ``(1/n) sum_i (Q_S^T G'_i Q_A)^2``, the per-example second moments in that basis.

For kfac/ekfac a query's factor-space gradient is rotated into the eigenbasis, divided by
``L + lambda``, rotated back, and then compressed by the module's final projection.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch

from hf_grass.cache.files import CacheError, mmap_tensors, save_tensors
from hf_grass.cache.reader import GradientCache
from hf_grass.config import PRECONDITIONERS
from hf_grass.precondition import linalg
from hf_grass.precondition.eigenbasis import is_rotated

logger = logging.getLogger("transformers.hf_grass")


class Preconditioner:
    """Fitted per-module eigendecompositions of one kind, with the damping applied on use.

    Args:
        factors: per module ``{"q": Q, "eig": L}`` (fim) or ``{"q_in", "q_out", "eig"}`` (kfac/ekfac),
            all float64.
        kind: fim | kfac | ekfac | identity.
        damping: fraction of each module's mean eigenvalue added before inverting.
    """

    def __init__(self, kind: str, factors: dict[str, dict[str, torch.Tensor]], damping: float = 0.1):
        if kind not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {kind!r}")
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        self.kind = kind
        self.factors = factors
        self.damping = float(damping)

    @property
    def needs_factor_grads(self) -> bool:
        return self.kind in ("kfac", "ekfac")

    # ---- fitting --------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls, cache: GradientCache, kind: str | None = None, damping: float | None = None
    ) -> Preconditioner:
        """Eigendecompose the cache's statistics (or load the saved fit)."""
        kind = kind or cache.config.preconditioner
        damping = cache.config.damping if damping is None else damping
        if kind == "identity":
            return cls("identity", {}, damping)
        fitted = cache.config.preconditioner
        if kind != fitted and not (kind == "kfac" and fitted == "ekfac"):
            raise ValueError(
                f"this cache gathered statistics for preconditioner={fitted!r}; {kind!r} needs "
                f"{'per-example Fisher sums' if kind == 'fim' else 'Kronecker factors'}. Rebuild the cache with "
                f"GraSSConfig(preconditioner={kind!r}) or use {fitted!r} / 'identity'."
            )
        # the file name carries a hash of the statistics it was fitted on, so a cache that grew
        # (resumed build) never reuses a stale fit
        stamp = hashlib.sha256(
            json.dumps([cache.manifest["stats"], cache.manifest.get("eigenbasis")], sort_keys=True).encode()
        ).hexdigest()[:12]
        saved = cache.path / "preconditioner" / f"{kind}-{stamp}.safetensors"
        if saved.is_file():
            try:
                flat = mmap_tensors(saved)
                return cls(kind, _unflatten(flat), damping)
            except CacheError as err:
                logger.warning("Ignoring a damaged saved preconditioner (%s); refitting.", err)
        factors = _fit(cache, kind)
        try:
            saved.parent.mkdir(exist_ok=True)
            save_tensors(saved, {f"{m}::{k}": v for m, d in factors.items() for k, v in d.items()})
        except OSError as err:  # a read-only cache (e.g. in the Hub cache) still works, just unsaved
            logger.info("Could not save the fitted preconditioner to %s: %s", saved, err)
        return cls(kind, factors, damping)

    # ---- application ----------------------------------------------------------------------------

    def _lambda(self, eig: torch.Tensor) -> float:
        return self.damping * float(eig.mean())

    def _inverse(self, eig: torch.Tensor) -> torch.Tensor:
        denom = eig + self._lambda(eig)
        # a module that never received gradient has all-zero curvature: leave its query part at 0
        return torch.where(
            denom > 0, 1.0 / denom.clamp(min=torch.finfo(denom.dtype).tiny), torch.zeros_like(denom)
        )

    def apply_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """``H^-1 q`` for compressed query rows ``[nq, k]`` of one module (fim / identity)."""
        if self.kind == "identity":
            return rows
        if self.kind != "fim":
            raise ValueError(f"{self.kind} preconditions in the factor space; use apply_factor")
        f = self.factors[name]
        q, inv = f["q"].to(rows.device), self._inverse(f["eig"]).to(rows.device)
        r = rows.to(torch.float64)
        return (((r @ q) * inv) @ q.T).to(rows.dtype)

    def apply_factor(self, name: str, gp: torch.Tensor) -> torch.Tensor:
        """``H^-1 G'`` for factor-space query gradients ``[nq, m_out, m_in]`` (kfac / ekfac)."""
        if not self.needs_factor_grads:
            raise ValueError(f"{self.kind} preconditions compressed rows; use apply_rows")
        f = self.factors[name]
        inv = self._inverse(f["eig"]).to(gp.device)
        if "q_in" not in f:  # masks in the eigenbasis: the factor space is the eigenbasis
            return (gp.to(torch.float64) * inv).to(gp.dtype)
        rotated = linalg.rotate(f["q_out"], f["q_in"], gp)
        return linalg.unrotate(f["q_out"], f["q_in"], rotated * inv).to(gp.dtype)


def _fit(cache: GradientCache, kind: str) -> dict[str, dict[str, torch.Tensor]]:
    stats = cache.statistics()
    n = float(stats["examples"])
    if n <= 0:
        raise ValueError("the cache holds no examples: nothing to fit a preconditioner on")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    basis = cache.eigenbasis() if kind in ("kfac", "ekfac") else None
    if kind == "ekfac" and basis is None:
        raise CacheError(f"{cache.path} has no eigenbasis file; rebuild it with preconditioner='ekfac'")
    if is_rotated(basis):  # masks in the eigenbasis: eigenvalues in the factor space directly
        assert basis is not None
        for name in cache.module_names:
            if kind == "kfac":
                eig = torch.outer(basis[f"{name}::eig_out"], basis[f"{name}::eig_in"]).to(torch.float64)
            else:
                # the sums are of the scaled (sqrt(d/m) per side) factor gradients: the curvature of
                # the unscaled eigen-coordinates is theirs divided by the scales squared, so that the
                # masked sum estimates the full-space score (and kfac's eigenvalues are unscaled too)
                scale = float(basis[f"{name}::scale"].prod())
                eig = stats[f"{name}::lambda"] / n / scale**2
            factors[name] = {"eig": eig}
        return factors
    for name in cache.module_names:
        if kind == "fim":
            eig, q = linalg.eigh_psd(stats[f"{name}::fisher"] / n)
            factors[name] = {"q": q, "eig": eig}
        elif kind == "kfac":
            tokens = float(stats[f"{name}::tokens"])
            eig_in, q_in = linalg.eigh_psd(stats[f"{name}::cov_in"] / max(tokens, 1.0))
            eig_out, q_out = linalg.eigh_psd(stats[f"{name}::cov_out"] / n)
            eig = torch.outer(eig_out, eig_in)
            factors[name] = {"q_in": q_in, "q_out": q_out, "eig": eig}
        else:
            factors[name] = {
                "q_in": basis[f"{name}::q_in"].to(torch.float64),
                "q_out": basis[f"{name}::q_out"].to(torch.float64),
                "eig": stats[f"{name}::lambda"] / n,
            }
    return factors


def _unflatten(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        module, _, part = key.rpartition("::")
        out.setdefault(module, {})[part] = value.clone()
    return out

"""The warm-up K-FAC fit of a kfac/ekfac cache: eigenvectors of the factor covariances and the
whitening of the stored rows.

Train rows of such a cache are stored as ``S (whiten * R g')`` and queries go through
``S (R H^-1 g' / whiten)``, with ``R g' = Q_out^T G' Q_in`` the rotation into the eigenbasis and
``S`` the module's final projection. The whitening cancels exactly in expectation, so it only
balances the two sides of the random projection (see docs/concepts.md, "Whitened rows").

A basis is a flat dict of float64 tensors ``name::q_in``, ``name::q_out``, ``name::whiten``, the
form it is saved in (``eigenbasis.safetensors``).
"""

from __future__ import annotations

from typing import Protocol

import torch

from hf_grass.precondition import linalg


class FactorModule(Protocol):
    """A module's name and factor-space widths (``ModuleSpec`` provides them)."""

    name: str
    m_in: int
    m_out: int


def fit_eigenbasis(
    modules: list[FactorModule],
    cov_in: dict[str, torch.Tensor],
    cov_out: dict[str, torch.Tensor],
    tokens: dict[str, float] | None = None,
    examples: float = 1.0,
    damping: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Per module: eigenvectors ``name::q_in`` / ``name::q_out`` of the covariances, and the whitening
    ``name::whiten = (L / mean L)^(-1/2)`` with ``L`` the damped K-FAC eigenvalues
    ``outer(l_out, l_in) + damping * mean``.

    The whitening need not be accurate, only well scaled (mean 1, so fp16 rows keep their range).
    """
    basis: dict[str, torch.Tensor] = {}
    for m in modules:
        eig_in, q_in = linalg.eigh_psd(cov_in[m.name])
        eig_out, q_out = linalg.eigh_psd(cov_out[m.name])
        basis[f"{m.name}::q_in"], basis[f"{m.name}::q_out"] = q_in, q_out
        n_tokens = max(float((tokens or {}).get(m.name, 1.0)), 1.0)
        eig = torch.outer(eig_out / max(examples, 1.0), eig_in / n_tokens)
        eig = eig + damping * eig.mean()
        if not float(eig.mean()) > 0:  # a module without gradient in the sample: no reweighting
            eig = torch.ones_like(eig)
        basis[f"{m.name}::whiten"] = (eig / eig.mean()).rsqrt()
    return basis


def rotate(basis: dict[str, torch.Tensor], name: str, gp: torch.Tensor) -> torch.Tensor:
    """Factor gradients ``[B, m_out, m_in]`` of module ``name`` in the basis (float64)."""
    return linalg.rotate(basis[f"{name}::q_out"], basis[f"{name}::q_in"], gp)


def is_whitened(basis: dict[str, torch.Tensor] | None) -> bool:
    return basis is not None and any(k.endswith("::whiten") for k in basis)


def whiten_train(basis: dict[str, torch.Tensor], name: str, rotated: torch.Tensor) -> torch.Tensor:
    """The train side, before the final projection: ``whiten * R g'`` (float32)."""
    return (rotated * basis[f"{name}::whiten"].to(rotated.device)).to(torch.float32)


def whiten_query(basis: dict[str, torch.Tensor], name: str, preconditioned: torch.Tensor) -> torch.Tensor:
    """The query side, before the final projection: ``R H^-1 g' / whiten`` (float64)."""
    rotated = rotate(basis, name, preconditioned)
    return rotated / basis[f"{name}::whiten"].to(rotated.device)

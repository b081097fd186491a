"""The warm-up K-FAC fit of a kfac/ekfac cache: eigenvectors of the factor covariances and the
whitening of the stored rows.

Train rows of such a cache are stored as ``S (whiten * R g')`` and queries go through
``S (R H^-1 g' / whiten)``, with ``R g' = Q_out^T G' Q_in`` the rotation into the eigenbasis and
``S`` the module's final projection. The whitening cancels exactly in expectation, so it only
balances the two sides of the random projection (see docs/concepts.md, "Whitened rows").

A basis is a flat dict of tensors, the form it is saved in (``eigenbasis.safetensors``):

- masks in the module's own coordinates (``mask_basis="input"``): ``name::q_in``, ``name::q_out``,
  the eigenvectors of the *masked* factor covariances, and ``name::whiten``;
- masks in the eigenbasis (``mask_basis="eigen"``, ``fit_rotated_masks``): ``name::basis_in``
  ``[d_in, m_in]`` and ``name::basis_out``, the eigen-directions of the *full* factor covariances that
  the masks drew (the compressor's factor maps), their eigenvalues ``name::eig_in`` /
  ``name::eig_out``, the mask scales ``name::scale`` and ``name::whiten``. The factor space is then
  already an eigenbasis: there is no further rotation (``rotate`` is the identity).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from hf_grass.compressors.base import Compressor
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
        basis[f"{m.name}::whiten"] = eig
    return _normalise_whitening(basis)


def _normalise_whitening(basis: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``name::whiten`` from the damped eigenvalues it holds: ``(L / mean L)^(-1/2)`` with ONE mean
    over all modules. A per-module mean would scale each module's train side by ``c_l`` and its
    query side by ``1 / c_l``: harmless inside the module, but in the global layout the modules share
    the row, and the noise of one module's train coordinates against another's query coordinates
    grows with ``c_l / c_l'`` (measured: fact-tracing recall@10 0.60 instead of 0.96)."""
    keys = [k for k in basis if k.endswith("::whiten") and not k.startswith("whiten::")]
    total = sum(float(basis[k].sum()) for k in keys)
    count = sum(basis[k].numel() for k in keys)
    mean = total / count if count and total > 0 else 1.0
    for k in keys:
        basis[k] = (basis[k] / mean).rsqrt()
    basis["whiten::mean"] = torch.tensor(mean, dtype=torch.float64)  # to undo it (exact norms)
    return basis


def rotate(basis: dict[str, torch.Tensor], name: str, gp: torch.Tensor) -> torch.Tensor:
    """Factor gradients ``[B, m_out, m_in]`` of module ``name`` in the basis (float64)."""
    if f"{name}::q_in" not in basis:  # masks taken in the eigenbasis: already there
        return gp.to(torch.float64)
    return linalg.rotate(basis[f"{name}::q_out"], basis[f"{name}::q_in"], gp)


def is_rotated(basis: dict[str, torch.Tensor] | None) -> bool:
    """Whether the basis holds the factor maps of masks taken in the eigenbasis."""
    return basis is not None and any(k.endswith("::basis_in") for k in basis)


def fit_rotated_masks(
    compressors: dict[str, Compressor],
    full_in: dict[str, torch.Tensor],
    full_out: dict[str, torch.Tensor],
    tokens: dict[str, float],
    examples: float,
    damping: float,
) -> dict[str, torch.Tensor]:
    """The warm-up fit of an eigen-basis cache (``mask_basis="eigen"``), per module.

    Each factor's mask ``idx`` (``m`` of ``d``, drawn from the seed) picks eigen-directions of that
    factor's full covariance: the factor map is ``Q[:, idx]`` with scale ``sqrt(d / m)``, so the
    masked, rotated gradient is an unbiased subsample of the gradient in the K-FAC eigenbasis. A
    factor stored as a diagonal (wider than ``FULL_COVARIANCE_MAX_WIDTH``) gets a signed hashing of
    its coordinates into ``m`` buckets instead (``E[B B^T] = I``, scale 1), which keeps every
    coordinate (every word of an ``lm_head``) where a mask would drop most of them. The whitening
    is ``(L / mean L)^(-1/2)`` of the damped K-FAC eigenvalues ``outer(l_out, l_in)`` of the kept
    coordinates.
    """
    basis: dict[str, torch.Tensor] = {}
    solved: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []  # shared covariances
    for name, comp in compressors.items():
        b_in, e_in, s_in = _factor_map(full_in.get(name), comp.d_in, comp.in_idx, comp.generator("hash_in"), solved)  # type: ignore[attr-defined]
        b_out, e_out, s_out = _factor_map(full_out.get(name), comp.d_out, comp.out_idx, comp.generator("hash_out"), solved)  # type: ignore[attr-defined]
        e_in = e_in / max(float(tokens.get(name, 0.0)), 1.0)
        e_out = e_out / max(examples, 1.0)
        eig = torch.outer(e_out, e_in)
        eig = eig + damping * eig.mean()
        if not float(eig.mean()) > 0:  # a module without gradient in the sample: no reweighting
            eig = torch.ones_like(eig)
        basis[f"{name}::basis_in"], basis[f"{name}::basis_out"] = b_in, b_out
        basis[f"{name}::eig_in"], basis[f"{name}::eig_out"] = e_in, e_out
        basis[f"{name}::scale"] = torch.tensor([s_in, s_out], dtype=torch.float64)
        basis[f"{name}::whiten"] = eig
    return _normalise_whitening(basis)


def _factor_map(
    cov: torch.Tensor | None,
    d: int,
    idx: torch.Tensor,
    gen: torch.Generator,
    solved: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B [d, m] float32, eigenvalues [m] float64, scale)`` of one factor (see fit_rotated_masks)."""
    idx = idx.cpu()
    m = idx.numel()
    if cov is not None and cov.dim() == 1:  # a wide factor: signed hashing, bucket variances
        buckets = torch.randint(0, m, (d,), generator=gen)
        signs = torch.randint(0, 2, (d,), generator=gen).to(torch.float32).mul_(2).sub_(1)
        b = torch.zeros(d, m, dtype=torch.float32)
        b[torch.arange(d), buckets] = signs
        eig = torch.zeros(m, dtype=torch.float64).index_add_(0, buckets, cov.double().cpu().clamp(min=0))
        return b, eig, 1.0
    if cov is None:  # never reached by the warm-up sample: masks in the module's own coordinates
        b = torch.zeros(d, m, dtype=torch.float32)
        b[idx, torch.arange(m)] = 1.0
        return b, torch.zeros(m, dtype=torch.float64), math.sqrt(d / m)
    eig, q = _eigh_once(cov, solved if solved is not None else [])
    return q[:, idx].to(torch.float32).contiguous(), eig[idx], math.sqrt(d / m)


def _eigh_once(
    cov: torch.Tensor, solved: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``eigh_psd(cov)``, reusing the decomposition of an equal covariance: modules that read the
    same input (q/k/v, gate/up) have the same one, and eigh of a 1.5k-wide factor costs seconds.

    Single precision: the masks keep eigen-directions drawn at random, which float32 gives
    orthonormal to ~1e-6, and the eigenvalues only scale the whitening, which must be well scaled,
    not exact (``fit_eigenbasis``). It halves the fit: SmolLM2-135M's 331 decompositions took 66 s
    in float64 on 2 CPU threads."""
    for other, result in solved:
        if other.shape == cov.shape and torch.equal(other, cov):
            return result
    result = linalg.eigh_psd(cov, torch.float32)
    solved.append((cov, result))
    return result


def attach_basis(compressors: dict[str, Compressor], basis: dict[str, torch.Tensor] | None) -> None:
    """Give every compressor its factor maps from an eigen-basis fit (no-op for other bases)."""
    if not is_rotated(basis):
        return
    assert basis is not None
    for name, comp in compressors.items():
        scale = basis[f"{name}::scale"]
        comp.set_basis(  # type: ignore[attr-defined]
            basis[f"{name}::basis_in"], basis[f"{name}::basis_out"], float(scale[0]), float(scale[1])
        )


def is_whitened(basis: dict[str, torch.Tensor] | None) -> bool:
    return basis is not None and any(k.endswith("::whiten") for k in basis)


def whiten_train(basis: dict[str, torch.Tensor], name: str, rotated: torch.Tensor) -> torch.Tensor:
    """The train side, before the final projection: ``whiten * R g'`` (float32)."""
    return (rotated * basis[f"{name}::whiten"].to(rotated.device)).to(torch.float32)


def whiten_query(basis: dict[str, torch.Tensor], name: str, preconditioned: torch.Tensor) -> torch.Tensor:
    """The query side, before the final projection: ``R H^-1 g' / whiten`` (float64)."""
    rotated = rotate(basis, name, preconditioned)
    return rotated / basis[f"{name}::whiten"].to(rotated.device)

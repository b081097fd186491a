"""Query vectors: each query's preconditioned, compressed gradient and its norms (``query_vectors``,
the one way a query becomes something to score)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, NamedTuple

import torch

from hf_grass.attribution.batches import gradient_norm_sq
from hf_grass.capture.engine import BatchGradients, GradientComputer, NonFiniteError
from hf_grass.capture.hooks import CaptureRequest
from hf_grass.compressors.base import FactorisedCompressor
from hf_grass.precondition import Eigenbasis, Preconditioner

if TYPE_CHECKING:
    from hf_grass.scoring.refine import Refiner


class QueryVectors(NamedTuple):
    """``rows [n_query, dim]`` float32, scored against the cache's rows by a dot product, and
    ``norms [n_query, 2]`` float32: the gradient norm and the preconditioned norm (the geometry of
    the cache's whitening; see ``query_vectors``), for unit-normalised scores."""

    rows: torch.Tensor
    norms: torch.Tensor


def query_vectors(
    computer: GradientComputer,
    batches: Iterable[Mapping[str, torch.Tensor]],
    preconditioner: Preconditioner,
    basis: Eigenbasis | None = None,
    refiner: Refiner | None = None,
) -> QueryVectors:
    """Each query's preconditioned, compressed gradient, and its norms.

    ``basis``: the warm-up fit of a K-FAC cache, whose train rows are whitened (``S (whiten * R g'_i)``);
    the query then goes through ``S (R H^-1 g'_q / whiten)`` so that the whitening cancels and
    ``<q, row_i>`` estimates ``g'_q^T H^-1 g'_i`` with balanced noise. A module with a hashed (wide)
    side is preconditioned in that side's own coordinates and hashed afterwards, with the query's
    weights (``HashMap``): unbiased over the hash for any per-coordinate curvature. ``refiner``:
    ``H^-1 g'_q`` is refined by conjugate gradients over every module at once (``scoring.refine``),
    after every query's gradient is taken.

    The norms are those the cache stores with its rows, in the same geometries: the gradient norm
    ``||g'||`` (factor space, hashed sides in their own coordinates) and the norm in the cache's
    whitened factor space ``||K^-1/2 g'||`` (``K``: the build-time K-FAC at the build damping; the
    gradient norm for caches without whitening), whatever the query's preconditioner and damping.
    """
    request = query_request(computer, preconditioner, basis)
    refine = refiner is not None and refiner.steps > 0
    found: list[tuple[torch.Tensor, torch.Tensor]] = []  # each batch's rows and norms, float32 on the CPU
    taken: list[BatchGradients] = []
    with computer.session():
        for batch in batches:
            try:
                grads = computer.compute(batch, request)
            except NonFiniteError as err:
                raise ValueError(f"non-finite {err.what} for query rows {err.rows} of this batch") from None
            if refine:  # solved below, for every query at once, once the hooks are off
                taken.append(grads)
                continue
            found.append(_on_cpu(*query_rows(computer, grads, preconditioner, basis)))
    if taken:
        assert refiner is not None
        grads = _joined(taken)
        b = {name: grads.curvature_grads.get(name, gp) for name, gp in grads.factor_grads.items()}
        found.append(_on_cpu(*query_rows(computer, grads, preconditioner, basis, solved=refiner.solve(b))))
    if not found:
        return QueryVectors(torch.empty(0, computer.row_dim), torch.empty(0, 2))
    return QueryVectors(torch.cat([rows for rows, _ in found]), torch.cat([norms for _, norms in found]))


def _on_cpu(rows: torch.Tensor, raw_sq: torch.Tensor, pre_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``query_rows``' output as float32 rows and ``[n, 2]`` norms on the CPU."""
    norms = torch.stack([raw_sq.sqrt(), pre_sq.clamp(min=0).sqrt()], dim=1)
    return rows.float().cpu(), norms.float().cpu()


def _joined(parts: list[BatchGradients]) -> BatchGradients:
    """The factor (and curvature) gradients of several batches as one batch's."""
    first = parts[0]

    def cat(field: str) -> dict[str, torch.Tensor]:
        return {name: torch.cat([getattr(p, field)[name] for p in parts]) for name in getattr(first, field)}

    return dataclasses.replace(first, losses=torch.cat([p.losses for p in parts]), factor_grads=cat("factor_grads"),
                               curvature_grads=cat("curvature_grads"))  # fmt: skip


def in_factor_space(preconditioner: Preconditioner, basis: Eigenbasis | None) -> bool:
    """Whether queries are preconditioned in the factor space (K-FAC caches) rather than as rows."""
    return preconditioner.acts_on == "factors" or basis is not None


def query_request(
    computer: GradientComputer, preconditioner: Preconditioner, basis: Eigenbasis | None
) -> CaptureRequest:
    """What the hooks capture for query vectors."""
    in_factors = in_factor_space(preconditioner, basis)
    factorised = all(c.factorised for c in computer.compressors.values())
    return CaptureRequest(
        rows=not in_factors,
        factor_grads=in_factors or factorised,
        curvature_grads=basis is not None and basis.has_hashed_sides,
    )


def query_rows(
    computer: GradientComputer,
    grads: BatchGradients,
    preconditioner: Preconditioner,
    basis: Eigenbasis | None,
    solved: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows [n, dim] float64, squared gradient norms [n], squared preconditioned norms [n])`` of
    one batch's captured gradients (see ``query_vectors``); ``solved``: the factor-space ``H^-1 g'``
    already computed (a refined iHVP)."""
    if in_factor_space(preconditioner, basis):
        rows, pre_sq = _from_factors(computer, grads, preconditioner, basis, solved)
        return rows, gradient_norm_sq(grads), pre_sq
    assert grads.rows is not None
    rows = preconditioner.precondition_rows(grads.rows, computer.offsets)
    raw_sq = gradient_norm_sq(grads) if grads.factor_grads else grads.rows.double().square().sum(1)
    return rows, raw_sq, raw_sq  # rows stored raw: no whitening to measure them in


def preconditioned_factor(
    computer: GradientComputer,
    name: str,
    grad: torch.Tensor,
    preconditioner: Preconditioner,
    basis: Eigenbasis | None,
    curvature: bool = False,
) -> torch.Tensor:
    """Module ``name``'s query side before the final projection, float64: ``H^-1`` of its factor
    gradient ``grad`` (``curvature``: a hashed module's gradient in curvature coordinates, hashed
    after preconditioning, with the query's weights), then into the cache's whitened basis. Linear
    in ``grad``."""
    return query_side(computer, name, preconditioner.apply(name, grad), basis, curvature)


def query_side(
    computer: GradientComputer, name: str, pre: torch.Tensor, basis: Eigenbasis | None, curvature: bool = False
) -> torch.Tensor:
    """Module ``name``'s preconditioned query side ``pre`` (``H^-1 g'``) before the final projection:
    hashed after preconditioning with the query's weights (``curvature``), then into the cache's
    whitened basis."""
    if curvature:
        pre = computer.compressors[name].to_factor_space(pre, query=True)  # type: ignore[attr-defined]
    if basis is not None:
        pre = basis.whiten_query(name, basis.rotate(name, pre))
    return pre


def _from_factors(
    computer: GradientComputer,
    grads: BatchGradients,
    preconditioner: Preconditioner,
    basis: Eigenbasis | None,
    solved: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [n, dim] float64, squared whitened norms [n])`` of queries preconditioned in the factor
    space (see ``query_vectors``); ``solved``: ``H^-1 g'`` per module, already computed (refined)."""
    factor_grads, curvature = grads.factor_grads, grads.curvature_grads
    n = next(iter(factor_grads.values())).shape[0]
    pre_sq = torch.zeros(n, dtype=torch.float64, device=computer.device)
    projected = {}
    for name in computer.offsets:
        if name not in factor_grads:
            continue
        comp = computer.compressors[name]
        assert isinstance(comp, FactorisedCompressor)
        gp = factor_grads[name]
        if solved is not None:
            pre = query_side(computer, name, solved[name], basis, name in curvature)
        else:
            pre = preconditioned_factor(computer, name, curvature.get(name, gp), preconditioner, basis, name in curvature)
        if basis is not None:
            pre_sq += basis.whitened_norm_sq(name, basis.rotate(name, gp))
        else:
            pre_sq += gp.double().square().flatten(1).sum(1)
        projected[name] = pre
    # projected in float64, so that token scores (``scoring.tokens``) sum to exactly this score
    rows = computer.project_rows(projected, torch.float64)
    return rows, pre_sq

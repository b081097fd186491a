"""Query vectors: each query's preconditioned, compressed gradient and its norms (``query_vectors``,
the one way a query becomes something to score)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch

from hf_grass.attribution.batches import gradient_norm_sq
from hf_grass.capture.engine import BatchGradients, GradientComputer, NonFiniteError
from hf_grass.capture.hooks import CaptureRequest
from hf_grass.compressors.base import FactorisedCompressor
from hf_grass.precondition import Eigenbasis, Preconditioner


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
) -> QueryVectors:
    """Each query's preconditioned, compressed gradient, and its norms.

    ``basis``: the warm-up fit of a K-FAC cache, whose train rows are whitened (``S (whiten * R g'_i)``);
    the query then goes through ``S (R H^-1 g'_q / whiten)`` so that the whitening cancels and
    ``<q, row_i>`` estimates ``g'_q^T H^-1 g'_i`` with balanced noise. A module with a hashed (wide)
    side is preconditioned in that side's own coordinates and hashed afterwards, with the query's
    weights (``HashMap``): unbiased over the hash for any per-coordinate curvature.

    The norms are those the cache stores with its rows, in the same geometries: the gradient norm
    ``||g'||`` (factor space, hashed sides in their own coordinates) and the norm in the cache's
    whitened factor space ``||K^-1/2 g'||`` (``K``: the build-time K-FAC at the build damping; the
    gradient norm for caches without whitening), whatever the query's preconditioner and damping.
    """
    in_factors = preconditioner.acts_on == "factors" or basis is not None
    factorised = all(c.factorised for c in computer.compressors.values())
    request = CaptureRequest(
        rows=not in_factors,
        factor_grads=in_factors or factorised,
        curvature_grads=basis is not None and basis.has_hashed_sides,
    )
    out, norms = [], []
    with computer.session():
        for batch in batches:
            try:
                grads = computer.compute(batch, request)
            except NonFiniteError as err:
                raise ValueError(f"non-finite {err.what} for query rows {err.rows} of this batch") from None
            if in_factors:
                rows, pre_sq = _from_factors(computer, grads, preconditioner, basis)
                raw_sq = gradient_norm_sq(grads)
            else:
                assert grads.rows is not None
                rows = preconditioner.precondition_rows(grads.rows, computer.offsets)
                raw_sq = gradient_norm_sq(grads) if grads.factor_grads else grads.rows.double().square().sum(1)
                pre_sq = raw_sq  # rows stored raw: no whitening to measure them in
            out.append(rows.float().cpu())
            norms.append(torch.stack([raw_sq.sqrt(), pre_sq.clamp(min=0).sqrt()], dim=1).float().cpu())
    if not out:
        return QueryVectors(torch.empty(0, computer.row_dim), torch.empty(0, 2))
    return QueryVectors(torch.cat(out), torch.cat(norms))


def _from_factors(
    computer: GradientComputer, grads: BatchGradients, preconditioner: Preconditioner, basis: Eigenbasis | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [n, dim] float64, squared whitened norms [n])`` of queries preconditioned in the factor
    space (see ``query_vectors``)."""
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
        pre = preconditioner.apply(name, curvature.get(name, gp))
        if name in curvature:  # a hashed side: hash after preconditioning, with the query's weights
            pre = comp.to_factor_space(pre, query=True)  # type: ignore[attr-defined]
        if basis is not None:
            pre = basis.whiten_query(name, basis.rotate(name, pre))
            pre_sq += basis.whitened_norm_sq(name, basis.rotate(name, gp))
        else:
            pre_sq += gp.double().square().flatten(1).sum(1)
        projected[name] = pre
    rows = computer.project_rows(projected).double()
    return rows, pre_sq

"""Query vectors: each query's preconditioned, compressed gradient and its exact norms."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from hf_grass.capture.engine import GradientComputer, NonFiniteError
from hf_grass.capture.hooks import CaptureRequest
from hf_grass.precondition.eigenbasis import is_whitened, whiten_query
from hf_grass.precondition.preconditioner import Preconditioner


def query_gradients(
    computer: GradientComputer,
    batches: Iterable[Mapping[str, torch.Tensor]],
    preconditioner: Preconditioner,
    basis: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[n_query, dim]`` float32: the preconditioned, compressed gradient of each query's loss
    (``query_vectors`` without the norms)."""
    return query_vectors(computer, batches, preconditioner, basis)[0]


def query_vectors(
    computer: GradientComputer,
    batches: Iterable[Mapping[str, torch.Tensor]],
    preconditioner: Preconditioner,
    basis: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [n_query, dim] float32, norms [n_query, 2] float32)``: each query's preconditioned,
    compressed gradient, and its exact gradient norm ``||g'||`` and preconditioned norm
    ``sqrt(g'^T H^-1 g')`` in the factor space (for unit-normalised scores).

    ``basis``: the warm-up fit of a K-FAC cache, whose train rows are whitened
    (``S (whiten * R g'_i)``); the query then goes through ``S (R H^-1 g'_q / whiten)`` so that the
    whitening cancels and ``<q, row_i>`` estimates ``g'_q^T H^-1 g'_i`` with balanced noise.
    """
    whitened = is_whitened(basis)
    factor = preconditioner.needs_factor_grads or whitened
    factorised = all(c.factorised for c in computer.compressors.values())
    out, norms = [], []
    with computer.session():
        for batch in batches:
            request = CaptureRequest(rows=not factor, factor_grads=factor or factorised)
            try:
                grads = computer.compute(batch, request)
            except NonFiniteError as err:
                raise ValueError(f"non-finite {err.what} for query rows {err.rows} of this batch") from None
            n = grads.losses.shape[0]
            rows = torch.zeros(n, computer.total_dim, device=computer.device)
            raw = torch.zeros(n, dtype=torch.float64, device=computer.device)
            pre_sq = torch.zeros_like(raw)
            for gp in grads.factor_grads.values():
                raw += gp.double().square().flatten(1).sum(1)
            if not factor and preconditioner.kind == "identity":  # also the global layout's shared row
                assert grads.rows is not None
                rows = grads.rows.float()
                if not grads.factor_grads:
                    raw = rows.double().square().sum(1)
                pre_sq = raw
            for name, (start, stop) in computer.offsets.items():
                if not factor and preconditioner.kind == "identity":
                    break
                if not factor:  # fim: one block per module (the per-module layout)
                    assert grads.rows is not None
                    block = grads.rows[:, start:stop]
                    pre = preconditioner.apply_rows(name, block).float()
                    rows[:, start:stop] = pre
                    pre_sq += (pre.double() * block.double()).sum(1)
                    if not grads.factor_grads:
                        raw += block.double().square().sum(1)
                    continue
                gp = grads.factor_grads[name]
                pre = preconditioner.apply_factor(name, gp) if preconditioner.needs_factor_grads else gp
                pre_sq += (pre.double() * gp.double()).flatten(1).sum(1)
                if whitened:
                    assert basis is not None
                    pre = whiten_query(basis, name, pre)
                rows[:, start:stop] += computer.compressors[name].project_factor(pre.float()).float()  # type: ignore[attr-defined]
            out.append(rows.cpu())
            norms.append(torch.stack([raw.sqrt(), pre_sq.clamp(min=0).sqrt()], dim=1).float().cpu())
    if not out:
        return torch.empty(0, computer.total_dim), torch.empty(0, 2)
    return torch.cat(out), torch.cat(norms)



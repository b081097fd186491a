"""Token-level attribution: which tokens of a document, and which of the query, carry its score.

A module's per-example gradient is a sum over token positions, ``G = sum_t delta_t x_t^T``, its
factor-space gradient too (``G' = sum_t delta'_t x'_t^T``), and every map from there to a score is
linear (masks, hashing, whitening, the final projection, the preconditioner). So a score splits
exactly over the positions of either side, and the split needs no per-token rows:

- **document side**: the query vector ``q`` fixed, ``<q, row_i> = sum_l <U_l, G'_il>`` with ``U_l``
  the adjoint of module ``l``'s train-side map applied to ``q`` (``train_adjoints``: for a K-FAC cache
  ``U_l = R_l^T (W_l * reshape(S_l^T q_l))``, ``S_l`` its final projection, ``W_l`` the whitening of
  the stored rows, ``R_l`` the rotation into the warm-up eigenbasis). Position ``t`` contributes
  ``sum_l delta'_t^T U_l x'_t``: ``O(T m_out m_in)`` per module;
- **query side**: the document's row fixed, the query vector is linear in the query's factor
  gradient, so position ``t'`` of the query contributes ``sum_l delta'_t'^T V_il x'_t'`` with ``V_il``
  the adjoint of the query-side map (``query_adjoints``: preconditioner, hashing of a wide side,
  whitening, projection) applied to ``row_i``.

A position's contribution is what flows through it: its inputs to every module times the gradient
that arrives there, from its own next-token loss and from every later loss that attends to it (the
token-wise attribution of Grosse et al., 2023, as in kronfluence). The last token of a text predicts
nothing, so on the query side it is 0, and the prompt's last token carries the prediction of the
completion's first.

Only the top documents and the query are re-run (one forward + backward each under the hooks, with
the per-token factors kept: ``CaptureRequest.token_factors``); nothing is added to the cache. Both
sides sum to the document's score recomputed from the re-runs, ``<q, row_i>`` with the query vector
in float64 and the row exactly as the pass computes it (``BatchRunner``): to float64 rounding, except
that a K-FAC cache's row is whitened in float32 (relative error ~1e-7). The cached score differs from
it by the storage dtype's rounding (int8 rows) only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hf_grass.attribution.batches import Batching, BatchRunner
from hf_grass.capture.engine import GradientComputer
from hf_grass.compressors.base import FactorisedCompressor
from hf_grass.data import ExampleSource
from hf_grass.kernels import SJLTMap
from hf_grass.precondition import Eigenbasis, Preconditioner
from hf_grass.scoring.queries import QueryVectors, preconditioned_factor, query_request, query_rows
from hf_grass.scoring.streaming import Normalisation

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class QueryTokens:
    """One query, run once with its per-token factors kept (``query_tokens``)."""

    vectors: QueryVectors  # what ``query_vectors`` gives: the lookup's query
    exact: torch.Tensor  # [dim] float64: the same query vector before its float32 rounding
    factors: Factors  # per module (x' [1, T, ·], delta' [1, T, ·]), float64
    curvature: set[str]  # the modules whose factors are in curvature coordinates (hashed sides)
    length: int  # the query's tokens


@dataclass
class TokenAttribution:
    """Each re-run document's tokens and both sides' contributions (``document_tokens``); the
    documents that had no supervised tokens in the re-run are ``None`` throughout."""

    ids: list[list[int] | None]  # each document's token ids, as re-run
    documents: list[torch.Tensor | None]  # [T_j] float64: each document token's contribution
    query: list[torch.Tensor | None]  # [T_query] float64: each query token's contribution to document j
    scores: list[float | None]  # the documents' scores from the re-runs: both sides sum to them


def check_factorised(computer: GradientComputer) -> None:
    """Token scores read the factor space: refuse the compressors without one, saying what works."""
    plain = sorted({c.name for c in computer.compressors.values() if not isinstance(c, FactorisedCompressor)})
    if plain:
        raise ValueError(
            f"token scores split the factorised gradient over tokens, but compressor {plain[0]!r} has no factor "
            "space; use a cache built with compressor='factgrass' (the default) or 'logra'"
        )


def query_tokens(
    computer: GradientComputer,
    batch: dict[str, torch.Tensor],
    preconditioner: Preconditioner,
    basis: Eigenbasis | None,
) -> QueryTokens:
    """The query vector of a one-example ``batch`` (exactly ``query_vectors``'s) and its per-token
    factors, from one forward + backward."""
    check_factorised(computer)
    request = dataclasses.replace(query_request(computer, preconditioner, basis), token_factors=True)
    with computer.session():
        grads = computer.compute(batch, request)
    rows, raw_sq, pre_sq = query_rows(computer, grads, preconditioner, basis)
    norms = torch.stack([raw_sq.sqrt(), pre_sq.clamp(min=0).sqrt()], dim=1).float().cpu()
    factors = {name: (x.double(), d.double()) for name, (x, d) in grads.token_factors.items()}
    return QueryTokens(QueryVectors(rows.float().cpu(), norms), rows[0].double(), factors,
                       set(grads.curvature_grads), int(batch["input_ids"].shape[1]))  # fmt: skip


def document_tokens(
    computer: GradientComputer,
    query: QueryTokens,
    documents: ExampleSource,
    preconditioner: Preconditioner,
    basis: Eigenbasis | None,
    *,
    batching: Batching | None = None,
    normalisation: Normalisation | None = None,
    weight: float = 1.0,
) -> TokenAttribution:
    """Re-run ``documents`` (batched, shortest first) and split each one's score over its tokens and
    over the query's. ``normalisation``: the lookup's unit normalisation (cosine), and ``weight``
    the lookup's weight (a checkpoint's), applied to both."""
    runner = BatchRunner(computer, documents, batching)
    request = dataclasses.replace(runner.row_request(basis, None), token_factors=True)
    adjoints = train_adjoints(computer, basis, query.exact)
    if request.curvature_grads:  # a hashed module's factors come in its curvature coordinates
        for name, comp in computer.compressors.items():
            if getattr(comp, "hashed", False):
                adjoints[name] = curvature_adjoint(comp, adjoints[name])
    n = len(documents)
    out = TokenAttribution([None] * n, [None] * n, [None] * n, [None] * n)
    lengths = [len(documents.example(i)["input_ids"]) for i in range(n)]
    order = sorted(range(n), key=lambda i: lengths[i])  # similar lengths together: less padding
    with computer.session():
        for lo in range(0, n, runner.batch_size):
            batch = runner.compute(order[lo : lo + runner.batch_size], request)
            if batch.grads is None:
                continue
            grads = batch.grads
            rotated = None
            if basis is not None:  # the row exactly as the pass stores it (before the storage dtype)
                rotated = {name: basis.rotate(name, g) for name, g in grads.factor_grads.items()}
                grads.rows = runner.whitened_rows(basis, rotated)
            assert grads.rows is not None
            rows = grads.rows.double()
            scale = torch.full((rows.shape[0],), float(weight), dtype=torch.float64, device=rows.device)
            if normalisation is not None:
                norms = runner.row_norms(grads, rotated, basis)
                ones = torch.ones(1, rows.shape[0])
                scale = scale * normalisation.apply(ones, query.vectors.rows, rows.float().cpu(), norms)[0].to(scale)
            width = max(len(ex["input_ids"]) for ex in batch.examples)
            doc_side = _contract(grads.token_factors, adjoints, width, shared=True)  # [B, T]
            query_side = _contract(query.factors, query_adjoints(computer, preconditioner, basis, rows, query.curvature),
                                   query.length, shared=False)  # fmt: skip  # [B, T_query]
            scores = rows @ query.exact.to(rows.device)
            for b, index in enumerate(batch.indices):
                ids = list(batch.examples[b]["input_ids"])
                span = slice(width - len(ids), width) if runner.padding_side == "left" else slice(0, len(ids))
                out.ids[index] = [int(t) for t in ids]
                out.documents[index] = (doc_side[b, span] * scale[b]).cpu()
                out.query[index] = (query_side[b] * scale[b]).cpu()
                out.scores[index] = float(scores[b] * scale[b])
    return out


# ---- the adjoints -----------------------------------------------------------------------------------


def train_adjoints(computer: GradientComputer, basis: Eigenbasis | None, q: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per module, ``U_l [1, m_out, m_in]`` float64 with ``<q, row> = sum_l <U_l, G'_l>`` for every
    train row the pass builds (``BatchRunner.whitened_rows``: ``S_l (W_l * R_l G'_l)``; raw caches:
    ``S_l G'_l``)."""
    out = {}
    for name, (start, stop) in computer.offsets.items():
        comp = computer.compressors[name]
        assert isinstance(comp, FactorisedCompressor)
        u = project_transpose(comp, q[None, start:stop].to(computer.device, torch.float64))
        u = u.reshape(1, comp.m_out, comp.m_in)
        if basis is not None:  # the adjoint of whiten * rotate: rotate back, as the whitening is diagonal
            mod = basis.modules[name]
            u = mod.unrotate(u * mod.whiten.to(u.device))
        out[name] = u
    return out


def query_adjoints(
    computer: GradientComputer,
    preconditioner: Preconditioner,
    basis: Eigenbasis | None,
    rows: torch.Tensor,
    curvature: set[str],
) -> dict[str, torch.Tensor]:
    """Per module, ``V_l [n, c_out, c_in]`` float64 with ``<q(G'), rows[j]> = sum_l <V_l[j], G'_l>``
    for the query vector ``q`` of any query gradient ``G'`` (``query_rows``; the factor gradient,
    or a hashed module's in curvature coordinates, the modules named in ``curvature``)."""
    rows = rows.to(computer.device, torch.float64)
    out = {}
    if basis is None and preconditioner.acts_on == "rows":  # q = P(S G'): back through P, then S
        offsets = computer.offsets
        rows = linear_adjoint(lambda r: preconditioner.precondition_rows(r, offsets), tuple(rows.shape), rows)
    for name, (start, stop) in computer.offsets.items():
        comp = computer.compressors[name]
        assert isinstance(comp, FactorisedCompressor)
        back = project_transpose(comp, rows[:, start:stop]).reshape(rows.shape[0], comp.m_out, comp.m_in)
        if basis is None and preconditioner.acts_on == "rows":
            out[name] = back
            continue
        hashed = name in curvature
        shape = (rows.shape[0], *_curvature_shape(basis, name, comp, hashed))
        out[name] = linear_adjoint(
            lambda g, name=name, hashed=hashed: preconditioned_factor(computer, name, g, preconditioner, basis, hashed),
            shape, back,
        )  # fmt: skip
    return out


def _curvature_shape(
    basis: Eigenbasis | None, name: str, comp: FactorisedCompressor, hashed: bool
) -> tuple[int, int]:
    if basis is None or not hashed:
        return comp.m_out, comp.m_in
    return basis.curvature_shape(name, (comp.m_out, comp.m_in))


def project_transpose(comp: FactorisedCompressor, y: torch.Tensor) -> torch.Tensor:
    """``S^T y`` of the compressor's final projection (``project_factor``): ``y [n, k]`` -> ``[n,
    m_out * m_in]``. An SJLT is transposed by gathering its targets (no autograd through a kernel);
    any other projection by autograd, exact as the map is linear."""
    sjlt = getattr(comp, "sjlt", None)
    if isinstance(sjlt, SJLTMap):  # output r of input j gets signs[s, j]: input j reads them back
        sjlt = sjlt.to(y.device)
        return (y[:, sjlt.rows] * sjlt.signs.to(y.dtype)).sum(1)
    shape = (y.shape[0], comp.m_out, comp.m_in)
    return linear_adjoint(comp.project_factor, shape, y).reshape(y.shape[0], -1)


def linear_adjoint(fn: Callable[[torch.Tensor], torch.Tensor], shape: Sequence[int], cotangent: torch.Tensor) -> torch.Tensor:
    """``fn^T(cotangent)`` for a linear ``fn`` of a float64 ``[n, ...]`` input of ``shape`` that maps
    each of the ``n`` examples on its own: reverse-mode autograd at zero (exact for a linear map)."""
    with torch.enable_grad():
        x = torch.zeros(tuple(shape), dtype=torch.float64, device=cotangent.device, requires_grad=True)
        y = fn(x)
        (grad,) = torch.autograd.grad(y, x, cotangent.to(y.dtype).reshape(y.shape), allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad.detach()


def curvature_adjoint(comp: Any, u: torch.Tensor) -> torch.Tensor:
    """A factor-space adjoint ``[n, m_out, m_in]`` pulled back to a hashed module's curvature
    coordinates, through its train-side hashing (``to_factor_space``)."""
    shape = (u.shape[0], comp.d_out if comp.map_out.hashed else comp.m_out,
             comp.d_in if comp.map_in.hashed else comp.m_in)  # fmt: skip
    return linear_adjoint(comp.to_factor_space, shape, u)


# ---- contributions ----------------------------------------------------------------------------------


def _contract(factors: Factors, adjoints: dict[str, torch.Tensor], width: int, shared: bool) -> torch.Tensor:
    """``sum_l delta'_t^T A_l x'_t`` per example and token. ``shared``: one adjoint ``[1, a, b]`` for
    every example of ``factors`` (document side); else the factors are one example's ``[1, T, ·]`` and
    the adjoints ``[n, a, b]`` give ``n`` rows (query side). A module called several times per forward
    adds each call's tokens to the same positions."""
    total: torch.Tensor | None = None
    for name, (xs, ds) in factors.items():
        a = adjoints[name]
        xs, ds = xs.to(a.device, torch.float64), ds.to(a.device, torch.float64)
        # [B, T * calls] (one adjoint, every example) or [n, T * calls] (one example, n adjoints)
        contrib = ((ds @ a[0]) * xs).sum(-1) if shared else torch.einsum("to,noi,ti->nt", ds[0], a, xs[0])
        if contrib.shape[1] % width:
            raise ValueError(
                f"module {name!r} saw {contrib.shape[1]} token positions, not a multiple of the {width} of the "
                "sequence: its inputs are not the sequence's tokens, so its gradient cannot be split over them; "
                "exclude it (GraSSConfig(exclude_modules=...)) to get token scores"
            )
        contrib = contrib.reshape(contrib.shape[0], -1, width).sum(1)
        total = contrib if total is None else total + contrib
    assert total is not None, "no module received a gradient"
    return total

"""Linear datamodeling score (LDS): how well attribution scores predict retraining outcomes.

LDS (Park et al., 2023, "TRAK: Attributing Model Behavior at Scale") retrains the model on ``m``
random subsets ``S_1 .. S_m`` of the training set and asks whether the scores rank those subsets the
way the retrained models' query losses do. With scores ``tau(q, i)`` (``[n_query, n_train]``; positive
= helpful, i.e. upweighting example ``i`` lowers the loss of query ``q``), the additive prediction
for subset ``j`` is

    g_q(S_j) = sum_{i in S_j} tau(q, i)

and, since a helpful subset means a *lower* loss, the score of query ``q`` is

    LDS_q = spearman( [g_q(S_1) .. g_q(S_m)],  [-L_q(S_1) .. -L_q(S_m)] )

where ``L_q(S_j)`` is the loss of query ``q`` under the model trained on ``S_j``. ``LDS`` is the mean
of ``LDS_q`` over the queries. Spearman's correlation is the Pearson correlation of the ranks, with
tied values given the average of the ranks they span (``scipy.stats.spearmanr``'s convention).

A query whose predictions or losses are constant across the subsets has no defined correlation:
``lds_per_query`` returns NaN for it and ``lds`` averages over the other queries (NaN if none).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["average_ranks", "lds", "lds_per_query", "spearman_rows", "subset_predictions"]


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{name} must be a torch.Tensor or a numeric array, got {type(value).__name__} ({err})"
        ) from err


def _check_real(name: str, t: torch.Tensor, dims: str) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {dims}, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex() or not (t.is_floating_point() or _is_integer(t)):
        raise ValueError(f"{name} must hold real numbers (float or int), got dtype {t.dtype}")
    t = t.to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values; drop or fix those entries first")
    return t


def _is_integer(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _check_masks(t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"subset_masks must be 2-D [m, n_train], got shape {tuple(t.shape)}")
    if t.dtype == torch.bool:
        return t
    if _is_integer(t) and bool(((t == 0) | (t == 1)).all()):
        return t.bool()
    what = "integers other than 0/1" if _is_integer(t) else f"dtype {t.dtype}"
    raise ValueError(
        f"subset_masks must be bool (True = the training example is in the subset) or 0/1 integers; got {what}"
    )


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last dimension, ties sharing the mean of the ranks they span.

    ``[3., 1., 3.]`` -> ``[2.5, 1., 2.5]``. Works on any leading batch shape; returns float64.
    """
    values = values.to(torch.float64).contiguous()
    ordered = values.sort(dim=-1).values
    # positions [lo, hi) of each value in the sorted row: its tied block, 0-based
    lo = torch.searchsorted(ordered, values, right=False)
    hi = torch.searchsorted(ordered, values, right=True)
    return (lo + hi + 1).to(torch.float64) / 2


def spearman_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of each row of ``x`` with the same row of ``y`` (``[n, m]`` -> ``[n]``).

    NaN where a row of either input is constant (the correlation is undefined there).
    """
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"x and y must be 2-D of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    rx = average_ranks(x)
    ry = average_ranks(y)
    rx = rx - rx.mean(dim=1, keepdim=True)
    ry = ry - ry.mean(dim=1, keepdim=True)
    num = (rx * ry).sum(dim=1)
    den = (rx.square().sum(dim=1) * ry.square().sum(dim=1)).sqrt()
    out = torch.full_like(num, float("nan"))
    ok = den > 0
    out[ok] = (num[ok] / den[ok]).clamp(-1.0, 1.0)
    return out


def subset_predictions(scores: Any, subset_masks: Any) -> torch.Tensor:
    """``[n_query, m]`` float64: ``g_q(S_j) = sum_{i in S_j} scores[q, i]``."""
    s = _check_real("scores", _as_tensor("scores", scores), "[n_query, n_train]")
    masks = _check_masks(_as_tensor("subset_masks", subset_masks))
    if masks.shape[1] != s.shape[1]:
        raise ValueError(
            f"scores has {s.shape[1]} training examples (columns) but subset_masks has {masks.shape[1]}; "
            "both must index the same training set"
        )
    return s @ masks.to(torch.float64).T


def lds_per_query(scores: Any, subset_masks: Any, subset_losses: Any) -> torch.Tensor:
    """``LDS_q`` for every query: a float64 tensor ``[n_query]`` (NaN where undefined).

    Args:
        scores: ``[n_query, n_train]`` attribution scores, positive = helpful (lowers the loss).
        subset_masks: ``[m, n_train]`` bool, ``True`` where training example ``i`` is in subset ``j``.
        subset_losses: ``[m, n_query]`` loss of query ``q`` under the model retrained on subset ``j``.

    Returns:
        ``spearman(g_q(S_.), -L_q(S_.))`` per query, in ``[-1, 1]``; +1 means the scores order the
        subsets exactly as their retrained losses do (highest predicted help = lowest loss).
    """
    s = _check_real("scores", _as_tensor("scores", scores), "[n_query, n_train]")
    masks = _check_masks(_as_tensor("subset_masks", subset_masks))
    losses = _check_real("subset_losses", _as_tensor("subset_losses", subset_losses), "[m, n_query]")
    m = masks.shape[0]
    if m < 2:
        raise ValueError(f"LDS needs at least 2 subsets (rows of subset_masks), got {m}")
    if losses.shape != (m, s.shape[0]):
        raise ValueError(
            f"subset_losses must have shape [m, n_query] = [{m}, {s.shape[0]}] (one row per subset of "
            f"subset_masks, one column per query row of scores), got {tuple(losses.shape)}"
        )
    predictions = subset_predictions(s, masks)  # [n_query, m]
    return spearman_rows(predictions, -losses.T)


def lds(scores: Any, subset_masks: Any, subset_losses: Any) -> float:
    """The linear datamodeling score: the mean of :func:`lds_per_query` over the defined queries.

    ``LDS = mean_q spearman( [sum_{i in S_j} scores[q, i]]_j , [-subset_losses[j, q]]_j )``.
    Positive scores are helpful, so a good attribution gives positive LDS (1 at best). Returns NaN if
    no query has a defined correlation (every prediction or loss row constant).
    """
    per_query = lds_per_query(scores, subset_masks, subset_losses)
    defined = per_query[~per_query.isnan()]
    return float(defined.mean()) if defined.numel() else float("nan")

"""LDS: Spearman with average ranks (checked against scipy), the sign convention and input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from hf_grass.evaluation import average_ranks, lds, lds_per_query, spearman_rows, subset_predictions


def _random_problem(n_query: int = 5, n_train: int = 40, m: int = 24, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_query, n_train, generator=gen)
    masks = torch.rand(m, n_train, generator=gen) < 0.5
    losses = torch.randn(m, n_query, generator=gen)
    return scores, masks, losses


def test_average_ranks_match_scipy_with_ties() -> None:
    from scipy.stats import rankdata

    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 5.0]])
    got = average_ranks(x)
    assert got.tolist()[0] == [5.0, 1.5, 5.0, 3.0, 1.5, 5.0]
    for row in range(2):
        np.testing.assert_allclose(got[row].numpy(), rankdata(x[row].numpy()))


@pytest.mark.parametrize("seed", range(4))
def test_lds_matches_scipy_spearman(seed: int) -> None:
    scores, masks, losses = _random_problem(seed=seed)
    per_query = lds_per_query(scores, masks, losses)
    preds = (scores.double() @ masks.double().T).numpy()
    expected = [spearmanr(preds[q], -losses[:, q].numpy()).statistic for q in range(scores.shape[0])]
    np.testing.assert_allclose(per_query.numpy(), expected, rtol=0, atol=1e-12)
    assert lds(scores, masks, losses) == pytest.approx(float(np.mean(expected)), abs=1e-12)


def test_ties_match_scipy() -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(0, 4, (6, 30), generator=gen).double()  # heavy ties in both inputs
    y = torch.randint(0, 3, (6, 30), generator=gen).double()
    got = spearman_rows(x, y)
    expected = [spearmanr(x[r].numpy(), y[r].numpy()).statistic for r in range(6)]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


def test_tied_predictions_from_integer_scores() -> None:
    """Integer scores over overlapping subsets give tied predictions; still equals scipy."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(-1, 2, (3, 8), generator=gen)
    masks = torch.rand(20, 8, generator=gen) < 0.5
    losses = torch.randint(0, 3, (20, 3), generator=gen).float()
    got = lds_per_query(scores, masks, losses)
    preds = (scores.double() @ masks.double().T).numpy()
    expected = [spearmanr(preds[q], -losses[:, q].numpy()).statistic for q in range(3)]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


def test_perfect_and_reversed() -> None:
    scores, masks, _ = _random_problem(n_query=3)
    preds = subset_predictions(scores, masks)  # [n_query, m]
    # loss falls exactly as the predicted help rises (any monotone map keeps Spearman at 1)
    perfect = (-preds.T).exp()
    assert lds(scores, masks, perfect) == pytest.approx(1.0)
    assert torch.allclose(lds_per_query(scores, masks, perfect), torch.ones(3, dtype=torch.float64))
    assert lds(scores, masks, -perfect) == pytest.approx(-1.0)
    assert lds(-scores, masks, perfect) == pytest.approx(-1.0)


def test_sign_convention_helpful_subsets_have_lower_loss() -> None:
    """Query q is helped by the examples of group q: subsets with more of them have a lower loss.

    A score matrix saying "group q is helpful to q" (positive) must give a positive LDS.
    """
    gen = torch.Generator().manual_seed(0)
    n_query, per_group, m = 4, 10, 32
    n_train = n_query * per_group
    group = torch.arange(n_train) // per_group
    masks = torch.rand(m, n_train, generator=gen) < 0.5
    helpful_count = torch.stack([masks[:, group == q].sum(1) for q in range(n_query)], dim=1)  # [m, nq]
    losses = 5.0 - 0.3 * helpful_count.float() + 0.05 * torch.randn(m, n_query, generator=gen)
    scores = (group[None, :] == torch.arange(n_query)[:, None]).float()  # positive = helpful
    value = lds(scores, masks, losses)
    assert value > 0.9
    assert lds(-scores, masks, losses) == pytest.approx(-value)


def test_constant_rows_are_nan_and_skipped() -> None:
    scores, masks, losses = _random_problem(n_query=3)
    losses[:, 1] = 2.0  # query 1's loss never changes: correlation undefined
    per_query = lds_per_query(scores, masks, losses)
    assert math.isnan(per_query[1]) and not per_query[[0, 2]].isnan().any()
    assert lds(scores, masks, losses) == pytest.approx(float(per_query[[0, 2]].mean()))
    losses[:] = 1.0
    assert math.isnan(lds(scores, masks, losses))


def test_accepts_numpy_and_integer_masks() -> None:
    scores, masks, losses = _random_problem()
    expected = lds(scores, masks, losses)
    assert lds(scores.numpy(), masks.numpy(), losses.numpy()) == pytest.approx(expected)
    assert lds(scores, masks.long(), losses) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s, k, y: (s[0], k, y), "scores must be 2-D"),
        (lambda s, k, y: (s, k[0], y), "subset_masks must be 2-D"),
        (lambda s, k, y: (s, k, y[:, :2]), r"subset_losses must have shape \[m, n_query\] = \[24, 5\]"),
        (lambda s, k, y: (s, k, y.T), "subset_losses must have shape"),
        (lambda s, k, y: (s[:, :-1], k, y), "scores has 39 training examples"),
        (lambda s, k, y: (s, k.float(), y), "subset_masks must be bool"),
        (lambda s, k, y: (s, k.long() * 2, y), "integers other than 0/1"),
        (lambda s, k, y: (s, k[:1], y[:1]), "at least 2 subsets"),
        (lambda s, k, y: (s > 0, k, y), "scores must hold real numbers"),
        (lambda s, k, y: (s, k, y.masked_fill(y > 1, float("nan"))), "subset_losses contains NaN"),
    ],
)
def test_bad_inputs_are_refused(change, match: str) -> None:
    scores, masks, losses = _random_problem()
    with pytest.raises(ValueError, match=match):
        lds(*change(scores, masks, losses))


def test_non_numeric_input_is_refused() -> None:
    _, masks, losses = _random_problem(n_query=2)
    with pytest.raises(ValueError, match="scores must be a torch.Tensor or a numeric array"):
        lds(np.array([["a"] * 40, ["b"] * 40]), masks, losses)


def test_spearman_rows_shape_error() -> None:
    with pytest.raises(ValueError, match="same shape"):
        spearman_rows(torch.zeros(2, 3), torch.zeros(3, 2))

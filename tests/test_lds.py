"""LDS: subset masks and the Spearman score with its bootstrap interval."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import spearmanr

from curvinf.lds import group_effects, lds, make_subsets


def test_make_subsets_shape_size_and_seeding():
    masks = make_subsets(101, num_subsets=7, alpha=0.3, seed=4)
    assert masks.shape == (7, 101) and masks.dtype == torch.bool
    assert masks.sum(1).tolist() == [30] * 7  # round(0.3 * 101)
    assert torch.equal(masks, make_subsets(101, num_subsets=7, alpha=0.3, seed=4))
    assert not torch.equal(masks, make_subsets(101, num_subsets=7, alpha=0.3, seed=5))
    # Row j does not depend on how many subsets are drawn.
    assert torch.equal(masks[:3], make_subsets(101, num_subsets=3, alpha=0.3, seed=4))
    assert len({tuple(r.tolist()) for r in masks}) == 7


@pytest.mark.parametrize(
    ("n", "m", "alpha", "match"),
    [
        (100, 10, 0.0, "alpha"),
        (100, 10, 1.0, "alpha"),
        (100, 1, 0.5, "num_subsets"),
        (3, 10, 0.1, "empty"),
        (3, 10, 0.9, "keeps every example"),
    ],
)
def test_make_subsets_rejects_bad_arguments(n, m, alpha, match):
    with pytest.raises(ValueError, match=match):
        make_subsets(n, num_subsets=m, alpha=alpha)


def _hand_case():
    """N = 4 training points, M = 4 subsets, Q = 2 queries with known Spearman."""
    masks = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    # Query 0: -truth ranks 1, 3, 2, 4 against predicted 1, 2, 3, 4:
    # rho = 1 - 6 * (0 + 1 + 1 + 0) / (4 * 15) = 0.8. Query 1: perfect, rho = 1.
    truth = -torch.tensor([[1.0, 4.0], [3.0, 3.0], [2.0, 2.0], [4.0, 1.0]])
    return scores, masks, truth


def test_lds_hand_built_case():
    scores, masks, truth = _hand_case()
    assert torch.equal(group_effects(scores, masks), scores.T.double())
    result = lds(scores, masks, truth, num_bootstrap=200, seed=1)
    assert result.per_query.tolist() == pytest.approx([0.8, 1.0])
    assert result.mean == pytest.approx(0.9)
    assert result.constant_queries == [] and result.constant_predictions == []
    assert result.per_query[0] == pytest.approx(spearmanr([1, 2, 3, 4], [1, 3, 2, 4]).statistic)
    assert result.ci_low <= result.mean <= result.ci_high <= 1.0
    again = lds(scores, masks, truth, num_bootstrap=200, seed=1)
    assert (again.ci_low, again.ci_high) == (result.ci_low, result.ci_high)
    assert "LDS 0.9000" in str(result)


def test_lds_wrong_sign_is_negative():
    scores, masks, truth = _hand_case()
    flipped = lds(-scores, masks, truth, num_bootstrap=0)
    assert flipped.per_query.tolist() == pytest.approx([-0.8, -1.0])
    assert flipped.mean < 0 and math.isnan(flipped.ci_low)


def test_lds_reports_constant_queries():
    g = torch.Generator().manual_seed(0)
    masks = make_subsets(30, num_subsets=12, seed=0)
    scores = torch.randn(3, 30, generator=g)
    truth = torch.randn(12, 3, generator=g, dtype=torch.float64)
    truth[:, 1] = 0.7  # constant ground truth
    scores[2] = 0.0  # constant predictions
    result = lds(scores, masks, truth, num_bootstrap=50)
    assert result.constant_queries == [1] and result.constant_predictions == [2]
    assert torch.isnan(result.per_query[1:]).all() and torch.isfinite(result.per_query[0])
    assert result.mean == pytest.approx(float(result.per_query[0]))
    assert result.num_valid == 1 and "constant ground truth" in str(result)


def test_lds_rejects_mismatched_shapes():
    scores, masks, truth = _hand_case()
    with pytest.raises(ValueError, match="shapes disagree"):
        lds(scores[:1], masks, truth)
    with pytest.raises(ValueError, match="boolean"):
        lds(scores, masks.long(), truth)
    with pytest.raises(ValueError, match="NaN"):
        lds(scores, masks, truth * float("nan"))

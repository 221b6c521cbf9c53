"""LDS: subset masks and the Spearman score with its bootstrap interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from curvinf.lds import (
    BOOTSTRAP_METHODS,
    bootstrap_interval,
    group_effects,
    lds,
    lds_compare,
    lds_difference,
    make_subsets,
)
from curvinf.noise import seed_noise


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


# --- Bootstrap intervals, paired differences (issue 11) -------------------------------


def _linear_case(M=60, N=40, Q=30, noise=4.0, seed=0):
    """Truth linear in the subset (exact group effects = the truth up to noise)."""
    g = torch.Generator().manual_seed(seed)
    masks = make_subsets(N, num_subsets=M, seed=seed)
    effects = torch.randn(Q, N, generator=g, dtype=torch.float64)
    truth = -(masks.double() @ effects.T) + noise * torch.randn(M, Q, generator=g).double()
    noisy = effects + 1.5 * torch.randn(Q, N, generator=g, dtype=torch.float64)
    return effects, noisy, masks, truth


def test_interval_methods_on_known_replicates():
    boot = np.arange(1000) / 999.0  # uniform on [0, 1]
    lo, hi, _ = bootstrap_interval(0.5, boot, 0.9, "percentile")
    assert (lo, hi) == pytest.approx((0.05, 0.95))
    lo, hi, _ = bootstrap_interval(0.6, boot, 0.9, "basic")
    assert (lo, hi) == pytest.approx((1.2 - 0.95, 1.2 - 0.05))
    lo, hi, _ = bootstrap_interval(0.6, boot, 0.9, "centred")
    assert (lo, hi) == pytest.approx((0.15, 1.05))
    # No bias (estimate at the replicates' median): BC is the percentile interval.
    assert bootstrap_interval(0.5, boot, 0.9, "bc")[:2] == pytest.approx((0.05, 0.95), abs=1e-3)
    # Replicates biased low (estimate at their 70th percentile): BC moves up, past the estimate.
    lo, hi, _ = bootstrap_interval(0.7, boot, 0.9, "bc")
    assert 0.05 < lo < 0.7 < hi and hi > 0.95 - 1e-9 and lo > 0.2
    with pytest.raises(ValueError, match="method"):
        bootstrap_interval(0.5, boot, 0.9, "bca")
    assert all(math.isnan(v) for v in bootstrap_interval(0.5, np.array([np.nan]), 0.9))


@pytest.mark.parametrize("method", BOOTSTRAP_METHODS)
def test_p_value_inverts_the_interval(method):
    rng = np.random.default_rng(0)
    for centre in (0.02, 0.05, 0.08, 0.12, -0.1):
        boot = centre - 0.01 + 0.05 * rng.standard_normal(500)
        for confidence in (0.8, 0.9, 0.95, 0.99):
            lo, hi, p = bootstrap_interval(centre, boot, confidence, method)
            assert (p < 1 - confidence) == (not lo <= 0 <= hi) or abs(p - (1 - confidence)) < 5e-3


def test_identical_rungs_differ_by_exactly_zero():
    scores, _, masks, truth = _linear_case()
    d = lds_difference(scores, scores.clone(), masks, truth, num_bootstrap=100)
    assert d.mean == 0.0 and (d.ci_low, d.ci_high) == (0.0, 0.0) and d.p_value == 1.0
    assert d.num_valid == 30 and torch.equal(d.per_query, torch.zeros(30, dtype=torch.float64))


def test_exact_effects_beat_noisy_ones():
    exact, noisy, masks, truth = _linear_case()
    d = lds_difference(exact, noisy, masks, truth, num_bootstrap=300, names=("exact", "noisy"))
    a, b = lds(exact, masks, truth, num_bootstrap=0), lds(noisy, masks, truth, num_bootstrap=0)
    assert d.mean == pytest.approx(a.mean - b.mean) and d.mean > 0.05
    assert 0 < d.ci_low <= d.mean <= d.ci_high and d.p_value < 0.01
    assert "LDS(exact) - LDS(noisy)" in str(d) and d.method == "centred"


def test_intervals_contain_the_estimate_and_the_low_percentile_is_fixed():
    exact, noisy, masks, truth = _linear_case()

    def position(r):  # where the estimate sits in its interval, 0 = low end, 1 = high end
        return (r.mean - r.ci_low) / (r.ci_high - r.ci_low)

    for scores in (exact, noisy):
        kw = {"num_bootstrap": 400, "seed": 3}
        res = {m: lds(scores, masks, truth, method=m, **kw) for m in BOOTSTRAP_METHODS}
        default = lds(scores, masks, truth, **kw)
        assert default.method == "centred"
        assert (default.ci_low, default.ci_high) == (res["centred"].ci_low, res["centred"].ci_high)
        # The resampled Spearman is biased low: the percentile interval sits below the
        # estimate (position > 0.5), the bias-correcting BC above it; centred is in between.
        assert position(res["percentile"]) > position(res["centred"]) > position(res["bc"])
        assert 0.4 < position(res["centred"]) < 0.6


def test_shared_resamples_make_the_paired_interval_narrow():
    exact, _, masks, truth = _linear_case()
    g = torch.Generator().manual_seed(9)
    close = exact + 0.3 * torch.randn(exact.shape, generator=g, dtype=torch.float64)
    cmp = lds_compare({"a": exact, "b": close}, masks, truth, num_bootstrap=300)
    ra, rb, d = cmp.results["a"], cmp.results["b"], cmp.difference("a", "b")
    unpaired = math.hypot(ra.ci_high - ra.ci_low, rb.ci_high - rb.ci_low)
    assert d.ci_high - d.ci_low < 0.5 * unpaired


def test_compare_matches_lds_and_is_reproducible():
    exact, noisy, masks, truth = _linear_case()
    kw = {"num_bootstrap": 150, "seed": 4}
    cmp = lds_compare({"x": exact, "y": noisy, "z": -noisy}, masks, truth, **kw)
    assert list(cmp.differences) == [("x", "y"), ("x", "z"), ("y", "z")]
    single = lds(noisy, masks, truth, **kw)
    assert (cmp.results["y"].ci_low, cmp.results["y"].ci_high) == (single.ci_low, single.ci_high)
    again = lds_difference(exact, noisy, masks, truth, **kw)
    xy, yx = cmp.difference("x", "y"), cmp.difference("y", "x")
    assert (again.mean, again.ci_low, again.ci_high, again.p_value) == (
        xy.mean,
        xy.ci_low,
        xy.ci_high,
        xy.p_value,
    )
    assert (yx.mean, yx.ci_low, yx.ci_high) == (-xy.mean, -xy.ci_high, -xy.ci_low)
    other = lds_difference(exact, noisy, masks, truth, num_bootstrap=150, seed=5)
    assert (other.ci_low, other.ci_high) != (xy.ci_low, xy.ci_high)


def test_difference_leaves_out_queries_either_rung_cannot_rank():
    exact, noisy, masks, truth = _linear_case()
    noisy = noisy.clone()
    noisy[3] = 0.0
    d = lds_difference(exact, noisy, masks, truth, num_bootstrap=50)
    assert d.num_valid == 29 and torch.isnan(d.per_query[3])


def test_difference_rejects_mismatched_shapes():
    exact, noisy, masks, truth = _linear_case()
    with pytest.raises(ValueError, match=r"shapes disagree: scores\['b'\]"):
        lds_difference(exact, noisy[:5], masks, truth)
    with pytest.raises(ValueError, match="shapes disagree"):
        lds_difference(exact, noisy, masks[:10], truth)
    with pytest.raises(ValueError, match="names must differ"):
        lds_difference(exact, noisy, masks, truth, names=("a", "a"))
    with pytest.raises(ValueError, match="method"):
        lds_compare({"a": exact}, masks, truth, method="student")


# --- Seed noise -----------------------------------------------------------------------


def test_seed_noise_hand_computed():
    # M = 2 subsets, R = 2 seeds, Q = 4 queries; measurements[j, r, q].
    m = torch.tensor(
        [
            [[1.0, 0.0, 3.0, 0.0], [3.0, 0.0, 3.0, 2.0]],
            [[5.0, 2.0, 3.0, 0.0], [7.0, 2.0, 3.0, 4.0]],
        ]
    )
    s = seed_noise(m)
    # q0: subset means 2, 6 -> truth var 8; seed vars 2, 2 -> 2; noise 1; signal 7.
    # q1: means 0, 2 -> 2; no seed noise. q2: constant. q3: means 1, 2 -> 0.5; seed vars
    # 2, 8 -> 5; noise 2.5 > 0.5 -> signal 0, ceiling 0, noise-dominated.
    nan = math.nan
    assert s.truth_var.tolist() == pytest.approx([8.0, 2.0, 0.0, 0.5])
    assert s.seed_var.tolist() == pytest.approx([2.0, 0.0, 0.0, 5.0])
    assert s.signal_var.tolist() == pytest.approx([7.0, 2.0, 0.0, 0.0])
    assert s.ratio.tolist() == pytest.approx([4.0, math.inf, nan, 0.1], nan_ok=True)
    assert s.snr.tolist() == pytest.approx([7.0, math.inf, nan, 0.0], nan_ok=True)
    ceiling = [math.sqrt(7 / 8), 1.0, nan, 0.0]
    assert s.ceiling.tolist() == pytest.approx(ceiling, nan_ok=True)
    assert s.ceiling_spearman[1] == pytest.approx(1.0)
    assert s.ceiling_spearman[0] == pytest.approx(6 / math.pi * math.asin(math.sqrt(7 / 8) / 2))
    assert s.mean_ceiling == pytest.approx((math.sqrt(7 / 8) + 1.0) / 3)
    assert s.mean_seed_var == pytest.approx(7 / 4) and s.noise_dominated == pytest.approx(1 / 3)
    assert s.reason is None and s.summary()["num_seeds"] == 2 and "LDS ceiling" in str(s)


def test_seed_noise_ceiling_matches_simulated_attenuation():
    g = torch.Generator().manual_seed(0)
    M, R, Q = 400, 3, 20
    signal = torch.randn(M, 1, Q, generator=g, dtype=torch.float64)
    m = signal + 2.0 * torch.randn(M, R, Q, generator=g, dtype=torch.float64)
    s = seed_noise(m)
    expected = math.sqrt(1 / (1 + 4 / 3))  # sqrt(signal / (signal + seed / R))
    assert s.mean_ceiling == pytest.approx(expected, abs=0.03)
    observed = np.mean([np.corrcoef(signal[:, 0, q], m.mean(1)[:, q])[0, 1] for q in range(Q)])
    assert s.mean_ceiling == pytest.approx(observed, abs=0.03)


def test_seed_noise_one_seed_and_bad_shapes():
    s = seed_noise(torch.randn(5, 1, 3))
    assert "num_seeds >= 2" in s.reason and math.isnan(s.mean_ceiling)
    assert torch.isnan(s.ceiling).all() and s.summary()["mean_ceiling"] is None
    assert "not measured" in str(s)
    with pytest.raises(ValueError, match="M subsets, R seeds, Q queries"):
        seed_noise(torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least 2 subsets"):
        seed_noise(torch.randn(1, 3, 3))


def test_bootstrap_spearman_from_counts_equals_ranking_each_resample():
    """The counts route (no sort per resample) gives spearman_columns on the expanded
    resample exactly, ties in the data and constant columns included."""
    from curvinf.lds import bootstrap_spearman, spearman_columns

    rng = np.random.default_rng(0)
    M, Q, B = 30, 7, 40
    pred, target = rng.normal(size=(M, Q)), rng.normal(size=(M, Q))
    pred[:5, 0] = 1.0
    target[:, 3] = target[0, 3]
    target[3:9, 1] = 2.0
    rows = rng.integers(0, M, size=(B, M))
    new = bootstrap_spearman(pred, target, rows)
    old = np.stack([spearman_columns(pred[r], target[r]) for r in rows])
    assert np.array_equal(np.isnan(new), np.isnan(old))
    assert np.nanmax(np.abs(new - old)) < 1e-12
    both = bootstrap_spearman([pred, 2 * pred], target, rows)
    assert np.array_equal(both[0], new, equal_nan=True)

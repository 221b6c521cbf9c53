"""Linear Datamodeling Score (LDS, Park et al. 2023): subsets and the score itself.

Ground truth: ``M`` random subsets ``S_j`` of the training set, each of size
``round(α N)`` (:func:`make_subsets`), retrained and measured on every query
(:func:`curvinf.groundtruth.ground_truth`): ``truth[j, q]``, the measurement
``f(z_q; θ*(S_j))`` averaged over retraining seeds, shape (M, Q).

A method's predicted group effect of subset ``S_j`` on query ``q`` is

    pred[j, q] = Σ_{m ∈ S_j} score[q, m]          pred = masks @ scoresᵀ   (M, Q)

and the LDS of query ``q`` is the Spearman rank correlation over the ``M``
subsets, ``LDS_q = ρ_s(pred[:, q], -truth[:, q])``.

Sign convention (the one place it is spelled out for LDS): scores are positive
for training points that *help* the query (see :mod:`curvinf.influence`), and
measurements are oriented *lower is better* (query loss, or minus the margin;
:func:`curvinf.losses.example_measure`). A subset full of helpful points has a
large predicted effect and a *low* measured loss, so LDS correlates ``pred``
with ``-truth``: a good method has positive LDS, a sign-flipped one negative.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy.special import ndtr, ndtri
from scipy.stats import rankdata

from curvinf.devices import cpu_generator
from curvinf.validation import check_finite

CONSTANT_TRUTH_FRACTION = 0.1
SATURATED_HINT = (
    "the query loss is probably saturated, e.g. a float32 loss at 0 on well-fitted queries; "
    "measure='margin' stays informative there"
)


def subset_size(n_train: int, alpha: float) -> int:
    """``round(α N)``, the size of every LDS subset; raise if it is 0 or N."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha (subset fraction) must lie in (0, 1), got {alpha}.")
    if n_train < 2:
        raise ValueError(f"need at least 2 training examples to draw subsets, got {n_train}.")
    size = int(round(alpha * n_train))
    if size < 1:
        raise ValueError(
            f"alpha={alpha} of {n_train} training examples gives empty subsets; raise alpha to at "
            f"least {1 / n_train:.3g}."
        )
    if size >= n_train:
        raise ValueError(
            f"alpha={alpha} of {n_train} training examples keeps every example; lower alpha below "
            f"{(n_train - 0.5) / n_train:.3g}."
        )
    return size


def make_subsets(
    n_train: int, num_subsets: int = 100, alpha: float = 0.5, seed: int = 0
) -> torch.Tensor:
    """``M`` random subsets of ``round(α N)`` training examples: a (M, N) boolean mask.

    Row ``j`` is the first ``round(α N)`` entries of the ``j``-th permutation
    drawn from ``torch.Generator().manual_seed(seed)``; every row has the same
    size (so the subsets can be retrained together), and row ``j`` does not
    depend on ``num_subsets``. Same arguments, same masks, on the CPU (move them with
    ``.to(device)``; the draws do not depend on the device).
    """
    if num_subsets < 2:
        raise ValueError(
            f"num_subsets must be >= 2 (a rank correlation needs two subsets), got {num_subsets}."
        )
    size = subset_size(n_train, alpha)
    generator = cpu_generator(seed)
    masks = torch.zeros(num_subsets, n_train, dtype=torch.bool, device="cpu")
    for j in range(num_subsets):
        masks[j, torch.randperm(n_train, generator=generator, device="cpu")[:size]] = True
    return masks


BOOTSTRAP_METHODS = ("centred", "percentile", "bc", "basic")
"""Interval methods of the bootstrap (:func:`bootstrap_interval`); ``"centred"`` is the default."""


@dataclass
class LDSResult:
    """The LDS of one score matrix against one ground truth.

    ``per_query``: (Q,) Spearman per query; NaN where it is undefined.
    ``mean``: the mean over the queries where it is defined.
    ``ci_low``, ``ci_high``: bootstrap interval of ``mean`` at ``confidence``, from
    ``num_bootstrap`` resamples of subsets *and* queries (:func:`bootstrap_spearman`) by
    ``method`` (:func:`bootstrap_interval`; ``"centred"``, the percentile interval moved to
    have its median at ``mean``, by default).
    ``constant_queries``: queries whose ground truth is the same on every subset
    (no ranking to predict); they are NaN in ``per_query`` and left out of ``mean``.
    ``constant_predictions``: queries whose predicted group effect is the same on
    every subset (e.g. all-zero scores); also NaN and left out.
    """

    per_query: torch.Tensor
    mean: float
    ci_low: float
    ci_high: float
    constant_queries: list[int] = field(default_factory=list)
    constant_predictions: list[int] = field(default_factory=list)
    confidence: float = 0.95
    num_bootstrap: int = 1000
    method: str = "centred"

    @property
    def num_valid(self) -> int:
        """Queries that entered ``mean``."""
        return int(torch.isfinite(self.per_query).sum())

    def __str__(self) -> str:
        text = (
            f"LDS {self.mean:.4f} [{100 * self.confidence:.0f}% CI {self.ci_low:.4f}, "
            f"{self.ci_high:.4f}] over {self.num_valid} of {len(self.per_query)} queries"
        )
        if self.constant_queries:
            text += f"; {len(self.constant_queries)} with constant ground truth left out"
            if len(self.constant_queries) > CONSTANT_TRUTH_FRACTION * len(self.per_query):
                text += f" ({SATURATED_HINT})"
        if self.constant_predictions:
            text += f"; {len(self.constant_predictions)} with constant predictions left out"
        return text


@dataclass
class LDSDifference:
    """Paired comparison ``LDS(a) - LDS(b)`` of two score matrices on one ground truth.

    ``per_query``: (Q,) ``ρ_a - ρ_b`` per query; NaN where either Spearman is undefined.
    ``mean``: the mean of ``per_query`` over the ``num_valid`` queries where both are
    defined (so both LDS are over the same queries; it can differ from
    ``lds(a).mean - lds(b).mean`` when their constant queries differ).
    ``ci_low``, ``ci_high``: bootstrap interval of ``mean`` by ``method`` from
    ``num_bootstrap`` *shared* resamples: each resample draws subsets and queries with
    replacement once and recomputes both rungs' mean Spearman on it, so what the rungs
    have in common (hard queries, unlucky subsets) cancels in the difference.
    ``p_value``: two-sided bootstrap p-value of ``mean = 0``, the inverse of the same
    interval: ``p_value < 1 - c`` exactly when the level-``c`` interval excludes 0.
    """

    a: str
    b: str
    per_query: torch.Tensor
    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    num_valid: int
    confidence: float = 0.95
    num_bootstrap: int = 1000
    method: str = "centred"

    def __str__(self) -> str:
        return (
            f"LDS({self.a}) - LDS({self.b}) = {self.mean:+.4f} [{100 * self.confidence:.0f}% "
            f"CI {self.ci_low:+.4f}, {self.ci_high:+.4f}; p = {self.p_value:.3g}] over "
            f"{self.num_valid} queries"
        )


@dataclass
class LDSComparison:
    """:func:`lds_compare`: every rung's :class:`LDSResult` and every pair's difference.

    ``results[name]``: the rung's LDS, its interval from the shared resamples (the same
    numbers :func:`lds` gives with the same ``seed``). ``differences[(a, b)]``: the
    :class:`LDSDifference` ``a - b`` for every pair with ``a`` before ``b`` in the input.
    """

    results: dict[str, LDSResult]
    differences: dict[tuple[str, str], LDSDifference]

    def difference(self, a: str, b: str) -> LDSDifference:
        """``LDS(a) - LDS(b)``, in either order of the pair."""
        if (a, b) in self.differences:
            return self.differences[(a, b)]
        d = self.differences[(b, a)]
        return replace(
            d,
            a=a,
            b=b,
            per_query=-d.per_query,
            mean=-d.mean,
            ci_low=-d.ci_high,
            ci_high=-d.ci_low,
        )


def group_effects(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Predicted group effects ``pred[j, q] = Σ_{m ∈ S_j} score[q, m]``: (M, Q) float64."""
    return masks.to(torch.float64) @ scores.to(torch.float64).T


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of matching columns of ``a`` and ``b`` (both (M, Q)) -> (Q,).

    Ties get average ranks; a column that is constant in ``a`` or ``b`` gives NaN.
    Extra leading axes are batch axes: (..., M, Q) -> (..., Q).
    """
    ra = rankdata(a, axis=-2)
    rb = rankdata(b, axis=-2)
    ra = ra - ra.mean(axis=-2, keepdims=True)
    rb = rb - rb.mean(axis=-2, keepdims=True)
    num = (ra * rb).sum(axis=-2)
    den = np.sqrt((ra * ra).sum(axis=-2) * (rb * rb).sum(axis=-2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _check_inputs(
    named_scores: dict[str, torch.Tensor], masks: torch.Tensor, truth: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Shapes, dtypes and finiteness of score matrices (Q, N), masks (M, N), truth (M, Q),
    returned on the CPU: LDS statistics are computed there (NumPy), whatever device the
    scores were computed on."""
    masks, truth = torch.as_tensor(masks, device="cpu"), torch.as_tensor(truth, device="cpu")
    named_scores = {name: torch.as_tensor(s, device="cpu") for name, s in named_scores.items()}
    if not named_scores:
        raise ValueError("need at least one score matrix.")
    if masks.ndim != 2 or truth.ndim != 2:
        raise ValueError(
            f"need masks (M, N) and truth (M, Q); got shapes {tuple(masks.shape)}, "
            f"{tuple(truth.shape)}."
        )
    (M, N), (Mt, Q) = masks.shape, truth.shape
    for name, scores in named_scores.items():
        what = "scores" if len(named_scores) == 1 else f"scores[{name!r}]"
        if scores.ndim != 2:
            raise ValueError(f"need {what} (Q, N); got shape {tuple(scores.shape)}.")
        if scores.shape != (Q, N) or M != Mt:
            raise ValueError(
                f"shapes disagree: {what} {tuple(scores.shape)} is (Q, N), masks "
                f"{tuple(masks.shape)} is (M, N), truth {tuple(truth.shape)} is (M, Q); pass the "
                "masks the ground truth was built with and scores for the same queries."
            )
        check_finite(what, scores)
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be a boolean tensor, got {masks.dtype}.")
    if M < 2:
        raise ValueError(f"need at least 2 subsets, got {M}.")
    check_finite("truth", truth)
    return named_scores, masks, truth


def bootstrap_resamples(
    num_subsets: int, num_queries: int, num_bootstrap: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The shared resamples of every LDS interval: subsets and queries with replacement.

    Returns ``rows`` (B, M), the subsets (rows of masks and truth) of each resample, and
    ``weights`` (B, Q), how often each query is drawn in it. Both depend only on the
    arguments, so every rung scored against one ground truth with one ``seed`` sees the
    same resamples (:func:`lds` and :func:`lds_compare` agree number for number).
    """
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, num_subsets, size=(num_bootstrap, num_subsets))
    cols = rng.integers(0, num_queries, size=(num_bootstrap, num_queries))
    weights = np.zeros((num_bootstrap, num_queries))
    np.add.at(weights, (np.arange(num_bootstrap)[:, None], cols), 1.0)
    return rows, weights


RANK_BLOCK = 4e6
"""Elements per block of :func:`bootstrap_spearman` (32 MB of float64 per array)."""


class ResampleRanks:
    """Centred average ranks of one (M, Q) array's columns on any resample of its rows,
    by one GEMM.

    A resample that draws row ``j`` ``c_j`` times (counts ``c`` (M,), ``Σ c = M``) gives
    row ``i`` of column ``q`` the average rank of the expanded sample

        r_i = #{drawn < x_i} + (#{drawn = x_i} + 1) / 2,

    whose ``c``-weighted mean is ``(M + 1) / 2`` whatever the counts. Centred,

        r_i - (M + 1) / 2 = Σ_j c_j S_q[j, i],
        S_q[j, i] = [x_jq < x_iq] + [x_jq = x_iq] / 2 - 1/2,

    so the centred ranks of ``b`` resamples at once are ``(b, M) @ (M, M·Q)``: ``2 b M² Q``
    flops, no sort per resample, and every number is a multiple of 1/2: exact in float64.
    Spearman on the expanded sample (duplicates included, average ranks, as
    :func:`spearman_columns` on ``x[rows]``) is the ``c``-weighted Pearson correlation of
    these ranks (:func:`bootstrap_spearman`).
    """

    def __init__(self, x: np.ndarray) -> None:
        xt = torch.as_tensor(x, dtype=torch.float64, device="cpu")
        M, Q = xt.shape
        below = (xt[:, None, :] < xt[None, :, :]).to(torch.float64)  # (j, i, q)
        ties = (xt[:, None, :] == xt[None, :, :]).to(torch.float64)
        self.S = (below + 0.5 * ties - 0.5).reshape(M, M * Q)
        self.shape = (M, Q)

    def centred(self, counts: torch.Tensor) -> torch.Tensor:
        """(b, M) counts -> (b, M, Q) ranks minus ``(M + 1) / 2`` (rows drawn 0 times get
        the rank they would have; they carry weight 0)."""
        return (counts @ self.S).view(len(counts), *self.shape)


def bootstrap_spearman(
    pred: np.ndarray | list[np.ndarray], target: np.ndarray, rows: np.ndarray
) -> np.ndarray | list[np.ndarray]:
    """Spearman of every query (column) on each subset resample: (M, Q) x (B, M) -> (B, Q)
    (a list of predictions gives a list, sharing the target's ranks).

    Equal to :func:`spearman_columns` on ``pred[rows[b]]``, ``target[rows[b]]`` (average
    ranks of the expanded sample; NaN where a resampled column is constant), computed from
    counts (:class:`ResampleRanks`) in ``O(B·M²·Q)`` GEMM flops.
    """
    preds = pred if isinstance(pred, list) else [pred]
    M, Q = target.shape
    B = len(rows)
    counts = np.zeros((B, M))
    np.add.at(counts, (np.arange(B)[:, None], rows), 1.0)
    counts_t = torch.as_tensor(counts, device="cpu")
    outs = [np.empty((B, Q)) for _ in preds]
    tol = 1e-9 * M * M  # below it a resampled column is constant (den is 0 or a multiple of 1/4)
    width = max(1, int(RANK_BLOCK // (M * M)))  # queries per block: T is (M, M·width)
    for q0 in range(0, Q, width):
        cols = slice(q0, q0 + width)
        rt = ResampleRanks(target[:, cols])
        rps = [ResampleRanks(p[:, cols]) for p in preds]
        step = max(1, int(RANK_BLOCK // (M * rt.shape[1])))
        for a in range(0, B, step):
            c = counts_t[a : a + step]
            dt = rt.centred(c)
            wdt = c[:, :, None] * dt  # (b, M, q) count-weighted centred target ranks
            var_t = (wdt * dt).sum(1)
            for rp, out in zip(rps, outs, strict=True):
                dp = rp.centred(c)
                num = (dp * wdt).sum(1)
                var_p = torch.einsum("bi,biq->bq", c, dp * dp)
                den = torch.sqrt(var_p * var_t)
                ok = den > tol
                out[a : a + step, cols] = torch.where(
                    ok, num / torch.where(ok, den, 1.0), torch.nan
                ).numpy(force=True)
    return outs if isinstance(pred, list) else outs[0]


def resampled_means(rho: np.ndarray, weights: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Mean over the drawn queries of each resample: (B, Q), (B, Q), (Q,) -> (B,).

    Only queries in ``keep`` (defined on the full data) and finite in the resample count,
    each as often as it was drawn; NaN for a resample without any.
    """
    ok = np.isfinite(rho) & keep
    w = weights * ok
    total = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(ok, rho, 0.0) * w).sum(1) / total


def _bc_levels(estimate: float, boot: np.ndarray) -> float:
    """``z0 = Φ⁻¹(P*(θ* < θ̂))`` (ties count half), clipped to the resolution of ``B``."""
    B = len(boot)
    share = (np.sum(boot < estimate) + 0.5 * np.sum(boot == estimate)) / B
    share = min(max(share, 0.5 / B), 1 - 0.5 / B)
    return float(ndtri(share))


def bootstrap_interval(
    estimate: float, boot: np.ndarray, confidence: float, method: str = "centred"
) -> tuple[float, float, float]:
    """Interval for ``estimate`` from its bootstrap replicates, and the p-value of 0.

    Methods (``z`` the normal quantile, ``G`` the replicates' distribution, ``c`` the
    ``confidence``, ``z0 = Φ⁻¹(G(θ̂))``):

    - ``"centred"`` (default): the percentile interval moved by ``θ̂ - median(G)``, so its
      median is the estimate. Why: a resample's mean Spearman is biased low against the
      full-data one (resampling subsets with replacement duplicates about a third of
      them, and Spearman on ~63% distinct subsets has the larger small-sample bias), so
      the plain percentile interval sits below the estimate. That shift is an artefact
      of the resampling, not a bias of the estimate: in a simulation (M = 100 subsets,
      Q = 50 queries, population LDS 0.473 from 4000 x 4000) the replicates sat 0.0042
      below the estimate but the estimate only 0.0015 (± 0.001) below the population
      value. Bias-correcting methods (``"bc"``, ``"basic"``, BCa) read the shift as bias
      of the estimate and move the interval *above* it by as much; recentring removes
      it and keeps the spread of ``G``.
    - ``"percentile"``: the ``(1 ∓ c) / 2`` quantiles of ``G`` (the pre-issue-11 interval).
    - ``"bc"``, bias-corrected percentile (Efron 1981): the ``Φ(2 z0 ± z_c)`` quantiles.
    - ``"basic"`` (reverse percentile): ``2 θ̂ - `` the percentile bounds.

    The p-value is the smallest ``1 - c`` at which the interval excludes 0 (two-sided),
    so ``p < 1 - c`` exactly when the level-``c`` interval excludes 0. NaN replicates are
    dropped; none left gives NaN.
    """
    if method not in BOOTSTRAP_METHODS:
        raise ValueError(f"method must be one of {BOOTSTRAP_METHODS}, got {method!r}.")
    boot = np.asarray(boot, dtype=np.float64)
    boot = boot[np.isfinite(boot)]
    if not len(boot) or not math.isfinite(estimate):
        return math.nan, math.nan, math.nan
    tail = (1 - confidence) / 2
    z = ndtri(1 - tail)
    B = len(boot)
    below0 = (np.sum(boot < 0) + 0.5 * np.sum(boot == 0)) / B  # G(0)
    if method in ("percentile", "centred"):
        shift = estimate - float(np.median(boot)) if method == "centred" else 0.0
        lo, hi = np.quantile(boot, [tail, 1 - tail]) + shift
        # 0 in the interval <=> -shift lies between the quantiles of G.
        side = (np.sum(boot < -shift) + 0.5 * np.sum(boot == -shift)) / B
    elif method == "basic":
        q_lo, q_hi = np.quantile(boot, [tail, 1 - tail])
        lo, hi = 2 * estimate - q_hi, 2 * estimate - q_lo
        # 0 in the level-c basic interval <=> 2θ̂ lies between the quantiles of G.
        side = (np.sum(boot < 2 * estimate) + 0.5 * np.sum(boot == 2 * estimate)) / B
    else:
        z0 = _bc_levels(estimate, boot)
        lo, hi = np.quantile(boot, ndtr([2 * z0 - z, 2 * z0 + z]))
        # 0 at the edge of the level-c interval <=> Φ⁻¹(G(0)) - 2 z0 = ±z_c.
        side = ndtr(ndtri(min(max(below0, 0.5 / B), 1 - 0.5 / B)) - 2 * z0)
    p_value = float(min(1.0, 2 * min(side, 1 - side)))
    if np.all(boot == boot[0]) and boot[0] == estimate:
        p_value = 1.0 if estimate == 0 else 0.0
    return float(lo), float(hi), p_value


def _spearman_and_validity(
    pred: np.ndarray, target: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query Spearman, constant-truth and constant-prediction flags: (Q,) each."""
    per_query = spearman_columns(pred, target)
    constant_truth = np.ptp(target, axis=0) == 0
    constant_pred = (np.ptp(pred, axis=0) == 0) & ~constant_truth
    return per_query, constant_truth, constant_pred


def lds_compare(
    scores: Mapping[str, torch.Tensor],
    masks: torch.Tensor,
    truth: torch.Tensor,
    *,
    num_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    method: str = "centred",
) -> LDSComparison:
    """LDS of several score matrices on one ground truth, and all their paired differences.

    Every rung is scored on the same bootstrap resamples (:func:`bootstrap_resamples`):
    each of the ``num_bootstrap`` resamples draws ``M`` subsets (rows of ``masks`` and
    ``truth``) and ``Q`` queries with replacement, and each rung's mean Spearman is
    recomputed on it. A rung's interval comes from its own replicates, a difference's from
    the replicate-wise differences (paired), both by ``method``
    (:func:`bootstrap_interval`). Resampling queries as well as subsets makes the interval
    cover the choice of queries too (LDS averages over a sample of them), and is on the
    conservative side for this crossed design.

    Args:
        scores: name -> (Q, N) influence scores, positive = helps the query; e.g. one
            entry per rung and regulariser of a configuration.
        masks, truth: as in :func:`lds`.
        num_bootstrap: resamples; 0 skips the intervals (NaN bounds and p-values).
        seed: seed of the resamples; :func:`lds` with the same seed gives each rung's
            :class:`LDSResult` exactly.
        confidence: coverage of the intervals.
        method: ``"centred"`` (percentile recentred on the estimate), ``"percentile"``,
            ``"bc"`` (bias-corrected percentile) or ``"basic"``.

    Returns:
        :class:`LDSComparison`: ``results[name]`` and ``differences[(a, b)]`` for every
        pair in input order.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    if num_bootstrap < 0:
        raise ValueError(f"num_bootstrap must be >= 0, got {num_bootstrap}.")
    if method not in BOOTSTRAP_METHODS:
        raise ValueError(f"method must be one of {BOOTSTRAP_METHODS}, got {method!r}.")
    named, masks, truth = _check_inputs(dict(scores), masks, truth)
    M, Q = truth.shape
    target = -truth.to(torch.float64).numpy(force=True)
    rows, weights = bootstrap_resamples(M, Q, num_bootstrap, seed)
    settings = {"confidence": confidence, "num_bootstrap": num_bootstrap, "method": method}

    per_query, valid, constant, boots, results = {}, {}, {}, {}, {}
    preds = {name: group_effects(s, masks).numpy(force=True) for name, s in named.items()}
    for name, pred in preds.items():
        rho, constant_truth, constant_pred = _spearman_and_validity(pred, target)
        per_query[name], valid[name] = rho, ~(constant_truth | constant_pred)
        constant[name] = (constant_truth, constant_pred)
    live = [name for name in named if valid[name].any()]
    if live and num_bootstrap:
        reps = bootstrap_spearman([preds[n] for n in live], target, rows)
        boots = dict(zip(live, reps, strict=True))
    for name in named:
        rho, ok = per_query[name], valid[name]
        constant_truth, constant_pred = constant[name]
        boots.setdefault(name, None)
        mean = float(rho[ok].mean()) if ok.any() else math.nan
        lo = hi = math.nan
        if boots[name] is not None and num_bootstrap:
            lo, hi, _ = bootstrap_interval(
                mean, resampled_means(boots[name], weights, ok), confidence, method
            )
        results[name] = LDSResult(
            per_query=torch.as_tensor(rho, device="cpu"),
            mean=mean,
            ci_low=lo,
            ci_high=hi,
            constant_queries=np.flatnonzero(constant_truth).tolist(),
            constant_predictions=np.flatnonzero(constant_pred).tolist(),
            **settings,
        )

    differences = {}
    names = list(named)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = valid[a] & valid[b]
            diff = np.where(both, per_query[a] - per_query[b], np.nan)
            mean = float(diff[both].mean()) if both.any() else math.nan
            lo = hi = p = math.nan
            if both.any() and num_bootstrap:
                reps = resampled_means(boots[a] - boots[b], weights, both)
                lo, hi, p = bootstrap_interval(mean, reps, confidence, method)
            differences[(a, b)] = LDSDifference(
                a=a,
                b=b,
                per_query=torch.as_tensor(diff, device="cpu"),
                mean=mean,
                ci_low=lo,
                ci_high=hi,
                p_value=p,
                num_valid=int(both.sum()),
                **settings,
            )
    constant_truth = np.ptp(target, axis=0) == 0
    if constant_truth.sum() > CONSTANT_TRUTH_FRACTION * len(constant_truth):
        warnings.warn(
            f"{int(constant_truth.sum())} of {len(constant_truth)} queries have the same ground "
            f"truth on every subset and are left out of the LDS: {SATURATED_HINT}.",
            UserWarning,
            stacklevel=3,
        )
    return LDSComparison(results=results, differences=differences)


def lds(
    scores: torch.Tensor,
    masks: torch.Tensor,
    truth: torch.Tensor,
    *,
    num_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    method: str = "centred",
) -> LDSResult:
    """Linear Datamodeling Score of ``scores`` against retrained ground truth.

    Args:
        scores: (Q, N) influence scores, positive = helps the query.
        masks: (M, N) boolean subset masks (:func:`make_subsets`).
        truth: (M, Q) measurement of the model retrained on each subset,
            lower is better (:attr:`curvinf.groundtruth.GroundTruth.truth`).
        num_bootstrap: resamples for the confidence interval of the mean, each drawing
            the ``M`` subsets and the ``Q`` queries with replacement
            (:func:`bootstrap_resamples`); 0 skips it (``ci_low = ci_high = nan``).
        seed: seed of the bootstrap resampling.
        confidence: coverage of the interval.
        method: interval method (:func:`bootstrap_interval`): ``"centred"`` (default),
            the percentile interval recentred on the estimate (the plain percentile
            interval sits below it because a resample's Spearman is biased low; the
            bias-correcting ``"bc"`` and ``"basic"`` overshoot above it), ``"percentile"``,
            ``"bc"`` or ``"basic"``.

    Returns:
        :class:`LDSResult`; ``per_query[q] = ρ_s(Σ_{m∈S_j} score[q, m], -truth[j, q])``
        over ``j``, and ``mean`` its average over the queries where it is defined.
        The same as ``lds_compare({name: scores}, ...).results[name]``.
    """
    return lds_compare(
        {"scores": scores},
        masks,
        truth,
        num_bootstrap=num_bootstrap,
        seed=seed,
        confidence=confidence,
        method=method,
    ).results["scores"]


def lds_difference(
    scores_a: torch.Tensor,
    scores_b: torch.Tensor,
    masks: torch.Tensor,
    truth: torch.Tensor,
    *,
    num_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    method: str = "centred",
    names: tuple[str, str] = ("a", "b"),
) -> LDSDifference:
    """Paired ``LDS(a) - LDS(b)`` of two score matrices with its bootstrap interval.

    :func:`lds_compare` of the two (shared resamples of subsets and queries); ``names``
    label them in the result. For many rungs call :func:`lds_compare` once: it computes
    each rung's resampled Spearman once for all pairs.
    """
    a, b = names
    if a == b:
        raise ValueError(f"names must differ, got {names!r}.")
    return lds_compare(
        {a: scores_a, b: scores_b},
        masks,
        truth,
        num_bootstrap=num_bootstrap,
        seed=seed,
        confidence=confidence,
        method=method,
    ).differences[(a, b)]


__all__ = [
    "BOOTSTRAP_METHODS",
    "LDSComparison",
    "LDSDifference",
    "LDSResult",
    "bootstrap_interval",
    "bootstrap_resamples",
    "bootstrap_spearman",
    "group_effects",
    "lds",
    "lds_compare",
    "lds_difference",
    "make_subsets",
    "resampled_means",
    "spearman_columns",
    "subset_size",
]

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
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import rankdata

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
    depend on ``num_subsets``. Same arguments, same masks.
    """
    if num_subsets < 2:
        raise ValueError(
            f"num_subsets must be >= 2 (a rank correlation needs two subsets), got {num_subsets}."
        )
    size = subset_size(n_train, alpha)
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num_subsets, n_train, dtype=torch.bool)
    for j in range(num_subsets):
        masks[j, torch.randperm(n_train, generator=generator)[:size]] = True
    return masks


@dataclass
class LDSResult:
    """The LDS of one score matrix against one ground truth.

    ``per_query``: (Q,) Spearman per query; NaN where it is undefined.
    ``mean``: the mean over the queries where it is defined.
    ``ci_low``, ``ci_high``: percentile bootstrap interval of ``mean``, resampling subsets.
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


def lds(
    scores: torch.Tensor,
    masks: torch.Tensor,
    truth: torch.Tensor,
    *,
    num_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> LDSResult:
    """Linear Datamodeling Score of ``scores`` against retrained ground truth.

    Args:
        scores: (Q, N) influence scores, positive = helps the query.
        masks: (M, N) boolean subset masks (:func:`make_subsets`).
        truth: (M, Q) measurement of the model retrained on each subset,
            lower is better (:attr:`curvinf.groundtruth.GroundTruth.truth`).
        num_bootstrap: resamples of the ``M`` subsets (with replacement) for the
            confidence interval of the mean; 0 skips it (``ci_low = ci_high = nan``).
        seed: seed of the bootstrap resampling.
        confidence: coverage of the percentile interval.

    Returns:
        :class:`LDSResult`; ``per_query[q] = ρ_s(Σ_{m∈S_j} score[q, m], -truth[j, q])``
        over ``j``, and ``mean`` its average over the queries where it is defined.
    """
    scores, masks, truth = torch.as_tensor(scores), torch.as_tensor(masks), torch.as_tensor(truth)
    if scores.ndim != 2 or masks.ndim != 2 or truth.ndim != 2:
        raise ValueError(
            f"need scores (Q, N), masks (M, N) and truth (M, Q); got shapes "
            f"{tuple(scores.shape)}, {tuple(masks.shape)}, {tuple(truth.shape)}."
        )
    (Q, N), (M, Nm), (Mt, Qt) = scores.shape, masks.shape, truth.shape
    if N != Nm or M != Mt or Q != Qt:
        raise ValueError(
            f"shapes disagree: scores {tuple(scores.shape)} is (Q, N), masks "
            f"{tuple(masks.shape)} is (M, N), truth {tuple(truth.shape)} is (M, Q); pass the "
            "masks the ground truth was built with and scores for the same queries."
        )
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be a boolean tensor, got {masks.dtype}.")
    if M < 2:
        raise ValueError(f"need at least 2 subsets, got {M}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    if num_bootstrap < 0:
        raise ValueError(f"num_bootstrap must be >= 0, got {num_bootstrap}.")
    check_finite("scores", scores)
    check_finite("truth", truth)

    pred = group_effects(scores, masks).numpy()
    target = -truth.to(torch.float64).numpy()
    per_query = spearman_columns(pred, target)
    constant_truth = np.ptp(target, axis=0) == 0
    constant_pred = (np.ptp(pred, axis=0) == 0) & ~constant_truth
    valid = ~(constant_truth | constant_pred)
    mean = float(per_query[valid].mean()) if valid.any() else math.nan

    ci_low = ci_high = math.nan
    if num_bootstrap and valid.any():
        rng = np.random.default_rng(seed)
        means = []
        pv, tv = pred[:, valid], target[:, valid]
        chunk = max(1, int(2e7 // max(1, M * pv.shape[1])))
        for start in range(0, num_bootstrap, chunk):
            rows = rng.integers(0, M, size=(min(chunk, num_bootstrap - start), M))
            rho = spearman_columns(pv[rows], tv[rows])  # (b, Q')
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resample
                means.append(np.nanmean(rho, axis=1))
        means = np.concatenate(means)
        means = means[np.isfinite(means)]
        if len(means):
            tail = 100 * (1 - confidence) / 2
            ci_low, ci_high = (float(v) for v in np.percentile(means, [tail, 100 - tail]))

    if constant_truth.sum() > CONSTANT_TRUTH_FRACTION * len(constant_truth):
        warnings.warn(
            f"{int(constant_truth.sum())} of {len(constant_truth)} queries have the same ground "
            f"truth on every subset and are left out of the LDS: {SATURATED_HINT}.",
            UserWarning,
            stacklevel=2,
        )
    return LDSResult(
        per_query=torch.as_tensor(per_query),
        mean=mean,
        ci_low=ci_low,
        ci_high=ci_high,
        constant_queries=np.flatnonzero(constant_truth).tolist(),
        constant_predictions=np.flatnonzero(constant_pred).tolist(),
        confidence=confidence,
        num_bootstrap=num_bootstrap,
    )


__all__ = ["LDSResult", "group_effects", "lds", "make_subsets", "spearman_columns", "subset_size"]

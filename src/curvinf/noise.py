"""Retraining-seed noise of an LDS ground truth, and the LDS ceiling it imposes.

The ground truth measures every query on ``M`` subsets with ``R`` retraining seeds
each: ``measurements`` (M, R, Q) (:attr:`curvinf.groundtruth.GroundTruth.measurements`),
averaged over seeds into ``truth`` (M, Q). Per query, a one-way random-effects view:

    y[j, r] = s[j] + e[j, r],   Var(s) = signal (across subsets), Var(e) = seed noise

- ``truth_var``: variance across subsets of the seed mean, ``Var_j(ȳ[j])``; its
  expectation is ``signal + seed_var / R``.
- ``seed_var``: within-subset variance across seeds, averaged over subsets.
- ``signal_var = max(truth_var - seed_var / R, 0)``: the unbiased (ANOVA) estimate of
  the variance a perfect predictor could explain.
- ``ceiling`` (Pearson): the correlation of a perfect predictor of ``s`` with the
  R-averaged truth, ``sqrt(signal / (signal + seed_var / R)) = sqrt(signal_var /
  truth_var)``. ``ceiling_spearman``: the same for Spearman under normality,
  ``(6/π) asin(ceiling / 2)``; LDS (mean Spearman) cannot be expected above it.

All variances use ``ddof=1``. ``R = 1`` leaves seed noise unmeasurable: every
statistic is NaN and ``reason`` says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from curvinf.devices import device_of
from curvinf.validation import check_finite


@dataclass
class SeedNoise:
    """Seed-noise statistics of one ground truth (:func:`seed_noise`).

    Per query, (Q,) float64 tensors: ``truth_var``, ``seed_var``, ``signal_var``,
    ``ratio`` (``truth_var / seed_var``, as the health check compares them),
    ``snr`` (``signal_var / (seed_var / R)``: signal against the noise left in the seed
    mean), ``ceiling`` and ``ceiling_spearman`` (see :mod:`curvinf.noise`). NaN where the
    query's truth is constant across subsets (``truth_var = 0``: no ranking); ``inf`` in
    the ratios where a query has no seed noise.

    Summaries over the queries where they are defined (``nanmean``):
    ``mean_truth_var``, ``mean_seed_var``, ``mean_ceiling``, ``mean_ceiling_spearman``;
    ``noise_dominated``: the share of queries whose seed-mean noise ``seed_var / R``
    exceeds ``signal_var`` (ceiling below ``sqrt(1/2)``).
    ``reason``: why everything is NaN (``R < 2``), else None.
    """

    num_subsets: int
    num_seeds: int
    num_queries: int
    truth_var: torch.Tensor
    seed_var: torch.Tensor
    signal_var: torch.Tensor
    ratio: torch.Tensor
    snr: torch.Tensor
    ceiling: torch.Tensor
    ceiling_spearman: torch.Tensor
    mean_truth_var: float
    mean_seed_var: float
    mean_ceiling: float
    mean_ceiling_spearman: float
    noise_dominated: float
    reason: str | None = None

    def summary(self) -> dict[str, float | int | str | None]:
        """The scalar statistics, JSON-ready (NaN as None)."""
        out: dict[str, float | int | str | None] = {
            "num_subsets": self.num_subsets,
            "num_seeds": self.num_seeds,
            "num_queries": self.num_queries,
        }
        for key in (
            "mean_truth_var",
            "mean_seed_var",
            "mean_ceiling",
            "mean_ceiling_spearman",
            "noise_dominated",
        ):
            value = getattr(self, key)
            out[key] = None if math.isnan(value) else value
        out["reason"] = self.reason
        return out

    def __str__(self) -> str:
        if self.reason:
            return f"seed noise: not measured ({self.reason})"
        return (
            f"seed noise over {self.num_seeds} seeds: truth variance {self.mean_truth_var:.4g}, "
            f"seed variance {self.mean_seed_var:.4g}; LDS ceiling {self.mean_ceiling_spearman:.3f} "
            f"(Pearson {self.mean_ceiling:.3f}); {100 * self.noise_dominated:.0f}% of queries "
            "dominated by seed noise"
        )


def _nanmean(x: torch.Tensor) -> float:
    finite = x[torch.isfinite(x)]
    return float(finite.mean()) if len(finite) else math.nan


def seed_noise(measurements: torch.Tensor) -> SeedNoise:
    """Seed-noise statistics of ``measurements`` (M, R, Q): see :class:`SeedNoise`.

    Needs ``M >= 2``; ``R = 1`` gives NaN statistics with a ``reason``, not an error.
    """
    measurements = torch.as_tensor(measurements, device=device_of(measurements))
    if measurements.ndim != 3:
        raise ValueError(
            f"measurements must be (M subsets, R seeds, Q queries), got shape "
            f"{tuple(measurements.shape)}."
        )
    M, R, Q = measurements.shape
    if M < 2 or R < 1 or Q < 1:
        raise ValueError(
            f"need at least 2 subsets, 1 seed and 1 query, got measurements of shape "
            f"{tuple(measurements.shape)}."
        )
    check_finite("measurements", measurements)
    y = measurements.to(torch.float64)
    truth_var = y.mean(1).var(0)  # (Q,)
    if R < 2:
        nan = torch.full((Q,), math.nan, dtype=torch.float64, device=y.device)
        return SeedNoise(
            M, R, Q, truth_var, nan, nan, nan, nan, nan, nan,
            _nanmean(truth_var), math.nan, math.nan, math.nan, math.nan,
            reason="one retraining seed per subset: seed noise needs num_seeds >= 2",
        )  # fmt: skip
    seed_var = y.var(1).mean(0)  # (Q,)
    noise = seed_var / R  # variance of the seed mean
    signal_var = (truth_var - noise).clamp(min=0.0)
    defined = truth_var > 0
    nan = torch.tensor(math.nan, dtype=torch.float64, device=y.device)
    ceiling = torch.where(defined, (signal_var / truth_var.where(defined, 1.0)).sqrt(), nan)
    ceiling_spearman = 6 / math.pi * torch.asin(ceiling / 2)
    dominated = (noise > signal_var)[defined]
    return SeedNoise(
        num_subsets=M,
        num_seeds=R,
        num_queries=Q,
        truth_var=truth_var,
        seed_var=seed_var,
        signal_var=signal_var,
        ratio=torch.where(defined, truth_var / seed_var, nan),
        snr=torch.where(defined, signal_var / noise, nan),
        ceiling=ceiling,
        ceiling_spearman=ceiling_spearman,
        mean_truth_var=_nanmean(truth_var),
        mean_seed_var=_nanmean(seed_var),
        mean_ceiling=_nanmean(ceiling),
        mean_ceiling_spearman=_nanmean(ceiling_spearman),
        noise_dominated=float(dominated.double().mean()) if len(dominated) else math.nan,
    )


__all__ = ["SeedNoise", "seed_noise"]

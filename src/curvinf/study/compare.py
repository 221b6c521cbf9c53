"""Paired comparisons of the rungs and the ground truth's noise, for one configuration.

Rungs are ranked by a *paired* comparison (:func:`curvinf.lds.lds_compare`): every
bootstrap resample draws subsets and queries once and scores every rung on it, so the
difference ``LDS(a) − LDS(b)`` has its own interval, much narrower than two overlapping
per-rung intervals would suggest when the rungs' errors are correlated. The seed-noise
figures (:func:`curvinf.noise.seed_noise`) say how much of the truth is retraining noise
and the LDS a perfect predictor could reach against it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from curvinf.groundtruth import GroundTruth
from curvinf.lds import lds_compare
from curvinf.noise import seed_noise
from curvinf.study.rungs import EXACT
from curvinf.study.specs import RunConfig, reg_label


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def noise_summary(gt: GroundTruth) -> dict[str, Any]:
    """Seed-noise figures of the ground truth (NaN with a reason for one retraining)."""
    noise = seed_noise(gt.measurements)
    share = noise.seed_var / noise.num_seeds / noise.truth_var  # noise share of truth variance
    ratio = share[torch.isfinite(share)]
    return {
        "num_seeds": noise.num_seeds,
        "noise_ratio": float(ratio.mean()) if len(ratio) else math.nan,
        "ceiling": noise.mean_ceiling,
        "ceiling_spearman": noise.mean_ceiling_spearman,
        "noise_dominated": noise.noise_dominated,
        "mean_truth_var": noise.mean_truth_var,
        "mean_seed_var": noise.mean_seed_var,
        "reason": noise.reason,
    }


def config_comparisons(
    config: RunConfig, gt: GroundTruth, blobs: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """``{"comparisons": rows of COMPARISON_COLUMNS, "lds_intervals": {rule: {rung: (lo,
    hi)}}, "seed_noise": noise_summary}``.

    Per regulariser, every pair of rungs whose scores are certified (status ``exact``) is
    compared on shared resamples, and each rung's LDS interval comes from the same
    resamples; a rung with ``unconverged`` scores is left out of both.
    """
    rows: list[dict[str, Any]] = []
    intervals: dict[str, dict[str, tuple[float | None, float | None]]] = {}
    for reg in config.regularizations:
        label = reg_label(reg)
        scores = {
            rung: blob["per_reg"][label]["scores"].double()
            for rung, blob in blobs.items()
            if blob.get("per_reg", {}).get(label, {}).get("status") == EXACT
            and "scores" in blob["per_reg"][label]
        }
        if not scores:
            continue
        comparison = lds_compare(
            scores,
            gt.masks,
            gt.truth,
            num_bootstrap=config.lds.num_bootstrap,
            seed=config.lds.seed,
        )
        intervals[label] = {
            rung: (_finite(r.ci_low), _finite(r.ci_high)) for rung, r in comparison.results.items()
        }
        for (a, b), d in comparison.differences.items():
            rows.append(
                {
                    "config": config.id,
                    "depth": config.depth,
                    "width": config.width,
                    "epochs": config.epochs,
                    "seed": config.seed,
                    "reg": label,
                    "rung_a": a,
                    "rung_b": b,
                    "difference": _finite(d.mean),
                    "ci_low": _finite(d.ci_low),
                    "ci_high": _finite(d.ci_high),
                    "p_value": _finite(d.p_value),
                    "queries": d.num_valid,
                    "method": d.method,
                }
            )
    return {"comparisons": rows, "lds_intervals": intervals, "seed_noise": noise_summary(gt)}


__all__ = ["config_comparisons", "noise_summary"]

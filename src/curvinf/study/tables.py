"""The study's tables on disk: column lists, writing and reading them, collecting the rows
of finished configurations. No curvature code: the report reads results through this.

Result directory of a grid (``out``)::

    out/
      grid.json                       the preset that was run
      results.csv, results.jsonl      one row per configuration x regularisation x rung
      comparisons.csv, .jsonl         paired LDS differences of rungs, per configuration x rule
      run_log.jsonl                   one line per invocation: what ran, how long
      groundtruth/<store>/            LDS ground truth stores (resumable)
      runs/<config id>/
        config.json                   the configuration
        model.pt                      the scored model: the ground truth's base model
        rungs/<rung>.pt               per rung: fit, spectrum, scores, LDS, errors (large)
        rungs/gram/<rung>/            Gram factorisations (memory-mapped), until rows.json
        diagnostics.json              shares, distances, overlap curves, noise, comparisons
        rows.json                     the configuration's rows; its presence marks it done
        timing.json                   wall seconds of the configuration
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from curvinf import storage
from curvinf.storage import read_json

COLUMNS = (
    "config",
    "dataset",
    "depth",
    "width",
    "epochs",
    "seed",
    "num_params",
    "rung",
    "reg",
    "damping",
    "eps",
    "relative",
    "route",
    "status",
    "reason",
    "lds",
    "lds_ci_low",
    "lds_ci_high",
    "lds_queries",
    "inverse_error",
    "inverse_error_se",
    "influence_error",
    "curvature_error",
    "curvature_error_se",
    "step",
    "share_inverse",
    "share_influence",
    "adjacent_inverse",
    "adjacent_inverse_se",
    "adjacent_influence",
    "adjacent_curvature",
    "adjacent_curvature_se",
    "decomposition_flags",
    "rank",
    "fit_seconds",
    "score_seconds",
    "off_block_mass",
    "off_block_mass_se",
    "negative_eigenvalues",
    "spectrum_mismatch",
    "overlap_k10",
    "base_train_loss",
    "base_query_loss",
    "base_query_accuracy",
    "retrained_train_loss",
    "num_subsets",
    "num_seeds",
    "alpha",
    "matched_steps",
    "seed_noise_ratio",
    "lds_ceiling",
    "gt_warnings",
    "config_seconds",
)
"""Columns of the results table, one row per configuration x regularisation x rung.

``route``/``status``: how the rung's inverse was computed (:mod:`curvinf.study.rungs`) and
whether its answer is certified (``exact``, ``unconverged`` with figures in ``reason``,
``unavailable``). ``inverse_error``/``influence_error``: against the reference rung
(the Hessian) under the same rule; ``*_se`` the standard error where the value is a
randomised estimate (0 when exact). ``curvature_error``: ``‖C̃ − H‖_F / ‖H‖_F``, no
inverse. ``step``/``share_*``: the ladder step that *ends* at this rung and its share of
the total error gap. ``adjacent_*``: the distance from the previous rung of the ladder
(inverse space and curvature space normalised by the Hessian's, influence space by the
Hessian's scores). ``decomposition_flags``: why the configuration's decomposition is
ill-conditioned, if it is. ``off_block_mass``: of the dense rung itself (hessian, ggn
rows). ``seed_noise_ratio``: mean over queries of the retraining-seed variance of the
truth over its variance across subsets; ``lds_ceiling``: the LDS a perfect predictor
would reach against this noisy truth (NaN with one retraining). ``config_seconds``: wall
time of the configuration (ground truth included when this run built it)."""

COMPARISON_COLUMNS = (
    "config",
    "depth",
    "width",
    "epochs",
    "seed",
    "reg",
    "rung_a",
    "rung_b",
    "difference",
    "ci_low",
    "ci_high",
    "p_value",
    "queries",
    "method",
)
"""Columns of the paired comparison table: LDS(rung_a) − LDS(rung_b) on shared
bootstrap resamples of subsets and queries."""


def write_table(rows: list[dict[str, Any]], out: str | Path, stem: str = "results") -> Path:
    """``out/<stem>.csv`` and ``.jsonl`` (atomic); returns the CSV path."""
    columns = COMPARISON_COLUMNS if stem == "comparisons" else COLUMNS
    return storage.write_table(rows, columns, out, stem)[0]


def read_table(out: str | Path, stem: str = "results") -> list[dict[str, Any]]:
    """The rows of ``out/<stem>.jsonl``."""
    path = Path(out) / f"{stem}.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; run `curvinf reproduce --out {out}` first."
        )
    return storage.read_jsonl(path)


def run_dir(out: str | Path, config_id: str) -> Path:
    """Where configuration ``config_id`` of a grid in ``out`` keeps its files."""
    return Path(out) / "runs" / config_id


def collect(out: str | Path, config_ids: list[str], name: str = "rows") -> list[dict[str, Any]]:
    """The ``name`` records (``rows`` or ``comparisons``) of every finished configuration
    among ``config_ids``, in that order."""
    records: list[dict[str, Any]] = []
    for cid in config_ids:
        d = run_dir(out, cid)
        if (d / "rows.json").exists():
            if name == "rows":
                records += read_json(d / "rows.json")
            elif (d / "diagnostics.json").exists():
                records += read_json(d / "diagnostics.json").get(name, [])
    return records


__all__ = [
    "COLUMNS",
    "COMPARISON_COLUMNS",
    "collect",
    "read_table",
    "run_dir",
    "write_table",
]

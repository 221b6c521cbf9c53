"""The damping-vs-truncation sweep: columns, reasons for missing LDS, resume, settings."""

from __future__ import annotations

import math

import pytest
import torch

from curvinf.study.sweep import COLUMNS, SweepSettings, plot_sweep, read_rows, row_key, run_sweep

TINY = dict(
    depth=1,
    width=6,
    epochs=3,
    subsets=5,
    seeds=1,
    num_queries=8,
    eps_grid=(1e-6, 1e-2),
    damping_grid=(1e-6, 1e-2),
    cg_damping=(1e-2,),
    cg_queries=2,
    cg_max_iter=200,
    num_bootstrap=20,
)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sweep")
    settings = SweepSettings(**TINY)
    rows = run_sweep(settings, out, progress=False, log=lambda msg: None)
    return settings, out, rows


def test_table_columns_and_rows(swept):
    settings, out, rows = swept
    rungs = len(settings.rungs)
    assert len(rows) == rungs * len(settings.grid()) + len(settings.cg_damping)
    assert read_rows(out) == [{c: r.get(c) for c in COLUMNS} for r in rows]
    header = (out / "sweep.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == COLUMNS
    for r in rows:
        assert set(r) <= set(COLUMNS)
        lds = r.get("lds")
        assert (lds is not None and math.isfinite(lds)) or r["reason"], r
        if r["grid"] == "eps":
            assert r["damping"] == 0.0 and r["eps"] > 0
        if r["grid"] == "damping":
            assert r["eps"] == 0.0 and r["damping"] > 0
    hess_eps = [r for r in rows if r["rung"] == "hessian" and r["grid"] == "eps"]
    assert all(r["inverse_error"] == 0.0 for r in hess_eps)
    cg = [r for r in rows if r["grid"] == "cg"]
    assert cg and all(r["cg_iterations_max"] >= 1 for r in cg)
    assert all(r["cg_error_vs_dense"] < 1e-3 for r in cg if r["cg_converged"] == r["cg_queries"])


def test_rerun_skips_finished_rows(swept, tmp_path):
    settings, out, rows = swept
    stamp = (out / "sweep.jsonl").stat().st_mtime_ns
    again = run_sweep(settings, out, progress=False, log=lambda msg: None)
    assert [row_key(r) for r in again] == [row_key(r) for r in rows]
    assert (out / "sweep.jsonl").stat().st_mtime_ns == stamp  # nothing recomputed
    # a wider grid adds only the new rows
    wider = SweepSettings(**{**TINY, "eps_grid": (1e-6, 1e-4, 1e-2)})
    more = run_sweep(wider, out, progress=False, log=lambda msg: None)
    assert len(more) == len(rows) + len(settings.rungs)
    assert {row_key(r) for r in rows} <= {row_key(r) for r in more}
    paths = plot_sweep(more, tmp_path)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)


def test_other_configuration_refused(swept):
    _, out, _ = swept
    with pytest.raises(ValueError, match="another configuration"):
        run_sweep(SweepSettings(**{**TINY, "width": 7}), out, progress=False)


@pytest.mark.parametrize(
    "bad",
    [
        {"eps_grid": ()},
        {"damping_grid": (0.0, 1e-3)},
        {"subsets": 1},
        {"rungs": ("nope",)},
        {"cg_tol": 2.0},
        {"relative": True, "eps_grid": (1.5,)},
    ],
)
def test_settings_validated(bad):
    with pytest.raises(ValueError):
        SweepSettings(**{**TINY, **bad})

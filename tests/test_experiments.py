"""The grid runner end to end on a tiny grid: table columns, an LDS for every rung, resume,
skipped rungs, and preset validation."""

from __future__ import annotations

import json
import math

import pytest

import curvinf.study as ex
import curvinf.study.rungs as rungs_mod
from curvinf import LADDER, Regularization, TrainingRecipe
from curvinf.storage import read_blob
from curvinf.study import (
    COLUMNS,
    PRESETS,
    LDSSettings,
    Preset,
    RunConfig,
    read_table,
    run_grid,
)

TINY = Preset(
    name="tiny",
    depths=(1,),
    widths=(4,),
    epochs=(1,),
    recipe=TrainingRecipe(lr=0.05, batch_size=128),
    regularizations=(Regularization(), Regularization(damping=1e-3, eps=1e-6)),
    lds=LDSSettings(num_subsets=6, num_queries=12, num_bootstrap=50),
)


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    result = run_grid(TINY, out, progress=False)
    return out, result


def test_table_columns_and_every_rung_has_an_lds(grid_dir):
    out, result = grid_dir
    rows = read_table(out)
    assert rows == json.loads(json.dumps(result.rows))
    assert all(tuple(r) == COLUMNS for r in rows)
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header.split(",") == list(COLUMNS)
    assert len(rows) == len(LADDER) * 2  # configs x rungs x regularisations
    for r in rows:
        assert r["status"] == "exact", r["reason"]
        assert math.isfinite(r["lds"]) and -1 <= r["lds"] <= 1
        assert r["lds_ci_low"] <= r["lds_ci_high"]
        assert math.isfinite(r["inverse_error"]) and math.isfinite(r["influence_error"])
    hess = [r for r in rows if r["rung"] == "hessian"]
    assert all(r["inverse_error"] == 0.0 and r["step"] == "" for r in hess)
    assert all(math.isfinite(r["off_block_mass"]) for r in hess)
    # Shares of the four steps sum to 1 per configuration and regularisation.
    for config in {r["config"] for r in rows}:
        for reg in {r["reg"] for r in rows}:
            shares = [
                r["share_inverse"]
                for r in rows
                if r["config"] == config and r["reg"] == reg and r["step"]
            ]
            assert len(shares) == 4 and sum(shares) == pytest.approx(1.0)
    diag = json.loads((out / "runs" / rows[0]["config"] / "diagnostics.json").read_text())
    assert set(diag["basis_overlap"]) == {"ekfac", "kfac"}
    assert len((out / "run_log.jsonl").read_text().splitlines()) == 1


def test_rerun_skips_finished_work(grid_dir, monkeypatch):
    out, first = grid_dir

    def boom(*args, **kwargs):
        raise AssertionError("a finished configuration was recomputed")

    monkeypatch.setattr(rungs_mod, "fit_curvature", boom)
    monkeypatch.setattr("curvinf.groundtruth.train", boom)
    again = run_grid(TINY, out, progress=False)
    assert [e["state"] for e in again.log] == ["done"]
    assert again.rows == first.rows


def test_interrupted_configuration_resumes_the_missing_rung(grid_dir, monkeypatch):
    out, first = grid_dir
    config = TINY.configs()[0]
    run_dir = out / "runs" / config.id
    (run_dir / "rows.json").unlink()  # as if killed before the end
    (run_dir / "rungs" / "kfac.pt").unlink()
    fitted = []
    real = rungs_mod.fit_curvature

    def counting(method, *args, **kwargs):
        fitted.append(method)
        return real(method, *args, **kwargs)

    monkeypatch.setattr(rungs_mod, "fit_curvature", counting)
    again = run_grid(TINY, out, progress=False)
    # kfac, the reference for its errors, and what its diagnostics compare it with.
    assert sorted(fitted) == ["block_ggn", "ekfac", "hessian", "kfac"]
    assert [r["lds"] for r in again.rows] == pytest.approx([r["lds"] for r in first.rows])


def _routes_preset(cap: float) -> Preset:
    """Diabetes (353 training rows, one output: a Gram matrix of 353 rows), D = 49."""
    return Preset(
        name="routes",
        dataset="diabetes",
        depths=(1,),
        widths=(4,),
        epochs=(3,),
        recipe=TrainingRecipe(lr=0.01, batch_size=64),
        regularizations=(Regularization.paper(), Regularization(damping=1e-3, eps=1e-4)),
        lds=LDSSettings(num_subsets=8, num_queries=16, num_bootstrap=50),
        max_dense_bytes=cap,
        solver_tol=1e-13,
        solver_max_iter=400,
        lanczos_k=60,
    )


def test_matrix_free_routes_match_the_dense_run(tmp_path):
    """A tiny memory cap sends the Hessian, GGN and block-GGN through the matrix-free
    routes (Lanczos or GGN-preconditioned CG, Gram); every number matches the dense run."""
    dense = run_grid(_routes_preset(2**30), tmp_path / "dense", progress=False).rows
    free = run_grid(_routes_preset(8.0 * 20**2), tmp_path / "free", progress=False).rows
    assert len(dense) == len(free) == 10
    by = {(r["rung"], r["reg"]): r for r in free}
    for d in dense:
        f = by[(d["rung"], d["reg"])]
        assert d["status"] == f["status"] == "exact", (f["rung"], f["reason"])
        if d["rung"] in ("kfac", "ekfac"):
            assert d["route"] == f["route"] == "kronecker"
        else:
            assert d["route"] == "eigen"
            allowed = {
                "hessian": ("lanczos", "ggn-cg"),
                "ggn": ("gram",),
                "block_ggn": ("gram", "eigen+gram"),  # the 5-parameter block fits densely
            }
            assert f["route"] in allowed[d["rung"]]
        assert f["lds"] == pytest.approx(d["lds"], abs=1e-8)
        assert f["influence_error"] == pytest.approx(d["influence_error"], abs=1e-8)
        # inverse-space errors of matrix-free routes are Hutch++ estimates with an SE
        se = f["inverse_error_se"]
        assert abs(f["inverse_error"] - d["inverse_error"]) <= 4 * se + 1e-8
        # adjacent distances: exact numerators where both rungs have eigen forms, else
        # Hutch++ on the difference alone, over a once-measured ‖H⁺‖_F
        for key in ("adjacent_inverse", "adjacent_curvature"):
            if d["rung"] != "hessian":
                assert math.isfinite(d[key]) and math.isfinite(f[key]), (d["rung"], key)
                assert abs(f[key] - d[key]) <= 4 * f[f"{key}_se"] + 1e-8, (d["rung"], key)
    for rung in ("hessian", "ggn", "block_ggn", "kfac"):
        a = read_blob(next((tmp_path / "dense" / "runs").iterdir()) / "rungs" / f"{rung}.pt")
        b = read_blob(next((tmp_path / "free" / "runs").iterdir()) / "rungs" / f"{rung}.pt")
        for label, entry in a["per_reg"].items():
            sa, sb = entry["scores"].double(), b["per_reg"][label]["scores"].double()
            assert float((sa - sb).norm() / sa.norm()) < 1e-6  # float32 storage


@pytest.mark.parametrize("partition", ["layer", "tensor"])
def test_composite_block_route_matches_the_dense_run(tmp_path, partition):
    """A cap that holds the small blocks but not the whole block-GGN: small blocks dense,
    the large one by the Gram route (route eigen+gram), same numbers as all-dense."""
    from dataclasses import replace

    base = replace(
        _routes_preset(2**30),
        widths=(12,),
        partition=partition,
        rungs=("hessian", "block_ggn"),
        lanczos_k=200,
    )
    dense = run_grid(base, tmp_path / "dense", progress=False).rows
    # blocks: 11*12 (+12) = 144 / 132+12, 13 / 12+1: the cap holds all but the largest
    free = run_grid(
        replace(base, max_dense_bytes=8.0 * 100**2), tmp_path / "free", progress=False
    ).rows
    by = {(r["rung"], r["reg"]): r for r in free}
    for d in dense:
        if d["rung"] != "block_ggn":
            continue
        f = by[(d["rung"], d["reg"])]
        assert f["route"] == "eigen+gram" and f["status"] == "exact", f["reason"]
        assert f["lds"] == pytest.approx(d["lds"], abs=1e-8)
        assert f["influence_error"] == pytest.approx(d["influence_error"], abs=1e-8), [
            (r["rung"], r["reg"], r["route"], r["status"], r["reason"]) for r in free
        ]
        assert abs(f["inverse_error"] - d["inverse_error"]) <= 4 * f["inverse_error_se"] + 1e-8


def test_presets_are_valid_and_paper_is_the_full_grid():
    paper = PRESETS["paper"]
    assert paper.depths == (1, 4, 8) and paper.widths == (32, 64, 128)
    assert paper.epochs == (10, 100, 1000) and paper.rungs == LADDER
    assert paper.lds.alpha == 0.5 and paper.lds.num_subsets == 100
    assert len(paper.configs()) == 27
    assert set(PRESETS["quick"].configs()) <= set(paper.configs()) or all(
        c.depth in paper.depths and c.width in paper.widths and c.epochs in paper.epochs
        for c in PRESETS["quick"].configs()
    )
    assert Preset.from_dict(json.loads(json.dumps(paper.to_dict()))) == paper


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depths": ()}, "depths must not be empty"),
        ({"widths": (0,)}, "widths must be integers >= 1"),
        ({"epochs": (10, 10)}, "duplicates"),
        ({"rungs": ("hessian", "magic")}, "unknown rung"),
    ],
)
def test_preset_validation(kwargs, match):
    base = {"name": "x", "depths": (1,), "widths": (4,), "epochs": (1,)}
    with pytest.raises(ValueError, match=match):
        Preset(**{**base, **kwargs})
    with pytest.raises(ValueError, match="alpha"):
        LDSSettings(alpha=1.5)
    with pytest.raises(ValueError, match="preset"):
        ex.get_preset("huge")


def test_config_id_changes_with_settings():
    a = RunConfig(depth=1, width=4, epochs=1)
    b = RunConfig(depth=1, width=4, epochs=1, lds=LDSSettings(num_subsets=7))
    assert a.id.startswith("d1-w4-e1-s0-") and a.id != b.id


def test_report_tables_and_figures(grid_dir):
    from curvinf.study.report import RUNG_COLORS, write_report

    out, _ = grid_dir
    path = write_report(out)
    text = path.read_text()
    headings = ("LDS per rung", "Approximation error", "Share of the error gap", "Diagnostics")
    for heading in (*headings, "quantitative claims by depth and by epochs"):
        assert heading in text
    for name in (
        "lds_by_setting",
        "lds_vs_error",
        "error_shares",
        "off_block_mass",
        "basis_overlap",
        "spectra",
    ):
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{name}.png" in text
    assert len(set(RUNG_COLORS.values())) == len(RUNG_COLORS)


def test_cli_report_and_reproduce_help(grid_dir):
    from typer.testing import CliRunner

    from curvinf.cli import app

    out, _ = grid_dir
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    assert "report.md" in res.output
    res = runner.invoke(app, ["reproduce", "--help"])
    assert res.exit_code == 0 and "--preset" in res.output and "--workers" in res.output


@pytest.mark.slow
def test_parallel_workers_match_sequential(tmp_path):
    from dataclasses import replace

    two = replace(TINY, epochs=(1, 2), regularizations=(Regularization(),))
    seq = run_grid(two, tmp_path / "seq", progress=False)
    par = run_grid(two, tmp_path / "par", workers=2, progress=False)
    assert sorted(e["state"] for e in par.log) == ["done", "done"]
    key = lambda r: (r["config"], r["rung"])  # noqa: E731
    for a, b in zip(sorted(seq.rows, key=key), sorted(par.rows, key=key), strict=True):
        assert key(a) == key(b) and a["lds"] == pytest.approx(b["lds"])


def test_time_budget_starts_nothing_after_the_deadline(tmp_path):
    result = run_grid(TINY, tmp_path, max_minutes=0.0, progress=False)
    assert [e["state"] for e in result.log] == ["not started (time budget)"]
    assert result.rows == [] and read_table(tmp_path) == []

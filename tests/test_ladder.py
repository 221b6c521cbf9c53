"""``measure_ladder``: the study's rows for a model the user brings, checked against
dense float64 references built here (``tests/references.py``) and against the rungs'
own scores through the public API."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from references import flat_fn, ref_ggn, ref_hessian
from torch import nn

from curvinf import (
    GroundTruthConfig,
    Regularization,
    TrainingRecipe,
    fit_curvature,
    ground_truth,
    influence_scores,
    load_dataset,
)
from curvinf.study.ladder import LadderSettings, measure_ladder

DAMPED = Regularization(damping=1.0, eps=0.0)  # H + δI positive definite on this model


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = load_dataset("digits", seed=0)
    data = replace(
        d, X_train=d.X_train[:120], y_train=d.y_train[:120], X_query=d.X_query[:20],
        y_query=d.y_query[:20],
    )  # fmt: skip
    config = GroundTruthConfig(
        model=small_net, recipe=TrainingRecipe(epochs=20, lr=0.1, batch_size=32), num_subsets=8,
        num_seeds=2, matched_steps=True,
    )  # fmt: skip
    gt = ground_truth(data, config, tmp_path_factory.mktemp("gt"), progress=False)
    settings = LadderSettings(name="tanh-net", regularizations=(DAMPED,), num_bootstrap=50)
    return data, gt, settings, measure_ladder(gt, data, settings, progress=False)


def test_rows_for_every_rung_with_lds_of_its_own_scores(setup):
    data, gt, settings, result = setup
    assert [(r["rung"], r["config"]) for r in result.rows] == [
        (r, "tanh-net") for r in settings.rungs
    ]
    model, loss = gt.base_model(data), nn.CrossEntropyLoss()
    for row in result.rows:
        assert row["status"] == "exact" and row["depth"] is None
        curv = fit_curvature(row["rung"], model, loss, *data.train)
        scores = influence_scores(model, loss, curv.inverse(DAMPED), train=data.train,
                                  query=data.query)  # fmt: skip
        assert row["lds"] == pytest.approx(gt.lds(scores, num_bootstrap=0).mean, abs=1e-9)
    k = len(settings.rungs)
    assert len(result.comparisons) == k * (k - 1) // 2


def test_inverse_errors_equal_dense_references(setup):
    data, gt, _, result = setup
    model = gt.base_model(data).double()
    X, y = data.X_train.double(), data.y_train
    eye = torch.eye(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    H_inv = torch.linalg.inv(ref_hessian(model, "ce", X, y) + eye)
    G_inv = torch.linalg.inv(ref_ggn(model, "ce", X, y) + eye)
    by = {r["rung"]: r for r in result.rows}
    want = float(torch.linalg.norm(G_inv - H_inv) / torch.linalg.norm(H_inv))
    assert by["ggn"]["inverse_error"] == pytest.approx(want, rel=1e-8)
    assert by["hessian"]["inverse_error"] == 0.0
    f, theta = flat_fn(model)  # the rows' D is the model's
    assert by["ggn"]["num_params"] == theta.numel()
    assert math.isfinite(by["kfac"]["adjacent_inverse"])


def test_resumes_from_its_folder_and_refuses_other_data(setup, tmp_path, monkeypatch):
    data, gt, settings, result = setup
    first = measure_ladder(gt, data, settings, out=tmp_path, progress=False)
    assert (tmp_path / "results.csv").exists() and (tmp_path / "comparisons.csv").exists()
    from curvinf.study.report import write_report

    report = write_report(tmp_path).read_text()  # the one-model report
    assert "# curvinf ladder: `tanh-net`" in report and "hessian → ggn" in report
    assert report.count("| exact |") == len(first.rows)
    import curvinf.study.measure as measure

    def never(*args, **kwargs):
        raise AssertionError("a finished rung was measured again")

    monkeypatch.setattr(measure, "rung_result", never)
    again = measure_ladder(gt, data, settings, out=tmp_path, progress=False)
    keep = ("rung", "lds", "inverse_error", "influence_error", "adjacent_inverse")
    assert [{k: r[k] for k in keep} for r in again.rows] == [
        {k: r[k] for k in keep} for r in first.rows
    ]
    other = replace(data, X_query=data.X_query[:10], y_query=data.y_query[:10])
    with pytest.raises(ValueError, match="not the split"):
        measure_ladder(gt, other, settings, progress=False)
    with pytest.raises(ValueError, match="rung"):
        LadderSettings(rungs=("hessian", "nope"))


def norm_net() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 10))


@pytest.mark.filterwarnings("ignore::curvinf.groundtruth.RetrainingWarning")  # a tiny fit
def test_a_rung_that_does_not_apply_says_why_and_the_others_go_on(setup, tmp_path):
    data, _, _, _ = setup
    config = GroundTruthConfig(
        model=norm_net, recipe=TrainingRecipe(epochs=20, lr=0.1, batch_size=32), num_subsets=8,
        num_seeds=2, matched_steps=True,
    )  # fmt: skip
    gt = ground_truth(data, config, tmp_path, progress=False)
    base = {"regularizations": (DAMPED,), "num_bootstrap": 20}
    by = {r["rung"]: r for r in measure_ladder(gt, data, LadderSettings(**base)).rows}
    assert by["kfac"]["status"] == "unavailable" and "LayerNorm" in by["kfac"]["reason"]
    assert math.isnan(by["kfac"]["lds"]) and by["block_ggn"]["status"] == "exact"
    exact = measure_ladder(gt, data, LadderSettings(**base, uncovered="exact")).rows
    assert all(r["status"] == "exact" for r in exact)


def test_matrix_free_routes_give_the_dense_numbers(setup, tmp_path):
    """Above a tiny dense cap the GGN rungs take the Gram route (factors cached under
    ``out``) and the damped Hessian GGN-preconditioned CG: the same LDS as dense."""
    data, gt, settings, dense = setup
    small = LadderSettings(**{**settings.__dict__, "max_dense_bytes": 8.0 * 50**2})
    rows = measure_ladder(gt, data, small, out=tmp_path, progress=False).rows
    by, ref = {r["rung"]: r for r in rows}, {r["rung"]: r for r in dense.rows}
    assert by["ggn"]["route"] == "gram" and by["hessian"]["route"] == "ggn-cg"
    for rung in ("hessian", "ggn", "block_ggn"):
        assert by[rung]["status"] == "exact"
        assert by[rung]["lds"] == pytest.approx(ref[rung]["lds"], abs=1e-6)
    assert not (tmp_path / "rungs" / "gram" / "ggn").exists()  # released after use

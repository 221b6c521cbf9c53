"""LDS ground truth: the resumable store, its failure modes, health warnings, and LDS on digits."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from sigkill import kill_after_first_chunk
from torch import nn
from typer.testing import CliRunner

from curvinf.data import DataSplit, load_dataset
from curvinf.groundtruth import (
    GroundTruthConfig,
    RetrainingWarning,
    ground_truth,
    health_warnings,
)
from curvinf.lds import make_subsets
from curvinf.losses import example_measure
from curvinf.storage import CorruptFileError
from curvinf.training import TrainingRecipe, train

# The tiny setup trains for 2 epochs: its retrains are unconverged on purpose (fast).
pytestmark = pytest.mark.filterwarnings("ignore::curvinf.groundtruth.RetrainingWarning")


@pytest.fixture(autouse=True)
def one_thread():
    """Small models: one thread is faster, and far faster on a shared, loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_setup() -> tuple[DataSplit, GroundTruthConfig]:
    """300 training points, 30 queries, a one-hidden-layer MLP, 4 subsets x 2 seeds."""
    d = load_dataset("digits", seed=0)
    data = replace(
        d, X_train=d.X_train[:300], y_train=d.y_train[:300], X_query=d.X_query[:30],
        y_query=d.y_query[:30],
    )  # fmt: skip
    config = GroundTruthConfig(
        depth=1, width=8, recipe=TrainingRecipe(epochs=2, batch_size=32), num_subsets=4,
        num_seeds=2, alpha=0.5, seed=3,
    )  # fmt: skip
    return data, config


def build(store: Path, **kwargs):
    data, config = tiny_setup()
    kwargs.setdefault("models_per_chunk", 3)
    return ground_truth(data, config, store, progress=False, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted build, shared by the tests that compare against it."""
    return build(tmp_path_factory.mktemp("reference"))


def test_build_then_load_trains_nothing(reference):
    gt = reference
    data, config = tiny_setup()
    assert gt.truth.shape == (4, 30) and gt.measurements.shape == (4, 2, 30)
    assert torch.equal(gt.truth, gt.measurements.mean(1))
    assert torch.equal(gt.masks, make_subsets(300, 4, 0.5, seed=3))
    assert gt.train_loss.shape == gt.query_loss.shape == gt.query_accuracy.shape == (4, 2)
    assert gt.seeds.shape == (4, 2) and len(set(gt.seeds.flatten().tolist())) == 8
    assert gt.models_trained == 8 and gt.path.parent.exists()
    manifest = json.loads((gt.path / "manifest.json").read_text())
    assert manifest["progress"] == {"chunks_done": [0, 1, 2], "models_done": 8, "complete": True}
    assert manifest["cost"]["models_trained_total"] == 8 and manifest["cost"]["wall_s_total"] > 0
    assert manifest["request"]["recipe"]["epochs"] == 2 and manifest["layout"]["num_chunks"] == 3
    again = ground_truth(data, config, gt.path.parent, progress=False)
    assert again.models_trained == 0 and torch.equal(again.truth, gt.truth)
    assert len(json.loads((gt.path / "manifest.json").read_text())["runs"]) == 1


def test_stored_model_equals_ordinary_training(reference):
    data, config = tiny_setup()
    j, r = 2, 1
    subset = reference.masks[j].nonzero()[:, 0]
    recipe = replace(config.recipe, seed=int(reference.seeds[j, r]))
    model = train(
        config.make_model(data), nn.CrossEntropyLoss(), *data.train, recipe, subset=subset
    )
    with torch.no_grad():
        f = model.model(data.X_query)
    want = torch.stack([example_measure("ce", "loss", f[i], data.y_query[i]) for i in range(30)])
    torch.testing.assert_close(reference.measurements[j, r], want.double(), rtol=1e-5, atol=1e-6)


def test_vary_init_draws_one_initialisation_per_model(tmp_path, reference):
    from curvinf.groundtruth import retrain_seed
    from curvinf.models import make_mlp

    data, config = tiny_setup()
    gt = ground_truth(data, replace(config, vary_init=True), tmp_path, progress=False)
    assert gt.path.name != reference.path.name
    j, r = 1, 0
    init = make_mlp(64, 10, depth=1, width=8, seed=retrain_seed(config.seed, j, r, "init"))
    recipe = replace(config.recipe, seed=int(gt.seeds[j, r]))
    alone = train(init, nn.CrossEntropyLoss(), *data.train, recipe, subset=gt.masks[j]).model
    with torch.no_grad():
        f = alone(data.X_query)
    want = torch.stack([example_measure("ce", "loss", f[i], data.y_query[i]) for i in range(30)])
    torch.testing.assert_close(gt.measurements[j, r], want.double(), rtol=1e-5, atol=1e-6)


def test_mismatched_store_is_refused(reference):
    data, config = tiny_setup()
    other = replace(config, recipe=replace(config.recipe, epochs=3))
    with pytest.raises(ValueError, match=r"different request.*recipe\.epochs: 2 vs 3"):
        ground_truth(data, other, reference.path, progress=False)
    # The same request keyed into the parent directory goes to its own store.
    assert ground_truth(data, config, reference.path, progress=False).models_trained == 0


def test_corrupt_files_are_detected_and_repaired(tmp_path, reference):
    gt = build(tmp_path)
    chunk = gt.path / "chunk-00001.pt"
    chunk.write_bytes(chunk.read_bytes()[:-100])  # truncated
    with pytest.raises(CorruptFileError, match="checksum.*repair=True"):
        build(tmp_path)
    messages: list[str] = []
    fixed = build(tmp_path, repair=True, log=messages.append)
    assert any("Recomputing" in m for m in messages) and fixed.models_trained == 3
    assert torch.equal(fixed.truth, reference.truth)

    (gt.path / "manifest.json").write_text('{"request": ')
    with pytest.raises(CorruptFileError, match="manifest is damaged"):
        build(tmp_path)
    fixed = build(tmp_path, repair=True, log=messages.append)
    assert fixed.models_trained == 0 and torch.equal(fixed.truth, reference.truth)

    (gt.path / "chunk-00002.pt").unlink()
    with pytest.raises(CorruptFileError, match="missing"):
        build(tmp_path)


def test_resume_after_sigkill(tmp_path, reference):
    kill_after_first_chunk("test_groundtruth", "build", tmp_path)

    resumed = build(tmp_path)
    assert resumed.models_trained == 8 - 3  # only the two missing chunks
    assert torch.equal(resumed.truth, reference.truth)
    assert torch.equal(resumed.train_loss, reference.train_loss)
    manifest = json.loads((resumed.path / "manifest.json").read_text())
    assert manifest["runs"][-1]["chunks_written"] == [1, 2]
    assert not list(resumed.path.glob(".*.tmp"))


def test_health_warnings():
    base = {"train_loss": 0.05, "query_loss": 0.33, "query_accuracy": 0.9}
    g = torch.Generator().manual_seed(0)
    meas = torch.randn(10, 3, 5, generator=g, dtype=torch.float64)
    ok = health_warnings(
        base, torch.full((10, 3), 0.08), torch.full((10, 3), 0.45), torch.full((10, 3), 0.88),
        meas + 10 * torch.arange(10.0)[:, None, None], epochs=200, matched_steps=False,
    )  # fmt: skip
    assert ok == []
    bad = health_warnings(
        base, torch.full((10, 3), 1.1), torch.full((10, 3), 1.3), torch.full((10, 3), 0.6),
        meas - meas.mean(1, keepdim=True), epochs=200, matched_steps=False,
    )  # fmt: skip
    assert len(bad) == 4
    assert "not converged" in bad[0] and "--matched-steps" in bad[0]
    assert "query loss 1.3 against 0.33" in bad[1] and "accurate" in bad[2] and "noise" in bad[3]
    overfit = health_warnings(
        base, torch.full((10, 3), 0.01), torch.full((10, 3), 1.3), None,
        meas + 10 * torch.arange(10.0)[:, None, None], epochs=200, matched_steps=True,
    )  # fmt: skip
    assert len(overfit) == 1 and "generalise much worse" in overfit[0]


def test_a_base_model_at_chance_is_reported():
    """A base model whose training loss is that of predicting the label frequencies has
    learned nothing: the warning says so (the retrained models look healthy beside it)."""
    from curvinf.data import load_dataset
    from curvinf.groundtruth import CHANCE_FRACTION, chance_loss

    data = load_dataset("digits")
    counts = torch.bincount(data.y_train).double()
    p = counts / counts.sum()
    entropy = float(-(p * p.log()).sum())
    assert chance_loss(data, "ce") == pytest.approx(entropy, rel=1e-12)
    assert entropy == pytest.approx(math.log(10), abs=1e-3)  # digits: ten balanced classes
    assert chance_loss(load_dataset("diabetes"), "mse") is None
    g = torch.Generator().manual_seed(0)
    meas = torch.randn(10, 3, 5, generator=g, dtype=torch.float64)
    meas = meas + 10 * torch.arange(10.0)[:, None, None]
    losses = {"train_loss": torch.full((10, 3), 2.3), "query_loss": torch.full((10, 3), 2.3)}

    def warned(train_loss: float) -> list[str]:
        base = {"train_loss": train_loss, "query_loss": 2.3, "query_accuracy": 0.1}
        return health_warnings(
            base, losses["train_loss"], losses["query_loss"], None, meas,
            epochs=10, matched_steps=True, chance_loss=entropy,
        )  # fmt: skip

    (msg,) = warned(2.29)
    assert "has not learned" in msg and f"2.29 against {entropy:.4g}" in msg
    assert warned(0.95 * CHANCE_FRACTION * entropy) == []  # learning has started


def test_ground_truth_reports_warnings(tmp_path):
    data, config = tiny_setup()
    config = replace(config, alpha=0.2, recipe=replace(config.recipe, lr=0.01))
    with pytest.warns(RetrainingWarning, match="not converged"):
        gt = ground_truth(data, config, tmp_path, progress=False, warn_factor=1.0, warn_margin=0)
    assert any("not converged" in w for w in gt.warnings)
    manifest = json.loads((gt.path / "manifest.json").read_text())
    assert manifest["summary"]["warnings"] == gt.warnings


def test_cli_groundtruth(tmp_path):
    from curvinf.cli import app

    args = "groundtruth --depth 1 --width 8 --epochs 1 --subsets 2 --seeds 1 --queries 20"
    result = CliRunner().invoke(app, [*args.split(), "--out", str(tmp_path), "--no-progress"])
    assert result.exit_code == 0, result.output
    (store,) = tmp_path.iterdir()
    assert str(store) in result.output.replace("\n", "")
    assert json.loads((store / "manifest.json").read_text())["progress"]["complete"]
    bad = CliRunner().invoke(app, ["groundtruth", "--alpha", "1.5", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "alpha" in bad.output and "Traceback" not in bad.output


def test_identity_rung_has_positive_lds_on_digits(tmp_path):
    from curvinf import Regularization, fit_curvature, influence_scores

    d = load_dataset("digits", seed=0)
    data = replace(d, X_query=d.X_query[:40], y_query=d.y_query[:40])
    config = GroundTruthConfig(
        depth=1, width=16, recipe=TrainingRecipe(epochs=8), num_subsets=24, num_seeds=1
    )
    gt = ground_truth(data, config, tmp_path, progress=False)
    loss = nn.CrossEntropyLoss()
    base = train(config.make_model(data), loss, *data.train, config.recipe).model
    stored = gt.base_model(data)
    assert all(
        torch.equal(p, q) for p, q in zip(base.parameters(), stored.parameters(), strict=True)
    )
    inv = fit_curvature("identity", base, loss, *data.train).inverse(Regularization())
    scores = influence_scores(base, loss, inv, train=data.train, query=data.query)
    good = gt.lds(scores, num_bootstrap=200)
    assert good.mean > 0.1 and good.ci_low > 0, good
    assert gt.lds(-scores, num_bootstrap=0).mean == pytest.approx(-good.mean)


def test_default_chunks_hold_a_bounded_amount_of_training(tmp_path, monkeypatch):
    """Without ``models_per_chunk`` a chunk holds at most ``CHUNK_FLOPS`` of training
    (``6·D`` per example seen), so a killed build loses little; the numbers do not change."""
    import curvinf.groundtruth as gt_module

    data, config = tiny_setup()
    model = config.make_model(data)
    per_model = 6.0 * sum(p.numel() for p in model.parameters()) * 150 * config.recipe.epochs
    monkeypatch.setattr(gt_module, "CHUNK_FLOPS", 3.5 * per_model)
    gt = ground_truth(data, config, tmp_path, progress=False)
    layout = gt.manifest["layout"]
    assert (layout["models_per_chunk"], layout["num_chunks"]) == (3, 3)  # 8 models: 3+3+2
    assert torch.equal(gt.measurements, build(tmp_path / "other", models_per_chunk=8).measurements)

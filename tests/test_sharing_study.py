"""The weight-sharing study: the CNN and transformer configurations through the grid
runner, with both K-FAC variants and the unshared GGN that splits block-GGN → K-FAC into
its weight-sharing and Kronecker-factorisation steps."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from curvinf import Regularization, TrainingRecipe
from curvinf.architectures import make_cnn, make_transformer
from curvinf.data import load_dataset
from curvinf.names import sharing_steps
from curvinf.study import LDSSettings, Preset, RunConfig, get_preset, run_grid
from curvinf.study.report import write_report
from curvinf.study.specs import SHARING_LADDER
from curvinf.study.tables import run_dir

TINY_LDS = LDSSettings(num_subsets=4, alpha=0.5, num_seeds=1, num_bootstrap=20)
RULES = (Regularization.paper(), Regularization(damping=0.1, eps=1e-4))


def tiny(architecture: str) -> Preset:
    dataset = "majority" if architecture == "transformer" else "digits"
    recipe = TrainingRecipe(optimizer="adamw", lr=3e-3) if dataset == "majority" else None
    return Preset(
        name=f"tiny-{architecture}",
        depths=(1,),
        widths=(2,) if architecture == "cnn" else (4,),
        epochs=(2,),
        dataset=dataset,
        architecture=architecture,
        uncovered="exact" if architecture == "transformer" else "error",
        rungs=SHARING_LADDER,
        regularizations=RULES,
        lds=TINY_LDS,
        **({"recipe": recipe} if recipe else {}),
    )


def test_architecture_and_dataset_must_match_and_reduce_rungs_are_rungs():
    with pytest.raises(ValueError, match="architecture='transformer' takes dataset 'majority'"):
        RunConfig(depth=1, width=4, epochs=1, architecture="transformer")
    with pytest.raises(ValueError, match="architecture='mlp' takes dataset"):
        RunConfig(depth=1, width=4, epochs=1, dataset="majority")
    with pytest.raises(ValueError, match="rung"):
        RunConfig(depth=1, width=4, epochs=1, rungs=("hessian", "kfac_sideways"))
    c = RunConfig(depth=1, width=4, epochs=1, rungs=("hessian", "kfac_reduce"))
    back = RunConfig.from_dict(c.to_dict())
    assert back.id == c.id and back.rungs == c.rungs


def test_mlp_ids_do_not_change_with_the_new_settings():
    """``architecture`` and ``uncovered`` at their defaults are left out of the id's hash."""
    c = RunConfig(depth=1, width=32, epochs=10)
    assert "architecture" not in c.to_dict() and "uncovered" not in c.to_dict()
    assert c.id == dataclasses.replace(c, architecture="mlp", uncovered="error").id


def test_presets_build_the_models_they_describe():
    for name, arch in (("cnn", "cnn"), ("transformer", "transformer")):
        preset = get_preset(name)
        assert preset.rungs == SHARING_LADDER and preset.lds.num_seeds >= 3
        for c in preset.configs():
            assert c.architecture == arch and c.num_params == sum(c.layer_sizes)
    data = load_dataset("digits")
    cnn = make_cnn(64, 10, depth=2, width=3)
    assert cnn(data.X_train[:5]).shape == (5, 10)
    seqs = load_dataset("majority")
    assert seqs.X_train.dtype == torch.long and seqs.X_train.shape[1] == 8
    tr = make_transformer(8, 8, 8, depth=1, width=4)
    assert tr(seqs.X_train[:5]).shape == (5, 8)
    again = make_transformer(8, 8, 8, depth=1, width=4)
    assert all(torch.equal(a, b) for a, b in zip(tr.parameters(), again.parameters(), strict=True))


@pytest.mark.parametrize("architecture", ["cnn", "transformer"])
def test_weight_sharing_configuration_runs_every_rung_and_splits_the_kronecker_step(
    architecture, tmp_path
):
    preset = tiny(architecture)
    (config,) = preset.configs()
    rows = run_grid(preset, tmp_path, progress=False).rows
    assert {(r["rung"], r["reg"]) for r in rows} == {
        (rung, label) for rung in SHARING_LADDER for label in ("eps1e-04", "damp1e-01+eps1e-04")
    }
    assert all(r["status"] == "exact" and math.isfinite(r["lds"]) for r in rows), [
        (r["rung"], r["reg"], r["status"], r["reason"]) for r in rows if r["status"] != "exact"
    ]
    diag = json.loads((run_dir(tmp_path, config.id) / "diagnostics.json").read_text())
    for label, shares in diag["shares"].items():
        for variant in ("expand", "reduce"):
            split = shares[f"inverse_error_{variant}_sharing"]
            assert set(split) == {n for n, _, _ in (*sharing_steps(variant),)} | {
                "ggn_substitution",
                "block_diagonalisation",
            }
            assert sum(split.values()) == pytest.approx(1.0, abs=1e-9), label
    by = {(r["rung"], r["reg"]): r for r in rows}
    for variant, suffix in (("expand", ""), ("reduce", "_reduce")):
        ws = diag["weight_sharing"]["kfac" + suffix]
        assert ws["variant"] == variant
        # the factorisation step: K-FAC's distance to its unshared GGN, measured directly
        assert ws["to_unshared"]["curvature"] > 0
        row = by[("unshared_ggn" + suffix, "eps1e-04")]
        assert row["step"] == "weight_sharing"
        # the weight-sharing step is the unshared GGN's adjacent distance to the block-GGN
        to_block = diag["weight_sharing"]["unshared_ggn" + suffix]["to_block_ggn"]["curvature"]
        assert row["adjacent_curvature"] == pytest.approx(to_block)
        assert to_block > 1e-6  # convolutions / sequences share weights: not exact
    # the report's weight-sharing tables carry these numbers
    text = write_report(tmp_path).read_text()
    assert "### Weight sharing: block-GGN → K-FAC in two steps" in text
    assert "### Expand or reduce" in text
    step = diag["weight_sharing"]["unshared_ggn_reduce"]["to_block_ggn"]["curvature"]
    assert f"| d1 w{config.width} e2 | reduce |" in text and f"{step:.3f}" in text

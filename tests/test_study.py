"""The study package's new pieces: regulariser parsing, uncertified routes, decomposition
flags, paired comparisons and seed noise in the stored results, the ground truth's
seed-noise warning, and the presets of the paper grid."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch

from curvinf import Regularization, TrainingRecipe
from curvinf.groundtruth import health_warnings
from curvinf.lds import lds_compare
from curvinf.study import (
    COMPARISON_COLUMNS,
    PRESETS,
    LDSSettings,
    Preset,
    parse_regularization,
    read_table,
    reg_label,
    reproduce_plan,
    run_grid,
)
from curvinf.study.measure import decomposition_flags
from curvinf.study.specs import DAMPED, RunConfig

pytestmark = pytest.mark.filterwarnings("ignore::curvinf.groundtruth.RetrainingWarning")


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("eps=1e-4", Regularization(damping=0.0, eps=1e-4)),
        ("damping=1e-3,eps=1e-4", Regularization(damping=1e-3, eps=1e-4)),
        ("damping=1e-3", Regularization(damping=1e-3, eps=0.0)),
        ("damp=1e-4+eps=1e-6", Regularization(damping=1e-4, eps=1e-6)),
        ("eps=0.01,relative", Regularization(damping=0.0, eps=0.01, relative=True)),
    ],
)
def test_parse_regularization(text, want):
    assert parse_regularization(text) == want


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("", "must be text"),
        ("lambda=1", "unknown regulariser key"),
        ("eps=abc", "eps must be a number"),
        ("eps=-1", "eps"),
        ("relative=2", "relative takes no value"),
    ],
)
def test_parse_regularization_refuses_bad_text(text, phrase):
    with pytest.raises(ValueError, match=phrase):
        parse_regularization(text)


def test_reproduce_plan_takes_repeated_regularisers(tmp_path):
    plan = reproduce_plan("quick", tmp_path, regs=["eps=1e-4", "damping=0.1"])
    assert plan.grid.regularizations == (Regularization.paper(), DAMPED)
    assert {c.regularizations for c in plan.configs} == {(Regularization.paper(), DAMPED)}
    with pytest.raises(ValueError, match="repeat a rule"):
        reproduce_plan("quick", tmp_path, regs=["eps=1e-4", "eps=0.0001"])
    with pytest.raises(ValueError, match="unknown regulariser key"):
        reproduce_plan("quick", tmp_path, regs=["delta=1"])
    assert not any(tmp_path.iterdir())  # checked before any work


def test_paper_presets_cover_the_grid_under_two_rules():
    for name in ("paper", "paper-code"):
        preset = PRESETS[name]
        configs = preset.configs()
        assert len(configs) == 27
        assert {(c.depth, c.width, c.epochs) for c in configs} == {
            (d, w, e) for d in (1, 4, 8) for w in (32, 64, 128) for e in (10, 100, 1000)
        }
        assert len(preset.regularizations) >= 2
        assert Regularization.paper() in preset.regularizations and DAMPED in preset.regularizations
    assert PRESETS["paper"].lds.num_seeds >= 3 and PRESETS["paper"].lds.matched_steps
    code = PRESETS["paper-code"]
    assert (code.activation, code.query_fraction) == ("gelu", 0.1)
    assert (code.kronecker_fisher, code.kronecker_bias, code.partition) == (
        "mc",
        "separate",
        "tensor",
    )
    assert Regularization(damping=1e-4, eps=1e-6) in code.regularizations
    # the two protocols never share a ground-truth store or a configuration id
    assert not {c.id for c in code.configs()} & {c.id for c in PRESETS["paper"].configs()}


def test_decomposition_flags():
    assert (
        decomposition_flags({"hessian": 0.0, "ggn": 0.3, "kfac": 0.9}, {"a": 0.5}, "hessian") == []
    )
    flags = decomposition_flags({"ggn": 1.2, "kfac": 1.5}, {"a": 0.2, "b": 1.4}, "hessian")
    assert flags[0] == "every rung's inverse error >= 1"
    assert "shares outside" in flags[1] and "b" in flags[1]
    assert decomposition_flags({"ggn": math.nan}, {"a": math.nan}, "hessian") == []


def _tiny(**changes) -> Preset:
    base = {
        "name": "study-tiny",
        "dataset": "diabetes",
        "depths": (1,),
        "widths": (4,),
        "epochs": (3,),
        "recipe": TrainingRecipe(lr=0.01, batch_size=64),
        "regularizations": (Regularization.paper(), Regularization(damping=1e-3, eps=1e-4)),
        "lds": LDSSettings(num_subsets=8, num_seeds=2, num_queries=16, num_bootstrap=50),
    }
    return Preset(**{**base, **changes})


def test_uncertified_lanczos_is_unconverged_with_figures_never_exact(tmp_path):
    """Too few Ritz pairs for the truncated Hessian: the row says so, with the figures,
    and no error is computed against it."""
    preset = _tiny(
        max_dense_bytes=8.0 * 20**2, lanczos_k=3, regularizations=(Regularization.paper(),)
    )
    rows = run_grid(preset, tmp_path, progress=False).rows
    by = {r["rung"]: r for r in rows}
    h = by["hessian"]
    assert h["route"] == "lanczos" and h["status"] == "unconverged"
    assert "Ritz value" in h["reason"] and "lanczos_k=" in h["reason"]
    for rung in ("ggn", "block_ggn", "ekfac", "kfac"):
        assert by[rung]["status"] == "exact"
        assert math.isnan(by[rung]["inverse_error"])
        assert "hessian is unconverged" in by[rung]["reason"]


def test_results_hold_paired_comparisons_and_seed_noise(tmp_path):
    preset = _tiny()
    result = run_grid(preset, tmp_path, progress=False)
    rows = result.rows
    comps = read_table(tmp_path, "comparisons")
    assert comps and set(comps[0]) == set(COMPARISON_COLUMNS)
    # every pair of certified rungs per rule, each with its interval around the difference
    certified = [
        sum(r["status"] == "exact" for r in rows if r["reg"] == reg)
        for reg in {r["reg"] for r in rows}
    ]
    assert len(comps) == sum(k * (k - 1) // 2 for k in certified) > 0
    for c in comps:
        assert c["ci_low"] <= c["difference"] <= c["ci_high"]
        assert 0.0 <= c["p_value"] <= 1.0
    # the stored difference is the paired bootstrap of the stored scores
    from curvinf.storage import read_blob
    from curvinf.study import config_ground_truth

    (config,) = preset.configs()
    gt = config_ground_truth(config, tmp_path / "groundtruth", progress=False)
    run = tmp_path / "runs" / config.id / "rungs"
    label = reg_label(Regularization(damping=1e-3, eps=1e-4))
    scores = {
        r: read_blob(run / f"{r}.pt")["per_reg"][label]["scores"].double() for r in ("ggn", "kfac")
    }
    want = lds_compare(scores, gt.masks, gt.truth, num_bootstrap=50, seed=0).differences[
        ("ggn", "kfac")
    ]
    got = next(
        c for c in comps if c["reg"] == label and {c["rung_a"], c["rung_b"]} == {"ggn", "kfac"}
    )
    sign = 1.0 if got["rung_a"] == "ggn" else -1.0
    assert sign * got["difference"] == pytest.approx(want.mean, abs=1e-6)
    for r in rows:  # two retrainings: the noise figures exist (for unavailable rungs too)
        assert math.isfinite(r["lds_ceiling"]) and 0.0 <= r["lds_ceiling"] <= 1.0
        assert math.isfinite(r["seed_noise_ratio"]) and r["seed_noise_ratio"] >= 0.0
    # the report sets another result directory beside this one, per shared rule
    from curvinf.study.report import write_report

    text = write_report(tmp_path, against=[tmp_path]).read_text()
    assert "## Protocols side by side" in text and f"### Rule `{label}`" in text
    assert "over the configurations" in text.lower()


def test_seed_noise_warning_only_when_noise_dominates():
    torch.manual_seed(0)
    base = {"train_loss": 0.1, "query_loss": 0.1, "query_accuracy": None}
    loss = torch.full((20, 4), 0.1)
    signal = torch.randn(20, 1, 30)
    quiet = signal + 0.01 * torch.randn(20, 4, 30)
    noisy = 0.01 * signal + torch.randn(20, 4, 30)
    kw = {"epochs": 5, "matched_steps": True}
    assert health_warnings(base, loss, loss, None, quiet, **kw) == []
    (msg,) = health_warnings(base, loss, loss, None, noisy, **kw)
    assert "dominated by retraining noise" in msg and "Pearson correlation" in msg
    assert health_warnings(base, loss, loss, None, noisy[:, :1], **kw) == []  # R = 1


def test_paper_code_knobs_run_through_the_runner(tmp_path):
    """GELU, MC-Fisher Kronecker rungs with separate bias blocks and per-tensor blocks: every
    rung certified, the Kronecker bases compared block by block with the per-tensor
    block-GGN (weight and bias of each layer apart)."""
    preset = _tiny(
        name="study-code",
        activation="gelu",
        query_fraction=0.1,
        kronecker_fisher="mc",
        kronecker_bias="separate",
        partition="tensor",
        regularizations=(Regularization(damping=1e-4, eps=1e-6),),
    )
    rows = run_grid(preset, tmp_path, progress=False).rows
    assert {r["status"] for r in rows} == {"exact"}
    (config,) = preset.configs()
    from curvinf.storage import read_json

    diag = read_json(tmp_path / "runs" / config.id / "diagnostics.json")
    blocks = set(diag["basis_overlap"]["kfac"])
    assert blocks == {"0.weight", "0.bias", "2.weight", "2.bias"}, blocks
    # a different protocol is a different configuration and a different ground truth
    assert config.id != _tiny().configs()[0].id


def test_groundtruth_only_builds_the_stores_the_grid_then_uses(tmp_path, monkeypatch):
    from curvinf.study import GROUND_TRUTH_DONE

    preset = _tiny(epochs=(2, 3))
    first = run_grid(preset, tmp_path, progress=False, groundtruth_only=True)
    assert [e["state"] for e in first.log] == [GROUND_TRUTH_DONE] * 2
    assert first.rows == [] and not (tmp_path / "runs").exists()
    assert len(list((tmp_path / "groundtruth").iterdir())) == 2

    def no_training(*args, **kwargs):
        raise AssertionError("the ground truth was built already")

    monkeypatch.setattr("curvinf.groundtruth.train_many", no_training)
    monkeypatch.setattr("curvinf.groundtruth.train", no_training)
    rows = run_grid(preset, tmp_path, progress=False).rows
    assert len(rows) == 2 * 5 * 2 and {r["status"] for r in rows} == {"exact"}


def test_sweep_on_regression_keeps_its_loss_and_shares_the_runner_store(tmp_path):
    """The sweep builds its ground truth through the study's one path: on diabetes it is
    an MSE ground truth, in the store the grid runner would use for that configuration."""
    from curvinf.groundtruth import store_name
    from curvinf.study import config_data, groundtruth_config
    from curvinf.study.sweep import SweepSettings, run_sweep

    settings = SweepSettings(
        dataset="diabetes",
        depth=1,
        width=4,
        epochs=2,
        subsets=4,
        num_queries=8,
        num_bootstrap=0,
        rungs=("ggn", "kfac"),
        eps_grid=(1e-4,),
        damping_grid=(1e-3,),
        cg_damping=(),
    )
    rows = run_sweep(settings, tmp_path, progress=False, log=lambda m: None)
    assert rows and all(math.isfinite(r["lds"]) for r in rows if r["status"] == "ok")
    config = settings.run_config()
    gtc = groundtruth_config(config)
    assert gtc.loss == "mse"
    (store,) = (tmp_path / "groundtruth").iterdir()
    assert store.name == store_name(gtc, config_data(config))


def test_tally_counts_paired_verdicts_per_step_with_fdr_control():
    """Constructed comparisons: the tally orients each difference finer − coarser, counts
    p < 0.05 by sign, and Benjamini–Hochberg keeps only what survives the table's tests."""
    from curvinf.study.report import benjamini_hochberg, tally_table

    def comp(a, b, diff, p, cfg):
        return {
            "reg": "r",
            "rung_a": a,
            "rung_b": b,
            "difference": diff,
            "p_value": p,
            "config": cfg,
        }

    comps = [
        comp("hessian", "ggn", 0.2, 0.001, "c1"),  # finer higher
        comp("ggn", "hessian", 0.1, 0.002, "c2"),  # stored the other way: finer lower
        comp("hessian", "ggn", 0.05, 0.5, "c3"),  # undecided
        comp("ekfac", "kfac", -0.01, 0.04, "c1"),  # finer lower at 5%, not after BH
        comp("ekfac", "kfac", 0.3, 0.001, "other-reg") | {"reg": "s"},
    ]
    table = tally_table(comps, "r")
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert "| 3 | 1 / 1 / 1 | 1 / 1 / 1 | +0.050 |" in lines["hessian − ggn"]
    assert "| 1 | 0 / 1 / 0 | 0 / 0 / 1 | -0.010 |" in lines["ekfac − kfac"]
    no_bootstrap = [dict(c, p_value=None) for c in comps]  # num_bootstrap=0 stores no p
    assert "| 3 | 0 / 0 / 3 | 0 / 0 / 3 |" in tally_table(no_bootstrap, "r")
    q = benjamini_hochberg([0.001, 0.002, 0.5, 0.04, math.nan])
    assert q[:4] == pytest.approx([0.004, 0.004, 0.5, 0.04 * 4 / 3]) and math.isnan(q[4])


def test_ladder_order_and_inversions_read_the_paired_tests():
    """Constructed rows and comparisons: neighbours in LDS order are separated by `>` only
    where their paired test is significant; an inversion is a coarser rung significantly
    above a finer one; uncertified rungs are left out."""
    from curvinf.study.report import inversions, ladder_order

    lds = {"hessian": 0.50, "ggn": 0.49, "block_ggn": 0.40, "ekfac": 0.45, "kfac": 0.30}
    rows = [{"rung": k, "lds": v, "status": "exact"} for k, v in lds.items()]
    rows.append({"rung": "diag_ggn", "lds": 0.9, "status": "unconverged"})
    p = {
        ("hessian", "ggn"): 0.4,
        ("ggn", "ekfac"): 0.01,
        ("ekfac", "block_ggn"): 0.03,
        ("block_ggn", "kfac"): 0.001,
        ("hessian", "ekfac"): 0.01,
        ("hessian", "block_ggn"): 0.0,
        ("hessian", "kfac"): 0.0,
        ("ggn", "block_ggn"): 0.0,
        ("ggn", "kfac"): 0.0,
        ("ekfac", "kfac"): 0.0,
    }
    comps = [
        {"rung_a": b, "rung_b": a, "difference": lds[b] - lds[a], "p_value": q}
        for (a, b), q in p.items()
    ]
    assert ladder_order(rows, comps) == "H ≈ GGN > EKFAC > BGGN > KFAC"
    assert inversions(rows, comps) == ["BGGN<EKFAC"]
    comps[2]["p_value"] = 0.2  # the block-GGN / EK-FAC test no longer significant
    assert inversions(rows, comps) == []
    assert ladder_order(rows, comps) == "H ≈ GGN > EKFAC ≈ BGGN > KFAC"
    none = [dict(c, p_value=None) for c in comps]
    assert ladder_order(rows, none) == "H ≈ GGN ≈ EKFAC ≈ BGGN ≈ KFAC" and not inversions(
        rows, none
    )


def test_gram_eigendecompositions_are_kept_until_the_configuration_is_done(tmp_path, monkeypatch):
    """Above the dense cap the truncated GGN rungs take the Gram route, whose eigh's go to
    ``runs/<id>/rungs/gram`` (a resumed run reads them back) and are deleted with the rows."""
    import curvinf.curvature.gram as gram_module

    written = []
    real = gram_module.write_tensors
    monkeypatch.setattr(
        gram_module, "write_tensors", lambda path, t: written.append(path) or real(path, t)
    )
    preset = _tiny(
        max_dense_bytes=8.0 * 20**2, lanczos_k=3, regularizations=(Regularization.paper(),)
    )
    rows = run_grid(preset, tmp_path, progress=False).rows
    routes = {r["rung"]: r["route"] for r in rows}
    assert routes["ggn"] == "gram" and routes["block_ggn"] in ("gram", "eigen+gram")
    (config,) = preset.configs()
    folder = tmp_path / "runs" / config.id / "rungs" / "gram"
    assert written and {p.parent for p in written} <= {folder / r for r in ("ggn", "block_ggn")}
    assert not folder.exists()


def test_no_gram_factorisation_is_computed_twice(tmp_path, monkeypatch):
    """The Kronecker rungs measure against the block-GGN (sharing distances): its Gram
    factorisations stay on disk until they have, so none is computed twice."""
    import curvinf.curvature.gram as gram_module

    written = []
    real = gram_module.write_tensors
    monkeypatch.setattr(
        gram_module, "write_tensors", lambda path, t: written.append(path) or real(path, t)
    )
    regs = (Regularization.paper(), Regularization(damping=1e-2, eps=0.0))
    preset = _tiny(max_dense_bytes=8.0 * 20**2, lanczos_k=3, regularizations=regs)
    rows = run_grid(preset, tmp_path, progress=False).rows
    assert {r["route"] for r in rows if r["rung"] == "block_ggn"} <= {"gram", "eigen+gram"}
    assert {"ekfac", "kfac"} <= {r["rung"] for r in rows}
    assert any("/block_ggn/eigh-" in str(p) for p in written)
    assert any("/block_ggn/chol-" in str(p) for p in written)
    assert len(written) == len(set(written)), sorted(map(str, written))


def test_wall_time_counts_interrupted_calls(tmp_path, monkeypatch):
    """A call interrupted after some rungs leaves its time so far in ``timing.json``; the
    call that finishes adds its own, and the rows carry the sum."""
    import json

    import curvinf.study.measure as measure
    from curvinf.study.runner import run_config

    (config,) = _tiny(regularizations=(Regularization(damping=1e-3, eps=0.0),)).configs()
    real = measure.rung_result

    def interrupted(rung, *args, **kwargs):
        if rung == "kfac":
            raise KeyboardInterrupt
        return real(rung, *args, **kwargs)

    monkeypatch.setattr(measure, "rung_result", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_config(config, tmp_path)
    timing = tmp_path / "runs" / config.id / "timing.json"
    first = json.loads(timing.read_text())
    assert first["wall_seconds"] == first["last_call_seconds"] > 0
    monkeypatch.setattr(measure, "rung_result", real)
    rows = run_config(config, tmp_path)
    second = json.loads(timing.read_text())
    assert second["wall_seconds"] == pytest.approx(
        first["wall_seconds"] + second["last_call_seconds"]
    )
    assert {r["config_seconds"] for r in rows} == {second["wall_seconds"]}


def test_inverses_no_later_rung_needs_are_released_in_ladder_order(tmp_path, monkeypatch):
    from curvinf.study.rungs import RungCache

    released: list[str] = []
    real = RungCache.release
    monkeypatch.setattr(RungCache, "release", lambda self, r: released.append(r) or real(self, r))
    preset = _tiny(regularizations=(Regularization(damping=1e-3, eps=0.0),))
    run_grid(preset, tmp_path, progress=False)
    first = list(dict.fromkeys(released))  # order of first release
    assert first == ["ggn", "block_ggn", "ekfac", "kfac"]  # the reference is never released


def test_rank_of_an_iterative_inverse_is_unknown_not_zero(tmp_path):
    """CG has no rank: the row says -1 (unknown), never 0 (a zero inverse)."""
    preset = _tiny(
        max_dense_bytes=8.0 * 20**2, regularizations=(Regularization(damping=1.0, eps=0.0),)
    )
    by = {r["rung"]: r for r in run_grid(preset, tmp_path, progress=False).rows}
    assert by["hessian"]["route"] == "ggn-cg" and by["hessian"]["status"] == "exact"
    assert by["hessian"]["rank"] == -1
    assert by["ggn"]["rank"] == by["ggn"]["num_params"]  # damping keeps every direction


def test_status_reads_each_configuration_state_without_writing(tmp_path):
    from typer.testing import CliRunner

    from curvinf.cli import app
    from curvinf.storage import StoreLock
    from curvinf.study.status import DONE, NOT_STARTED, PARTIAL, READY, RUNNING, grid_status

    with pytest.raises(FileNotFoundError, match="holds no grid run"):
        grid_status(tmp_path)
    preset = _tiny(depths=(1, 2), regularizations=(Regularization(damping=1e-3, eps=0.0),))
    first, second = preset.configs()
    run_grid(preset, tmp_path, progress=False, only=[first.id])
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file())
    _, rows = grid_status(tmp_path)
    by = {r.config: r for r in rows}
    assert by[first.id].state == DONE and by[first.id].rungs_done == len(first.rungs)
    assert by[first.id].ground_truth_complete and by[first.id].seconds > 0
    assert by[second.id].state == NOT_STARTED and by[second.id].models_done == 0
    assert by[first.id].seconds_left == 0.0 and by[second.id].seconds_left == second.cost()
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()) == before

    (tmp_path / "runs" / first.id / "rows.json").unlink()  # rungs kept, rows not written
    assert grid_status(tmp_path)[1][0].state == PARTIAL
    with StoreLock(tmp_path / "runs" / first.id, purpose="run"):
        (r, _) = grid_status(tmp_path)[1]
        assert r.state == RUNNING and r.pid == os.getpid()
    for p in (tmp_path / "runs" / first.id / "rungs").glob("*.pt"):
        p.unlink()
    assert grid_status(tmp_path)[1][0].state == READY  # the ground truth alone is complete
    assert grid_status(tmp_path)[1][0].seconds_left == first.cost(models_left=0)

    res = CliRunner().invoke(app, ["status", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert first.id in res.output and "0/2 configurations done, 1/2 ground truths" in res.output
    assert "of work left" in res.output
    bad = CliRunner().invoke(app, ["status", str(tmp_path / "none")])
    assert bad.exit_code == 2 and "holds no grid run" in bad.output


def test_a_resumed_configuration_does_not_rebuild_an_uncertified_reference(tmp_path, monkeypatch):
    """The Hessian's truncated Lanczos is ``unconverged`` (recorded in its blob): resuming
    the configuration at a later rung does not build it again, and the rows are the same."""
    from curvinf.study.rungs import RungCache

    preset = _tiny(
        max_dense_bytes=8.0 * 20**2, lanczos_k=3, regularizations=(Regularization.paper(),)
    )
    first = run_grid(preset, tmp_path, progress=False).rows
    (config,) = preset.configs()
    rdir = tmp_path / "runs" / config.id
    (rdir / "rows.json").unlink()
    (rdir / "rungs" / "kfac.pt").unlink()  # the resume measures kfac again
    built = []
    real = RungCache._lanczos_inverse
    monkeypatch.setattr(
        RungCache, "_lanczos_inverse", lambda self, *a: built.append(a[1]) or real(self, *a)
    )
    again = run_grid(preset, tmp_path, progress=False).rows
    assert built == []
    keep = ("rung", "status", "lds", "inverse_error", "reason")
    assert [{k: r[k] for k in keep} for r in again] == [{k: r[k] for k in keep} for r in first]


def test_rung_cost_counts_the_gram_factorisations_of_the_exact_rungs():
    """Above the dense cap the GGN and each block of at least ``R`` parameters take one
    Gram factorisation of ``R = N (C - 1)`` rows: an ``eigh`` when a rule truncates (its
    partial form when every truncation is absolute above the damping), else a Cholesky
    factor; smaller blocks stay dense."""
    from curvinf.study.specs import DENSE_RATE, GRAM_FLOPS

    config = RunConfig(
        depth=4,
        width=128,
        epochs=10,
        max_dense_bytes=2**30,
        regularizations=(Regularization(damping=0.0, eps=1e-3, relative=True),),
    )
    R = 1437 * 9  # digits: 1,437 training examples, 9 cross-entropy output roots
    sizes = config.layer_sizes
    assert sorted(sizes) == [1290, 8320, 16512, 16512, 16512]
    small = DENSE_RATE * (1290**3 + 8320**3)
    eigh, chol = 9.0 * R**3 / GRAM_FLOPS, R**3 / 3 / GRAM_FLOPS
    hessian = 2e-2 * config.num_params
    assert config.rung_cost() == pytest.approx(4 * eigh + small + hessian)
    damped = replace(config, regularizations=(DAMPED,))
    assert damped.rung_cost() == pytest.approx(4 * chol + small + hessian)
    deeper = replace(config, depth=8)
    assert deeper.rung_cost() - config.rung_cost() == pytest.approx(4 * eigh + 2e-2 * 4 * 16512)
    # dense where every matrix fits the cap, and the retraining left out on request
    dense = RunConfig(depth=1, width=32, epochs=10)
    assert dense.rung_cost() == pytest.approx(60.0 + DENSE_RATE * dense.num_params**3)
    # the factorisations behind it (grid_cost.py's floor)
    gram = [("eigh", R, "gram")] * 4 + [("eigh", 1290, "dense"), ("eigh", 8320, "dense")]
    assert sorted(config.factorisations()) == sorted(gram)
    assert {k for k, _, r in damped.factorisations() if r == "gram"} == {"cholesky"}
    paper = replace(config, regularizations=(Regularization.paper(), DAMPED))
    assert {k for k, _, r in paper.factorisations() if r == "gram"} == {"eigh-above"}
    assert paper.rung_cost() == pytest.approx(4 * 2.0 * R**3 / GRAM_FLOPS + small + hessian)
    at_damping = replace(config, regularizations=(Regularization(damping=1e-3, eps=1e-3),))
    assert {k for k, _, r in at_damping.factorisations() if r == "gram"} == {"eigh"}
    D = dense.num_params
    full = [("eigh", D, "dense")] * 2 + [("eigh", d, "dense") for d in dense.layer_sizes]
    assert dense.factorisations() == full
    assert config.cost(models_left=0) == config.rung_cost() < config.cost(models_left=1)
    assert config.cost(models_left=1) < config.cost()  # default: every model of the store


def test_the_runner_takes_configurations_by_the_work_left(tmp_path):
    """A configuration whose ground truth is stored is charged its rungs only, so it runs
    before one with the same rungs that still has all its retraining to do."""
    from curvinf.study.runner import by_remaining_cost

    preset = _tiny(epochs=(3, 6), regularizations=(Regularization(damping=1e-3, eps=0.0),))
    cheap, costly = preset.configs()
    assert costly.epochs == 6 and cheap.cost() < costly.cost()
    run_grid(preset, tmp_path, progress=False, only=[costly.id], groundtruth_only=True)
    assert costly.cost(models_left=0) == cheap.rung_cost() < cheap.cost()
    assert by_remaining_cost([cheap, costly], tmp_path) == [costly, cheap]
    run_grid(preset, tmp_path, progress=False, only=[costly.id])
    assert by_remaining_cost([cheap, costly], tmp_path)[0] == costly  # done: nothing left


def test_the_report_names_a_base_model_at_chance(tmp_path):
    """A base model that learned nothing (lr 1e-6, one epoch on digits) is named in the
    report with its loss against the chance loss; a trained one is not."""
    from curvinf.study.report import models_at_chance, stored_results, write_report

    preset = _tiny(
        dataset="digits",
        epochs=(1,),
        recipe=TrainingRecipe(lr=1e-6, batch_size=64),
        regularizations=(Regularization(damping=1e-3, eps=0.0),),
        rungs=("ggn", "kfac"),
        reference="ggn",
    )
    run_grid(preset, tmp_path, progress=False)  # the runner keeps retraining warnings quiet
    rows, _ = stored_results(tmp_path)
    ((config, (loss, chance)),) = models_at_chance(tmp_path, rows).items()
    assert config == rows[0]["config"] and loss >= 0.9 * chance > 2.0
    assert rows[0]["gt_warnings"] >= 1
    report = write_report(tmp_path).read_text()
    assert "## Base models at chance" in report and config in report
    trained = run_grid(_tiny(), tmp_path / "trained", progress=False).rows
    assert models_at_chance(tmp_path / "trained", trained) == {}  # regression: no chance loss


def test_a_configuration_at_chance_is_shown_and_run_last(tmp_path):
    """A stored base model at chance is flagged by the status and its configuration runs
    after the others, although its rungs are cheaper (fewer epochs)."""
    from curvinf.study.runner import by_remaining_cost
    from curvinf.study.status import grid_status

    preset = _tiny(
        dataset="digits",
        epochs=(1, 30),
        recipe=TrainingRecipe(lr=0.003, batch_size=64),
        regularizations=(Regularization(damping=1e-3, eps=0.0),),
    )
    short, long = preset.configs()
    assert short.epochs == 1 and short.cost() < long.cost()
    assert by_remaining_cost([long, short], tmp_path) == [short, long]  # nothing stored yet
    run_grid(preset, tmp_path, progress=False, groundtruth_only=True)
    by = {r.config: r for r in grid_status(tmp_path)[1]}
    assert by[short.id].at_chance and not by[long.id].at_chance
    assert by_remaining_cost([short, long], tmp_path) == [long, short]


def test_a_rung_with_every_eigenvalue_truncated_says_so(tmp_path):
    """Truncation above every eigenvalue: each rung's inverse is zero, its scores are zero
    and its LDS undefined (NaN), and the row's reason says why instead of staying empty."""
    preset = _tiny(regularizations=(Regularization(damping=0.0, eps=1e6),))
    with pytest.warns(UserWarning):  # TruncationWarning: the inverse keeps 0 directions
        rows = run_grid(preset, tmp_path, progress=False).rows
    assert rows and all(r["rank"] == 0 and math.isnan(r["lds"]) for r in rows)
    assert all("every eigenvalue is truncated under eps1e+06" in r["reason"] for r in rows)
    kept = run_grid(_tiny(), tmp_path / "kept", progress=False).rows
    assert not any("every eigenvalue is truncated" in r["reason"] for r in kept)


def test_trend_table_groups_the_claims_by_depth_and_epochs():
    """Constructed rows: the Kronecker share is the sum of its two steps, each cell the
    median [min, max] (count) over the group's configurations, a missing part leaves a
    configuration out, and the Hessian − GGN verdicts are counted by sign at 5%."""
    from curvinf.study.report import trend_table

    def rows_of(cfg, depth, epochs, basis, eigen, mass):
        base = {"config": cfg, "depth": depth, "width": 8, "epochs": epochs, "reg": "r"}
        return [
            base | {"rung": "hessian", "step": "", "off_block_mass": mass},
            base | {"rung": "ggn", "step": "ggn_substitution", "share_inverse": 0.1},
            base | {"rung": "block_ggn", "step": "block_diagonalisation", "share_inverse": 0.2},
            base | {"rung": "ekfac", "step": "kronecker_basis", "share_inverse": basis},
            base | {"rung": "kfac", "step": "kronecker_eigenvalues", "share_inverse": eigen},
        ]

    rows = (
        rows_of("a", 1, 10, 0.3, 0.1, 0.5)
        + rows_of("b", 1, 100, 0.5, 0.2, 0.7)
        + rows_of("c", 4, 10, math.nan, 0.2, 0.9)  # no basis share: no Kronecker share
        + [dict(r, reg="other") for r in rows_of("d", 4, 10, 0.9, 0.9, 0.1)]
    )
    comps = [
        {"reg": "r", "config": "a", "rung_a": "hessian", "rung_b": "ggn", "difference": 0.2,
         "p_value": 0.01},
        {"reg": "r", "config": "b", "rung_a": "ggn", "rung_b": "hessian", "difference": 0.1,
         "p_value": 0.01},  # stored the other way: H lower
        {"reg": "r", "config": "c", "rung_a": "hessian", "rung_b": "ggn", "difference": 0.05,
         "p_value": 0.3},
    ]  # fmt: skip
    table = trend_table(rows, comps, "r")
    lines = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()}
    depth1, depth4, ten = lines["depth 1"], lines["depth 4"], lines["10 epochs"]
    assert depth1[1] == "2" and depth1[2] == "55% [40%, 70%] (2)"  # 0.3+0.1, 0.5+0.2
    assert depth4[1] == "1" and depth4[2] == "–"  # "d" is another rule; "c" lacks a part
    assert depth4[4] == "20% [20%, 20%] (1)"  # block-diagonalisation share
    assert depth1[8] == "0.60 [0.50, 0.70] (2)"  # off-block mass of the Hessian
    assert depth1[-1].rstrip(" |") == "+0.050 (1 / 1 / 0)"  # median of +0.2 and -0.1
    assert ten[-1].rstrip(" |") == "+0.125 (1 / 0 / 1)"

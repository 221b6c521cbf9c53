"""The study on a device: ``run_config(..., device=)`` on a simulated GPU gives the CPU
run's rows (tests/devicesim.py: any CPU tensor meeting a "CUDA" one raises)."""

from __future__ import annotations

import math

import pytest
from devicesim import simulated_cuda

from curvinf import Regularization
from curvinf.study import LDSSettings, RunConfig, run_config

LDS = LDSSettings(num_subsets=4, alpha=0.5, num_seeds=2, num_bootstrap=20)
CNN_RUNGS = ("hessian", "block_ggn", "unshared_ggn_reduce", "ekfac", "kfac_reduce")
NUMBERS = ("lds", "inverse_error", "curvature_error", "influence_error", "adjacent_inverse")


@pytest.mark.parametrize("architecture", ["mlp", "cnn"])
def test_a_configuration_on_a_simulated_gpu_has_the_cpu_rows(architecture, tmp_path, monkeypatch):
    config = RunConfig(
        depth=1,
        width=2,
        epochs=2,
        architecture=architecture,
        rungs=CNN_RUNGS if architecture == "cnn" else RunConfig(1, 1, 1).rungs,
        regularizations=(Regularization(damping=0.1, eps=1e-4),),
        lds=LDS,
    )
    cpu = run_config(config, tmp_path / "cpu")
    with simulated_cuda(monkeypatch):
        gpu = run_config(config, tmp_path / "gpu", device="cuda")
    assert len(gpu) == len(cpu)
    for a, b in zip(cpu, gpu, strict=True):
        assert (a["rung"], a["reg"], a["status"]) == (b["rung"], b["reg"], b["status"])
        for key in NUMBERS:
            same = a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key]))
            assert same, (a["rung"], a["reg"], key, a[key], b[key])


def test_the_sweep_on_a_simulated_gpu_has_the_cpu_rows(tmp_path, monkeypatch):
    from test_sweep import TINY

    from curvinf.study.sweep import SweepSettings, run_sweep

    settings = SweepSettings(**TINY)
    cpu = run_sweep(settings, tmp_path / "cpu", progress=False, log=lambda msg: None)
    with simulated_cuda(monkeypatch):
        gpu = run_sweep(
            settings, tmp_path / "gpu", progress=False, log=lambda msg: None, device="cuda"
        )
    assert len(gpu) == len(cpu) > 0
    for a, b in zip(cpu, gpu, strict=True):
        for key, value in a.items():
            if key == "seconds":
                continue
            same = value == b[key] or (
                isinstance(value, float) and math.isnan(value) and math.isnan(b[key])
            )
            assert same, (a["rung"], key, value, b[key])


@pytest.mark.filterwarnings("ignore::curvinf.groundtruth.RetrainingWarning")  # a tiny fit
def test_measure_ladder_on_a_simulated_gpu_has_the_cpu_rows(monkeypatch, tmp_path):
    from dataclasses import replace

    from test_ladder import DAMPED, small_net

    from curvinf import GroundTruthConfig, TrainingRecipe, ground_truth, load_dataset
    from curvinf.study import LadderSettings, measure_ladder

    d = load_dataset("digits", seed=0)
    data = replace(d, X_train=d.X_train[:80], y_train=d.y_train[:80], X_query=d.X_query[:10],
                   y_query=d.y_query[:10])  # fmt: skip
    config = GroundTruthConfig(model=small_net, recipe=TrainingRecipe(epochs=2), num_subsets=4,
                               num_seeds=2)  # fmt: skip
    gt = ground_truth(data, config, tmp_path, progress=False)
    settings = LadderSettings(regularizations=(DAMPED,), num_bootstrap=20)
    cpu = measure_ladder(gt, data, settings, progress=False).rows
    from curvinf.study.rungs import RungCache

    devices = []
    init = RungCache.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        devices.append(self.device.type)

    monkeypatch.setattr(RungCache, "__init__", spy)
    with simulated_cuda(monkeypatch):
        gpu = measure_ladder(gt, data, settings, progress=False, device="cuda").rows
    assert devices == ["cuda"]  # the rungs were fitted where the model was sent
    for a, b in zip(cpu, gpu, strict=True):
        for key in NUMBERS:
            same = a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key]))
            assert same, (a["rung"], key, a[key], b[key])

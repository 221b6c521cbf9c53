"""Devices (issue 13, item 1): the ``device`` option, same-device checks, and a source check
that every tensor curvinf creates is created where its inputs live.

Everything here runs on the CPU. Where a GPU would be needed, :mod:`devicesim` simulates
one: it tracks which tensors would sit on the CPU and fails any operation that would mix
them with CUDA tensors, so the library's device handling is exercised without a GPU (and,
the arithmetic being the CPU's, its numbers must equal a CPU run's bit for bit). With a
real CUDA device, :func:`test_real_cuda_matches_cpu` compares the two.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from devicesim import DeviceMixError, on_cpu, simulated_cuda
from torch import nn
from typer.testing import CliRunner

from curvinf import (
    METHODS,
    GroundTruthConfig,
    Regularization,
    TrainingRecipe,
    fit_curvature,
    ground_truth,
    influence_scores,
    load_curvature,
    load_dataset,
    make_mlp,
    save_curvature,
    train,
)
from curvinf.cli import app
from curvinf.devices import cpu_generator, model_device, model_on, resolve_device
from curvinf.lds import make_subsets
from curvinf.retrain import train_many

SRC = Path(__file__).resolve().parents[1] / "src" / "curvinf"
CE = nn.CrossEntropyLoss()
pytestmark = [
    pytest.mark.filterwarnings("ignore::curvinf.groundtruth.RetrainingWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


def tiny() -> tuple:
    """120 digits training points, 12 queries, a 64-6-10 MLP (trained a little)."""
    d = load_dataset("digits", seed=0)
    data = replace(
        d, X_train=d.X_train[:120], y_train=d.y_train[:120], X_query=d.X_query[:12],
        y_query=d.y_query[:12],
    )  # fmt: skip
    model = make_mlp(64, 10, depth=1, width=6, seed=0)
    return data, model


# ------------------------------------------------------------------------- resolve_device


def test_resolve_device_names(monkeypatch):
    assert resolve_device("cpu") == resolve_device(None) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == resolve_device(" CPU ") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"'cuda:2' does not exist: this machine has 2 CUDA"):
        resolve_device("cuda:2")


def test_resolve_device_refusals(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError, match=r"torch.cuda.is_available\(\) is False") as err:
            resolve_device(spec)
        assert "--device cpu" in str(err.value) and "CUDA build of torch" in str(err.value)
    for spec in ("gpu", "tpu", "", "cuda:x"):
        with pytest.raises(ValueError, match="unknown device .*choose cpu, cuda, cuda:N or auto"):
            resolve_device(spec)
    with pytest.raises(ValueError, match="not on 'mps'"):
        resolve_device("mps")
    with pytest.raises(TypeError, match="device must be a string"):
        resolve_device(0)  # type: ignore[arg-type]


def test_helpers():
    a = torch.randn(5, generator=cpu_generator(3))
    assert torch.equal(a, torch.randn(5, generator=cpu_generator(3)))
    assert cpu_generator(3).device == torch.device("cpu")
    model = make_mlp(4, 2, depth=1, width=3)
    assert model_device(model) == torch.device("cpu") and model_device(nn.ReLU()) is None
    assert model_on(model, torch.device("cpu")) is model and model_on(model, None) is model
    data = load_dataset("diabetes")
    moved = data.to(torch.float64, device="cpu")
    assert moved.X_train.dtype == moved.y_train.dtype == torch.float64
    assert data.to(device="cpu").X_train is data.X_train  # nothing to do, no copy


# --------------------------------------------------------------- one device, named errors


def test_meta_data_is_refused_naming_it():
    data, model = tiny()
    with pytest.raises(ValueError, match="training data features X is on the meta device"):
        fit_curvature("ggn", model, CE, data.X_train.to("meta"), data.y_train)
    with pytest.raises(ValueError, match="query targets y is on the meta device"):
        inv = fit_curvature("kfac", model, CE, *data.train, progress=False).inverse()
        influence_scores(
            model, CE, inv, train=data.train, query=(data.X_query, data.y_query.to("meta"))
        )


def test_mixed_devices_are_refused_naming_the_tensor(monkeypatch):
    data, _ = tiny()
    with simulated_cuda(monkeypatch):  # (tensors made outside the simulation count as CUDA)
        model = make_mlp(64, 10, depth=1, width=6, seed=0)  # on the CPU
        X, y = data.X_train.to("cuda"), data.y_train.to("cuda")
        cpu_X = torch.ones(len(X), 64)  # made without device=: on the CPU
        cpu_data = data.to(device="cpu")
        inv = fit_curvature("kfac", model, CE, *cpu_data.train, progress=False).inverse()
        gpu = model_on(model, torch.device("cuda"))
        assert not on_cpu(next(gpu.parameters())) and model_device(gpu).type == "cuda"
        want = r"training data features X is on cpu but the model is on cuda:0; .*\.to\('cuda:0'\)"
        with pytest.raises(ValueError, match=want):
            fit_curvature("ggn", gpu, CE, cpu_X, y)
        with pytest.raises(ValueError, match="training data targets y is on cpu but the model"):
            fit_curvature("ggn", gpu, CE, X, torch.zeros(len(X), dtype=torch.long))
        with pytest.raises(ValueError, match="query features X is on cpu but the model is on"):
            influence_scores(gpu, CE, inv, train=(X, y), query=(cpu_X[:3], y[:3]))
        with pytest.raises(ValueError, match="the inverse is on cpu but the model is on cuda:0"):
            influence_scores(gpu, CE, inv, train=(X, y), query=(X[:3], y[:3]))
        with pytest.raises(ValueError, match="training data features X is on cpu but the model"):
            train(gpu, CE, cpu_X, y, TrainingRecipe(epochs=1))
        half = make_mlp(64, 10, depth=1, width=6)
        half[0].to("cuda")
        with pytest.raises(ValueError, match=r"parameter '2.weight' is on cpu but its parameter"):
            fit_curvature("ggn", half, CE, X, y)
        init = {k: v.detach()[None].repeat(2, *[1] * v.ndim) for k, v in model.named_parameters()}
        with pytest.raises(ValueError, match=r"init\['0.weight'\] is on cpu but the model"):
            train_many(gpu, CE, X, y, TrainingRecipe(epochs=1), subsets=make_subsets(120, 2),
                       seeds=[0, 1], init=init)  # fmt: skip


def test_train_device_moves_a_copy(monkeypatch):
    data, _ = tiny()
    recipe = TrainingRecipe(epochs=2, batch_size=32)
    on_cpu_run = train(make_mlp(64, 10, depth=1, width=6, seed=0), CE, *data.train, recipe)
    with simulated_cuda(monkeypatch):  # (tensors made outside the simulation count as CUDA)
        model = make_mlp(64, 10, depth=1, width=6, seed=0)  # on the CPU
        moved = train(model, CE, *data.to(device="cpu").train, recipe, device="cuda")
        assert model_device(moved.model).type == "cuda"
        assert model_device(model).type == "cpu"  # the model passed is untouched
    assert moved.epoch_losses == on_cpu_run.epoch_losses
    for a, b in zip(moved.model.parameters(), on_cpu_run.model.parameters(), strict=True):
        assert torch.equal(a, b)


# -------------------------------------------------- the whole library on a simulated GPU


def test_every_rung_scores_and_retraining_on_a_simulated_gpu(monkeypatch, tmp_path):
    """No CPU tensor meets a CUDA one anywhere (the simulation would raise), results stay
    on the device, and the numbers are the CPU run's, bit for bit (the simulation's
    arithmetic is the CPU's: moving data must not change what is computed)."""
    data, model = tiny()
    recipe = TrainingRecipe(epochs=2, batch_size=32)
    trained = train(model, CE, *data.train, recipe).model
    masks = make_subsets(120, 3, 0.5, seed=1)

    def pipeline(m: nn.Module, X, y, Xq, yq) -> dict:
        out = {}
        for method in METHODS:
            inv = fit_curvature(method, m, CE, X, y, progress=False).inverse(Regularization())
            out[method] = influence_scores(m, CE, inv, train=(X, y), query=(Xq, yq))
        mc = fit_curvature("ggn", m, CE, X, y, fisher="mc", progress=False)
        out["ggn mc"] = mc.dense()
        path = tmp_path / f"{len(out)}-{on_cpu(X)}.pt"
        save_curvature(mc.inverse(Regularization()), path)
        loaded = load_curvature(path, model=m)  # onto the model's device
        out["loaded"] = influence_scores(m, CE, loaded, train=(X, y), query=(Xq, yq))
        many = train_many(m, CE, X, y, recipe, subsets=masks, seeds=[4, 5, 6])
        out["train_many"] = torch.cat([p.reshape(3, -1) for p in many.params.values()], 1)
        return out

    cpu = pipeline(trained, *data.train, *data.query)
    with simulated_cuda(monkeypatch):
        gpu_data = data.to(device="cuda")
        gpu = pipeline(model_on(trained, torch.device("cuda")), *gpu_data.train, *gpu_data.query)
        assert all(not on_cpu(t) and t.device.type == "cuda" for t in gpu.values())
    for name, t in cpu.items():
        assert torch.equal(gpu[name], t), name


def test_ground_truth_on_a_simulated_gpu(monkeypatch, tmp_path):
    """Same store name (request hash), same numbers, files on the CPU, device recorded;
    LDS takes scores on the device; a finished store loads on either device."""
    data, _ = tiny()
    config = GroundTruthConfig(
        depth=1, width=6, recipe=TrainingRecipe(epochs=2, batch_size=32), num_subsets=3,
        num_seeds=2,
    )  # fmt: skip
    cpu = ground_truth(data, config, tmp_path / "cpu", progress=False)
    with simulated_cuda(monkeypatch):
        gpu = ground_truth(data, config, tmp_path / "gpu", progress=False, device="cuda")
        assert gpu.manifest["device"] == "cuda"
        assert gpu.manifest["runs"][0]["device"] == "cuda:0 (simulated GPU)"
        assert all(on_cpu(t) for t in (gpu.truth, gpu.measurements, gpu.train_loss))
        base = gpu.base_model(data).to("cuda")
        inv = fit_curvature("kfac", base, CE, *data.to(device="cuda").train, progress=False)
        scores = influence_scores(base, CE, inv.inverse(), train=data.to(device="cuda").train,
                                  query=data.to(device="cuda").query)  # fmt: skip
        assert scores.device.type == "cuda"
        result = gpu.lds(scores, model=base, num_bootstrap=10)
        again = ground_truth(data, config, tmp_path / "cpu", progress=False, device="cuda")
        assert again.models_trained == 0  # a finished CPU store loads on the GPU
    assert cpu.manifest["device"] == "cpu" and "device" not in cpu.manifest["runs"][0]
    assert cpu.path.name == gpu.path.name and cpu.manifest["key"] == gpu.manifest["key"]
    for name in ("truth", "measurements", "train_loss", "query_loss"):
        assert torch.equal(getattr(cpu, name), getattr(gpu, name)), name
    assert {k: torch.equal(v, gpu.base_params[k]) for k, v in cpu.base_params.items()}
    assert result.mean == cpu.lds(scores.cpu(), num_bootstrap=10).mean


def test_a_store_is_resumed_on_its_own_device_type(monkeypatch, tmp_path):
    data, _ = tiny()
    config = GroundTruthConfig(
        depth=1, width=6, recipe=TrainingRecipe(epochs=1, batch_size=32), num_subsets=2,
        num_seeds=2,
    )  # fmt: skip
    gt = ground_truth(data, config, tmp_path, progress=False, models_per_chunk=2)
    file = gt.path / "manifest.json"
    manifest = json.loads(file.read_text())
    (gt.path / "chunk-00001.pt").unlink()  # unfinished: chunk 1 still to train
    manifest["progress"].update(chunks_done=[0], models_done=2, complete=False)
    del manifest["device"]  # written before devices: counts as the CPU
    file.write_text(json.dumps(manifest))
    with simulated_cuda(monkeypatch):
        want = r"started on cpu \(2 of 4 models trained there\) and cannot be resumed on cuda"
        with pytest.raises(ValueError, match=want) as err:
            ground_truth(data, config, tmp_path, progress=False, device="cuda")
        assert "--device cpu" in str(err.value)
    resumed = ground_truth(data, config, tmp_path, progress=False)
    assert resumed.models_trained == 2 and torch.equal(resumed.truth, gt.truth)
    manifest = json.loads(file.read_text())
    manifest["device"], manifest["progress"]["complete"] = "cuda", False
    file.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="started on cuda .* cannot be resumed on cpu"):
        ground_truth(data, config, tmp_path, progress=False)


def test_ray_tasks_declare_a_gpu_for_cuda(monkeypatch):
    """``make_executor("ray", device=...)``: one GPU per task for CUDA, none for the CPU
    (Ray itself not started: the executor class is replaced by a recorder)."""
    from curvinf import executors

    made = []
    monkeypatch.setattr(executors, "ray_available", lambda: True)
    monkeypatch.setattr(executors, "RayExecutor", lambda *a, **kw: made.append(kw) or kw)
    executors.make_executor("ray", threads=2)
    with simulated_cuda(monkeypatch):
        executors.make_executor("ray", device="cuda")
    assert made == [{"num_cpus": 2, "num_gpus": 0}, {"num_cpus": 1, "num_gpus": 1}]


def test_cuda_ground_truth_refuses_ray_tasks_without_a_gpu(monkeypatch, tmp_path):
    from curvinf.executors import LocalExecutor

    class NoGPU(LocalExecutor):
        num_gpus = 0.0

    data, _ = tiny()
    with simulated_cuda(monkeypatch), pytest.raises(ValueError, match="declare no GPU"):
        ground_truth(data, GroundTruthConfig(), tmp_path, executor=NoGPU(), device="cuda")
    assert not any(tmp_path.iterdir())  # refused before any work


# ------------------------------------------------------------------------------ the CLI


def _invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


TINY_GT = ("--subsets", 2, "--seeds", 1, "--epochs", 1, "--depth", 0, "--queries", 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(
    "command",
    [
        "groundtruth --out {out}",
        "demo",
        "reproduce --out {out}",
        "sweep-regularization --out {out}",
    ],
)
def test_cli_device_cuda_without_cuda_is_a_clear_argument_error(tmp_path, command):
    result = _invoke(*command.format(out=tmp_path / "out").split(), "--device", "cuda")
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith("error: device 'cuda' asks for CUDA") and "--device cpu" in line
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    result = _invoke(*command.format(out=tmp_path / "out").split(), "--device", "gpu")
    assert result.exit_code == 2 and "unknown device 'gpu'" in result.stderr


def test_cli_device_cpu_and_simulated_cuda(tmp_path, monkeypatch):
    result = _invoke("groundtruth", "--out", tmp_path / "cpu", *TINY_GT, "--device", "cpu")
    assert result.exit_code == 0, result.output
    store = Path(result.stdout.strip().splitlines()[-1])
    assert json.loads((store / "manifest.json").read_text())["device"] == "cpu"
    with simulated_cuda(monkeypatch):
        result = _invoke("groundtruth", "--out", tmp_path / "gpu", *TINY_GT, "--device", "auto")
    assert result.exit_code == 0, result.output
    gpu_store = Path(result.stdout.strip().splitlines()[-1])
    assert json.loads((gpu_store / "manifest.json").read_text())["device"] == "cuda"
    assert gpu_store.name == store.name


# ------------------------------------------------------- the source: tensors where they go

FACTORIES = {
    "zeros", "ones", "empty", "full", "eye", "arange", "linspace", "logspace", "tensor",
    "as_tensor", "randn", "rand", "randint", "randperm", "normal", "scalar_tensor",
    "empty_strided", "tril_indices", "triu_indices", "from_numpy", "sparse_coo_tensor",
}  # fmt: skip
"""``torch.<name>(...)`` calls that create a tensor from nothing (not ``*_like``, not
``new_*``, not an operation on inputs): each must say where, ``device=...``."""

ALLOWED = {
    ("study/sweep.py", "torch.full((len(rungs), len(xs)), math.nan)"):
        "a matrix of finished numbers for a matplotlib figure: CPU by design",
    ("study/sweep.py", "torch.full((len(es), len(ds)), math.nan)"):
        "a matrix of finished numbers for a matplotlib figure: CPU by design",
    ("study/sweep.py", "M.numpy()"): "M is one of the CPU figure matrices above",
}  # fmt: skip
"""Justified exceptions, ``(file under src/curvinf, the call's source) -> why``."""


def _is_cpu_move(node: ast.AST) -> bool:
    """``x.cpu()``, ``x.to("cpu", ...)`` or ``x.to(device="cpu")`` somewhere in a chain."""
    while isinstance(node, (ast.Call, ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name, args = node.func.attr, [*node.args, *(k.value for k in node.keywords)]
            if name == "cpu" or (
                name == "to" and any(isinstance(a, ast.Constant) and a.value == "cpu" for a in args)
            ):
                return True
            node = node.func.value
        elif isinstance(node, ast.Call):
            node = node.func
        else:
            node = node.value
    return False


def device_violations(source: str, name: str = "<source>") -> list[str]:
    """Where ``source`` creates a tensor without ``device=``, makes a ``torch.Generator``
    other than an explicit CPU one, or calls ``.numpy()`` on what may be a CUDA tensor
    (neither ``force=True`` nor a preceding ``.cpu()`` / ``.to("cpu")``)."""
    out = []
    nodes = sorted(
        (n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)),
        key=lambda n: (n.lineno, n.col_offset),
    )
    for node in nodes:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        func, keywords = node.func, {k.arg: k.value for k in node.keywords}
        torch_call = isinstance(func.value, ast.Name) and func.value.id == "torch"
        if func.attr not in FACTORIES | {"Generator", "numpy"}:
            continue
        call = ast.get_source_segment(source, node) or func.attr
        where = f"{name}:{node.lineno}: {' '.join(call.split())}"
        if torch_call and func.attr in FACTORIES and "device" not in keywords:
            out.append(f"{where} (no device=)")
        elif torch_call and func.attr == "Generator":
            device = keywords.get("device")
            if not (isinstance(device, ast.Constant) and device.value == "cpu"):
                out.append(f"{where} (a Generator must be an explicit CPU one)")
        elif func.attr == "numpy":
            force = keywords.get("force")
            if not (isinstance(force, ast.Constant) and force.value is True):
                if not _is_cpu_move(func.value):
                    out.append(f"{where} (.numpy() without force=True or .cpu())")
    return out


def test_the_source_check_finds_what_it_should():
    bad = (
        "a = torch.zeros(3)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "b = torch.randperm(4, generator=g)\n"
        "c = x.numpy()\n"
        "d = x.detach().numpy()\n"
    )
    found = device_violations(bad)
    assert [re.match(r"<source>:(\d+)", f).group(1) for f in found] == ["1", "2", "3", "4", "5"]
    good = (
        "a = torch.zeros(3, device=x.device)\n"
        "g = torch.Generator(device='cpu')\n"
        "b = torch.randperm(4, generator=g, device='cpu').to(x.device)\n"
        "c = x.numpy(force=True)\n"
        "d = x.detach().cpu().contiguous().numpy()\n"
        "e = x.to('cpu', torch.float64).numpy()\n"
        "f = torch.zeros_like(x) + x.new_zeros(3)\n"
    )
    assert device_violations(good) == []


def test_every_tensor_is_created_where_it_belongs():
    """Over src/curvinf/**/*.py: factories name their device, generators are CPU ones,
    ``.numpy()`` works on CUDA tensors; the justified exceptions are listed in ALLOWED."""
    found, used = [], set()
    for file in sorted(SRC.rglob("*.py")):
        rel = file.relative_to(SRC).as_posix()
        for v in device_violations(file.read_text(), rel):
            call = v.split(": ", 1)[1].rsplit(" (", 1)[0]
            key = (rel, call)
            if key in ALLOWED:
                used.add(key)
            else:
                found.append(v)
    assert not found, "tensors created without a device (add device=...):\n" + "\n".join(found)
    assert used == set(ALLOWED), f"stale ALLOWED entries: {set(ALLOWED) - used}"


# --------------------------------------------------------------------- a real GPU, if any


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_real_cuda_matches_cpu():
    """Float64 rungs and scores agree across devices to rounding (relative 1e-10)."""
    data, model = tiny()
    trained = train(model, CE, *data.train, TrainingRecipe(epochs=2)).model
    gpu_data, gpu_model = data.to(device="cuda"), model_on(trained, torch.device("cuda"))
    for method in ("hessian", "ggn", "block_ggn", "ekfac", "kfac"):
        scores = []
        for m, d in ((trained, data), (gpu_model, gpu_data)):
            inv = fit_curvature(method, m, CE, *d.train, progress=False).inverse()
            scores.append(influence_scores(m, CE, inv, train=d.train, query=d.query).cpu())
        err = float((scores[1] - scores[0]).norm() / scores[0].norm())
        assert err <= 1e-10, (method, err)


def test_simulation_catches_a_mix(monkeypatch):
    """The simulation itself: a CPU tensor meeting a CUDA one fails, as on a GPU."""
    with simulated_cuda(monkeypatch):
        gpu, cpu = torch.ones(3, device="cuda"), torch.ones(3)
        assert gpu.device.type == "cuda" and cpu.device.type == "cpu"
        with pytest.raises(DeviceMixError, match="mixes devices"):
            gpu + cpu
        with pytest.raises(DeviceMixError, match="numpy"):
            gpu.numpy()
        assert (gpu + cpu.to(gpu.device)).device.type == "cuda"
        assert gpu.numpy(force=True).shape == (3,) and (gpu + torch.tensor(1.0)).shape == (3,)

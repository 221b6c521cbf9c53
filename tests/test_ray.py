"""The Ray executor on a real (single-machine) Ray cluster: a ground truth and a grid run
through it give the local executor's numbers, also when a worker is killed mid-run.

The cluster tests need Ray (``pip install 'curvinf[ray]'``, which ``make test`` installs)
and are skipped without it; the option checks run everywhere.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from curvinf import Regularization, executors
from curvinf.cli import app
from curvinf.data import load_dataset
from curvinf.groundtruth import GroundTruth, GroundTruthConfig, ground_truth
from curvinf.study import LDSSettings, Preset, run_grid
from curvinf.study.runner import reproduce_plan
from curvinf.training import TrainingRecipe

TIMING = {"seconds", "wall_seconds", "wall_s", "cpu_s", "config_seconds"}


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _busy_workers() -> list[int]:
    """Our cluster's worker processes running a task right now."""
    idle = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
    return [
        p
        for p in _descendants(os.getpid())
        if _title(p).startswith("ray::") and not _title(p).startswith(idle)
    ]


@pytest.fixture(scope="module")
def cluster() -> Iterator[executors.RayExecutor]:
    """A Ray head on 127.0.0.1 with 2 CPUs in a temporary directory, shut down after (with
    any process of it left over)."""
    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="cvray", dir="/tmp")  # short: Ray's socket paths
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=temp,
            _node_ip_address="127.0.0.1",
        )
    except Exception as err:  # noqa: BLE001 - a machine where no Ray node can start at all
        shutil.rmtree(temp, ignore_errors=True)
        pytest.skip(f"no local Ray node could start here: {type(err).__name__}: {err}")
    ours = set(_descendants(os.getpid()))
    try:
        yield executors.RayExecutor()  # uses the running instance; closing it leaves it up
    finally:
        ours |= set(_descendants(os.getpid()))
        ray.shutdown()
        time.sleep(1.0)
        for pid in ours & set(_descendants(os.getpid())):  # only processes of this cluster
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def _tiny_gt() -> tuple:
    data = load_dataset("diabetes", seed=0)
    config = GroundTruthConfig(
        depth=1,
        width=8,
        loss="mse",
        recipe=TrainingRecipe(lr=0.01, batch_size=32, epochs=20),
        num_subsets=8,
        num_seeds=2,
    )
    return data, config


def _same_numbers(a: GroundTruth, b: GroundTruth) -> None:
    for name in ("measurements", "truth", "train_loss", "query_loss", "masks", "seeds"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.base == b.base
    assert a.path.name == b.path.name  # the same request, the same key
    for k in a.base_params:
        assert torch.equal(a.base_params[k], b.base_params[k])


class _Held(executors.Executor):
    """The cluster's executor with every task held ``delay`` seconds before it trains, so
    the test has a window to kill a busy worker (tiny chunks otherwise finish between two
    looks on a loaded machine)."""

    name, in_process = "ray", False

    def __init__(self, inner: executors.RayExecutor, delay: float) -> None:
        self.inner, self.delay, self.threads = inner, delay, inner.threads

    def map(self, fn, items, *shared):
        delay = self.delay

        def held(item, *shared):  # defined here: Ray's workers cannot import this test module
            time.sleep(delay)
            return fn(item, *shared)

        return self.inner.map(held, items, *shared)


def test_ground_truth_on_ray_survives_a_killed_worker(cluster, tmp_path):
    data, config = _tiny_gt()
    threads = torch.get_num_threads()
    torch.set_num_threads(cluster.threads)  # the local run with the tasks' thread count
    try:
        local = ground_truth(data, config, tmp_path / "local", progress=False, models_per_chunk=1)
    finally:
        torch.set_num_threads(threads)

    result: dict = {}

    def build() -> None:
        try:
            result["gt"] = ground_truth(
                data,
                config,
                tmp_path / "ray",
                progress=False,
                models_per_chunk=1,
                executor=_Held(cluster, 2.0),
            )
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = err

    runner = threading.Thread(target=build)
    runner.start()
    store = tmp_path / "ray" / local.path.name
    killed, before = None, {}
    deadline = time.time() + 300
    while killed is None and runner.is_alive() and time.time() < deadline:
        before = {p.name: p.read_bytes() for p in store.glob("chunk-*.pt")}
        busy = _busy_workers() if before else []
        if busy:  # a chunk is finished and another is training: kill its worker
            killed = busy[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    runner.join(300)
    assert not runner.is_alive()
    if "error" in result:
        raise result["error"]
    assert killed is not None, "no task was running to kill"
    gt = result["gt"]
    _same_numbers(local, gt)
    for name, data_bytes in before.items():  # no finished chunk lost or rewritten
        assert (store / name).read_bytes() == data_bytes
    (record,) = gt.manifest["runs"]
    assert record["executor"] == "ray" and record["torch_threads"] == cluster.threads
    assert sorted(record["chunks_written"]) == list(range(config.num_models))
    # a resume at the driver loads the finished store and trains nothing
    again = ground_truth(data, config, tmp_path / "ray", progress=False, executor=cluster)
    assert again.models_trained == 0
    _same_numbers(local, again)


def _tiny_grid() -> Preset:
    return Preset(
        name="ray-tiny",
        dataset="diabetes",
        depths=(1,),
        widths=(4,),
        epochs=(3,),
        recipe=TrainingRecipe(lr=0.01, batch_size=64),
        regularizations=(Regularization.paper(),),
        lds=LDSSettings(num_subsets=8, num_seeds=2, num_queries=16, num_bootstrap=50),
    )


def _numbers(rows: list[dict]) -> list[dict]:
    """Rows without timings; NaN made comparable."""
    return [
        {
            k: ("nan" if isinstance(v, float) and math.isnan(v) else v)
            for k, v in r.items()
            if not any(t in k for t in TIMING)
        }
        for r in rows
    ]


def test_grid_on_ray_matches_local(cluster, tmp_path):
    preset = _tiny_grid()
    threads = torch.get_num_threads()
    torch.set_num_threads(cluster.threads)
    try:
        local = run_grid(preset, tmp_path / "local", progress=False)
    finally:
        torch.set_num_threads(threads)
    remote = run_grid(preset, tmp_path / "ray", progress=False, executor=cluster)
    assert [e["state"] for e in remote.log] == ["done"]
    assert remote.rows and _numbers(remote.rows) == _numbers(local.rows)
    (config,) = preset.configs()
    run = tmp_path / "ray" / "runs" / config.id
    assert (run / "rows.json").exists() and (run / "diagnostics.json").exists()
    assert not list(run.glob(".*.tmp"))
    # a second run finds the configuration finished: no task
    again = run_grid(preset, tmp_path / "ray", progress=False, executor=cluster)
    assert _numbers(again.rows) == _numbers(local.rows)


# --- option checks: everywhere, Ray or not ------------------------------------------------


def test_ray_options_are_checked_before_any_work(tmp_path, monkeypatch):
    cli = CliRunner()
    res = cli.invoke(app, ["groundtruth", "--out", str(tmp_path), "--ray-address", "auto"])
    assert res.exit_code == 2 and "--ray-address needs --executor ray" in res.output
    res = cli.invoke(app, ["reproduce", "--out", str(tmp_path), "--executor", "dask"])
    assert res.exit_code == 2 and "unknown executor" in res.output
    with pytest.raises(ValueError, match="--workers is for the local executor"):
        monkeypatch.setattr(executors, "ray_available", lambda: True)
        reproduce_plan("quick", tmp_path, workers=2, executor="ray")
    monkeypatch.setattr(executors, "ray_available", lambda: False)
    for argv in (
        ["groundtruth", "--out", str(tmp_path), "--executor", "ray"],
        ["reproduce", "--out", str(tmp_path), "--executor", "ray"],
    ):
        res = cli.invoke(app, argv)
        assert res.exit_code == 2 and "pip install 'curvinf[ray]'" in res.output, res.output
    assert not list(tmp_path.iterdir())  # nothing written

"""Issue 9, the ground-truth store and the command line: the catalogue of bad inputs and
faults, each with its exact error type and a phrase of its message (or exact numbers).

Cases that already behaved well and are tested elsewhere:
``test_groundtruth.py::test_resume_after_sigkill`` (SIGKILL mid-build),
``test_groundtruth.py::test_corrupt_files_are_detected_and_repaired`` (truncated chunk,
damaged manifest, missing chunk) and ``test_groundtruth.py::test_mismatched_store_is_refused``
(another configuration's store). Store concurrency is covered here.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_groundtruth import one_thread, tiny_setup  # noqa: F401 (one_thread: autouse)
from typer.testing import CliRunner

import curvinf.groundtruth as g
import curvinf.study as ex
import curvinf.study.rungs as rungs_mod
import curvinf.study.runner as runner_mod
import curvinf.study.specs as specs_mod
from curvinf import Regularization, TrainingRecipe
from curvinf.cli import app
from curvinf.data import load_dataset
from curvinf.groundtruth import GroundTruthConfig, ground_truth, take_queries
from curvinf.storage import StoreBusyError, read_blob
from curvinf.study import BUSY, LDSSettings, Preset, RunConfig, run_config, run_grid

pytestmark = pytest.mark.filterwarnings("ignore::curvinf.groundtruth.RetrainingWarning")

TINY = Preset(
    name="tiny-hardening",
    depths=(1,),
    widths=(4,),
    epochs=(1,),
    rungs=("hessian", "ggn"),
    recipe=TrainingRecipe(batch_size=128),
    regularizations=(Regularization(damping=1e-3, eps=1e-6),),
    lds=LDSSettings(num_subsets=4, num_queries=8, num_bootstrap=0),
)
CLI_STORE = "--depth 1 --width 8 --epochs 1 --subsets 2 --seeds 1 --queries 20 --no-progress"


def invoke(*args: str):
    """Run ``curvinf ARGS`` in-process; the result has ``exit_code``, ``stdout``, ``stderr``."""
    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The single ``error: ...`` line a failed command must print on stderr (and nothing else)."""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.output, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def boom(*args, **kwargs):
    raise AssertionError("this must not run")


# ---------------------------------------------------------------------------------------
# Items 1, 3, 4: every count and number is checked, before any work, in the library and the CLI.


@pytest.mark.parametrize(
    "kwargs, error, phrase",
    [
        ({"num_subsets": 2.5}, TypeError, "num_subsets must be an integer"),
        ({"num_subsets": 1}, ValueError, "num_subsets must be >= 2"),
        ({"num_seeds": 0}, ValueError, "num_seeds must be >= 1"),
        ({"num_seeds": True}, TypeError, "num_seeds must be an integer"),
        ({"depth": 1.0}, TypeError, "depth must be an integer"),
        ({"width": 0}, ValueError, "width must be >= 1"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        ({"alpha": math.nan}, ValueError, "alpha (subset fraction) must be a finite number"),
        ({"alpha": 1.0}, ValueError, "must lie in (0, 1)"),
        ({"alpha": 0.0}, ValueError, "must be > 0"),
        ({"alpha": "0.5"}, TypeError, "must be a number"),
        ({"vary_init": 1}, TypeError, "vary_init must be True or False"),
    ],
)
def test_groundtruth_config_refuses_bad_numbers(kwargs, error, phrase):
    with pytest.raises(error) as info:
        GroundTruthConfig(**kwargs)
    assert phrase in str(info.value)


@pytest.mark.parametrize(
    "kwargs, error, phrase",
    [
        ({"max_memory_bytes": 0}, ValueError, "max_memory_bytes must be > 0"),
        ({"max_memory_bytes": -1.0}, ValueError, "max_memory_bytes must be > 0"),
        ({"max_memory_bytes": math.nan}, ValueError, "max_memory_bytes must be a finite"),
        ({"models_per_chunk": 0}, ValueError, "models_per_chunk must be >= 1"),
        ({"models_per_chunk": 2.5}, TypeError, "models_per_chunk must be an integer"),
        ({"warn_factor": -1.0}, ValueError, "warn_factor must be >= 0"),
    ],
)
def test_ground_truth_refuses_bad_arguments_before_writing(tmp_path, kwargs, error, phrase):
    data, config = tiny_setup()
    with pytest.raises(error) as info:
        ground_truth(data, config, tmp_path / "store", progress=False, **kwargs)
    assert phrase in str(info.value)
    assert not (tmp_path / "store").exists()


def test_take_queries_refuses_negative_and_too_many():
    data = load_dataset("digits", seed=0)
    assert len(data.X_query) == 360
    with pytest.raises(ValueError, match="num_queries must be >= 0, got -1"):
        take_queries(data, -1)  # was data.X_query[:-1]: 359 queries, silently
    with pytest.raises(ValueError, match="num_queries is 361 but digits has 360 query points"):
        take_queries(data, 361)
    assert len(take_queries(data, 7).X_query) == 7 and take_queries(data, 0) is data


@pytest.mark.parametrize(
    "make, error, phrase",
    [
        (lambda: LDSSettings(num_subsets=2.5), TypeError, "num_subsets must be an integer"),
        (lambda: LDSSettings(num_queries=-1), ValueError, "num_queries must be >= 0"),
        (lambda: LDSSettings(alpha=math.inf), ValueError, "alpha must be a finite number"),
        (lambda: LDSSettings(num_bootstrap=1.5), TypeError, "num_bootstrap must be an integer"),
        (
            lambda: RunConfig(1, 4, 1, max_dense_bytes=math.nan),
            ValueError,
            "max_dense_bytes must be a finite number",
        ),
        (lambda: RunConfig(1, 4, 1, max_dense_bytes=0), ValueError, "max_dense_bytes must be > 0"),
        (
            lambda: Preset("x", (1,), (4,), (1,), seeds=(True,)),
            ValueError,
            "seeds must be integers",
        ),
    ],
)
def test_grid_settings_refuse_bad_numbers(make, error, phrase):
    with pytest.raises(error) as info:
        make()
    assert phrase in str(info.value)


@pytest.mark.parametrize(
    "args, phrase",
    [
        ("groundtruth --out {out} --queries -1", "--queries must be >= 0, got -1"),
        ("groundtruth --out {out} --queries 361", "digits has 360 query points"),
        ("groundtruth --out {out} --subsets 1", "--subsets must be >= 2"),
        ("groundtruth --out {out} --seeds 0", "--seeds must be >= 1"),
        ("groundtruth --out {out} --chunk -1", "--chunk must be >= 0"),
        ("groundtruth --out {out} --threads -1", "--threads must be >= 0"),
        ("groundtruth --out {out} --epochs 0", "--epochs must be >= 1"),
        ("groundtruth --out {out} --batch-size 0", "--batch-size must be >= 1"),
        ("groundtruth --out {out} --alpha 1", "--alpha must lie in (0, 1)"),
        ("groundtruth --out {out} --memory-gib 0", "--memory-gib must be > 0"),
        ("groundtruth --out {out} --memory-gib -1", "--memory-gib must be > 0"),
        ("groundtruth --out {out} --memory-gib nan", "--memory-gib must be a finite number"),
        ("groundtruth --out {file}", "is a file; pass a directory"),
        ("groundtruth --out {file}/sub", "lies under"),
        ("groundtruth --out {out} --dataset mnist", "unknown dataset 'mnist'"),
        ("reproduce --out {out} --preset huge", "unknown preset 'huge'; choose one of"),
        ("reproduce --out {out} --workers 0", "--workers must be >= 1, got 0"),
        ("reproduce --out {out} --seeds a,b", "--seeds must be comma-separated integers"),
        ("reproduce --out {out} --seeds -1", "seeds must be integers >= 0"),
        ("reproduce --out {out} --max-dense-gib -1", "--max-dense-gib must be >= 0"),
        ("reproduce --out {out} --max-minutes -1", "--max-minutes must be >= 0"),
        ("reproduce --out {file}/sub", "lies under"),
        ("reproduce --out {out} --only zzz", "its ids are: d1-w32-e10-s0-"),
        ("demo --depth -1", "--depth must be >= 0"),
        ("demo --epochs 0", "--epochs must be >= 1"),
        ("report {out}", "holds no results.jsonl; run `curvinf reproduce"),
        ("sweep-regularization --out {out} --threads -1", "--threads must be >= 0"),
        ("sweep-regularization --out {out} --eps a", "--eps must be comma-separated numbers"),
        ("sweep-regularization --out {out} --queries 999", "digits has 360 query points"),
        ("sweep-regularization --out {file}", "is a file"),
    ],
)
def test_cli_bad_argument_is_one_error_line_exit_2_and_writes_nothing(tmp_path, args, phrase):
    out, file = tmp_path / "out", tmp_path / "file"
    file.write_text("not a directory")
    result = invoke(*args.format(out=out, file=file).split())
    assert result.exit_code == 2, result.output
    assert phrase in error_line(result)
    assert not out.exists() and sorted(tmp_path.iterdir()) == [file]


# ---------------------------------------------------------------------------------------
# Item 2: a lost manifest is rebuilt with the layout of the chunks on disk.


@pytest.fixture(scope="module")
def store3(tmp_path_factory) -> g.GroundTruth:
    """The tiny store built with 3 models per chunk (8 models: chunks of 3, 3, 2)."""
    data, config = tiny_setup()
    return ground_truth(
        data, config, tmp_path_factory.mktemp("store3"), progress=False, models_per_chunk=3
    )


def chunk_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.glob("chunk-*.pt"))}


@pytest.mark.parametrize("chunk", [None, 5])
def test_lost_manifest_takes_the_layout_of_the_chunks(tmp_path, store3, monkeypatch, chunk):
    store = tmp_path / store3.path.name
    shutil.copytree(store3.path, store)
    before = chunk_bytes(store)
    (store / "manifest.json").unlink()
    monkeypatch.setattr(g, "train_many", boom)  # nothing finished may be retrained
    monkeypatch.setattr(g, "train", boom)
    messages: list[str] = []
    data, config = tiny_setup()
    gt = ground_truth(
        data, config, tmp_path, progress=False, models_per_chunk=chunk, log=messages.append
    )
    assert gt.path == store and gt.models_trained == 0
    assert torch.equal(gt.truth, store3.truth) and torch.equal(gt.measurements, store3.measurements)
    layout = json.loads((store / "manifest.json").read_text())["layout"]
    assert (layout["models_per_chunk"], layout["num_chunks"]) == (3, 3)
    assert chunk_bytes(store) == before
    assert any("from its chunk files: 3 models per chunk" in m for m in messages), messages


def test_lost_manifest_and_first_chunk_retrain_only_that_chunk(tmp_path, store3):
    store = tmp_path / store3.path.name
    shutil.copytree(store3.path, store)
    (store / "manifest.json").unlink()
    (store / "chunk-00000.pt").unlink()  # the layout must come from chunk 1 (models 3..5)
    data, config = tiny_setup()
    gt = ground_truth(data, config, store, progress=False)  # the store itself as store_dir
    assert gt.path == store and [p.name for p in store.iterdir() if p.is_dir()] == []
    assert gt.models_trained == 3
    assert torch.equal(gt.truth, store3.truth) and torch.equal(gt.train_loss, store3.train_loss)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["layout"]["models_per_chunk"] == 3
    assert manifest["runs"][-1]["chunks_written"] == [0]


# ---------------------------------------------------------------------------------------
# Item 5: read-only directories.


@contextmanager
def read_only(directory: Path, monkeypatch) -> Iterator[None]:
    """``directory`` and everything below it read-only: ``chmod a-w`` when not root; as root
    (permission bits do not bind root) every write below it is refused instead."""
    if os.geteuid() != 0:
        paths = [directory, *directory.rglob("*")]
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p in paths:
                p.chmod(modes[p])
        return
    with monkeypatch.context() as m:
        refuse_writes_below(directory, m)
        yield


def refuse_writes_below(directory: Path, m: pytest.MonkeyPatch) -> None:
    """Make every file-system write below ``directory`` fail as on a read-only directory."""
    root = directory.resolve()

    def below(p) -> bool:
        return isinstance(p, (str, os.PathLike)) and root in (
            Path(p).resolve(),
            *Path(p).resolve().parents,
        )

    def denied(p) -> PermissionError:
        return PermissionError(errno.EACCES, "Permission denied (simulated)", str(p))

    real_open, real_os_open, real_mkdir, real_access = builtins.open, os.open, Path.mkdir, os.access

    def open_(file, mode="r", *args, **kwargs):
        if below(file) and any(c in mode for c in "wax+"):
            raise denied(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if below(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise denied(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(self, mode=0o777, parents=False, exist_ok=False):
        if below(self) and not (exist_ok and self.is_dir()):
            raise denied(self)
        return real_mkdir(self, mode, parents, exist_ok)

    def access(path, mode, *args, **kwargs):
        return not (below(path) and mode & os.W_OK) and real_access(path, mode, *args, **kwargs)

    def refuse(real):
        def call(path, *args, **kwargs):
            if below(path):
                raise denied(path)
            return real(path, *args, **kwargs)

        return call

    m.setattr(builtins, "open", open_)
    m.setattr(io, "open", open_)
    m.setattr(os, "open", os_open)
    m.setattr(Path, "mkdir", mkdir)
    m.setattr(os, "access", access)
    for name in ("replace", "rename", "unlink", "remove"):
        m.setattr(os, name, refuse(getattr(os, name)))


def test_finished_store_loads_from_a_read_only_directory(tmp_path, store3, monkeypatch):
    shutil.copytree(store3.path, tmp_path / store3.path.name)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    data, config = tiny_setup()
    with read_only(tmp_path, monkeypatch):
        gt = ground_truth(data, config, tmp_path, progress=False)
    assert gt.models_trained == 0 and torch.equal(gt.truth, store3.truth)
    assert all(torch.equal(gt.base_params[k], v) for k, v in store3.base_params.items())
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files


def test_cli_loads_a_finished_store_from_a_read_only_directory(tmp_path, cli_store, monkeypatch):
    shutil.copytree(cli_store, tmp_path / cli_store.name)
    with read_only(tmp_path, monkeypatch):
        result = invoke("groundtruth", "--out", tmp_path, *CLI_STORE.split())
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / cli_store.name)
    assert "(0 trained now)" in " ".join(result.stderr.split())


def test_read_only_directories_give_clear_errors(tmp_path, store3, monkeypatch):
    data, config = tiny_setup()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    incomplete = tmp_path / "incomplete"
    shutil.copytree(store3.path, incomplete / store3.path.name)
    (incomplete / store3.path.name / "chunk-00002.pt").unlink()
    with read_only(tmp_path, monkeypatch):
        with pytest.raises(
            PermissionError, match="cannot create the ground-truth store .*writable"
        ):
            ground_truth(data, config, fresh, progress=False)
        with pytest.raises(PermissionError, match="not writable; make it writable"):
            ground_truth(data, config, incomplete, progress=False, repair=True)
        result = invoke("reproduce", "--out", fresh / "results", "--no-progress")
        assert result.exit_code == 2 and "which is not writable" in error_line(result)
        result = invoke("groundtruth", "--out", fresh, *CLI_STORE.split())
        assert result.exit_code == 1
        assert "cannot create the ground-truth store" in error_line(result)
    assert list(fresh.iterdir()) == []


# ---------------------------------------------------------------------------------------
# Items 4 (failures during the work) and store concurrency: one error line, exit 1.

HOLD_LOCK = """
import fcntl, os, sys, time
fh = open(sys.argv[1], "a+")
fcntl.flock(fh, fcntl.LOCK_EX)
fh.seek(0); fh.truncate(); fh.write(f"{os.getpid()}\\n"); fh.flush()
print("held", flush=True)
time.sleep(120)
"""


@contextmanager
def lock_held_by_another_process(directory: Path) -> Iterator[int]:
    """Another process holds ``directory/.lock`` as curvinf does (flock, pid inside); its pid."""
    directory.mkdir(parents=True, exist_ok=True)
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(directory / ".lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "held"
        yield child.pid
    finally:
        child.kill()
        child.wait(30)
        child.stdout.close()


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory) -> Path:
    """A finished tiny store built by ``curvinf groundtruth``; its directory."""
    out = tmp_path_factory.mktemp("cli-store")
    result = invoke("groundtruth", "--out", out, *CLI_STORE.split())
    assert result.exit_code == 0, result.output
    (store,) = out.iterdir()
    return store


def test_store_lock_names_its_holder_and_finished_stores_read_while_locked(tmp_path, store3):
    data, config = tiny_setup()
    store = tmp_path / store3.path.name
    shutil.copytree(store3.path, store)
    with lock_held_by_another_process(store) as pid:
        assert ground_truth(data, config, tmp_path, progress=False).models_trained == 0
        (store / "chunk-00001.pt").unlink()
        with pytest.raises(StoreBusyError, match=rf"being built by another process \(pid {pid};"):
            ground_truth(data, config, tmp_path, progress=False, repair=True)


def test_cli_work_failures_are_one_error_line_exit_1(tmp_path, cli_store):
    out = tmp_path / "out"
    store = out / cli_store.name
    shutil.copytree(cli_store, store)
    result = invoke("groundtruth", "--out", out, *CLI_STORE.split())  # read-only friendly load
    assert result.exit_code == 0 and str(store) in result.stdout.replace("\n", "")
    chunk = store / "chunk-00000.pt"
    chunk.write_bytes(chunk.read_bytes()[:-10])
    result = invoke("groundtruth", "--out", out, *CLI_STORE.split())
    assert result.exit_code == 1 and "fails its sha256 checksum" in error_line(result)
    with lock_held_by_another_process(store) as pid:
        result = invoke("groundtruth", "--out", out, "--repair", *CLI_STORE.split())
    assert result.exit_code == 1
    assert f"is being built by another process (pid {pid}" in error_line(result)


# ---------------------------------------------------------------------------------------
# Item 6: two runs into the same --out; exit status when a configuration fails.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """``TINY`` run once (one configuration, two rungs); its result directory."""
    out = tmp_path_factory.mktemp("tiny-run")
    assert [e["state"] for e in run_grid(TINY, out, progress=False).log] == ["done"]
    return out


def test_reproduce_skips_a_configuration_another_process_runs(tmp_path, monkeypatch):
    (config,) = TINY.configs()
    monkeypatch.setitem(specs_mod.PRESETS, TINY.name, TINY)
    monkeypatch.setattr(g, "train", boom)  # neither the base model nor any rung is computed
    monkeypatch.setattr(rungs_mod, "fit_curvature", boom)
    with lock_held_by_another_process(tmp_path / "runs" / config.id) as pid:
        result = run_grid(TINY, tmp_path, progress=False)
        cli = invoke("reproduce", "--preset", TINY.name, "--out", tmp_path, "--no-progress")
    (entry,) = result.log
    want = f"configuration {config.id} is being run by another process (pid {pid}); skipped"
    assert entry["state"] == BUSY and entry["error"] == want
    assert result.rows == [] and not (tmp_path / "groundtruth").exists()
    assert cli.exit_code == 1 and want in " ".join(cli.stderr.split())  # rich wraps lines
    assert "no configuration finished" in cli.stderr.strip().splitlines()[-1]


def test_reproduce_exits_non_zero_when_a_configuration_fails(tmp_path, tiny_run, monkeypatch):
    two = replace(TINY, name="tiny-two", epochs=(1, 2))
    shutil.copytree(tiny_run / "runs", tmp_path / "runs")  # epochs=1 is finished
    shutil.copytree(tiny_run / "groundtruth", tmp_path / "groundtruth")
    real = runner_mod.run_config

    def fail_epochs_2(config, out, **kwargs):
        if config.epochs == 2:
            raise RuntimeError("simulated failure")
        return real(config, out, **kwargs)

    monkeypatch.setattr(runner_mod, "run_config", fail_epochs_2)
    monkeypatch.setitem(specs_mod.PRESETS, two.name, two)
    result = invoke("reproduce", "--preset", two.name, "--out", tmp_path, "--no-progress")
    failed = next(c.id for c in two.configs() if c.epochs == 2)
    assert result.exit_code == 1, result.output
    assert result.stdout.strip() == str(tmp_path / "report.md"), result.stderr  # the rest
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: 1 configuration(s) failed: {failed};"), result.stderr
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------
# Item 7: the runner scores the ground-truth store's base model.


def test_runner_scores_the_store_base_model(tmp_path, monkeypatch):
    (config,) = TINY.configs()
    data = take_queries(load_dataset(config.dataset, seed=config.seed), config.lds.num_queries)
    gt = ground_truth(data, ex.groundtruth_config(config), tmp_path / "groundtruth", progress=False)
    # A resume under another thread count would train a (slightly) different model: the
    # runner must not train at all once the store exists.
    monkeypatch.setattr("curvinf.training.train", boom)
    monkeypatch.setattr(g, "train", boom)
    monkeypatch.setattr(runner_mod, "train", boom, raising=False)
    rows = run_config(config, tmp_path)
    assert {r["status"] for r in rows} == {"exact"}
    scored = read_blob(tmp_path / "runs" / config.id / "model.pt")
    assert scored.keys() == gt.base_params.keys()
    assert all(torch.equal(scored[k], v) for k, v in gt.base_params.items())


def test_stale_model_file_is_replaced_and_its_rungs_recomputed(tmp_path, tiny_run, monkeypatch):
    shutil.copytree(tiny_run, tmp_path, dirs_exist_ok=True)
    (config,) = TINY.configs()
    run_dir = tmp_path / "runs" / config.id
    state = read_blob(run_dir / "model.pt")
    first = json.loads((run_dir / "rows.json").read_text())
    g.write_blob(run_dir / "model.pt", {k: v + 1e-3 for k, v in state.items()})
    (run_dir / "rows.json").unlink()
    fitted: list[str] = []
    real = rungs_mod.fit_curvature

    def counting(method, *args, **kwargs):
        fitted.append(method)
        return real(method, *args, **kwargs)

    monkeypatch.setattr(rungs_mod, "fit_curvature", counting)
    messages: list[str] = []
    rows = run_config(config, tmp_path, log=messages.append)
    assert sorted(fitted) == ["ggn", "hessian"]
    assert any("model.pt differs from the ground truth's base model" in m for m in messages)
    again = read_blob(run_dir / "model.pt")
    assert all(torch.equal(again[k], v) for k, v in state.items())
    assert [r["lds"] for r in rows] == [r["lds"] for r in first]

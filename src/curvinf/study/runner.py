"""The grid runner: one configuration at a time, resumable, many processes sharing a store.

For every configuration of a :class:`~curvinf.study.specs.Preset`, :func:`run_config`

1. builds or loads the LDS ground truth (:mod:`curvinf.study.truth`: ``M`` subsets of
   fraction ``α`` retrained ``R`` times),
2. takes the base model from the ground-truth store, so every rung scores the very
   weights the ground truth was built around, whatever the thread count of a resume,
3. fits every rung by the route its size allows and inverts it under every
   regulariser (:mod:`curvinf.study.rungs`), scores all queries against all training
   points, computes the LDS, the errors, the adjacent-rung distances and the diagnostics
   (:mod:`curvinf.study.measure`), the paired LDS comparisons of the rungs and the
   ground truth's seed-noise figures,
4. writes the configuration's rows (:mod:`curvinf.study.tables` describes the files).

Every file is written atomically (:mod:`curvinf.storage`), so a run killed at any
point resumes: finished configurations are skipped, finished rungs of an
unfinished configuration are loaded, the Gram eigendecompositions
and Cholesky factors its later rungs need are read back from ``runs/<id>/rungs/gram/``
(deleted once the configuration is done),
the ground truth resumes from its last chunk.
A finished configuration needs only its ``rows.json`` and ``diagnostics.json`` (and
the ground-truth store's small files), so those are what a result directory commits.

Two runs into the same ``out`` share the work: a configuration whose lock another
process holds is skipped (state :data:`BUSY`), and the next run loads what the other
one finished.

On an executor (:mod:`curvinf.executors`, e.g. Ray) this process alone writes ``out``:
it builds each configuration's ground truth with the chunks as the executor's tasks
(writing every chunk as it arrives), then runs each configuration as one task in the
worker's temporary directory, given the configuration's files and its finished
ground-truth store, and writes the files the task returns (``rows.json`` last).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from curvinf.devices import DeviceSpec, model_on, resolve_device
from curvinf.executors import Executor, LocalExecutor, check_executor, chunks_on, make_executor
from curvinf.groundtruth import GroundTruth
from curvinf.models import num_params
from curvinf.storage import (
    CorruptFileError,
    StoreBusyError,
    StoreLock,
    atomic_write,
    check_directory,
    read_blob,
    read_json,
    write_blob,
    write_json,
)
from curvinf.study.compare import config_comparisons
from curvinf.study.measure import config_diagnostics, config_rows, measure_config
from curvinf.study.rungs import RungCache
from curvinf.study.specs import Preset, RunConfig, get_preset, parse_regularization
from curvinf.study.status import DONE, config_status
from curvinf.study.tables import collect, run_dir, write_table
from curvinf.study.truth import config_data, config_ground_truth
from curvinf.validation import check_int, check_number


def run_config(
    config: RunConfig,
    out: str | Path,
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    device: DeviceSpec = "cpu",
) -> list[dict[str, Any]]:
    """Run (or resume, or load) one configuration on ``device`` (retraining, fits, scores;
    what is stored is written from the CPU); return its rows of the results table.

    Every rung scores the ground-truth store's base model (:meth:`GroundTruth.base_model`),
    so a resume with another thread count scores the model the ground truth was built
    around. A finished configuration is read without locking; otherwise the configuration's
    directory is locked (``runs/<id>/.lock``) for the run.

    Raises:
        StoreBusyError: another process is running this configuration, or building its
            ground truth.
    """
    say = log or (lambda msg: None)
    rdir = run_dir(out, config.id)
    done_file = rdir / "rows.json"
    if done_file.exists():
        return read_json(done_file)
    (rdir / "rungs").mkdir(parents=True, exist_ok=True)
    with _config_lock(config, rdir):
        if done_file.exists():  # finished by another process since we looked
            return read_json(done_file)
        return _run_locked_config(config, Path(out), rdir, progress, say, resolve_device(device))


@contextmanager
def _config_lock(config: RunConfig, rdir: Path) -> Iterator[None]:
    """Hold ``rdir/.lock``; a ``StoreBusyError`` naming the configuration if it is taken."""
    lock = StoreLock(rdir, purpose="run")
    try:
        lock.__enter__()
    except StoreBusyError as err:
        raise StoreBusyError(
            f"configuration {config.id} is being run by another process "
            f"(pid {err.pid or 'unknown'})",
            pid=err.pid,
        ) from err
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _run_locked_config(
    config: RunConfig,
    out: Path,
    rdir: Path,
    progress: bool,
    say: Callable[[str], None],
    device: torch.device,
) -> list[dict[str, Any]]:
    """:func:`run_config`'s work, once this process holds the configuration's lock."""
    write_json(rdir / "config.json", config.to_dict())
    t_start = time.perf_counter()
    timing = rdir / "timing.json"
    previous = read_json(timing).get("wall_seconds", 0.0) if timing.exists() else 0.0

    def record_time() -> float:
        """Write the configuration's wall time so far (earlier calls included), so a call
        that is interrupted still counts up to its last finished rung."""
        seconds = time.perf_counter() - t_start
        write_json(timing, {"wall_seconds": previous + seconds, "last_call_seconds": seconds})
        return previous + seconds

    data = config_data(config)
    gt = config_ground_truth(
        config, out / "groundtruth", data=data, progress=progress, log=say, device=device
    )
    loss = torch.nn.CrossEntropyLoss() if config.loss_name == "ce" else torch.nn.MSELoss()
    model, stale = _scored_model(gt, data, rdir, say)
    model, data = model_on(model, device), data.to(device=device)
    gram_cache = rdir / "rungs" / "gram"
    cache = RungCache(config, model, loss, data, say, progress=progress, gram_cache=gram_cache)

    def load(rung: str) -> dict[str, Any] | None:
        file = rdir / "rungs" / f"{rung}.pt"
        return read_blob(file) if file.exists() and not stale else None

    def save(rung: str, blob: dict[str, Any]) -> None:
        write_blob(rdir / "rungs" / f"{rung}.pt", blob)
        record_time()

    blobs = measure_config(config, cache, gt, load, save, say)
    extra = config_comparisons(config, gt, blobs)
    diagnostics = config_diagnostics(config, blobs, extra)
    wall = record_time()
    write_json(rdir / "diagnostics.json", diagnostics)
    rows = config_rows(config, num_params(model), gt, blobs, diagnostics, wall)
    write_json(rdir / "rows.json", rows)
    shutil.rmtree(gram_cache, ignore_errors=True)  # only a finished configuration needed it
    return rows


def _scored_model(
    gt: GroundTruth, data, rdir: Path, say: Callable[[str], None]
) -> tuple[torch.nn.Module, bool]:
    """The model every rung scores: the ground truth's base model, recorded in ``model.pt``.

    Returns it and whether an earlier ``model.pt`` held other weights (an older run that
    trained its own model): its finished rungs scored another model and are recomputed.
    """
    model = gt.base_model(data)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    file = rdir / "model.pt"
    stale = False
    if file.exists():
        try:
            old = read_blob(file)
        except CorruptFileError:
            old = {}
        stale = old.keys() != state.keys() or any(not torch.equal(old[k], state[k]) for k in state)
        if stale:
            say(
                f"  {rdir.name}: model.pt differs from the ground truth's base model; "
                "scoring the base model and recomputing the rungs"
            )
    if stale or not file.exists():
        write_blob(file, state)
    return model, stale


# ---------------------------------------------------------------------------------------
# The grid.


GROUND_TRUTH_DONE = "ground truth done"
"""The state of a configuration whose ground truth a ``groundtruth_only`` run finished."""

BUSY = "skipped (busy)"
"""The state of a configuration another process is running (:func:`run_config` raised
:class:`~curvinf.storage.StoreBusyError`): this run skips it, the other finishes it."""


def _worker(
    config: RunConfig,
    out: str,
    deadline: float | None,
    threads: int,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    groundtruth_only: bool = False,
    device: DeviceSpec = "cpu",
) -> dict:
    """Run one configuration (in this or a worker process) on ``device``, or only build
    its ground truth; never raises."""
    if threads:
        torch.set_num_threads(threads)
    finished = Path(out) / "runs" / config.id / "rows.json"
    if deadline is not None and time.time() > deadline and not finished.exists():
        return {"config": config.id, "state": "not started (time budget)"}
    t0 = time.perf_counter()
    try:
        if groundtruth_only:
            store = Path(out) / "groundtruth"
            gt = config_ground_truth(config, store, progress=progress, log=log, device=device)
            return {
                "config": config.id,
                "state": GROUND_TRUTH_DONE,
                "seconds": time.perf_counter() - t0,
                "store": str(gt.path),
            }
        rows = run_config(config, out, progress=progress, log=log, device=device)
    except StoreBusyError as err:  # another run owns it: not a failure of this one
        return {
            "config": config.id,
            "state": BUSY,
            "error": f"{err}; skipped",
            "seconds": time.perf_counter() - t0,
        }
    except Exception as err:  # recorded, not fatal: the rest of the grid goes on
        return {
            "config": config.id,
            "state": "failed",
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
            "seconds": time.perf_counter() - t0,
        }
    return {"config": config.id, "state": "done", "rows": rows, "seconds": time.perf_counter() - t0}


@dataclass
class GridRun:
    """What :func:`run_grid` did: rows of finished configurations and a log of each."""

    rows: list[dict[str, Any]]
    log: list[dict[str, Any]]
    seconds: float
    table: Path

    @property
    def failed(self) -> list[dict[str, Any]]:
        """Log entries of the configurations that failed."""
        return [e for e in self.log if e["state"] == "failed"]


def select_configs(preset: Preset, only: Iterable[str] | None = None) -> list[RunConfig]:
    """The configurations of ``preset`` whose id starts with one of ``only`` (default: all).

    Raises ``ValueError`` listing the preset's ids if ``only`` matches none of them.
    """
    configs = preset.configs()
    if only is None:
        return configs
    wanted = (only,) if isinstance(only, str) else tuple(only)
    if not wanted or not all(isinstance(w, str) and w for w in wanted):
        raise ValueError(f"only must be non-empty id prefixes, got {wanted!r}.")
    chosen = [c for c in configs if c.id.startswith(wanted)]
    if not chosen:
        raise ValueError(
            f"no configuration of preset {preset.name!r} has an id starting with "
            f"{' or '.join(map(repr, wanted))}; its ids are: {', '.join(c.id for c in configs)}."
        )
    return chosen


def by_remaining_cost(configs: list[RunConfig], out: str | Path) -> list[RunConfig]:
    """``configs`` cheapest first by the work left in ``out``
    (:attr:`~curvinf.study.status.ConfigStatus.seconds_left`; finished ones first), those
    whose stored base model is at chance last: their rows say nothing about the rungs."""

    def key(config: RunConfig) -> tuple[bool, float]:
        status = config_status(config, out)
        return status.at_chance and status.state != DONE, status.seconds_left

    return sorted(configs, key=key)


def _check_max_minutes(max_minutes: float | None) -> None:
    if max_minutes is not None:
        check_number("max_minutes", max_minutes, low=0.0)


def run_grid(
    preset: Preset,
    out: str | Path,
    *,
    workers: int = 1,
    max_minutes: float | None = None,
    only: Iterable[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    groundtruth_only: bool = False,
    executor: Executor | None = None,
    device: DeviceSpec = "cpu",
) -> GridRun:
    """Run every configuration of ``preset`` into ``out`` (skipping finished ones), then write
    the results table.

    Args:
        workers: configurations run in parallel processes (torch threads split among them).
        max_minutes: start no configuration after this many minutes (the running ones finish).
        only: configuration ids or ``d<depth>-w<width>-e<epochs>`` prefixes to run (default
            all); matching none is an error (nothing is written).
        progress: progress bars of the work inside a configuration (``workers=1``).
        groundtruth_only: only build (or resume) every configuration's ground truth, e.g.
            ahead of the rungs in a second process, or on another machine.
        executor: run the ground-truth chunks and the configurations as this executor's
            tasks (e.g. :class:`~curvinf.executors.RayExecutor`), this process alone
            writing ``out`` (module doc); default: this process, or ``workers`` processes.
        device: where retraining, fits and scores run (``cpu``, ``cuda``, ``cuda:N``,
            ``auto``; :func:`curvinf.devices.resolve_device`); results are the same up to
            rounding, so a configuration's id does not depend on it.

    Configurations run cheapest first by the work left (:func:`by_remaining_cost`). A
    configuration another process is running (its lock is held, e.g. a second
    ``reproduce`` into the same ``out``) is skipped with state :data:`BUSY`.
    """
    say = log or (lambda msg: None)
    check_int("workers", workers, low=1)
    _check_max_minutes(max_minutes)
    device = str(resolve_device(device))
    configs = select_configs(preset, only)
    out = check_directory(out, writable=True)
    if not groundtruth_only:  # stored ground truths cost nothing more: their rungs decide
        configs = by_remaining_cost(configs, out)
    out.mkdir(parents=True, exist_ok=True)
    grid_file = out / "grid.json"
    if grid_file.exists():
        stored = read_json(grid_file)
        if stored != json.loads(json.dumps(preset.to_dict())):
            say(f"note: {grid_file} held another preset; finished configurations are kept")
    write_json(grid_file, preset.to_dict())
    t0 = time.time()
    deadline = None if max_minutes is None else t0 + 60.0 * max_minutes
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0
    log_entries: list[dict[str, Any]] = []
    n = len(configs)

    def report(i: int, entry: dict[str, Any]) -> None:
        log_entries.append(entry)
        if entry["state"] == "done":  # the tables grow as configurations finish
            write_tables(out, preset)
        say(f"[{i}/{n}] {entry['config']}: {entry['state']} ({entry.get('seconds', 0):.0f} s)")
        if "error" in entry:
            say(entry["error"])

    if executor is not None:
        entries = _driver_writes(
            configs, out, executor, deadline, groundtruth_only, progress, say, device
        )
    elif workers == 1:  # in this process: the ground truth's progress bar, rung-by-rung log
        started = iter(range(1, n + 1))

        def one(config: RunConfig) -> dict[str, Any]:
            say(f"[{next(started)}/{n}] {config.id}: running")
            return _worker(
                config, str(out), deadline, threads, progress, say, groundtruth_only, device
            )

        entries = (entry for _, entry in LocalExecutor().map(one, configs))
    else:
        local = LocalExecutor(workers)
        entries = (
            entry
            for _, entry in local.map(
                _worker,
                configs,
                str(out),
                deadline,
                threads,
                False,
                None,
                groundtruth_only,
                device,
            )
        )
    for i, entry in enumerate(entries, 1):
        report(i, entry)
    rows, csv_path = write_tables(out, preset)
    seconds = time.time() - t0
    record = {
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pid": os.getpid(),
        "preset": preset.name,
        "workers": workers,
        "max_minutes": max_minutes,
        "seconds": round(seconds, 1),
        "configs": {e["config"]: e["state"] for e in log_entries},
        "config_seconds": {e["config"]: round(e.get("seconds", 0.0), 1) for e in log_entries},
        "errors": {e["config"]: e["error"] for e in log_entries if e["state"] == "failed"},
        "busy": {e["config"]: e["error"] for e in log_entries if e["state"] == BUSY},
    }
    with open(out / "run_log.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    return GridRun(rows, log_entries, seconds, csv_path)


def _driver_writes(
    configs: list[RunConfig],
    out: Path,
    executor: Executor,
    deadline: float | None,
    groundtruth_only: bool,
    progress: bool,
    say: Callable[[str], None],
    device: str = "cpu",
) -> Iterator[dict[str, Any]]:
    """:func:`run_grid`'s entries on ``executor``, this process alone writing ``out``: each
    unfinished configuration's ground truth built here with its chunks as tasks, then the
    configurations as tasks (:func:`_config_task`), their files written as they arrive."""
    tasks = []
    for config in configs:
        if (run_dir(out, config.id) / "rows.json").exists():
            yield _worker(config, str(out), deadline, 0)  # finished: its rows, read here
            continue
        with chunks_on(executor):
            entry = _worker(
                config, str(out), deadline, 0, progress, say, groundtruth_only=True, device=device
            )
        if groundtruth_only or entry["state"] != GROUND_TRUTH_DONE:
            yield entry
            continue
        say(f"{config.id}: ground truth done, running on the {executor.name} executor")
        files = {**_files(out, Path(entry["store"])), **_files(out, run_dir(out, config.id))}
        tasks.append((config, files))
    for _, (entry, files) in executor.map(_config_task, tasks, deadline, device):
        for rel in sorted(files, key=lambda rel: rel.endswith("rows.json")):  # rows.json last
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(out / rel, files[rel])
        yield entry


def _files(root: Path, directory: Path) -> dict[str, bytes]:
    """The plain files under ``directory`` by their path relative to ``root`` (no locks,
    no temporaries: nothing whose name starts with a dot)."""
    if not directory.is_dir():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def _config_task(
    item: tuple[RunConfig, dict[str, bytes]], deadline: float | None, device: str = "cpu"
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Run configuration ``item = (config, files)`` in a temporary directory holding
    ``files`` (its run directory so far and its finished ground-truth store); return its
    entry and the files of its run directory it wrote or changed. It writes no store."""
    config, files = item
    with tempfile.TemporaryDirectory(prefix="curvinf-config-") as tmp:
        root = Path(tmp)
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        entry = _worker(config, tmp, deadline, 0, device=device)
        made = _files(root, run_dir(root, config.id))
    return entry, {rel: data for rel, data in made.items() if files.get(rel) != data}


def collect_rows(out: str | Path, preset: Preset) -> list[dict[str, Any]]:
    """Rows of every finished configuration of ``preset`` in ``out``, in grid order."""
    return collect(out, [c.id for c in preset.configs()])


def write_tables(out: Path, preset: Preset) -> tuple[list[dict[str, Any]], Path]:
    """``results`` and ``comparisons`` tables of every finished configuration; returns the
    rows and the results CSV."""
    ids = [c.id for c in preset.configs()]
    rows = collect(out, ids)
    write_table(collect(out, ids, "comparisons"), out, "comparisons")
    return rows, write_table(rows, out)


@dataclass(frozen=True)
class ReproducePlan:
    """A validated ``reproduce`` request: the grid (overrides applied), where, which
    configurations, how. Built by :func:`reproduce_plan` before any work."""

    grid: Preset
    out: Path
    configs: tuple[RunConfig, ...]
    only: tuple[str, ...] | None
    workers: int
    max_minutes: float | None
    groundtruth_only: bool = False
    executor: str = "local"
    ray_address: str | None = None
    device: str = "cpu"


def reproduce_plan(
    preset: str | Preset,
    out: str | Path,
    *,
    workers: int = 1,
    max_minutes: float | None = None,
    only: Iterable[str] | None = None,
    seeds: Iterable[int] | None = None,
    max_dense_gib: float | None = None,
    matched_steps: bool = False,
    regs: Iterable[str] | None = None,
    groundtruth_only: bool = False,
    executor: str = "local",
    ray_address: str | None = None,
    device: DeviceSpec = "cpu",
) -> ReproducePlan:
    """Check every argument of :func:`reproduce` and return the plan; writes nothing.

    Raises ``ValueError``/``TypeError`` naming the argument (an unknown preset, ``workers``
    < 1, negative ``max_minutes``, seeds that are not integers >= 0, ``max_dense_gib`` <= 0,
    a regulariser that does not parse (:func:`~curvinf.study.specs.parse_regularization`),
    ``only`` matching no configuration, an unknown ``executor``, ``ray_address`` without
    ``executor="ray"``, ``"ray"`` without Ray installed or with ``workers`` > 1, a
    ``device`` that is unknown or not here: :func:`curvinf.devices.resolve_device`),
    ``NotADirectoryError`` if ``out`` is or lies under a file and ``PermissionError`` if it
    cannot be written.
    """
    if isinstance(preset, str):
        grid = get_preset(preset)
    elif isinstance(preset, Preset):
        grid = preset
    else:
        raise TypeError(f"preset must be a preset name or a Preset, got {type(preset).__name__}.")
    check_int("workers", workers, low=1)
    _check_max_minutes(max_minutes)
    check_executor(executor, ray_address)
    target = str(resolve_device(device))
    if executor == "ray" and workers != 1:
        raise ValueError(
            "--workers is for the local executor; on Ray the cluster's CPUs set how many "
            "tasks run at once."
        )
    if seeds is not None:
        grid = replace(grid, seeds=tuple(seeds))
    if max_dense_gib is not None:
        gib = check_number("max_dense_gib", max_dense_gib, low=0.0, strict_low=True)
        grid = replace(grid, max_dense_bytes=gib * 2**30)
    if matched_steps:
        grid = replace(grid, lds=replace(grid.lds, matched_steps=True))
    if regs is not None:
        texts = [regs] if isinstance(regs, str) else list(regs)
        if not texts:
            raise ValueError("regs must name at least one regulariser, e.g. 'eps=1e-4'.")
        grid = replace(grid, regularizations=tuple(parse_regularization(t) for t in texts))
    configs = select_configs(grid, only)
    wanted = None if only is None else tuple((only,) if isinstance(only, str) else only)
    return ReproducePlan(
        grid=grid,
        out=check_directory(out, writable=True),
        configs=tuple(configs),
        only=wanted,
        workers=workers,
        max_minutes=max_minutes,
        groundtruth_only=bool(groundtruth_only),
        executor=executor,
        ray_address=ray_address,
        device=target,
    )


def run_plan(
    plan: ReproducePlan,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[GridRun, Path | None]:
    """Run ``plan``'s grid (resuming finished work) and write the report; return what ran and
    ``out/report.md``, or None when no configuration has finished (nothing to report)."""
    from curvinf.study.report import write_report  # matplotlib only when reporting

    executor = None
    if plan.executor != "local":
        executor = make_executor(plan.executor, ray_address=plan.ray_address, device=plan.device)
    try:
        result = run_grid(
            plan.grid,
            plan.out,
            workers=plan.workers,
            max_minutes=plan.max_minutes,
            only=plan.only,
            progress=progress,
            log=log,
            groundtruth_only=plan.groundtruth_only,
            executor=executor,
            device=plan.device,
        )
    finally:
        if executor is not None:
            executor.close()
    say = log or (lambda msg: None)
    if plan.groundtruth_only:
        done = sum(e["state"] == GROUND_TRUTH_DONE for e in result.log)
        say(f"ground truth of {done} of {len(result.log)} configurations done")
        return result, None
    for e in result.failed:
        say(f"{e['config']} failed: {e['error']}")
    say(f"{len(result.rows)} rows in {result.table} after {result.seconds / 60:.1f} min")
    return result, write_report(plan.out) if result.rows else None


def reproduce(
    preset: str | Preset,
    out: str | Path,
    *,
    workers: int = 1,
    max_minutes: float | None = None,
    only: Iterable[str] | None = None,
    seeds: tuple[int, ...] | None = None,
    max_dense_gib: float | None = None,
    matched_steps: bool = False,
    regs: Iterable[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    device: DeviceSpec = "cpu",
) -> Path:
    """Run (or resume) the grid, then write the report (:func:`reproduce_plan`, then
    :func:`run_plan`).

    ``seeds``, ``max_dense_gib``, ``matched_steps`` and ``regs`` (regularisers as text,
    ``"eps=1e-4"``, ``"damping=1e-3,eps=1e-4"``) override the preset's seeds, dense-matrix
    cap, LDS retraining length and regularisers (a different value gives different
    configuration ids). Every argument is checked before any work. Returns
    ``out/report.md``; raises ``RuntimeError`` if no configuration has finished.
    """
    plan = reproduce_plan(
        preset,
        out,
        workers=workers,
        max_minutes=max_minutes,
        only=only,
        seeds=seeds,
        max_dense_gib=max_dense_gib,
        matched_steps=matched_steps,
        regs=regs,
        executor=executor,
        ray_address=ray_address,
        device=device,
    )
    _, report = run_plan(plan, progress=progress, log=log)
    if report is None:
        raise RuntimeError("no configuration finished, so there is nothing to report.")
    return report


__all__ = [
    "BUSY",
    "GROUND_TRUTH_DONE",
    "GridRun",
    "ReproducePlan",
    "collect_rows",
    "reproduce",
    "reproduce_plan",
    "run_config",
    "run_grid",
    "run_plan",
    "select_configs",
    "write_tables",
]

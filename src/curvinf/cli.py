"""The ``curvinf`` command: one typer app whose sub-commands call the library.

Each sub-command checks its whole command line first (for ``groundtruth`` and
``sweep-regularization`` into a job: :func:`groundtruth_job`, :func:`sweep_job`), then
does the work (:func:`run_groundtruth`, :func:`run_sweep_cli`, or a library function).
The modules a command needs are imported inside it, on purpose: a command loads only
what it uses (the study's plotting and report, ``rich``), so ``curvinf --help`` and the
argument checks answer quickly.

Errors: every sub-command first checks all its arguments, then works. A bad argument
ends the command with one ``error: ...`` line on stderr and exit status 2
(:data:`BAD_ARGUMENT`), before anything is trained or written; a failure during the
work (a damaged store, a diverged model, a busy or read-only directory) with one
``error: ...`` line and exit status 1 (:data:`FAILED`). ``curvinf reproduce`` also exits
with 1 when a configuration failed (the others are kept and reported).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

from curvinf.storage import StoreBusyError

if TYPE_CHECKING:
    import torch

    from curvinf.data import DataSplit
    from curvinf.groundtruth import GroundTruth, GroundTruthConfig
    from curvinf.study.sweep import SweepSettings

BAD_ARGUMENT = 2
FAILED = 1
ARGUMENT_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, OSError)
"""What the checks of a command line raise (``OSError``: an output path that is a file)."""
WORK_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    FloatingPointError,
    OSError,
    StoreBusyError,
)
"""Failures of the work a user can act on; anything else is a bug and keeps its traceback."""
DEVICE_HELP = "where to compute: cpu, cuda, cuda:N or auto (CUDA when available, else the CPU)"

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Influence functions with a measurable ladder of curvature approximations.",
)


def fail(message: object, code: int) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and end the command with ``code``."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise typer.Exit(code)


@contextmanager
def exit_on(code: int, errors: tuple[type[Exception], ...]) -> Iterator[None]:
    """Turn ``errors`` raised inside the block into :func:`fail` with exit status ``code``."""
    try:
        yield
    except errors as err:
        fail(err, code)


def parse_ints(name: str, text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; ``ValueError`` naming the option otherwise."""
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError as err:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}.") from err


@app.command()
def demo(
    depth: int = typer.Option(2, help="hidden layers"),
    width: int = typer.Option(32, help="hidden units per layer"),
    epochs: int = typer.Option(50, help="training epochs"),
    seed: int = typer.Option(0, help="seed for split, init and batches"),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """Train an MLP on UCI digits, score with every rung, print how the rungs agree."""
    from curvinf.devices import resolve_device
    from curvinf.validation import check_int

    with exit_on(BAD_ARGUMENT, ARGUMENT_ERRORS):
        check_int("--depth", depth, low=0)
        check_int("--width", width, low=1)
        check_int("--epochs", epochs, low=1)
        check_int("--seed", seed, low=0)
        where = resolve_device(device)
    from curvinf.demo import run_demo

    with exit_on(FAILED, WORK_ERRORS):
        run_demo(depth=depth, width=width, epochs=epochs, seed=seed, device=where)


@app.command()
def groundtruth(
    out: str = typer.Option(..., help="parent directory of the ground-truth stores"),
    dataset: str = typer.Option("digits", help="digits or diabetes"),
    queries: int = typer.Option(0, help="use the first N query points (0: all)"),
    depth: int = typer.Option(4, help="hidden layers"),
    width: int = typer.Option(64, help="hidden units per layer"),
    activation: str = typer.Option("relu", help="relu, gelu or tanh"),
    epochs: int = typer.Option(100, help="training epochs of the base recipe"),
    lr: float = typer.Option(0.05, help="learning rate"),
    momentum: float = typer.Option(0.9, help="SGD momentum"),
    weight_decay: float = typer.Option(0.0, help="weight decay"),
    batch_size: int = typer.Option(64, help="minibatch size"),
    seed: int = typer.Option(0, help="seed for the split, the initialisation and base batches"),
    subsets: int = typer.Option(100, help="M, random subsets"),
    alpha: float = typer.Option(0.5, help="subset fraction"),
    seeds: int = typer.Option(5, help="R, retraining seeds per subset"),
    subset_seed: int = typer.Option(0, help="seed for the subsets and retraining batch orders"),
    measure: str = typer.Option("loss", help="loss or margin"),
    matched_steps: bool = typer.Option(
        False,
        help="scale epochs by N/|S| so retrains take the base model's steps (default: same epochs)",
    ),
    vary_init: bool = typer.Option(False, help="fresh initialisation per retrained model"),
    chunk: int = typer.Option(0, help="models trained together per chunk (0: from --memory-gib)"),
    memory_gib: float = typer.Option(2.0, help="memory budget of one chunk, GiB"),
    threads: int = typer.Option(0, help="torch threads (0: torch's default; Ray: per task, 1)"),
    repair: bool = typer.Option(False, help="recompute corrupt or missing store files"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    executor: str = typer.Option(
        "local", help="local, or ray: the chunks as Ray tasks (pip install 'curvinf[ray]')"
    ),
    ray_address: str = typer.Option(
        "", help="Ray cluster address with --executor ray (default: start a local Ray instance)"
    ),
    device: str = typer.Option(
        "cpu", help=DEVICE_HELP + "; a store is resumed on the device type it was started on"
    ),
) -> None:
    """Build or resume the LDS ground truth (M subsets x R seeds retrained); print its store."""
    options = dict(locals())
    with exit_on(BAD_ARGUMENT, ARGUMENT_ERRORS):
        job = groundtruth_job(**options)
    with exit_on(FAILED, WORK_ERRORS):
        run_groundtruth(job)


@dataclass(frozen=True)
class GroundTruthJob:
    """A validated ``curvinf groundtruth`` command line, ready for :func:`run_groundtruth`."""

    data: DataSplit
    config: GroundTruthConfig
    out: Path
    models_per_chunk: int | None
    max_memory_bytes: float
    threads: int
    repair: bool
    progress: bool
    executor: str = "local"
    ray_address: str | None = None
    device: torch.device | None = None  # None: the CPU


def groundtruth_job(
    *,
    out: str,
    dataset: str,
    queries: int,
    depth: int,
    width: int,
    activation: str,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    subsets: int,
    alpha: float,
    seeds: int,
    subset_seed: int,
    measure: str,
    matched_steps: bool,
    vary_init: bool,
    chunk: int,
    memory_gib: float,
    threads: int,
    repair: bool,
    progress: bool,
    executor: str = "local",
    ray_address: str = "",
    device: str = "cpu",
) -> GroundTruthJob:
    """Check every ``curvinf groundtruth`` option (before any work) and return the job.

    Raises ``ValueError``/``TypeError`` naming the option, ``NotADirectoryError`` if
    ``out`` is (or lies under) a file.
    """
    from curvinf.data import load_dataset
    from curvinf.devices import resolve_device
    from curvinf.executors import check_executor
    from curvinf.groundtruth import GroundTruthConfig, check_fraction, take_queries
    from curvinf.storage import check_directory
    from curvinf.training import TrainingRecipe
    from curvinf.validation import check_int, check_number

    for name, value, low in (
        ("--depth", depth, 0),
        ("--width", width, 1),
        ("--epochs", epochs, 1),
        ("--batch-size", batch_size, 1),
        ("--seed", seed, 0),
        ("--subsets", subsets, 2),
        ("--seeds", seeds, 1),
        ("--subset-seed", subset_seed, 0),
        ("--chunk", chunk, 0),
        ("--threads", threads, 0),
    ):
        check_int(name, value, low=low)
    check_fraction("--alpha", alpha)
    check_number("--memory-gib", memory_gib, low=0.0, strict_low=True)
    check_executor(executor, ray_address or None)
    where = resolve_device(device)
    out_dir = check_directory(out, name="--out")
    data = take_queries(load_dataset(dataset, seed=seed), queries, name="--queries")
    config = GroundTruthConfig(
        depth=depth,
        width=width,
        activation=activation,
        model_seed=seed,
        recipe=TrainingRecipe(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            batch_size=batch_size,
            epochs=epochs,
            seed=seed,
        ),
        loss="ce" if data.task == "classification" else "mse",
        measure=measure,
        num_subsets=subsets,
        alpha=alpha,
        num_seeds=seeds,
        seed=subset_seed,
        matched_steps=matched_steps,
        vary_init=vary_init,
    )
    return GroundTruthJob(
        data=data,
        config=config,
        out=out_dir,
        models_per_chunk=chunk or None,
        max_memory_bytes=memory_gib * 2**30,
        threads=threads,
        repair=repair,
        progress=progress,
        executor=executor,
        ray_address=ray_address or None,
        device=where,
    )


def run_groundtruth(job: GroundTruthJob) -> GroundTruth:
    """The ``curvinf groundtruth`` command's work: build or resume the store of ``job``,
    print a summary (stderr) and the store's path (stdout)."""
    import torch
    from rich.console import Console

    from curvinf.executors import make_executor
    from curvinf.groundtruth import RetrainingWarning, ground_truth

    console = Console(stderr=True)
    if job.threads:
        torch.set_num_threads(job.threads)
    device = job.device or torch.device("cpu")
    with (
        make_executor(
            job.executor, ray_address=job.ray_address, threads=job.threads, device=device
        ) as executor,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", RetrainingWarning)  # printed below instead
        gt = ground_truth(
            job.data,
            job.config,
            job.out,
            progress=job.progress,
            models_per_chunk=job.models_per_chunk,
            max_memory_bytes=job.max_memory_bytes,
            repair=job.repair,
            log=lambda msg: console.print(msg, style="yellow"),
            executor=executor,
            device=device,
        )
    summary = gt.summary()["retrained_median"]
    console.print(
        f"{job.config.num_models} models ({gt.models_trained} trained now), "
        f"{gt.manifest['cost']['wall_s_total']:.1f} s in all; median retrained train loss "
        f"{summary['train_loss']:.4g}, query loss {summary['query_loss']:.4g}; base model "
        f"{gt.base['train_loss']:.4g}, {gt.base['query_loss']:.4g}"
    )
    for msg in gt.warnings:
        console.print(f"WARNING: {msg}", style="bold red")
    print(gt.path)
    return gt


@app.command()
def reproduce(
    preset: str = typer.Option(
        "quick",
        help="quick (minutes), paper or paper-code (the full grid, two protocols), cnn or "
        "transformer (weight sharing)",
    ),
    out: str = typer.Option("", help="result directory (default: results/<preset>)"),
    workers: int = typer.Option(1, help="configurations run in parallel processes"),
    max_minutes: float = typer.Option(0, help="start no configuration after this (0: no limit)"),
    only: list[str] = typer.Option([], help="run only configuration ids with this prefix"),
    seeds: str = typer.Option("", help="comma-separated seeds overriding the preset's"),
    max_dense_gib: float = typer.Option(0, help="cap on one dense matrix, GiB (0: preset's)"),
    matched_steps: bool = typer.Option(
        False, help="retrain LDS subsets for the base model's number of steps"
    ),
    reg: list[str] = typer.Option(
        [],
        help="a regulariser replacing the preset's, e.g. eps=1e-4 or damping=1e-3,eps=1e-4 "
        "(repeat for several)",
    ),
    groundtruth_only: bool = typer.Option(
        False, help="only build every configuration's LDS ground truth (no rungs, no report)"
    ),
    progress: bool = typer.Option(True, help="show progress"),
    executor: str = typer.Option(
        "local",
        help="local, or ray: ground-truth chunks and configurations as Ray tasks "
        "(pip install 'curvinf[ray]')",
    ),
    ray_address: str = typer.Option(
        "", help="Ray cluster address with --executor ray (default: start a local Ray instance)"
    ),
    device: str = typer.Option(
        "cpu", help=DEVICE_HELP + "; retraining, fits and scores (configuration ids unchanged)"
    ),
) -> None:
    """Run the study's grid (resuming finished work) and write report.md with figures."""
    from rich.console import Console

    from curvinf.study.runner import reproduce_plan, run_plan
    from curvinf.validation import check_int, check_number

    with exit_on(BAD_ARGUMENT, ARGUMENT_ERRORS):
        check_int("--workers", workers, low=1)
        check_number("--max-minutes", max_minutes, low=0.0)
        check_number("--max-dense-gib", max_dense_gib, low=0.0)
        plan = reproduce_plan(
            preset,
            out or f"results/{preset}",
            workers=workers,
            max_minutes=max_minutes or None,
            only=only or None,
            seeds=parse_ints("--seeds", seeds) if seeds else None,
            max_dense_gib=max_dense_gib or None,
            matched_steps=matched_steps,
            regs=reg or None,
            groundtruth_only=groundtruth_only,
            executor=executor,
            ray_address=ray_address or None,
            device=device,
        )
    with exit_on(FAILED, WORK_ERRORS):
        result, path = run_plan(plan, progress=progress, log=Console(stderr=True).print)
    if plan.groundtruth_only:
        if result.failed:
            ids = ", ".join(e["config"] for e in result.failed)
            fail(
                f"the ground truth of {len(result.failed)} configuration(s) failed: {ids}.", FAILED
            )
        return
    if path is None:
        fail(
            f"no configuration finished, so there is nothing to report; see "
            f"{plan.out / 'run_log.jsonl'} (a larger --max-minutes, or rerun when the other "
            "process is done).",
            FAILED,
        )
    print(path)
    if result.failed:
        ids = ", ".join(e["config"] for e in result.failed)
        fail(
            f"{len(result.failed)} configuration(s) failed: {ids}; their errors are in "
            f"{plan.out / 'run_log.jsonl'} (the report covers the rest).",
            FAILED,
        )


@app.command()
def report(
    out: str = typer.Argument(..., help="result directory of `curvinf reproduce`"),
    against: list[str] = typer.Option(
        [],
        "--against",
        help="another result directory (e.g. the other protocol) to set beside this one; "
        "repeatable",
    ),
) -> None:
    """Redraw report.md and its figures from the stored results in OUT."""
    from pathlib import Path

    from curvinf.study.report import write_report

    with exit_on(BAD_ARGUMENT, ARGUMENT_ERRORS):
        for d in (out, *against):
            if not (Path(d) / "results.jsonl").is_file():
                raise ValueError(
                    f"{d} holds no results.jsonl; run `curvinf reproduce --out {d}` first."
                )
    with exit_on(FAILED, WORK_ERRORS):
        print(write_report(out, against=against))


@app.command("fill-tables")
def fill_tables_command(
    doc: str = typer.Argument(..., help="markdown document with table markers"),
    root: str = typer.Option(".", help="directory the markers' result paths are relative to"),
) -> None:
    """Redraw every table of DOC marked '<!-- table kind=... dirs=... reg=... -->' ...
    '<!-- /table -->' from the stored results (curvinf.study.doctables)."""
    from pathlib import Path

    from curvinf.study.doctables import fill_tables

    with exit_on(BAD_ARGUMENT, ARGUMENT_ERRORS):  # every marker is checked before writing
        if not Path(doc).is_file():
            raise ValueError(f"{doc} is not a file.")
        print(f"{doc}: {fill_tables(doc, root)} tables redrawn")


@app.command()
def status(
    out: str = typer.Argument(..., help="result directory of `curvinf reproduce`"),
) -> None:
    """Print how far the grid in OUT has got: per configuration its ground truth, rungs,
    state (running ones with their pid) and wall time. Reads only; safe beside a run."""
    from rich.console import Console
    from rich.table import Table

    from curvinf.study.status import DONE, RUNNING, grid_status

    with exit_on(BAD_ARGUMENT, ARGUMENT_ERRORS):
        preset, rows = grid_status(out)
    table = Table(title=f"{out}: preset {preset.name}")
    table.add_column("configuration", no_wrap=True, min_width=max(len(r.config) for r in rows))
    for col in ("ground truth", "rungs", "state", "wall", "left (rough)"):
        table.add_column(col, justify="left" if col == "state" else "right", no_wrap=True)
    for r in rows:
        state = f"{r.state} (pid {r.pid})" if r.state == RUNNING else r.state
        state += " (at chance)" if r.at_chance else ""
        wall = "" if r.seconds is None else f"{r.seconds / 60:.1f} min"
        gt = "complete" if r.ground_truth_complete else f"{r.models_done}/{r.models_total}"
        left = f"{r.seconds_left / 3600:.1f} h" if r.seconds_left else ""
        table.add_row(r.config, gt, f"{r.rungs_done}/{r.rungs_total}", state, wall, left)
    console = Console(width=None if sys.stdout.isatty() else 120)  # ids and all columns
    console.print(table)
    done = sum(r.state == DONE for r in rows)
    stores = sum(r.ground_truth_complete for r in rows)
    console.print(
        f"{done}/{len(rows)} configurations done, {stores}/{len(rows)} ground truths complete, "
        f"{sum(r.state == RUNNING for r in rows)} running; roughly "
        f"{sum(r.seconds_left for r in rows) / 3600:.1f} h of work left for one job on 2 busy "
        "cores (RunConfig.cost, a factor of 2 either way; two jobs side by side halve it)"
    )


@app.command("sweep-regularization")
def sweep_regularization(
    out: str = typer.Option(..., help="sweep directory (rows, ground-truth store, figures)"),
    dataset: str = typer.Option("digits", help="digits or diabetes"),
    depth: int = typer.Option(1, help="hidden layers"),
    width: int = typer.Option(32, help="hidden units per layer"),
    epochs: int = typer.Option(100, help="training epochs"),
    lr: float = typer.Option(0.05, help="learning rate"),
    seed: int = typer.Option(0, help="seed for split, init, batches and subsets"),
    subsets: int = typer.Option(100, help="M, LDS subsets"),
    seeds: int = typer.Option(1, help="R, retraining seeds per subset"),
    queries: int = typer.Option(0, help="use the first N query points (0: all)"),
    rungs: str = typer.Option("hessian,ggn,block_ggn,ekfac,kfac", help="comma-separated rungs"),
    eps: str = typer.Option("1e-8,1e-7,1e-6,1e-5,1e-4,1e-3,1e-2", help="truncation grid (δ=0)"),
    damping: str = typer.Option(
        "1e-8,1e-7,1e-6,1e-5,1e-4,1e-3,1e-2,1e-1", help="damping grid (ε=0)"
    ),
    product: bool = typer.Option(False, help="also every (ε, δ) pair"),
    relative: bool = typer.Option(False, help="ε relative to the largest eigenvalue"),
    cg_damping: str = typer.Option("1e-6,1e-4,1e-2", help="CG on the exact GGN ('' : none)"),
    cg_queries: int = typer.Option(16, help="right-hand sides of the CG rows"),
    cg_max_iter: int = typer.Option(500, help="CG iteration cap"),
    figures: str = typer.Option("", help="figure directory (default: OUT/figures)"),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """Sweep damping and truncation for every rung: LDS, error vs the Hessian, pathologies."""
    options = dict(locals())
    with exit_on(BAD_ARGUMENT, ARGUMENT_ERRORS):
        job = sweep_job(**options)
    with exit_on(FAILED, WORK_ERRORS):
        run_sweep_cli(job)


@dataclass(frozen=True)
class SweepJob:
    """A validated ``curvinf sweep-regularization`` command line, for :func:`run_sweep_cli`."""

    settings: SweepSettings
    out: Path
    figures: Path
    threads: int
    progress: bool
    device: str = "cpu"


def sweep_job(
    *,
    out: str,
    dataset: str,
    depth: int,
    width: int,
    epochs: int,
    lr: float,
    seed: int,
    subsets: int,
    seeds: int,
    queries: int,
    rungs: str,
    eps: str,
    damping: str,
    product: bool,
    relative: bool,
    cg_damping: str,
    cg_queries: int,
    cg_max_iter: int,
    figures: str,
    threads: int,
    progress: bool,
    device: str = "cpu",
) -> SweepJob:
    """Check every ``curvinf sweep-regularization`` option (before any work); return the job.

    Raises ``ValueError``/``TypeError`` naming the option, ``NotADirectoryError`` if
    ``out`` or ``figures`` is (or lies under) a file, ``PermissionError`` if one cannot
    be written.
    """
    from curvinf.data import load_dataset
    from curvinf.devices import resolve_device
    from curvinf.groundtruth import take_queries
    from curvinf.storage import check_directory
    from curvinf.study.sweep import SweepSettings
    from curvinf.validation import check_int

    def floats(name: str, text: str) -> tuple[float, ...]:
        try:
            return tuple(float(t) for t in text.split(",") if t.strip())
        except ValueError as err:
            raise ValueError(f"--{name} must be comma-separated numbers, got {text!r}.") from err

    check_int("--threads", threads, low=0)
    check_int("--seed", seed, low=0)
    settings = SweepSettings(
        dataset=dataset,
        depth=depth,
        width=width,
        epochs=epochs,
        lr=lr,
        seed=seed,
        subsets=subsets,
        seeds=seeds,
        num_queries=queries,
        rungs=tuple(r.strip() for r in rungs.split(",") if r.strip()),
        eps_grid=floats("eps", eps),
        damping_grid=floats("damping", damping),
        product=product,
        relative=relative,
        cg_damping=floats("cg-damping", cg_damping),
        cg_queries=cg_queries,
        cg_max_iter=cg_max_iter,
    )
    take_queries(load_dataset(dataset, seed=seed), queries, name="--queries")  # not too many
    return SweepJob(
        settings=settings,
        out=check_directory(out, name="--out", writable=True),
        figures=check_directory(figures or Path(out) / "figures", name="--figures", writable=True),
        threads=threads,
        progress=progress,
        device=str(resolve_device(device)),
    )


def run_sweep_cli(job: SweepJob) -> None:
    """The ``curvinf sweep-regularization`` command's work: run, plot, print a summary."""
    import torch

    from curvinf.study.sweep import plot_sweep, run_sweep, summary_table

    if job.threads:
        torch.set_num_threads(job.threads)
    t0 = time.perf_counter()
    rows = run_sweep(job.settings, job.out, progress=job.progress, device=job.device)
    figs = plot_sweep(rows, job.figures)
    print(summary_table(rows))
    print(f"{len(rows)} rows in {job.out / 'sweep.csv'}; figures: {', '.join(map(str, figs))}")
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":  # pragma: no cover
    app()

"""The study as a grid: presets, one configuration's run, a resumable result store.

A :class:`Preset` is a grid over depth x width x training epochs x seeds; each
point is a :class:`RunConfig` (one base model). For every configuration,
:func:`run_config`

1. builds or loads the LDS ground truth (:func:`curvinf.groundtruth.ground_truth`:
   ``M`` subsets of fraction ``α`` retrained ``R`` times),
2. takes the base model from the ground-truth store (:meth:`GroundTruth.base_model`),
   so every rung scores the very weights the ground truth was built around, whatever
   the thread count of a resume,
3. fits every rung, scores all queries against all training points under every
   regularisation, and computes the LDS with its bootstrap CI,
4. measures each rung's error against the reference rung (the Hessian):
   ``‖C̃⁺ − H⁺‖_F / ‖H⁺‖_F`` and the same in influence space, the ladder's error
   shares, and the diagnostics of :mod:`curvinf.diagnostics`.

Result store (``out``)::

    out/
      grid.json                       the preset that was run
      results.csv, results.jsonl      one row per configuration x regularisation x rung
      run_log.jsonl                   one line per invocation: what ran, how long
      groundtruth/<store>/            LDS ground truth stores (resumable, see groundtruth)
      runs/<config id>/
        config.json                   the configuration
        .lock                         held (flock, pid inside) by the process running it
        model.pt                      the scored model: the ground truth's base model
        rungs/<rung>.pt               per rung: fit time, spectrum, scores, LDS, errors, diagnostics
        diagnostics.json              off-block mass, basis overlap curves, mismatches, shares
        rows.json                     the configuration's rows; its presence marks it done

Every file is written atomically (:mod:`curvinf.storage`), so a run killed at any
point resumes: finished configurations are skipped, finished rungs of an
unfinished configuration are loaded, the ground truth resumes from its last chunk.
A rung that cannot be computed (a dense matrix over ``max_dense_bytes``) becomes a
``skipped`` row with the reason.

Two runs into the same ``out`` share the work: a configuration whose lock another
process holds is skipped (state :data:`BUSY`, "configuration X is being run by another
process (pid N); skipped"), and the next run loads what the other one finished.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from curvinf import storage
from curvinf.curvature import Curvature, Regularization, fit_curvature
from curvinf.data import DATASETS, load_dataset
from curvinf.diagnostics import (
    error_shares,
    influence_error,
    inverse_error,
    layer_basis_overlap,
    negative_eigenvalues,
    off_block_mass,
    relative_frobenius_error,
    spectrum_mismatch,
)
from curvinf.groundtruth import GroundTruth, check_fraction, take_queries
from curvinf.influence import influence_scores
from curvinf.losses import MEASURES
from curvinf.models import num_params
from curvinf.names import DENSE_RUNGS, KRONECKER_RUNGS, LADDER, LADDER_STEPS, METHODS
from curvinf.params import param_blocks
from curvinf.storage import (
    CorruptFileError,
    StoreBusyError,
    StoreLock,
    check_directory,
    read_blob,
    read_json,
    request_hash,
    write_blob,
    write_json,
)
from curvinf.training import TrainingRecipe
from curvinf.validation import check_choice, check_int, check_number

COLUMNS = (
    "config",
    "dataset",
    "depth",
    "width",
    "epochs",
    "seed",
    "num_params",
    "rung",
    "reg",
    "damping",
    "eps",
    "relative",
    "status",
    "reason",
    "lds",
    "lds_ci_low",
    "lds_ci_high",
    "lds_queries",
    "inverse_error",
    "influence_error",
    "step",
    "share_inverse",
    "share_influence",
    "rank",
    "fit_seconds",
    "score_seconds",
    "off_block_mass",
    "negative_eigenvalues",
    "spectrum_mismatch",
    "overlap_k10",
    "base_train_loss",
    "base_query_loss",
    "base_query_accuracy",
    "num_subsets",
    "num_seeds",
    "alpha",
    "gt_warnings",
)
"""Columns of the results table, one row per configuration x regularisation x rung.

``inverse_error``/``influence_error``: against the reference rung under the same
regularisation. ``step``/``share_*``: the ladder step that *ends* at this rung and
its share of the total error gap (:data:`curvinf.diagnostics.LADDER_STEPS`).
``off_block_mass``: of the dense rung itself (hessian, ggn rows). ``negative_eigenvalues``:
of the rung's spectrum. ``spectrum_mismatch``: sorted-spectrum error against block_ggn.
``overlap_k10``: mean over layers of the top-10 basis overlap with block_ggn
(K-FAC/EK-FAC rows). ``gt_warnings``: how many health warnings the ground truth raised."""


def reg_label(reg: Regularization) -> str:
    """A short, file-safe name: ``eps1e-04`` or ``damp1e-03+eps0+rel``."""
    parts = []
    if reg.damping:
        parts.append(f"damp{reg.damping:.0e}")
    parts.append(f"eps{reg.eps:.0e}" if reg.eps else "eps0")
    if reg.relative:
        parts.append("rel")
    return "+".join(parts)


@dataclass(frozen=True)
class LDSSettings:
    """How the LDS ground truth is built and scored.

    ``num_subsets`` (M) subsets of fraction ``alpha``, each retrained ``num_seeds`` (R)
    times (batch order varies, initialisation shared) with the subsets seeded by
    ``seed``; ``num_queries`` the first queries of the split (0: all); ``measure``
    ``loss`` or ``margin``; ``num_bootstrap`` resamples of the CI; ``matched_steps``
    retrains subsets for ``epochs · N / |S|`` epochs (the base model's number of steps)
    instead of the base epochs (Park et al.'s protocol, the default).
    """

    num_subsets: int = 100
    alpha: float = 0.5
    num_seeds: int = 1
    seed: int = 0
    num_queries: int = 0
    measure: str = "loss"
    num_bootstrap: int = 1000
    matched_steps: bool = False

    def __post_init__(self) -> None:
        check_choice("measure", self.measure, MEASURES)
        check_int("num_subsets", self.num_subsets, low=2)
        check_fraction("alpha", self.alpha)
        check_int("num_seeds", self.num_seeds, low=1)
        check_int("seed", self.seed, low=0)
        check_int("num_queries", self.num_queries, low=0)
        check_int("num_bootstrap", self.num_bootstrap, low=0)
        if not isinstance(self.matched_steps, bool):
            raise TypeError(f"matched_steps must be True or False, got {self.matched_steps!r}.")


def _check_ints(name: str, values: tuple[int, ...], low: int) -> None:
    if not values:
        raise ValueError(f"{name} must not be empty.")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
        raise ValueError(f"{name} must be integers >= {low}, got {values}.")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {values}.")


@dataclass(frozen=True)
class RunConfig:
    """One configuration of the grid: one base model, every rung and regularisation on it."""

    depth: int
    width: int
    epochs: int
    seed: int = 0
    dataset: str = "digits"
    recipe: TrainingRecipe = field(default_factory=TrainingRecipe)
    rungs: tuple[str, ...] = LADDER
    regularizations: tuple[Regularization, ...] = (Regularization.paper(),)
    lds: LDSSettings = field(default_factory=LDSSettings)
    reference: str = "hessian"
    fisher: str = "type2"
    max_dense_bytes: float = 2**30

    def __post_init__(self) -> None:
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("reference", self.reference, METHODS)
        _check_ints("depth", (self.depth,), 0)
        _check_ints("width/epochs", (self.width, self.epochs), 1)
        check_int("seed", self.seed, low=0)
        if not self.rungs or len(set(self.rungs)) != len(self.rungs):
            raise ValueError(f"rungs must be non-empty and distinct, got {self.rungs}.")
        for r in self.rungs:
            check_choice("rung", r, METHODS)
        if not self.regularizations or not all(
            isinstance(r, Regularization) for r in self.regularizations
        ):
            raise ValueError("regularizations must be a non-empty tuple of Regularization.")
        check_number("max_dense_bytes", self.max_dense_bytes, low=0.0, strict_low=True)

    @property
    def recipe_used(self) -> TrainingRecipe:
        """The base recipe with this configuration's epochs and seed."""
        return replace(self.recipe, epochs=self.epochs, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["recipe"] = self.recipe_used.to_dict()
        d["regularizations"] = [asdict(r) for r in self.regularizations]
        d["rungs"] = list(self.rungs)
        if not self.lds.matched_steps:  # the default is left out: ids of older runs stay valid
            del d["lds"]["matched_steps"]
        return d

    @property
    def id(self) -> str:
        """``d<depth>-w<width>-e<epochs>-s<seed>-<hash8>``; the hash covers every setting."""
        return (
            f"d{self.depth}-w{self.width}-e{self.epochs}-s{self.seed}-"
            f"{request_hash(self.to_dict())[:8]}"
        )

    @property
    def num_params(self) -> int:
        """D of the MLP (digits: 64 inputs, 10 outputs; diabetes: 10 inputs, 1 output)."""
        return sum(self.layer_sizes)

    def cost(self) -> float:
        """Rough seconds on 2 busy cores, for running cheap configurations first: retraining
        (models x epochs x D) plus, when the dense rungs fit, their ``O(D³)`` eigh and errors."""
        D = self.num_params
        retrain = 1e-5 * D * self.epochs * (self.lds.num_subsets * self.lds.num_seeds + 2)
        dense = 4e-9 * D**3 if 8.0 * D * D <= self.max_dense_bytes else 0.0
        blocks = [d for d in self.layer_sizes if 8.0 * d * d <= self.max_dense_bytes]
        return retrain + dense + 4e-9 * sum(d**3 for d in blocks)

    @property
    def layer_sizes(self) -> list[int]:
        """Parameters per layer (weight and bias), the block-GGN's block sizes."""
        n_in, n_out = (64, 10) if self.dataset == "digits" else (10, 1)
        fans = [n_in] + [self.width] * self.depth
        outs = [self.width] * self.depth + [n_out]
        return [(a + 1) * b for a, b in zip(fans, outs, strict=True)]

    def groundtruth_config(self):
        from curvinf.groundtruth import GroundTruthConfig

        return GroundTruthConfig(
            depth=self.depth,
            width=self.width,
            model_seed=self.seed,
            recipe=self.recipe_used,
            loss="ce" if self.dataset == "digits" else "mse",
            measure=self.lds.measure,
            num_subsets=self.lds.num_subsets,
            alpha=self.lds.alpha,
            num_seeds=self.lds.num_seeds,
            seed=self.lds.seed,
            matched_steps=self.lds.matched_steps,
        )


@dataclass(frozen=True)
class Preset:
    """A grid: ``depths x widths x epochs x seeds`` configurations sharing everything else."""

    name: str
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    epochs: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)
    rungs: tuple[str, ...] = LADDER
    regularizations: tuple[Regularization, ...] = (Regularization.paper(),)
    lds: LDSSettings = field(default_factory=LDSSettings)
    dataset: str = "digits"
    recipe: TrainingRecipe = field(default_factory=TrainingRecipe)
    reference: str = "hessian"
    fisher: str = "type2"
    max_dense_bytes: float = 2**30
    description: str = ""

    def __post_init__(self) -> None:
        _check_ints("depths", self.depths, 0)
        _check_ints("widths", self.widths, 1)
        _check_ints("epochs", self.epochs, 1)
        _check_ints("seeds", self.seeds, 0)
        self.configs()  # validates the rest through RunConfig

    def configs(self) -> list[RunConfig]:
        """Every configuration, cheapest first (so a time-limited run covers the most)."""
        out = [
            RunConfig(
                depth=d,
                width=w,
                epochs=e,
                seed=s,
                dataset=self.dataset,
                recipe=self.recipe,
                rungs=self.rungs,
                regularizations=self.regularizations,
                lds=self.lds,
                reference=self.reference,
                fisher=self.fisher,
                max_dense_bytes=self.max_dense_bytes,
            )
            for d in self.depths
            for w in self.widths
            for e in self.epochs
            for s in self.seeds
        ]
        return sorted(out, key=lambda c: (c.cost(), c.depth, c.width, c.epochs, c.seed))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["regularizations"] = [asdict(r) for r in self.regularizations]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preset:
        d = dict(d)
        d["regularizations"] = tuple(Regularization(**r) for r in d["regularizations"])
        d["lds"] = LDSSettings(**d["lds"])
        d["recipe"] = TrainingRecipe(**d["recipe"])
        for k in ("depths", "widths", "epochs", "seeds", "rungs"):
            d[k] = tuple(d[k])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        name="paper",
        depths=(1, 4, 8),
        widths=(32, 64, 128),
        epochs=(10, 100, 1000),
        seeds=(0,),
        lds=LDSSettings(num_subsets=100, alpha=0.5, num_seeds=1),
        max_dense_bytes=2**30,
        description=(
            "The paper's grid: UCI digits, MLPs of depth {1, 4, 8} x width {32, 64, 128}, "
            "trained {10, 100, 1000} epochs (SGD, momentum 0.9, lr 0.05, batch 64); all five "
            "rungs, eigenvalue truncation eps = 1e-4, no damping; LDS with 100 subsets of "
            "alpha = 0.5, one retraining per subset, one seed (all a 2-core machine allows). "
            "Dense matrices are capped at 1 GiB (D <= 11,585): larger dense rungs are skipped."
        ),
    ),
    "quick": Preset(
        name="quick",
        depths=(1,),
        widths=(32,),
        epochs=(10, 100),
        seeds=(0,),
        lds=LDSSettings(num_subsets=50, alpha=0.5, num_seeds=1, num_bootstrap=500),
        max_dense_bytes=2**30,
        description=(
            "A corner of the paper grid that runs in minutes on 2 cores: depth 1, width 32 "
            "(D = 2,410), 10 and 100 epochs, all five rungs, eps = 1e-4; LDS with 50 subsets "
            "of alpha = 0.5, one retraining each."
        ),
    ),
}


def get_preset(name: str) -> Preset:
    check_choice("preset", name, PRESETS)
    return PRESETS[name]


# ---------------------------------------------------------------------------------------
# One configuration.


def _nan_if_none(v: Any) -> float:
    return math.nan if v is None else float(v)


class _Rungs:
    """Fitted curvatures of one configuration, fitted lazily and kept for reuse."""

    def __init__(self, config: RunConfig, model, loss, data, say: Callable[[str], None]) -> None:
        self.config, self.model, self.loss, self.data, self.say = config, model, loss, data, say
        self.fitted: dict[str, Curvature] = {}
        self.failed: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self._inverses: dict[tuple[str, str], Any] = {}

    def get(self, rung: str) -> Curvature | None:
        """The fitted rung, or None (the reason in ``failed``) if it cannot be computed."""
        if rung in self.fitted or rung in self.failed:
            return self.fitted.get(rung)
        t0 = time.perf_counter()
        try:
            curv = fit_curvature(
                rung,
                self.model,
                self.loss,
                *self.data.train,
                fisher=self.config.fisher,
                seed=self.config.seed,
                max_dense_bytes=self.config.max_dense_bytes,
            )
            curv.eigen()  # the decomposition is part of the fit's cost
        except (ValueError, MemoryError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and "memory" not in str(err).lower():
                raise
            self.failed[rung] = f"{type(err).__name__}: {err}"
            self.say(f"  {rung}: skipped ({self.failed[rung]})")
            return None
        self.seconds[rung] = time.perf_counter() - t0
        self.fitted[rung] = curv
        return curv

    def inverse(self, rung: str, reg: Regularization):
        """``C⁺`` under ``reg``, cached; ``ValueError`` if ``reg`` cannot invert this rung."""
        key = (rung, reg_label(reg))
        if key not in self._inverses:
            curv = self.get(rung)
            if curv is None:
                raise ValueError(f"{rung} is not available: {self.failed[rung]}")
            self._inverses[key] = curv.inverse(reg)
        return self._inverses[key]


def _rung_result(
    rung: str,
    rungs: _Rungs,
    config: RunConfig,
    gt,
    ref_scores: dict[str, torch.Tensor] | None,
) -> dict[str, Any]:
    """Everything measured for one rung (a blob; tensors stay tensors)."""
    curv = rungs.get(rung)
    if curv is None:
        return {"status": "skipped", "reason": rungs.failed[rung]}
    data, model, loss = rungs.data, rungs.model, rungs.loss
    evals = curv.eigenvalues()
    out: dict[str, Any] = {
        "status": "ok",
        "reason": "",
        "fit_seconds": rungs.seconds[rung],
        "spectrum": evals.to(torch.float64),
        "negative_eigenvalues": negative_eigenvalues(evals),
        "per_reg": {},
    }
    if rung in DENSE_RUNGS or rung in ("block_hessian",):
        blocks = [b.index for b in param_blocks(model, "layer")]
        out["off_block_mass"] = off_block_mass(curv.dense(), blocks) if rung in DENSE_RUNGS else 0.0
    ref_ok = rungs.get(config.reference) is not None
    for reg in config.regularizations:
        label = reg_label(reg)
        t0 = time.perf_counter()
        try:
            inv = rungs.inverse(rung, reg)
        except ValueError as err:  # e.g. indefinite Hessian with eps = 0
            out["per_reg"][label] = {"status": "skipped", "reason": f"ValueError: {err}"}
            continue
        scores = influence_scores(
            model, loss, inv, train=data.train, query=data.query, measure=config.lds.measure
        )
        res = gt.lds(scores, num_bootstrap=config.lds.num_bootstrap, seed=config.lds.seed)
        entry: dict[str, Any] = {
            "scores": scores.to(torch.float32),
            "rank": inv.rank,
            "lds": res.mean,
            "lds_ci_low": res.ci_low,
            "lds_ci_high": res.ci_high,
            "lds_queries": res.num_valid,
            "lds_per_query": res.per_query,
            "inverse_error": math.nan,
            "influence_error": math.nan,
        }
        if rung == config.reference:
            entry["inverse_error"] = entry["influence_error"] = 0.0
        elif ref_ok and ref_scores is not None and label in ref_scores:
            entry["inverse_error"] = inverse_error(inv, rungs.inverse(config.reference, reg))
            entry["influence_error"] = influence_error(scores.double(), ref_scores[label].double())
        entry["score_seconds"] = time.perf_counter() - t0
        out["per_reg"][label] = entry
    if rung in KRONECKER_RUNGS:
        block = rungs.get("block_ggn")
        if block is not None:
            curves = layer_basis_overlap(block, curv)
            out["basis_overlap"] = {name: dict(c) for name, c in curves.items()}
            out["spectrum_mismatch"] = spectrum_mismatch(evals, block.eigenvalues())
    if rung == "kfac":
        ekfac = rungs.get("ekfac")
        if ekfac is not None:  # same basis: compare eigenvalue by eigenvalue
            a = torch.cat([b.eigenvalues.reshape(-1) for b in curv.eigen()])
            e = torch.cat([b.eigenvalues.reshape(-1) for b in ekfac.eigen()])
            out["eigenvalue_mismatch_vs_ekfac"] = relative_frobenius_error(a, e)
    return out


def _ref_scores(blob: dict[str, Any] | None) -> dict[str, torch.Tensor] | None:
    if blob is None or blob.get("status") != "ok":
        return None
    return {label: e["scores"] for label, e in blob["per_reg"].items() if "scores" in e}


def run_config(
    config: RunConfig,
    out: str | Path,
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume, or load) one configuration; return its rows of the results table.

    Every rung scores the ground-truth store's base model (:meth:`GroundTruth.base_model`),
    so a resume with another thread count scores the model the ground truth was built
    around. A finished configuration is read without locking; otherwise the configuration's
    directory is locked (``runs/<id>/.lock``) for the run.

    Raises:
        StoreBusyError: another process is running this configuration, or building its
            ground truth.
    """
    say = log or (lambda msg: None)
    run_dir = Path(out) / "runs" / config.id
    done_file = run_dir / "rows.json"
    if done_file.exists():
        return read_json(done_file)
    (run_dir / "rungs").mkdir(parents=True, exist_ok=True)
    with _config_lock(config, run_dir):
        if done_file.exists():  # finished by another process since we looked
            return read_json(done_file)
        return _run_locked_config(config, Path(out), run_dir, progress, say)


@contextmanager
def _config_lock(config: RunConfig, run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.lock``; a ``StoreBusyError`` naming the configuration if it is taken."""
    lock = StoreLock(run_dir, purpose="run")
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
    config: RunConfig, out: Path, run_dir: Path, progress: bool, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """:func:`run_config`'s work, once this process holds the configuration's lock."""
    import warnings

    from curvinf.groundtruth import RetrainingWarning, ground_truth

    write_json(run_dir / "config.json", config.to_dict())
    t_start = time.perf_counter()
    data = take_queries(load_dataset(config.dataset, seed=config.seed), config.lds.num_queries)
    gt_config = config.groundtruth_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RetrainingWarning)  # kept in gt.warnings and the table
        try:
            gt = ground_truth(data, gt_config, out / "groundtruth", progress=progress, log=say)
        except StoreBusyError as err:
            raise StoreBusyError(
                f"the ground truth of configuration {config.id} is being built by another "
                f"process (pid {err.pid or 'unknown'})",
                pid=err.pid,
            ) from err
    loss = gt_config.make_loss()
    model, stale = _scored_model(gt, data, run_dir, say)

    rungs = _Rungs(config, model, loss, data, say)
    order = [config.reference] + [r for r in config.rungs if r != config.reference]
    blobs: dict[str, dict[str, Any]] = {}
    for rung in order:
        file = run_dir / "rungs" / f"{rung}.pt"
        if file.exists() and not stale:
            blobs[rung] = read_blob(file)
            continue
        say(f"  {config.id}: {rung}")
        ref_scores = _ref_scores(blobs.get(config.reference))
        blobs[rung] = _rung_result(rung, rungs, config, gt, ref_scores)
        write_blob(file, blobs[rung])

    diagnostics = _diagnostics(config, blobs)
    write_json(run_dir / "diagnostics.json", diagnostics)
    rows = _rows(config, model, gt, blobs, diagnostics)
    write_json(run_dir / "timing.json", {"wall_seconds_this_call": time.perf_counter() - t_start})
    write_json(run_dir / "rows.json", rows)
    return rows


def _scored_model(
    gt: GroundTruth, data, run_dir: Path, say: Callable[[str], None]
) -> tuple[torch.nn.Module, bool]:
    """The model every rung scores: the ground truth's base model, recorded in ``model.pt``.

    Returns it and whether an earlier ``model.pt`` held other weights (an older run that
    trained its own model): its finished rungs scored another model and are recomputed.
    """
    model = gt.base_model(data)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    file = run_dir / "model.pt"
    stale = False
    if file.exists():
        try:
            old = read_blob(file)
        except CorruptFileError:
            old = {}
        stale = old.keys() != state.keys() or any(not torch.equal(old[k], state[k]) for k in state)
        if stale:
            say(
                f"  {run_dir.name}: model.pt differs from the ground truth's base model; "
                "scoring the base model and recomputing the rungs"
            )
    if stale or not file.exists():
        write_blob(file, state)
    return model, stale


def _diagnostics(config: RunConfig, blobs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Configuration-level diagnostics (JSON): shares, off-block mass, overlap, mismatches."""
    ok = {r: b for r, b in blobs.items() if b["status"] == "ok"}
    shares: dict[str, dict[str, dict[str, float]]] = {}
    for reg in config.regularizations:
        label = reg_label(reg)
        shares[label] = {}
        for measure in ("inverse_error", "influence_error"):
            errs = {
                r: b["per_reg"][label][measure]
                for r, b in ok.items()
                if measure in b["per_reg"].get(label, {})
            }
            try:
                shares[label][measure] = error_shares(errs)
            except ValueError as err:
                shares[label][measure] = {name: math.nan for name, _, _ in LADDER_STEPS}
                shares[label][f"{measure}_why_nan"] = str(err)  # type: ignore[assignment]
    return {
        "config": config.id,
        "shares": shares,
        "off_block_mass": {r: b["off_block_mass"] for r, b in ok.items() if "off_block_mass" in b},
        "negative_eigenvalues": {r: b["negative_eigenvalues"] for r, b in ok.items()},
        "num_eigenvalues": {r: int(b["spectrum"].numel()) for r, b in ok.items()},
        "basis_overlap": {r: b["basis_overlap"] for r, b in ok.items() if "basis_overlap" in b},
        "spectrum_mismatch_vs_block_ggn": {
            r: b["spectrum_mismatch"] for r, b in ok.items() if "spectrum_mismatch" in b
        },
        "eigenvalue_mismatch_kfac_vs_ekfac": ok.get("kfac", {}).get(
            "eigenvalue_mismatch_vs_ekfac", math.nan
        ),
        "skipped": {r: b["reason"] for r, b in blobs.items() if b["status"] != "ok"},
    }


def _mean_overlap(curves: dict[str, dict], k: int) -> float:
    vals = [c[k] for c in curves.values() if k in c]
    return sum(vals) / len(vals) if vals else math.nan


def _rows(config, model, gt, blobs, diagnostics) -> list[dict[str, Any]]:
    step_ending = {to: name for name, _, to in LADDER_STEPS}
    rows = []
    for rung in config.rungs:
        blob = blobs[rung]
        for reg in config.regularizations:
            label = reg_label(reg)
            entry = blob.get("per_reg", {}).get(label, {})
            share = diagnostics["shares"][label]
            step = step_ending.get(rung, "")
            overlap = blob.get("basis_overlap")
            rows.append(
                {
                    "config": config.id,
                    "dataset": config.dataset,
                    "depth": config.depth,
                    "width": config.width,
                    "epochs": config.epochs,
                    "seed": config.seed,
                    "num_params": num_params(model),
                    "rung": rung,
                    "reg": label,
                    "damping": reg.damping,
                    "eps": reg.eps,
                    "relative": reg.relative,
                    "status": entry.get("status", blob["status"]),
                    "reason": entry.get("reason", blob["reason"]),
                    "lds": _nan_if_none(entry.get("lds")),
                    "lds_ci_low": _nan_if_none(entry.get("lds_ci_low")),
                    "lds_ci_high": _nan_if_none(entry.get("lds_ci_high")),
                    "lds_queries": entry.get("lds_queries", 0),
                    "inverse_error": _nan_if_none(entry.get("inverse_error")),
                    "influence_error": _nan_if_none(entry.get("influence_error")),
                    "step": step,
                    "share_inverse": share["inverse_error"].get(step, math.nan),
                    "share_influence": share["influence_error"].get(step, math.nan),
                    "rank": entry.get("rank", 0),
                    "fit_seconds": _nan_if_none(blob.get("fit_seconds")),
                    "score_seconds": _nan_if_none(entry.get("score_seconds")),
                    "off_block_mass": _nan_if_none(blob.get("off_block_mass")),
                    "negative_eigenvalues": blob.get("negative_eigenvalues", -1),
                    "spectrum_mismatch": _nan_if_none(blob.get("spectrum_mismatch")),
                    "overlap_k10": _mean_overlap(overlap, 10) if overlap else math.nan,
                    "base_train_loss": gt.base["train_loss"],
                    "base_query_loss": gt.base["query_loss"],
                    "base_query_accuracy": _nan_if_none(gt.base.get("query_accuracy")),
                    "num_subsets": config.lds.num_subsets,
                    "num_seeds": config.lds.num_seeds,
                    "alpha": config.lds.alpha,
                    "gt_warnings": len(gt.warnings),
                }
            )
    return rows


# ---------------------------------------------------------------------------------------
# The grid.


def write_table(rows: list[dict[str, Any]], out: str | Path) -> tuple[Path, Path]:
    """``results.csv`` and ``results.jsonl`` in ``out`` (atomic); returns their paths."""
    return storage.write_table(rows, COLUMNS, out, "results")


def read_table(out: str | Path) -> list[dict[str, Any]]:
    """The rows of ``out/results.jsonl``."""
    path = Path(out) / "results.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; run `curvinf reproduce --out {out}` first."
        )
    return storage.read_jsonl(path)


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
) -> dict:
    """Run one configuration (in this or a worker process); never raises."""
    if threads:
        torch.set_num_threads(threads)
    finished = Path(out) / "runs" / config.id / "rows.json"
    if deadline is not None and time.time() > deadline and not finished.exists():
        return {"config": config.id, "state": "not started (time budget)"}
    t0 = time.perf_counter()
    try:
        rows = run_config(config, out, progress=progress, log=log)
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
) -> GridRun:
    """Run every configuration of ``preset`` into ``out`` (skipping finished ones), then write
    the results table.

    Args:
        workers: configurations run in parallel processes (torch threads split among them).
        max_minutes: start no configuration after this many minutes (the running ones finish).
        only: configuration ids or ``d<depth>-w<width>-e<epochs>`` prefixes to run (default
            all); matching none is an error (nothing is written).
        progress: progress bars of the work inside a configuration (``workers=1``).

    A configuration another process is running (its lock is held, e.g. a second
    ``reproduce`` into the same ``out``) is skipped with state :data:`BUSY`.
    """
    say = log or (lambda msg: None)
    check_int("workers", workers, low=1)
    _check_max_minutes(max_minutes)
    configs = select_configs(preset, only)
    out = check_directory(out, writable=True)
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
        if entry["state"] == "done":  # the table grows as configurations finish
            write_table(collect_rows(out, preset), out)
        say(f"[{i}/{n}] {entry['config']}: {entry['state']} ({entry.get('seconds', 0):.0f} s)")
        if "error" in entry:
            say(entry["error"])

    if workers == 1:  # in this process: the ground truth's progress bar, rung-by-rung log
        for i, config in enumerate(configs, 1):
            say(f"[{i}/{n}] {config.id}: running")
            report(i, _worker(config, str(out), deadline, threads, progress, say))
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_worker, c, str(out), deadline, threads) for c in configs]
            for i, fut in enumerate(as_completed(futures), 1):
                report(i, fut.result())
    rows = collect_rows(out, preset)
    csv_path, _ = write_table(rows, out)
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


def collect_rows(out: str | Path, preset: Preset) -> list[dict[str, Any]]:
    """Rows of every finished configuration of ``preset`` in ``out``, in grid order."""
    rows = []
    for config in preset.configs():
        file = Path(out) / "runs" / config.id / "rows.json"
        if file.exists():
            rows += read_json(file)
    return rows


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
) -> ReproducePlan:
    """Check every argument of :func:`reproduce` and return the plan; writes nothing.

    Raises ``ValueError``/``TypeError`` naming the argument (an unknown preset, ``workers``
    < 1, negative ``max_minutes``, seeds that are not integers >= 0, ``max_dense_gib`` <= 0,
    ``only`` matching no configuration), ``NotADirectoryError`` if ``out`` is or lies under
    a file and ``PermissionError`` if it cannot be written.
    """
    if isinstance(preset, str):
        grid = get_preset(preset)
    elif isinstance(preset, Preset):
        grid = preset
    else:
        raise TypeError(f"preset must be a preset name or a Preset, got {type(preset).__name__}.")
    check_int("workers", workers, low=1)
    _check_max_minutes(max_minutes)
    if seeds is not None:
        grid = replace(grid, seeds=tuple(seeds))
    if max_dense_gib is not None:
        gib = check_number("max_dense_gib", max_dense_gib, low=0.0, strict_low=True)
        grid = replace(grid, max_dense_bytes=gib * 2**30)
    if matched_steps:
        grid = replace(grid, lds=replace(grid.lds, matched_steps=True))
    configs = select_configs(grid, only)
    wanted = None if only is None else tuple((only,) if isinstance(only, str) else only)
    return ReproducePlan(
        grid=grid,
        out=check_directory(out, writable=True),
        configs=tuple(configs),
        only=wanted,
        workers=workers,
        max_minutes=max_minutes,
    )


def run_plan(
    plan: ReproducePlan,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[GridRun, Path | None]:
    """Run ``plan``'s grid (resuming finished work) and write the report; return what ran and
    ``out/report.md``, or None when no configuration has finished (nothing to report)."""
    from curvinf.report import write_report

    result = run_grid(
        plan.grid,
        plan.out,
        workers=plan.workers,
        max_minutes=plan.max_minutes,
        only=plan.only,
        progress=progress,
        log=log,
    )
    say = log or (lambda msg: None)
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
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Run (or resume) the grid, then write the report (:func:`reproduce_plan`, then
    :func:`run_plan`).

    ``seeds``, ``max_dense_gib`` and ``matched_steps`` override the preset's seeds,
    dense-matrix cap and LDS retraining length (a different value gives different
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
    )
    _, report = run_plan(plan, progress=progress, log=log)
    if report is None:
        raise RuntimeError("no configuration finished, so there is nothing to report.")
    return report


__all__ = [
    "BUSY",
    "COLUMNS",
    "PRESETS",
    "GridRun",
    "LDSSettings",
    "Preset",
    "ReproducePlan",
    "RunConfig",
    "collect_rows",
    "get_preset",
    "read_table",
    "reg_label",
    "reproduce",
    "reproduce_plan",
    "run_config",
    "run_grid",
    "run_plan",
    "select_configs",
    "write_table",
]

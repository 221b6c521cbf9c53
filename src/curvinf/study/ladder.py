"""The study's measurements for a model you bring: one call, the same rows as a preset.

``measure_ladder(gt, data)`` does for the base model of your ground truth what
``curvinf reproduce`` does for one configuration of a preset (:mod:`curvinf.study.measure`):
every rung under every rule, routed by size (dense, Gram, Kronecker, matrix-free), its
scores' LDS with a paired bootstrap against every other certified rung, its error against
the reference in inverse, influence and curvature space, the distance it moves from the
rung above it, and the diagnostics. The model is ``gt.base_model(data)`` (the weights the
ground truth was retrained around), the loss the ground truth's; the rows have the columns
of :data:`curvinf.study.tables.COLUMNS`, with ``config`` set to ``settings.name`` and the
MLP-only columns (``depth``, ``width``, ``epochs``) empty.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curvinf.curvature.regularization import Regularization
from curvinf.data import DataSplit
from curvinf.devices import DeviceSpec, model_on, resolve_device
from curvinf.groundtruth import GroundTruth, store_key
from curvinf.names import LADDER
from curvinf.params import count_trainable
from curvinf.storage import read_blob, write_blob
from curvinf.study.compare import config_comparisons
from curvinf.study.measure import config_diagnostics, config_rows, measure_config
from curvinf.study.rungs import RungCache
from curvinf.study.specs import LDSSettings, check_measurement
from curvinf.study.tables import write_table
from curvinf.validation import check_int


@dataclass(frozen=True)
class LadderSettings:
    """What :func:`measure_ladder` measures and how (the fields of the same names of
    :class:`~curvinf.study.specs.RunConfig`): ``rungs`` under every rule of
    ``regularizations``, errors against ``reference``; ``fisher`` for the GGN-type rungs,
    ``kronecker_fisher`` / ``kronecker_bias`` / ``uncovered`` for K-FAC and EK-FAC,
    ``partition`` of the block rungs; dense routes up to ``max_dense_bytes``, the Gram
    route up to ``gram_bytes``; ``lanczos_k``, ``solver_tol``, ``solver_max_iter`` for the
    Hessian beyond the dense cap; ``estimate_matvecs`` products per randomised estimate;
    ``num_bootstrap`` resamples of the paired LDS comparisons; ``seed`` for every random
    draw. ``name`` labels the rows."""

    name: str = "model"
    rungs: tuple[str, ...] = LADDER
    regularizations: tuple[Regularization, ...] = (Regularization.paper(),)
    reference: str = "hessian"
    fisher: str = "type2"
    kronecker_fisher: str = "type2"
    kronecker_bias: str = "joint"
    uncovered: str = "error"
    partition: str = "layer"
    max_dense_bytes: float = 2**30
    gram_bytes: float = 14 * 2**30
    lanczos_k: int = 300
    solver_tol: float = 1e-6
    solver_max_iter: int = 300
    estimate_matvecs: int = 60
    num_bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}.")
        check_measurement(self)
        check_int("num_bootstrap", self.num_bootstrap, low=0)


@dataclass(frozen=True)
class _Spec:
    """A :class:`LadderSettings` seen as the configuration the study's code reads."""

    settings: LadderSettings
    lds: LDSSettings
    loss_name: str
    dataset: str

    def __getattr__(self, name: str) -> Any:
        return getattr(self.settings, name)

    @property
    def id(self) -> str:
        return self.settings.name

    depth = width = epochs = None


@dataclass
class LadderResult:
    """What :func:`measure_ladder` measured: ``rows`` (one per rung x rule, the columns of
    :data:`~curvinf.study.tables.COLUMNS`), ``comparisons`` (paired LDS differences, the
    columns of :data:`~curvinf.study.tables.COMPARISON_COLUMNS`), ``diagnostics`` (shares,
    flags, off-block mass, overlap curves, seed noise) and the wall ``seconds``."""

    rows: list[dict[str, Any]]
    comparisons: list[dict[str, Any]]
    diagnostics: dict[str, Any]
    seconds: float


def measure_ladder(
    gt: GroundTruth,
    data: DataSplit,
    settings: LadderSettings | None = None,
    *,
    out: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    device: DeviceSpec = "cpu",
) -> LadderResult:
    """Every rung of ``settings`` measured on ``gt``'s base model (module doc).

    Args:
        gt: the LDS ground truth (:func:`curvinf.groundtruth.ground_truth`) of your model.
        data: the data ``gt`` was built on (checked: another split is refused).
        settings: rungs, rules and routes; default :class:`LadderSettings`.
        out: a folder for ``results.csv`` / ``.jsonl``, ``comparisons.*`` and each rung's
            measurements (``rungs/<rung>.pt``, with the Gram factorisations), so a rerun
            after a crash resumes with the rungs it finished; None keeps everything in
            memory.
        progress: progress bars on the long steps.
        log: where a line per rung goes (default: nowhere).
        device: where the fits, scores and estimates run (``cpu``, ``cuda``, ``cuda:N``,
            ``auto``; :func:`curvinf.devices.resolve_device`); what is stored and returned
            is on the CPU.

    Raises:
        ValueError: ``data`` is not the data ``gt`` was built on, or a setting is invalid.
    """
    settings = LadderSettings() if settings is None else settings
    if not isinstance(settings, LadderSettings):
        raise TypeError(f"settings must be a LadderSettings, got {type(settings).__name__}.")
    if not isinstance(gt, GroundTruth):
        raise TypeError(f"gt must be a GroundTruth (curvinf.ground_truth), got {type(gt)}.")
    if store_key(data, gt.config) != gt.manifest.get("key"):
        raise ValueError(
            f"data is not the split the ground truth at {gt.path} was built on (its store "
            "hashes the data); pass that DataSplit."
        )
    c = gt.config
    spec = _Spec(
        settings,
        LDSSettings(
            num_subsets=c.num_subsets,
            alpha=c.alpha,
            num_seeds=c.num_seeds,
            seed=c.seed,
            measure=c.measure,
            num_bootstrap=settings.num_bootstrap,
            matched_steps=c.matched_steps,
        ),
        c.loss,
        data.name,
    )
    where = resolve_device(device)
    t0 = time.perf_counter()
    model = model_on(gt.base_model(data), where)
    folder = None if out is None else Path(out) / "rungs"
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    cache = RungCache(
        spec,  # type: ignore[arg-type]
        model,
        c.make_loss(),
        data.to(device=where),
        log,
        progress=progress,
        gram_cache=None if folder is None else folder / "gram",
    )

    def load(rung: str) -> dict[str, Any] | None:
        file = None if folder is None else folder / f"{rung}.pt"
        return read_blob(file) if file is not None and file.exists() else None

    def save(rung: str, blob: dict[str, Any]) -> None:
        if folder is not None:
            write_blob(folder / f"{rung}.pt", blob)

    blobs = measure_config(spec, cache, gt, load, save, log or (lambda msg: None))  # type: ignore[arg-type]
    extra = config_comparisons(spec, gt, blobs)  # type: ignore[arg-type]
    diagnostics = config_diagnostics(spec, blobs, extra)  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    rows = config_rows(spec, count_trainable(model), gt, blobs, diagnostics, seconds)  # type: ignore[arg-type]
    if out is not None:
        write_table(rows, out)
        write_table(extra["comparisons"], out, "comparisons")
    return LadderResult(rows, extra["comparisons"], diagnostics, seconds)


__all__ = ["LadderResult", "LadderSettings", "measure_ladder"]

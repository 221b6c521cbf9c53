"""Damping vs truncation: LDS, approximation error and solver pathologies over a regulariser grid.

For one configuration (dataset, MLP depth and width, training recipe, LDS
subsets and seeds) every rung ``C`` of the ladder is fitted and
eigendecomposed once; each grid point is then a cheap re-weighting of the
cached eigenvalues (:class:`~curvinf.curvature.regularization.Regularization`):

    C⁺ = Σ_i  [λ_i + δ > τ] / (λ_i + δ) · u_i u_iᵀ

with damping ``δ`` and truncation threshold ``τ = ε`` (absolute, the paper's
rule; ``relative=True`` takes ``τ = ε · max(λ + δ)``). The grid (settings
:class:`SweepSettings`):

- ``eps`` rows: truncation only, ``ε`` over ``eps_grid``, ``δ = 0``;
- ``damping`` rows: damping only, ``δ`` over ``damping_grid``, ``ε = 0``
  (an eigenvalue ``λ_i + δ`` that is not clearly positive then makes the
  inverse undefined: the row records that reason instead of an LDS);
- ``product`` rows (``product=True``): every ``(ε, δ)`` pair, both > 0.

Per (rung, grid point) the row holds:

- LDS (mean over queries, bootstrap CI over subsets) of the scores
  ``S = G_q C⁺ G_trᵀ`` against the retrained ground truth;
- approximation error against the exact Hessian ``H`` under the *same*
  regularisation: ``‖C⁺ − H⁺‖_F / ‖H⁺‖_F`` (:func:`curvinf.diagnostics.inverse_error`)
  and ``‖S − S_H‖_F / ‖S_H‖_F`` (:func:`curvinf.diagnostics.influence_error`);
  where ``H + δI`` is indefinite (``ε = 0``, ``δ < −λ_min(H)``) ``H⁺`` does not
  exist, and the reference is the pseudo-inverse of its positive part
  (``ε = REF_FLOOR = 1e-12``), said so in ``reason``;
- pathology indicators: the rank of ``C⁺`` (eigenvalues kept), the max and
  median over queries of ``‖C⁺ g_q‖`` (inverse-Hessian-vector products that
  explode under weak regularisation), their ratio, and ``max |S|``.

``cg`` rows: the exact GGN applied matrix-free and inverted by
:class:`~curvinf.curvature.solvers.CG` on ``cg_queries`` query gradients, for
each damping in ``cg_damping`` (CG solves ``(G + δI) x = g``; it cannot
truncate): iterations (median, max), right-hand sides converged, worst
residual, ``max ‖x‖`` and the relative error against the dense GGN's
``(G + δI)⁻¹ g``. These rows carry no LDS (reason recorded).

Rows go to ``<out>/sweep.jsonl`` and ``<out>/sweep.csv``, rewritten atomically
after every row; a rerun with the same configuration skips rows already
there (keyed by rung, grid, ε, δ). The ground-truth store lives in
``<out>/groundtruth`` (:func:`curvinf.groundtruth.ground_truth`, resumable).
:func:`plot_sweep` draws the figures.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from curvinf.curvature import Regularization
from curvinf.curvature.matfree import matrix_free
from curvinf.curvature.solvers import CG
from curvinf.data import DATASETS
from curvinf.devices import DeviceSpec, model_on, resolve_device
from curvinf.diagnostics import influence_error, inverse_error
from curvinf.influence import gradient_scores, per_example_grads, preconditioned_gradients
from curvinf.lds import LDSResult
from curvinf.names import LADDER, MARKERS, METHODS, RUNG_COLORS
from curvinf.progress import progress_bar
from curvinf.storage import read_json, read_jsonl, write_json, write_table
from curvinf.study.rungs import RungCache
from curvinf.study.specs import LDSSettings, RunConfig
from curvinf.study.truth import config_data, config_ground_truth
from curvinf.training import TrainingRecipe
from curvinf.validation import check_choice, check_int, check_number

DEFAULT_EPS = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
DEFAULT_DAMPING = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_CG_DAMPING = (1e-6, 1e-4, 1e-2)
GRIDS = ("eps", "damping", "product", "cg")

COLUMNS: tuple[str, ...] = (
    "rung",
    "grid",
    "eps",
    "damping",
    "relative",
    "status",
    "reason",
    "lds",
    "lds_ci_low",
    "lds_ci_high",
    "lds_queries",
    "inverse_error",
    "influence_error",
    "rank",
    "num_params",
    "ihvp_norm_max",
    "ihvp_norm_median",
    "ihvp_norm_ratio",
    "score_abs_max",
    "cg_queries",
    "cg_iterations_median",
    "cg_iterations_max",
    "cg_converged",
    "cg_worst_residual",
    "cg_error_vs_dense",
    "seconds",
    "dataset",
    "depth",
    "width",
    "epochs",
    "seed",
    "subsets",
    "seeds",
)
"""Columns of ``sweep.csv`` / ``sweep.jsonl``, in order."""


def _log_grid(name: str, values: Sequence[float]) -> tuple[float, ...]:
    vals = tuple(float(v) for v in values)
    if not vals:
        raise ValueError(f"{name} must hold at least one value.")
    bad = [v for v in vals if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"{name} values must be finite and > 0, got {bad}.")
    if len(set(vals)) != len(vals):
        raise ValueError(f"{name} has repeated values: {vals}.")
    return tuple(sorted(vals))


@dataclass(frozen=True)
class SweepSettings:
    """One configuration and the regulariser grid swept on it.

    Configuration: ``dataset``, an MLP of ``depth`` hidden layers of ``width``
    units trained ``epochs`` epochs at ``lr`` (base recipe otherwise), ``seed``
    (split, initialisation, batches, subsets), LDS ground truth of
    ``subsets`` (M) subsets x ``seeds`` (R) retraining seeds, ``num_queries``
    (0: all queries), ``measure`` (``loss`` or ``margin``).

    Grid: ``eps_grid`` (truncation, ``δ = 0``), ``damping_grid`` (damping,
    ``ε = 0``), ``product`` (also every ``(ε, δ)`` pair), ``relative``
    (threshold relative to the largest eigenvalue). ``rungs``: a subset of the
    ladder; the Hessian (the error reference) is always fitted.

    Solver: ``cg_damping`` (empty: no CG rows), ``cg_queries`` right-hand
    sides, ``cg_tol``, ``cg_max_iter``.
    """

    dataset: str = "digits"
    depth: int = 1
    width: int = 32
    epochs: int = 100
    lr: float = 0.05
    seed: int = 0
    subsets: int = 100
    seeds: int = 1
    num_queries: int = 0
    measure: str = "loss"
    rungs: tuple[str, ...] = LADDER
    eps_grid: tuple[float, ...] = DEFAULT_EPS
    damping_grid: tuple[float, ...] = DEFAULT_DAMPING
    product: bool = False
    relative: bool = False
    cg_damping: tuple[float, ...] = DEFAULT_CG_DAMPING
    cg_queries: int = 16
    cg_tol: float = 1e-6
    cg_max_iter: int = 500
    num_bootstrap: int = 1000
    max_dense_gib: float = 4.0

    def __post_init__(self) -> None:
        check_choice("dataset", self.dataset, DATASETS)
        for name in ("depth", "num_queries", "seed", "num_bootstrap"):
            check_int(name, getattr(self, name), low=0)
        for name in ("width", "epochs", "seeds", "cg_queries", "cg_max_iter"):
            check_int(name, getattr(self, name), low=1)
        check_int("subsets", self.subsets, low=2)
        check_number("lr", self.lr, low=0, strict_low=True)
        check_number("cg_tol", self.cg_tol, low=0, strict_low=True, high=1)
        if self.cg_tol >= 1:
            raise ValueError(f"cg_tol must lie in (0, 1), got {self.cg_tol}.")
        check_number("max_dense_gib", self.max_dense_gib, low=0, strict_low=True)
        if not self.rungs:
            raise ValueError("rungs must name at least one rung.")
        for r in self.rungs:
            check_choice("rung", r, METHODS)
        if self.relative and max(self.eps_grid, default=0) >= 1:
            raise ValueError("relative eps values must be < 1.")
        object.__setattr__(self, "rungs", tuple(dict.fromkeys(self.rungs)))
        object.__setattr__(self, "eps_grid", _log_grid("eps_grid", self.eps_grid))
        object.__setattr__(self, "damping_grid", _log_grid("damping_grid", self.damping_grid))
        cg = tuple(self.cg_damping)
        object.__setattr__(self, "cg_damping", _log_grid("cg_damping", cg) if cg else ())

    def recipe(self) -> TrainingRecipe:
        return TrainingRecipe(epochs=self.epochs, lr=self.lr, seed=self.seed)

    def run_config(self) -> RunConfig:
        """The configuration as the grid runner knows it: the same data split, model,
        recipe, loss and ground truth (so both find the same ground-truth store)."""
        return RunConfig(
            depth=self.depth,
            width=self.width,
            epochs=self.epochs,
            seed=self.seed,
            dataset=self.dataset,
            recipe=TrainingRecipe(lr=self.lr),
            rungs=tuple(dict.fromkeys(("hessian", *self.rungs))),
            lds=LDSSettings(
                num_subsets=self.subsets,
                num_seeds=self.seeds,
                seed=self.seed,
                num_queries=self.num_queries,
                measure=self.measure,
                num_bootstrap=self.num_bootstrap,
            ),
            max_dense_bytes=self.max_dense_gib * 2**30,
        )

    def configuration(self) -> dict[str, Any]:
        """What determines every number except the grid (compared on rerun)."""
        d = asdict(self)
        for k in ("rungs", "eps_grid", "damping_grid", "product", "cg_damping"):
            d.pop(k)
        return d

    def grid(self) -> list[tuple[str, float, float]]:
        """``(grid, ε, δ)`` of every dense grid point, in sweep order."""
        pts = [("eps", e, 0.0) for e in self.eps_grid]
        pts += [("damping", 0.0, d) for d in self.damping_grid]
        if self.product:
            pts += [("product", e, d) for e in self.eps_grid for d in self.damping_grid]
        return pts


def row_key(row: dict[str, Any]) -> tuple[str, str, float, float]:
    """The identity of a row: (rung, grid, ε, δ)."""
    return (row["rung"], row["grid"], float(row["eps"]), float(row["damping"]))


def write_rows(rows: list[dict[str, Any]], out: str | Path) -> tuple[Path, Path]:
    """``sweep.csv`` and ``sweep.jsonl`` in ``out``, written atomically; returns their paths."""
    return write_table(rows, COLUMNS, out, "sweep")


def read_rows(out: str | Path) -> list[dict[str, Any]]:
    """The rows of ``out/sweep.jsonl`` (empty if there is none)."""
    path = Path(out) / "sweep.jsonl"
    return read_jsonl(path) if path.exists() else []


def _nan_to_none(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _lds_reason(res: LDSResult) -> str:
    if math.isfinite(res.mean):
        return ""
    parts = ["LDS undefined"]
    if res.constant_predictions:
        parts.append(f"{len(res.constant_predictions)} queries with constant predictions")
    if res.constant_queries:
        parts.append(f"{len(res.constant_queries)} queries with constant ground truth")
    return "; ".join(parts)


def _dense_row(
    rung: str,
    reg: Regularization,
    rungs: RungCache,
    gt,
    Gq: torch.Tensor,
    Gt: torch.Tensor,
    ref: dict[str, Any] | None,
    settings: SweepSettings,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One (rung, regulariser) row; also ``(inverse, scores)`` for use as the reference."""
    row: dict[str, Any] = {"status": "failed", "num_params": Gq.shape[1]}
    ri = rungs.inverse(rung, reg)
    if ri.inverse is None:  # not fitted, or eps = 0 and a non-positive eigenvalue
        row["reason"] = f"no inverse: {ri.reason}"
        return row, None
    inv = ri.inverse
    norms = preconditioned_gradients(inv, Gq).norm(dim=1)
    S = gradient_scores(inv, Gq, Gt)
    med = float(norms.median())
    row.update(
        rank=inv.rank,
        ihvp_norm_max=float(norms.max()),
        ihvp_norm_median=med,
        ihvp_norm_ratio=float(norms.max()) / med if med > 0 else None,
        score_abs_max=float(S.abs().max()),
    )
    reasons = []
    if not torch.isfinite(S).all():
        reasons.append("non-finite scores")
    else:
        res = gt.lds(S, num_bootstrap=settings.num_bootstrap, seed=settings.seed)
        row.update(
            lds=_nan_to_none(res.mean),
            lds_ci_low=_nan_to_none(res.ci_low),
            lds_ci_high=_nan_to_none(res.ci_high),
            lds_queries=res.num_valid,
        )
        if _lds_reason(res):
            reasons.append(_lds_reason(res))
    if rung == "hessian":
        row.update(inverse_error=0.0, influence_error=0.0)
    elif ref is None:
        reasons.append("no error: the Hessian reference has no inverse here")
    else:
        if ref.get("fallback"):
            reasons.append(
                f"error against H's positive part (δ, ε={REF_FLOOR:g}): H + δI is indefinite"
            )
        try:
            row["inverse_error"] = inverse_error(inv, ref["inverse"])
            row["influence_error"] = influence_error(S, ref["scores"])
        except ValueError as err:
            reasons.append(f"no error: {err}")
    row["status"] = "ok" if row.get("lds") is not None else "failed"
    row["reason"] = "; ".join(reasons)
    return row, {"inverse": inv, "scores": S}


REF_FLOOR = 1e-12
"""Truncation of the fallback reference when ``H + δI`` is not positive definite."""


def _fallback_ref(
    rungs: RungCache, reg: Regularization, Gq: torch.Tensor, Gt: torch.Tensor
) -> dict[str, Any] | None:
    """The error reference where ``(H + δI)⁻¹`` does not exist (``ε = 0``, small ``δ``):
    ``H`` under ``(δ, ε = REF_FLOOR)``, the pseudo-inverse of the positive part of
    ``H + δI`` (the limit ``ε → 0⁺``). Rows say so in ``reason``."""
    curv = rungs.get("hessian")
    if curv is None or reg.eps > 0:
        return None
    try:
        inv = curv.inverse(Regularization(damping=reg.damping, eps=REF_FLOOR))
    except ValueError:
        return None
    return {"inverse": inv, "scores": gradient_scores(inv, Gq, Gt), "fallback": True}


def _cg_row(
    damping: float,
    rungs: RungCache,
    model,
    loss,
    data,
    Gq: torch.Tensor,
    settings: SweepSettings,
) -> dict[str, Any]:
    """CG on the matrix-free exact GGN: ``(G + δI)⁻¹ g`` for the first ``cg_queries`` queries."""
    k = min(settings.cg_queries, len(Gq))
    B = Gq[:k]
    row: dict[str, Any] = {
        "status": "ok",
        "reason": "solver row: CG diagnostics only, no LDS",
        "num_params": Gq.shape[1],
        "cg_queries": k,
    }
    reg = Regularization(damping=damping, eps=0.0)
    mf = matrix_free("ggn", model, loss, *data.train)
    solver = CG(tol=settings.cg_tol, max_iter=settings.cg_max_iter, on_failure="warn")
    inv = mf.inverse(reg, solver=solver)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        X = inv.apply(B)
    rep = inv.reports[-1]
    row.update(
        cg_iterations_median=float(rep.iterations.double().median()),
        cg_iterations_max=int(rep.iterations.max()),
        cg_converged=int(rep.converged.sum()),
        cg_worst_residual=_nan_to_none(float(rep.residual.max())),
        ihvp_norm_max=_nan_to_none(float(rep.solution_norm.max())),
        ihvp_norm_median=_nan_to_none(float(rep.solution_norm.median())),
    )
    if rep.notes:
        row["reason"] += f"; {rep.notes}"
    dense = rungs.get("ggn")
    if dense is not None:
        try:
            ref = dense.inverse(reg).apply(B)
            row["cg_error_vs_dense"] = float((X - ref).norm() / ref.norm())
        except ValueError as err:
            row["reason"] += f"; dense GGN has no inverse here: {err}"
    if row["cg_converged"] < k:
        row["status"] = "failed"
    return row


def run_sweep(
    settings: SweepSettings,
    out: str | Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    device: DeviceSpec = "cpu",
) -> list[dict[str, Any]]:
    """Run (or resume) the sweep of ``settings`` into ``out`` on ``device`` (retraining,
    fits, scores; :func:`curvinf.devices.resolve_device`); return all rows.

    Raises ``ValueError`` if ``out`` holds a sweep of a different configuration
    (model, data, recipe, ground truth); a different grid only adds rows.
    """
    if not isinstance(settings, SweepSettings):
        raise TypeError(f"settings must be SweepSettings, got {type(settings).__name__}.")
    say = log or (lambda msg: print(msg, file=sys.stderr))
    target = resolve_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    conf_file = out / "sweep_config.json"
    if conf_file.exists():
        stored = read_json(conf_file)
        if stored != settings.configuration():
            diff = sorted(k for k in stored if stored.get(k) != settings.configuration().get(k))
            raise ValueError(
                f"{out} holds a sweep of another configuration (differs in {diff}); "
                "use another --out."
            )
    else:
        write_json(conf_file, settings.configuration())

    rows = read_rows(out)
    done = {row_key(r) for r in rows}
    base = {
        "dataset": settings.dataset,
        "depth": settings.depth,
        "width": settings.width,
        "epochs": settings.epochs,
        "seed": settings.seed,
        "subsets": settings.subsets,
        "seeds": settings.seeds,
        "relative": settings.relative,
    }
    rung_order = ["hessian"] + [r for r in settings.rungs if r != "hessian"]
    todo_dense = [
        (g, e, d)
        for g, e, d in settings.grid()
        if any((r, g, e, d) not in done for r in settings.rungs)
    ]
    todo_cg = [d for d in settings.cg_damping if ("ggn", "cg", 0.0, d) not in done]
    if not todo_dense and not todo_cg:
        say(f"sweep: all {len(rows)} rows already in {out}")
        return rows

    torch.manual_seed(settings.seed)
    config = settings.run_config()
    data = config_data(config)
    gt = config_ground_truth(
        config, out / "groundtruth", data=data, progress=progress, log=say, device=target
    )
    for w in gt.warnings:
        say(f"ground truth: {w}")
    model = model_on(gt.base_model(data), target)
    data = data.to(device=target)
    loss = gt.config.make_loss()
    Gq = per_example_grads(model, loss, *data.query, measure=settings.measure)
    Gt = per_example_grads(model, loss, *data.train)
    rungs = RungCache(config, model, loss, data)

    def add(row: dict[str, Any]) -> None:
        rows.append({**base, **row})
        write_rows(rows, out)

    total = len(todo_dense) * len(rung_order) + len(todo_cg)
    with progress_bar(total, "regularisation sweep", progress) as advance:
        for grid, eps, damping in todo_dense:
            reg = Regularization(damping=damping, eps=eps, relative=settings.relative)
            ref: dict[str, Any] | None = None
            for rung in rung_order:
                t0 = time.perf_counter()
                key = (rung, grid, eps, damping)
                need_row = rung in settings.rungs and key not in done
                if rung == "hessian" or need_row:
                    row, result = _dense_row(rung, reg, rungs, gt, Gq, Gt, ref, settings)
                    if rung == "hessian":
                        ref = result if result is not None else _fallback_ref(rungs, reg, Gq, Gt)
                    if need_row:
                        row.update(rung=rung, grid=grid, eps=eps, damping=damping)
                        row["seconds"] = time.perf_counter() - t0
                        add(row)
                advance(1)
        for damping in todo_cg:
            t0 = time.perf_counter()
            row = _cg_row(damping, rungs, model, loss, data, Gq, settings)
            row.update(rung="ggn", grid="cg", eps=0.0, damping=damping)
            row["seconds"] = time.perf_counter() - t0
            add(row)
            advance(1)
    return rows


# ---------------------------------------------------------------------------------------
# Figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rungs_of(rows: list[dict[str, Any]]) -> list[str]:
    present = {r["rung"] for r in rows}
    return [m for m in METHODS if m in present]


def _val(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan


def plot_lds_heatmap(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Heat maps of LDS: rungs x ε (truncation only) and rungs x δ (damping only).

    Cells without an inverse (``ε = 0`` and a non-positive damped eigenvalue)
    are hatched grey and marked ``×``.
    """

    plt = _pyplot()
    path = Path(path)
    panels = [("eps", "truncation ε (δ = 0)", "eps"), ("damping", "damping δ (ε = 0)", "damping")]
    panels = [p for p in panels if any(r["grid"] == p[0] for r in rows)]
    if not panels:
        raise ValueError("no eps or damping rows to draw.")
    rungs = _rungs_of([r for r in rows if r["grid"] in ("eps", "damping")])
    vals = [_val(r.get("lds")) for r in rows if r["grid"] in ("eps", "damping")]
    finite = [v for v in vals if math.isfinite(v)]
    vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 1.0)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.2 * len(panels), 0.55 * len(rungs) + 1.8), squeeze=False
    )
    fig.subplots_adjust(wspace=0.4)
    im = None
    for ax, (grid, title, col) in zip(axes[0], panels, strict=True):
        xs = sorted({float(r[col]) for r in rows if r["grid"] == grid})
        M = torch.full((len(rungs), len(xs)), math.nan)
        for r in rows:
            if r["grid"] == grid and r["rung"] in rungs:
                M[rungs.index(r["rung"]), xs.index(float(r[col]))] = _val(r.get("lds"))
        ax.set_facecolor("0.85")
        im = ax.imshow(M.numpy(), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
        for i in range(len(rungs)):
            for j in range(len(xs)):
                v = float(M[i, j])
                txt, color = (f"{v:.2f}", "w" if v < (vmin + vmax) / 2 else "k")
                if not math.isfinite(v):
                    txt, color = "×", "0.3"
                ax.text(j, i, txt, ha="center", va="center", fontsize=7, color=color)
        ax.set_xticks(range(len(xs)), [f"{x:.0e}" for x in xs], rotation=45, fontsize=7)
        ax.set_yticks(range(len(rungs)), rungs)
        for lbl in ax.get_yticklabels():
            lbl.set_color(RUNG_COLORS.get(lbl.get_text(), "k"))
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), label="LDS", shrink=0.9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_lds_product(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Per rung, a heat map of LDS over the product grid ε x δ."""
    plt = _pyplot()
    path = Path(path)
    prod = [r for r in rows if r["grid"] == "product"]
    if not prod:
        raise ValueError("no product rows (run with product=True).")
    rungs = _rungs_of(prod)
    es = sorted({float(r["eps"]) for r in prod})
    ds = sorted({float(r["damping"]) for r in prod})
    finite = [_val(r.get("lds")) for r in prod if math.isfinite(_val(r.get("lds")))]
    vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 1.0)
    fig, axes = plt.subplots(1, len(rungs), figsize=(3.2 * len(rungs), 3.4), squeeze=False)
    im = None
    for ax, rung in zip(axes[0], rungs, strict=True):
        M = torch.full((len(es), len(ds)), math.nan)
        for r in prod:
            if r["rung"] == rung:
                M[es.index(float(r["eps"])), ds.index(float(r["damping"]))] = _val(r.get("lds"))
        ax.set_facecolor("0.85")
        im = ax.imshow(
            M.numpy(), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, origin="lower"
        )
        ax.set_xticks(range(len(ds)), [f"{d:.0e}" for d in ds], rotation=60, fontsize=6)
        ax.set_yticks(range(len(es)), [f"{e:.0e}" for e in es], fontsize=6)
        ax.set_xlabel("damping δ")
        ax.set_title(rung, fontsize=10)
    axes[0][0].set_ylabel("truncation ε")
    fig.colorbar(im, ax=axes[0].tolist(), label="LDS", shrink=0.9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_lds_vs_error(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """LDS against influence-space error (vs the Hessian, same regulariser), one panel per
    regulariser kind; points coloured by log10 of the regulariser, edged in the rung's colour."""

    plt = _pyplot()
    path = Path(path)
    panels = [("eps", "truncation ε (δ = 0)", "eps"), ("damping", "damping δ (ε = 0)", "damping")]
    panels = [p for p in panels if any(r["grid"] == p[0] for r in rows)]
    if not panels:
        raise ValueError("no eps or damping rows to draw.")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.2), squeeze=False)
    for ax, (grid, title, col) in zip(axes[0], panels, strict=True):
        sub = [r for r in rows if r["grid"] == grid and r["rung"] != "hessian"]
        sc = None
        for rung in _rungs_of(sub):
            pts = [
                (_val(r.get("influence_error")), _val(r.get("lds")), math.log10(float(r[col])))
                for r in sub
                if r["rung"] == rung
            ]
            pts = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1]) and p[0] > 0]
            if not pts:
                continue
            x, y, c = zip(*pts, strict=True)
            ax.plot(x, y, color=RUNG_COLORS[rung], lw=0.8, alpha=0.6)
            sc = ax.scatter(
                x,
                y,
                c=c,
                cmap="plasma",
                marker=MARKERS.get(rung, "o"),
                edgecolors=RUNG_COLORS[rung],
                linewidths=1.2,
                s=40,
                label=rung,
                vmin=math.log10(min(float(r[col]) for r in sub)),
                vmax=math.log10(max(float(r[col]) for r in sub)),
            )
        for r in rows:  # the Hessian's own LDS at each setting, for reference
            if (
                r["grid"] == grid
                and r["rung"] == "hessian"
                and _val(r.get("lds")) == _val(r.get("lds"))
            ):
                ax.axhline(_val(r["lds"]), color=RUNG_COLORS["hessian"], lw=0.3, alpha=0.4)
        ax.set_xscale("log")
        ax.set_xlabel("influence-space error vs Hessian (same regulariser)")
        ax.set_ylabel("LDS")
        ax.set_title(title + "; grey lines: Hessian LDS", fontsize=9)
        if sc is not None:
            fig.colorbar(sc, ax=ax, label=f"log10 {col}")
            leg = ax.legend(fontsize=7, loc="best")
            for h in leg.legend_handles:
                h.set_facecolor("white")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pathologies(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """max ‖C⁺g_q‖ against the regulariser per rung (both kinds), and CG iterations vs δ."""

    plt = _pyplot()
    path = Path(path)
    cg = sorted((r for r in rows if r["grid"] == "cg"), key=lambda r: float(r["damping"]))
    n = 3 if cg else 2
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.8))
    for ax, (grid, col, label) in zip(
        axes,
        [("eps", "eps", "truncation ε (δ = 0)"), ("damping", "damping", "damping δ (ε = 0)")],
        strict=False,
    ):
        for rung in _rungs_of([r for r in rows if r["grid"] == grid]):
            pts = sorted(
                (float(r[col]), _val(r.get("ihvp_norm_max")))
                for r in rows
                if r["grid"] == grid and r["rung"] == rung
            )
            x, y = zip(*pts, strict=True) if pts else ((), ())
            ax.loglog(x, y, marker=MARKERS.get(rung, "o"), color=RUNG_COLORS[rung], label=rung)
        ax.set_xlabel(label)
        ax.set_ylabel("max over queries ‖C⁺ g_q‖")
        ax.legend(fontsize=7)
    if cg:
        ax = axes[2]
        x = [float(r["damping"]) for r in cg]
        ax.semilogx(x, [_val(r.get("cg_iterations_median")) for r in cg], "o-", label="median")
        ax.semilogx(x, [_val(r.get("cg_iterations_max")) for r in cg], "s--", label="max")
        for r in cg:
            if (r.get("cg_converged") or 0) < (r.get("cg_queries") or 0):
                ax.annotate(
                    "not converged (cap)",
                    (float(r["damping"]), _val(r["cg_iterations_max"])),
                    xytext=(8, -14),
                    textcoords="offset points",
                    fontsize=8,
                )
        ax.set_xlabel("damping δ")
        ax.set_ylabel("CG iterations (exact GGN, matrix-free)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(
    rows: list[dict[str, Any]], directory: str | Path, prefix: str = "sweep"
) -> list[Path]:
    """All sweep figures into ``directory`` as ``<prefix>_*.png``; returns their paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_lds_heatmap(rows, d / f"{prefix}_lds_heatmap.png"),
        plot_lds_vs_error(rows, d / f"{prefix}_lds_vs_error.png"),
        plot_pathologies(rows, d / f"{prefix}_pathologies.png"),
    ]
    if any(r["grid"] == "product" for r in rows):
        paths.append(plot_lds_product(rows, d / f"{prefix}_lds_product.png"))
    return paths


def summary_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: per rung and regulariser kind, LDS at each grid value (– : no inverse)."""
    lines = []
    for grid, col in (("eps", "ε"), ("damping", "δ")):
        sub = [r for r in rows if r["grid"] == grid]
        if not sub:
            continue
        xs = sorted({float(r["eps" if grid == "eps" else "damping"]) for r in sub})
        lines.append(f"| LDS, {col} | " + " | ".join(f"{x:.0e}" for x in xs) + " |")
        lines.append("|---" * (len(xs) + 1) + "|")
        for rung in _rungs_of(sub):
            cells = []
            for x in xs:
                r = next(
                    (
                        r
                        for r in sub
                        if r["rung"] == rung
                        and float(r["eps" if grid == "eps" else "damping"]) == x
                    ),
                    None,
                )
                v = _val(r.get("lds")) if r else math.nan
                cells.append(f"{v:.3f}" if math.isfinite(v) else "–")
            lines.append(f"| {rung} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


__all__ = [
    "COLUMNS",
    "SweepSettings",
    "plot_sweep",
    "read_rows",
    "run_sweep",
    "summary_table",
    "write_rows",
]

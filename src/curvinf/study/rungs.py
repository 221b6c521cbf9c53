"""The study's one rung cache: each rung fitted once by the route its size allows, each
inverse built once per regulariser, with the route and whether its answer is certified.

Routes (recorded in the results' ``route`` column):

============  ==============================================================================
``dense``     the whole matrix (or every block of a block rung) fits ``max_dense_bytes``:
              fitted densely, eigendecomposed, inverted exactly by the regulariser's rule.
``kronecker`` K-FAC / EK-FAC: Kronecker factors and their eigenbases (any size).
``gram``      GGN / block-GGN too large to form: the exact inverse in sample space
              (:class:`~curvinf.curvature.gram.Gram`; Cholesky under damping, ``eigh(K)``
              under truncation).
``eigen+gram`` a block rung whose small blocks fit densely and whose large ones do not:
              the small blocks dense, the large ones by the Gram route, composed
              block-diagonally (:mod:`curvinf.curvature.composite`; exact).
``ggn-cg``    the Hessian too large to form, under damping: CG on ``H + δI`` preconditioned
              by the exact damped GGN. Exact when every solve converges and ``H + δI`` is
              positive definite (``λ_min(H) + δ > τ``: then the truncation at ``τ``
              removes nothing and ``(H + δI)⁻¹`` *is* the regularised inverse).
              ``λ_min`` comes from 120 Lanczos steps on ``−H`` (its value and residual
              are in the row's figures); Lanczos finds extreme eigenvalues first, but an
              isolated, more negative eigenvalue it missed cannot be ruled out, so this
              certificate is as strong as that estimate.
``lanczos``   the Hessian too large to form, under truncation: the top ``lanczos_k`` Ritz
              pairs. Certified only when every Ritz pair converged and the smallest one is
              already below the threshold (so every kept eigenvalue was found).
============  ==============================================================================

A route that cannot certify its answer gives status ``unconverged`` and its figures
(iterations, residuals, Ritz values) in ``reason``: never a silent number. A rung that
cannot be inverted under a rule (e.g. ``H + δI`` indefinite with ``eps = 0``) gives
``unavailable``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvinf.curvature import Curvature, Regularization, fit_curvature
from curvinf.curvature.composite import CompositeCurvature, Part, frozen_except
from curvinf.curvature.gram import Gram
from curvinf.curvature.krylov import smallest_eigenvalue
from curvinf.curvature.layers import UnfactorableModelError
from curvinf.curvature.matfree import matrix_free
from curvinf.curvature.operators import InverseOperator
from curvinf.curvature.solvers import Lanczos, Preconditioned
from curvinf.data import DataSplit
from curvinf.devices import model_device
from curvinf.names import KRONECKER_RUNGS, SHARING_METHODS, rung_method
from curvinf.params import model_fingerprint, param_blocks
from curvinf.study.specs import RunConfig, reg_label
from curvinf.tracing import UntraceableModelError

EXACT, UNCONVERGED, UNAVAILABLE = "exact", "unconverged", "unavailable"
STATUSES = (EXACT, UNCONVERGED, UNAVAILABLE)


@dataclass
class RungInverse:
    """One rung's regularised inverse: the operator (None if unavailable), its route, its
    status (:data:`STATUSES`; an iterative route's status is final only once it has been
    applied, see :meth:`settle`) and a one-line reason with the figures."""

    rung: str
    reg: Regularization
    inverse: InverseOperator | None
    route: str
    status: str
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)

    def settle(self) -> None:
        """Re-read an iterative inverse's reports after use: ``unconverged`` if any solve
        did not converge, with its worst residual."""
        if self.inverse is None or self.route != "ggn-cg":
            return
        solves = self.inverse.report.solves
        if not solves:
            return
        iters = max(int(s.iterations.max()) for s in solves)
        worst = max(float(s.residual.max()) for s in solves)
        ok = all(s.all_converged for s in solves)
        self.figures.update(cg_iterations_max=iters, cg_worst_residual=worst)
        if not ok:
            self.status = UNCONVERGED
            self.reason = (
                f"CG did not converge: worst relative residual {worst:.2e} after {iters} "
                f"iterations; {self.reason}"
            ).rstrip("; ")


class RungCache:
    """Fitted rungs of one configuration and their inverses, each built once."""

    def __init__(
        self,
        config: RunConfig,
        model: nn.Module,
        loss: nn.Module,
        data: DataSplit,
        say: Callable[[str], None] | None = None,
        progress: bool = False,
        gram_cache: str | Path | None = None,
    ) -> None:
        self.config, self.model, self.loss, self.data = config, model, loss, data
        self.gram_cache = None if gram_cache is None else Path(gram_cache)
        """Where the Gram route keeps its factorisations, one folder per rung
        (:meth:`gram`); they outlive the process, so a resumed configuration does not
        repeat them, and are used memory-mapped, so the kept factors of many blocks and
        rules need disk, not memory."""
        self.device = model_device(model)
        """Where the rungs are fitted and applied: the model's device (its data are there)."""
        self.say = say or (lambda msg: None)
        self.progress = progress
        self.fitted: dict[str, Curvature] = {}
        self.routes: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self._inverses: dict[tuple[str, str], RungInverse] = {}
        self._settled: dict[tuple[str, str], tuple[str, str, str]] = {}
        self._lambda_min: tuple[float, float] | None = None
        self.distances: dict[tuple, tuple] = {}
        """Distances between rungs measured so far (:mod:`curvinf.study.measure`), by
        ``(space, rung, rung, regulariser label)``: the error of one rung and the
        adjacent distance of the next are often the same pair."""

    # ------------------------------------------------------------------ fitting

    def fits_dense(self, rung: str) -> bool:
        """Whether ``rung``'s dense matrix (or each of its blocks, and their sum) fits the cap."""
        cap = self.config.max_dense_bytes
        if rung.startswith("block_") or rung_method(rung)[0] == "unshared_ggn":
            sizes = [len(b.index) for b in param_blocks(self.model, self.config.partition)]
            return 8.0 * sum(d * d for d in sizes) <= cap
        D = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return 8.0 * D * D <= cap

    def route_of(self, rung: str) -> str:
        """The fitting route ``rung`` takes in this configuration (module doc)."""
        if rung_method(rung)[0] in KRONECKER_RUNGS:
            return "kronecker"
        if self.fits_dense(rung):
            return "dense"
        if rung.startswith("block_") and self.dense_blocks():
            return "composite"
        return "matrix-free"

    def dense_blocks(self) -> list[int]:
        """Blocks of a block rung taken densely in a composite: those smaller than the Gram
        matrix (``N · K`` rows), smallest first while their dense blocks fit the cap; empty
        when that leaves nothing for the Gram route."""
        blocks = param_blocks(self.model, self.config.partition)
        n = len(self.data.train[0])
        with torch.no_grad():
            outputs = self.model(self.data.train[0][:1]).shape[-1]
        rows = n * (outputs - 1 if self.config.loss_name == "ce" else outputs)
        order = sorted(range(len(blocks)), key=lambda b: len(blocks[b].index))
        chosen, used = [], 0.0
        for b in order:
            d = len(blocks[b].index)
            if d >= rows or used + 8.0 * d * d > self.config.max_dense_bytes:
                break
            chosen.append(b)
            used += 8.0 * d * d
        return chosen if len(chosen) < len(blocks) else []

    def _composite(self, rung: str) -> CompositeCurvature:
        """``rung`` as its dense small blocks plus its Gram-route large blocks."""
        blocks = param_blocks(self.model, self.config.partition)
        small = set(self.dense_blocks())
        parts = []
        for group, free in (
            (sorted(small), False),
            (sorted(set(range(len(blocks))) - small), True),
        ):
            names = {n for b in group for n in blocks[b].names}
            sub = frozen_except(self.model, names)
            options = {
                **self.options(rung),
                "max_dense_bytes": self.config.gram_bytes if free else self.config.max_dense_bytes,
            }
            fit = matrix_free if free else fit_curvature
            curv = fit(rung, sub, self.loss, *self.data.train, **options)
            if not free:
                curv.eigen()
            index = torch.cat([blocks[b].index for b in group]).sort().values
            parts.append(Part(index, sub, curv))
        D = sum(len(b.index) for b in blocks)
        return CompositeCurvature(rung, parts, D, model_fingerprint(self.model))

    def options(self, rung: str) -> dict[str, Any]:
        """The fit options of ``rung`` (:class:`~curvinf.curvature.FitSettings`); a matrix-free
        rung's memory budget is the Gram route's (``gram_bytes``). The weight-sharing rungs
        (K-FAC, EK-FAC, the unshared GGN) take the Kronecker Fisher and their variant."""
        c = self.config
        method, variant = rung_method(rung)
        kron = method in SHARING_METHODS
        free = self.route_of(rung) == "matrix-free"
        return {
            "fisher": c.kronecker_fisher if kron else c.fisher,
            "bias": c.kronecker_bias,
            "partition": c.partition,
            "kfac_variant": variant,
            "uncovered": c.uncovered,
            "seed": c.seed,
            "max_dense_bytes": c.gram_bytes if free else c.max_dense_bytes,
            "progress": self.progress,
        }

    def get(self, rung: str) -> Curvature | None:
        """The fitted rung, or None (the reason in ``failed``) if it cannot be computed."""
        if rung in self.fitted or rung in self.failed:
            return self.fitted.get(rung)
        t0 = time.perf_counter()
        route = self.route_of(rung)
        try:
            if route == "composite":
                curv = self._composite(rung)
            elif route == "matrix-free":
                curv = matrix_free(
                    rung, self.model, self.loss, *self.data.train, **self.options(rung)
                )
            else:
                method = rung_method(rung)[0]
                curv = fit_curvature(
                    method, self.model, self.loss, *self.data.train, **self.options(rung)
                )
                curv.eigen()  # the decomposition is part of the fit's cost
        except (ValueError, MemoryError, UnfactorableModelError, UntraceableModelError) as err:
            # the rung does not apply to this model: its rows say why, the others go on
            self.failed[rung] = f"{type(err).__name__}: {err}"
            self.say(f"  {rung}: not fitted ({self.failed[rung]})")
            return None
        self.seconds[rung] = time.perf_counter() - t0
        self.routes[rung] = route
        self.fitted[rung] = curv
        return curv

    # ------------------------------------------------------------------ inverses

    def gram(self, rung: str) -> Gram:
        """The Gram route's solver for ``rung`` (its cache folder under ``gram_cache``)."""
        folder = None if self.gram_cache is None else str(self.gram_cache / rung)
        return Gram(progress=self.progress, cache=folder)

    def release(self, rung: str) -> None:
        """Forget ``rung``'s inverses and delete their Gram factorisations from disk (once
        no rung still to be measured needs them)."""
        for key in [k for k in self._inverses if k[0] == rung]:
            del self._inverses[key]
        if self.gram_cache is not None:
            shutil.rmtree(self.gram_cache / rung, ignore_errors=True)

    def remember(self, rung: str, blob: dict[str, Any]) -> None:
        """Take the final statuses of ``rung``'s inverses from its finished ``blob`` (a
        resumed configuration): one that was not ``exact`` is not rebuilt just to learn
        that again (e.g. the truncated Hessian's Lanczos above the dense cap), since
        nothing is measured against it."""
        for label, entry in blob.get("per_reg", {}).items():
            if entry.get("status", EXACT) != EXACT:
                self._settled[(rung, label)] = (entry["route"], entry["status"], entry["reason"])

    def inverse(self, rung: str, reg: Regularization) -> RungInverse:
        """``C⁺`` of ``rung`` under ``reg``, cached, with route and status."""
        key = (rung, reg_label(reg))
        if key not in self._inverses and key in self._settled:
            route, status, reason = self._settled[key]
            self._inverses[key] = RungInverse(rung, reg, None, route, status, reason)
        if key not in self._inverses:
            self._inverses[key] = self._build_inverse(rung, reg)
        return self._inverses[key]

    def _build_inverse(self, rung: str, reg: Regularization) -> RungInverse:
        curv = self.get(rung)
        if curv is None:
            return RungInverse(rung, reg, None, "none", UNAVAILABLE, self.failed[rung])
        route = self.routes[rung]
        try:
            if route in ("dense", "kronecker"):
                inv = curv.inverse(reg)
                return RungInverse(rung, reg, inv, "eigen" if route == "dense" else route, EXACT)
            if route == "composite":
                inv = curv.inverse(reg, solvers=[None, self.gram(rung)])
                return RungInverse(rung, reg, inv, "eigen+gram", EXACT)
            if curv.is_ggn:
                inv = curv.inverse(reg, solver=self.gram(rung))
                return RungInverse(rung, reg, inv, "gram", EXACT)
            return self._hessian_inverse(curv, rung, reg)
        except ValueError as err:  # e.g. indefinite H + δI with eps = 0
            return RungInverse(rung, reg, None, route, UNAVAILABLE, f"ValueError: {err}")

    def lambda_min(self, curv: Curvature) -> tuple[float, float]:
        """``(θ, r)``: the smallest Ritz value of the matrix-free Hessian after 120 Lanczos
        steps and its residual (:func:`~curvinf.curvature.krylov.smallest_eigenvalue`):
        ``λ_min(H) <= θ`` always, and ``λ_min(H) ≈ θ`` within ``r`` once Lanczos has reached
        the bottom of the spectrum (module doc: an estimate, not a certificate)."""
        if self._lambda_min is None:
            self._lambda_min = smallest_eigenvalue(
                curv, steps=120, seed=self.config.seed, progress=self.progress
            )
        return self._lambda_min

    def _hessian_inverse(self, curv: Curvature, rung: str, reg: Regularization) -> RungInverse:
        c = self.config
        if reg.damping > 0:
            theta, res = self.lambda_min(curv)
            bound = theta - res + reg.damping  # the estimate of λ_min(H + δI), cautious side
            figures = {"lambda_min": theta, "lambda_min_residual": res}
            if reg.eps == 0 and bound <= 0:
                return RungInverse(
                    rung,
                    reg,
                    None,
                    "ggn-cg",
                    UNAVAILABLE,
                    f"H + δI is not positive definite (λ_min(H) ≈ {theta:.3g} ± {res:.1g}, "
                    f"δ = {reg.damping:g}) and eps = 0: (H + δI)⁻¹ is indefinite",
                    figures,
                )
            threshold = reg.eps  # relative thresholds exceed eps·δ; absolute is the test below
            if reg.eps == 0 or (not reg.relative and bound > threshold):
                solver = Preconditioned(
                    preconditioner="ggn",
                    tol=c.solver_tol,
                    max_iter=c.solver_max_iter,
                    on_failure="warn",
                    progress=self.progress,
                )
                inv = curv.inverse(Regularization(damping=reg.damping, eps=0.0), solver=solver)
                why = (
                    ""
                    if reg.eps == 0
                    else f"truncation inactive: λ_min(H) + δ >= {bound:.3g} > eps"
                )
                return RungInverse(rung, reg, inv, "ggn-cg", EXACT, why, figures)
        return self._lanczos_inverse(curv, rung, reg)

    def _lanczos_inverse(self, curv: Curvature, rung: str, reg: Regularization) -> RungInverse:
        c = self.config
        solver = Lanczos(k=c.lanczos_k, on_failure="warn", seed=c.seed, progress=self.progress)
        inv = curv.inverse(reg, solver=solver)
        rep = inv.eigen_report  # type: ignore[attr-defined]
        theta = inv.ritz_values  # type: ignore[attr-defined]
        smallest = float(theta[-1]) + reg.damping
        tau = reg.eps * (float(theta[0]) + reg.damping) if reg.relative else reg.eps
        converged = int(rep.converged.sum())
        figures = {
            "lanczos_k": len(theta),
            "lanczos_converged": converged,
            "ritz_smallest": float(theta[-1]),
            "threshold": tau,
        }
        whole = len(theta) == curv.num_params  # the whole spectrum: nothing left out
        if converged == len(theta) and (smallest <= tau or whole):
            return RungInverse(rung, reg, inv, "lanczos", EXACT, "", figures)
        why = []
        if converged < len(theta):
            why.append(f"{len(theta) - converged} of {len(theta)} Ritz pairs unconverged")
        if smallest > tau:
            why.append(
                f"the {len(theta)}th Ritz value + δ ({smallest:.3g}) is above the threshold "
                f"{tau:.3g}: eigenvalues that should be kept were not computed"
            )
        return RungInverse(rung, reg, inv, "lanczos", UNCONVERGED, "; ".join(why), figures)


__all__ = ["EXACT", "STATUSES", "UNAVAILABLE", "UNCONVERGED", "RungCache", "RungInverse"]

"""Iterative inverses of a curvature: ``(C + λI)⁻¹ V`` and truncated pseudo-inverses.

Each solver is a validated settings dataclass whose ``build_inverse`` turns a
curvature (anything with ``matvec`` (K, D) -> (K, D) and ``num_params``; dense
and matrix-free rungs alike) and a :class:`Regularization` into an
:class:`~curvinf.curvature.operators.InverseOperator`:
``curvature.inverse(reg, solver=CG())`` is the one way, and
:func:`curvinf.influence_scores` takes the result like any inverse. The Krylov
algorithms themselves are pure functions in :mod:`~curvinf.curvature.krylov`.

==============  ===========================================  ======================
solver          computes                                     regularisation
==============  ===========================================  ======================
CG              ``(C + λI)⁻¹ V``, batched CG, one product    damping only
                with all unconverged RHS per iteration
Lanczos         top-k eigenpairs ``C ≈ U Θ Uᵀ``; the reg     damping and truncation
                rule on ``Θ``; complement as eigenvalue 0
LiSSA           Neumann series ``1/s Σ_j (I - A/s)^j b``,    damping only
                ``A = C + λI`` (full or minibatch products)
Preconditioned  EK-FAC-preconditioned refinement: PCG or     damping only
                Neumann/ASTRA iterations, from the EK-FAC
                answer ``P V`` towards ``(C + λI)⁻¹ V``
                (``preconditioner="ggn"``: the exact damped
                GGN by Gram, for the Hessian)
Gram            exact, GGN rungs only: Cholesky or eigh of   damping and truncation
                the (N·K, N·K) Gram matrix of the
                pseudo-gradients (:mod:`~.gram`)
==============  ===========================================  ======================

Truncation (``reg.eps > 0``) is a statement about eigenvalues, which the
Krylov/Neumann solvers never see: CG, LiSSA and Preconditioned raise a
``ValueError`` for ``eps > 0`` (use ``Lanczos`` for a truncated inverse).

Every apply records a :class:`SolveReport` (per right-hand side: iterations,
true relative residual ``‖b - A x‖ / ‖b‖``, converged, ``‖x‖``), kept in
``inverse.report.solves`` (also ``inverse.reports``). A right-hand side that does
not converge, breaks down (``pᵀAp <= 0``: indefinite ``C + λI``) or turns non-finite raises
:class:`ConvergenceError` (``on_failure="raise"``, the default) or warns
(``"warn"``); it is never returned silently.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch

from curvinf.curvature.gram import Gram
from curvinf.curvature.kronecker import fit_kronecker
from curvinf.curvature.krylov import (
    Operator,
    SolveReport,
    block_cg,
    lanczos,
    lissa,
    power_iteration,
    preconditioned_neumann,
)
from curvinf.curvature.matfree import MatrixFreeCurvature
from curvinf.curvature.operators import Curvature, InverseOperator, InverseReport, as_rows
from curvinf.curvature.regularization import Regularization
from curvinf.devices import cpu_generator
from curvinf.names import PRECONDITIONERS, PSD_METHODS
from curvinf.validation import check_choice

FAILURE_MODES = ("raise", "warn")


class ConvergenceError(RuntimeError):
    """A solve did not converge or went non-finite; ``.report`` says which RHS and how far."""

    def __init__(self, message: str, report: SolveReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class _Settings:
    tol: float = 1e-6
    max_iter: int = 1000
    on_failure: str = "raise"
    progress: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.tol, (int, float)) and 0 < self.tol < 1):
            raise ValueError(f"tol must lie in (0, 1), got {self.tol!r}.")
        if not isinstance(self.max_iter, int) or self.max_iter < 0:
            raise ValueError(f"max_iter must be an int >= 0, got {self.max_iter!r}.")
        check_choice("on_failure", self.on_failure, FAILURE_MODES)

    def build_inverse(self, curvature: Curvature, reg: Regularization) -> InverseOperator:
        """``(C + λI)⁻¹`` applied by this iteration on demand (:class:`IterativeInverse`)."""
        check_damping_only(self, curvature, reg)
        return IterativeInverse(curvature, reg, self)

    def solve_rows(self, inverse: IterativeInverse, B: torch.Tensor) -> tuple:
        """``(C + λI)⁻¹ B`` for rows ``B`` (K, D): ``(X, SolveReport)``."""
        raise NotImplementedError


@dataclass(frozen=True)
class CG(_Settings):
    """Conjugate gradients on ``(C + λI) x = b`` for every row ``b`` at once.

    Each right-hand side keeps its own step sizes (independent CG, batched:
    one product with the K still-active vectors per iteration) and stops at
    relative residual ``‖r‖ / ‖b‖ <= tol``; a drifting recurrence is restarted
    from the true residual (at most ``restarts`` times). The error then obeys
    ``‖x - x*‖ / ‖x*‖ <= κ(C + λI) · tol``.
    """

    max_iter: int = 1000
    restarts: int = 3

    def solve_rows(self, inverse: IterativeInverse, B: torch.Tensor) -> tuple:
        return block_cg(
            inverse.damped_matvec,
            B,
            tol=self.tol,
            max_iter=self.max_iter,
            restarts=self.restarts,
            progress=self.progress,
        )


@dataclass(frozen=True)
class LiSSA(_Settings):
    """Neumann series (Agarwal et al., 2017) for ``A = C + λI``.

    ``x_{j+1} = x_j + (b - A_j x_j) / scale``, ``x_0 = b / scale``: the partial
    sums ``1/s Σ_{i<=j} (I - A/s)^i b``. Converges iff every eigenvalue of ``A``
    lies in ``(0, 2·scale)``; the error shrinks like ``(1 - λ_min(A)/scale)^j``,
    so expect ``~ scale / λ_min(A)`` iterations per factor e. ``max_iter`` is the
    depth.

    Attributes:
        scale: ``s``; ``None`` estimates ``λ_max(A)`` by ``power_iterations`` power
            iterations and uses ``1.1`` times it.
        batch_size: ``None`` uses the full-data curvature every step
            (deterministic); an int uses a fresh seeded minibatch of training
            examples per step (stochastic LiSSA; matrix-free rungs only).
            Stopping then uses the minibatch residual; the reported residual is
            the full-data one.
        seed: minibatches and the power iteration's start vector.
    """

    max_iter: int = 10_000
    scale: float | None = None
    batch_size: int | None = None
    seed: int = 0
    power_iterations: int = 30

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0 or None, got {self.scale!r}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size!r}.")
        if self.power_iterations < 1:
            raise ValueError(f"power_iterations must be >= 1, got {self.power_iterations}.")

    def solve_rows(self, inverse: IterativeInverse, B: torch.Tensor) -> tuple:
        A = inverse.damped_matvec
        if inverse.lissa_scale is None:
            inverse.lissa_scale = self.scale or 1.1 * power_iteration(
                A, inverse.num_params, self.power_iterations, self.seed, device=B.device
            )
        sampler = None
        if self.batch_size is not None:
            curvature, damping = inverse.curvature, inverse.reg.damping
            if not hasattr(curvature, "ctx"):
                raise ValueError(
                    "stochastic LiSSA (batch_size=...) needs a matrix-free rung "
                    "(curvinf.curvature.matfree.matrix_free); use batch_size=None here."
                )
            n = curvature.ctx.n
            gen = cpu_generator(self.seed)

            def sampler() -> Operator:
                # drawn on the CPU (the same rows on every device); matvec moves them
                rows = torch.randperm(n, generator=gen, device="cpu")[: self.batch_size]
                return lambda V: curvature.matvec(V, rows=rows) + damping * V

        return lissa(
            A,
            B,
            scale=inverse.lissa_scale,
            tol=self.tol,
            max_iter=self.max_iter,
            sampler=sampler,
            progress=self.progress,
        )


@dataclass(frozen=True)
class Preconditioned(_Settings):
    """Refine the EK-FAC answer towards the exact rung (Wang et al. 2025, ASTRA).

    ``P ≈ (C + λI)⁻¹`` is the preconditioner (EK-FAC of the same data with the
    same damping by default). Both iterations start from the EK-FAC answer
    ``x_0 = P b`` (so ``max_iter=0`` returns it exactly) and converge to
    ``(C + λI)⁻¹ b``:

    - ``iteration="cg"``: preconditioned CG with ``M = P``;
    - ``iteration="neumann"``: preconditioned Neumann/Richardson iterations
      ``x_{t+1} = x_t + step · P (b - A x_t)``, ASTRA's update (ASTRA starts at 0;
      its first iterate with ``step=1`` is this ``x_0``). Converges iff
      ``step · λ_max(P A) < 2``.

    Attributes:
        preconditioner: ``"ekfac"`` or ``"kfac"`` (fitted on a matrix-free
            rung's own data and fisher), ``"ggn"`` (the exact GGN of the same
            data by :class:`~curvinf.curvature.gram.Gram`: for the Hessian,
            ``H + λI = (G + λI) + R`` with a small residual ``R``), or any
            ``InverseOperator``.
        preconditioner_reg: its regularisation; default ``Regularization(damping=λ, eps=0)``.
        step: Neumann step size.
    """

    max_iter: int = 500
    iteration: str = "cg"
    preconditioner: object = "ekfac"
    preconditioner_reg: Regularization | None = None
    step: float = 1.0
    restarts: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("iteration", self.iteration, ("cg", "neumann"))
        if isinstance(self.preconditioner, str):
            check_choice("preconditioner", self.preconditioner, PRECONDITIONERS)
        elif not isinstance(self.preconditioner, InverseOperator):
            raise TypeError(
                "preconditioner must be 'ekfac', 'kfac', 'ggn' or an InverseOperator, e.g. "
                "fit_curvature('ekfac', ...).inverse(Regularization(damping=λ, eps=0))."
            )
        if not (math.isfinite(self.step) and self.step > 0):
            raise ValueError(f"step must be a finite number > 0, got {self.step!r}.")

    def build_inverse(self, curvature: Curvature, reg: Regularization) -> InverseOperator:
        check_damping_only(self, curvature, reg)
        pre = self.preconditioner
        if isinstance(pre, str):
            pre_reg = self.preconditioner_reg or Regularization(damping=reg.damping, eps=0.0)
            pre = fitted_preconditioner(curvature, pre, pre_reg)
        if pre.num_params != curvature.num_params:
            raise ValueError(
                f"the preconditioner has {pre.num_params} parameters, the curvature "
                f"{curvature.num_params}; fit both on the same model."
            )
        return IterativeInverse(curvature, reg, self, pre)

    def solve_rows(self, inverse: IterativeInverse, B: torch.Tensor) -> tuple:
        P = inverse.preconditioner.apply  # type: ignore[union-attr]
        if self.iteration == "cg":
            return block_cg(
                inverse.damped_matvec,
                B,
                tol=self.tol,
                max_iter=self.max_iter,
                precond=P,
                x0=P(B),
                restarts=self.restarts,
                progress=self.progress,
            )
        return preconditioned_neumann(
            inverse.damped_matvec,
            P,
            B,
            step=self.step,
            tol=self.tol,
            max_iter=self.max_iter,
            progress=self.progress,
        )


@dataclass(frozen=True)
class Lanczos(_Settings):
    """Top-``k`` eigenpairs of ``C`` by Lanczos with full reorthogonalisation.

    ``max_iter`` Lanczos steps (default ``min(D, 2k + 20)``) build a Krylov
    basis from a seeded random start; the ``k`` largest Ritz pairs
    ``C ≈ U Θ Uᵀ`` (U (D, k)) are kept. A Ritz pair is converged when its
    residual ``‖C u - θ u‖ <= tol · max|Θ|``. The inverse applies the
    :class:`Regularization` rule to ``Θ`` (same damping, same truncation, the
    relative threshold taken against ``max Θ + λ``) and, on the complement
    ``I - U Uᵀ``:

    - ``complement="regularized"``: the complement's eigenvalues are taken as
      0, under the same rule: ``1/λ`` if ``λ > τ``, else 0 (so ``eps=1e-4, λ=0``,
      the paper's setting, projects the complement out);
    - ``complement="zero"``: always 0 (pure truncated inverse on the subspace).
    """

    k: int = 100
    max_iter: int | None = None  # type: ignore[assignment]
    complement: str = "regularized"
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.tol, (int, float)) and 0 < self.tol < 1):
            raise ValueError(f"tol must lie in (0, 1), got {self.tol!r}.")
        check_choice("on_failure", self.on_failure, FAILURE_MODES)
        check_choice("complement", self.complement, ("regularized", "zero"))
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}.")
        if self.max_iter is not None and self.max_iter < self.k:
            raise ValueError(f"max_iter ({self.max_iter}) must be >= k ({self.k}) or None.")

    def build_inverse(self, curvature: Curvature, reg: Regularization) -> InverseOperator:
        """The truncated/damped inverse on the top-``k`` Ritz pairs (:class:`LanczosInverse`)."""
        return LanczosInverse(curvature, reg, self)


def check_damping_only(solver: object, curvature: Curvature, reg: Regularization) -> None:
    """Refuse a truncation that an iteration on ``C + λI`` cannot compute (ValueError)."""
    if reg.eps > 0 and (reg.truncates_nonnegative() or curvature.method not in PSD_METHODS):
        raise ValueError(
            f"{type(solver).__name__} solves (C + λI)⁻¹ V and cannot truncate eigenvalues, but "
            f"reg (damping={reg.damping:g}, eps={reg.eps:g}"
            f"{', relative' if reg.relative else ''}) asks for a pseudo-inverse of the "
            f"{curvature.method} rung. Pass Regularization(damping=λ, eps=0) with λ > 0, or "
            "use solver=Lanczos(k=...) for a truncated inverse."
        )


# --------------------------------------------------------------------------- inverses


class IterativeInverse(InverseOperator):
    """``(C + λI)⁻¹`` applied by CG, LiSSA or preconditioned refinement, on demand.

    Every :meth:`apply` solves afresh and appends a :class:`SolveReport` to
    :attr:`reports`; :meth:`solve` returns the report with the answer.
    """

    def __init__(
        self,
        curvature: Curvature,
        reg: Regularization,
        solver: CG | LiSSA | Preconditioned,
        preconditioner: InverseOperator | None = None,
    ) -> None:
        self.curvature = curvature
        self.reg = reg
        self.solver = solver
        self.preconditioner = preconditioner
        self.reports: list[SolveReport] = []
        self.lissa_scale: float | None = None

    @property
    def last_report(self) -> SolveReport | None:
        return self.reports[-1] if self.reports else None

    @property
    def report(self) -> InverseReport:
        return InverseReport(route=solver_name(self.solver), solves=self.reports)

    def damped_matvec(self, V: torch.Tensor) -> torch.Tensor:
        """``(C + λI) V`` for rows ``V``: the operator every iteration solves with."""
        return self.curvature.matvec(V) + self.reg.damping * V

    def solve(self, V: torch.Tensor) -> tuple[torch.Tensor, SolveReport]:
        """``(C + λI)⁻¹`` on rows of ``V`` (K, D) -> ((K, D) float64, report)."""
        V2, vector = as_rows(V, self.num_params, "V")
        t0 = time.perf_counter()
        X, rep = self.solver.solve_rows(self, V2)
        rep.solver = solver_name(self.solver)
        rep.seconds = time.perf_counter() - t0
        self.reports.append(rep)
        _check_report(rep, self.solver.on_failure)
        return (X[0] if vector else X), rep

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        return self.solve(V)[0]

    def __repr__(self) -> str:
        return (
            f"IterativeInverse(method={self.curvature.method!r}, solver={self.solver}, "
            f"reg={self.reg})"
        )


class LanczosInverse(InverseOperator):
    """``C⁺ ≈ U diag(s) Uᵀ + c (I - U Uᵀ)`` from the top-k Ritz pairs of ``C``.

    Attributes:
        U: (D, k) Ritz vectors, orthonormal. ritz_values: (k,) descending.
        ritz_residuals: (k,) ``‖C u_i - θ_i u_i‖``.
        inv_values: (k,) regularised inverse eigenvalues ``s``.
        complement_value: ``c``.
        eigen_report: the eigen-solve's :class:`SolveReport` (iterations, converged per
            Ritz pair in ``converged``; ``residual`` holds the relative Ritz residuals),
            also ``report.solves[0]``.
    """

    def __init__(self, curvature: Curvature, reg: Regularization, solver: Lanczos) -> None:
        self.curvature = curvature
        self.reg = reg
        self.solver = solver
        t0 = time.perf_counter()
        U, theta, res, steps = lanczos(
            curvature.matvec,
            curvature.num_params,
            solver.k,
            max_iter=solver.max_iter,
            seed=solver.seed,
            progress=solver.progress,
            device=curvature.device,
        )
        self.U, self.ritz_values, self.ritz_residuals = U, theta, res
        full = len(theta) == curvature.num_params  # the whole space: no complement
        null = torch.zeros(1, dtype=torch.float64, device=theta.device)
        parts = [theta] if full else [theta, null]
        inv = reg.inverse_eigenvalues(parts, dim=curvature.num_params)
        self.inv_values = inv[0]
        zero_c = full or solver.complement == "zero"
        self.complement_value = 0.0 if zero_c else float(inv[1][0])
        scale = max(float(theta.abs().max()), 1e-300)
        rel = res / scale
        self.eigen_report = SolveReport(
            solver="lanczos",
            iterations=torch.full((len(theta),), steps, device=theta.device),
            residual=rel,
            converged=rel <= solver.tol,
            solution_norm=torch.full((len(theta),), float("nan"), device=theta.device),
            products=steps,
            seconds=time.perf_counter() - t0,
            notes=""
            if bool((rel <= solver.tol).all())
            else (
                f"{int((rel > solver.tol).sum())} of the top {len(theta)} Ritz pairs have "
                f"relative residual > {solver.tol:g}; raise max_iter (now {steps}) or lower k"
            ),
        )
        self.reports: list[SolveReport] = [self.eigen_report]
        _check_report(self.eigen_report, solver.on_failure)
        reg.warn_if_mostly_truncated(
            self.rank, curvature.num_params, f"the {curvature.method} Lanczos inverse"
        )

    @property
    def report(self) -> InverseReport:
        return InverseReport(route="lanczos", rank=self.rank, solves=self.reports)

    @property
    def rank(self) -> int:
        """Directions with a non-zero inverse eigenvalue."""
        kept = int((self.inv_values != 0).sum())
        return kept + (self.num_params - len(self.ritz_values) if self.complement_value else 0)

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        V2, vector = as_rows(V, self.num_params, "V")
        coef = V2 @ self.U  # (K, k)
        out = (coef * (self.inv_values - self.complement_value)) @ self.U.T
        if self.complement_value:
            out = out + self.complement_value * V2
        return out[0] if vector else out

    def __repr__(self) -> str:
        return (
            f"LanczosInverse(method={self.curvature.method!r}, k={len(self.ritz_values)}, "
            f"reg={self.reg}, complement={self.complement_value:g})"
        )


def fitted_preconditioner(
    curvature: Curvature, method: str, reg: Regularization
) -> InverseOperator:
    """The ``method`` preconditioner fitted on a matrix-free rung's own data and fisher."""
    ctx = getattr(curvature, "ctx", None)
    if ctx is None:
        raise ValueError(
            f"preconditioner={method!r} is fitted from a matrix-free rung's data; for "
            f"{type(curvature).__name__} pass an InverseOperator, e.g. "
            "fit_curvature('ekfac', ...).inverse(Regularization(damping=λ, eps=0))."
        )
    if reg.eps == 0 and reg.damping == 0:
        raise ValueError(
            f"the {method} preconditioner needs damping > 0 (its eigenvalues can be 0); "
            "pass Regularization(damping=λ, eps=0) with λ > 0 or set preconditioner_reg."
        )
    if method == "ggn":
        ggn = MatrixFreeCurvature(
            "ggn", ctx, ctx.whole(), max_dense_bytes=curvature.max_dense_bytes
        )
        return ggn.inverse(reg, solver=Gram())
    return fit_kronecker(ctx, method, curvature.max_dense_bytes, "expand").inverse(reg)


def solver_name(s: object) -> str:
    """``cg``, ``lissa``, ``lanczos``, ``ekfac-cg``, ``custom-neumann``, ...: a report's route."""
    if isinstance(s, Preconditioned):
        name = s.preconditioner if isinstance(s.preconditioner, str) else "custom"
        return f"{name}-{s.iteration}"
    return type(s).__name__.lower()


def _check_report(rep: SolveReport, on_failure: str) -> None:
    if rep.all_converged:
        return
    msg = f"iterative inverse did not converge: {rep.summary()}"
    if on_failure == "raise":
        raise ConvergenceError(
            msg + ". Raise max_iter, increase damping, or pass on_failure='warn' to keep the "
            "unconverged answer (the report is in inverse.reports).",
            rep,
        )
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


__all__ = [
    "CG",
    "ConvergenceError",
    "IterativeInverse",
    "Lanczos",
    "LanczosInverse",
    "LiSSA",
    "Preconditioned",
    "SolveReport",
]

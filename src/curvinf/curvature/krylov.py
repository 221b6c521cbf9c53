"""Krylov and Neumann algorithms as pure functions over operators.

An operator is a callable mapping rows ``(K, D) -> (K, D)`` (for instance
``V -> C V + λ V``). :func:`block_cg`, :func:`lissa` and
:func:`preconditioned_neumann` solve ``A X_k = B_k`` for every row at once and
return ``(X, SolveReport)``; :func:`power_iteration` estimates ``λ_max(A)`` and
:func:`lanczos` the top Ritz pairs. This module is the bottom layer of the
solvers: it knows nothing of curvatures, regularisation or inverses
(:mod:`~curvinf.curvature.solvers` builds those on top of it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from curvinf.devices import DeviceSpec, cpu_generator
from curvinf.progress import progress_bar
from curvinf.validation import check_int

Operator = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SolveReport:
    """What one ``apply`` of an iterative inverse did, per right-hand side (K of them).

    Attributes:
        solver: solver name.
        iterations: (K,) iterations each right-hand side ran (products with ``C``).
        residual: (K,) true relative residual ``‖b - (C + λI) x‖ / ‖b‖`` (0 for b = 0);
            NaN where the solver does not solve a linear system (Lanczos).
        converged: (K,) bool.
        solution_norm: (K,) ``‖x‖`` (extreme norms flag an ill-conditioned solve).
        products: vector products with ``C`` the apply used in all.
        seconds: wall time.
        history: (T, K) relative residuals per iteration (NaN once a RHS stopped).
        notes: what went wrong, in words ("" when all is well).
    """

    solver: str
    iterations: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    solution_norm: torch.Tensor
    products: int = 0
    seconds: float = 0.0
    history: torch.Tensor | None = None
    notes: str = ""

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def summary(self) -> str:
        k = len(self.converged)
        bad = int((~self.converged).sum())
        res = self.residual[torch.isfinite(self.residual)]
        worst = f"{float(res.max()):.2e}" if res.numel() else "n/a"
        return (
            f"{self.solver}: {k - bad}/{k} converged, iterations "
            f"{int(self.iterations.min()) if k else 0}-{int(self.iterations.max()) if k else 0}, "
            f"worst residual {worst}, {self.products} products, {self.seconds:.1f}s"
            + (f"; {self.notes}" if self.notes else "")
        )


def _row_norms(V: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(V, dim=1)


def _finish(
    A: Operator,
    B: torch.Tensor,
    X: torch.Tensor,
    iterations: torch.Tensor,
    history: list[torch.Tensor],
    tol: float,
    products: int,
    notes: list[str],
    failed: torch.Tensor,
) -> SolveReport:
    """True residuals (one more product), finiteness, and the report."""
    bnorm = _row_norms(B)
    finite = torch.isfinite(X).all(dim=1)
    Xf = torch.where(finite[:, None], X, torch.zeros_like(X))
    R = B - A(Xf)
    res = torch.where(bnorm > 0, _row_norms(R) / bnorm.clamp_min(1e-300), _row_norms(R))
    res = torch.where(finite, res, torch.full_like(res, float("nan")))
    if not bool(finite.all()):
        notes.append(f"{int((~finite).sum())} solution(s) non-finite")
    converged = finite & (res <= tol) & ~failed
    hist = (
        torch.stack(history)
        if history
        else torch.zeros(0, len(B), dtype=torch.float64, device=B.device)
    )
    return SolveReport(
        solver="",
        iterations=iterations,
        residual=res,
        converged=converged,
        solution_norm=_row_norms(X),
        products=products + len(B),
        history=hist,
        notes="; ".join(notes),
    )


def block_cg(
    A: Operator,
    B: torch.Tensor,
    *,
    tol: float,
    max_iter: int,
    precond: Operator | None = None,
    x0: torch.Tensor | None = None,
    restarts: int = 3,
    progress: bool = True,
) -> tuple[torch.Tensor, SolveReport]:
    """(Preconditioned) CG for ``A X_k = B_k`` on every row ``k`` of ``B`` (K, D) at once.

    One product with the still-active rows per iteration; a row stops when
    ``‖r‖ / ‖b‖ <= tol``, on breakdown (``pᵀ A p <= 0``: ``A`` not positive
    definite) or when it turns non-finite. Returns ``(X (K, D), report)``.
    """
    K = len(B)
    X = torch.zeros_like(B) if x0 is None else x0.clone()
    M = precond if precond is not None else (lambda V: V)
    bnorm = _row_norms(B)
    iterations = torch.zeros(K, dtype=torch.long, device=B.device)
    failed = torch.zeros(K, dtype=torch.bool, device=B.device)
    done = bnorm == 0
    X[done] = 0.0
    history: list[torch.Tensor] = []
    notes: list[str] = []
    products = 0
    total = 0
    with progress_bar(max_iter, "CG iterations", progress) as advance:
        for _round in range(restarts + 1):
            act = torch.nonzero(~done & ~failed).squeeze(1)
            if len(act) == 0:
                break
            R = B[act].clone()
            if bool(X[act].any()):
                R -= A(X[act])
                products += len(act)
            Z = M(R)
            P = Z.clone()
            rz = (R * Z).sum(1)
            while True:
                rel = _row_norms(R) / bnorm[act]
                conv = rel <= tol
                done[act[conv]] = True
                keep = ~conv
                act, R, P, rz = act[keep], R[keep], P[keep], rz[keep]
                if len(act) == 0 or total >= max_iter:
                    break
                AP = A(P)
                products += len(act)
                pAp = (P * AP).sum(1)
                bad = ~(pAp > 0) | ~torch.isfinite(pAp)
                if bool(bad.any()):
                    failed[act[bad]] = True
                    notes.append(
                        f"{int(bad.sum())} RHS broke down at iteration {total + 1} "
                        "(pᵀAp <= 0 or non-finite: C + λI is not positive definite; add damping)"
                    )
                    ok = ~bad
                    act, R, P, rz, AP, pAp = (t[ok] for t in (act, R, P, rz, AP, pAp))
                    if len(act) == 0:
                        break
                alpha = rz / pAp
                X[act] += alpha[:, None] * P
                R = R - alpha[:, None] * AP
                Z = M(R)
                rz_new = (R * Z).sum(1)
                P = Z + (rz_new / rz)[:, None] * P
                rz = rz_new
                iterations[act] += 1
                total += 1
                h = torch.full((K,), float("nan"), dtype=torch.float64, device=B.device)
                h[act] = _row_norms(R) / bnorm[act]
                history.append(h)
                advance(1)
            # the recurrence says converged: check the true residual, restart the drifted
            chk = torch.nonzero(done & (bnorm > 0)).squeeze(1)
            if len(chk) == 0 or _round == restarts:
                break
            true = _row_norms(B[chk] - A(X[chk])) / bnorm[chk]
            products += len(chk)
            drift = true > tol
            if not bool(drift.any()) or total >= max_iter:
                break
            done[chk[drift]] = False
            notes.append(f"restarted {int(drift.sum())} RHS whose true residual drifted above tol")
    still = ~done & ~failed
    if bool(still.any()):
        notes.append(f"{int(still.sum())} RHS hit the iteration cap max_iter={max_iter}")
    return X, _finish(A, B, X, iterations, history, tol, products, notes, failed)


def lissa(
    A: Operator,
    B: torch.Tensor,
    *,
    scale: float,
    tol: float,
    max_iter: int,
    sampler: Callable[[], Operator] | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, SolveReport]:
    """Neumann series ``x_{j+1} = x_j + (b - A_j x_j) / scale``.

    See :class:`~curvinf.curvature.solvers.LiSSA`.

    ``A_j = A`` (deterministic) or ``sampler()`` (a fresh minibatch operator per step):
    :func:`preconditioned_neumann` with ``P = I / scale`` and step 1.
    """
    return _neumann(
        A,
        lambda V: V / scale,
        B,
        step=1.0,
        tol=tol,
        max_iter=max_iter,
        sampler=sampler,
        label="LiSSA depth",
        diverged=f"scale {scale:.3g} is below λ_max(C + λI)/2; raise scale or use scale=None",
        progress=progress,
    )


def preconditioned_neumann(
    A: Operator,
    P: Operator,
    B: torch.Tensor,
    *,
    step: float,
    tol: float,
    max_iter: int,
    progress: bool = True,
) -> tuple[torch.Tensor, SolveReport]:
    """``x_0 = P b``, ``x_{t+1} = x_t + step · P (b - A x_t)``.

    See :class:`~curvinf.curvature.solvers.Preconditioned`.
    """
    return _neumann(
        A,
        P,
        B,
        step=step,
        tol=tol,
        max_iter=max_iter,
        label="preconditioned Neumann",
        diverged=f"step·λ_max(P A) >= 2; lower step (now {step:g}) or use iteration='cg'",
        progress=progress,
    )


def _neumann(
    A: Operator,
    P: Operator,
    B: torch.Tensor,
    *,
    step: float,
    tol: float,
    max_iter: int,
    label: str,
    diverged: str,
    sampler: Callable[[], Operator] | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, SolveReport]:
    """``x_0 = P b``, ``x_{t+1} = x_t + step · P (b - A_t x_t)`` per row, ``A_t = A`` or
    ``sampler()``. The residual ``b - A_t x_t`` is computed anyway, so stopping at
    ``‖r‖/‖b‖ <= tol`` is free; a residual past ``1e6 ‖b‖`` (or non-finite) stops the row as
    diverged, and the note says why (``diverged``)."""
    K = len(B)
    X = P(B)
    bnorm = _row_norms(B).clamp_min(1e-300)
    iterations = torch.zeros(K, dtype=torch.long, device=B.device)
    failed = torch.zeros(K, dtype=torch.bool, device=B.device)
    active = _row_norms(B) > 0
    history: list[torch.Tensor] = []
    notes: list[str] = []
    products = 0
    with progress_bar(max_iter, label, progress) as advance:
        for _ in range(max_iter):
            act = torch.nonzero(active).squeeze(1)
            if len(act) == 0:
                break
            op = sampler() if sampler is not None else A
            R = B[act] - op(X[act])
            products += len(act)
            rel = _row_norms(R) / bnorm[act]
            h = torch.full((K,), float("nan"), dtype=torch.float64, device=B.device)
            h[act] = rel
            history.append(h)
            conv = rel <= tol
            div = ~torch.isfinite(rel) | (rel > 1e6)
            failed[act[div]] = True
            active[act[conv | div]] = False
            upd = ~(conv | div)
            if bool(upd.any()):
                X[act[upd]] += step * P(R[upd])
            iterations[act[upd]] += 1
            advance(1)
    if bool(failed.any()):
        notes.append(
            f"{int(failed.sum())} RHS diverged (residual past 1e6·‖b‖ or non-finite): {diverged}"
        )
    if bool(active.any()):
        notes.append(f"{int(active.sum())} RHS hit the iteration cap max_iter={max_iter}")
    return X, _finish(A, B, X, iterations, history, tol, products, notes, failed)


def power_iteration(
    A: Operator, dim: int, iterations: int, seed: int = 0, *, device: DeviceSpec = "cpu"
) -> float:
    """Estimate of ``λ_max(A)`` (largest magnitude) from ``iterations`` power steps; ``A``
    acts on rows on ``device`` (the start vector is drawn on the CPU and moved there)."""
    gen = cpu_generator(seed)
    v = torch.randn(1, dim, generator=gen, dtype=torch.float64, device="cpu").to(device)
    v /= _row_norms(v)
    lam = 0.0
    for _ in range(iterations):
        w = A(v)
        lam = float((v * w).sum())
        nrm = float(_row_norms(w))
        if nrm == 0 or not math.isfinite(nrm):
            break
        v = w / nrm
    return abs(lam)


def lanczos(
    matvec: Operator,
    dim: int,
    k: int,
    *,
    max_iter: int | None = None,
    seed: int = 0,
    progress: bool = True,
    device: DeviceSpec = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Top-``k`` Ritz pairs of a symmetric operator by Lanczos with full reorthogonalisation.

    ``matvec`` acts on rows on ``device``, where the basis lives (random start vectors are
    drawn on the CPU and moved there, so a seed gives the same start on every device).
    Returns ``(U (D, k), θ (k,) descending, residuals (k,), steps)`` with
    residual ``|β_m s_{m,i}| = ‖C u_i - θ_i u_i‖``. On an invariant subspace it
    restarts from a random vector orthogonal to the basis (so repeated eigenvalues
    get all their directions) and stops early only when the space is exhausted.
    """
    m = min(dim, max_iter if max_iter is not None else 2 * k + 20)
    k = min(k, m)
    gen = cpu_generator(seed)
    Qb = torch.zeros(m + 1, dim, dtype=torch.float64, device=device)
    q = torch.randn(dim, generator=gen, dtype=torch.float64, device="cpu").to(device)
    Qb[0] = q / torch.linalg.vector_norm(q)
    alphas, betas = [], []
    beta_last = 0.0
    steps = 0
    with progress_bar(m, "Lanczos steps", progress) as advance:
        for j in range(m):
            w = matvec(Qb[j : j + 1])[0]
            if not bool(torch.isfinite(w).all()):
                raise ValueError(f"Lanczos: the curvature product is non-finite at step {j + 1}.")
            alpha = float(w @ Qb[j])
            alphas.append(alpha)
            for _ in range(2):  # full reorthogonalisation, twice is enough
                w = w - Qb[: j + 1].T @ (Qb[: j + 1] @ w)
            beta = float(torch.linalg.vector_norm(w))
            steps = j + 1
            advance(1)
            scale = max(abs(a) for a in alphas) + max(betas, default=0.0)
            if j == m - 1:
                beta_last = beta
                break
            if beta <= 1e-12 * max(scale, 1e-300):
                # An invariant subspace: exact so far. A repeated eigenvalue has more
                # directions than one start vector reaches, so restart from a fresh random
                # vector orthogonal to the basis (T decouples: β = 0); stop only when the
                # space is exhausted.
                w = _orthogonal_start(Qb[: j + 1], gen)
                if w is None:
                    beta_last = 0.0
                    break
                betas.append(0.0)
                Qb[j + 1] = w
                continue
            betas.append(beta)
            Qb[j + 1] = w / beta
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64, device=Qb.device))
    if betas:
        off = torch.tensor(betas[: steps - 1], dtype=torch.float64, device=Qb.device)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    theta, S = torch.linalg.eigh(T)
    order = torch.argsort(theta, descending=True)[: min(k, steps)]
    U = Qb[:steps].T @ S[:, order]
    res = (beta_last * S[-1, order]).abs()
    return U, theta[order], res, steps


def smallest_eigenvalue(
    curvature: Any, *, steps: int = 120, seed: int = 0, progress: bool = True
) -> tuple[float, float]:
    """``(θ, r)`` for a symmetric curvature ``C`` (any rung: ``.matvec``, ``.num_params``):
    the smallest Ritz value after ``steps`` Lanczos steps on ``−C`` and its residual
    ``‖C u − θ u‖``, so ``C`` has an eigenvalue in ``[θ − r, θ + r]`` and, ``θ`` being a
    Rayleigh quotient, ``λ_min(C) <= θ``.

    Choosing damping: ``C + δI`` is positive definite (CG applies, no truncation needed)
    only if ``δ > −λ_min(C)``. ``θ`` is an upper bound of ``λ_min``, tight once Lanczos has
    converged at the bottom of the spectrum (``r`` small against the gap to the next Ritz
    value; more ``steps`` if not), so take ``δ`` comfortably above ``−θ``. Cost: ``steps``
    curvature-vector products over the data and a ``steps x D`` basis.
    """
    check_int("steps", steps, low=1)
    D = curvature.num_params
    device = getattr(curvature, "device", "cpu")
    _, theta, res, _ = lanczos(
        lambda V: -curvature.matvec(V),
        D,
        3,
        max_iter=min(D, steps),
        seed=seed,
        progress=progress,
        device=device,
    )
    return -float(theta[0]), float(res[0])


def _orthogonal_start(Q: torch.Tensor, gen: torch.Generator) -> torch.Tensor | None:
    """A random unit vector orthogonal to the rows of ``Q`` (k, D); ``None`` if they span."""
    q = torch.randn(Q.shape[1], generator=gen, dtype=torch.float64, device="cpu").to(Q.device)
    q = q / torch.linalg.vector_norm(q)
    for _ in range(2):
        q = q - Q.T @ (Q @ q)
    norm = float(torch.linalg.vector_norm(q))
    return None if norm <= 1e-8 else q / norm


__all__ = [
    "Operator",
    "SolveReport",
    "block_cg",
    "lanczos",
    "lissa",
    "power_iteration",
    "preconditioned_neumann",
    "smallest_eigenvalue",
]

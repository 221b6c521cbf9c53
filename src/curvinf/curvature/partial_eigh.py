"""The eigenpairs of a dense symmetric matrix above a threshold, certified, without a full
``eigh``.

A truncated inverse keeps only the eigenpairs ``λ > t`` of its matrix ``A`` (R, R); when
they are few (``k ≪ R``) a full ``eigh`` (about ``11 R³`` flops at GEMM speed here: its
tridiagonal reduction runs at a tenth of GEMM speed) computes ``R − k`` eigenvectors for
nothing. :func:`eigenpairs_above` instead

1. counts them exactly: ``k = #{λ_i(A) > t}`` is the number of positive eigenvalues of
   ``A − tI``, which by Sylvester's law of inertia equals that of ``D`` in the
   Bunch–Kaufman factorisation ``A − tI = P L D Lᵀ Pᵀ`` (``D`` has 1x1 and 2x2 blocks;
   ``R³/3`` flops, :func:`count_above`);
2. runs orthogonal (subspace) iteration ``V ← qr(A V)`` on ``m = 2k + 64`` columns with a
   Rayleigh–Ritz step each time (``H = Vᵀ A V = Y diag(θ) Yᵀ``, Ritz pairs ``(θ_i, V y_i)``):
   Ritz pair ``i`` converges like ``(λ_{m+1}/λ_i)^q``, so the ``m − k`` extra columns set
   the rate (about 10x per iteration on the study's Gram matrices);
3. stops when the top ``k`` residuals ``‖A x_i − θ_i x_i‖`` are below ``tol · θ_1`` and
   the ``k``-th Ritz value is above ``t``. The Ritz values never exceed the eigenvalues
   in order (``θ_i <= λ_i``, Cauchy interlacing), so with the count of step 1 no
   eigenvalue above ``t`` is missed.

Cost ``R³/3`` (factorisation) plus per iteration ``2R²m + 8Rm² + 10m³``; the function
predicts it from ``k`` and declines (returns ``None``) when it would not beat a full
``eigh`` by ``1 / max_cost_ratio``, or when the iteration converges too slowly to.
"""

from __future__ import annotations

import math

import torch

from curvinf.devices import cpu_generator

EIGH_GEMM_FLOPS = 11.0
"""A full float64 ``eigh`` of an (R, R) matrix costs about as much time as ``11 R³`` flops of
GEMM on this class of machine (measured: 10.3 s for R = 4,000 against 69 GFLOP/s GEMM on
one thread); the factorisation of step 1 about ``R³`` (``ldl_factor`` runs near a third
of GEMM speed)."""


MAX_ITERATIONS = 300
"""A cap on the iterations whatever the budget (``max_cost_ratio=inf``)."""


def count_above(A: torch.Tensor, t: float) -> int:
    """``#{i : λ_i(A) > t}`` for a symmetric (R, R) ``A``, exact up to the backward error of
    the factorisation (eigenvalues within about ``R·ε·‖A‖`` of ``t`` may go either way, as
    they may in ``eigh``): the positive eigenvalues of ``D`` in ``A − tI = P L D Lᵀ Pᵀ``.
    """
    LD = A.clone()
    LD.diagonal().sub_(t)
    pivots = torch.empty(A.shape[0], dtype=torch.int32, device=A.device)
    info = torch.empty((), dtype=torch.int32, device=A.device)
    torch.linalg.ldl_factor_ex(LD, out=(LD, pivots, info))  # in place: one copy of A
    if int(info) < 0:
        raise ValueError(f"ldl_factor rejected its argument {-int(info)}")
    d = LD.diagonal().tolist()
    off = LD.diagonal(-1).tolist()
    piv = pivots.tolist()
    count, i = 0, 0
    while i < len(d):
        if piv[i] > 0:  # a 1x1 block
            count += d[i] > 0
            i += 1
        else:  # a 2x2 block [[a, b], [b, c]] in rows i, i + 1
            a, b, c = d[i], off[i], d[i + 1]
            det = a * c - b * b
            count += 1 if det < 0 else (2 if det > 0 and a > 0 else (a + c > 0))
            i += 2
    return count


def _iteration(R: int, k: int) -> tuple[int, float]:
    """The columns ``m`` iterated for ``k`` kept pairs and the flops of one iteration."""
    m = min(R, 2 * k + 64)
    return m, 2.0 * R * R * m + 8.0 * R * m * m + 10.0 * m**3


def predicted_ratio(R: int, k: int, iterations: int = 12) -> float:
    """The predicted cost of :func:`eigenpairs_above` over a full ``eigh`` (module doc)."""
    return (R**3 + iterations * _iteration(R, k)[1]) / (EIGH_GEMM_FLOPS * R**3)


def eigenpairs_above(
    A: torch.Tensor,
    t: float,
    *,
    tol: float = 1e-13,
    max_cost_ratio: float = 0.7,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The eigenpairs of a symmetric (R, R) ``A`` with ``λ > t``: eigenvalues (k,) ascending
    and orthonormal eigenvectors (R, k) as ``torch.linalg.eigh`` orders them (module doc).

    Each returned pair has ``‖A u − λ u‖ <= tol · λ_max``. ``None`` when the route would
    cost more than ``max_cost_ratio`` of a full ``eigh`` (predicted from the count, or
    found so by a slow or stalled iteration, or past :data:`MAX_ITERATIONS`): then call
    ``torch.linalg.eigh``. ``seed`` fixes the
    random start, so a result is reproducible.
    """
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be a square matrix, got shape {tuple(A.shape)}.")
    if not 0 < max_cost_ratio:
        raise ValueError(f"max_cost_ratio must be positive, got {max_cost_ratio}.")
    R = A.shape[0]
    if predicted_ratio(R, 0) > max_cost_ratio:  # too small a matrix for the route to pay
        return None
    k = count_above(A, t)
    empty = (A.new_zeros(0), A.new_zeros(R, 0))
    if k == 0:
        return empty
    if predicted_ratio(R, k) > max_cost_ratio:
        return None
    m, per_iteration = _iteration(R, k)
    budget = (max_cost_ratio * EIGH_GEMM_FLOPS * R**3 - R**3) / per_iteration
    V = torch.randn(R, m, dtype=A.dtype, generator=cpu_generator(seed), device="cpu")
    V = V.to(A.device)
    V = torch.linalg.qr(V).Q
    history: list[float] = []
    it = 0
    while True:
        it += 1
        W = A @ V
        H = V.T @ W
        theta, Y = torch.linalg.eigh((H + H.T) / 2)
        theta, Y = theta.flip(0), Y.flip(1)  # descending
        X, WY = V @ Y, W @ Y
        res = (WY[:, :k] - X[:, :k] * theta[:k]).norm(dim=0)
        scale = max(float(theta[0]), 0.0) or 1.0
        worst = float(res.max()) / scale
        if worst <= tol and float(theta[k - 1]) > t:
            return theta[:k].flip(0).contiguous(), X[:, :k].flip(1).contiguous()
        history.append(worst)
        if it >= MAX_ITERATIONS:
            return None
        if len(history) >= 3:  # the observed rate, and the iterations it still needs
            rate = history[-1] / history[-2]
            if rate >= 1:  # stalled (at the rounding floor, or no gap to converge on)
                return None
            if it + math.log(tol / worst) / math.log(rate) > budget:
                return None
        elif it > budget:
            return None
        V = torch.linalg.qr(WY).Q


__all__ = ["count_above", "eigenpairs_above", "predicted_ratio"]

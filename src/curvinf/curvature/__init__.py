"""The curvature ladder behind one interface: :func:`fit_curvature`.

==============  ==================================================  ============
method          curvature                                           structure
==============  ==================================================  ============
hessian         ∇²_θ of the mean loss                               dense
ggn             1/N Σ J_nᵀ Q_n Q_nᵀ J_n  (``fisher`` picks Q)       dense
block_hessian   Hessian, cross-block entries dropped                per block
block_ggn       GGN, cross-block entries dropped                    per block
unshared_ggn    per-layer GGN blocks with K-FAC's weight-sharing    per layer
                approximation (``kfac_variant``), unfactorised
ekfac           Kronecker basis of K-FAC, exact diagonal in it      per layer
kfac            S ⊗ A per layer                                     per layer
diag_ggn        diagonal of the GGN                                 diagonal
identity        I (gradient dot product, the no-curvature floor)    diagonal
==============  ==================================================  ============

Every inverse comes from ``curvature.inverse(reg, solver=None)``: no solver
eigendecomposes; a solver setting builds its own inverse. Past dense memory,
:func:`matrix_free` gives the exact rungs (hessian, ggn,
block_hessian, block_ggn) as products only, inverted by the iterative solvers
of :mod:`curvinf.curvature.solvers` (``CG``, ``Lanczos``, ``LiSSA``,
``Preconditioned``): ``matrix_free("ggn", ...).inverse(reg, solver=CG())``;
GGN rungs also exactly, without iterations, through the Gram matrix of their
pseudo-gradients: ``matrix_free("ggn", ...).inverse(reg, solver=Gram())``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from curvinf.curvature.context import FitContext, FitSettings
from curvinf.curvature.dense import (
    DenseCurvature,
    DiagonalCurvature,
    ggn_blocks,
    ggn_diagonal,
    hessian_blocks,
)
from curvinf.curvature.gram import Gram, GramInverse
from curvinf.curvature.kronecker import KroneckerCurvature, fit_kronecker
from curvinf.curvature.krylov import smallest_eigenvalue
from curvinf.curvature.matfree import MatrixFreeCurvature, matrix_free
from curvinf.curvature.operators import (
    Curvature,
    InverseCurvature,
    InverseOperator,
)
from curvinf.curvature.regularization import Regularization
from curvinf.curvature.sharing import fit_unshared
from curvinf.curvature.solvers import (
    CG,
    ConvergenceError,
    Lanczos,
    LiSSA,
    Preconditioned,
    SolveReport,
)
from curvinf.names import LADDER, MATRIX_FREE_METHODS, METHODS
from curvinf.params import model_fingerprint
from curvinf.validation import check_choice, check_dense_budget

__all__ = [
    "CG",
    "LADDER",
    "MATRIX_FREE_METHODS",
    "METHODS",
    "ConvergenceError",
    "Curvature",
    "FitSettings",
    "DenseCurvature",
    "DiagonalCurvature",
    "Gram",
    "GramInverse",
    "InverseCurvature",
    "InverseOperator",
    "KroneckerCurvature",
    "Lanczos",
    "LiSSA",
    "MatrixFreeCurvature",
    "Preconditioned",
    "Regularization",
    "SolveReport",
    "fit_curvature",
    "matrix_free",
    "smallest_eigenvalue",
]


def fit_curvature(
    method: str,
    model: nn.Module,
    loss: nn.Module,
    X: torch.Tensor | Iterable,
    y: torch.Tensor | None = None,
    *,
    settings: FitSettings | None = None,
    **options: Any,
) -> Curvature:
    """Fit one rung of the curvature ladder on the training data ``(X, y)``.

    Args:
        method: one of :data:`METHODS`.
        model: a module mapping inputs ``X`` (N, ...) of any shape and dtype (integer
            token ids stay integer) to outputs (N, C), per-position outputs (N, *P, C)
            (cross-entropy, classes last) or any shape (MSE); fitted on a float64 copy.
            Generic routes need a model ``torch.func`` can trace (:mod:`curvinf.tracing`).
        loss: ``nn.CrossEntropyLoss()`` (``y``: (N,) or (N, *P) int labels; an example's
            loss is the mean over its positions) or ``nn.MSELoss()`` (``y``: float, the
            output's shape; mean over every entry), mean reduction.
        X, y: the training data as tensors, or ``X`` a ``DataLoader`` (any re-iterable of
            ``(X, y)`` batches) and ``y`` left out, for data that do not fit in one tensor:
            read batch by batch, moved to the model's device (:mod:`curvinf.batches`).
        settings, options: the fit options, :class:`FitSettings` (``fisher``,
            ``mc_samples``, ``seed``, ``partition``, ``kfac_variant`` (``expand`` /
            ``reduce`` for layers with weight sharing), ``bias``, ``uncovered`` (what
            K-FAC / EK-FAC do with parameters no layer adapter covers: ``error``,
            ``exact``, ``diagonal``), ``chunk_size``, ``max_dense_bytes``, ``progress``),
            as one object and/or keywords (``fit_curvature("ggn", ..., fisher="mc")``);
            keywords win.

    The model is differentiated in eval mode, with respect to its trainable
    parameters (docs/conventions.md); the returned curvature records the model's
    fingerprint, so scoring another model with its inverse is refused. The fit runs on
    the device of the model's parameters (``X`` and ``y`` must be there too, else
    ``ValueError`` naming the tensor) and the curvature stays there
    (:mod:`curvinf.devices`).

    Returns:
        A :class:`Curvature`: ``.dense()``, ``.matvec(V)``, ``.inverse(reg)``.
    """
    check_choice("method", method, METHODS)
    settings = FitSettings.from_options(settings, **options)
    ctx = FitContext.build(model, loss, X, y, settings)
    curv = _fit(method, ctx)
    curv.model_fingerprint = model_fingerprint(model)
    return curv


def _fit(method: str, ctx: FitContext) -> Curvature:
    D, s = ctx.num_params, ctx.settings
    if method in ("hessian", "ggn"):
        check_dense_budget(D, s.max_dense_bytes, method)
        compute = hessian_blocks if method == "hessian" else ggn_blocks
        return DenseCurvature(method, D, compute(ctx, ctx.whole()), s.max_dense_bytes)
    if method in ("block_hessian", "block_ggn"):
        blocks = ctx.blocks(s.partition)
        largest = max(b.size for b in blocks)
        check_dense_budget(largest, s.max_dense_bytes, f"{method} block")
        compute = hessian_blocks if method == "block_hessian" else ggn_blocks
        return DenseCurvature(method, D, compute(ctx, blocks), s.max_dense_bytes)
    if method in ("kfac", "ekfac"):
        return fit_kronecker(ctx, method, s.max_dense_bytes, s.kfac_variant)
    if method == "unshared_ggn":
        return fit_unshared(ctx, s.max_dense_bytes)
    if method == "diag_ggn":
        return DiagonalCurvature(method, ggn_diagonal(ctx), s.max_dense_bytes)
    ones = torch.ones(D, dtype=torch.float64, device=ctx.device)
    return DiagonalCurvature(method, ones, s.max_dense_bytes)

"""The curvature ladder behind one interface: :func:`fit_curvature`.

==============  ==================================================  ============
method          curvature                                           structure
==============  ==================================================  ============
hessian         ∇²_θ of the mean loss                               dense
ggn             1/N Σ J_nᵀ Q_n Q_nᵀ J_n  (``fisher`` picks Q)       dense
block_hessian   Hessian, cross-block entries dropped                per block
block_ggn       GGN, cross-block entries dropped                    per block
ekfac           Kronecker basis of K-FAC, exact diagonal in it      per layer
kfac            S ⊗ A per layer                                     per layer
diag_ggn        diagonal of the GGN                                 diagonal
identity        I (gradient dot product, the no-curvature floor)    diagonal
==============  ==================================================  ============

Past dense memory, :func:`matrix_free` gives the exact rungs (hessian, ggn,
block_hessian, block_ggn) as products only, inverted by the iterative solvers
of :mod:`curvinf.curvature.solvers` (``CG``, ``Lanczos``, ``LiSSA``,
``Preconditioned``): ``matrix_free("ggn", ...).inverse(reg, solver=CG())``;
GGN rungs also exactly, without iterations, through the Gram matrix of their
pseudo-gradients: ``matrix_free("ggn", ...).inverse(reg, solver=Gram())``.
"""

from __future__ import annotations

import torch
from torch import nn

from curvinf.curvature.context import FitContext
from curvinf.curvature.dense import (
    DenseCurvature,
    DiagonalCurvature,
    ggn_blocks,
    ggn_diagonal,
    hessian_blocks,
)
from curvinf.curvature.gram import Gram, GramInverse
from curvinf.curvature.kronecker import KroneckerCurvature, fit_kronecker
from curvinf.curvature.matfree import MATRIX_FREE_METHODS, MatrixFreeCurvature, matrix_free
from curvinf.curvature.operators import (
    DEFAULT_MAX_DENSE_BYTES,
    Curvature,
    InverseCurvature,
    InverseOperator,
)
from curvinf.curvature.regularization import Regularization
from curvinf.curvature.solvers import (
    CG,
    ConvergenceError,
    Lanczos,
    LiSSA,
    Preconditioned,
    SolveReport,
    solve_inverse,
)
from curvinf.params import model_fingerprint
from curvinf.validation import check_choice, check_dense_budget, check_number

METHODS = (
    "hessian",
    "ggn",
    "block_hessian",
    "block_ggn",
    "ekfac",
    "kfac",
    "diag_ggn",
    "identity",
)
LADDER = ("hessian", "ggn", "block_ggn", "ekfac", "kfac")

__all__ = [
    "CG",
    "LADDER",
    "MATRIX_FREE_METHODS",
    "METHODS",
    "ConvergenceError",
    "Curvature",
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
    "solve_inverse",
]


def fit_curvature(
    method: str,
    model: nn.Module,
    loss: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    fisher: str = "type2",
    mc_samples: int = 1,
    seed: int = 0,
    partition: str = "layer",
    kfac_variant: str = "expand",
    chunk_size: int = 256,
    max_dense_bytes: float = DEFAULT_MAX_DENSE_BYTES,
    progress: bool = True,
) -> Curvature:
    """Fit one rung of the curvature ladder on the training data ``(X, y)``.

    Args:
        method: one of :data:`METHODS`.
        model: a module mapping (N, F) to (N, C); fitted on a float64 copy.
        loss: ``nn.CrossEntropyLoss()`` (``y``: (N,) int) or ``nn.MSELoss()``
            (``y``: (N, C) float), mean reduction.
        fisher: output-space curvature of GGN-type rungs: ``type2`` (exact),
            ``mc`` (``mc_samples`` labels sampled from the model, ``seed``) or
            ``empirical`` (observed labels). Ignored by Hessian rungs and identity.
        partition: blocks of the block rungs: ``layer`` (weight and bias
            together) or ``tensor``.
        kfac_variant: ``expand`` or ``reduce`` for layers with weight sharing.
        chunk_size: examples per chunk; memory grows linearly with it.
        max_dense_bytes: refuse dense matrices above this size.
        progress: draw progress bars (once work lasts over two seconds).

    The model is differentiated in eval mode, with respect to its trainable
    parameters (docs/conventions.md); the returned curvature records the model's
    fingerprint, so scoring another model with its inverse is refused.

    Returns:
        A :class:`Curvature`: ``.dense()``, ``.matvec(V)``, ``.inverse(reg)``.
    """
    check_choice("method", method, METHODS)
    check_number("max_dense_bytes", max_dense_bytes, low=0, strict_low=True)
    ctx = FitContext.build(
        model,
        loss,
        X,
        y,
        fisher=fisher,
        mc_samples=mc_samples,
        seed=seed,
        chunk_size=chunk_size,
        progress=progress,
    )
    curv = _fit(method, ctx, partition, kfac_variant, max_dense_bytes)
    curv.model_fingerprint = model_fingerprint(model)
    return curv


def _fit(
    method: str, ctx: FitContext, partition: str, kfac_variant: str, max_dense_bytes: float
) -> Curvature:
    D = ctx.num_params
    if method in ("hessian", "ggn"):
        check_dense_budget(D, max_dense_bytes, method)
        compute = hessian_blocks if method == "hessian" else ggn_blocks
        return DenseCurvature(method, D, compute(ctx, ctx.whole()), max_dense_bytes)
    if method in ("block_hessian", "block_ggn"):
        blocks = ctx.blocks(partition)
        largest = max(b.size for b in blocks)
        check_dense_budget(largest, max_dense_bytes, f"{method} block")
        compute = hessian_blocks if method == "block_hessian" else ggn_blocks
        return DenseCurvature(method, D, compute(ctx, blocks), max_dense_bytes)
    if method in ("kfac", "ekfac"):
        return fit_kronecker(ctx, method, max_dense_bytes, kfac_variant)
    if method == "diag_ggn":
        return DiagonalCurvature(method, ggn_diagonal(ctx), max_dense_bytes)
    return DiagonalCurvature(method, torch.ones(D, dtype=torch.float64), max_dense_bytes)

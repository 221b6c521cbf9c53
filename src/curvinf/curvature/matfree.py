"""Matrix-free rungs: products with the Hessian and the GGN, never a ``D x D`` matrix.

For rows ``V`` (K, D) (K vectors at once, ``vmap``-ed) and the training set in
chunks of ``chunk_size`` examples:

- Hessian: ``V ↦ V H``, ``H = ∇²_θ L``, ``L = 1/N Σ_n ℓ_n``. Per chunk ``c`` the
  forward-over-reverse product ``jvp(∇_θ L_c, θ; v)``, weighted by ``|c| / N``.
- GGN: ``V ↦ V G``, ``G = 1/N Σ_n J_nᵀ Q_n Q_nᵀ J_n`` with ``J_n = ∂f(x_n)/∂θ``
  (F, D) (``F`` entries of one example's flattened output) and the output-space
  square roots ``Q_n`` (F, K_f) of :func:`curvinf.losses.output_sqrt` (``fisher``:
  type2, mc, empirical). Per chunk: ``u = J v`` (``jvp``, (n, F)), ``w = Q Qᵀ u``,
  ``Jᵀ w`` (``vjp``).
  ``Q`` is drawn once, with the fit's seeded generator in the fit's chunk
  order, so ``fisher="mc"`` uses the same samples as the dense rung.
- Block-diagonal versions (``block_hessian``, ``block_ggn``): the same
  products with only one block's parameters free
  (:meth:`~curvinf.curvature.context.FitContext.outputs_fn`), block by block.

A product costs about ``K`` forward-and-backward passes over the training
set (times the number of blocks for block rungs); memory is
``O(vector_chunk · (chunk_size · activations + D))``.

The operator is a :class:`~curvinf.curvature.operators.Curvature`:
``matvec`` is matrix-free; ``dense()`` and the eigendecomposition behind
``inverse(reg)`` with ``solver=None`` apply it to the identity (small models
only, under ``max_dense_bytes``); ``inverse(reg, solver=CG(...))`` and the
other solvers of :mod:`curvinf.curvature.solvers` never form a matrix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import grad, jvp, vjp, vmap

from curvinf.curvature.context import FitContext, FitSettings
from curvinf.curvature.operators import (
    DEFAULT_MAX_DENSE_BYTES,
    Curvature,
    DenseEigenBlock,
    EigenBlock,
    as_rows,
)
from curvinf.losses import batch_loss, output_sqrt
from curvinf.names import MATRIX_FREE_METHODS
from curvinf.params import ParamBlock, model_fingerprint
from curvinf.tracing import traced
from curvinf.validation import check_choice, check_dense_budget, check_int


class MatrixFreeCurvature(Curvature):
    """A Hessian or GGN rung (whole or block-diagonal) known only through products.

    Attributes:
        ctx: the validated fit context (model copy, data, fisher settings).
        param_blocks: the blocks; one block holding every parameter for the
            unblocked rungs.
        vector_chunk: how many of the K vectors go through ``vmap`` at once.
        products: running count of vector products evaluated (K per ``matvec``
            of K rows; a block rung counts one per row, not per block).
    """

    def __init__(
        self,
        method: str,
        ctx: FitContext,
        param_blocks: list[ParamBlock],
        *,
        vector_chunk: int = 64,
        max_dense_bytes: float = DEFAULT_MAX_DENSE_BYTES,
    ) -> None:
        super().__init__(method, ctx.num_params, max_dense_bytes)
        check_int("vector_chunk", vector_chunk, low=1)
        self.ctx = ctx
        self.param_blocks = param_blocks
        self.vector_chunk = vector_chunk
        self.products = 0
        self.output_roots = output_roots(ctx) if method in ("ggn", "block_ggn") else None

    @property
    def is_ggn(self) -> bool:
        return self.output_roots is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.ctx.dtype

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def matvec(self, V: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of ``V`` (K, D) (or a (D,) vector) times ``C`` -> float64, same shape.

        ``rows`` (long tensor of training indices) evaluates the curvature of
        that subset instead, normalised by its size (stochastic solvers).
        """
        V2, vector = as_rows(V, self.num_params, "V")
        device = self.device
        idx = (
            torch.arange(self.ctx.n, device=device)
            if rows is None
            else torch.as_tensor(rows, device=device).long()
        )
        if idx.numel() == 0:
            raise ValueError("rows is empty; pass at least one training index.")
        out = torch.zeros_like(V2)
        for a in range(0, len(V2), self.vector_chunk):
            Vc = V2[a : a + self.vector_chunk]
            for block in self.param_blocks:
                whole = block.size == self.num_params
                Vb = (Vc if whole else Vc[:, block.index]).to(self.dtype)
                Pb = self._block_product(block, Vb, idx).to(torch.float64)
                if whole:
                    out[a : a + len(Vc)] = Pb
                else:
                    out[a : a + len(Vc), block.index] = Pb
        self.products += len(V2)
        return out[0] if vector else out

    def _block_product(self, block: ParamBlock, V: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``V C_b`` for one block: ``V`` (K, d_b) in the context dtype -> (K, d_b)."""
        with traced(self.ctx.model, f"{self.method} products"):
            return self._products(block, V, idx)

    def _products(self, block: ParamBlock, V: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        f, theta = self.ctx.outputs_fn(block.names)
        kind = self.ctx.loss_kind
        acc = torch.zeros(V.shape, dtype=torch.float64, device=V.device)
        for rows in idx.split(self.ctx.chunk_size):
            xb, yb = self.ctx.X[rows], self.ctx.y[rows]
            if self.output_roots is None:
                g = grad(lambda t, xb=xb, yb=yb: batch_loss(kind, f(t, xb), yb))
                part = vmap(lambda v, g=g: jvp(g, (theta,), (v,))[1])(V)
                acc += (len(rows) / len(idx)) * part.to(torch.float64)
            else:
                Q = self.output_roots[rows]  # (n, F, K_f)

                def fx(t: torch.Tensor, xb: torch.Tensor = xb) -> torch.Tensor:
                    return f(t, xb)

                JV = vmap(lambda v, fx=fx: jvp(fx, (theta,), (v,))[1])(V)  # (K, n, *out)
                JV = JV.reshape(len(V), len(rows), -1)  # (K, n, F)
                W = torch.einsum("nck,Knk->Knc", Q, torch.einsum("nck,Knc->Knk", Q, JV))
                out, pullback = vjp(fx, theta)
                part = vmap(lambda w, pb=pullback, s=out.shape: pb(w.reshape(s))[0])(W)
                acc += part.to(torch.float64) / len(idx)
        return acc

    def dense(self) -> torch.Tensor:
        """``C`` (D, D) float64 from D products with the identity (small models only)."""
        check_dense_budget(self.num_params, self.max_dense_bytes, f"{self.method}.dense()")
        C = self.matvec(torch.eye(self.num_params, dtype=torch.float64, device=self.device))
        return 0.5 * (C + C.T)

    def _eigen(self) -> list[EigenBlock]:
        C = self.dense()
        out: list[EigenBlock] = []
        for block in self.param_blocks:
            evals, U = torch.linalg.eigh(C[block.index[:, None], block.index[None, :]])
            out.append(DenseEigenBlock(block.index, U, evals))
        return out

    def __repr__(self) -> str:
        return (
            f"MatrixFreeCurvature(method={self.method!r}, num_params={self.num_params}, "
            f"blocks={len(self.param_blocks)}, dtype={self.dtype})"
        )


def output_roots(ctx: FitContext) -> torch.Tensor:
    """``Q_n`` (N, F, K_f) for every training example, drawn like the dense GGN fit."""
    f, theta = ctx.outputs_fn(tuple(ctx.params))
    gen = ctx.generator()
    roots = []
    for xb, yb in ctx.chunks():
        with torch.no_grad():
            out = f(theta, xb)
        roots.append(
            output_sqrt(
                ctx.loss_kind, ctx.fisher, out, yb, mc_samples=ctx.mc_samples, generator=gen
            )
        )
    return torch.cat(roots)


def matrix_free(
    method: str,
    model: nn.Module,
    loss: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    settings: FitSettings | None = None,
    **options: Any,
) -> MatrixFreeCurvature:
    """A matrix-free exact rung on the training data ``(X, y)``.

    Args:
        method: ``hessian``, ``ggn``, ``block_hessian`` or ``block_ggn``.
        model, loss, X, y, settings, options: as in :func:`curvinf.fit_curvature`
            (:class:`~curvinf.curvature.context.FitSettings`; ``vector_chunk`` is the
            number of vectors per ``vmap`` call, ``max_dense_bytes`` the budget of
            ``dense()``); the same arguments give products equal to
            ``fit_curvature(...).matvec`` (float64).
        dtype: compute dtype of the products (float64 default; float32 is
            about twice as fast on CPU, with relative errors near 1e-6 that
            bound how tight an iterative solve can get).

    Returns:
        A :class:`MatrixFreeCurvature`; ``.inverse(reg, solver=CG(...))``.
    """
    check_choice("method", method, MATRIX_FREE_METHODS)
    settings = FitSettings.from_options(settings, **options)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}.")
    ctx = FitContext.build(model, loss, X, y, settings, dtype=dtype)
    ctx.check_in_memory("matrix_free (products and the Gram route)")
    blocks = ctx.whole() if method in ("hessian", "ggn") else ctx.blocks(settings.partition)
    curv = MatrixFreeCurvature(
        method,
        ctx,
        blocks,
        vector_chunk=settings.vector_chunk,
        max_dense_bytes=settings.max_dense_bytes,
    )
    curv.model_fingerprint = model_fingerprint(model)
    return curv

"""Unfactored rungs: Hessian, GGN, their block-diagonal versions, the diagonal GGN, identity.

- Hessian ``H = ∇²_θ 1/N Σ_n ℓ_n``, column by column from Hessian-vector
  products (forward-over-reverse, ``vmap`` over basis vectors), data in chunks.
- GGN ``G = 1/N Σ_n J_nᵀ Q_n Q_nᵀ J_n = 1/N MᵀM`` with ``M`` the stacked
  per-example pseudo-gradients (N·K, D) (see :mod:`curvinf.losses` for ``Q``).
  Blocks slice ``M`` by columns; the diagonal is ``1/N Σ M²``.

Models whose parameters all sit in ``nn.Linear`` layers on (N, features)
inputs (MLPs; for the Hessian: an ``nn.Sequential`` of ``Linear`` and
elementwise activations) take the exact, cheaper Kronecker-structured route
of :mod:`curvinf.curvature.structured` (same matrices, ``K``-fold and ~6-fold
fewer flops). Models whose parameters all sit in layers with an adapter
(``Conv2d``, ``Linear`` over positions) take the factored routes of
:mod:`curvinf.curvature.chain`: ``M`` from per-layer factors (GGN) and, for
``nn.Sequential`` chains with piecewise-linear glue (ReLU, pooling), the Hessian
as the type-2 GGN plus the bilinear layer-pair terms. Every other model takes the
generic route above; ``MᵀM`` is summed on its lower block triangle
(:func:`curvinf.curvature.chain.add_gram`).
"""

from __future__ import annotations

import torch
from torch.func import grad, jvp, vmap

from curvinf.curvature import chain, structured
from curvinf.curvature.context import FitContext
from curvinf.curvature.operators import (
    Curvature,
    DenseEigenBlock,
    DiagonalEigenBlock,
    EigenBlock,
)
from curvinf.losses import batch_loss
from curvinf.params import ParamBlock
from curvinf.progress import progress_bar
from curvinf.tracing import traced
from curvinf.validation import check_dense_budget


class DenseCurvature(Curvature):
    """A curvature stored as dense blocks ``(block, matrix)``; one block = the full matrix."""

    def __init__(
        self,
        method: str,
        num_params: int,
        blocks: list[tuple[ParamBlock, torch.Tensor]],
        max_dense_bytes: float,
    ) -> None:
        super().__init__(method, num_params, max_dense_bytes)
        self.blocks = blocks

    @property
    def device(self) -> torch.device:
        return self.blocks[0][1].device

    def _eigen(self) -> list[EigenBlock]:
        out: list[EigenBlock] = []
        for block, C in self.blocks:
            evals, U = torch.linalg.eigh(C)
            out.append(DenseEigenBlock(block.index, U, evals))
        return out

    def dense(self) -> torch.Tensor:
        check_dense_budget(self.num_params, self.max_dense_bytes, f"{self.method}.dense()")
        device = self.device
        whole = torch.arange(self.num_params, device=device)
        if len(self.blocks) == 1 and torch.equal(self.blocks[0][0].index, whole):
            return self.blocks[0][1].clone()
        D = torch.zeros(self.num_params, self.num_params, dtype=torch.float64, device=device)
        for block, C in self.blocks:
            a, b = int(block.index[0]), int(block.index[-1]) + 1
            if b - a == block.size and torch.equal(block.index, torch.arange(a, b, device=device)):
                D[a:b, a:b] = C  # a contiguous range: plain slicing, no index scatter
            else:
                D[block.index[:, None], block.index[None, :]] = C
        return D

    def block_matrices(self) -> dict[str, torch.Tensor]:
        """``block name -> (d, d)`` matrix."""
        return {b.name: C for b, C in self.blocks}


class DiagonalCurvature(Curvature):
    """``C = diag(c)``; ``identity`` is the special case ``c = 1`` (gradient dot product)."""

    def __init__(self, method: str, diagonal: torch.Tensor, max_dense_bytes: float) -> None:
        super().__init__(method, int(diagonal.numel()), max_dense_bytes)
        self.diagonal = diagonal

    @property
    def device(self) -> torch.device:
        return self.diagonal.device

    def _eigen(self) -> list[EigenBlock]:
        index = torch.arange(self.num_params, device=self.device)
        return [DiagonalEigenBlock(index, self.diagonal)]


def hessian_blocks(
    ctx: FitContext, blocks: list[ParamBlock], *, basis_chunk: int = 512
) -> list[tuple[ParamBlock, torch.Tensor]]:
    """Exact Hessian of the mean loss restricted to each block: list of (d_b, d_b)."""
    fast = structured.hessian_blocks(ctx, blocks)
    if fast is None:
        fast = chain.hessian_blocks(ctx, blocks)
    if fast is not None:
        return fast
    out = []
    with (
        traced(ctx.model, "the Hessian (Hessian-vector products)"),
        progress_bar(sum(b.size for b in blocks), "Hessian columns", ctx.progress) as advance,
    ):
        for block in blocks:
            f, theta = ctx.outputs_fn(block.names)
            H = torch.zeros(block.size, block.size, dtype=torch.float64, device=ctx.device)
            for xb, yb in ctx.chunks():
                H += (len(xb) / ctx.n) * _chunk_hessian(
                    ctx.loss_kind, f, theta, xb, yb, basis_chunk
                )
            out.append((block, 0.5 * (H + H.T)))
            advance(block.size)
    return out


def _chunk_hessian(kind, f, theta, xb, yb, basis_chunk: int) -> torch.Tensor:
    """Hessian of the chunk's mean loss w.r.t. ``theta``, ``basis_chunk`` HVPs at a time."""
    g = grad(lambda t: batch_loss(kind, f(t, xb), yb))

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return jvp(g, (theta,), (v,))[1]

    eye = torch.eye(len(theta), dtype=torch.float64, device=theta.device)
    return torch.cat([vmap(hvp)(eye[a : a + basis_chunk]) for a in range(0, len(eye), basis_chunk)])


def ggn_blocks(ctx: FitContext, blocks: list[ParamBlock]) -> list[tuple[ParamBlock, torch.Tensor]]:
    """GGN blocks ``1/N M[:, b]ᵀ M[:, b]`` accumulated over data chunks."""
    fast = structured.ggn_blocks(ctx, blocks)
    if fast is None:
        fast = chain.ggn_blocks(ctx, blocks)
    if fast is not None:
        return fast
    acc, add = chain.gram_accumulators(blocks, ctx.num_params, ctx.device)
    gen = ctx.generator()
    with progress_bar(ctx.n, "GGN examples", ctx.progress) as advance:
        for xb, yb in ctx.chunks():
            add(ctx.pseudo_grads(xb, yb, gen).reshape(-1, ctx.num_params))
            advance(len(xb))
    return [(b, chain.mirror_gram(C).div_(ctx.n)) for b, C in zip(blocks, acc, strict=True)]


def ggn_diagonal(ctx: FitContext) -> torch.Tensor:
    """``diag(G) = 1/N Σ_rows M²``: (D,)."""
    diag = torch.zeros(ctx.num_params, dtype=torch.float64, device=ctx.device)
    gen = ctx.generator()
    for xb, yb in ctx.chunks():
        diag += ctx.pseudo_grads(xb, yb, gen).pow(2).sum(dim=(0, 1))
    return diag / ctx.n

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


HVP_ROWS = 4096
"""Example-vector pairs per ``vmap``-ed Hessian-vector-product call of the generic route:
``basis_chunk = HVP_ROWS // chunk examples`` (8 to 512). Calls over more pairs spill the
cache (each intermediate is ``vectors x examples x activations`` floats) and run up to 2x
slower on the CPU; fewer pay Python and dispatch overhead per call."""


def hessian_blocks(
    ctx: FitContext, blocks: list[ParamBlock], *, basis_chunk: int | None = None
) -> list[tuple[ParamBlock, torch.Tensor]]:
    """Exact Hessian of the mean loss restricted to each block: list of (d_b, d_b).

    Generic route (models the structured and chain routes do not describe): per block
    and per parameter tensor ``t`` of it (in θ order), the columns of ``t`` for the rows of
    ``t`` and every later tensor of the block, ``H[t:, t] = ∂(∇_{θ_{t:}} L)/∂θ_t``, by
    forward-over-reverse products with basis vectors of ``θ_t`` only; the upper triangle
    by symmetry. Tangents start at ``θ_t`` (nothing upstream of its use is differentiated
    forward) and the reverse pass stops at the earliest of ``θ_{t:}``, so a block costs
    about half of ``d_b`` full Hessian-vector products when θ is in forward order (and is
    exact in any order).
    """
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
            H = torch.zeros(block.size, block.size, dtype=torch.float64, device=ctx.device)
            sizes = [ctx.params[name].numel() for name in block.names]
            starts = [sum(sizes[:t]) for t in range(len(sizes))]
            for t, (a, d) in enumerate(zip(starts, sizes, strict=True)):
                f, theta = ctx.outputs_fn(block.names[t:])
                for xb, yb in ctx.chunks():
                    vectors = basis_chunk or min(512, max(8, HVP_ROWS // len(xb)))
                    cols = _chunk_hessian_columns(ctx.loss_kind, f, theta, d, xb, yb, vectors)
                    H[a:, a : a + d] += (len(xb) / ctx.n) * cols.T
                H[a : a + d, a : a + d] = 0.5 * (
                    H[a : a + d, a : a + d] + H[a : a + d, a : a + d].T
                )
                H[a : a + d, a + d :] = H[a + d :, a : a + d].T
                advance(d)
            out.append((block, H))
    return out


def _chunk_hessian_columns(
    kind: str, f, theta: torch.Tensor, d: int, xb: torch.Tensor, yb: torch.Tensor, vectors: int
) -> torch.Tensor:
    """``H[:, :d]ᵀ`` (d, len(theta)) of the chunk's mean loss w.r.t. ``theta``: the Hessian
    columns of its first ``d`` entries, ``vectors`` forward-over-reverse products at a time,
    tangents on those ``d`` entries only."""
    head, rest = theta[:d], theta[d:]

    def grads(h: torch.Tensor) -> torch.Tensor:
        both = grad(lambda u, r: batch_loss(kind, f(torch.cat([u, r]), xb), yb), argnums=(0, 1))
        return torch.cat(both(h, rest))

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return jvp(grads, (head,), (v,))[1]

    eye = torch.eye(d, dtype=theta.dtype, device=theta.device)
    return torch.cat([vmap(hvp)(eye[a : a + vectors]) for a in range(0, d, vectors)])


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

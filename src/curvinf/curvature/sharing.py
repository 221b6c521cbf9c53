"""The unshared block-GGN: the exact per-layer matrices that K-FAC factorises.

A layer with weight sharing (a convolution over its T output positions, a ``Linear``
over a sequence) has the per-example pseudo-gradient ``g_nk = Σ_t s_nkt ⊗ ã_nt``
(:class:`~curvinf.curvature.layers.Captures`: ``s`` (n, K, T, out), ``ã`` (n, T, in')), so
its block of the GGN is ``1/N Σ_{n,k} g_nk g_nkᵀ``, cross-position terms included. K-FAC
approximates that block in two steps, and this rung stops after the first:

1. *weight sharing* (Eschenhagen et al., 2023), by ``kfac_variant``:

   - ``expand``: positions as extra examples, cross-position terms dropped:
     ``G_exp = 1/N Σ_{n,t} (Σ_k s_nkt s_nktᵀ) ⊗ ã_nt ã_ntᵀ``;
   - ``reduce``: inputs averaged and gradients summed over positions first,
     ``ā_n = 1/T Σ_t ã_nt``, ``s̄_nk = Σ_t s_nkt``:
     ``G_red = 1/N Σ_n (Σ_k s̄_nk s̄_nkᵀ) ⊗ ā_n ā_nᵀ``;

2. *Kronecker factorisation*: ``E[S ⊗ A] ≈ E[S] ⊗ E[A]`` over the (n, t) pairs (expand)
   or the examples (reduce), which gives K-FAC's ``S ⊗ A`` of the same variant
   (:func:`curvinf.curvature.kronecker.kronecker_factors`).

So block-GGN → unshared GGN is the weight-sharing step and unshared GGN → K-FAC the
factorisation step. With one position per example (T = 1: an MLP, or a layer applied once)
step 1 is exact and this rung *is* the block-GGN over K-FAC's blocks (``bias``:
``joint`` layers or ``separate`` weight and bias). Matrices are in the flat parameter
order (weight row-major, then bias); parameters no adapter covers follow ``uncovered``
as in K-FAC (:func:`curvinf.curvature.kronecker.uncovered_blocks`).

Cost per chunk and block: ``2 · n·T · out² · in'²`` flops (one GEMM over the (n, t) rows
of ``S_nt ⊗ ã_nt``), ``K`` times fewer than summing the ``n·K·T`` pseudo-gradient outer
products.
"""

from __future__ import annotations

import torch

from curvinf.curvature.context import FitContext
from curvinf.curvature.dense import DenseCurvature, ggn_blocks, ggn_diagonal
from curvinf.curvature.kronecker import KroneckerBlock, kronecker_blocks, reduced
from curvinf.curvature.layers import UNCOVERED_TREATMENT, fit_captures, layer_coverage
from curvinf.curvature.operators import layer_flat
from curvinf.params import ParamBlock
from curvinf.progress import progress_bar
from curvinf.validation import check_dense_budget

ROW_BYTES = 64 * 2**20
"""Memory of the (rows, out² · in') intermediate of one GEMM of :func:`_accumulate`."""


def _accumulate(acc: torch.Tensor, S: torch.Tensor, a: torch.Tensor) -> None:
    """``acc[o, p, i, j] += Σ_x S[x, o, p] a[x, i] a[x, j]`` in place.

    ``acc`` (out·out, in'·in') viewed as (out², in', in'); ``S`` (x, out, out), ``a`` (x, in'):
    row chunks of ``(S ⊗ a)ᵀ a``, each ``(x', out²·in')`` within :data:`ROW_BYTES`.
    """
    x, out, n_in = len(a), S.shape[-1], a.shape[-1]
    S2 = S.reshape(x, out * out)
    width = out * out * n_in
    step = max(1, int(ROW_BYTES // (8 * width)))
    view = acc.view(out * out * n_in, n_in)
    for r in range(0, x, step):
        W = (S2[r : r + step, :, None] * a[r : r + step, None, :]).reshape(-1, width)
        view.addmm_(W.T, a[r : r + step])


def _flat_order(out: int, n_in: int, has_bias: bool, device: torch.device) -> torch.Tensor:
    """For each flat position of a block, its index in the row-major ``(out, in')`` matrix."""
    order = torch.arange(out * n_in, device=device).reshape(1, out, n_in)
    return layer_flat(order, has_bias)[0]


def unshared_block_matrices(
    ctx: FitContext, kblocks: list[KroneckerBlock], adapters: list, variant: str
) -> list[tuple[ParamBlock, torch.Tensor]]:
    """``G_exp`` or ``G_red`` (module doc) of each Kronecker block, (d_b, d_b) float64."""
    shapes = []
    for blk in kblocks:
        out = adapters[blk.layer].matrix_shape[0]
        shapes.append((out, blk.stop - blk.start))
    acc = [torch.zeros(o * o, i * i, dtype=torch.float64, device=ctx.device) for o, i in shapes]
    gen = ctx.generator()
    with progress_bar(ctx.n, f"unshared GGN ({variant})", ctx.progress) as advance:
        for xb, yb in ctx.chunks():
            caps = reduced(fit_captures(ctx, adapters, xb, yb, gen, verify=False), variant)
            for j, blk in enumerate(kblocks):
                s = caps.grads[blk.layer]  # (n, K, T, out)
                a = blk.columns(caps.inputs[blk.layer])  # (n, T, in')
                S = torch.einsum("nkto,nktp->ntop", s, s).reshape(-1, s.shape[-1], s.shape[-1])
                _accumulate(acc[j], S, a.reshape(-1, a.shape[-1]))
            advance(len(xb))
    out_blocks = []
    for blk, (o, i), C in zip(kblocks, shapes, acc, strict=True):
        M = C.view(o, o, i, i).permute(0, 2, 1, 3).reshape(o * i, o * i) / ctx.n
        order = _flat_order(o, i, blk.has_bias, C.device)
        M = M[order][:, order]
        out_blocks.append((ParamBlock(blk.name, blk.index, (blk.name,)), 0.5 * (M + M.T)))
    return out_blocks


def fit_unshared(ctx: FitContext, max_dense_bytes: float) -> DenseCurvature:
    """The ``unshared_ggn`` rung (module doc) with ``ctx.settings``' ``kfac_variant``,
    ``bias`` and ``uncovered``: dense blocks, one per Kronecker block, then one per
    uncovered module (its exact GGN block, or its GGN diagonal)."""
    s = ctx.settings
    adapters, rest = layer_coverage(ctx.model, "unshared_ggn", s.uncovered)
    kblocks = kronecker_blocks(adapters, s.bias)
    sizes = [len(b.index) for b in kblocks] + [b.size for b in rest]
    check_dense_budget(max(sizes), max_dense_bytes, "unshared_ggn block")
    blocks = unshared_block_matrices(ctx, kblocks, adapters, s.kfac_variant) if kblocks else []
    if rest and s.uncovered == "exact":
        blocks += ggn_blocks(ctx, rest)
    elif rest:
        diag = ggn_diagonal(ctx)
        blocks += [(b, torch.diag(diag[b.index])) for b in rest]
    blocks.sort(key=lambda bc: int(bc[0].index.min()))
    curv = DenseCurvature("unshared_ggn", ctx.num_params, blocks, max_dense_bytes)
    curv.variant = s.kfac_variant
    curv.uncovered = {b.name: UNCOVERED_TREATMENT[s.uncovered] for b in rest}
    return curv


__all__ = ["fit_unshared", "unshared_block_matrices"]

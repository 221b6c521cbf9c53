"""Dense GGN and Hessian (blocks) of ``nn.Linear`` networks from per-example layer factors.

The generic routes in :mod:`curvinf.curvature.dense` form ``G = 1/N MᵀM`` from
stacked pseudo-gradients ``M`` (N·K, D) — ``2 N K D²`` flops — and the Hessian
from ``D`` Hessian-vector products. When every parameter sits in an
``nn.Linear`` on (N, features) inputs, a per-example layer gradient is an
outer product ``s ãᵀ`` and both matrices have a cheaper exact form.

Layout: the block of layers ``(m, l)`` is computed as a tensor
``(out_m, in_m', out_l, in_l')`` over the *augmented* weights ``[W | b]``
(``in' = in + 1`` with a bias; bias as the last column) and permuted into the
flat parameter order (weight row-major, then bias) when assembled.

GGN (any ``fisher``): with ``s_{l,nk} = ∂(Q_nᵀ f)_k/∂z_l`` (out_l) and
``ã_{l,n}`` the augmented input of layer ``l``,

    G_{ml}[(o,j),(p,i)] = 1/N Σ_n B_n[o,p] ã_{m,n}[j] ã_{l,n}[i],   B_n = Σ_k s_{m,nk} s_{l,nk}ᵀ,

one GEMM with inner dimension N per layer pair: ``2 N d_m d_l`` flops, ``N D²``
for the lower triangle of the whole matrix — ``K`` times fewer than ``MᵀM``.

Hessian (``nn.Sequential`` of ``Linear`` and elementwise activations only):
by the chain rule on the graph ``z_l = W_l ã_l``, ``ã_{l+1} = [σ(z_l); 1]``,
``f = z_L``, with ``g_l = ∂ℓ/∂z_l``, ``u_l = W̄_{l+1}ᵀ g_{l+1} = ∂ℓ/∂σ(z_l)``
(``W̄`` without the bias column) and ``P_{k←l} = ∂z_k/∂z_l``,

    ∇²ℓ = Σ_nodes Jᵀ (local second derivative · adjoint) J:
      (A) G-like part, l <= m: H_{ml}[(o,j),(p,i)] = 1/N Σ_n B_n[o,p] ã_{m,n}[j] ã_{l,n}[i],
          B_n = P_{L←m}ᵀ H_out P_{L←l} + Σ_{m<=k<L} P_{k←m}ᵀ diag(σ''(z_k) u_k) P_{k←l}
              = M_m P_{m←l},   M_m = ∂²ℓ/∂z_m² without bilinear terms (a backward recursion)
          (the loss node, then each activation node; zero σ'' terms are skipped),
      (B) bilinear node z_m = W_m ã_m, l < m:
          H_{ml}[(o,j),(p,i)] += 1/N Σ_n g_{m,n}[o] (σ'(z_{m-1}) ⊙ P_{m-1←l})_n[j,p] ã_{l,n}[i]
          for the non-bias columns j (the bias column of ``ã_m`` is constant),

and ``H_{lm} = H_{ml}ᵀ``. Both parts are GEMMs with inner dimension N:
about ``2 N D²`` flops for the whole matrix against ``~12 N D²`` for ``D``
forward-over-reverse HVPs.

Every function returns ``None`` when the model does not have the structure it
needs; callers then take the generic route.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.func import jvp

from curvinf.curvature.context import FitContext
from curvinf.curvature.layers import (
    LayerAdapter,
    UnfactorableModelError,
    fit_captures,
    linear_layers,
)
from curvinf.losses import output_grad, output_hessian
from curvinf.params import ParamBlock
from curvinf.progress import progress_bar

ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ReLU6,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Softplus,
    nn.Hardtanh,
    nn.Identity,
)

Pairs = dict[tuple[int, int], torch.Tensor]


def _aug_shape(ad: LayerAdapter) -> tuple[int, int]:
    out, n_in = ad.module.weight.shape
    return out, n_in + int(ad.has_bias)


def _flat_to_aug(ad: LayerAdapter) -> torch.Tensor:
    """Position in the augmented (out, in') layout of each local flat position."""
    out, n_in = ad.module.weight.shape
    width = n_in + int(ad.has_bias)
    device = ad.index.device
    o = torch.arange(out, device=device)[:, None] * width
    perm = (o + torch.arange(n_in, device=device)[None, :]).reshape(-1)
    if ad.has_bias:
        perm = torch.cat([perm, o[:, 0] + n_in])
    return perm


def _covers(adapters: list[LayerAdapter], blocks: list[ParamBlock]) -> list[list[int]] | None:
    """Per block, the layers it touches; ``None`` if a block holds only part of the union."""
    size = sum(ad.index.numel() for ad in adapters)
    owner = torch.full((size,), -1, dtype=torch.long, device=blocks[0].index.device)
    for i, ad in enumerate(adapters):
        owner[ad.index] = i
    out = []
    for b in blocks:
        layers = sorted(set(owner[b.index].tolist()))
        if -1 in layers:
            return None
        out.append(layers)
    return out


def _pairs_needed(covers: list[list[int]]) -> list[tuple[int, int]]:
    """Layer pairs ``(m, l)``, ``m >= l``, inside some block."""
    return sorted({(m, lo) for c in covers for m in c for lo in c if m >= lo})


class _Acc:
    """Per layer pair ``(m, l)``, ``m >= l``: GEMM accumulators in the layouts the GEMMs give.

    ``A[(m, l)]``: ``((o, p), (j, i))`` (out_m·out_l, in_m'·in_l'), the G-like part;
    ``B[(m, l)]``, ``l < m`` (Hessian only): ``((j, p), (o, i))`` (in_m·out_l, out_m·in_l'),
    the bilinear part (non-bias columns ``j`` of layer ``m`` only).
    """

    def __init__(self, adapters: list[LayerAdapter], pairs: list[tuple[int, int]], bilinear: bool):
        self.adapters = adapters
        self.A: Pairs = {}
        self.B: Pairs = {}
        for m, lo in pairs:
            (om, im), (ol, il) = _aug_shape(adapters[m]), _aug_shape(adapters[lo])
            device = adapters[m].index.device
            self.A[(m, lo)] = torch.zeros(om * ol, im * il, dtype=torch.float64, device=device)
            if bilinear and lo < m:
                im_w = adapters[m].module.weight.shape[1]
                self.B[(m, lo)] = torch.zeros(
                    im_w * ol, om * il, dtype=torch.float64, device=device
                )

    def add_a(self, m: int, lo: int, Bn: torch.Tensor, a_m: torch.Tensor, a_l: torch.Tensor):
        """``A[o, p, j, i] += Σ_n Bn[n, o, p] a_m[n, j] a_l[n, i]``: one GEMM over n."""
        n = len(Bn)
        self.A[(m, lo)].addmm_(
            Bn.reshape(n, -1).T, (a_m[:, :, None] * a_l[:, None, :]).reshape(n, -1)
        )

    def add_b(self, m: int, lo: int, F: torch.Tensor, g_m: torch.Tensor, a_l: torch.Tensor):
        """``B[j, p, o, i] += Σ_n F[n, j, p] g_m[n, o] a_l[n, i]``: one GEMM over n."""
        n = len(F)
        self.B[(m, lo)].addmm_(
            F.reshape(n, -1).T, (g_m[:, :, None] * a_l[:, None, :]).reshape(n, -1)
        )

    def write(self, C: torch.Tensor, m: int, lo: int) -> None:
        """Block ``(m, l)`` into ``C`` (d_m, d_l) in the flat order: weight rows, then bias."""
        (om, im1), (ol, il1) = _aug_shape(self.adapters[m]), _aug_shape(self.adapters[lo])
        bm, bl = self.adapters[m].has_bias, self.adapters[lo].has_bias
        im, il = im1 - int(bm), il1 - int(bl)
        A = self.A[(m, lo)].view(om, ol, im1, il1).permute(0, 2, 1, 3)  # (o, j, p, i)
        _write4(C, A, om, im, ol, il, bm, bl, add=False)
        if (m, lo) in self.B:
            B = self.B[(m, lo)].view(im, ol, om, il1).permute(2, 0, 1, 3)  # (o, j, p, i)
            _write4(C, B, om, im, ol, il, False, bl, add=True)


def _write4(C, T, om, im, ol, il, bm, bl, *, add: bool) -> None:
    """Copy (or add) ``T`` (o, j, p, i), augmented layout, into the flat-order block ``C``."""

    def put(dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.add_(src) if add else dst.copy_(src)

    w_rows, b_rows = C[: om * im], C[om * im :]
    put(w_rows[:, : ol * il].view(om, im, ol, il), T[:, :im, :, :il])
    if bl:
        put(w_rows[:, ol * il :].view(om, im, ol), T[:, :im, :, il])
    if bm:
        put(b_rows[:, : ol * il].view(om, ol, il), T[:, im, :, :il])
        if bl:
            put(b_rows[:, ol * il :], T[:, im, :, il])


def _assemble(
    adapters: list[LayerAdapter],
    blocks: list[ParamBlock],
    covers: list[list[int]],
    acc: _Acc,
    n: int,
) -> list[tuple[ParamBlock, torch.Tensor]]:
    """Blocks in the flat parameter order from the accumulators (divided by ``n``)."""
    sizes = [ad.index.numel() for ad in adapters]
    out = []
    for block, cover in zip(blocks, covers, strict=True):
        offs = list(itertools.accumulate([0, *[sizes[i] for i in cover]]))
        d = offs[-1]
        C = torch.empty(d, d, dtype=torch.float64, device=block.index.device)
        for a, m in enumerate(cover):
            for b, lo in enumerate(cover[: a + 1]):
                blk = C[offs[a] : offs[a + 1], offs[b] : offs[b + 1]]
                acc.write(blk, m, lo)
                blk.div_(n)
                if b != a:
                    C[offs[b] : offs[b + 1], offs[a] : offs[a + 1]] = blk.T
        union = torch.cat([adapters[i].index for i in cover])
        if not torch.equal(union, block.index):
            pos = torch.searchsorted(union, block.index)
            C = C[pos[:, None], pos[None, :]]
        out.append((block, C))
    return out


def ggn_blocks(
    ctx: FitContext, blocks: list[ParamBlock]
) -> list[tuple[ParamBlock, torch.Tensor]] | None:
    """GGN blocks for ``nn.Linear``-only models on 2-D inputs (module doc), else ``None``."""
    adapters = linear_layers(ctx.model, ctx.X, "structured")
    covers = None if adapters is None else _covers(adapters, blocks)
    if covers is None:
        return None
    pairs = _pairs_needed(covers)
    acc = _Acc(adapters, pairs, bilinear=False)
    gen = ctx.generator()
    with progress_bar(ctx.n, "GGN examples", ctx.progress) as advance:
        for c, (xb, yb) in enumerate(ctx.chunks()):
            try:
                caps = fit_captures(ctx, adapters, xb, yb, gen, verify=c == 0)
            except UnfactorableModelError:  # weight sharing, parameters used outside a layer
                return None
            if not caps.one_position:
                return None
            a_all, s_all = caps.rows()  # (n, in'), (n, K, out)
            for m, lo in pairs:
                acc.add_a(m, lo, s_all[m].transpose(1, 2) @ s_all[lo], a_all[m], a_all[lo])
            advance(len(xb))
    return _assemble(adapters, blocks, covers, acc, ctx.n)


def _elementwise_derivatives(act: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``σ'(z)`` and ``σ''(z)`` of an elementwise activation, by forward mode."""
    ones = torch.ones_like(z)

    def d1(u: torch.Tensor) -> torch.Tensor:
        return jvp(act, (u,), (ones,))[1]

    first, second = jvp(d1, (z,), (ones,))
    return first, second


def _has_hooks(model: nn.Module) -> bool:
    """Whether any module carries forward (pre-)hooks, which may change what it computes."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _sequential_mlp(model: nn.Module) -> tuple[list[nn.Linear], list[nn.Module]] | None:
    """``(linears, activations)`` of a plain ``Linear (act Linear)*`` chain; else ``None``.

    Proven from the structure, not assumed: ``nn.Sequential``'s own ``forward`` (a
    subclass overriding it, e.g. with a skip connection, is refused), children of the
    exact types ``nn.Linear`` and an elementwise activation, and no forward hooks.
    :func:`hessian_blocks` also checks the chain's output against ``model(x)``.
    """
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        return None
    if _has_hooks(model):
        return None
    mods = list(model.children())
    linears, acts = mods[0::2], mods[1::2]
    if len(linears) != len(acts) + 1:
        return None
    if not all(type(m) is nn.Linear for m in linears):
        return None
    if not all(type(a) in ELEMENTWISE for a in acts):
        return None
    return linears, acts


def hessian_blocks(
    ctx: FitContext, blocks: list[ParamBlock]
) -> list[tuple[ParamBlock, torch.Tensor]] | None:
    """Hessian blocks of the mean loss for ``Sequential`` MLPs (module doc), else ``None``."""
    mlp = _sequential_mlp(ctx.model)
    adapters = None if mlp is None else linear_layers(ctx.model, ctx.X, "structured")
    covers = None if adapters is None else _covers(adapters, blocks)
    if covers is None:
        return None
    linears, acts = mlp
    if [ad.module for ad in adapters] != linears:
        return None
    L = len(linears)
    pairs = _pairs_needed(covers)
    acc = _Acc(adapters, pairs, bilinear=True)
    by_l: dict[int, list[int]] = {}
    for m, lo in pairs:
        by_l.setdefault(lo, []).append(m)
    W = [lin.weight for lin in linears]  # W̄: the weight without the bias column
    with torch.no_grad(), progress_bar(ctx.n, "Hessian examples", ctx.progress) as advance:
        for c, (xb, yb) in enumerate(ctx.chunks()):
            n = len(xb)
            # forward: augmented inputs ã_k, σ'(z_k), σ''(z_k)
            a_in, d1, d2 = [], [], []
            x = xb
            for k, lin in enumerate(linears):
                a_in.append(adapters[k].inputs(x)[:, 0])
                z = lin(x)
                if k < L - 1:
                    first, second = _elementwise_derivatives(acts[k], z)
                    d1.append(first)
                    d2.append(second)
                    x = acts[k](z)
            f = z
            if c == 0 and not torch.allclose(f, ctx.model(xb), rtol=1e-10, atol=1e-12):
                return None  # the chain is not what the model computes
            # backward: g_k = ∂ℓ_n/∂z_k; M_k = ∂²ℓ_n/∂z_k² without the bilinear terms:
            # M_{L-1} = H_out, M_k = diag(σ'_k) W̄ᵀ M_{k+1} W̄ diag(σ'_k) + diag(σ''_k ⊙ W̄ᵀ g_{k+1}).
            g: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
            M: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
            g[L - 1] = output_grad(ctx.loss_kind, f, yb)
            M[L - 1] = output_hessian(ctx.loss_kind, f)
            for k in range(L - 2, -1, -1):
                u = g[k + 1] @ W[k + 1]
                g[k] = d1[k] * u
                Mk = W[k + 1].T @ M[k + 1] @ W[k + 1]
                Mk = d1[k][:, :, None] * Mk * d1[k][:, None, :]
                M[k] = Mk + torch.diag_embed(d2[k] * u) if bool(d2[k].any()) else Mk
            # per l: P = ∂z_m/∂z_l for m = l, l+1, ...; B_n = M_m P (G-like part),
            # F = σ'(z_{m-1}) ⊙ ∂z_{m-1}/∂z_l (bilinear part)
            for lo, ms in by_l.items():
                eye = torch.eye(linears[lo].out_features, dtype=torch.float64, device=ctx.device)
                P = eye.expand(n, -1, -1)
                for m in range(lo, max(ms) + 1):
                    if m > lo:
                        F = d1[m - 1][:, :, None] * P
                        P = W[m] @ F
                        if m in ms:
                            acc.add_b(m, lo, F, g[m], a_in[lo])
                    if m in ms:
                        acc.add_a(m, lo, M[m] @ P, a_in[m], a_in[lo])
            advance(n)
    return _assemble(adapters, blocks, covers, acc, ctx.n)

"""K-FAC and EK-FAC: per-layer Kronecker factors, never a ``D x D`` matrix.

For a layer with augmented inputs ``ã`` (in+1: a trailing 1 for the bias) and
output-space pseudo-gradients ``s_{n,k}`` (out) — the backpropagation of the
columns of ``Q_n`` to the layer's pre-activations — the layer gradient is the
matrix ``s ãᵀ`` (out, in+1), and the block GGN is

    G_l = 1/N Σ_n Σ_k (s_nk ⊗ ã_n)(s_nk ⊗ ã_n)ᵀ          (row-major vec of s ãᵀ)
        ≈ S ⊗ A,   S = 1/N Σ_n Σ_k s_nk s_nkᵀ,   A = 1/N Σ_n ã_n ã_nᵀ.   (K-FAC)

With ``S = U_S Λ_S U_Sᵀ`` and ``A = U_A Λ_A U_Aᵀ`` the K-FAC eigenvalues are
``Λ_S,i Λ_A,j``. EK-FAC keeps the basis ``U_S ⊗ U_A`` and replaces them with
``Λ*_ij = 1/N Σ_n Σ_k ((U_Sᵀ s_nk ã_nᵀ U_A)_ij)²``, the exact diagonal of
``G_l`` in that basis. For one example and ``fisher="type2"``, ``S ⊗ A = G_l``.

Layers with weight sharing (inputs with extra dimensions, a sequence of
length T per example) go through their :class:`~curvinf.curvature.layers.LayerAdapter`:
the capture gives ``ã`` (N, T, in+1) and ``s`` (N, K, T, out); the ``expand``
variant treats the T positions as extra examples in ``A`` (scaled ``1/(N T)``),
``reduce`` averages the inputs and sums the gradients over T first (Eschenhagen
et al., 2023). Adapters live in :mod:`curvinf.curvature.layers`.

Bias layout (``FitSettings.bias``): ``joint`` is the above, one block per layer.
``separate`` gives a layer with a bias two Kronecker blocks (:func:`kronecker_blocks`):
the weight ``W`` (out, in) with ``S ⊗ A_W``, ``A_W = 1/N Σ_n a_n a_nᵀ`` (the inputs
without the 1), and the bias ``b`` (out,) with ``S ⊗ [1] = S``; the cross terms between
``W`` and ``b`` are dropped. Each is a block of columns of ``ã`` (``a`` and the column
of ones) sharing the layer's ``S``; EK-FAC corrects each block in its own basis. The
blocks sit at the tensors' positions in θ (weight, then bias), so every eigen-block
consumer (products, ``dense()``, inverses, scoring, files) takes them unchanged.

Fitting runs in stages: :func:`kronecker_factors` (A, S per block, filling a
:class:`CaptureCache`), :func:`factor_eigendecompositions`, and for EK-FAC
:func:`corrected_eigenvalues` (reading the cache, or recapturing if it overflowed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from curvinf.curvature.context import BIAS_LAYOUTS, KFAC_VARIANTS, FitContext
from curvinf.curvature.dense import ggn_blocks, ggn_diagonal
from curvinf.curvature.layers import (
    UNCOVERED_TREATMENT,
    Captures,
    LayerAdapter,
    factored_layers,
    fit_captures,
    layer_coverage,
    measure_captures,
)
from curvinf.curvature.operators import (
    Curvature,
    DenseEigenBlock,
    DiagonalEigenBlock,
    EigenBlock,
    InverseCurvature,
    KroneckerEigenBlock,
    ScoringTask,
)
from curvinf.curvature.regularization import Regularization
from curvinf.params import ParamBlock
from curvinf.progress import progress_bar
from curvinf.validation import cast_floating, check_choice


@dataclass
class LayerFactors:
    """K-FAC factors of one Kronecker block: ``A`` (in', in') over the block's columns of
    ``ã`` (``in + 1`` for a joint layer), ``S`` (out, out), both float64."""

    name: str
    A: torch.Tensor
    S: torch.Tensor


@dataclass(frozen=True)
class KroneckerBlock:
    """Columns ``start:stop`` of layer ``layer``'s ``ã`` with its output gradients ``s``: a
    Kronecker block at positions ``index`` of θ. ``has_bias``: the last column is the bias
    of a joint ``[W | b]`` block."""

    name: str
    layer: int
    start: int
    stop: int
    index: torch.Tensor
    has_bias: bool

    def columns(self, a: torch.Tensor) -> torch.Tensor:
        """The block's columns of ``ã`` (..., in')."""
        return a if self.start == 0 and self.stop == a.shape[-1] else a[..., self.start : self.stop]


def kronecker_blocks(adapters: list[LayerAdapter], bias: str = "joint") -> list[KroneckerBlock]:
    """The Kronecker blocks of ``adapters`` in θ order: one per layer (``joint``), or for a
    layer with a bias the weight and the bias apart (``separate``)."""
    check_choice("bias", bias, BIAS_LAYOUTS)
    out = []
    for i, ad in enumerate(adapters):
        n_in = ad.module.weight[0].numel()
        n_w = ad.module.weight.numel()
        if bias == "separate" and ad.has_bias:
            w, b = ad.index[:n_w], ad.index[n_w:]
            prefix = f"{ad.name}." if ad.name else ""
            out.append(KroneckerBlock(prefix + "weight", i, 0, n_in, w, False))
            out.append(KroneckerBlock(prefix + "bias", i, n_in, n_in + 1, b, False))
        else:
            out.append(KroneckerBlock(ad.name, i, 0, n_in + ad.has_bias, ad.index, ad.has_bias))
    return out


def reduced(captures: Captures, variant: str) -> Captures:
    """``expand``: as captured; ``reduce``: inputs averaged and gradients summed over T."""
    if variant == "expand":
        return captures
    return Captures(
        [a.mean(dim=1, keepdim=True) for a in captures.inputs],
        [s.sum(dim=2, keepdim=True) for s in captures.grads],
    )


CAPTURE_CACHE_BYTES = 256 * 2**20


@dataclass
class CaptureCache:
    """The captures of every chunk of a K-FAC pass, kept for the EK-FAC pass
    while they fit ``budget`` bytes; past that it holds nothing and ``overflowed`` is set,
    and the EK-FAC pass recaptures (same samples: the generator restarts from the seed)."""

    budget: float = field(default_factory=lambda: CAPTURE_CACHE_BYTES)
    chunks: list[Captures] = field(default_factory=list)
    overflowed: bool = False
    nbytes: int = 0

    def add(self, captures: Captures) -> None:
        if self.overflowed:
            return
        self.nbytes += captures.nbytes
        if self.nbytes > self.budget:
            self.chunks.clear()
            self.overflowed = True
        else:
            self.chunks.append(captures)

    @property
    def complete(self) -> bool:
        return bool(self.chunks) and not self.overflowed


def kronecker_factors(
    ctx: FitContext,
    adapters: list[LayerAdapter],
    variant: str = "expand",
    cache: CaptureCache | None = None,
    blocks: list[KroneckerBlock] | None = None,
) -> list[LayerFactors]:
    """``A = 1/(N T) Σ_{n,t} ã ãᵀ`` (over the block's columns) and
    ``S = 1/N Σ_n Σ_k Σ_t s sᵀ`` (its layer's) per block of ``blocks`` (default: one per
    layer), from the captures as they are (``expand``) or :func:`reduced` over the T
    positions first (``reduce``, then T = 1); each chunk's captures, as captured, go to
    ``cache`` if one is given."""
    check_choice("kfac variant", variant, KFAC_VARIANTS)
    blocks = kronecker_blocks(adapters) if blocks is None else blocks
    A: list[torch.Tensor | None] = [None] * len(blocks)
    S: list[torch.Tensor | None] = [None] * len(adapters)
    gen = ctx.generator()
    with progress_bar(ctx.n, "K-FAC factors", ctx.progress) as advance:
        for c, (xb, yb) in enumerate(ctx.chunks()):
            full = fit_captures(ctx, adapters, xb, yb, gen, verify=c == 0)
            caps = reduced(full, variant)
            for i, s in enumerate(caps.grads):
                s2 = s.reshape(-1, s.shape[-1])
                S[i] = s2.T @ s2 if S[i] is None else S[i] + s2.T @ s2
            for j, blk in enumerate(blocks):
                a = blk.columns(caps.inputs[blk.layer])
                a2 = a.reshape(-1, a.shape[-1])
                cA = a2.T @ a2 / a.shape[1]
                A[j] = cA if A[j] is None else A[j] + cA
            if cache is not None:
                cache.add(full)
            advance(len(xb))
    return [
        LayerFactors(blk.name, a / ctx.n, S[blk.layer] / ctx.n)
        for blk, a in zip(blocks, A, strict=True)
    ]


def corrected_eigenvalues(
    ctx: FitContext,
    adapters: list[LayerAdapter],
    bases: list[tuple[torch.Tensor, torch.Tensor]],
    cache: CaptureCache | None = None,
    blocks: list[KroneckerBlock] | None = None,
) -> list[torch.Tensor]:
    """EK-FAC ``Λ*`` (out, in') per block of ``blocks`` (default: one per layer), ``bases``
    its ``(U_S, U_A)``: mean over examples of the squared gradient in the Kronecker basis,
    ``Σ_k (U_Sᵀ (Σ_t s_nkt ã_ntᵀ) U_A)²`` with ``ã`` the block's columns: the exact
    diagonal of the block GGN in that basis. With weight sharing the gradient is the
    example's own, summed over its T positions, whichever K-FAC variant gave the basis
    (as curvlinops and kronfluence do): the variants differ in the basis only.

    ``cache``: the K-FAC pass's captures; when absent or overflowed they are
    recaptured (same samples: the generator restarts from the seed)."""

    def chunks():
        if cache is not None and cache.complete:
            yield from cache.chunks
            return
        gen = ctx.generator()
        for xb, yb in ctx.chunks():
            yield fit_captures(ctx, adapters, xb, yb, gen, verify=False)

    blocks = kronecker_blocks(adapters) if blocks is None else blocks
    out: list[torch.Tensor | None] = [None] * len(blocks)
    with progress_bar(ctx.n, "EK-FAC correction", ctx.progress) as advance:
        for caps in chunks():
            for j, ((U_S, U_A), blk) in enumerate(zip(bases, blocks, strict=True)):
                a, s = blk.columns(caps.inputs[blk.layer]), caps.grads[blk.layer]
                g = torch.einsum("nkto,nti->nkoi", s @ U_S, a @ U_A)
                c = g.pow(2).sum(dim=(0, 1))
                out[j] = c if out[j] is None else out[j] + c
            advance(len(caps.inputs[0]))
    return [c / ctx.n for c in out]


class GemmKroneckerEigenBlock(KroneckerEigenBlock):
    """:class:`KroneckerEigenBlock` whose rotations are 2-D GEMMs over all rows at once
    (``(K·out, in') @ U_in`` and ``(K·in', out) @ U_out``) instead of K small batched
    products; same numbers."""

    def scale(self, V: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        K, (out, n_in) = len(V), s.shape
        M = self.to_matrix(V).reshape(K * out, n_in) @ self.U_in  # (K·out, in')
        Mt = M.view(K, out, n_in).transpose(1, 2).reshape(K * n_in, out) @ self.U_out
        Mt = (Mt.view(K, n_in, out) * s.T).reshape(K * n_in, out) @ self.U_out.T
        M = Mt.view(K, n_in, out).transpose(1, 2).reshape(K * out, n_in) @ self.U_in.T
        return self.from_matrix(M.view(K, out, n_in))


def kronecker_pairwise_scores(
    blocks: list[KroneckerEigenBlock], inv_evals: list[torch.Tensor], task: ScoringTask
) -> torch.Tensor | None:
    """All-pairs scores of a K-FAC / EK-FAC inverse without flat per-example gradients.

    Per block (a layer, or its weight or bias: :func:`kronecker_blocks`), with
    ``ŝ_t = U_Sᵀ s_t`` and ``â_t = U_Aᵀ ã_t`` (the rotated factors of the per-example
    gradient ``Σ_t s_t ã_tᵀ``, ``ã`` the block's columns, T positions per example: one
    without weight sharing) and inverse eigenvalues ``λ⁺`` (out, in'),

        Ĝ_n = Σ_t ŝ_n,t â_n,tᵀ,   score[q, n] = Σ_blocks Σ_{o,i} λ⁺[o,i] Ĝ_q[o,i] Ĝ_n[o,i],

    one GEMM (Q, out·in') x (out·in', n) per block: the flops of ``G_q C⁺ G_trᵀ``
    without forming, rotating back or reordering gradients. ``None`` if the model
    is not one whose layers the blocks describe (then the generic route runs).
    """
    kind, model = task.loss_kind, task.model
    (Xt, yt), (Xq, yq) = task.train, task.query
    Xq, Xt = cast_floating(Xq, torch.float64), cast_floating(Xt, torch.float64)
    yq, yt = (yq.to(torch.float64), yt.to(torch.float64)) if kind == "mse" else (yq, yt)
    adapters = factored_layers(model, "Kronecker scores")
    if adapters is None:
        return None
    cq = measure_captures(model, adapters, kind, task.measure, Xq, yq)
    if cq is None:
        return None
    layout = _match_blocks(blocks, adapters)
    if layout is None:
        return None

    def rotated(caps: Captures, kb: KroneckerBlock, b: KroneckerEigenBlock) -> torch.Tensor:
        a, s = kb.columns(caps.inputs[kb.layer]), caps.grads[kb.layer][:, 0]  # (n, T, ·)
        if a.shape[1] == 1:
            G = (s[:, 0] @ b.U_out)[:, :, None] * (a[:, 0] @ b.U_in)[:, None, :]
        else:
            G = torch.einsum("nto,nti->noi", s @ b.U_out, a @ b.U_in)
        return G.reshape(len(a), -1)

    pre = [
        rotated(cq, kb, b) * lam.reshape(1, -1)
        for b, kb, lam in zip(blocks, layout, inv_evals, strict=True)
    ]
    scores = torch.zeros(len(Xq), len(Xt), dtype=torch.float64, device=Xt.device)
    step = task.chunk_size
    for a in range(0, len(Xt), step):
        xb, yb = Xt[a : a + step], yt[a : a + step]
        ct = measure_captures(model, adapters, kind, "loss", xb, yb, verify=a == 0)
        if ct is None:
            return None
        out = scores[:, a : a + step]
        for b, kb, P in zip(blocks, layout, pre, strict=True):
            out.addmm_(P, rotated(ct, kb, b).T)
        task.advance(len(xb))
    return scores


def _match_blocks(
    blocks: list[KroneckerEigenBlock], adapters: list[LayerAdapter]
) -> list[KroneckerBlock] | None:
    """The :class:`KroneckerBlock` (joint or separate layout) of each eigen block, or
    ``None`` unless the blocks are Kronecker blocks of ``adapters`` covering them once."""
    known = {
        (int(kb.index[0]), kb.index.numel(), kb.has_bias): kb
        for layout in BIAS_LAYOUTS
        for kb in kronecker_blocks(adapters, layout)
    }
    out = []
    for b in blocks:
        if not isinstance(b, KroneckerEigenBlock) or not b.index.numel():
            return None
        kb = known.get((int(b.index[0]), b.index.numel(), b.has_bias))
        if kb is None or not torch.equal(b.index, kb.index) or len(b.U_in) != kb.stop - kb.start:
            return None
        out.append(kb)
    covered = torch.cat([b.index for b in blocks]).sort().values
    if not torch.equal(covered, torch.cat([ad.index for ad in adapters]).sort().values):
        return None
    return out


class KroneckerInverse(InverseCurvature):
    """The inverse of a K-FAC / EK-FAC curvature: every block a :class:`KroneckerEigenBlock`,
    scored per layer in the Kronecker eigenbasis (:func:`kronecker_pairwise_scores`)."""

    def pairwise_scores(self, task: ScoringTask) -> torch.Tensor | None:
        return kronecker_pairwise_scores(self.blocks, self.inv_evals, task)  # type: ignore[arg-type]


class KroneckerCurvature(Curvature):
    """K-FAC (``corrected=False``) or EK-FAC (``corrected=True``) over a model's layers.

    ``kblocks``: the Kronecker blocks (default one per layer, :func:`kronecker_blocks`);
    ``factors``, ``bases`` and ``corrected_evals`` hold one entry per block.
    ``extra``: eigen blocks of the parameters no adapter covers (``FitSettings.uncovered``),
    recorded in ``uncovered`` (block name -> ``"exact GGN block"`` / ``"GGN diagonal"``);
    ``variant``: the K-FAC variant the factors were fitted with.
    """

    def __init__(
        self,
        method: str,
        num_params: int,
        adapters: list[LayerAdapter],
        factors: list[LayerFactors],
        max_dense_bytes: float,
        corrected_evals: list[torch.Tensor] | None = None,
        bases: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
        kblocks: list[KroneckerBlock] | None = None,
        *,
        variant: str = "expand",
        extra: list[EigenBlock] | None = None,
        uncovered: dict[str, str] | None = None,
    ) -> None:
        super().__init__(method, num_params, max_dense_bytes)
        self.adapters = adapters
        self.kblocks = kblocks if kblocks is not None else kronecker_blocks(adapters)
        self.factors = factors
        self.bases = bases if bases is not None else factor_eigendecompositions(factors)
        self.corrected_evals = corrected_evals
        self.variant = variant
        self.extra = extra or []
        self.uncovered = uncovered or {}

    def eigen_inverse(
        self, blocks: list[EigenBlock], inv_evals: list[torch.Tensor], reg: Regularization
    ) -> KroneckerInverse:
        return KroneckerInverse(self, blocks, inv_evals, reg)

    def _eigen(self) -> list[EigenBlock]:
        blocks: list[EigenBlock] = []
        for i, (kb, (lS, U_S, lA, U_A)) in enumerate(zip(self.kblocks, self.bases, strict=True)):
            evals = (
                self.corrected_evals[i]
                if self.corrected_evals is not None
                else lS[:, None] * lA[None, :]
            )
            blocks.append(GemmKroneckerEigenBlock(kb.index, U_S, U_A, evals, kb.has_bias))
        return blocks + self.extra


def factor_eigendecompositions(
    factors: list[LayerFactors],
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(λ_S, U_S, λ_A, U_A)`` per block; eigenvalues clamped at 0 (the factors are PSD)."""
    out = []
    for fac in factors:
        lS, U_S = torch.linalg.eigh(fac.S)
        lA, U_A = torch.linalg.eigh(fac.A)
        out.append((lS.clamp_min(0.0), U_S, lA.clamp_min(0.0), U_A))
    return out


def uncovered_blocks(
    ctx: FitContext, rest: list[ParamBlock], policy: str, max_dense_bytes: float
) -> list[EigenBlock]:
    """Eigen blocks of the parameters no adapter covers: per block of ``rest`` the exact GGN
    block ``1/N M[:, b]ᵀ M[:, b]`` (``policy="exact"``, each within ``max_dense_bytes``) or
    the GGN diagonal ``1/N Σ M[:, b]²`` (``"diagonal"``), ``M`` the pseudo-gradients of the
    fit's ``fisher``."""
    if not rest:
        return []
    largest = max(rest, key=lambda b: b.size)
    if policy == "exact" and 8.0 * largest.size**2 > max_dense_bytes:
        raise ValueError(
            f"uncovered='exact' gives '{largest.name}' a dense {largest.size} x {largest.size} "
            f"float64 GGN block, over max_dense_bytes={max_dense_bytes:.3g}; use "
            "uncovered='diagonal' or raise max_dense_bytes."
        )
    if policy == "diagonal":
        diag = ggn_diagonal(ctx)
        return [DiagonalEigenBlock(b.index, diag[b.index]) for b in rest]
    out: list[EigenBlock] = []
    for block, C in ggn_blocks(ctx, rest):
        evals, U = torch.linalg.eigh(C)
        out.append(DenseEigenBlock(block.index, U, evals))
    return out


def fit_kronecker(
    ctx: FitContext, method: str, max_dense_bytes: float, variant: str = "expand"
) -> KroneckerCurvature:
    """Fit K-FAC (``method="kfac"``) or EK-FAC (``"ekfac"``): factors, bases, corrections,
    with the bias layout ``ctx.settings.bias``; the parameters no adapter covers as
    ``ctx.settings.uncovered`` says (:func:`uncovered_blocks`)."""
    policy = ctx.settings.uncovered
    adapters, rest = layer_coverage(ctx.model, method, policy)
    kblocks = kronecker_blocks(adapters, ctx.settings.bias)
    factors: list[LayerFactors] = []
    bases: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    corrected = None
    if adapters:
        cache = CaptureCache() if method == "ekfac" else None
        factors = kronecker_factors(ctx, adapters, variant, cache, kblocks)
        bases = factor_eigendecompositions(factors)
        if method == "ekfac":
            UU = [(U_S, U_A) for _, U_S, _, U_A in bases]
            corrected = corrected_eigenvalues(ctx, adapters, UU, cache, kblocks)
    return KroneckerCurvature(
        method,
        ctx.num_params,
        adapters,
        factors,
        max_dense_bytes,
        corrected,
        bases,
        kblocks,
        variant=variant,
        extra=uncovered_blocks(ctx, rest, policy, max_dense_bytes),
        uncovered={b.name: UNCOVERED_TREATMENT[policy] for b in rest},
    )

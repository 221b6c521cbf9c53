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

Fitting runs in stages: :func:`kronecker_factors` (A, S per layer, filling a
:class:`CaptureCache`), :func:`factor_eigendecompositions`, and for EK-FAC
:func:`corrected_eigenvalues` (reading the cache, or recapturing if it overflowed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from curvinf.curvature.context import KFAC_VARIANTS, FitContext
from curvinf.curvature.layers import (
    Captures,
    LayerAdapter,
    fit_captures,
    layer_adapters,
    measure_factors,
)
from curvinf.curvature.operators import (
    Curvature,
    EigenBlock,
    InverseCurvature,
    KroneckerEigenBlock,
    ScoringTask,
)
from curvinf.curvature.regularization import Regularization
from curvinf.progress import progress_bar
from curvinf.validation import check_choice


@dataclass
class LayerFactors:
    """K-FAC factors of one layer: ``A`` (in+1, in+1), ``S`` (out, out), both float64."""

    name: str
    A: torch.Tensor
    S: torch.Tensor


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
    """The (reduced) captures of every chunk of a K-FAC pass, kept for the EK-FAC pass
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
) -> list[LayerFactors]:
    """``A = 1/(N T) Σ ã ãᵀ`` and ``S = 1/N Σ_n Σ_k Σ_t s sᵀ`` per layer; each chunk's
    (reduced) captures go to ``cache`` if one is given."""
    check_choice("kfac variant", variant, KFAC_VARIANTS)
    A = [None] * len(adapters)
    S = [None] * len(adapters)
    gen = ctx.generator()
    with progress_bar(ctx.n, "K-FAC factors", ctx.progress) as advance:
        for c, (xb, yb) in enumerate(ctx.chunks()):
            caps = reduced(fit_captures(ctx, adapters, xb, yb, gen, verify=c == 0), variant)
            for i, (a, s) in enumerate(zip(caps.inputs, caps.grads, strict=True)):
                a2 = a.reshape(-1, a.shape[-1])
                s2 = s.reshape(-1, s.shape[-1])
                cA = a2.T @ a2 / a.shape[1]
                cS = s2.T @ s2
                A[i] = cA if A[i] is None else A[i] + cA
                S[i] = cS if S[i] is None else S[i] + cS
            if cache is not None:
                cache.add(caps)
            advance(len(xb))
    return [
        LayerFactors(ad.name, a / ctx.n, s / ctx.n) for ad, a, s in zip(adapters, A, S, strict=True)
    ]


def corrected_eigenvalues(
    ctx: FitContext,
    adapters: list[LayerAdapter],
    bases: list[tuple[torch.Tensor, torch.Tensor]],
    variant: str = "expand",
    cache: CaptureCache | None = None,
) -> list[torch.Tensor]:
    """EK-FAC ``Λ*`` (out, in+1) per layer: mean over examples of the squared gradient
    in the Kronecker basis, ``Σ_k (U_Sᵀ (Σ_t s_nkt ã_ntᵀ) U_A)²``.

    ``cache``: the K-FAC pass's captures; when absent or overflowed they are
    recaptured (same samples: the generator restarts from the seed)."""

    def chunks():
        if cache is not None and cache.complete:
            yield from cache.chunks
            return
        gen = ctx.generator()
        for xb, yb in ctx.chunks():
            yield reduced(fit_captures(ctx, adapters, xb, yb, gen, verify=False), variant)

    out = [None] * len(adapters)
    with progress_bar(ctx.n, "EK-FAC correction", ctx.progress) as advance:
        for caps in chunks():
            for i, (a, s) in enumerate(zip(caps.inputs, caps.grads, strict=True)):
                U_S, U_A = bases[i]
                g = torch.einsum("nkto,nti->nkoi", s @ U_S, a @ U_A)
                c = g.pow(2).sum(dim=(0, 1))
                out[i] = c if out[i] is None else out[i] + c
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

    Per layer, with ``ŝ = U_Sᵀ s`` and ``â = U_Aᵀ ã`` (the rotated factors of the
    per-example gradient ``s ãᵀ``) and inverse eigenvalues ``λ⁺`` (out, in'),

        score[q, n] = Σ_layers Σ_{o,i} λ⁺[o,i] ŝ_q[o] â_q[i] ŝ_n[o] â_n[i],

    one GEMM (Q, out·in') x (out·in', n) per layer: the flops of ``G_q C⁺ G_trᵀ``
    without forming, rotating back or reordering gradients. ``None`` if the model
    is not one whose layers the blocks describe (then the generic route runs).
    """
    kind, model = task.loss_kind, task.model
    (Xt, yt), (Xq, yq) = task.train, task.query
    Xq, Xt = Xq.to(torch.float64), Xt.to(torch.float64)
    yq, yt = (yq.to(torch.float64), yt.to(torch.float64)) if kind == "mse" else (yq, yt)
    fq = measure_factors(model, kind, task.measure, Xq, yq)
    if fq is None:
        return None
    adapters = fq[0]
    order = {int(ad.index[0]): i for i, ad in enumerate(adapters)}
    layer_of = [order.get(int(b.index[0])) for b in blocks]
    if sorted(i for i in layer_of if i is not None) != list(range(len(adapters))):
        return None
    for b, i in zip(blocks, layer_of, strict=True):
        if not torch.equal(b.index, adapters[i].index) or b.has_bias != adapters[i].has_bias:
            return None

    def rotated(a: torch.Tensor, s: torch.Tensor, b: KroneckerEigenBlock) -> torch.Tensor:
        return ((s @ b.U_out)[:, :, None] * (a @ b.U_in)[:, None, :]).reshape(len(a), -1)

    pre = [
        rotated(fq[1][i], fq[2][i], b) * lam.reshape(1, -1)
        for b, i, lam in zip(blocks, layer_of, inv_evals, strict=True)
    ]
    scores = torch.zeros(len(Xq), len(Xt), dtype=torch.float64)
    step = task.chunk_size
    for a in range(0, len(Xt), step):
        ft = measure_factors(model, kind, "loss", Xt[a : a + step], yt[a : a + step], verify=a == 0)
        if ft is None:
            return None
        out = scores[:, a : a + step]
        for b, i, P in zip(blocks, layer_of, pre, strict=True):
            out.addmm_(P, rotated(ft[1][i], ft[2][i], b).T)
        task.advance(len(ft[1][0]))
    return scores


class KroneckerInverse(InverseCurvature):
    """The inverse of a K-FAC / EK-FAC curvature: every block a :class:`KroneckerEigenBlock`,
    scored per layer in the Kronecker eigenbasis (:func:`kronecker_pairwise_scores`)."""

    def pairwise_scores(self, task: ScoringTask) -> torch.Tensor | None:
        return kronecker_pairwise_scores(self.blocks, self.inv_evals, task)  # type: ignore[arg-type]


class KroneckerCurvature(Curvature):
    """K-FAC (``corrected=False``) or EK-FAC (``corrected=True``) over a model's layers."""

    def __init__(
        self,
        method: str,
        num_params: int,
        adapters: list[LayerAdapter],
        factors: list[LayerFactors],
        max_dense_bytes: float,
        corrected_evals: list[torch.Tensor] | None = None,
        bases: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        super().__init__(method, num_params, max_dense_bytes)
        self.adapters = adapters
        self.factors = factors
        self.bases = bases if bases is not None else factor_eigendecompositions(factors)
        self.corrected_evals = corrected_evals

    def eigen_inverse(
        self, blocks: list[EigenBlock], inv_evals: list[torch.Tensor], reg: Regularization
    ) -> KroneckerInverse:
        return KroneckerInverse(self, blocks, inv_evals, reg)

    def _eigen(self) -> list[EigenBlock]:
        blocks: list[EigenBlock] = []
        for i, (ad, (lS, U_S, lA, U_A)) in enumerate(zip(self.adapters, self.bases, strict=True)):
            evals = (
                self.corrected_evals[i]
                if self.corrected_evals is not None
                else lS[:, None] * lA[None, :]
            )
            blocks.append(GemmKroneckerEigenBlock(ad.index, U_S, U_A, evals, ad.has_bias))
        return blocks


def factor_eigendecompositions(
    factors: list[LayerFactors],
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(λ_S, U_S, λ_A, U_A)`` per layer; eigenvalues clamped at 0 (the factors are PSD)."""
    out = []
    for fac in factors:
        lS, U_S = torch.linalg.eigh(fac.S)
        lA, U_A = torch.linalg.eigh(fac.A)
        out.append((lS.clamp_min(0.0), U_S, lA.clamp_min(0.0), U_A))
    return out


def fit_kronecker(
    ctx: FitContext, method: str, max_dense_bytes: float, variant: str = "expand"
) -> KroneckerCurvature:
    """Fit K-FAC (``method="kfac"``) or EK-FAC (``"ekfac"``): factors, bases, corrections."""
    adapters = layer_adapters(ctx.model, method)
    cache = CaptureCache() if method == "ekfac" else None
    factors = kronecker_factors(ctx, adapters, variant, cache)
    bases = factor_eigendecompositions(factors)
    corrected = None
    if method == "ekfac":
        corrected = corrected_eigenvalues(
            ctx, adapters, [(U_S, U_A) for _, U_S, _, U_A in bases], variant, cache
        )
    return KroneckerCurvature(
        method, ctx.num_params, adapters, factors, max_dense_bytes, corrected, bases
    )

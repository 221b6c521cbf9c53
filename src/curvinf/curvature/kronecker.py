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
length T per example) go through :class:`LayerAdapter`: it returns
``ã`` (N, T, in+1) and ``s`` (N, K, T, out); the ``expand`` variant treats
the T positions as extra examples in ``A`` (scaled ``1/(N T)``), ``reduce``
averages the inputs and sums the gradients over T first (Eschenhagen et al.,
2023). Only ``nn.Linear`` has an adapter now; a new layer type needs only
its adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from curvinf.curvature.context import FitContext
from curvinf.curvature.operators import Curvature, EigenBlock, KroneckerEigenBlock
from curvinf.losses import output_sqrt
from curvinf.params import param_offsets
from curvinf.progress import progress_bar
from curvinf.validation import check_choice

KFAC_VARIANTS = ("expand", "reduce")


class UnfactorableModelError(TypeError):
    """The model's per-layer gradients are not the outer products ``s ãᵀ`` a route assumes."""


class SharedLayerError(UnfactorableModelError):
    """A parameterised layer ran more than once in one forward pass (weight sharing)."""


def layer_label(name: str, module: nn.Module) -> str:
    """``"layer 'fc1' (Linear)"``; the root module is named as such, not ``''``."""
    where = f"layer '{name}'" if name else "the root module"
    return f"{where} ({type(module).__name__})"


class LayerAdapter:
    """How a parameterised layer's gradient factorises as ``s ãᵀ``.

    Covers the layer's trainable weight and, if trainable, its bias (a frozen bias
    is a constant of the layer: ``ã`` then has no column of ones).
    """

    def __init__(self, name: str, module: nn.Module, offsets: dict[str, tuple[int, int]]) -> None:
        self.name = name
        self.module = module
        prefix = f"{name}." if name else ""
        label = layer_label(name, module)
        if prefix + "weight" not in offsets:
            raise UnfactorableModelError(
                f"{label} has a frozen weight but a trainable bias; per-layer factors need the "
                "weight trainable. Freeze the bias too, or use method='block_ggn' or 'ggn'."
            )
        a, b = offsets[prefix + "weight"]
        self.has_bias = prefix + "bias" in offsets
        if self.has_bias and offsets[prefix + "bias"][0] != b:
            raise UnfactorableModelError(
                f"{label} registers parameters between its weight and bias; per-layer factors "
                "need them adjacent. Use method='block_ggn' or 'ggn'."
            )
        stop = offsets[prefix + "bias"][1] if self.has_bias else b
        self.index = torch.arange(a, stop)
        if sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad) != len(
            self.index
        ):
            raise UnfactorableModelError(
                f"{label} holds trainable parameters besides its weight and bias; "
                "use method='block_ggn' or 'ggn'."
            )

    @property
    def label(self) -> str:
        return layer_label(self.name, self.module)

    def inputs(self, a: torch.Tensor) -> torch.Tensor:
        """Layer input -> ``ã`` (N, T, in + has_bias)."""
        raise NotImplementedError

    def output_grads(self, g: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the layer output -> (N, T, out)."""
        raise NotImplementedError


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` on (N, in) or (N, ..., in) inputs (leading dims after N shared: T)."""

    def inputs(self, a: torch.Tensor) -> torch.Tensor:
        a = a.reshape(a.shape[0], -1, a.shape[-1])
        if self.has_bias:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
        return a

    def output_grads(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(g.shape[0], -1, g.shape[-1])


ADAPTERS: dict[type[nn.Module], type[LayerAdapter]] = {nn.Linear: LinearAdapter}


def layer_adapters(model: nn.Module, method: str) -> list[LayerAdapter]:
    """One adapter per module owning trainable parameters, in parameter order.

    Raises :class:`UnfactorableModelError` (a ``TypeError``) naming any layer the
    per-layer factors cannot describe (unsupported type, custom ``forward`` via a
    subclass, partly frozen).
    """
    offsets = param_offsets(model)
    adapters = []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        cls = ADAPTERS.get(type(module))
        if cls is None:
            supported = ", ".join(t.__name__ for t in ADAPTERS)
            raise UnfactorableModelError(
                f"{layer_label(name, module)} is not supported by {method}; supported layers: "
                f"{supported} (exact types, not subclasses). Use method='block_ggn' or 'ggn', "
                "which work for any differentiable layer."
            )
        adapters.append(cls(name, module, offsets))
    return adapters


@dataclass
class LayerFactors:
    """K-FAC factors of one layer: ``A`` (in+1, in+1), ``S`` (out, out), both float64."""

    name: str
    A: torch.Tensor
    S: torch.Tensor


def capture_layer_factors(
    model: nn.Module,
    adapters: list[LayerAdapter],
    X: torch.Tensor,
    cotangents: Callable[[torch.Tensor], torch.Tensor],
    *,
    verify: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer factors of per-example gradients for one forward pass over ``X``.

    ``cotangents(f)`` maps the outputs ``f`` (n, C) to output-space vectors
    ``R`` (n, C, K). Returns per layer ``ã`` (n, T, in+1) and
    ``s`` (n, K, T, out), the backpropagation of each column ``R[:, :, k]`` to the
    layer's output, so that ``Σ_t s_nkt ã_ntᵀ = ∂(f_n · R_nk)/∂[W | b]``.

    ``verify``: prove that identity for this model before trusting it
    (:func:`_check_factorisation`: every layer ran once, the gradient of a random
    output direction equals ``Σ s ãᵀ`` layer by layer, and an example's output
    does not depend on the rest of the batch); routes verify their first chunk.
    Raises :class:`UnfactorableModelError` (:class:`SharedLayerError` if a layer
    runs twice) when the model is not what the factors assume.
    """
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def hook(i: int):
        def fn(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if i in inputs:
                raise SharedLayerError(
                    f"{adapters[i].label} is called more than once per forward pass; "
                    "shared layers are not supported by K-FAC yet."
                )
            inputs[i], outputs[i] = args[0].detach(), out

        return fn

    flags = [p.requires_grad for p in model.parameters()]
    handles = [ad.module.register_forward_hook(hook(i)) for i, ad in enumerate(adapters)]
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            f = model(X)
            missing = [ad.label for i, ad in enumerate(adapters) if i not in inputs]
            if missing:
                raise UnfactorableModelError(
                    f"{', '.join(missing)} holds trainable parameters but was not called in the "
                    "forward pass (its parameters are used another way, e.g. "
                    "F.linear(x, layer.weight)), so per-layer factors cannot describe its "
                    "gradient. Call the layer as a module, or use method='block_ggn' or 'ggn'."
                )
            R = cotangents(f.detach())
            zs = [outputs[i] for i in range(len(adapters))]
            per_k = [
                torch.autograd.grad(f, zs, grad_outputs=R[:, :, k], retain_graph=True)
                for k in range(R.shape[2])
            ]
            a_tilde = [ad.inputs(inputs[i]) for i, ad in enumerate(adapters)]
            if verify:
                _check_factorisation(f, zs, adapters, a_tilde)
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    if verify and len(X) > 1:
        with torch.no_grad():
            alone = model(X[:1])
        if not _close(alone, f[:1].detach()):
            raise UnfactorableModelError(
                "an example's output changes with the rest of the batch (batch statistics or "
                "cross-example layers), so per-example gradients are not defined the way "
                "per-layer factors assume; use method='block_ggn' or 'ggn'."
            )
    s = [
        torch.stack([ad.output_grads(g[i]) for g in per_k], dim=1) for i, ad in enumerate(adapters)
    ]
    return a_tilde, s


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to a few hundred ulps of the dtype, relative to the larger norm."""
    tol = 1e3 * torch.finfo(a.dtype).eps * max(float(a.norm()), float(b.norm()), 1e-30)
    return float((a - b).norm()) <= tol


def _check_factorisation(
    f: torch.Tensor,
    zs: list[torch.Tensor],
    adapters: list[LayerAdapter],
    a_tilde: list[torch.Tensor],
) -> None:
    """Raise unless ``∂(f · r)/∂[W | b] = Σ_{n,t} s_nt ã_ntᵀ`` per layer for a random ``r``.

    ``s = ∂(f · r)/∂z`` at the layer's captured output. The identity fails when a
    layer's parameters are also used outside its own call (weight tying with a
    functional op, a custom ``forward``), which the hooks cannot see.
    """
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(f.shape, generator=gen, dtype=f.dtype)
    params = []
    for ad in adapters:
        params += [ad.module.weight] + ([ad.module.bias] if ad.has_bias else [])
    grads = torch.autograd.grad(
        f, zs + params, grad_outputs=r, retain_graph=True, allow_unused=True
    )
    s_r, p_r = grads[: len(zs)], grads[len(zs) :]
    k = 0
    for ad, z_grad, a in zip(adapters, s_r, a_tilde, strict=True):
        g = ad.output_grads(z_grad)  # (n, T, out)
        factored = torch.einsum("nto,nti->oi", g, a)  # (out, in')
        true = [
            t if t is not None else torch.zeros_like(p)
            for t, p in zip(
                p_r[k : k + 1 + ad.has_bias], params[k : k + 1 + ad.has_bias], strict=True
            )
        ]
        k += 1 + ad.has_bias
        direct = true[0].reshape(factored.shape[0], -1)
        if ad.has_bias:
            direct = torch.cat([direct, true[1].reshape(-1, 1)], dim=1)
        if direct.shape != factored.shape or not _close(direct, factored):
            raise UnfactorableModelError(
                f"the gradient of {ad.label} is not the outer product of its output gradients "
                "and inputs: its parameters are also used outside its own call (e.g. weight "
                "tying through F.linear, or a custom forward), which per-layer factors cannot "
                "see. Use method='block_ggn' or 'ggn'."
            )


def fit_layer_factors(
    ctx: FitContext,
    adapters: list[LayerAdapter],
    xb: torch.Tensor,
    yb: torch.Tensor,
    gen,
    *,
    verify: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``ã`` (n, T, in+1) and ``s`` (n, K, T, out) with the fit's output square roots ``Q``."""

    def sqrt_columns(f: torch.Tensor) -> torch.Tensor:
        return output_sqrt(ctx.kind, ctx.fisher, f, yb, mc_samples=ctx.mc_samples, generator=gen)

    return capture_layer_factors(ctx.model, adapters, xb, sqrt_columns, verify=verify)


def _reduce(a: torch.Tensor, s: torch.Tensor, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    if variant == "reduce":
        return a.mean(dim=1, keepdim=True), s.sum(dim=2, keepdim=True)
    return a, s


CAPTURE_CACHE_BYTES = 256 * 2**20


def kronecker_factors(
    ctx: FitContext,
    adapters: list[LayerAdapter],
    variant: str = "expand",
    cache: list | None = None,
) -> list[LayerFactors]:
    """``A = 1/(N T) Σ ã ãᵀ`` and ``S = 1/N Σ_n Σ_k Σ_t s sᵀ`` per layer.

    If ``cache`` is a list, the (reduced) ``ã`` and ``s`` of every chunk are
    appended to it for the EK-FAC pass, as long as they take at most
    ``CAPTURE_CACHE_BYTES``; past that it is emptied and the pass recomputes them.
    """
    check_choice("kfac variant", variant, KFAC_VARIANTS)
    A = [None] * len(adapters)
    S = [None] * len(adapters)
    gen = ctx.generator()
    kept = 0
    with progress_bar(ctx.n, "K-FAC factors", ctx.progress) as advance:
        for c, (xb, yb) in enumerate(ctx.chunks()):
            a_all, s_all = fit_layer_factors(ctx, adapters, xb, yb, gen, verify=c == 0)
            reduced = [_reduce(a, s, variant) for a, s in zip(a_all, s_all, strict=True)]
            for i, (a, s) in enumerate(reduced):
                a2 = a.reshape(-1, a.shape[-1])
                s2 = s.reshape(-1, s.shape[-1])
                cA = a2.T @ a2 / a.shape[1]
                cS = s2.T @ s2
                A[i] = cA if A[i] is None else A[i] + cA
                S[i] = cS if S[i] is None else S[i] + cS
            if cache is not None and kept >= 0:
                kept += sum(8 * (a.numel() + s.numel()) for a, s in reduced)
                if kept <= CAPTURE_CACHE_BYTES:
                    cache.append(reduced)
                else:
                    cache.clear()
                    kept = -1
            advance(len(xb))
    return [
        LayerFactors(ad.name, a / ctx.n, s / ctx.n) for ad, a, s in zip(adapters, A, S, strict=True)
    ]


def corrected_eigenvalues(
    ctx: FitContext,
    adapters: list[LayerAdapter],
    bases: list[tuple[torch.Tensor, torch.Tensor]],
    variant: str = "expand",
    cache: list | None = None,
) -> list[torch.Tensor]:
    """EK-FAC ``Λ*`` (out, in+1) per layer: mean over examples of the squared gradient
    in the Kronecker basis, ``Σ_k (U_Sᵀ (Σ_t s_nkt ã_ntᵀ) U_A)²``.

    ``cache``: the chunks' reduced ``(ã, s)`` from :func:`kronecker_factors`; empty or
    ``None`` recomputes them (same samples: the generator restarts from the seed)."""

    def chunks():
        if cache:
            yield from cache
            return
        gen = ctx.generator()
        for xb, yb in ctx.chunks():
            a_all, s_all = fit_layer_factors(ctx, adapters, xb, yb, gen, verify=False)
            yield [_reduce(a, s, variant) for a, s in zip(a_all, s_all, strict=True)]

    out = [None] * len(adapters)
    with progress_bar(ctx.n, "EK-FAC correction", ctx.progress) as advance:
        for reduced in chunks():
            for i, (a, s) in enumerate(reduced):
                U_S, U_A = bases[i]
                g = torch.einsum("nkto,nti->nkoi", s @ U_S, a @ U_A)
                c = g.pow(2).sum(dim=(0, 1))
                out[i] = c if out[i] is None else out[i] + c
            advance(len(reduced[0][0]))
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
    cache: list | None = [] if method == "ekfac" else None
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

"""One module for the layers that per-layer factors describe: adapters, capture, coverage.

A parameterised layer whose per-example gradient factorises as ``Σ_t s_t ã_tᵀ``
(``ã`` the layer input with a trailing 1 for the bias, ``s`` the gradient with
respect to the layer output) has a :class:`LayerAdapter`. The adapters, the one
capture of inputs and output gradients (:func:`capture_layer_factors`, returning
:class:`Captures`) and the tests of which parameters they cover
(:func:`layer_coverage`, :func:`factored_layers`, :func:`linear_layers`) are used by
the structured dense routes, the Gram route, the Kronecker rungs and the scoring fast
paths. A new layer type is one adapter class here, registered in :data:`ADAPTERS`.

Registered: ``nn.Linear`` (inputs (N, ..., in): every leading position after N is one
of the T positions) and ``nn.Conv2d`` with ``groups=1`` (T = output pixels, ``ã`` the
unfolded input patches). Weight sharing: a layer called several times in one forward
pass has the positions of all its calls (:func:`capture_layer_factors`). A module with
trainable parameters and no adapter (``nn.Embedding``, ``nn.LayerNorm``,
``nn.MultiheadAttention``, a subclass of a registered type, ``Conv2d`` with groups) is
refused, or handed back as a :class:`~curvinf.params.ParamBlock` for an exact or a
diagonal treatment (:func:`layer_coverage`, ``FitSettings.uncovered``).

Every capture can prove the factorisation for the model at hand
(``verify=True``, :func:`_check_factorisation`), so a route built on it is never
taken for a model it does not describe (docs/conventions.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from curvinf.curvature.context import FitContext
from curvinf.devices import cpu_generator
from curvinf.losses import example_measure, output_sqrt
from curvinf.params import ParamBlock, count_trainable, param_offsets
from curvinf.validation import check_choice


class UnfactorableModelError(TypeError):
    """The model's per-layer gradients are not the outer products ``s ãᵀ`` a route assumes."""


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
        self.index = torch.arange(a, stop, device=module.weight.device)
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

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(out, in)``: the weight as the matrix ``W`` of ``z_t = W a_t (+ b)``, its rows
        the weight's first dimension, each row flattened row-major."""
        weight = self.module.weight
        return weight.shape[0], weight[0].numel()

    def inputs(self, a: torch.Tensor, *, bias: bool = True) -> torch.Tensor:
        """Layer input -> ``ã`` (N, T, in + has_bias); ``bias=False``: without the column of
        ones (the patches alone, e.g. of a tangent of the input)."""
        raise NotImplementedError

    def output_grads(self, g: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the layer output -> (N, T, out)."""
        raise NotImplementedError


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` on (N, in) or (N, ..., in) inputs (leading dims after N shared: T)."""

    def inputs(self, a: torch.Tensor, *, bias: bool = True) -> torch.Tensor:
        a = a.reshape(a.shape[0], -1, a.shape[-1])
        if self.has_bias and bias:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
        return a

    def output_grads(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(g.shape[0], -1, g.shape[-1])


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` with ``groups=1`` on batched (N, C_in, H, W) inputs: any stride,
    dilation, padding (numbers, ``"valid"``, ``"same"``) and ``padding_mode``.

    The convolution is ``z_t = W ã_t`` over the T = H_out·W_out output positions, with
    ``ã_t`` the zero- (or mode-) padded input patch under position ``t``, flattened
    (C_in, kh, kw) row-major like a row of the weight (``F.unfold``'s order), and ``W``
    the weight (C_out, C_in·kh·kw). ``groups > 1`` (a block-diagonal ``W``) is refused.
    """

    def __init__(self, name: str, module: nn.Module, offsets: dict[str, tuple[int, int]]) -> None:
        super().__init__(name, module, offsets)
        if module.groups != 1:
            raise UnfactorableModelError(
                f"{self.label} has groups={module.groups}; per-layer factors support "
                "Conv2d with groups=1 only. Use method='block_ggn' or 'ggn'."
            )

    def _pads(self) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` padding of the input, as ``F.pad`` takes it."""
        m = self.module
        if m.padding == "valid":
            return (0, 0, 0, 0)
        if m.padding == "same":  # PyTorch's split: the extra pixel goes right / bottom
            total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
            (th, tw) = total
            return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        ph, pw = m.padding
        return (pw, pw, ph, ph)

    def inputs(self, a: torch.Tensor, *, bias: bool = True) -> torch.Tensor:
        if a.ndim != 4:
            raise UnfactorableModelError(
                f"{self.label} is called on a {a.ndim}-D input; per-layer factors need "
                "batched (N, C, H, W) inputs. Use method='block_ggn' or 'ggn'."
            )
        m, pads = self.module, self._pads()
        if any(pads):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            a = F.pad(a, pads, mode=mode)
        patches = F.unfold(a, m.kernel_size, dilation=m.dilation, stride=m.stride)
        patches = patches.transpose(1, 2)  # (N, T, C_in·kh·kw)
        if self.has_bias and bias:
            patches = torch.cat([patches, patches.new_ones(*patches.shape[:2], 1)], dim=2)
        return patches

    def output_grads(self, g: torch.Tensor) -> torch.Tensor:
        return g.flatten(2).transpose(1, 2)


ADAPTERS: dict[type[nn.Module], type[LayerAdapter]] = {
    nn.Linear: LinearAdapter,
    nn.Conv2d: Conv2dAdapter,
}
UNCOVERED_TREATMENT = {"exact": "exact GGN block", "diagonal": "GGN diagonal"}


def layer_adapters(model: nn.Module, method: str) -> list[LayerAdapter]:
    """One adapter per module owning trainable parameters, in parameter order.

    Raises :class:`UnfactorableModelError` (a ``TypeError``) naming any layer the
    per-layer factors cannot describe (unsupported type, custom ``forward`` via a
    subclass, partly frozen, a configuration the adapter refuses).
    """
    return layer_coverage(model, method)[0]


def layer_coverage(
    model: nn.Module, method: str, uncovered: str = "error"
) -> tuple[list[LayerAdapter], list[ParamBlock]]:
    """``(adapters, rest)``: an adapter per module owning trainable parameters that an
    adapter of :data:`ADAPTERS` describes, and one :class:`ParamBlock` per other such
    module (its own trainable parameters), both in parameter order.

    ``uncovered="error"``: a module no adapter describes raises
    :class:`UnfactorableModelError` naming it and the alternatives; ``"exact"`` /
    ``"diagonal"``: it goes to ``rest``, for the caller to treat as the policy says.
    """
    check_choice("uncovered", uncovered, ("error", *UNCOVERED_TREATMENT))
    offsets = param_offsets(model)
    adapters: list[LayerAdapter] = []
    rest: list[ParamBlock] = []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        cls = ADAPTERS.get(type(module))
        try:
            if cls is None:
                supported = ", ".join(t.__name__ for t in ADAPTERS)
                raise UnfactorableModelError(
                    f"{layer_label(name, module)} is not supported by {method}; supported "
                    f"layers: {supported} (exact types, not subclasses). Use method="
                    "'block_ggn' or 'ggn', which work for any differentiable layer, or "
                    "uncovered='exact' or 'diagonal' to give this layer's parameters an exact "
                    "GGN block or the GGN diagonal."
                )
            adapters.append(cls(name, module, offsets))
        except UnfactorableModelError:
            if uncovered == "error":
                raise
            prefix = f"{name}." if name else ""
            own = [prefix + n for n, _ in module.named_parameters(recurse=False)]
            own = [n for n in own if n in offsets]
            device = next(module.parameters(recurse=False)).device
            index = torch.cat([torch.arange(*offsets[n], device=device) for n in own])
            rest.append(ParamBlock(name or "<root>", index, tuple(own)))
    return adapters, rest


def capture_layer_factors(
    model: nn.Module,
    adapters: list[LayerAdapter],
    X: torch.Tensor,
    cotangents: Callable[[torch.Tensor], torch.Tensor],
    *,
    verify: bool = True,
) -> Captures:
    """Per-layer factors of per-example gradients for one forward pass over ``X``.

    ``cotangents(f)`` maps the outputs ``f`` (n, *out) to output-space vectors
    ``R`` (n, F, K) over the flattened outputs. Returns per layer ``ã`` (n, T, in+1) and
    ``s`` (n, K, T, out), the backpropagation of each column ``R[:, :, k]`` to the
    layer's output, so that ``Σ_t s_nkt ã_ntᵀ = ∂(f_n · R_nk)/∂[W | b]``.

    Weight sharing: ``T`` counts every position of every call of the layer in the forward
    pass (a layer called ``c`` times on inputs with ``T_1, ..., T_c`` positions each has
    ``T = Σ_i T_i``, calls in order), since the gradient of shared weights is the sum over
    their uses.

    ``verify``: prove that identity for this model before trusting it
    (:func:`_check_factorisation`: every layer ran, the gradient of a random output
    direction equals ``Σ s ãᵀ`` layer by layer, and an example's output does not depend
    on the rest of the batch); routes verify their first chunk. Raises
    :class:`UnfactorableModelError` when the model is not what the factors assume.
    """
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(adapters))}
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(adapters))}

    def hook(i: int):
        def fn(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            inputs[i].append(args[0].detach())
            outputs[i].append(out)
            return out.clone()  # the layer output stays as it was: an in-place ReLU after
            # the layer (nn.ReLU(inplace=True)) modifies the copy, not the captured output

        return fn

    flags = [p.requires_grad for p in model.parameters()]
    handles = [ad.module.register_forward_hook(hook(i)) for i, ad in enumerate(adapters)]
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            f = model(X)
            missing = [ad.label for i, ad in enumerate(adapters) if not inputs[i]]
            if missing:
                raise UnfactorableModelError(
                    f"{', '.join(missing)} holds trainable parameters but was not called in the "
                    "forward pass (its parameters are used another way, e.g. "
                    "F.linear(x, layer.weight)), so per-layer factors cannot describe its "
                    "gradient. Call the layer as a module, or use method='block_ggn' or 'ggn'."
                )
            R = cotangents(f.detach())
            calls = _Calls([outputs[i] for i in range(len(adapters))])
            per_k = [
                calls.split(
                    torch.autograd.grad(
                        f, calls.flat, grad_outputs=R[:, :, k].reshape(f.shape), retain_graph=True
                    )
                )
                for k in range(R.shape[2])
            ]
            a_tilde = [_joined([ad.inputs(a) for a in inputs[i]]) for i, ad in enumerate(adapters)]
            if verify:
                _check_factorisation(f, calls, adapters, a_tilde)
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
        _joined([_positions(ad, gk[i]).unsqueeze(1) for gk in per_k])
        for i, ad in enumerate(adapters)
    ]
    return Captures(a_tilde, s)


def _positions(ad: LayerAdapter, grads: list[torch.Tensor]) -> torch.Tensor:
    """A layer's output gradients of every call -> (n, T, out), calls concatenated."""
    return _joined([ad.output_grads(g) for g in grads])


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts, dim=1)``, without a copy when there is one part (one call, K = 1)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class _Calls:
    """The outputs of every call of every layer, flattened for one ``autograd.grad``."""

    def __init__(self, per_layer: list[list[torch.Tensor]]) -> None:
        self.per_layer = per_layer
        self.flat = [z for zs in per_layer for z in zs]

    def split(self, grads: tuple[torch.Tensor, ...]) -> list[list[torch.Tensor]]:
        """Gradients w.r.t. :attr:`flat` -> per layer, per call."""
        out, k = [], 0
        for zs in self.per_layer:
            out.append(list(grads[k : k + len(zs)]))
            k += len(zs)
        return out


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to a few hundred ulps of the dtype, relative to the larger norm."""
    tol = 1e3 * torch.finfo(a.dtype).eps * max(float(a.norm()), float(b.norm()), 1e-30)
    return float((a - b).norm()) <= tol


def _check_factorisation(
    f: torch.Tensor,
    calls: _Calls,
    adapters: list[LayerAdapter],
    a_tilde: list[torch.Tensor],
) -> None:
    """Raise unless ``∂(f · r)/∂[W | b] = Σ_{n,t} s_nt ã_ntᵀ`` per layer for a random ``r``.

    ``s = ∂(f · r)/∂z`` at the layer's captured outputs (every call). The identity fails
    when a layer's parameters are also used outside its own calls (weight tying with a
    functional op, a custom ``forward``), which the hooks cannot see.
    """
    gen = cpu_generator(0)
    r = torch.randn(f.shape, generator=gen, dtype=f.dtype, device="cpu").to(f.device)
    params = []
    for ad in adapters:
        params += [ad.module.weight] + ([ad.module.bias] if ad.has_bias else [])
    grads = torch.autograd.grad(
        f, calls.flat + params, grad_outputs=r, retain_graph=True, allow_unused=True
    )
    s_r, p_r = calls.split(grads[: len(calls.flat)]), grads[len(calls.flat) :]
    k = 0
    for ad, z_grads, a in zip(adapters, s_r, a_tilde, strict=True):
        g = _positions(ad, z_grads)  # (n, T, out)
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


@dataclass
class Captures:
    """Per-layer factors of one chunk's per-example gradients.

    ``inputs[i]``: ``ã`` (n, T, in + has_bias); ``grads[i]``: ``s`` (n, K, T, out), the
    backpropagation of each of ``K`` output-space vectors to the layer's output; so the
    gradient of ``f_n · R_nk`` with respect to layer ``i``'s ``[W | b]`` is
    ``Σ_t s[n, k, t] ã[n, t]ᵀ``.
    """

    inputs: list[torch.Tensor]
    grads: list[torch.Tensor]

    @property
    def one_position(self) -> bool:
        """Whether every layer sees one position per example (T = 1: no weight sharing)."""
        return all(a.shape[1] == 1 for a in self.inputs)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.inputs, *self.grads))

    def rows(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """For T = 1: per layer ``ã`` (n, in') and ``s`` (n, K, out)."""
        return [a[:, 0] for a in self.inputs], [s[:, :, 0] for s in self.grads]


def pseudo_grad_rows(
    adapters: list[LayerAdapter], grads: list[torch.Tensor], inputs: list[torch.Tensor]
) -> torch.Tensor:
    """``M`` (n·K, D): per example and root the layers' ``Σ_t s ãᵀ`` in θ's flat order.

    ``grads[l]``: ``s`` (n, K, T, out); ``inputs[l]``: ``ã`` (n, T, in'). A layer's flat order
    is its weight row-major (out, in), then its bias (out).
    """
    n, K = grads[0].shape[:2]
    D = sum(ad.index.numel() for ad in adapters)
    M = torch.empty(n * K, D, dtype=grads[0].dtype, device=grads[0].device)
    for ad, s, a in zip(adapters, grads, inputs, strict=True):
        G = torch.einsum("nkto,nti->nkoi", s, a)  # (n, K, out, in')
        out, width = G.shape[2:]
        n_in = width - int(ad.has_bias)
        start = int(ad.index[0])
        M[:, start : start + out * n_in] = G[..., :n_in].reshape(n * K, out * n_in)
        if ad.has_bias:
            M[:, start + out * n_in : start + out * width] = G[..., n_in].reshape(n * K, out)
    return M


def factored_layers(model: nn.Module, purpose: str) -> list[LayerAdapter] | None:
    """Adapters covering every trainable parameter of ``model`` (any registered layer type,
    inputs of any shape); ``None`` when some parameter has no adapter.

    The structural half of the proof a factored route needs; the capture's ``verify``
    is the numerical half (nothing else uses the layers' weights).
    """
    try:
        adapters = layer_adapters(model, purpose)
    except UnfactorableModelError:
        return None
    covered = sum(ad.index.numel() for ad in adapters)
    return adapters if covered == count_trainable(model) else None


def linear_layers(model: nn.Module, X: torch.Tensor, purpose: str) -> list[LayerAdapter] | None:
    """:func:`factored_layers` when every layer is an ``nn.Linear`` (exact type) and ``X``
    is (N, features): the networks whose routes read ``(out, in)`` off ``weight.shape``
    and need one position per example; ``None`` otherwise."""
    if X.ndim != 2:
        return None
    adapters = factored_layers(model, purpose)
    if adapters is None or not all(type(ad) is LinearAdapter for ad in adapters):
        return None
    return adapters


def fit_captures(
    ctx: FitContext,
    adapters: list[LayerAdapter],
    xb: torch.Tensor,
    yb: torch.Tensor,
    generator: torch.Generator,
    *,
    verify: bool = True,
) -> Captures:
    """A fit chunk's captures, backpropagating the fit's output square roots ``Q``
    (``K`` columns per example, drawn with ``generator`` for ``fisher="mc"``)."""

    def sqrt_columns(f: torch.Tensor) -> torch.Tensor:
        return output_sqrt(
            ctx.loss_kind, ctx.fisher, f, yb, mc_samples=ctx.mc_samples, generator=generator
        )

    return capture_layer_factors(ctx.model, adapters, xb, sqrt_columns, verify=verify)


def measure_captures(
    model: nn.Module,
    adapters: list[LayerAdapter],
    kind: str,
    measure: str,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    verify: bool = True,
) -> Captures | None:
    """Per-example gradients of the measurement ``f(z_n)`` as layer factors (``K = 1``):
    per layer ``ã`` (n, T, in') and ``s = ∂f(z_n)/∂z_l`` (n, 1, T, out), the gradient
    being ``Σ_t s_t ã_tᵀ``; ``None`` for models the factors do not describe."""

    def measure_grad(f: torch.Tensor) -> torch.Tensor:
        r = vmap(grad(lambda fn, t: example_measure(kind, measure, fn, t)))(f, y)
        return r.reshape(len(r), -1, 1)

    try:
        return capture_layer_factors(model, adapters, X, measure_grad, verify=verify)
    except UnfactorableModelError:
        return None


def measure_factors(
    model: nn.Module,
    kind: str,
    measure: str,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    verify: bool = True,
) -> tuple[list[LayerAdapter], list[torch.Tensor], list[torch.Tensor]] | None:
    """Per-example gradients of the measurement ``f(z_n)`` of an ``nn.Linear`` network on
    (N, features) inputs (:func:`linear_layers`) as layer factors: ``(adapters, ã, s)`` with
    per layer ``ã`` (n, in') and ``s = ∂f(z_n)/∂z_l`` (n, out), so the layer's gradient is
    ``s ãᵀ``; ``None`` for other models."""
    adapters = linear_layers(model, X, "per-example gradients")
    if adapters is None:
        return None
    caps = measure_captures(model, adapters, kind, measure, X, y, verify=verify)
    if caps is None or not caps.one_position:
        return None
    a, s = caps.rows()
    return adapters, a, [g[:, 0] for g in s]

"""Influence scores from per-example gradients.

    score[q, m] = ∇_θ f(z_q)ᵀ C⁺ ∇_θ ℓ(z_m)                       (Q, N)

``f`` is the query measurement, oriented so that lower is better: the query
loss (``measure="loss"``) or minus the correct-class logit margin
(``measure="margin"``). Sign convention, used everywhere in curvinf: upweighting
training example ``m`` by ``ε`` moves the parameters by ``-ε C⁻¹∇ℓ(z_m)`` and the
measurement by ``-ε score[q, m]``; so a training example that *helps* the query
(lowers its loss, raises its margin) has a *positive* score, and LDS is positive
for a good method.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from curvinf.curvature.kronecker import layer_adapters
from curvinf.curvature.operators import InverseOperator
from curvinf.losses import MEASURES, check_loss, check_targets, example_measure
from curvinf.progress import progress_bar
from curvinf.validation import check_choice, check_model_finite, check_xy


def per_example_grads(
    model: nn.Module,
    loss: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    measure: str = "loss",
    chunk_size: int = 256,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``∇_θ f(z_n)`` for every example: (N, D) in the flat parameter order.

    ``measure="loss"`` gives training-loss gradients ``∇ℓ(z_n)``.

    For models whose parameters all sit in ``nn.Linear`` layers applied once to
    (N, features) inputs, the gradient of layer ``l`` is the outer product
    ``s_n ã_nᵀ`` (``s_n = ∂f(z_n)/∂z_l`` from one backward pass of
    ``Σ_n r_nᵀ f_n`` with ``r_n = ∂f/∂output`` fixed, ``ã_n`` the input with a 1
    for the bias), written straight into the output; other models use
    ``vmap(grad(...))``. Both give the same numbers.
    """
    kind = check_loss(loss)
    check_choice("measure", measure, MEASURES)
    check_xy(X, y, name="data", model=model)
    model = copy.deepcopy(model).to(dtype)
    params = {k: v.detach() for k, v in model.named_parameters()}
    X = X.to(dtype)
    y = y.to(dtype) if kind == "mse" else y
    D = sum(p.numel() for p in params.values())
    out = torch.empty(len(X), D, dtype=dtype)
    if _outer_product_grads(model, kind, measure, X[:chunk_size], y[:chunk_size], out[:chunk_size]):
        for a in range(chunk_size, len(X), chunk_size):
            b = a + chunk_size
            _outer_product_grads(model, kind, measure, X[a:b], y[a:b], out[a:b])
        return out

    def one(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        f = functional_call(model, p, (x[None],))[0]
        return example_measure(kind, measure, f, t)

    g = vmap(grad(one), in_dims=(None, 0, 0))
    for a in range(0, len(X), chunk_size):
        gd = g(params, X[a : a + chunk_size], y[a : a + chunk_size])
        torch.cat(
            [t.reshape(t.shape[0], -1) for t in gd.values()], dim=1, out=out[a : a + chunk_size]
        )
    return out


def _outer_product_grads(
    model: nn.Module, kind: str, measure: str, X: torch.Tensor, y: torch.Tensor, out: torch.Tensor
) -> bool:
    """Per-example gradients of a ``Linear``-only model into ``out`` (n, D); ``False`` if
    the model is not one (``out`` is then untouched)."""
    if X.ndim != 2:
        return False
    try:
        adapters = layer_adapters(model, "per-example gradients")
    except TypeError:
        return False
    if sum(ad.index.numel() for ad in adapters) != out.shape[1]:
        return False
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    calls = [0] * len(adapters)

    def hook(i: int):
        def fn(module: nn.Module, args: tuple, z: torch.Tensor) -> None:
            calls[i] += 1
            inputs[i], outputs[i] = args[0].detach(), z

        return fn

    flags = [p.requires_grad for p in model.parameters()]
    handles = [ad.module.register_forward_hook(hook(i)) for i, ad in enumerate(adapters)]
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            f = model(X)
            if calls != [1] * len(adapters) or any(z.ndim != 2 for z in outputs.values()):
                return False
            r = vmap(grad(lambda fn, t: example_measure(kind, measure, fn, t)))(f.detach(), y)
            s = torch.autograd.grad(f, [outputs[i] for i in range(len(adapters))], r)
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    n = len(X)
    for i, ad in enumerate(adapters):
        a, g = inputs[i], s[i]
        start = int(ad.index[0])
        w = g.shape[1] * a.shape[1]
        torch.mul(
            g[:, :, None],
            a[:, None, :],
            out=out[:, start : start + w].view(n, *g.shape[1:], a.shape[1]),
        )
        if ad.has_bias:
            out[:, start + w : start + w + g.shape[1]] = g
    return True


def influence_scores(
    model: nn.Module,
    loss: nn.Module,
    inv: InverseOperator,
    *,
    train: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    measure: str = "loss",
    chunk_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """All-pairs scores ``G_q C⁺ G_trᵀ``: (Q, N) float64 (sign convention in the module doc).

    Query gradients are preconditioned once (Q x D); training gradients are
    computed ``chunk_size`` at a time, so memory is ``O((Q + chunk) D)``.
    """
    if not isinstance(inv, InverseOperator):
        raise TypeError(
            "inv must be an InverseCurvature (or a solver's inverse), e.g. "
            "fit_curvature(...).inverse(Regularization())."
        )
    kind = check_loss(loss)
    check_choice("measure", measure, MEASURES)
    check_model_finite(model)
    (Xt, yt), (Xq, yq) = train, query
    check_xy(Xt, yt, name="train", model=model)
    check_xy(Xq, yq, name="query", model=model)
    D = sum(p.numel() for p in model.parameters())
    if D != inv.num_params:
        raise ValueError(
            f"the model has {D} parameters but the inverse was fitted for {inv.num_params}; "
            "fit the curvature on this model."
        )
    with torch.no_grad():
        out_features = model(Xq[:1].to(next(model.parameters()).dtype)).shape[1]
    check_targets(kind, out_features, yt, "train y")
    check_targets(kind, out_features, yq, "query y")
    pre = []
    for a in range(0, len(Xq), chunk_size):
        Gq = per_example_grads(
            model, loss, Xq[a : a + chunk_size], yq[a : a + chunk_size], measure=measure
        )
        pre.append(inv.apply(Gq))
    P = torch.cat(pre)
    scores = torch.empty(len(Xq), len(Xt), dtype=torch.float64)
    with progress_bar(len(Xt), "influence scores", progress) as advance:
        for a in range(0, len(Xt), chunk_size):
            Gt = per_example_grads(
                model, loss, Xt[a : a + chunk_size], yt[a : a + chunk_size], chunk_size=chunk_size
            )
            scores[:, a : a + len(Gt)] = P @ Gt.T
            advance(len(Gt))
    return scores


__all__ = ["influence_scores", "per_example_grads"]

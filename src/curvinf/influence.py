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

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from curvinf.batches import Batches, is_batches
from curvinf.curvature.layers import measure_factors
from curvinf.curvature.operators import InverseOperator, ScoringTask
from curvinf.devices import model_device
from curvinf.losses import MEASURES, check_loss, check_targets, example_measure
from curvinf.params import (
    check_fitted_on,
    evaluation_copy,
    trainable_parameters,
)
from curvinf.progress import progress_bar
from curvinf.tracing import check_batch_statistics, traced
from curvinf.validation import (
    cast_floating,
    check_choice,
    check_int,
    check_model_finite,
    check_xy,
)


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

    ``measure="loss"`` gives training-loss gradients ``∇ℓ(z_n)``. Inputs ``X`` (N, ...) of
    any shape and dtype (integer token ids stay integer); targets as the loss needs them
    for the model's outputs (:func:`curvinf.losses.check_targets`: per-position labels
    (N, *P) for outputs (N, *P, C), the example's loss the mean over its positions).

    For models whose parameters all sit in ``nn.Linear`` layers applied once to
    (N, features) inputs, the gradient of layer ``l`` is the outer product
    ``s_n ã_nᵀ`` (``s_n = ∂f(z_n)/∂z_l`` from one backward pass of
    ``Σ_n r_nᵀ f_n`` with ``r_n = ∂f/∂output`` fixed, ``ã_n`` the input with a 1
    for the bias), written straight into the output; other models use
    ``vmap(grad(...))``. Both give the same numbers. Gradients are taken with
    respect to the trainable parameters, of the model in eval mode (a copy; the
    model passed is untouched).
    """
    kind = check_loss(loss)
    check_choice("measure", measure, MEASURES)
    check_int("chunk_size", chunk_size, low=1)
    check_model_finite(model)
    check_batch_statistics(model)
    out_shape = check_xy(X, y, name="data", model=model)
    check_targets(kind, out_shape[1:], y)
    model = evaluation_copy(model, dtype)
    return _gradients(model, kind, measure, X, y, chunk_size)[0]


def _gradients(
    model: nn.Module,
    kind: str,
    measure: str,
    X: torch.Tensor,
    y: torch.Tensor,
    chunk_size: int,
    fast: bool | None = None,
) -> tuple[torch.Tensor, bool]:
    """:func:`per_example_grads` of a validated eval-mode ``model`` (its dtype) and whether
    the outer-product route was taken. ``fast``: ``None`` decides (verifying the model's
    structure on the first chunk), ``True``/``False`` reuses an earlier decision."""
    dtype = next(model.parameters()).dtype
    params = {k: v.detach() for k, v in trainable_parameters(model).items()}
    X = cast_floating(X, dtype)
    y = y.to(dtype) if kind == "mse" else y
    D = sum(p.numel() for p in params.values())
    out = torch.empty(len(X), D, dtype=dtype, device=X.device)
    first = slice(0, chunk_size)
    if fast is not False and _outer_product_grads(
        model, kind, measure, X[first], y[first], out[first], verify=fast is None
    ):
        for a in range(chunk_size, len(X), chunk_size):
            b = a + chunk_size
            _outer_product_grads(model, kind, measure, X[a:b], y[a:b], out[a:b], verify=False)
        return out, True

    def one(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        f = functional_call(model, p, (x[None],))[0]
        return example_measure(kind, measure, f, t)

    g = vmap(grad(one), in_dims=(None, 0, 0))
    with traced(model, "per-example gradients"):
        for a in range(0, len(X), chunk_size):
            gd = g(params, X[a : a + chunk_size], y[a : a + chunk_size])
            torch.cat(
                [t.reshape(t.shape[0], -1) for t in gd.values()],
                dim=1,
                out=out[a : a + chunk_size],
            )
    return out, False


def _outer_product_grads(
    model: nn.Module,
    kind: str,
    measure: str,
    X: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor,
    *,
    verify: bool = True,
) -> bool:
    """Per-example gradients of a ``Linear``-only model into ``out`` (n, D); ``False`` if
    the model is not one (``out`` is then untouched)."""
    factors = measure_factors(model, kind, measure, X, y, verify=verify)
    if factors is None:
        return False
    n = len(X)
    for ad, a, g in zip(*factors, strict=True):
        start, n_in = int(ad.index[0]), ad.module.weight.shape[1]
        w = g.shape[1] * n_in
        torch.mul(
            g[:, :, None],
            a[:, None, :n_in],
            out=out[:, start : start + w].view(n, g.shape[1], n_in),
        )
        if ad.has_bias:
            out[:, start + w : start + w + g.shape[1]] = g
    return True


def influence_scores(
    model: nn.Module,
    loss: nn.Module,
    inv: InverseOperator,
    *,
    train: tuple[torch.Tensor, torch.Tensor] | Iterable,
    query: tuple[torch.Tensor, torch.Tensor],
    measure: str = "loss",
    chunk_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """All-pairs scores ``G_q C⁺ G_trᵀ``: (Q, N) float64 (sign convention in the module doc).

    ``train``: ``(X, y)`` tensors, or a ``DataLoader`` (any re-iterable of ``(X, y)``
    batches) for training data that do not fit in one tensor (:mod:`curvinf.batches`).

    The inverse is asked first for a faster route of its own
    (:meth:`~curvinf.curvature.operators.InverseOperator.pairwise_scores`: per layer
    in the Kronecker eigenbasis for K-FAC / EK-FAC, in sample space for a Gram
    inverse on its own training set). Otherwise query gradients are preconditioned
    once (Q x D) and training gradients computed ``chunk_size`` at a time, so memory
    is ``O((Q + chunk) D)``.

    The model is evaluated in eval mode (docs/conventions.md). If the inverse
    records the model it was fitted on (``inv.model_fingerprint``, set by
    :func:`curvinf.fit_curvature`), a different model is refused. Scoring runs on the
    device of the model's parameters: ``train``, ``query`` and the inverse must be there
    too (else ``ValueError`` naming which), and the scores are returned there.
    """
    kind = _checked(model, loss, inv, chunk_size, pairwise=True)
    check_choice("measure", measure, MEASURES)
    if is_batches(train):
        return _batched_scores(model, loss, inv, Batches(train, "train"), query, measure,
                               chunk_size, progress)  # fmt: skip
    (Xt, yt), (Xq, yq) = train, query
    check_batch_statistics(model)
    check_xy(Xt, yt, name="train", model=model)
    out_shape = check_xy(Xq, yq, name="query", model=model)[1:]
    _check_inverse_fits(inv, model)
    model = evaluation_copy(model, torch.float64)
    check_targets(kind, out_shape, yt, "train y")
    check_targets(kind, out_shape, yq, "query y")
    fast_route: list[bool | None] = [None]

    def gradients(X: torch.Tensor, y: torch.Tensor, f: str) -> torch.Tensor:
        G, fast_route[0] = _gradients(model, kind, f, X, y, chunk_size, fast=fast_route[0])
        return G

    with progress_bar(len(Xt), "influence scores", progress) as advance:
        task = ScoringTask(model, kind, measure, (Xt, yt), (Xq, yq), chunk_size, advance, gradients)
        fast = inv.pairwise_scores(task)
        if fast is not None:
            return fast
        P = preconditioned_gradients(inv, gradients(Xq, yq, measure), chunk_size)
        scores = torch.empty(len(Xq), len(Xt), dtype=torch.float64, device=Xt.device)
        for a in range(0, len(Xt), chunk_size):
            Gt = gradients(Xt[a : a + chunk_size], yt[a : a + chunk_size], "loss")
            scores[:, a : a + len(Gt)] = P @ Gt.T
            advance(len(Gt))
    return scores


def self_influence(
    model: nn.Module,
    loss: nn.Module,
    inv: InverseOperator,
    *,
    train: tuple[torch.Tensor, torch.Tensor] | Iterable,
    chunk_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """Each training example's influence on its own loss, ``∇ℓ(z_n)ᵀ C⁺ ∇ℓ(z_n)``: (N,)
    float64, the diagonal of the (N, N) train-train scores without forming them.

    Large values flag examples the model bends most to fit (mislabelled or atypical
    points; positive for a positive semi-definite ``C⁺``). ``chunk_size`` gradients are
    preconditioned at a time (``inv.apply``), so memory is ``O(chunk · D)`` and the cost N
    products with ``C⁺``. ``train``: ``(X, y)`` tensors or a ``DataLoader`` of batches.
    Checks and devices as :func:`influence_scores`.
    """
    kind = _checked(model, loss, inv, chunk_size)
    check_batch_statistics(model)
    if is_batches(train):
        _check_inverse_fits(inv, model)
        batches = Batches(train, "train")
        parts = []
        with progress_bar(batches.n, "self-influence", progress) as advance:
            for X, y in _on_model_device(batches, model):
                parts.append(self_influence(model, loss, inv, train=(X, y),
                                            chunk_size=chunk_size, progress=False))  # fmt: skip
                advance(len(X))
        return torch.cat(parts)
    Xt, yt = train
    out_shape = check_xy(Xt, yt, name="train", model=model)[1:]
    check_targets(kind, out_shape, yt, "train y")
    _check_inverse_fits(inv, model)
    model = evaluation_copy(model, torch.float64)
    out = torch.empty(len(Xt), dtype=torch.float64, device=Xt.device)
    fast: bool | None = None
    with progress_bar(len(Xt), "self-influence", progress) as advance:
        for a in range(0, len(Xt), chunk_size):
            G, fast = _gradients(model, kind, "loss", Xt[a : a + chunk_size],
                                 yt[a : a + chunk_size], chunk_size, fast=fast)  # fmt: skip
            out[a : a + len(G)] = (inv.apply(G) * G).sum(1)
            advance(len(G))
    return out


def top_k_influences(
    model: nn.Module,
    loss: nn.Module,
    inv: InverseOperator,
    *,
    train: tuple[torch.Tensor, torch.Tensor] | Iterable,
    query: tuple[torch.Tensor, torch.Tensor],
    k: int = 10,
    largest: bool = True,
    measure: str = "loss",
    chunk_size: int = 256,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_k(influence_scores(...), k, largest=...)`` without the (Q, N) score matrix:
    ``(values, indices)``, each (Q, k), strongest first, ties to the lower index.

    The query gradients are preconditioned once (``C⁺ G_qᵀ``, Q x D) and the training set
    streamed ``chunk_size`` examples at a time (tensors, or a ``DataLoader`` of batches),
    keeping each query's running top ``k``: memory ``O(Q · (D + k + chunk))`` whatever N
    is. It takes the generic route of :func:`influence_scores` (not an inverse's own
    all-pairs route), so values agree with it to rounding.
    """
    kind = _checked(model, loss, inv, chunk_size)
    check_choice("measure", measure, MEASURES)
    check_int("k", k, low=1)
    check_batch_statistics(model)
    Xq, yq = query
    out_shape = check_xy(Xq, yq, name="query", model=model)[1:]
    check_targets(kind, out_shape, yq, "query y")
    batches = Batches(train, "train") if is_batches(train) else None
    if batches is None:
        check_xy(*train, name="train", model=model)
    n = batches.n if batches is not None else len(train[0])
    if k > n:
        raise ValueError(f"k={k} exceeds the {n} training points.")
    _check_inverse_fits(inv, model)
    scored = model
    model = evaluation_copy(model, torch.float64)
    G, fast = _gradients(model, kind, measure, Xq, yq, chunk_size)
    P = preconditioned_gradients(inv, G, chunk_size)  # (Q, D)
    best_v = torch.empty(len(Xq), 0, dtype=torch.float64, device=P.device)
    best_i = torch.empty(len(Xq), 0, dtype=torch.long, device=P.device)
    seen = 0
    with progress_bar(n, "top influences", progress) as advance:
        for X, y in _on_model_device(batches if batches is not None else [train], scored):
            check_targets(kind, out_shape, y, "train y")
            for a in range(0, len(X), chunk_size):
                Gt, fast = _gradients(model, kind, "loss", X[a : a + chunk_size],
                                      y[a : a + chunk_size], chunk_size, fast=fast)  # fmt: skip
                idx = torch.arange(seen, seen + len(Gt), device=P.device).expand(len(P), -1)
                vals = torch.cat([best_v, P @ Gt.T], dim=1)
                cand = torch.cat([best_i, idx], dim=1)
                by_index = cand.argsort(dim=1)  # columns in index order: top_k's tie rule
                vals, cand = vals.gather(1, by_index), cand.gather(1, by_index)
                best_v, pos = top_k(vals, min(k, vals.shape[1]), largest=largest)
                best_i = cand.gather(1, pos)
                seen += len(Gt)
                advance(len(Gt))
    return best_v, best_i


def _batched_scores(
    model: nn.Module,
    loss: nn.Module,
    inv: InverseOperator,
    train: Batches,
    query: tuple[torch.Tensor, torch.Tensor],
    measure: str,
    chunk_size: int,
    progress: bool,
) -> torch.Tensor:
    """:func:`influence_scores` with the training data as batches: the score columns of
    each batch (moved to the model's device), side by side (Q, N). The query side is
    preconditioned once per batch, so large batches amortise it."""
    cols = []
    with progress_bar(train.n, "influence scores", progress) as advance:
        for X, y in _on_model_device(train, model):
            cols.append(
                influence_scores(
                    model,
                    loss,
                    inv,
                    train=(X, y),
                    query=query,
                    measure=measure,
                    chunk_size=chunk_size,
                    progress=False,
                )  # fmt: skip
            )
            advance(len(X))
    return torch.cat(cols, dim=1)


def _checked(
    model: nn.Module, loss: nn.Module, inv: object, chunk_size: int, pairwise: bool = False
) -> str:
    """The checks every scoring function makes first; returns the loss kind. The data's
    checks follow, then :func:`_check_inverse_fits`."""
    _require_inverse(inv, pairwise)
    kind = check_loss(loss)
    check_int("chunk_size", chunk_size, low=1)
    check_model_finite(model)
    return kind


def _check_inverse_fits(inv: InverseOperator, model: nn.Module) -> None:
    """``inv`` was fitted on ``model`` and lives on its device (after the data's checks)."""
    check_fitted_on(inv, model)
    check_inverse_device(inv, model)


def _on_model_device(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], model: nn.Module
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each ``(X, y)`` batch moved to the device of ``model``'s parameters."""
    device = model_device(model)
    for X, y in batches:
        yield X.to(device or X.device), y.to(device or y.device)


def _require_inverse(inv: object, pairwise: bool = False) -> None:
    """``TypeError`` unless ``inv`` is an inverse (``apply``; ``pairwise_scores`` too when
    asked), e.g. a dense matrix passed by mistake."""
    if not callable(getattr(inv, "apply", None)) or (
        pairwise and not hasattr(inv, "pairwise_scores")
    ):
        raise TypeError(
            "inv must be an InverseCurvature (or a solver's inverse), e.g. "
            "fit_curvature(...).inverse(Regularization())."
        )


def check_inverse_device(inv: InverseOperator, model: nn.Module) -> None:
    """``ValueError`` unless the inverse lives on the model's device (where scoring runs);
    an inverse that does not say where it lives is not checked."""
    where, device = getattr(inv, "device", None), model_device(model)
    if where is not None and device is not None and where != device:
        raise ValueError(
            f"the inverse is on {where} but the model is on {device}; curvinf scores where the "
            "model's parameters live: fit the curvature on the model where it will score "
            "(fit_curvature(..., model.to(device), X.to(device), ...)), or load a saved one "
            "there with load_curvature(path, model=model)."
        )


def preconditioned_gradients(
    inv: InverseOperator, G: torch.Tensor, chunk_size: int = 256
) -> torch.Tensor:
    """``C⁺ g`` for every row ``g`` of ``G`` (K, D): (K, D) float64, ``chunk_size`` rows per
    ``inv.apply`` (memory of iterative solvers grows with the rows solved together)."""
    check_int("chunk_size", chunk_size, low=1)
    return torch.cat([inv.apply(G[a : a + chunk_size]) for a in range(0, len(G), chunk_size)])


def gradient_scores(
    inv: InverseOperator, G_query: torch.Tensor, G_train: torch.Tensor, chunk_size: int = 256
) -> torch.Tensor:
    """``G_q C⁺ G_trᵀ`` (Q, N) float64 from precomputed per-example gradients ``G_q`` (Q, D)
    and ``G_tr`` (N, D): the generic route of :func:`influence_scores`, for callers that
    reuse one set of gradients across many inverses (the regularisation sweep, the
    influence-space error)."""
    P = preconditioned_gradients(inv, G_query, chunk_size)
    return P @ G_train.to(torch.float64).T


def top_k(
    scores: torch.Tensor, k: int = 10, *, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most helpful (``largest=True``) or most harmful training points per query.

    ``scores`` (Q, N) from :func:`influence_scores` (positive = helps the query).
    Returns ``(values, indices)``, each (Q, k), ordered from the strongest; ties
    keep the lower index first.
    """
    if not torch.is_tensor(scores) or scores.ndim != 2:
        raise ValueError(
            "scores must be a (queries, training points) tensor from influence_scores, got "
            f"{tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__}."
        )
    check_int("k", k, low=1)
    if k > scores.shape[1]:
        raise ValueError(f"k={k} exceeds the {scores.shape[1]} training points scored.")
    key = scores if largest else -scores
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), order


__all__ = [
    "gradient_scores",
    "influence_scores",
    "per_example_grads",
    "preconditioned_gradients",
    "self_influence",
    "top_k",
    "top_k_influences",
]

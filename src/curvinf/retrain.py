"""Batched retraining: many small models trained together, each on its own subset.

``K`` models share one architecture. Their parameters are stacked along a new
leading axis (``θ_k`` for ``k = 1..K``) and one training step is

    Xb[k], yb[k] = X[batch_k], y[batch_k]                  (K, B, F), (K, B)
    ℓ_k = L_B(θ_k; Xb[k], yb[k])                            vmap(functional_call)
    g_k = ∇_{θ_k} Σ_j ℓ_j = ∇ L_B(θ_k; ...)                 one backward pass
    θ_k, b_k = sgd_step(θ_k, g_k, b_k)                     vmap(sgd_step)

with ``functional_call`` over the stacked parameters. Model ``k`` draws its
minibatches from its own subset with its own ``torch.Generator`` through
:func:`curvinf.training.epoch_batches`, and updates through
:func:`curvinf.training.sgd_step`, exactly as :func:`curvinf.training.train`
does for one model; so model ``k`` of :func:`train_many` equals
``train(model_k, loss, X, y, replace(recipe, seed=seeds[k]), subset=subsets[k])``
up to floating-point summation order (tested to 1e-5).

All subsets of one call must have the same size, so every model takes the same
number of steps with the same batch sizes (what :func:`curvinf.lds.make_subsets`
produces).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.func import functional_call, vmap

from curvinf.losses import batch_loss, check_loss, example_loss, example_measure
from curvinf.params import evaluation_copy, trainable_parameters
from curvinf.training import TrainingRecipe, epoch_batches, sgd_step, training_model

Params = dict[str, torch.Tensor]


@dataclass
class ManyResult:
    """What :func:`train_many` returns.

    ``params``: name -> (K, *shape) stacked trained parameters.
    ``epoch_losses``: (K, epochs) mean minibatch loss of each epoch, as
    :attr:`curvinf.training.TrainingResult.epoch_losses` per model.
    """

    params: Params
    epoch_losses: torch.Tensor

    @property
    def num_models(self) -> int:
        return int(self.epoch_losses.shape[0])


def subset_recipe(
    recipe: TrainingRecipe, n_train: int, n_subset: int, matched_steps: bool
) -> TrainingRecipe:
    """The recipe a model trained on ``n_subset`` of ``n_train`` examples follows.

    ``matched_steps=False`` (the default everywhere in curvinf, and Park et
    al.'s protocol): the base recipe unchanged, the same number of *epochs*,
    so a half-data model takes about half the optimiser steps.
    ``matched_steps=True``: ``epochs' = ceil(epochs · n_train / n_subset)``,
    about the same number of *steps* as the base model.
    """
    if not 0 < n_subset <= n_train:
        raise ValueError(f"need 0 < n_subset <= n_train, got {n_subset} and {n_train}.")
    if not matched_steps:
        return recipe
    return replace(recipe, epochs=math.ceil(recipe.epochs * n_train / n_subset))


def stack_params(models: list[nn.Module]) -> Params:
    """name -> (K, *shape): the trainable parameters of ``K`` same-shaped models, stacked."""
    names = list(trainable_parameters(models[0]))
    per_model = [dict(m.named_parameters()) for m in models]
    return {n: torch.stack([p[n].detach() for p in per_model]).clone() for n in names}


def unstack_model(template: nn.Module, params: Params, k: int) -> nn.Module:
    """A copy of ``template`` holding model ``k`` of the stacked ``params`` (frozen
    parameters, absent from ``params``, keep the template's values)."""
    model = copy.deepcopy(template)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in params:
                p.copy_(params[n][k])
    return model


def subset_indices(subsets: torch.Tensor) -> torch.Tensor:
    """(K, n) sorted index rows from a (K, N) boolean mask or (K, n) index matrix."""
    subsets = torch.as_tensor(subsets)
    if subsets.ndim != 2:
        raise ValueError(
            "subsets must be a 2-D (K, N) mask or (K, n) index matrix, got shape "
            f"{tuple(subsets.shape)}."
        )
    if subsets.dtype != torch.bool:
        return subsets.long()
    sizes = subsets.sum(1)
    if len(sizes) and not bool((sizes == sizes[0]).all()):
        raise ValueError(
            "all subsets trained together must have the same size (got sizes "
            f"{sorted(set(sizes.tolist()))}); build them with curvinf.lds.make_subsets."
        )
    if len(sizes) and int(sizes[0]) == 0:
        raise ValueError("subsets are empty; each needs at least one training example.")
    return torch.stack([row.nonzero().squeeze(1) for row in subsets])


def train_many(
    model: nn.Module,
    loss: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    recipe: TrainingRecipe,
    *,
    subsets: torch.Tensor,
    seeds: list[int] | torch.Tensor,
    init: Params | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> ManyResult:
    """Train ``K`` models at once; model ``k`` on rows ``subsets[k]`` with batch seed ``seeds[k]``.

    Args:
        model: architecture and (unless ``init`` is given) the initial weights of every model.
        loss, X, y, recipe: as :func:`curvinf.training.train`; ``recipe.seed`` is
            replaced by ``seeds[k]`` for model ``k``.
        subsets: (K, N) boolean masks of equal row sums, or (K, n) index rows.
        seeds: K batch-order seeds; model ``k`` shuffles with
            ``torch.Generator().manual_seed(seeds[k])``.
        init: optional name -> (K, *shape) initial weights, one set per model.
        on_epoch: called with ``K`` after each epoch (progress bars).

    Returns:
        :class:`ManyResult` with the (K, ...) trained weights.
    """
    kind, model = training_model(model, loss, X, y)
    idx = subset_indices(subsets)
    K, n = idx.shape
    seeds = [int(s) for s in torch.as_tensor(seeds).reshape(-1).tolist()]
    if len(seeds) != K:
        raise ValueError(f"need one seed per model: {K} subsets but {len(seeds)} seeds.")
    if K == 0:
        raise ValueError("no models to train; pass at least one subset.")
    if bool((idx < 0).any()) or bool((idx >= len(X)).any()):
        raise ValueError(f"subset indices must lie in [0, {len(X)}).")

    if init is None:
        params = {
            k: v.detach().unsqueeze(0).repeat(K, *([1] * v.ndim))
            for k, v in trainable_parameters(model).items()
        }
    else:
        params = {k: v.detach().clone() for k, v in init.items()}
        if any(v.shape[0] != K for v in params.values()):
            raise ValueError(f"init must stack {K} models along dim 0.")
    bufs = {k: torch.zeros_like(v) for k, v in params.items()}

    def objective(p: Params, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return batch_loss(kind, functional_call(model, p, (xb,)), yb)

    per_model_loss = vmap(objective)

    def step(p: Params, xb: torch.Tensor, yb: torch.Tensor) -> tuple[Params, torch.Tensor]:
        # The models are independent, so ∇_{θ_k} Σ_j L_j(θ_j) = ∇L_k(θ_k): one backward
        # pass through the vmapped forward gives every model's gradient. Same numbers as
        # vmap(grad_and_value(objective)), and faster (no batching of the backward pass).
        leaves = {k: v.detach().requires_grad_() for k, v in p.items()}
        with torch.enable_grad():
            values = per_model_loss(leaves, xb, yb)
            grads = torch.autograd.grad(values.sum(), list(leaves.values()))
        return dict(zip(leaves, grads, strict=True)), values.detach()

    update = vmap(lambda p, g, b: sgd_step(p, g, b, recipe))
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    losses = torch.empty(K, recipe.epochs, dtype=torch.float64)
    for epoch in range(recipe.epochs):
        per_model = [epoch_batches(idx[k], recipe.batch_size, generators[k]) for k in range(K)]
        total = torch.zeros(K, dtype=torch.float64)
        for batch in zip(*per_model, strict=True):
            b = torch.stack(batch)  # (K, B)
            grads, values = step(params, X[b], y[b])
            total += values.detach().double() * b.shape[1]
            params, bufs = update(params, grads, bufs)
        losses[:, epoch] = total / n
        bad = ~torch.stack([torch.isfinite(p.reshape(K, -1)).all(1) for p in params.values()]).all(
            0
        )
        if bool(bad.any()):
            raise FloatingPointError(
                f"training diverged (non-finite weights) in epoch {epoch + 1} for model(s) "
                f"{bad.nonzero().squeeze(1).tolist()[:10]}; lower the learning rate "
                f"(now {recipe.lr})."
            )
        if on_epoch is not None:
            on_epoch(K)
    return ManyResult({k: v.detach() for k, v in params.items()}, losses)


def _per_example(model: nn.Module, kind: str, measure: str | None) -> Callable:
    """(K params, X (N, F), y (N,...)) -> (K, N) per-example loss or measurement, of the
    eval-mode function (docs/conventions.md)."""
    model = evaluation_copy(model)

    def one_model(p: Params, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = functional_call(model, p, (X,))
        if measure is None:
            return vmap(lambda fi, yi: example_loss(kind, fi, yi))(f, y)
        return vmap(lambda fi, yi: example_measure(kind, measure, fi, yi))(f, y)

    return vmap(one_model, in_dims=(0, None, None))


@torch.no_grad()
def measure_many(
    model: nn.Module,
    loss: nn.Module,
    params: Params,
    X: torch.Tensor,
    y: torch.Tensor,
    measure: str = "loss",
) -> torch.Tensor:
    """(K, Q) measurement ``f(z_q; θ_k)`` of every stacked model on every query (lower = better)."""
    return _per_example(model, check_loss(loss), measure)(params, X, y).double()


@torch.no_grad()
def losses_many(
    model: nn.Module, loss: nn.Module, params: Params, X: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """(K, N) per-example loss ``ℓ(z_n; θ_k)`` of every stacked model."""
    return _per_example(model, check_loss(loss), None)(params, X, y).double()


@torch.no_grad()
def accuracy_many(
    model: nn.Module, params: Params, X: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """(K,) classification accuracy of every stacked model on ``(X, y)`` (eval mode)."""
    model = evaluation_copy(model)
    f = vmap(lambda p: functional_call(model, p, (X,)))(params)
    return (f.argmax(-1) == y).double().mean(1)


def bytes_per_model(model: nn.Module, n_train: int, n_query: int, batch_size: int) -> int:
    """Rough peak bytes one model of :func:`train_many` (and its evaluation) needs.

    Parameters, gradients, momentum and update temporaries (~8 copies of θ),
    plus the activations of one minibatch (forward and backward, ~4 copies of
    every layer's output) and of one evaluation pass over ``max(N, Q)`` rows.
    """
    itemsize = next(model.parameters()).element_size()
    n_params = sum(p.numel() for p in model.parameters())
    widths = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    in_features = next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features
    act = batch_size * (in_features + 4 * sum(widths))
    evaluation = max(n_train, n_query) * (2 * sum(widths) + 2)
    return int(itemsize * (8 * n_params + act) + 8 * evaluation)


__all__ = [
    "ManyResult",
    "accuracy_many",
    "bytes_per_model",
    "losses_many",
    "measure_many",
    "stack_params",
    "subset_indices",
    "subset_recipe",
    "train_many",
    "unstack_model",
]

"""Batched retraining: many small models trained together, each on its own subset.

``K`` models share one architecture. Their parameters are stacked along a new
leading axis (``θ_k`` for ``k = 1..K``) and one training step is

    Xb[k], yb[k] = X[batch_k], y[batch_k]                  (K, B, F), (K, B)
    ℓ_k = L_B(θ_k; Xb[k], yb[k]),  g_k = ∇_{θ_k} ℓ_k        forward and backward
    θ_k, b_k = sgd_step(θ_k, g_k, b_k)                     in place, all k at once
                                                           (or adam_step_ for Adam/AdamW)

Two ways to compute ``g``, same numbers up to rounding:

- the fused MLP path, for a model that is exactly an ``nn.Sequential`` of
  ``nn.Linear`` layers each optionally followed by ``nn.ReLU``/``nn.GELU``/``nn.Tanh``
  (no hooks, buffers or frozen parameters; :func:`mlp_layers`): ``baddbmm`` over the
  stacked weights forward, a hand-written backward into one flat gradient buffer,
  and the SGD update as two passes over one flat parameter buffer
  (:func:`curvinf.training.sgd_step_`; Adam/AdamW: the gradient into a flat buffer, then
  :func:`curvinf.training.adam_step_` over the flat buffers). Small MLPs are bound by
  element-wise work and allocation, not by matmuls, so this is about 2-4x faster than
- the generic path, for any other model: ``vmap(functional_call)`` over the stacked
  parameters, one autograd backward pass (the models are independent, so
  ``∇_{θ_k} Σ_j ℓ_j = ∇ℓ_k``), then the same in-place update on the stacked tensors.

Model ``k`` draws its minibatches from its own subset with its own ``torch.Generator``
through :func:`curvinf.training.epoch_batches` and follows the update of
:func:`curvinf.training.sgd_step` (or :func:`curvinf.training.adam_step_`), exactly as
:func:`curvinf.training.train` does for one model; so model ``k`` of :func:`train_many` equals
``train(model_k, loss, X, y, replace(recipe, seed=seeds[k]), subset=subsets[k])``
up to floating-point summation order (tested to 1e-5, both paths).

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

from curvinf.devices import DeviceSpec, cpu_generator, model_on, resolve_device
from curvinf.losses import batch_loss, check_loss, example_loss, example_measure
from curvinf.params import evaluation_copy, trainable_parameters
from curvinf.training import (
    TrainingRecipe,
    adam_step_,
    epoch_batches,
    sgd_step_,
    training_model,
)
from curvinf.validation import check_device

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
    """(K, n) sorted index rows from a (K, N) boolean mask or (K, n) index matrix, on the
    CPU (bookkeeping: the batch orders drawn from them are drawn on the CPU)."""
    subsets = torch.as_tensor(subsets, device="cpu")
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
    device: DeviceSpec | None = None,
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
        device: where to train (:func:`curvinf.devices.resolve_device`); ``None``: where
            the model lives (``X``, ``y`` and ``init`` must be there too). Batch orders are
            drawn on the CPU and moved, so they are the same on every device.

    Returns:
        :class:`ManyResult` with the (K, ...) trained weights, on the training device.
    """
    if device is not None:
        target = resolve_device(device)
        model, X, y = model_on(model, target), X.to(target), y.to(target)
        if init is not None:
            init = {k: v.to(target) for k, v in init.items()}
    kind, model = training_model(model, loss, X, y)
    idx = subset_indices(subsets)
    K, n = idx.shape
    seeds = [int(s) for s in torch.as_tensor(seeds, device="cpu").reshape(-1).tolist()]
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
        for k, v in params.items():
            check_device(f"init[{k!r}]", v, X.device)
        if any(v.shape[0] != K for v in params.values()):
            raise ValueError(f"init must stack {K} models along dim 0.")
    layers = mlp_layers(model)
    names = {n for la in layers or [] for n in (la.weight, la.bias) if n is not None}
    if layers is None or set(params) != names:  # (an ``init`` naming other parameters)
        trainer: _StackedMLP | _VmapTrainer = _VmapTrainer(model, kind, params, recipe)
    else:
        trainer = _StackedMLP(layers, kind, params, recipe)
    params = trainer.params
    generators = [cpu_generator(s) for s in seeds]
    losses = torch.empty(K, recipe.epochs, dtype=torch.float64, device=X.device)
    total_steps = recipe.epochs * math.ceil(n / recipe.batch_size)
    t = 0
    for epoch in range(recipe.epochs):
        per_model = [epoch_batches(idx[k], recipe.batch_size, generators[k]) for k in range(K)]
        order = torch.stack([torch.cat(batches) for batches in per_model]).to(X.device)  # (K, n)
        total = torch.zeros(K, dtype=torch.float64, device=X.device)
        for a in range(0, n, recipe.batch_size):
            b = order[:, a : a + recipe.batch_size]  # (K, B): batch of every model
            lr = recipe.lr_at(t, total_steps)
            total += trainer.step(_rows(X, b), _rows(y, b), lr).double() * b.shape[1]
            t += 1
        losses[:, epoch] = total / n
        bad = _diverged(params, K)
        if bool(bad.any()):
            raise FloatingPointError(
                f"training diverged (non-finite weights) in epoch {epoch + 1} for model(s) "
                f"{bad.nonzero().squeeze(1).tolist()[:10]}; lower the learning rate "
                f"(now {recipe.lr})."
            )
        if on_epoch is not None:
            on_epoch(K)
    return ManyResult({k: v.detach().clone() for k, v in params.items()}, losses)


def _diverged(params: Params, K: int) -> torch.Tensor:
    """(K,) bool: which stacked models have a non-finite weight.

    Screened with per-model sums (one pass, no (K, D) mask; a sum is non-finite when a
    weight is, or when finite weights overflow it), confirmed element-wise only then.
    """
    sums = torch.stack([p.reshape(K, -1).sum(1) for p in params.values()])
    if bool(sums.isfinite().all()):
        return torch.zeros(K, dtype=torch.bool, device=sums.device)
    return ~torch.stack([p.reshape(K, -1).isfinite().all(1) for p in params.values()]).all(0)


def _rows(T: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``T[b]`` for a (K, B) index matrix; ``index_select`` is ~4x faster than indexing."""
    return T.index_select(0, b.reshape(-1)).view(*b.shape, *T.shape[1:])


_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.Tanh)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@dataclass(frozen=True)
class MLPLayer:
    """One ``nn.Linear`` of an MLP (parameter names) and the activation after it, if any."""

    weight: str
    bias: str | None
    activation: nn.Module | None = None


def mlp_layers(model: nn.Module) -> list[MLPLayer] | None:
    """The layers of ``model`` if :func:`train_many` can take its fused MLP path, else None.

    Fused: ``model`` runs ``nn.Sequential.forward`` over children of exactly the types
    ``nn.Linear``, each optionally followed by one ``nn.ReLU``/``nn.GELU``/``nn.Tanh``;
    no forward or backward hooks (its own or global), no buffers, every parameter
    trainable. Anything else (subclasses, other modules, parametrisations) takes the
    generic ``vmap(functional_call)`` path.
    """
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        return None
    glob = nn.modules.module
    if any(getattr(glob, f"_global{h}", None) for h in _HOOKS):
        return None
    if any(getattr(m, h, None) for m in model.modules() for h in _HOOKS):
        return None
    if any(True for _ in model.buffers()) or not all(p.requires_grad for p in model.parameters()):
        return None
    layers: list[MLPLayer] = []
    for name, m in model.named_children():
        if type(m) is nn.Linear:
            bias = f"{name}.bias" if m.bias is not None else None
            layers.append(MLPLayer(f"{name}.weight", bias))
        elif type(m) in _ACTIVATIONS and layers and layers[-1].activation is None:
            layers[-1] = replace(layers[-1], activation=m)
        else:
            return None
    return layers or None


def _activation_(act: nn.Module, z: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The activation of pre-activation ``z``: in place for ReLU/Tanh (their backward
    needs only the output), into ``out`` for GELU (its backward needs ``z``)."""
    if isinstance(act, nn.ReLU):
        return z.relu_()
    if isinstance(act, nn.Tanh):
        return z.tanh_()
    return torch.ops.aten.gelu.out(z, approximate=act.approximate, out=out)


def _activation_backward_(act: nn.Module, grad: torch.Tensor, z: torch.Tensor) -> None:
    """``grad ← grad · act'`` in place; ``z`` the pre-activation (GELU) or the output."""
    aten = torch.ops.aten
    if isinstance(act, nn.ReLU):
        aten.threshold_backward.grad_input(grad, z, 0, grad_input=grad)
    elif isinstance(act, nn.Tanh):
        aten.tanh_backward.grad_input(grad, z, grad_input=grad)
    else:
        aten.gelu_backward.grad_input(grad, z, approximate=act.approximate, grad_input=grad)


class _StackedMLP:
    """``K`` MLPs in one flat parameter buffer: ``bmm`` forward, hand-written backward.

    The momentum update is fused into the weight-gradient matmul,
    ``b_W ← μ·b_W + δᵀh`` (one ``baddbmm_`` into the flat momentum buffer, no gradient
    tensor), then ``b += wd·θ`` and ``θ -= lr·b`` are one pass each over the flat buffers:
    :func:`curvinf.training.sgd_step`'s numbers up to rounding. Adam/AdamW: the same matmul
    writes the gradient (``μ = 0``) and :func:`curvinf.training.adam_step_` updates the flat
    parameters and moments. Activations and their
    gradients live in buffers allocated once (fresh megabyte-sized tensors every step
    cost page faults comparable to the element-wise work itself).
    """

    def __init__(
        self, layers: list[MLPLayer], kind: str, params: Params, recipe: TrainingRecipe
    ) -> None:
        self.layers, self.kind, self.recipe = layers, kind, recipe
        self.flat = torch.cat([v.reshape(-1) for v in params.values()])
        self.flat_buf = torch.zeros_like(self.flat)
        self.params, self.bufs, offset = {}, {}, 0
        for n, v in params.items():
            self.params[n] = self.flat[offset : offset + v.numel()].view(v.shape)
            self.bufs[n] = self.flat_buf[offset : offset + v.numel()].view(v.shape)
            offset += v.numel()
        self.K = next(iter(params.values())).shape[0]
        self.adam = recipe.optimizer != "sgd"
        self.exp_avg_sq = torch.zeros_like(self.flat) if self.adam else None
        self.exp_avg = torch.zeros_like(self.flat) if self.adam else None
        self.t = 0
        # Per layer: output (the activation in place), gradient wrt the output, and for
        # GELU the activation (its backward needs the pre-activation).
        self.shapes = [
            (self.params[la.weight].shape[1], 3 if isinstance(la.activation, nn.GELU) else 2)
            for la in layers
        ]
        self.workspace: list[torch.Tensor] = []

    def _buffers(self, batch: int) -> list[list[torch.Tensor]]:
        """Per layer [output, output gradient(, GELU activation)], each (K, batch, o)."""
        if not self.workspace or self.workspace[0].shape[1] < self.K * batch * self.shapes[0][0]:
            self.workspace = [self.flat.new_empty(n, self.K * batch * o) for o, n in self.shapes]
        return [
            [w[j, : self.K * batch * o].view(self.K, batch, o) for j in range(n)]
            for w, (o, n) in zip(self.workspace, self.shapes, strict=True)
        ]

    def step(self, xb: torch.Tensor, yb: torch.Tensor, lr: float) -> torch.Tensor:
        """One optimiser step (learning rate ``lr``) of every model on its minibatch ``xb``
        (K, B, F); (K,) batch losses."""
        # Adam: ``M`` receives the plain gradient (μ = 0; baddbmm_ with beta 0 overwrites).
        P, M, mu = self.params, self.bufs, 0.0 if self.adam else self.recipe.momentum
        work = self._buffers(xb.shape[1])
        h, inputs, saved = xb, [], []
        for layer, (z, _, *gelu_out) in zip(self.layers, work, strict=True):
            # bmm then add: baddbmm with a transposed weight is ~1.5x slower on CPU.
            torch.bmm(h, P[layer.weight].transpose(1, 2), out=z)
            if layer.bias is not None:
                z.add_(P[layer.bias].unsqueeze(1))
            inputs.append(h)
            if layer.activation is not None:
                h = _activation_(layer.activation, z, *gelu_out)
                saved.append(z)
            else:
                h = z
                saved.append(None)
        values, delta = _loss_and_grad(self.kind, h, yb)
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            if layer.activation is not None:
                _activation_backward_(layer.activation, delta, saved[i])
            M[layer.weight].baddbmm_(delta.transpose(1, 2), inputs[i], beta=mu)
            if layer.bias is not None and self.adam:
                torch.sum(delta, 1, out=M[layer.bias])
            elif layer.bias is not None:
                M[layer.bias].mul_(mu).add_(delta.sum(1))
            if i:
                delta = torch.bmm(delta, P[layer.weight], out=work[i - 1][1])
        if self.adam:
            self.t += 1
            flat = [self.flat]
            adam_step_(
                flat, [self.flat_buf], [self.exp_avg], [self.exp_avg_sq], self.recipe, lr, self.t
            )
            return values
        if self.recipe.weight_decay:
            self.flat_buf.add_(self.flat, alpha=self.recipe.weight_decay)
        self.flat.add_(self.flat_buf, alpha=-lr)
        return values


def _loss_and_grad(
    kind: str, f: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(K,) mean batch losses of outputs ``f`` (K, B, C) and their gradient wrt ``f``."""
    if kind == "ce":
        labels = y.long().unsqueeze(2)
        # log_softmax written out: aten's kernel over a last dimension of ~10 classes is
        # several times slower than these four passes.
        z = f - f.amax(2, keepdim=True)
        logp = z.sub_(z.exp().sum(2, keepdim=True).log_())
        values = -logp.gather(2, labels).squeeze(2).mean(1)
        delta = logp.exp_()
        delta.scatter_add_(
            2, labels, torch.full(labels.shape, -1.0, dtype=f.dtype, device=f.device)
        )
        return values, delta.div_(f.shape[1])
    diff = f - y
    values = diff.square().mean((1, 2))
    return values, diff.mul_(2.0 / (f.shape[1] * f.shape[2]))


class _VmapTrainer:
    """Any model: ``vmap(functional_call)`` forward over the stacked parameters, one
    autograd backward, in-place SGD, Adam or AdamW on the stacked tensors."""

    def __init__(self, model: nn.Module, kind: str, params: Params, recipe: TrainingRecipe) -> None:
        self.params, self.recipe = params, recipe
        self.bufs = [torch.zeros_like(v) for v in params.values()]
        self.adam = recipe.optimizer != "sgd"
        self.exp_avg_sq = [torch.zeros_like(v) for v in params.values()] if self.adam else []
        self.t = 0

        def objective(p: Params, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return batch_loss(kind, functional_call(model, p, (xb,)), yb)

        self.per_model_loss = vmap(objective)

    def step(self, xb: torch.Tensor, yb: torch.Tensor, lr: float) -> torch.Tensor:
        # The models are independent, so ∇_{θ_k} Σ_j L_j(θ_j) = ∇L_k(θ_k): one backward
        # pass through the vmapped forward gives every model's gradient. Same numbers as
        # vmap(grad_and_value(objective)), and faster (no batching of the backward pass).
        leaves = {k: v.detach().requires_grad_() for k, v in self.params.items()}
        with torch.enable_grad():
            values = self.per_model_loss(leaves, xb, yb)
            grads = torch.autograd.grad(values.sum(), list(leaves.values()))
        params = list(self.params.values())
        if self.adam:
            self.t += 1
            adam_step_(params, list(grads), self.bufs, self.exp_avg_sq, self.recipe, lr, self.t)
        else:
            self.bufs = sgd_step_(params, list(grads), self.bufs, self.recipe, lr)
        return values.detach()


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


def bytes_per_model(
    model: nn.Module,
    n_train: int,
    n_query: int,
    batch_size: int,
    example: torch.Tensor | None = None,
) -> int:
    """Rough peak bytes one model of :func:`train_many` (and its evaluation) needs.

    Parameters, gradients, momentum and update temporaries (~8 copies of θ),
    plus the activations of one minibatch (forward and backward, ~4 copies of
    every layer's output) and of one evaluation pass over ``max(N, Q)`` rows.
    Layer outputs: the widths of the ``nn.Linear`` layers, or with ``example`` (one input
    row, (1, ...)) the outputs of every leaf module measured in one forward pass (any model).
    """
    itemsize = next(model.parameters()).element_size()
    n_params = sum(p.numel() for p in model.parameters())
    if example is not None:
        per_row = _leaf_output_numel(model, example[:1])
        act = batch_size * (example[:1].numel() + 4 * per_row)
        evaluation = max(n_train, n_query) * (2 * per_row + 2)
        return int(itemsize * (8 * n_params + act) + 8 * evaluation)
    widths = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    in_features = next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features
    act = batch_size * (in_features + 4 * sum(widths))
    evaluation = max(n_train, n_query) * (2 * sum(widths) + 2)
    return int(itemsize * (8 * n_params + act) + 8 * evaluation)


@torch.no_grad()
def _leaf_output_numel(model: nn.Module, x: torch.Tensor) -> int:
    """Elements of every leaf module's (tensor) output for the input ``x``, summed."""
    total = 0

    def count(_m: nn.Module, _i: object, out: object) -> None:
        nonlocal total
        total += out.numel() if isinstance(out, torch.Tensor) else 0

    model = evaluation_copy(model)  # hooks on a copy; no state of the caller's changes
    for m in model.modules():
        if not any(True for _ in m.children()):
            m.register_forward_hook(count)
    model(x)
    return max(total, 1)


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

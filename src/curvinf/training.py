"""One training recipe, used for the base model and for every retrained model.

Training is written functionally (parameters as a dict, ``torch.func``) so the
same step can be ``vmap``-ed over many models: see :func:`sgd_step` and
:func:`epoch_batches`, the two pieces a batched trainer reuses.

Optimisers (``TrainingRecipe.optimizer``), PyTorch's conventions, ``g = ∇L`` at step
``t = 1, 2, ...``:

- ``"sgd"``, heavy-ball momentum: ``g ← g + wd·θ``, ``b ← μ·b + g`` (``b₀ = 0``),
  ``θ ← θ − lr·b`` (``torch.optim.SGD``).
- ``"adam"``: ``g ← g + wd·θ`` (L2), ``m ← β₁·m + (1−β₁)·g``, ``v ← β₂·v + (1−β₂)·g²``
  (``m₀ = v₀ = 0``), ``θ ← θ − lr/(1−β₁ᵗ) · m / (√v / √(1−β₂ᵗ) + ε)``
  (``torch.optim.Adam``).
- ``"adamw"``: Adam with decoupled weight decay, ``θ ← (1 − lr·wd)·θ`` before the
  moments, and no ``wd·θ`` in ``g`` (``torch.optim.AdamW``).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad_and_value

from curvinf.devices import DeviceSpec, cpu_generator, model_on, resolve_device
from curvinf.losses import batch_loss, check_loss, check_targets
from curvinf.params import evaluation_copy, trainable_parameters
from curvinf.validation import (
    check_choice,
    check_int,
    check_model_finite,
    check_number,
    check_xy,
)

DIVERGENCE_FACTOR = 100.0
MODE_DEPENDENT = (
    nn.modules.dropout._DropoutNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


class DivergenceWarning(UserWarning):
    """The training loss grew by orders of magnitude: the learning rate is too large."""


def mode_dependent_modules(model: nn.Module) -> list[str]:
    """Names of modules in train mode that compute differently in eval mode (Dropout, BatchNorm)."""
    return [
        name or "<root>"
        for name, m in model.named_modules()
        if m.training and isinstance(m, MODE_DEPENDENT)
    ]


def training_model(
    model: nn.Module, loss: nn.Module, X: torch.Tensor, y: torch.Tensor
) -> tuple[str, nn.Module]:
    """Validate a training problem before any step; return the loss kind and the module to train.

    The module is an eval-mode copy (docs/conventions.md: curvinf trains, differentiates
    and measures the model's eval-mode function; Dropout off, BatchNorm on its running
    statistics), with a warning if that differs from the mode the model was passed in.
    Raised here, with what to do: no trainable parameters, parameters of another dtype
    than floating ``X``, targets that do not fit the outputs (per-position outputs
    (N, *P, C) take labels (N, *P): :func:`curvinf.losses.check_targets`).
    """
    kind = check_loss(loss)
    check_model_finite(model)
    trainable = trainable_parameters(model)
    if not trainable:
        raise ValueError(
            "the model has no trainable parameters (none, or all with requires_grad=False); "
            "there is nothing to train."
        )
    dtypes = {p.dtype for p in trainable.values()}
    if X.is_floating_point() and dtypes != {X.dtype}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise ValueError(
            f"the model's parameters are {names} but X is {str(X.dtype).removeprefix('torch.')}; "
            f"convert one to match, e.g. model.to(X.dtype) or X.to({names})."
        )
    out_shape = check_xy(X, y, name="training data", model=model)  # also on its device
    check_targets(kind, out_shape[1:], y)
    moded = mode_dependent_modules(model)
    if moded:
        warnings.warn(
            f"module(s) {', '.join(moded[:5])} are in train mode (Dropout/BatchNorm); curvinf "
            "trains and differentiates the eval-mode function (dropout off, normalisation by "
            "running statistics), as influence functions need one deterministic model. Call "
            "model.eval() to silence this.",
            UserWarning,
            stacklevel=3,
        )
    return kind, evaluation_copy(model)


SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("sgd", "adam", "adamw")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class TrainingRecipe:
    """SGD with momentum, Adam or AdamW; minibatches reshuffled every epoch.

    ``optimizer``: ``"sgd"`` (uses ``momentum``), ``"adam"`` or ``"adamw"`` (use
    ``betas`` and ``eps``; ``momentum`` is then unused); the updates are in the module
    doc. ``weight_decay`` is L2 (added to the gradient) for SGD and Adam, decoupled for
    AdamW (PyTorch's AdamW default is 0.01; here every optimiser defaults to 0).
    ``schedule``: ``constant`` learning rate, or ``cosine`` annealing to zero over the
    run, ``lr_t = lr · ½ (1 + cos(π t / T))`` at step ``t`` of ``T`` (the paper's released
    code anneals per epoch; per step is the same curve, smoother).
    """

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 100
    seed: int = 0
    schedule: str = "constant"
    optimizer: str = "sgd"
    betas: tuple[float, float] = ADAM_BETAS
    eps: float = ADAM_EPS

    def __post_init__(self) -> None:
        check_number("lr", self.lr, low=0, strict_low=True)
        check_number("momentum", self.momentum, low=0)
        if not self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}.")
        check_number("weight_decay", self.weight_decay, low=0)
        check_int("batch_size", self.batch_size, low=1)
        check_int("epochs", self.epochs, low=1)
        check_int("seed", self.seed)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (β₁, β₂), got {self.betas!r}.")
        for name, b in zip(("betas[0]", "betas[1]"), betas, strict=True):
            if not check_number(name, b, low=0) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {b}.")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        check_number("eps", self.eps, low=0, strict_low=True)
        if self.optimizer == "sgd" and (self.betas != ADAM_BETAS or self.eps != ADAM_EPS):
            raise ValueError(
                "betas and eps are Adam's settings and do nothing with optimizer='sgd'; "
                "pass optimizer='adam' or 'adamw', or leave them at their defaults."
            )

    def lr_at(self, step: int, total_steps: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based) of ``total_steps``."""
        if self.schedule == "constant":
            return self.lr
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))

    def to_dict(self) -> dict:
        """The fields that determine training, JSON-ready: ``schedule`` only when not
        constant, ``optimizer``, ``betas`` and ``eps`` only for Adam/AdamW (which drop the
        unused ``momentum``), so the hashes of older SGD stores hold."""
        d = asdict(self)
        if d["schedule"] == "constant":
            del d["schedule"]
        if self.optimizer == "sgd":
            for k in ("optimizer", "betas", "eps"):
                del d[k]
        else:
            del d["momentum"]
            d["betas"] = list(self.betas)
        return d


@dataclass
class TrainingResult:
    """What :func:`train` returns: the trained model and its per-epoch mean loss."""

    model: nn.Module
    epoch_losses: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return self.epoch_losses[-1]


def epoch_batches(
    indices: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device | None = None,
) -> list[torch.Tensor]:
    """Shuffle ``indices`` with ``generator`` (a CPU one: the order is the same on every
    device) and cut them into minibatches (last may be short), moved to ``device`` if given."""
    perm = indices[torch.randperm(len(indices), generator=generator, device="cpu")]
    if device is not None:
        perm = perm.to(device)
    return list(perm.split(batch_size))


def sgd_step(
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    bufs: dict[str, torch.Tensor],
    recipe: TrainingRecipe,
    lr: float | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One SGD-with-momentum update at learning rate ``lr`` (default ``recipe.lr``); pure,
    so it can be vmapped over models."""
    lr = recipe.lr if lr is None else lr
    new_params, new_bufs = {}, {}
    for k, p in params.items():
        g = grads[k] + recipe.weight_decay * p if recipe.weight_decay else grads[k]
        b = recipe.momentum * bufs[k] + g
        new_params[k], new_bufs[k] = p - lr * b, b
    return new_params, new_bufs


def sgd_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor],
    recipe: TrainingRecipe,
    lr: float | None = None,
) -> list[torch.Tensor]:
    """:func:`sgd_step` in place, on lists of tensors (stacked over models or flat).

    ``params`` are updated in place; ``grads`` are overwritten and become the new
    momentum buffers, which are returned (``bufs`` is then free scratch memory):
    ``g += wd·θ; g += μ·b; θ -= lr·g``, two or three passes over memory and no
    allocation. Same numbers as :func:`sgd_step` up to rounding (``μ·b + g`` may be
    fused into one multiply-add).
    """
    if recipe.weight_decay:
        torch._foreach_add_(grads, params, alpha=recipe.weight_decay)
    if recipe.momentum:
        torch._foreach_add_(grads, bufs, alpha=recipe.momentum)
    torch._foreach_add_(params, grads, alpha=-(recipe.lr if lr is None else lr))
    return grads


def adam_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avg: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor],
    recipe: TrainingRecipe,
    lr: float,
    step: int,
) -> None:
    """One Adam or AdamW update (``recipe.optimizer``) in place, on lists of tensors
    (stacked over models or flat): ``params`` and the moments ``exp_avg`` (m) and
    ``exp_avg_sq`` (v) are updated, ``grads`` may be overwritten. ``step`` is ``t``,
    counting this update from 1. ``torch.optim.Adam``/``AdamW``'s numbers (module doc)."""
    beta1, beta2 = recipe.betas
    wd = recipe.weight_decay
    if wd and recipe.optimizer == "adamw":
        torch._foreach_mul_(params, 1.0 - lr * wd)
    elif wd:
        torch._foreach_add_(grads, params, alpha=wd)
    torch._foreach_lerp_(exp_avg, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, (1.0 - beta2**step) ** 0.5)
    torch._foreach_add_(denom, recipe.eps)
    torch._foreach_addcdiv_(params, exp_avg, denom, value=-lr / (1.0 - beta1**step))


def train(
    model: nn.Module,
    loss: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    recipe: TrainingRecipe,
    *,
    subset: torch.Tensor | None = None,
    device: DeviceSpec | None = None,
) -> TrainingResult:
    """Train a copy of ``model`` on ``(X, y)`` (or the rows in ``subset``) with ``recipe``.

    ``subset``: training indices, or an (N,) boolean mask of the rows to keep.
    ``device``: where to train (:func:`curvinf.devices.resolve_device`: ``"cpu"``,
    ``"cuda"``, ``"cuda:N"``, ``"auto"``); ``None`` trains where the model lives, and then
    ``X`` and ``y`` must be there too. The trained model is returned on that device, in
    the model's dtype (float32 by default: training runs in the dtype it is given).

    The input model is left untouched. Same model, data, subset and recipe
    give the same weights, bit for bit (on one device; minibatch orders are drawn on the
    CPU, so they are the same on every device).
    """
    if not isinstance(recipe, TrainingRecipe):
        raise TypeError(f"recipe must be a TrainingRecipe, got {type(recipe).__name__}.")
    target = None if device is None else resolve_device(device)
    if target is not None:
        model, X, y = model_on(model, target), X.to(target), y.to(target)
    kind, module = training_model(model, loss, X, y)
    # Indices stay on the CPU, where the batch orders are drawn (epoch_batches moves them).
    if subset is None:
        indices = torch.arange(len(X), device="cpu")
    else:
        subset = torch.as_tensor(subset, device="cpu")
        if subset.dtype == torch.bool:  # a mask, as curvinf.lds.make_subsets gives
            if subset.shape != (len(X),):
                raise ValueError(
                    f"a boolean subset mask must have shape ({len(X)},), got {tuple(subset.shape)}."
                )
            subset = subset.nonzero().squeeze(1)
        indices = subset.long()
    if len(indices) == 0:
        raise ValueError("subset is empty; pass at least one training index.")

    params = {k: v.detach().clone() for k, v in trainable_parameters(module).items()}
    bufs = {k: torch.zeros_like(v) for k, v in params.items()}
    adam = recipe.optimizer != "sgd"
    exp_avg_sq = [torch.zeros_like(v) for v in params.values()] if adam else []

    def objective(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return batch_loss(kind, functional_call(module, p, (xb,)), yb)

    step = grad_and_value(objective)
    generator = cpu_generator(recipe.seed)
    losses: list[float] = []
    total_steps = recipe.epochs * math.ceil(len(indices) / recipe.batch_size)
    t = 0
    for _ in range(recipe.epochs):
        # the epoch's mean loss, summed on the device (no synchronisation per step); the
        # same float64 operations as summing Python floats
        total = torch.zeros((), dtype=torch.float64, device=X.device)
        for b in epoch_batches(indices, recipe.batch_size, generator, X.device):
            grads, value = step(params, X[b], y[b])
            total += value.detach().double() * len(b)
            lr = recipe.lr_at(t, total_steps)
            t += 1
            if adam:
                g = [grads[k] for k in params]
                adam_step_(list(params.values()), g, list(bufs.values()), exp_avg_sq, recipe, lr, t)
            else:
                params, bufs = sgd_step(params, grads, bufs, recipe, lr)
        losses.append(float(total) / len(indices))
        if not all(bool(torch.isfinite(p).all()) for p in params.values()):
            raise FloatingPointError(
                f"training diverged (non-finite weights) in epoch {len(losses)}; "
                f"lower the learning rate (now {recipe.lr})."
            )
        warn_if_diverging(losses, recipe.lr)
    trained = _copy_with(model, params)
    return TrainingResult(trained, losses)


def warn_if_diverging(losses: list[float], lr: float) -> None:
    """Warn once (at the epoch it happens) when the mean loss first exceeds
    ``DIVERGENCE_FACTOR`` x the first epoch's: the run is diverging."""
    if len(losses) < 2:
        return
    limit = DIVERGENCE_FACTOR * losses[0]
    if losses[-1] > limit and all(v <= limit for v in losses[1:-1]):
        warnings.warn(
            f"the training loss grew from {losses[0]:.3g} (epoch 1) to {losses[-1]:.3g} "
            f"(epoch {len(losses)}), over {DIVERGENCE_FACTOR:g}x: training is diverging. "
            f"Lower the learning rate (now {lr:g}).",
            DivergenceWarning,
            stacklevel=3,
        )


def _copy_with(model: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` (its train/eval flags kept) with the trained values of ``params``;
    frozen parameters keep their values."""
    new = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in new.named_parameters():
            if k in params:
                p.copy_(params[k])
    return new

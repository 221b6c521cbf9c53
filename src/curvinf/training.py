"""One training recipe, used for the base model and for every retrained model.

Training is written functionally (parameters as a dict, ``torch.func``) so the
same step can be ``vmap``-ed over many models: see :func:`sgd_step` and
:func:`epoch_batches`, the two pieces a batched trainer reuses.

The optimiser is SGD with heavy-ball momentum, PyTorch's convention:
``g ← ∇L + wd·θ``, ``b ← μ·b + g`` (``b₀ = 0``), ``θ ← θ − lr·b``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad_and_value

from curvinf.losses import batch_loss, check_loss, check_targets
from curvinf.validation import check_model_finite, check_xy


@dataclass(frozen=True)
class TrainingRecipe:
    """SGD with momentum; constant learning rate; minibatches reshuffled every epoch."""

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(
                f"batch_size and epochs must be >= 1, got {self.batch_size} and {self.epochs}."
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainingResult:
    """What :func:`train` returns: the trained model and its per-epoch mean loss."""

    model: nn.Module
    epoch_losses: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return self.epoch_losses[-1]


def epoch_batches(
    indices: torch.Tensor, batch_size: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Shuffle ``indices`` with ``generator`` and cut them into minibatches (last may be short)."""
    perm = indices[torch.randperm(len(indices), generator=generator)]
    return list(perm.split(batch_size))


def sgd_step(
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    bufs: dict[str, torch.Tensor],
    recipe: TrainingRecipe,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One SGD-with-momentum update; pure, so it can be vmapped over models."""
    new_params, new_bufs = {}, {}
    for k, p in params.items():
        g = grads[k] + recipe.weight_decay * p if recipe.weight_decay else grads[k]
        b = recipe.momentum * bufs[k] + g
        new_params[k], new_bufs[k] = p - recipe.lr * b, b
    return new_params, new_bufs


def train(
    model: nn.Module,
    loss: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    recipe: TrainingRecipe,
    *,
    subset: torch.Tensor | None = None,
) -> TrainingResult:
    """Train a copy of ``model`` on ``(X, y)`` (or the rows in ``subset``) with ``recipe``.

    ``subset``: training indices, or an (N,) boolean mask of the rows to keep.

    The input model is left untouched. Same model, data, subset and recipe
    give the same weights, bit for bit.
    """
    kind = check_loss(loss)
    check_xy(X, y, name="training data", model=model)
    check_model_finite(model)
    out_features = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    check_targets(kind, out_features, y)
    if subset is None:
        indices = torch.arange(len(X))
    else:
        subset = torch.as_tensor(subset)
        if subset.dtype == torch.bool:  # a mask, as curvinf.lds.make_subsets gives
            if subset.shape != (len(X),):
                raise ValueError(
                    f"a boolean subset mask must have shape ({len(X)},), got {tuple(subset.shape)}."
                )
            subset = subset.nonzero().squeeze(1)
        indices = subset.long()
    if len(indices) == 0:
        raise ValueError("subset is empty; pass at least one training index.")

    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    bufs = {k: torch.zeros_like(v) for k, v in params.items()}

    def objective(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return batch_loss(kind, functional_call(model, p, (xb,)), yb)

    step = grad_and_value(objective)
    generator = torch.Generator().manual_seed(recipe.seed)
    losses: list[float] = []
    for _ in range(recipe.epochs):
        total = 0.0
        for b in epoch_batches(indices, recipe.batch_size, generator):
            grads, value = step(params, X[b], y[b])
            total += float(value) * len(b)
            params, bufs = sgd_step(params, grads, bufs, recipe)
        losses.append(total / len(indices))
        if not all(bool(torch.isfinite(p).all()) for p in params.values()):
            raise FloatingPointError(
                f"training diverged (non-finite weights) in epoch {len(losses)}; "
                f"lower the learning rate (now {recipe.lr})."
            )
    trained = _copy_with(model, params)
    return TrainingResult(trained, losses)


def _copy_with(model: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    import copy

    new = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in new.named_parameters():
            p.copy_(params[k])
    return new

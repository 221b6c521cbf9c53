"""Losses, per-example losses, query measurements, and output-space curvature.

The training objective is the mean loss ``L(θ) = 1/N Σ_n ℓ(f(x_n), y_n)``.
``ℓ`` is the ``loss`` module applied to one example:

- ``CrossEntropyLoss``: ``ℓ = -log softmax(f)_y``; ``∂²ℓ/∂f² = diag(p) - p pᵀ``.
- ``MSELoss`` (mean over the ``C`` outputs): ``ℓ = 1/C Σ_c (f_c - y_c)²``;
  ``∂²ℓ/∂f² = (2/C) I``.

Output-space square roots ``Q_n`` (C, K) with ``E[Q_n Q_nᵀ] ≈ ∂²ℓ_n/∂f²`` define
every GGN-type rung (``fisher``):

- ``type2``: ``Q_n`` is the symmetric square root of the output Hessian (K = C).
- ``mc``: ``K = mc_samples`` columns ``∇_f ℓ(f, ŷ_k) / sqrt(K)`` with ``ŷ_k`` drawn
  from the model's predictive distribution (categorical for CE; Gaussian with
  variance ``C/2`` for MSE, the variance whose Fisher is ``(2/C) I``).
- ``empirical``: one column ``∇_f ℓ(f, y_n)``, the observed label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from curvinf.validation import check_choice

FISHER_TYPES = ("type2", "mc", "empirical")
MEASURES = ("loss", "margin")


def check_loss(loss: nn.Module) -> str:
    """Return ``"ce"`` or ``"mse"``; raise for other losses or reductions."""
    if isinstance(loss, nn.CrossEntropyLoss):
        kind = "ce"
        if loss.label_smoothing != 0.0 or loss.weight is not None:
            raise ValueError(
                "CrossEntropyLoss with label_smoothing or class weights is not supported; "
                "use nn.CrossEntropyLoss()."
            )
    elif isinstance(loss, nn.MSELoss):
        kind = "mse"
    else:
        raise TypeError(
            f"loss must be nn.CrossEntropyLoss or nn.MSELoss, got {type(loss).__name__}."
        )
    if loss.reduction != "mean":
        raise ValueError(
            f"loss must use reduction='mean' (the objective is the mean loss), got "
            f"reduction={loss.reduction!r}."
        )
    return kind


def check_targets(kind: str, out_features: int, y: torch.Tensor, name: str = "y") -> None:
    """Targets must be int class labels in range (CE) or float (N, C) (MSE)."""
    if kind == "ce":
        if y.dtype not in (torch.int64, torch.int32) or y.ndim != 1:
            raise ValueError(
                f"{name} for CrossEntropyLoss must be a 1-D integer tensor of class labels, got "
                f"dtype {y.dtype} and shape {tuple(y.shape)}."
            )
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= out_features):
            raise ValueError(
                f"{name} has labels outside [0, {out_features}); the model has {out_features} "
                "outputs."
            )
    else:
        if not y.is_floating_point() or y.ndim != 2 or y.shape[1] != out_features:
            raise ValueError(
                f"{name} for MSELoss must be a float tensor of shape (N, {out_features}), got "
                f"dtype {y.dtype} and shape {tuple(y.shape)}."
            )


def example_loss(kind: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ℓ for one example: ``f`` (C,), ``y`` () or (C,) -> scalar. vmap-friendly."""
    if kind == "ce":
        return -torch.log_softmax(f, dim=-1).gather(-1, y.reshape(1)).squeeze(-1)
    return (f - y).pow(2).mean()


def batch_loss(kind: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean loss over a batch: ``f`` (N, C) -> scalar, equal to the ``loss`` module."""
    if kind == "ce":
        return F.cross_entropy(f, y)
    # Written out: F.mse_loss breaks forward-over-reverse with ReLU ("ZeroTensors are immutable").
    return (f - y).pow(2).mean()


def example_measure(kind: str, measure: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The query measurement for one example, oriented so that lower is better.

    ``loss``: ℓ(f, y). ``margin``: minus the correct-class logit margin,
    ``-(f_y - max_{c≠y} f_c)`` (classification only).
    """
    if measure == "loss":
        return example_loss(kind, f, y)
    if kind != "ce":
        raise ValueError("measure='margin' needs a classification loss; use measure='loss'.")
    correct = f.gather(-1, y.reshape(1)).squeeze(-1)
    is_correct = torch.arange(f.shape[-1], device=f.device) == y
    others = f.masked_fill(is_correct, float("-inf"))
    return -(correct - others.max(-1).values)


def output_hessian(kind: str, f: torch.Tensor) -> torch.Tensor:
    """∂²ℓ/∂f² per example: ``f`` (N, C) -> (N, C, C)."""
    n, c = f.shape
    if kind == "ce":
        p = torch.softmax(f, dim=-1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return (2.0 / c) * torch.eye(c, dtype=f.dtype).expand(n, c, c).clone()


def output_sqrt(
    kind: str,
    fisher: str,
    f: torch.Tensor,
    y: torch.Tensor,
    *,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Output-space square roots ``Q`` (N, C, K) with ``Q_n Q_nᵀ ≈ ∂²ℓ_n/∂f²``."""
    check_choice("fisher", fisher, FISHER_TYPES)
    f = f.detach()
    if fisher == "type2":
        evals, evecs = torch.linalg.eigh(output_hessian(kind, f))
        root = evals.clamp_min(0.0).sqrt()
        return (evecs * root[:, None, :]) @ evecs.transpose(1, 2)
    if fisher == "empirical":
        return output_grad(kind, f, y)[:, :, None]
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}.")
    cols = []
    for _ in range(mc_samples):
        if kind == "ce":
            p = torch.softmax(f, dim=-1)
            y_hat = torch.multinomial(p, 1, generator=generator).squeeze(-1)
        else:
            noise = torch.randn(f.shape, generator=generator, dtype=f.dtype)
            y_hat = f + (f.shape[1] / 2.0) ** 0.5 * noise
        cols.append(output_grad(kind, f, y_hat))
    return torch.stack(cols, dim=-1) / mc_samples**0.5


def output_grad(kind: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇_f ℓ(f_n, y_n) per example: (N, C)."""
    if kind == "ce":
        return torch.softmax(f, dim=-1) - F.one_hot(y, f.shape[1]).to(f.dtype)
    return (2.0 / f.shape[1]) * (f - y)

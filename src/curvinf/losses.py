"""Losses, per-example losses, query measurements, and output-space curvature.

The training objective is the mean loss ``L(θ) = 1/N Σ_n ℓ(f(x_n), y_n)``.
``ℓ`` is the ``loss`` module applied to one example, whose output ``f`` may have
any shape:

- ``CrossEntropyLoss``: outputs ``(C,)`` with a label ``y`` (), or per-position
  outputs ``(*P, C)`` — classes in the *last* dimension, e.g. a language model's
  ``(T, C)`` — with labels ``y`` of shape ``P``. The example's loss is the mean over
  its ``T = ∏P`` positions, ``ℓ = 1/T Σ_t -log softmax(f_t)_{y_t}``;
  ``∂²ℓ/∂f² = 1/T blockdiag_t(diag(p_t) - p_t p_tᵀ)``. (``nn.CrossEntropyLoss`` itself
  wants classes in dimension 1; curvinf applies it to ``f.reshape(-1, C)``, the
  language-model convention, which gives the same mean.)
- ``MSELoss`` (mean over all ``F = ∏ f.shape`` output entries, any shape):
  ``ℓ = 1/F Σ_i (f_i - y_i)²``; ``∂²ℓ/∂f² = (2/F) I``.

Output-space quantities are over the *flattened* output of ``F`` entries (``F = T·C``
for per-position cross-entropy), row-major. Output-space square roots ``Q_n`` (F, K)
with ``E[Q_n Q_nᵀ] ≈ ∂²ℓ_n/∂f²`` define every GGN-type rung (``fisher``):

- ``type2``: ``Q_n`` is the symmetric square root of the output Hessian (K = F),
  block-diagonal over the positions of a per-position cross-entropy.
- ``mc``: ``K = mc_samples`` columns ``√T ∇_f ℓ(f, ŷ_k) / sqrt(K)`` with ``ŷ_k`` drawn
  from the model's predictive distribution (categorical at every position for CE;
  Gaussian with variance ``F/2`` for MSE, the variance whose Fisher is ``(2/F) I``).
  The ``√T`` makes ``E[Q Qᵀ]`` the Hessian of the mean over positions (``T = 1``:
  ``∇_f ℓ``).
- ``empirical``: one column ``√T ∇_f ℓ(f, y_n)``, the observed labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def check_targets(
    kind: str, out_shape: int | Sequence[int], y: torch.Tensor, name: str = "y"
) -> None:
    """Targets that fit the model's output for one example, ``out_shape`` (an int ``C``
    means ``(C,)``): CE, integer labels ``(N, *out_shape[:-1])`` in ``[0, C)`` (one per
    position, classes last); MSE, a float tensor ``(N, *out_shape)``."""
    shape = (out_shape,) if isinstance(out_shape, int) else tuple(int(d) for d in out_shape)
    got = f"got dtype {y.dtype} and shape {tuple(y.shape)}."
    if kind == "ce":
        if not shape:
            raise ValueError(
                "CrossEntropyLoss needs class scores, but the model returns one number per "
                "example (shape (N,)); return logits (N, classes), or use nn.MSELoss()."
            )
        positions, classes = shape[:-1], shape[-1]
        if y.dtype not in (torch.int64, torch.int32) or tuple(y.shape[1:]) != positions:
            if positions:
                what = (
                    f"an integer tensor of class labels of shape {_shape('N', positions)}, one "
                    f"per position (the model returns {_shape('N', shape)}, classes last)"
                )
            else:
                what = "a 1-D integer tensor of class labels"
            raise ValueError(f"{name} for CrossEntropyLoss must be {what}, {got}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise ValueError(
                f"{name} has labels outside [0, {classes}); the model has {classes} "
                "outputs (classes) per position."
            )
    elif not y.is_floating_point() or tuple(y.shape[1:]) != shape or y.ndim != len(shape) + 1:
        raise ValueError(
            f"{name} for MSELoss must be a float tensor of shape {_shape('N', shape)}, the "
            f"model's output shape, {got}"
        )


def _shape(first: str, rest: Sequence[int]) -> str:
    """``('N', (2, 3)) -> '(N, 2, 3)'``; ``('N', ()) -> '(N,)'``."""
    return f"({first}, {', '.join(map(str, rest))})" if rest else f"({first},)"


def example_loss(kind: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ℓ for one example -> scalar. vmap-friendly.

    CE: ``f`` (*P, C), ``y`` (*P) integer labels (``P`` may be empty), mean over the
    positions. MSE: ``f`` and ``y`` of one shape, mean over the entries.
    """
    if kind == "ce":
        logp = torch.log_softmax(f, dim=-1)
        return -logp.gather(-1, y.long().unsqueeze(-1)).mean()
    return (f - y).pow(2).mean()


def batch_loss(kind: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean loss over a batch, ``1/N Σ_n ℓ_n``: ``f`` (N, *out) -> scalar.

    Equal to the ``loss`` module on (N, C) outputs; per-position CE outputs (N, *P, C)
    are flattened to (N·T, C) first (every example has the same T positions, so the
    mean over all positions is the mean over examples of their means).
    """
    if kind == "ce":
        return F.cross_entropy(f.reshape(-1, f.shape[-1]), y.reshape(-1).long())
    # Written out: F.mse_loss breaks forward-over-reverse with ReLU ("ZeroTensors are immutable").
    return (f - y).pow(2).mean()


def example_measure(kind: str, measure: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The query measurement for one example, oriented so that lower is better.

    ``loss``: ℓ(f, y). ``margin``: minus the correct-class logit margin,
    ``-(f_y - max_{c≠y} f_c)`` (classification only); for per-position outputs
    (*P, C) its mean over the positions.
    """
    if measure == "loss":
        return example_loss(kind, f, y)
    if kind != "ce":
        raise ValueError("measure='margin' needs a classification loss; use measure='loss'.")
    label = y.long().unsqueeze(-1)
    correct = f.gather(-1, label).squeeze(-1)
    is_correct = torch.arange(f.shape[-1], device=f.device) == label
    others = f.masked_fill(is_correct, float("-inf"))
    return -(correct - others.max(-1).values).mean()


def output_blocks(kind: str, f: torch.Tensor) -> tuple[int, int]:
    """``(T, c)``: the output Hessian of outputs ``f`` (N, *out) is block-diagonal with ``T``
    blocks of size ``c`` over the flattened outputs (CE: positions x classes; MSE: one
    block of all ``F`` entries)."""
    size = math.prod(f.shape[1:])
    if kind == "ce":
        return size // f.shape[-1], f.shape[-1]
    return 1, size


def _hessian_blocks(kind: str, f: torch.Tensor) -> torch.Tensor:
    """The diagonal blocks of ∂²ℓ/∂f²: ``f`` (N, *out) -> (N, T, c, c) (:func:`output_blocks`)."""
    n = f.shape[0]
    T, c = output_blocks(kind, f)
    if kind == "ce":
        p = torch.softmax(f.reshape(n, T, c), dim=-1)
        return (torch.diag_embed(p) - p[..., :, None] * p[..., None, :]) / T
    return (2.0 / c) * torch.eye(c, dtype=f.dtype, device=f.device).expand(n, 1, c, c).clone()


def _block_diagonal(B: torch.Tensor) -> torch.Tensor:
    """(N, T, c, k) per-position blocks -> (N, T·c, T·k), block-diagonal."""
    n, T, c, k = B.shape
    if T == 1:
        return B[:, 0]
    eye = torch.eye(T, dtype=B.dtype, device=B.device)
    return torch.einsum("ts,ntck->ntcsk", eye, B).reshape(n, T * c, T * k)


def output_hessian(kind: str, f: torch.Tensor) -> torch.Tensor:
    """∂²ℓ/∂f² per example over the flattened outputs: ``f`` (N, *out) -> (N, F, F)."""
    return _block_diagonal(_hessian_blocks(kind, f))


def output_sqrt(
    kind: str,
    fisher: str,
    f: torch.Tensor,
    y: torch.Tensor,
    *,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Output-space square roots ``Q`` (N, F, K) with ``Q_n Q_nᵀ ≈ ∂²ℓ_n/∂f²`` for outputs
    ``f`` (N, *out) and targets ``y`` (module doc; ``F`` = entries of one example's output)."""
    check_choice("fisher", fisher, FISHER_TYPES)
    f = f.detach()
    T, c = output_blocks(kind, f)
    if fisher == "type2":
        evals, evecs = torch.linalg.eigh(_hessian_blocks(kind, f))
        root = evals.clamp_min(0.0).sqrt()
        return _block_diagonal((evecs * root[..., None, :]) @ evecs.transpose(-1, -2))
    if fisher == "empirical":
        return (math.sqrt(T) * output_grad(kind, f, y))[:, :, None]
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}.")
    cols = []
    # Drawn on the CPU with a CPU ``generator`` and moved to ``f``'s device: the same labels
    # on every device (curvinf.devices).
    for _ in range(mc_samples):
        if kind == "ce":
            p = torch.softmax(f, dim=-1).reshape(-1, c).cpu()
            y_hat = torch.multinomial(p, 1, generator=generator).reshape(f.shape[:-1])
            y_hat = y_hat.to(f.device)
        else:
            noise = torch.randn(f.shape, generator=generator, dtype=f.dtype, device="cpu")
            noise = noise.to(f.device)
            y_hat = f + (c / 2.0) ** 0.5 * noise
        cols.append(output_grad(kind, f, y_hat))
    Q = torch.stack(cols, dim=-1) / mc_samples**0.5
    return Q * math.sqrt(T) if T > 1 else Q


def output_grad(kind: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇_f ℓ(f_n, y_n) per example over the flattened outputs: ``f`` (N, *out) -> (N, F)."""
    n = f.shape[0]
    T, c = output_blocks(kind, f)
    if kind == "ce":
        g = torch.softmax(f, dim=-1) - F.one_hot(y.long(), c).to(f.dtype)
        return g.reshape(n, -1) / T
    return ((2.0 / c) * (f - y)).reshape(n, -1)

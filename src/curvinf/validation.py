"""Input checks shared by every public entry point.

Each check raises a ``ValueError`` or ``TypeError`` whose message names the
problem and says what to do, before any torch kernel can fail deep inside.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
from torch import nn


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``tensor`` holds NaN or inf."""
    if not torch.is_tensor(tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{name} contains {bad} NaN/inf value(s); clean or impute the data before fitting."
        )


def check_model_finite(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first parameter with NaN or inf."""
    for pname, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise ValueError(
                f"model parameter '{pname}' contains NaN/inf; the model diverged or was "
                "loaded incorrectly. Retrain with a smaller learning rate."
            )


def check_xy(
    X: torch.Tensor, y: torch.Tensor, *, name: str = "data", model: nn.Module | None = None
) -> None:
    """Validate a feature matrix and its targets: types, matching lengths, finiteness.

    ``X``: (N, F) features. ``y``: (N,) integer classes or (N, C) float targets.
    """
    check_finite(f"{name} features X", X)
    check_finite(f"{name} targets y", y)
    if X.ndim < 2:
        raise ValueError(
            f"{name} features X must have shape (N, features...), got {tuple(X.shape)}; "
            "use X.reshape(len(X), -1) or X[None] for a single example."
        )
    if len(X) != len(y):
        raise ValueError(
            f"{name}: X has {len(X)} rows but y has {len(y)}; they must describe the same examples."
        )
    if len(X) == 0:
        raise ValueError(f"{name} is empty; pass at least one example.")
    if model is not None:
        first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
        if first is not None and X.ndim == 2 and X.shape[1] != first.in_features:
            raise ValueError(
                f"{name} features X have {X.shape[1]} columns but the model's first layer "
                f"expects {first.in_features}."
            )


def check_int(name: str, value: object, *, low: int | None = None) -> int:
    """Return ``value`` if it is an integer (not a bool) ``>= low``; else raise naming it.

    Integral floats such as ``2.0`` are refused too: a count written as a float
    is almost always a mistake (``epochs=1.5``) and silently truncating it hides it.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}.")
    return int(value)


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    strict_low: bool = False,
) -> float:
    """Return ``value`` as a float if it is a finite real number within the bounds; else raise.

    ``low`` is inclusive unless ``strict_low``; ``high`` is inclusive. NaN and inf are refused.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if low is not None and (v <= low if strict_low else v < low):
        raise ValueError(f"{name} must be {'>' if strict_low else '>='} {low:g}, got {value!r}.")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high:g}, got {value!r}.")
    return v


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise naming the options."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}.")
    return value


def check_dense_budget(num_params: int, max_bytes: float, what: str) -> None:
    """Refuse to allocate a dense ``(D, D)`` float64 matrix larger than ``max_bytes``."""
    need = 8.0 * num_params * num_params
    if need > max_bytes:
        raise ValueError(
            f"{what} needs a dense {num_params} x {num_params} float64 matrix "
            f"({format_bytes(need)}), over the memory budget of {format_bytes(max_bytes)}. "
            "Use a structured rung (block_ggn, ekfac, kfac, diag_ggn) or raise max_dense_bytes."
        )


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")

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

from curvinf.devices import model_device


def check_device(
    name: str, tensor: torch.Tensor, device: torch.device | None = None, *, owner: str = "the model"
) -> None:
    """Raise ``ValueError`` if ``tensor`` is on the meta device, or (``device`` given) not on
    ``device``, the device of ``owner``: curvinf computes where the model's parameters live,
    and its data, queries and inverse must be there too (:mod:`curvinf.devices`)."""
    if tensor.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device (shapes only, no values); materialise it first, "
            "e.g. model.to_empty(device='cpu') followed by load_state_dict(...)."
        )
    if device is not None and tensor.device != device:
        raise ValueError(
            f"{name} is on {tensor.device} but {owner} is on {device}; curvinf computes where "
            f"the model's parameters live, so the model, its data and queries must share one "
            f"device: move it with .to('{device}') (or move everything to {tensor.device})."
        )


def check_model_devices(model: nn.Module) -> torch.device | None:
    """Every parameter and buffer materialised (not on the meta device, named in the error
    if one is) and all on one device, which is returned (``None``: the model holds no
    tensors)."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for pname, t in items:
            check_device(f"model {kind} '{pname}'", t)
    return model_device(model)


def check_model_input(model: nn.Module, X: torch.Tensor, *, name: str = "data") -> torch.Size:
    """Run ``model`` in eval mode on the first row of ``X``; return its output shape (1, ...).

    This is the one shape check: it accepts any front end (Conv2d after
    ``nn.Unflatten``, heads registered before the input layer) and turns a failure
    deep inside the model into a ``ValueError`` naming the data. The model's
    train/eval flags are restored afterwards and no gradient is recorded.
    """
    check_device(f"{name} features X", X, check_model_devices(model))
    params = list(model.parameters())
    x = X[:1]
    if params and x.is_floating_point():
        x = x.to(params[0].dtype)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # noqa: BLE001 - any failure means the data does not fit
        first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
        hint = "Check the number of features and the model's input layer."
        if first is not None and X.ndim == 2 and X.shape[1] != first.in_features:
            hint = (
                f"{name} features X have {X.shape[1]} columns but the model's first layer "
                f"expects {first.in_features}?"
            )
        raise ValueError(
            f"the model cannot be applied to {name} X of shape {tuple(X.shape)} "
            f"(one example: {tuple(x.shape)}): {type(err).__name__}: {err}. {hint}"
        ) from err
    finally:
        for m, mode in modes:
            m.training = mode
    if not torch.is_tensor(out):
        raise ValueError(
            f"the model must return one tensor of outputs, got {type(out).__name__}; wrap it "
            "so that forward returns the logits / predictions (N, outputs)."
        )
    if out.ndim == 0 or out.shape[0] != 1:
        raise ValueError(
            f"the model must keep the examples as the first dimension of its output: one "
            f"example of shape {tuple(x.shape)} gave outputs of shape {tuple(out.shape)}, "
            "expected (1, ...)."
        )
    return out.shape


def cast_floating(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype`` if it is floating point; integer and boolean inputs (token
    ids for ``nn.Embedding``, masks) are returned unchanged."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``tensor`` holds NaN or inf."""
    if not torch.is_tensor(tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.device.type == "meta":
        check_device(name, tensor)
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} contains {bad} NaN/inf value(s); clean or impute it first.")


def check_model_finite(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first parameter with NaN or inf (or on a wrong device)."""
    check_model_devices(model)
    for pname, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise ValueError(
                f"model parameter '{pname}' contains NaN/inf; the model diverged or was "
                "loaded incorrectly. Retrain with a smaller learning rate."
            )


def check_xy(
    X: torch.Tensor, y: torch.Tensor, *, name: str = "data", model: nn.Module | None = None
) -> torch.Size | None:
    """Validate a feature matrix and its targets: types, matching lengths, finiteness, and
    one device (the model's when given, else ``X``'s; :func:`check_device`).

    ``X``: (N, ...) inputs of any shape and dtype. ``y``: integer classes or float targets
    (their shape is checked against the model's output by
    :func:`curvinf.losses.check_targets`).
    With ``model``, also run it on one example (:func:`check_model_input`) and return
    its output shape (1, ...); ``None`` without a model.
    """
    check_finite(f"{name} features X", X)
    check_finite(f"{name} targets y", y)
    if model is None:
        check_device(f"{name} targets y", y, X.device, owner=f"{name} features X")
    else:
        device = check_model_devices(model)
        check_device(f"{name} features X", X, device)
        check_device(f"{name} targets y", y, device)
    if X.ndim < 2:
        raise ValueError(
            f"{name} features X must have shape (N, ...) with at least one dimension per "
            f"example (features, tokens, channels), got {tuple(X.shape)}; use X[:, None] for "
            "one feature or token per example, or X[None] for a single example."
        )
    if len(X) != len(y):
        raise ValueError(
            f"{name}: X has {len(X)} rows but y has {len(y)}; they must describe the same examples."
        )
    if len(X) == 0:
        raise ValueError(f"{name} is empty; pass at least one example.")
    return None if model is None else check_model_input(model, X, name=name)


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
    """Refuse to allocate a dense ``(D, D)`` float64 matrix larger than ``max_bytes``.

    ``what`` names the matrix; when it names a block of a block rung ("block_ggn
    block") the advice points past block rungs rather than back at them.
    """
    check_number("max_dense_bytes", max_bytes, low=0, strict_low=True)
    need = 8.0 * num_params * num_params
    if need > max_bytes:
        if what.endswith(" block"):
            advice = (
                "Use smaller blocks (partition='tensor'), a Kronecker or diagonal rung (ekfac, "
                "kfac, diag_ggn), the matrix-free exact rung (matrix_free(..., solver=...)), "
                "or raise max_dense_bytes."
            )
        else:
            advice = (
                "Use a structured rung (block_ggn, ekfac, kfac, diag_ggn), the matrix-free "
                "exact rung (matrix_free(..., solver=...)), or raise max_dense_bytes."
            )
        raise ValueError(
            f"{what} needs a dense {num_params} x {num_params} float64 matrix "
            f"({format_bytes(need)}), over the memory budget of {format_bytes(max_bytes)}. "
            + advice
        )


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")

"""The flat parameter vector and how layers map into it.

Convention (DESIGN.md): ``θ = cat([p.flatten() for p in model.parameters()
if p.requires_grad])``, each tensor row-major. Frozen parameters
(``requires_grad=False``) are constants of the model: :func:`curvinf.train`
does not update them, so the curvature, gradients and influence scores do not
cover them either. A :class:`ParamBlock` is a set of positions in ``θ``
that a block-diagonal rung treats together: one layer (weight and bias) by
default, or one tensor with ``partition="tensor"``.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from curvinf.devices import model_device
from curvinf.validation import check_choice

PARTITIONS = ("layer", "tensor")


@dataclass(frozen=True)
class ParamBlock:
    """Positions ``index`` (long tensor) of the flat vector held by the tensors ``names``."""

    name: str
    index: torch.Tensor
    names: tuple[str, ...]

    @property
    def size(self) -> int:
        return int(self.index.numel())


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """``name -> parameter`` of the parameters in θ (``requires_grad=True``), in order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def count_trainable(model: nn.Module) -> int:
    """D, the length of the flat parameter vector θ (trainable parameters only)."""
    return sum(p.numel() for p in trainable_parameters(model).values())


def param_offsets(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``name -> (start, stop)`` of every trainable parameter tensor in the flat vector."""
    out, start = {}, 0
    for name, p in trainable_parameters(model).items():
        out[name] = (start, start + p.numel())
        start += p.numel()
    return out


def param_blocks(model: nn.Module, partition: str = "layer") -> list[ParamBlock]:
    """Blocks of the flat vector: one per module owning parameters, or one per tensor; their
    ``index`` tensors on the model's device."""
    check_choice("partition", partition, PARTITIONS)
    offsets = param_offsets(model)
    device = model_device(model)
    if partition == "tensor":
        return [
            ParamBlock(n, torch.arange(a, b, device=device), (n,)) for n, (a, b) in offsets.items()
        ]
    blocks = []
    for mname, module in model.named_modules():
        own = [f"{mname}.{n}" if mname else n for n, _ in module.named_parameters(recurse=False)]
        own = [n for n in own if n in offsets]
        if own:
            idx = torch.cat([torch.arange(*offsets[n], device=device) for n in own])
            blocks.append(ParamBlock(mname or "<root>", idx, tuple(own)))
    return blocks


def evaluation_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of ``model`` in eval mode (``dtype`` if given): what curvinf differentiates.

    Rule (docs/conventions.md): curvature, gradients, scores and measurements use the
    model's eval-mode function, whatever mode the model passed is in, so Dropout is
    off and BatchNorm uses its running statistics. The model passed is untouched.
    """
    copy_ = copy.deepcopy(model)
    if dtype is not None:
        copy_ = copy_.to(dtype)
    return copy_.eval()


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's structure and parameter values: 16 hex digits.

    Structure: every module's path and class, every parameter's name and shape.
    Values: every parameter in float64 (so a float32 model and its float64 copy
    agree). Two models with the same fingerprint compute the same function.
    """
    h = hashlib.sha256()
    for name, module in model.named_modules():
        h.update(f"m:{name}:{type(module).__module__}.{type(module).__qualname__};".encode())
    for name, p in model.named_parameters():
        h.update(f"p:{name}:{tuple(p.shape)};".encode())
        h.update(p.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_fitted_on(
    obj: object, model: nn.Module, *, source: str = "", required: bool = False
) -> None:
    """``ValueError`` unless ``model`` is the model ``obj`` (a curvature or inverse) was
    fitted on: the same number of trainable parameters and, where ``obj`` records one
    (``obj.model_fingerprint``), the same :func:`model_fingerprint`.

    ``required``: a missing fingerprint is an error too (a file that must be checked).
    ``source`` names where ``obj`` came from (a file) in the messages.
    """
    noun = "inverse" if hasattr(obj, "apply") else "curvature"
    origin = f" in {source}" if source else ""
    todo = "fit the curvature on this model" + (
        " or load the file that was fitted on it" if source else ""
    )
    D = count_trainable(model)
    if D != obj.num_params:  # type: ignore[attr-defined]
        raise ValueError(
            f"the model has {D} trainable parameters but the {noun}{origin} was fitted "
            f"for {obj.num_params}; {todo}."  # type: ignore[attr-defined]
        )
    fitted = getattr(obj, "model_fingerprint", None)
    if fitted is None:
        if required:
            raise ValueError(
                f"{source or 'the curvature'} records no model fingerprint, so it cannot be "
                "checked against the model; refit it with fit_curvature and save it again."
            )
        return
    here = model_fingerprint(model)
    if here != fitted:
        raise ValueError(
            f"the {noun}{origin} was fitted on another model: fingerprint {fitted}, this "
            f"model {here} (same size, other structure or weights); {todo}."
        )

"""Model builders: MLPs of a given depth and width; a user's model built and described."""

from __future__ import annotations

import copy
import hashlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from curvinf.params import count_trainable
from curvinf.validation import check_choice

ModelSource = Callable[[], nn.Module] | nn.Module

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
INITS = ("torch", "he")


def make_mlp(
    in_features: int,
    out_features: int,
    *,
    depth: int = 1,
    width: int = 32,
    activation: str = "relu",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    init: str = "torch",
) -> nn.Sequential:
    """input -> ``depth`` x [Linear(width) -> activation] -> Linear(out_features), biases on.

    ``depth=0`` gives a linear model. ``init="torch"``: PyTorch's default initialisation
    (uniform, variance ``1/(3·fan_in)``: the signal shrinks layer by layer, so deep
    narrow networks start on a long loss plateau); ``init="he"``: He et al.'s
    ``N(0, 2/fan_in)`` for the hidden layers, ``N(0, 1/fan_in)`` for the output layer,
    zero biases (variance preserved through ReLU layers). Both drawn from a generator
    seeded with ``seed``.
    """
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("init", init, INITS)
    if depth < 0 or width < 1 or in_features < 1 or out_features < 1:
        raise ValueError(
            f"need depth >= 0 and width, in_features, out_features >= 1; got depth={depth}, "
            f"width={width}, in_features={in_features}, out_features={out_features}."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        fan_in = in_features
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), ACTIVATIONS[activation]()]
            fan_in = width
        layers.append(nn.Linear(fan_in, out_features))
        model = nn.Sequential(*layers)
        if init == "he":
            linears = [m for m in model if isinstance(m, nn.Linear)]
            with torch.no_grad():
                for i, m in enumerate(linears):
                    gain = 1.0 if i == len(linears) - 1 else 2.0
                    m.weight.normal_(0.0, (gain / m.in_features) ** 0.5)
                    m.bias.zero_()
    return model.to(dtype)


def num_params(model: nn.Module) -> int:
    """D, the length of the flat parameter vector (trainable parameters only)."""
    return count_trainable(model)


def build_model(source: ModelSource, seed: int) -> nn.Module:
    """The model of ``source`` at initialisation: a deep copy of a module (a template), or
    ``source()`` called under ``torch.manual_seed(seed)`` (the global RNG is restored after),
    so a factory that draws its weights from the global RNG is reproducible."""
    if isinstance(source, nn.Module):
        return copy.deepcopy(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = source()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"the model factory must return an nn.Module, got {type(model).__name__}; pass a "
            "function of no arguments that builds the model, e.g. lambda: MyNet()."
        )
    return model


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def model_structure(model: nn.Module) -> dict[str, Any]:
    """What identifies a model's architecture, JSON-ready (a store request's ``model``).

    ``class``: the root module's class; ``structure``: sha256 (16 hex digits) over
    ``repr(model)`` (modules and their settings), every parameter's and buffer's name,
    shape, dtype and ``requires_grad``, and the source code of every module class not
    defined by torch (so an edited ``forward`` is another model); ``num_params``: D,
    trainable parameters; ``dtype``: the parameters' dtype(s).
    """
    h = hashlib.sha256(repr(model).encode())
    for name, p in model.named_parameters():
        h.update(f"p:{name}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad};".encode())
    for name, b in model.named_buffers():
        h.update(f"b:{name}:{tuple(b.shape)}:{b.dtype};".encode())
    own = {type(m) for m in model.modules() if not type(m).__module__.startswith("torch")}
    for cls in sorted(own, key=_class_name):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):  # defined interactively: its name only
            source = ""
        h.update(f"c:{_class_name(cls)}:{source};".encode())
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    return {
        "class": _class_name(type(model)),
        "structure": h.hexdigest()[:16],
        "num_params": count_trainable(model),
        "dtype": ",".join(dtypes),
    }

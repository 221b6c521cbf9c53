"""Model builders: MLPs of a given depth and width."""

from __future__ import annotations

import torch
from torch import nn

from curvinf.params import count_trainable
from curvinf.validation import check_choice

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

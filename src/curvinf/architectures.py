"""The small weight-sharing networks of the CNN and transformer studies.

- :func:`make_cnn`: ``depth`` 3x3 convolutions of ``width`` channels over the 8x8 digits
  images (the last one with stride 2, so 4x4 maps), then one ``Linear`` head. Inputs are
  the dataset's flat rows (N, 64), unflattened inside, so the digits split is shared with
  the MLPs. Every parameter sits in a ``Conv2d`` or a ``Linear``: K-FAC covers all of it.
- :func:`make_transformer`: token and position embeddings, ``depth`` pre-residual blocks
  of single-head attention and a ReLU MLP (4x wider), a ``Linear`` head read at the last
  position; attention is written with plain matrix products (no fused kernel), so every
  rung can differentiate it twice. The embeddings are the parameters no K-FAC adapter
  covers (``uncovered`` decides their treatment); no LayerNorm.

Both are built from a seeded generator, like :func:`curvinf.models.make_mlp`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from curvinf.models import ACTIVATIONS
from curvinf.validation import check_choice, check_int

IMAGE = (1, 8, 8)
"""The digits images: one channel, 8 x 8 pixels."""


def make_cnn(
    in_features: int,
    out_features: int,
    *,
    depth: int = 1,
    width: int = 8,
    activation: str = "relu",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """(N, 64) -> unflatten (N, 1, 8, 8) -> ``depth`` x [Conv2d(width, 3x3, padding 1) ->
    activation], the last with stride 2 -> flatten (N, width·16) -> Linear(out_features).
    PyTorch's default initialisation, drawn under ``seed``."""
    check_choice("activation", activation, ACTIVATIONS)
    check_int("depth", depth, low=1)
    check_int("width", width, low=1)
    if in_features != math.prod(IMAGE):
        raise ValueError(
            f"make_cnn reads 8x8 one-channel images as rows of 64 features, got "
            f"{in_features} features; use dataset='digits'."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Unflatten(1, IMAGE)]
        channels = IMAGE[0]
        for i in range(depth):
            stride = 2 if i == depth - 1 else 1
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, stride=stride),
                ACTIVATIONS[activation](),
            ]
            channels = width
        layers += [nn.Flatten(), nn.Linear(width * 16, out_features)]
        model = nn.Sequential(*layers)
    return model.to(dtype)


class Attention(nn.Module):
    """Single-head self-attention ``softmax(Q Kᵀ / √d) V`` then an output projection;
    (N, T, d) -> (N, T, d). Four ``Linear`` layers over the T positions."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(h), self.key(h), self.value(h)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(h.shape[-1]), dim=-1)
        return self.out(weights @ v)


class Block(nn.Module):
    """``h + attention(h)``, then ``h + MLP(h)`` with a ReLU MLP of 4x the width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.attention = Attention(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(h)
        return h + self.down(torch.relu(self.up(h)))


class TinyTransformer(nn.Module):
    """Token ids (N, T) -> logits (N, classes) at the last position."""

    def __init__(self, vocab: int, length: int, classes: int, width: int, depth: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(length, width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        where = torch.arange(x.shape[1], device=x.device)
        h = self.blocks(self.tokens(x) + self.positions(where))
        return self.head(h[:, -1])


def make_transformer(
    vocab: int,
    length: int,
    classes: int,
    *,
    depth: int = 1,
    width: int = 16,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> TinyTransformer:
    """A :class:`TinyTransformer` of ``depth`` blocks of ``width`` units, PyTorch's default
    initialisation drawn under ``seed``."""
    for name, value in (("vocab", vocab), ("length", length), ("classes", classes)):
        check_int(name, value, low=1)
    check_int("depth", depth, low=1)
    check_int("width", width, low=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyTransformer(vocab, length, classes, width, depth)
    return model.to(dtype)


__all__ = ["IMAGE", "Attention", "Block", "TinyTransformer", "make_cnn", "make_transformer"]

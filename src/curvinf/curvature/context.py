"""What every rung's fitting needs: a float64 copy of the model, the data, the loss.

:class:`FitContext` validates the inputs once and offers the functional
pieces that the rungs share: the model as a function of (a subset of) its
parameters, output-space square roots, and per-example pseudo-gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from curvinf.losses import FISHER_TYPES, check_loss, check_targets, output_sqrt
from curvinf.params import ParamBlock, evaluation_copy, param_blocks, trainable_parameters
from curvinf.validation import check_choice, check_int, check_model_finite, check_xy


@dataclass
class FitContext:
    """Validated inputs of a fit, in float64."""

    model: nn.Module
    kind: str
    X: torch.Tensor
    y: torch.Tensor
    fisher: str = "type2"
    mc_samples: int = 1
    seed: int = 0
    chunk_size: int = 256
    progress: bool = True
    params: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.params = {k: v.detach() for k, v in trainable_parameters(self.model).items()}

    @classmethod
    def build(
        cls,
        model: nn.Module,
        loss: nn.Module,
        X: torch.Tensor,
        y: torch.Tensor,
        *,
        fisher: str = "type2",
        mc_samples: int = 1,
        seed: int = 0,
        chunk_size: int = 256,
        progress: bool = True,
        dtype: torch.dtype = torch.float64,
    ) -> FitContext:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        kind = check_loss(loss)
        check_choice("fisher", fisher, FISHER_TYPES)
        check_int("chunk_size", chunk_size, low=1)
        check_int("mc_samples", mc_samples, low=1)
        check_int("seed", seed)
        check_model_finite(model)
        if not trainable_parameters(model):
            raise ValueError(
                "model has no trainable parameters (none, or all with requires_grad=False); "
                "there is no curvature to fit."
            )
        check_xy(X, y, name="training data", model=model)
        model64 = evaluation_copy(model, dtype)
        X = X.to(dtype)
        with torch.no_grad():
            out = model64(X[:1])
        if out.ndim != 2:
            raise ValueError(
                f"the model must map (N, features) to (N, outputs); it returned shape "
                f"{tuple(out.shape)} for one example."
            )
        y = y.to(dtype) if kind == "mse" else y
        check_targets(kind, out.shape[1], y)
        return cls(model64, kind, X, y, fisher, mc_samples, seed, chunk_size, progress)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def n(self) -> int:
        return len(self.X)

    def blocks(self, partition: str = "layer") -> list[ParamBlock]:
        return param_blocks(self.model, partition)

    def whole(self) -> list[ParamBlock]:
        """One block holding every parameter (the unblocked rungs)."""
        return [ParamBlock("all", torch.arange(self.num_params), tuple(self.params))]

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for a in range(0, self.n, self.chunk_size):
            yield self.X[a : a + self.chunk_size], self.y[a : a + self.chunk_size]

    def outputs_fn(self, names: tuple[str, ...]) -> tuple[Callable, torch.Tensor]:
        """``(f, θ_sub)``: ``f(θ_sub, X)`` is the model's output with only ``names`` free."""
        shapes = [self.params[n].shape for n in names]
        sizes = [self.params[n].numel() for n in names]
        fixed = {k: v for k, v in self.params.items() if k not in names}
        theta = torch.cat([self.params[n].reshape(-1) for n in names])

        def f(sub: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
            parts = sub.split(sizes)
            free = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
            return functional_call(self.model, {**fixed, **free}, (xb,))

        return f, theta

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def pseudo_grads(
        self,
        xb: torch.Tensor,
        yb: torch.Tensor,
        generator: torch.Generator | None,
        Q: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows ``J_nᵀ Q_n[:, k]`` for a chunk: (n, K, D), flat parameter order.

        ``Q`` (n, C, K): the output-space roots to use; drawn with ``generator``
        by :func:`~curvinf.losses.output_sqrt` when ``None``.
        """
        names = tuple(self.params)
        f, theta = self.outputs_fn(names)
        if Q is None:
            with torch.no_grad():
                out = f(theta, xb)
            Q = output_sqrt(
                self.kind, self.fisher, out, yb, mc_samples=self.mc_samples, generator=generator
            )

        def one(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
            _, pullback = vjp(lambda t: f(t, x[None])[0], theta)
            return vmap(lambda c: pullback(c)[0])(q.T)

        return vmap(one)(xb, Q)

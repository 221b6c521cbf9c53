"""What every rung's fitting needs: a float64 copy of the model, the data, the loss.

Inputs may have any shape and dtype: floating inputs are copied to the fit's dtype,
integer inputs (token ids for ``nn.Embedding``) stay integer. Outputs are ``(N, C)``,
per-position ``(N, *P, C)`` for cross-entropy, or any shape for MSE
(:mod:`curvinf.losses`); output-space roots are over the flattened outputs.

:class:`FitContext` validates the inputs once and offers the functional
pieces that the rungs share: the model as a function of (a subset of) its
parameters, output-space square roots, and per-example pseudo-gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from curvinf.batches import Batches, is_batches
from curvinf.curvature.operators import DEFAULT_MAX_DENSE_BYTES
from curvinf.devices import cpu_generator, model_device
from curvinf.losses import FISHER_TYPES, check_loss, check_targets, output_sqrt
from curvinf.params import (
    PARTITIONS,
    ParamBlock,
    evaluation_copy,
    param_blocks,
    trainable_parameters,
)
from curvinf.tracing import check_batch_statistics, traced
from curvinf.validation import (
    cast_floating,
    check_choice,
    check_int,
    check_model_finite,
    check_number,
    check_xy,
)

KFAC_VARIANTS = ("expand", "reduce")
BIAS_LAYOUTS = ("joint", "separate")
UNCOVERED_POLICIES = ("error", "exact", "diagonal")


@dataclass(frozen=True)
class FitSettings:
    """How a rung is fitted: the one declaration of the fit options, validated on creation.

    :func:`~curvinf.curvature.fit_curvature` and :func:`~curvinf.curvature.matrix_free`
    take these as keyword arguments (or one ``settings=FitSettings(...)``).

    Attributes:
        fisher: output-space curvature of GGN-type rungs: ``type2`` (exact), ``mc``
            (``mc_samples`` labels sampled from the model, seeded by ``seed``) or
            ``empirical`` (observed labels). Ignored by Hessian rungs and identity.
        mc_samples: labels sampled per example for ``fisher="mc"``.
        seed: seed of every random choice of the fit.
        partition: blocks of the block rungs: ``layer`` (weight and bias together) or
            ``tensor``.
        kfac_variant: ``expand`` or ``reduce`` for K-FAC layers with weight sharing.
        bias: how K-FAC / EK-FAC treat a layer's bias: ``joint`` (one Kronecker block
            ``S ⊗ A`` over ``[W | b]``, ``A`` from the inputs with a trailing 1) or
            ``separate`` (two blocks: ``S ⊗ A`` for ``W`` with ``A = E[a aᵀ]``, and ``S``
            alone for ``b``). Ignored by the other rungs.
        uncovered: what K-FAC / EK-FAC do with a module's parameters that no layer adapter
            covers (``nn.Embedding``, ``nn.LayerNorm``, ``nn.MultiheadAttention``'s packed
            projections, ...): ``error`` (refuse, naming the module), ``exact`` (one exact
            GGN block per such module) or ``diagonal`` (the GGN diagonal on them); the
            choice is recorded on the fitted curvature (``uncovered``). Ignored by the
            other rungs.
        chunk_size: examples per chunk; memory grows linearly with it.
        vector_chunk: vectors per ``vmap`` call of matrix-free products.
        max_dense_bytes: refuse dense matrices above this size (bytes).
        progress: progress bars (drawn once work lasts over two seconds).
    """

    fisher: str = "type2"
    mc_samples: int = 1
    seed: int = 0
    partition: str = "layer"
    kfac_variant: str = "expand"
    bias: str = "joint"
    uncovered: str = "error"
    chunk_size: int = 256
    vector_chunk: int = 64
    max_dense_bytes: float = DEFAULT_MAX_DENSE_BYTES
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice("fisher", self.fisher, FISHER_TYPES)
        check_choice("partition", self.partition, PARTITIONS)
        check_choice("kfac_variant", self.kfac_variant, KFAC_VARIANTS)
        check_choice("bias", self.bias, BIAS_LAYOUTS)
        check_choice("uncovered", self.uncovered, UNCOVERED_POLICIES)
        check_int("mc_samples", self.mc_samples, low=1)
        check_int("seed", self.seed)
        check_int("chunk_size", self.chunk_size, low=1)
        check_int("vector_chunk", self.vector_chunk, low=1)
        check_number("max_dense_bytes", self.max_dense_bytes, low=0, strict_low=True)

    @classmethod
    def from_options(cls, settings: FitSettings | None = None, **options: Any) -> FitSettings:
        """``settings`` with ``options`` replaced; an unknown option names the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"unknown fit option(s) {', '.join(map(repr, unknown))}; the options are "
                f"{', '.join(sorted(known))} (curvinf.curvature.FitSettings)."
            )
        if settings is not None and not isinstance(settings, FitSettings):
            raise TypeError(f"settings must be a FitSettings, got {type(settings).__name__}.")
        return replace(settings or cls(), **options)


@dataclass
class FitContext:
    """Validated inputs of a fit: an eval-mode copy of the model, data in ``dtype``."""

    model: nn.Module
    loss_kind: str
    X: torch.Tensor
    y: torch.Tensor
    settings: FitSettings = field(default_factory=FitSettings)
    source: Batches | None = None
    """The training batches when the data came as a ``DataLoader`` (:mod:`curvinf.batches`);
    ``X``, ``y`` are then its first batch, for the checks and structure tests only."""
    params: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.params = {k: v.detach() for k, v in trainable_parameters(self.model).items()}

    fisher = property(lambda self: self.settings.fisher)
    mc_samples = property(lambda self: self.settings.mc_samples)
    seed = property(lambda self: self.settings.seed)
    chunk_size = property(lambda self: self.settings.chunk_size)
    progress = property(lambda self: self.settings.progress)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        loss: nn.Module,
        X: torch.Tensor | Iterable,
        y: torch.Tensor | None,
        settings: FitSettings | None = None,
        *,
        dtype: torch.dtype = torch.float64,
    ) -> FitContext:
        """Validate a fit's inputs (before any work) and copy them to ``dtype``; ``X`` may be
        a ``DataLoader`` of ``(X, y)`` batches with ``y=None`` (:mod:`curvinf.batches`),
        checked on its first batch and moved to the model's device batch by batch."""
        settings = settings or FitSettings()
        source = None
        if is_batches(X):
            if y is not None:
                raise TypeError(
                    "with training data as batches (a DataLoader), the targets come in the "
                    "batches: leave y out (y=None)."
                )
            source = Batches(X)
            X, y = source.first
            where = model_device(model) or X.device
            X, y = X.to(where), y.to(where)
        elif y is None:
            raise TypeError("y (the training targets) is missing; pass X and y, or a DataLoader.")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        kind = check_loss(loss)
        check_model_finite(model)
        if not trainable_parameters(model):
            raise ValueError(
                "model has no trainable parameters (none, or all with requires_grad=False); "
                "there is no curvature to fit."
            )
        check_batch_statistics(model)
        out_shape = check_xy(X, y, name="training data", model=model)
        model64 = evaluation_copy(model, dtype)
        X = cast_floating(X, dtype)
        y = y.to(dtype) if kind == "mse" else y
        check_targets(kind, out_shape[1:], y)
        return cls(model64, kind, X, y, settings, source)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the model copy's (floating inputs are in it too)."""
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        """The compute device: the model's (its data are there too, checked by :meth:`build`)."""
        return next(iter(self.params.values())).device

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def n(self) -> int:
        return len(self.X) if self.source is None else self.source.n

    def check_in_memory(self, route: str) -> None:
        """``ValueError`` for a route that revisits examples by index when the data came as
        batches (:mod:`curvinf.batches`)."""
        if self.source is not None:
            raise ValueError(
                f"{route} revisits training examples by index, so it needs the training data "
                "as tensors (X, y), not batches; use fit_curvature, whose dense and Kronecker "
                "routes read the batches as they come."
            )

    def blocks(self, partition: str = "layer") -> list[ParamBlock]:
        return param_blocks(self.model, partition)

    def whole(self) -> list[ParamBlock]:
        """One block holding every parameter (the unblocked rungs)."""
        index = torch.arange(self.num_params, device=self.device)
        return [ParamBlock("all", index, tuple(self.params))]

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The training data in chunks of at most ``chunk_size`` examples, in ``dtype`` on
        the model's device (batches are split, never merged)."""
        if self.source is None:
            for a in range(0, self.n, self.chunk_size):
                yield self.X[a : a + self.chunk_size], self.y[a : a + self.chunk_size]
            return
        for X, y in self.source:
            X = cast_floating(X, self.dtype).to(self.device)
            y = (y.to(self.dtype) if self.loss_kind == "mse" else y).to(self.device)
            for a in range(0, len(X), self.chunk_size):
                yield X[a : a + self.chunk_size], y[a : a + self.chunk_size]

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
        """The fit's random draws: a CPU generator whatever the device (:mod:`curvinf.devices`)."""
        return cpu_generator(self.seed)

    def pseudo_grads(
        self,
        xb: torch.Tensor,
        yb: torch.Tensor,
        generator: torch.Generator | None,
        Q: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows ``J_nᵀ Q_n[:, k]`` for a chunk: (n, K, D), flat parameter order.

        ``J_n`` (F, D) is the Jacobian of example ``n``'s flattened output. ``Q`` (n, F, K):
        the output-space roots to use; drawn with ``generator`` by
        :func:`~curvinf.losses.output_sqrt` when ``None``.
        """
        names = tuple(self.params)
        f, theta = self.outputs_fn(names)
        if Q is None:
            with torch.no_grad():
                out = f(theta, xb)
            Q = output_sqrt(
                self.loss_kind,
                self.fisher,
                out,
                yb,
                mc_samples=self.mc_samples,
                generator=generator,
            )

        def one(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
            out, pullback = vjp(lambda t: f(t, x[None])[0], theta)
            return vmap(lambda c: pullback(c.reshape(out.shape))[0])(q.T)

        with traced(self.model, "the GGN (per-example pseudo-gradients)"):
            return vmap(one)(xb, Q)

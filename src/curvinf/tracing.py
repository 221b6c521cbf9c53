"""Which models ``torch.func`` can differentiate, and clear errors for those it cannot.

The generic routes (per-example gradients, the dense and matrix-free Hessian and GGN,
the Gram route's rows for models that are not ``nn.Linear`` networks) differentiate
``functional_call(model, θ, (x,))`` with ``vmap``, ``grad``, ``vjp`` and ``jvp``. That
works for any module built from differentiable tensor operations that do not mutate
captured state: convolutions, embeddings on integer inputs, normalisation by stored
statistics, attention. The exceptions found so far, each reported as an
:class:`UntraceableModelError` naming the module and the way around it:

- a module that updates a tensor in place during its forward pass (BatchNorm kept in
  training mode, which updates its running statistics; a call counter);
- ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN``, whose fused kernels ``vmap`` cannot batch
  (a raw shape error inside the module otherwise);
- an operation without a forward-mode derivative (Hessian-vector products and
  matrix-free GGN products are forward-over-reverse);
- normalisation by the statistics of the batch (BatchNorm with
  ``track_running_stats=False``): an example's output, and so its gradient, depends on
  the other examples (refused before any work by :func:`check_batch_statistics`).

:func:`traced` wraps every such computation: it names the module that was running
when ``torch.func`` failed (forward hooks keep the stack of modules being called) and
selects PyTorch's math kernel for ``F.scaled_dot_product_attention``, which
``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` call, and turns off their
eval-mode "fast path" (``torch.backends.mha``): the fused CPU kernels have no
forward-mode derivative (nor a second reverse one); the math kernel is the same
function written with matmuls and a softmax, differentiable in every mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

_ACTIVE: set[int] = set()  # ids of models inside a traced() block (re-entrant calls)


class UntraceableModelError(TypeError):
    """``torch.func`` cannot differentiate a module of the model (module doc)."""


def module_label(name: str, module: nn.Module) -> str:
    """``"module 'enc.rnn' (GRU)"``; the root module is named as such, not ``''``."""
    where = f"module '{name}'" if name else "the root module"
    return f"{where} ({type(module).__name__})"


def _advice(module: nn.Module, err: BaseException) -> str:
    """The way around a ``torch.func`` failure inside ``module``."""
    text = str(err).lower()
    if isinstance(module, nn.RNNBase):
        cell = {"GRU": "GRUCell", "LSTM": "LSTMCell"}.get(type(module).__name__, "RNNCell")
        return (
            f"its fused recurrent kernel cannot be batched by torch.func's vmap; write the "
            f"recurrence as a Python loop over positions with nn.{cell} (which vmap handles), "
            "same parameters"
        )
    if "mutate" in text or "in-place" in text or "inplace" in text:
        return (
            "it updates a tensor in place during its forward pass (e.g. BatchNorm kept in "
            "training mode updating its running statistics, or a counter); curvinf "
            "differentiates the eval-mode function, so let the module compute without "
            "updating state in eval mode (do not override .train()/.eval()), or pass the "
            "state in as an input"
        )
    if "forward ad" in text or "forward mode" in text or "forward-mode" in text or "jvp" in text:
        return (
            "forward-mode AD, which Hessian-vector products and matrix-free GGN products need, "
            "is not implemented for one of its operations; write that operation with plain "
            "differentiable tensor ops (e.g. attention with matmuls and a softmax), or use "
            "fit_curvature('ggn' | 'block_ggn'), which need reverse mode only"
        )
    return "rewrite it with differentiable tensor operations that do not mutate captured state"


@contextmanager
def traced(model: nn.Module, what: str) -> Iterator[None]:
    """Run ``torch.func`` transforms of ``model`` (module doc): attention by the math
    kernel, and a failure inside a module raised as :class:`UntraceableModelError`
    naming it, with ``what`` (the computation) and the original error.

    Errors raised outside every module's forward (in the loss, in curvinf's own code)
    pass through unchanged. Re-entrant: a nested call for the same model does nothing.
    """
    if id(model) in _ACTIVE:
        yield
        return
    stack: list[tuple[str, nn.Module]] = []

    def enter(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            stack.append((name, module))

        return hook

    def leave(module: nn.Module, args: tuple, out: object) -> None:
        if stack:
            stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    _ACTIVE.add(id(model))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    except UntraceableModelError:
        raise
    except Exception as err:
        if not stack:
            raise
        name, module = stack[-1]
        raise UntraceableModelError(
            f"{what} differentiates the model with torch.func (vmap, grad, jvp), which cannot "
            f"trace {module_label(name, module)}: {type(err).__name__}: {err} Way around: "
            f"{_advice(module, err)}."
        ) from err
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        _ACTIVE.discard(id(model))
        for h in handles:
            h.remove()


def check_batch_statistics(model: nn.Module) -> None:
    """Refuse a model that normalises by the statistics of its batch in eval mode.

    Such a model's output for one example depends on the other examples it is batched
    with, so per-example losses and gradients are not defined (curvinf differentiates
    the eval-mode function, docs/conventions.md). Raises :class:`UntraceableModelError`
    naming the module. The model is put in eval mode to look, and its flags restored.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        found = [
            (name, module, module.training)
            for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            and (module.training or module.running_mean is None)
        ]
    finally:
        for m, mode in modes:
            m.training = mode
    if found:
        name, module, training = found[0]
        why = (
            "stays in training mode after .eval()"
            if training
            else "has track_running_stats=False, so it uses batch statistics even in eval mode"
        )
        raise UntraceableModelError(
            f"{module_label(name, module)} {why}: an example's output depends on the other "
            "examples of its batch, so per-example gradients and curvature are not defined. "
            "Use BatchNorm with running statistics (track_running_stats=True, trained), or "
            "a per-example normalisation (nn.LayerNorm, nn.GroupNorm)."
        )


__all__ = ["UntraceableModelError", "check_batch_statistics", "module_label", "traced"]

"""A simulated CUDA device on a CPU-only machine, to find device mistakes without a GPU.

Inside :func:`simulated_cuda` every tensor is really on the CPU, but the simulation tracks
which tensors *would* be on the CPU if the compute device were a GPU: those made by a
factory without ``device=`` (or with ``device="cpu"``), by ``.cpu()`` / ``.to("cpu")``, or
by an operation on such tensors only. Every other tensor counts as being on ``cuda:0``
(its ``.device`` says so). An operation that mixes a CPU tensor with a "CUDA" one (neither
0-dimensional, which PyTorch allows to mix) raises :class:`DeviceMixError`, as it would
on a GPU, naming the operation; so does ``.numpy()`` of a "CUDA" tensor (without
``force=True``). ``torch.cuda.is_available()`` answers True, so ``resolve_device("cuda")``
works.

A simulation, not a GPU: it sees what goes through ``__torch_function__`` (tensors made
inside ``torch.func`` transforms or by autograd count as CUDA, the safe side), and it
cannot see kernels that differ between devices. It catches the common mistakes: a tensor
created without ``device=``, a CPU random draw or index not moved, a CPU-only call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
_TAG = "_simulated_cpu"

FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.eye,
    torch.arange,
    torch.linspace,
    torch.logspace,
    torch.tensor,
    torch.as_tensor,
    torch.randn,
    torch.rand,
    torch.randint,
    torch.randperm,
    torch.from_numpy,
    torch.scalar_tensor,
    torch.empty_strided,
}
LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like}
LIKE |= {torch.randn_like, torch.randint_like}
MOVES = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda}
FREE = {torch.Tensor.copy_, torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.item}
FREE |= {torch.Tensor.__bool__, torch.Tensor.__len__, torch.Tensor.__float__}
FREE |= {torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__repr__}
FREE |= {torch.Tensor.__format__, torch.Tensor.__deepcopy__, torch.Tensor.__reduce_ex__}
FREE |= {torch._has_compatible_shallow_copy_type}


class DeviceMixError(AssertionError):
    """An operation mixed tensors of the simulated CPU and CUDA devices."""


def on_cpu(t: torch.Tensor) -> bool:
    """Whether the simulation has ``t`` on the CPU."""
    return bool(getattr(t, _TAG, False))


def _tag(out: Any, cpu: bool) -> Any:
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            with contextlib.suppress(Exception):  # functorch wrappers may refuse attributes
                setattr(t, _TAG, cpu)
    return out


def _device_arg(args: tuple, kwargs: dict) -> torch.device | None:
    """The target device of a factory call or a ``.to(...)``, if one is named."""
    candidates = [kwargs.get("device")] + [a for a in args if isinstance(a, (str, torch.device))]
    for c in candidates:
        if c is None:
            continue
        if isinstance(c, str):
            c = torch.device(c)
        if isinstance(c, torch.device):
            return c
    other = [a for a in args if isinstance(a, torch.Tensor)]
    if other and kwargs.get("device") is None:
        return CPU if on_cpu(other[0]) else CUDA
    return None


class _Simulation(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.operations = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: C901
        kwargs = dict(kwargs or {})
        self.operations += 1
        owner = getattr(func, "__self__", None)
        if owner is torch.Tensor.device:  # the .device getter
            return CPU if on_cpu(args[0]) else CUDA
        if owner is torch.Tensor.data and func.__name__ == "__set__":  # p.data = t
            func(*args, **kwargs)
            _tag(args[0], on_cpu(args[1]))
            return None
        if func in FACTORIES:
            target = kwargs.pop("device", None)
            target = torch.device(target) if isinstance(target, str) else target
            if func is torch.as_tensor and target is None and isinstance(args[0], torch.Tensor):
                return func(*args, **kwargs)  # a tensor keeps its device
            out = func(*args, **kwargs)
            if func is torch.as_tensor and isinstance(args[0], torch.Tensor) and out is args[0]:
                out = out.clone()
            return _tag(out, target is None or target.type == "cpu")
        if func in LIKE:
            target = kwargs.pop("device", None)
            out = func(*args, **kwargs)
            cpu = on_cpu(args[0]) if target is None else torch.device(target).type == "cpu"
            return _tag(out, cpu)
        if func in MOVES:
            return self._move(func, args, kwargs)
        if func is torch.Tensor.numpy and not kwargs.get("force") and not on_cpu(args[0]):
            raise DeviceMixError(
                ".numpy() of a tensor on cuda:0 (it fails on a GPU): use .numpy(force=True) "
                "or .cpu().numpy()"
            )
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        out = func(*args, **kwargs)
        if func in FREE:
            return out
        big = [t for t in tensors if t.dim() > 0]
        cpu = [on_cpu(t) for t in big]
        if any(cpu) and not all(cpu):
            name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
            shapes = [(tuple(t.shape), "cpu" if on_cpu(t) else "cuda:0") for t in big]
            raise DeviceMixError(f"{name} mixes devices: {shapes}")
        if tensors and all(on_cpu(t) for t in tensors):
            return _tag(out, True)
        return _tag(out, False)

    def _move(self, func, args: tuple, kwargs: dict) -> Any:
        t, rest = args[0], args[1:]
        if func is torch.Tensor.cpu:
            target = CPU
        elif func is torch.Tensor.cuda:
            target = CUDA
        else:
            target = _device_arg(rest, kwargs)
        # what is left of .to(...) once the device is dropped: a dtype (another tensor's
        # too) and a memory format (non_blocking / copy change nothing here)
        dtypes = [a.dtype if isinstance(a, torch.Tensor) else a for a in rest]
        dtypes = [d for d in [*dtypes, kwargs.get("dtype")] if isinstance(d, torch.dtype)]
        keep = {k: v for k, v in kwargs.items() if k == "memory_format" and v is not None}
        if dtypes:
            keep["dtype"] = dtypes[0]
        out = torch.Tensor.to(t, **keep) if func is torch.Tensor.to and keep else t
        if target is None:
            return _tag(out, on_cpu(t)) if out is not t else out
        want_cpu = target.type == "cpu"
        if out is t and want_cpu != on_cpu(t):
            out = t.clone()  # a real move makes a new tensor
        return _tag(out, want_cpu) if out is not t else out


@contextlib.contextmanager
def simulated_cuda(monkeypatch: Any) -> Iterator[_Simulation]:
    """Run the block under the simulation (``monkeypatch``: pytest's, for ``torch.cuda``)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "simulated GPU")
    state = torch.zeros(16, dtype=torch.uint8)  # fork_rng(devices=[cuda]) saves and restores
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new_state, device="cuda": None)
    new = torch.nn.Parameter.__new__

    def parameter(cls, data=None, requires_grad=True):  # a parameter is where its data is
        p = new(cls, data, requires_grad)
        return _tag(p, data is not None and on_cpu(data))

    monkeypatch.setattr(torch.nn.Parameter, "__new__", parameter)
    sim = _Simulation()
    with sim:
        yield sim


def to_simulated_cuda(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that the simulation has on ``cuda:0`` (outside a simulation too)."""
    out = t.clone()
    _tag(out, False)
    return out

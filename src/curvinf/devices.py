"""Where curvinf computes: the ``device`` option and the rules behind it.

Library rule (as curvlinops and kronfluence): a computation runs on the device of the
model's parameters; its data, queries and inverse must be on that device too (a
mismatch is refused before any work, naming the tensor and how to move it:
:func:`curvinf.validation.check_device`), and every tensor curvinf creates is created
there. Results stay on that device unless an API documents CPU output (LDS statistics,
ground-truth stores, curvature files).

Random draws (MC-Fisher labels, subsets, minibatch orders, probe vectors) come from a
CPU :class:`torch.Generator` (:func:`cpu_generator`) and are moved to the compute
device afterwards, so the same seed gives the same draws on every device.

The option itself (``device=`` of :func:`curvinf.training.train`,
:func:`curvinf.retrain.train_many`, :func:`curvinf.groundtruth.ground_truth`; ``--device``
of the CLI) is read by :func:`resolve_device`: ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
``"auto"`` (CUDA when available, else the CPU) or a :class:`torch.device`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

DEVICE_CHOICES = ("cpu", "cuda", "auto")
"""The ``--device`` choices of the CLI (``cuda:N`` is accepted too)."""

CUDA_HELP = (
    "use --device cpu (device='cpu') or --device auto (CUDA when available, else the CPU), "
    "or install a CUDA build of torch on a machine with an NVIDIA GPU "
    "(https://pytorch.org/get-started/locally/)"
)

DeviceSpec = str | torch.device


def resolve_device(spec: DeviceSpec | None = "cpu") -> torch.device:
    """The :class:`torch.device` named by ``spec``, checked before any work.

    ``spec``: ``"cpu"``, ``"cuda"`` (CUDA device 0), ``"cuda:N"``, ``"auto"`` (``cuda``
    when ``torch.cuda.is_available()``, else ``cpu``), ``None`` (the CPU) or a
    :class:`torch.device` of type ``cpu`` or ``cuda``. Raises ``ValueError`` for any other
    string, for a CUDA device when CUDA is not available here, and for a CUDA index this
    machine does not have; ``TypeError`` for another type.
    """
    if spec is None:
        return torch.device("cpu")
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "auto":
            text = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(text)
        except RuntimeError as err:
            raise ValueError(f"unknown device {spec!r}; choose cpu, cuda, cuda:N or auto.") from err
    elif isinstance(spec, torch.device):
        device = spec
    else:
        raise TypeError(
            f"device must be a string (cpu, cuda, cuda:N, auto) or a torch.device, got "
            f"{type(spec).__name__}."
        )
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(
            f"curvinf computes on the CPU or on CUDA GPUs, not on {device.type!r}; choose cpu, "
            "cuda, cuda:N or auto."
        )
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {str(spec)!r} asks for CUDA, but torch reports no CUDA device here "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False); {CUDA_HELP}."
        )
    count = torch.cuda.device_count()
    index = 0 if device.index is None else device.index
    if index >= count:
        raise ValueError(
            f"device {str(spec)!r} does not exist: this machine has {count} CUDA device(s), "
            f"cuda:0..cuda:{count - 1}."
        )
    return torch.device("cuda", index)


def cpu_generator(seed: int) -> torch.Generator:
    """A seeded CPU generator, CPU by design: curvinf draws random numbers on the CPU and
    moves them to the compute device, so a seed gives the same draws on every device."""
    return torch.Generator(device="cpu").manual_seed(seed)


def device_of(x: object) -> torch.device:
    """The device of a tensor; the CPU for anything else (a NumPy array, a list)."""
    return x.device if torch.is_tensor(x) else torch.device("cpu")


def model_device(model: nn.Module) -> torch.device | None:
    """The device of ``model``'s parameters and buffers; ``None`` if it has none.

    Raises ``ValueError`` naming two tensors when they are on different devices (curvinf
    computes on one device; move the model with ``model.to(device)``).
    """
    first: tuple[str, torch.device] | None = None
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if first is None:
                first = (f"{kind} '{name}'", t.device)
            elif t.device != first[1]:
                raise ValueError(
                    f"the model's {kind} '{name}' is on {t.device} but its {first[0]} is on "
                    f"{first[1]}; curvinf computes on one device: move the whole model with "
                    f"model.to('{first[1]}')."
                )
    return None if first is None else first[1]


def model_on(model: nn.Module, device: torch.device | None) -> nn.Module:
    """``model`` itself when ``device`` is None or the model is already there (or holds no
    tensors), else a deep copy moved to ``device``; the model passed is never changed."""
    if device is None or model_device(model) in (None, device):
        return model
    return copy.deepcopy(model).to(device)


def describe_device(device: torch.device) -> str:
    """``"cpu"`` or ``"cuda:0 (NVIDIA H100 80GB HBM3)"``: a device as reports name it."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


__all__ = [
    "CUDA_HELP",
    "DEVICE_CHOICES",
    "DeviceSpec",
    "cpu_generator",
    "describe_device",
    "device_of",
    "model_device",
    "model_on",
    "resolve_device",
]

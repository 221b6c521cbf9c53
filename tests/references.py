"""Dense float64 references built independently of curvinf's curvature code.

Only torch.func on the flat parameter vector: ``torch.func.hessian`` of the
total loss; per-example Jacobians ``jacrev`` and output Hessians ``hessian``
for the GGN; blocks by slicing at layer boundaries computed here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from curvinf import make_mlp


def flat_fn(model: nn.Module):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(t: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        parts = dict(
            zip(
                names,
                (p.reshape(s) for p, s in zip(t.split(sizes), shapes, strict=True)),
                strict=True,
            )
        )
        return functional_call(model, parts, (X,))

    return f, theta


def ref_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y) if kind == "ce" else F.mse_loss(out, y)


def ref_hessian(model, kind, X, y) -> torch.Tensor:
    f, theta = flat_fn(model)
    return hessian(lambda t: ref_loss(kind, f(t, X), y))(theta)


def ref_output_hessian(kind, out_n, y_n, fisher) -> torch.Tensor:
    """(C, C) output-space curvature for one example."""

    def ell(o):
        return ref_loss(kind, o[None], y_n[None])

    if fisher == "type2":
        return hessian(ell)(out_n)
    g = torch.func.grad(ell)(out_n)
    return torch.outer(g, g)


def ref_ggn(model, kind, X, y, fisher="type2") -> torch.Tensor:
    f, theta = flat_fn(model)
    D = theta.numel()
    G = torch.zeros(D, D, dtype=torch.float64)
    for n in range(len(X)):
        J = jacrev(lambda t, n=n: f(t, X[n : n + 1])[0])(theta)  # (C, D)
        out_n = f(theta, X[n : n + 1])[0].detach()
        G += J.T @ ref_output_hessian(kind, out_n, y[n], fisher) @ J
    return G / len(X)


def layer_slices(model: nn.Module) -> list[slice]:
    """Contiguous flat ranges of each Linear layer (weight then bias)."""
    out, start = [], 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            size = m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
            out.append(slice(start, start + size))
            start += size
    return out


def block_diag_of(C: torch.Tensor, slices: list[slice]) -> torch.Tensor:
    B = torch.zeros_like(C)
    for s in slices:
        B[s, s] = C[s, s]
    return B


def matrix_to_flat_perm(out: int, n_in: int) -> torch.Tensor:
    """perm[k] = flat position of entry k of the row-major [W | b] (out, n_in + 1)."""
    perm = []
    for i in range(out):
        for j in range(n_in + 1):
            perm.append(i * n_in + j if j < n_in else out * n_in + i)
    return torch.tensor(perm)


def ref_pinv(C: torch.Tensor, damping: float, eps: float, relative: bool) -> torch.Tensor:
    """eigh(C + δI), drop eigenvalues <= τ, invert the rest."""
    evals, U = torch.linalg.eigh(C + damping * torch.eye(len(C), dtype=C.dtype))
    tau = eps * evals.max() if relative else eps
    inv = torch.where(evals > tau, 1.0 / evals, torch.zeros_like(evals))
    return U @ torch.diag(inv) @ U.T


def problem(kind: str, n: int = 12, depth: int = 2, width: int = 4, act: str = "relu", seed=0):
    """A small float64 model with data: CE with 3 classes or MSE with 2 outputs."""
    g = torch.Generator().manual_seed(seed)
    C = 3 if kind == "ce" else 2
    X = torch.randn(n, 5, generator=g, dtype=torch.float64)
    if kind == "ce":
        y = torch.randint(0, C, (n,), generator=g)
        loss: nn.Module = nn.CrossEntropyLoss()
    else:
        y = torch.randn(n, C, generator=g, dtype=torch.float64)
        loss = nn.MSELoss()
    model = make_mlp(5, C, depth=depth, width=width, activation=act, seed=seed, dtype=torch.float64)
    return model, loss, X, y

"""The Kronecker-structured dense route (curvature/structured.py) equals the generic route."""

from __future__ import annotations

import pytest
import torch
from references import problem
from torch import nn

from curvinf import fit_curvature
from curvinf.curvature import structured
from curvinf.curvature.context import FitContext


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def generic(monkeypatch, method, model, loss, X, y, **kw) -> torch.Tensor:
    with monkeypatch.context() as mp:
        mp.setattr(structured, "hessian_blocks", lambda ctx, blocks: None)
        mp.setattr(structured, "ggn_blocks", lambda ctx, blocks: None)
        return fit_curvature(method, model, loss, X, y, **kw).dense()


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu"])
@pytest.mark.parametrize("method", ["hessian", "block_hessian", "ggn", "block_ggn"])
def test_structured_equals_generic(monkeypatch, kind, act, method):
    model, loss, X, y = problem(kind, act=act, depth=3, width=4)
    fast = fit_curvature(method, model, loss, X, y, chunk_size=5).dense()
    slow = generic(monkeypatch, method, model, loss, X, y)
    assert rel(fast, slow) < 1e-12


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_structured_ggn_fisher_variants(monkeypatch, kind, fisher):
    model, loss, X, y = problem(kind, act="tanh")
    kw = {"fisher": fisher, "mc_samples": 3, "seed": 4, "chunk_size": 5}
    fast = fit_curvature("ggn", model, loss, X, y, **kw).dense()
    assert rel(fast, generic(monkeypatch, "ggn", model, loss, X, y, **kw)) < 1e-12


@pytest.mark.parametrize("method", ["block_hessian", "block_ggn"])
def test_structured_tensor_partition(monkeypatch, kind, method):
    model, loss, X, y = problem(kind, act="tanh")
    fast = fit_curvature(method, model, loss, X, y, partition="tensor").dense()
    slow = generic(monkeypatch, method, model, loss, X, y, partition="tensor")
    assert rel(fast, slow) < 1e-12


@pytest.mark.parametrize("method", ["hessian", "ggn"])
def test_structured_without_biases_and_linear_model(monkeypatch, kind, method):
    _, loss, X, y = problem(kind)
    C = 3 if kind == "ce" else 2
    g = torch.Generator().manual_seed(1)
    for model in (
        nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, C)),
        nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, C, bias=False)),
        nn.Sequential(nn.Linear(5, C)),
    ):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        model = model.double()
        fast = fit_curvature(method, model, loss, X, y).dense()
        assert rel(fast, generic(monkeypatch, method, model, loss, X, y)) < 1e-12


class Shared(nn.Module):
    """One Linear applied twice: weight sharing, not Kronecker-structured per example."""

    def __init__(self, C: int) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.mid = nn.Linear(4, 4)
        self.out = nn.Linear(4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(torch.tanh(self.mid(torch.tanh(self.inp(x)))))))


def test_unsupported_models_fall_back(kind):
    _, loss, X, y = problem(kind)
    model = Shared(3 if kind == "ce" else 2).double()
    ctx = FitContext.build(model, loss, X, y)
    assert structured.hessian_blocks(ctx, ctx.blocks()) is None
    assert structured.ggn_blocks(ctx, ctx.blocks()) is None
    H = fit_curvature("hessian", model, loss, X, y).dense()
    assert torch.allclose(H, H.T)


def test_structured_route_is_taken(kind):
    model, loss, X, y = problem(kind, act="tanh")
    ctx = FitContext.build(model, loss, X, y)
    assert structured.hessian_blocks(ctx, ctx.blocks()) is not None
    assert structured.ggn_blocks(ctx, ctx.blocks("tensor")) is not None

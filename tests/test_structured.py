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


@pytest.mark.parametrize("measure", ["loss", "margin"])
def test_outer_product_grads_equal_vmap(monkeypatch, kind, measure):
    from curvinf import influence

    if kind == "mse" and measure == "margin":
        pytest.skip("margin is for classification")
    model, loss, X, y = problem(kind, act="tanh", n=13)
    fast = influence.per_example_grads(model, loss, X, y, measure=measure, chunk_size=5)
    monkeypatch.setattr(influence, "_outer_product_grads", lambda *a, **k: False)
    slow = influence.per_example_grads(model, loss, X, y, measure=measure, chunk_size=5)
    assert rel(fast, slow) < 1e-12


def test_outer_product_grads_fall_back_for_shared_layers(kind):
    from curvinf import influence

    _, loss, X, y = problem(kind)
    model = Shared(3 if kind == "ce" else 2).double()
    out = torch.empty(len(X), sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    assert not influence._outer_product_grads(model, kind, "loss", X, y, out)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_gemm_kronecker_apply_equals_batched(kind, method):
    from curvinf import Regularization
    from curvinf.curvature.operators import KroneckerEigenBlock

    model, loss, X, y = problem(kind, act="tanh", depth=3, width=4)
    inv = fit_curvature(method, model, loss, X, y).inverse(Regularization(damping=0.1, eps=0))
    V = torch.randn(
        7, inv.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    slow = torch.zeros_like(V)
    for b, s in zip(inv.blocks, inv.inv_evals, strict=True):
        slow[:, b.index] = KroneckerEigenBlock.scale(b, V[:, b.index], s)
    assert rel(inv.apply(V), slow) < 1e-12


@pytest.mark.parametrize("fisher", ["type2", "mc"])
def test_ekfac_capture_cache_changes_nothing(monkeypatch, kind, fisher):
    from curvinf.curvature import kronecker

    model, loss, X, y = problem(kind, act="tanh")
    kw = {"fisher": fisher, "chunk_size": 5, "seed": 3}
    cached = fit_curvature("ekfac", model, loss, X, y, **kw).dense()
    monkeypatch.setattr(kronecker, "CAPTURE_CACHE_BYTES", 0)
    assert torch.equal(cached, fit_curvature("ekfac", model, loss, X, y, **kw).dense())


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
@pytest.mark.parametrize("measure", ["loss", "margin"])
def test_kronecker_scores_equal_flat_route(monkeypatch, kind, method, measure):
    from curvinf import Regularization, influence

    if kind == "mse" and measure == "margin":
        pytest.skip("margin is for classification")
    model, loss, X, y = problem(kind, act="tanh", n=13)
    inv = fit_curvature(method, model, loss, X, y).inverse(Regularization(damping=0.1, eps=0))
    kw = {"train": (X, y), "query": (X[:4], y[:4]), "measure": measure, "chunk_size": 5}
    fast = influence.influence_scores(model, loss, inv, **kw)
    monkeypatch.setattr(type(inv), "pairwise_scores", lambda self, task: None)
    assert rel(fast, influence.influence_scores(model, loss, inv, **kw)) < 1e-12


def test_kronecker_scores_only_for_kronecker_inverses(kind):
    from curvinf import Regularization

    model, loss, X, y = problem(kind, act="tanh")
    from curvinf.curvature.operators import ScoringTask

    inv = fit_curvature("block_ggn", model, loss, X, y).inverse(Regularization(damping=0.1))
    task = ScoringTask(model, kind, "loss", (X, y), (X, y), 5, lambda n: None, None)
    assert inv.pairwise_scores(task) is None

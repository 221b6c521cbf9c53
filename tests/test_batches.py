"""Training data as batches (a DataLoader): the same curvature and scores as the tensors,
batch sizes that do not divide the chunk size, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvinf import Regularization, fit_curvature, influence_scores
from curvinf.curvature import matrix_free

CE = nn.CrossEntropyLoss()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def problem(kind: str):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        X = torch.randn(50, 5, generator=g, dtype=torch.float64)
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)
        ).double()
        X = torch.randn(50, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (50,), generator=g)
    return model, X, y


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("method", ["hessian", "ggn", "block_ggn", "ekfac", "kfac"])
def test_a_dataloader_gives_the_tensors_curvature_and_scores(kind, method):
    model, X, y = problem(kind)
    loader = DataLoader(TensorDataset(X, y), batch_size=13)  # 13 does not divide 50 or 8
    want = fit_curvature(method, model, CE, X, y, chunk_size=8)
    got = fit_curvature(method, model, CE, loader, chunk_size=8)
    assert rel(got.dense(), want.dense()) < 1e-12
    inv_w, inv_g = want.inverse(Regularization()), got.inverse(Regularization())
    query = (X[:4], y[:4])
    s_want = influence_scores(model, CE, inv_w, train=(X, y), query=query)
    s_got = influence_scores(model, CE, inv_g, train=loader, query=query)
    assert s_got.shape == (4, 50) and rel(s_got, s_want) < 1e-10


def test_batches_are_refused_clearly():
    model, X, y = problem("mlp")
    loader = DataLoader(TensorDataset(X, y), batch_size=16)
    with pytest.raises(TypeError, match="one-shot iterator"):
        fit_curvature("kfac", model, CE, ((X[a : a + 10], y[a : a + 10]) for a in (0, 10)))
    with pytest.raises(TypeError, match="leave y out"):
        fit_curvature("kfac", model, CE, loader, y)
    with pytest.raises(TypeError, match="y .* is missing"):
        fit_curvature("kfac", model, CE, X)
    with pytest.raises(TypeError, match=r"batch 0 is a Tensor, not an \(X, y\) pair"):
        fit_curvature("kfac", model, CE, [X, X, X])
    mixed = [(X[:10], y[:10]), (X[10:20, :4], y[10:20])]
    with pytest.raises(ValueError, match="batch 1 has X"):
        fit_curvature("ggn", model, CE, mixed)
    with pytest.raises(ValueError, match="no batch"):
        fit_curvature("ggn", model, CE, [])
    with pytest.raises(ValueError, match="matrix_free .* needs the training data as tensors"):
        matrix_free("ggn", model, CE, loader, None)

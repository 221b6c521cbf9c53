"""Bad input gets a clear ValueError/TypeError naming the problem, before torch fails."""

from __future__ import annotations

import pytest
import torch
from references import problem
from torch import nn

from curvinf import Regularization, fit_curvature, influence_scores


def test_unknown_method():
    model, loss, X, y = problem("ce")
    with pytest.raises(ValueError, match="unknown method 'foo'.*hessian"):
        fit_curvature("foo", model, loss, X, y)


def test_unknown_fisher():
    model, loss, X, y = problem("ce")
    with pytest.raises(ValueError, match="unknown fisher 'typ2'"):
        fit_curvature("ggn", model, loss, X, y, fisher="typ2")


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_unsupported_layer_is_named(method):
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    X = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    with pytest.raises(TypeError, match=r"layer '1' \(LayerNorm\) is not supported by " + method):
        fit_curvature(method, model, nn.CrossEntropyLoss(), X, y)
    # the unfactored rungs work for any differentiable layer
    assert fit_curvature("block_ggn", model, nn.CrossEntropyLoss(), X, y).num_params == 47


def test_mismatched_lengths():
    model, loss, X, y = problem("ce")
    with pytest.raises(ValueError, match="X has 12 rows but y has 11"):
        fit_curvature("ggn", model, loss, X, y[:-1])


def test_wrong_feature_count():
    model, loss, X, y = problem("ce")
    with pytest.raises(ValueError, match="7 columns but the model's first layer expects 5"):
        fit_curvature("kfac", model, loss, torch.randn(12, 7, dtype=torch.float64), y)


def test_labels_out_of_range_and_wrong_target_shapes():
    model, loss, X, y = problem("ce")
    with pytest.raises(ValueError, match="outside"):
        fit_curvature("ggn", model, loss, X, y + 5)
    with pytest.raises(ValueError, match="1-D integer"):
        fit_curvature("ggn", model, loss, X, y.double())
    model, loss, X, y = problem("mse")
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        fit_curvature("ggn", model, loss, X, y[:, 0])


@pytest.mark.parametrize("where", ["X", "y", "param"])
def test_nan_is_rejected(where):
    model, loss, X, y = problem("mse")
    if where == "X":
        X[3, 1] = float("nan")
    elif where == "y":
        y[0, 0] = float("inf")
    else:
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        fit_curvature("ggn", model, loss, X, y)


def test_unsupported_loss_and_reduction():
    model, _, X, y = problem("ce")
    with pytest.raises(TypeError, match="CrossEntropyLoss or nn.MSELoss"):
        fit_curvature("ggn", model, nn.NLLLoss(), X, y)
    with pytest.raises(ValueError, match="reduction='mean'"):
        fit_curvature("ggn", model, nn.CrossEntropyLoss(reduction="sum"), X, y)


def test_dense_over_budget_names_the_size():
    model, loss, X, y = problem("ce")
    with pytest.raises(ValueError, match=r"dense 59 x 59 float64 matrix \(.*B\), over the memory"):
        fit_curvature("hessian", model, loss, X, y, max_dense_bytes=1000)
    curv = fit_curvature("kfac", model, loss, X, y, max_dense_bytes=1000)  # fits without dense
    with pytest.raises(ValueError, match="59 x 59"):
        curv.dense()


def test_singular_curvature_without_regularization():
    model, loss, X, y = problem("ce", n=2)  # rank <= 2 * 2 < 59
    curv = fit_curvature("ggn", model, loss, X, y)
    with pytest.raises(ValueError, match="singular"):
        curv.inverse(Regularization(damping=0.0, eps=0.0))


def test_apply_shape_and_nan_checks():
    model, loss, X, y = problem("ce")
    inv = fit_curvature("kfac", model, loss, X, y).inverse()
    with pytest.raises(ValueError, match=r"shape \(K, 59\)"):
        inv.apply(torch.zeros(2, 58, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN/inf"):
        inv.apply(torch.full((59,), float("nan"), dtype=torch.float64))
    with pytest.raises(TypeError, match="Regularization"):
        fit_curvature("kfac", model, loss, X, y).inverse(1e-3)


def test_scores_reject_inverse_of_another_model():
    model, loss, X, y = problem("ce")
    other, *_ = problem("ce", width=6)
    inv = fit_curvature("identity", other, loss, X, y).inverse()
    with pytest.raises(ValueError, match="inverse was fitted for"):
        influence_scores(model, loss, inv, train=(X, y), query=(X, y))
    with pytest.raises(TypeError, match="InverseCurvature"):
        influence_scores(model, loss, "kfac", train=(X, y), query=(X, y))

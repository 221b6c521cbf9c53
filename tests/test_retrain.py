"""Batched retraining equals the ordinary training path, model by model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from curvinf.data import load_dataset
from curvinf.lds import make_subsets
from curvinf.losses import example_measure
from curvinf.models import make_mlp
from curvinf.retrain import (
    accuracy_many,
    measure_many,
    mlp_layers,
    stack_params,
    subset_indices,
    subset_recipe,
    train_many,
    unstack_model,
)
from curvinf.training import TrainingRecipe, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: one thread is faster


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits", seed=0)
    return d.X_train[:300], d.y_train[:300], d.X_query[:40], d.y_query[:40]


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max(float((p - q).detach().abs().max()) for p, q in pairs)


@pytest.mark.parametrize("matched_steps", [False, True])
def test_batched_equals_sequential(digits, matched_steps):
    X, y, _, _ = digits
    loss = nn.CrossEntropyLoss()
    model = make_mlp(64, 10, depth=2, width=16, seed=3)
    masks = make_subsets(len(X), num_subsets=3, alpha=0.4, seed=1)
    recipe = subset_recipe(
        TrainingRecipe(epochs=3, batch_size=32), len(X), int(masks[0].sum()), matched_steps
    )
    assert recipe.epochs == (8 if matched_steps else 3)  # ceil(3 * 300 / 120)
    seeds = [11, 12, 13]
    assert mlp_layers(model) is not None  # the fused MLP path
    batched = train_many(model, loss, X, y, recipe, subsets=masks, seeds=seeds)
    idx = subset_indices(masks)
    for k in range(3):
        alone = train(model, loss, X, y, replace(recipe, seed=seeds[k]), subset=idx[k])
        assert _max_diff(alone.model, unstack_model(model, batched.params, k)) < 1e-5
        assert batched.epoch_losses[k].tolist() == pytest.approx(alone.epoch_losses, rel=1e-5)


def test_batched_equals_sequential_with_own_init_and_mse():
    d = load_dataset("diabetes", seed=0)
    X, y = d.train
    loss = nn.MSELoss()
    inits = [make_mlp(10, 1, depth=1, width=8, seed=s) for s in (0, 1)]
    masks = make_subsets(len(X), num_subsets=2, alpha=0.5, seed=0)
    recipe = TrainingRecipe(epochs=2, lr=0.01, weight_decay=1e-3)
    batched = train_many(
        inits[0], loss, X, y, recipe, subsets=masks, seeds=[5, 6], init=stack_params(inits)
    )
    for k in range(2):  # train() takes the boolean mask itself
        alone = train(inits[k], loss, X, y, replace(recipe, seed=5 + k), subset=masks[k])
        assert _max_diff(alone.model, unstack_model(inits[0], batched.params, k)) < 1e-5


def test_measurements_match_per_model_loop(digits):
    X, y, Xq, yq = digits
    loss = nn.CrossEntropyLoss()
    models = [make_mlp(64, 10, depth=1, width=8, seed=s) for s in range(3)]
    params = stack_params(models)
    for measure in ("loss", "margin"):
        got = measure_many(models[0], loss, params, Xq, yq, measure)
        assert got.shape == (3, len(Xq)) and got.dtype == torch.float64
        for k, m in enumerate(models):
            with torch.no_grad():
                f = m(Xq)
            want = torch.stack(
                [example_measure("ce", measure, f[i], yq[i]) for i in range(len(Xq))]
            )
            torch.testing.assert_close(got[k], want.double(), rtol=1e-5, atol=1e-6)
    acc = accuracy_many(models[0], params, Xq, yq)
    with torch.no_grad():
        assert acc[1] == pytest.approx(float((models[1](Xq).argmax(1) == yq).double().mean()))


def test_train_many_rejects_bad_subsets(digits):
    X, y, _, _ = digits
    model, loss, recipe = make_mlp(64, 10, seed=0), nn.CrossEntropyLoss(), TrainingRecipe(epochs=1)
    uneven = torch.zeros(2, len(X), dtype=torch.bool)
    uneven[0, :10], uneven[1, :20] = True, True
    with pytest.raises(ValueError, match="same size"):
        train_many(model, loss, X, y, recipe, subsets=uneven, seeds=[0, 1])
    with pytest.raises(ValueError, match="one seed per model"):
        train_many(model, loss, X, y, recipe, subsets=uneven[:1], seeds=[0, 1])
    with pytest.raises(ValueError, match="empty"):
        empty = torch.zeros(2, len(X), dtype=torch.bool)
        train_many(model, loss, X, y, recipe, subsets=empty, seeds=[0, 1])


class _Wrapped(nn.Module):
    """Not an nn.Sequential: train_many takes its generic vmap(functional_call) path."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _check_equals_train(model, loss, X, y, recipe, num_models=3, subset_seed=1):
    """train_many model by model against train(), weights and per-epoch losses."""
    masks = make_subsets(len(X), num_subsets=num_models, alpha=0.4, seed=subset_seed)
    seeds = [21 + k for k in range(num_models)]
    on_epoch = []
    batched = train_many(
        model, loss, X, y, recipe, subsets=masks, seeds=seeds, on_epoch=on_epoch.append
    )
    assert on_epoch == [num_models] * recipe.epochs
    assert batched.epoch_losses.shape == (num_models, recipe.epochs)
    for k in range(num_models):
        alone = train(model, loss, X, y, replace(recipe, seed=seeds[k]), subset=masks[k])
        assert _max_diff(alone.model, unstack_model(model, batched.params, k)) < 1e-5
        assert batched.epoch_losses[k].tolist() == pytest.approx(alone.epoch_losses, rel=1e-5)


@pytest.mark.parametrize(
    "activation, weight_decay, momentum",
    [("relu", 1e-2, 0.9), ("gelu", 1e-2, 0.9), ("tanh", 0.0, 0.0), ("relu", 5e-3, 0.0)],
)
def test_fused_mlp_path_equals_train(digits, activation, weight_decay, momentum):
    X, y, _, _ = digits
    model = make_mlp(64, 10, depth=2, width=16, activation=activation, seed=4)
    assert mlp_layers(model) is not None
    recipe = TrainingRecipe(epochs=3, batch_size=32, weight_decay=weight_decay, momentum=momentum)
    _check_equals_train(model, nn.CrossEntropyLoss(), X, y, recipe)


def test_fused_mlp_path_other_layouts(digits):
    """No bias, tanh-approximated GELU, an activation on the output, MSE loss."""
    X, _, _, _ = digits
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 12, bias=False),
        nn.GELU(approximate="tanh"),
        nn.Linear(12, 3),
        nn.Tanh(),
    )
    assert mlp_layers(model) is not None
    y = torch.randn(len(X), 3) * 0.5
    recipe = TrainingRecipe(epochs=2, batch_size=40, lr=0.02, weight_decay=1e-3)
    _check_equals_train(model, nn.MSELoss(), X, y, recipe)


def test_generic_path_equals_train(digits):
    X, y, _, _ = digits
    model = _Wrapped(make_mlp(64, 10, depth=2, width=16, seed=5))
    assert mlp_layers(model) is None
    recipe = TrainingRecipe(epochs=3, batch_size=32, weight_decay=1e-2)
    _check_equals_train(model, nn.CrossEntropyLoss(), X, y, recipe)


def test_fused_path_only_for_plain_mlps():
    torch.manual_seed(0)
    assert mlp_layers(make_mlp(4, 2, depth=3, width=5)) is not None
    assert mlp_layers(make_mlp(4, 2, depth=0)) is not None  # a linear model

    class Custom(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    class MyLinear(nn.Linear):
        pass

    assert mlp_layers(Custom(nn.Linear(4, 2))) is None
    assert mlp_layers(nn.Sequential(MyLinear(4, 2))) is None
    assert mlp_layers(nn.Sequential(nn.Linear(4, 3), nn.Dropout(), nn.Linear(3, 2))) is None
    assert mlp_layers(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.ReLU())) is None
    assert mlp_layers(nn.Sequential(nn.ReLU(), nn.Linear(4, 2))) is None
    assert mlp_layers(nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2))) is None
    frozen = make_mlp(4, 2, depth=1, width=3)
    frozen[0].bias.requires_grad_(False)
    assert mlp_layers(frozen) is None
    hooked = make_mlp(4, 2, depth=1, width=3)
    handle = hooked[1].register_forward_hook(lambda m, i, o: o * 2)
    assert mlp_layers(hooked) is None
    handle.remove()
    assert mlp_layers(hooked) is not None
    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, i: None)
    try:
        assert mlp_layers(hooked) is None
    finally:
        handle.remove()


@pytest.mark.parametrize("wrap", [False, True])
def test_train_many_reports_divergence(wrap):
    d = load_dataset("diabetes", seed=0)
    X, y = d.train
    model = make_mlp(10, 1, depth=2, width=8, seed=0)
    model = _Wrapped(model) if wrap else model
    masks = make_subsets(len(X), num_subsets=2, alpha=0.5, seed=0)
    recipe = TrainingRecipe(epochs=20, lr=1e3, momentum=0.9)
    with pytest.raises(FloatingPointError, match=r"model\(s\) \[0, 1\].*lower the learning"):
        train_many(model, nn.MSELoss(), X, y, recipe, subsets=masks, seeds=[0, 1])

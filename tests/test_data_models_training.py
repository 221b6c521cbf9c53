"""Datasets, MLP builder and the training recipe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvinf import TrainingRecipe, load_dataset, make_mlp, num_params, train


def test_digits_split_and_standardisation():
    d = load_dataset("digits", seed=0)
    assert (len(d.X_train), len(d.X_query), d.num_features, d.num_outputs) == (1437, 360, 64, 10)
    assert d.y_train.dtype == torch.int64
    mean, std = d.X_train.mean(0), d.X_train.std(0, unbiased=False)
    assert mean.abs().max() < 1e-5
    assert bool((((std - 1).abs() < 1e-4) | (std == 0)).all())
    again = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=1)
    assert torch.equal(d.X_query, again.X_query) and not torch.equal(d.X_query, other.X_query)


def test_diabetes_is_regression():
    d = load_dataset("diabetes", seed=0, dtype=torch.float64)
    assert d.task == "regression" and d.y_train.shape == (len(d.X_train), 1)
    assert d.y_train.dtype == torch.float64 and d.num_outputs == 1


def test_bad_dataset_arguments():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="query_fraction"):
        load_dataset("digits", query_fraction=1.5)


def test_mlp_shapes_and_parameter_count():
    model = make_mlp(64, 10, depth=8, width=32)
    assert num_params(model) == 9802
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert len(linears) == 9 and all(m.bias is not None for m in linears)
    assert isinstance(make_mlp(3, 2, depth=2, activation="gelu")[1], nn.GELU)
    assert torch.equal(make_mlp(3, 2, seed=4)[0].weight, make_mlp(3, 2, seed=4)[0].weight)
    with pytest.raises(ValueError, match="activation"):
        make_mlp(3, 2, activation="swish")


def test_recipe_validation():
    with pytest.raises(ValueError, match="lr"):
        TrainingRecipe(lr=0)
    with pytest.raises(ValueError, match="momentum"):
        TrainingRecipe(momentum=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainingRecipe(batch_size=0)


def test_training_is_deterministic_and_learns():
    d = load_dataset("digits", seed=0)
    model = make_mlp(64, 10, depth=1, width=16, seed=0)
    recipe = TrainingRecipe(epochs=5, lr=0.05, seed=3)
    a = train(model, nn.CrossEntropyLoss(), *d.train, recipe)
    b = train(model, nn.CrossEntropyLoss(), *d.train, recipe)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert a.epoch_losses[-1] < 0.5 * a.epoch_losses[0]
    c = train(model, nn.CrossEntropyLoss(), *d.train, TrainingRecipe(epochs=5, lr=0.05, seed=4))
    assert not torch.equal(a.model[0].weight, c.model[0].weight)
    # the input model is untouched
    assert torch.equal(model[0].weight, make_mlp(64, 10, depth=1, width=16, seed=0)[0].weight)


def test_training_matches_torch_optim_sgd():
    """The functional SGD step is PyTorch's SGD with momentum and weight decay."""
    d = load_dataset("digits", seed=0)
    X, y = d.X_train[:200], d.y_train[:200]
    model = make_mlp(64, 10, depth=1, width=8, seed=0)
    recipe = TrainingRecipe(epochs=2, lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=50)
    ours = train(model, nn.CrossEntropyLoss(), X, y, recipe).model
    ref = make_mlp(64, 10, depth=1, width=8, seed=0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(recipe.seed)
    for _ in range(2):
        for b in torch.randperm(200, generator=gen).split(50):
            opt.zero_grad()
            nn.functional.cross_entropy(ref(X[b]), y[b]).backward()
            opt.step()
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_training_regression_and_subset():
    d = load_dataset("diabetes", seed=0)
    model = make_mlp(10, 1, depth=1, width=8, seed=0)
    res = train(model, nn.MSELoss(), *d.train, TrainingRecipe(epochs=3, lr=0.01), subset=[0, 1, 2])
    assert len(res.epoch_losses) == 3
    with pytest.raises(ValueError, match="empty"):
        train(model, nn.MSELoss(), *d.train, TrainingRecipe(epochs=1), subset=[])


def test_divergence_is_reported():
    d = load_dataset("diabetes", seed=0)
    model = make_mlp(10, 1, depth=2, width=8, seed=0)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train(model, nn.MSELoss(), *d.train, TrainingRecipe(epochs=20, lr=1e3, momentum=0.9))

"""The hardening catalogue (issue 9), library side: every case is a clear error or a correct
number checked against an independent reference (tests/references.py).

Store and command-line cases live in tests/test_hardening_store_cli.py; save/load in
tests/test_persistence.py. Cases that already behaved well and stay covered elsewhere:
NaN/inf in X, y and parameters, shape and label mismatches, unknown names, unsupported
layers named (tests/test_validation.py); wrong loss reductions and label smoothing
(tests/test_validation.py); singular curvature without regularisation
(tests/test_inverse.py, tests/test_validation.py); memory caps (tests/test_validation.py,
tests/test_gram.py); solver non-convergence (tests/test_solvers.py); store SIGKILL,
corruption, concurrency and other-config isolation (tests/test_groundtruth.py).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from references import problem, ref_ggn, ref_hessian
from torch import nn

import curvinf
from curvinf import (
    Regularization,
    TrainingRecipe,
    TruncationWarning,
    fit_curvature,
    influence_scores,
    per_example_grads,
    top_k,
    train,
)
from curvinf.curvature import matrix_free
from curvinf.curvature.layers import UnfactorableModelError
from curvinf.lds import lds as lds_function
from curvinf.progress import progress_bar
from curvinf.retrain import train_many
from curvinf.training import DivergenceWarning

CE = nn.CrossEntropyLoss()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def data(n: int = 24, F_: int = 8, C: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, F_, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    return X, y


def brute_scores(model, X, y, reg: Regularization, C: torch.Tensor) -> torch.Tensor:
    """``G C⁺ Gᵀ`` with per-example gradients from torch.func (all trainable parameters)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss_one(p, x, t):
        out = torch.func.functional_call(model, p, (x[None],))
        return F.cross_entropy(out, t[None])

    g = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, X, y)
    G = torch.cat([g[n].reshape(len(X), -1) for n in names], dim=1)
    lam, U = torch.linalg.eigh(C)
    shifted = lam + reg.damping
    inv = torch.where(shifted > reg.eps, 1 / shifted, torch.zeros_like(shifted))
    return G @ (U * inv) @ U.T @ G.T


# ---------------------------------------------------------------- 1. fast routes prove the model


class SkipSeq(nn.Sequential):
    def forward(self, x):
        return self[2](self[1](self[0](x)) + x)


class ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward: not the layer the factors assume."""

    def forward(self, x):
        return 2.0 * super().forward(x)


class Tied(nn.Module):
    """A layer called as a module *and* used through F.linear (weight tying)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(F.linear(h, self.inp.weight)))


class Functional(nn.Module):
    """Linear weights used only through F.linear: no layer hook ever fires."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.inp.weight, self.inp.bias))
        return F.linear(h, self.out.weight, self.out.bias)


def seeded(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    return model.double()


ODD_MODELS = {
    "skip-sequential": lambda: SkipSeq(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)),
    "linear-subclass": lambda: nn.Sequential(ScaledLinear(8, 8), nn.Tanh(), nn.Linear(8, 3)),
    "tied-weights": Tied,
    "f-linear": Functional,
}


@pytest.mark.parametrize("name", list(ODD_MODELS))
@pytest.mark.parametrize("method", ["hessian", "ggn", "block_ggn"])
def test_fast_routes_refuse_models_they_do_not_describe(name, method):
    """Issue case 1 (SkipSeq: 0.79 relative error before): exact numbers on every odd model."""
    model = seeded(ODD_MODELS[name]())
    X, y = data()
    got = fit_curvature(method, model, CE, X, y).dense()
    ref = ref_hessian(model, "ce", X, y) if method == "hessian" else ref_ggn(model, "ce", X, y)
    if method == "block_ggn":
        ref = ref * fit_curvature("block_ggn", model, CE, X, y).dense().ne(0)
    assert rel(got, ref) < 1e-10


def test_the_issue_skip_sequential_hessian_matches_matrix_free():
    torch.manual_seed(0)
    X, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    m = SkipSeq(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    fast = fit_curvature("hessian", m, CE, X, y).dense()
    assert rel(fast, matrix_free("hessian", m, CE, X, y).dense()) < 1e-12


@pytest.mark.parametrize("name", list(ODD_MODELS))
def test_per_example_gradients_of_odd_models_equal_vmap(name):
    model = seeded(ODD_MODELS[name]())
    X, y = data()
    G = per_example_grads(model, CE, X, y)
    params = dict(model.named_parameters())

    def loss_one(p, x, t):
        return F.cross_entropy(torch.func.functional_call(model, p, (x[None],)), t[None])

    g = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, X, y)
    ref = torch.cat([g[n].reshape(len(X), -1) for n in params], dim=1)
    assert rel(G, ref) < 1e-12


@pytest.mark.parametrize(
    "name, phrase",
    [
        ("linear-subclass", r"layer '0' \(ScaledLinear\) is not supported by kfac"),
        ("tied-weights", "also used outside its own call"),
        ("f-linear", "was not called in the forward pass"),
    ],
)
def test_kronecker_rungs_refuse_models_they_do_not_describe(name, phrase):
    model = seeded(ODD_MODELS[name]())
    X, y = data()
    with pytest.raises(UnfactorableModelError, match=phrase) as err:
        fit_curvature("kfac", model, CE, X, y)
    assert isinstance(err.value, TypeError) and "block_ggn" in str(err.value)


@pytest.mark.parametrize("name", ["tied-weights", "f-linear", "skip-sequential"])
def test_scores_of_odd_models_equal_brute_force(name):
    model = seeded(ODD_MODELS[name]())
    X, y = data()
    reg = Regularization(damping=1e-2, eps=0.0)
    inv = fit_curvature("ggn", model, CE, X, y).inverse(reg)
    got = influence_scores(model, CE, inv, train=(X, y), query=(X[:5], y[:5]))
    ref = brute_scores(model, X, y, reg, ref_ggn(model, "ce", X, y))[:5]
    assert rel(got, ref) < 1e-9


def test_batch_coupled_model_is_not_factored():
    """An example's output depends on the batch: per-layer factors refuse; dense rungs work."""

    class Centered(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            return self.lin(x - x.mean(0, keepdim=True))

    model = seeded(Centered())
    X, y = data()
    with pytest.raises(UnfactorableModelError, match="changes with the rest of the batch"):
        fit_curvature("kfac", model, CE, X, y)


def test_root_module_parameters_are_named_as_the_root():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 3, dtype=torch.float64))

        def forward(self, x):
            return x @ self.w

    X, y = data()
    with pytest.raises(TypeError, match=r"the root module \(Root\) is not supported by kfac"):
        fit_curvature("kfac", Root(), CE, X, y)
    assert fit_curvature("block_ggn", Root(), CE, X, y).num_params == 24


# ---------------------------------------------------------------- 2. train-mode modules


def dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).double()


def test_train_mode_dropout_gives_the_eval_mode_numbers_everywhere():
    model = dropout_model()
    X, y = data()
    model.train()
    reg = Regularization(damping=1e-2, eps=0.0)
    inv = fit_curvature("ggn", model, CE, X, y).inverse(reg)
    a = influence_scores(model, CE, inv, train=(X, y), query=(X[:4], y[:4]))
    b = influence_scores(model, CE, inv, train=(X, y), query=(X[:4], y[:4]))
    assert torch.equal(a, b)
    assert model.training  # untouched
    model.eval()
    c = influence_scores(model, CE, inv, train=(X, y), query=(X[:4], y[:4]))
    assert torch.equal(a, c)
    assert rel(a, brute_scores(model, X, y, reg, ref_ggn(model, "ce", X, y))[:4]) < 1e-9
    G_train = per_example_grads(model.train(), CE, X, y)
    assert torch.equal(G_train, per_example_grads(model.eval(), CE, X, y))


def test_train_warns_for_train_mode_dropout_and_batchnorm_and_trains_the_eval_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    X, y = data()
    X = X.float()
    with pytest.warns(UserWarning, match=r"module\(s\) 1 are in train mode"):
        res = train(model, CE, X, y, TrainingRecipe(epochs=3, batch_size=8))
    assert res.model.training  # the mode the model was passed in is kept
    assert res.epoch_losses[-1] < res.epoch_losses[0]
    # the eval function was trained: BatchNorm's running statistics were not updated
    assert torch.equal(res.model[1].running_mean, torch.zeros(16))


# ---------------------------------------------------------------- 3. frozen parameters


def frozen_model(whole_layer: bool = False) -> nn.Module:
    """The first layer's weight frozen (and its bias, with ``whole_layer``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model[0].weight.requires_grad_(False)
    if whole_layer:
        model[0].bias.requires_grad_(False)
    return model


def test_train_keeps_frozen_parameters_frozen():
    model = frozen_model()
    X, y = data()
    before = model[0].weight.detach().clone()
    res = train(model, CE, X, y, TrainingRecipe(epochs=2, batch_size=8))
    assert torch.equal(res.model[0].weight, before)
    assert not torch.equal(res.model[2].weight, model[2].weight)
    assert not res.model[0].weight.requires_grad


def test_retraining_keeps_frozen_parameters_frozen():
    model = frozen_model()
    X, y = data()
    out = train_many(
        model,
        CE,
        X,
        y,
        TrainingRecipe(epochs=2, batch_size=8),
        subsets=torch.ones(2, len(X), dtype=torch.bool),
        seeds=[0, 1],
    )
    assert "0.weight" not in out.params and "2.weight" in out.params


@pytest.mark.parametrize("whole_layer", [False, True], ids=["weight", "layer"])
@pytest.mark.parametrize("method", ["hessian", "ggn", "block_ggn", "kfac", "diag_ggn"])
def test_curvature_covers_the_trainable_parameters_only(method, whole_layer):
    model = frozen_model(whole_layer)
    X, y = data()
    if method == "kfac" and not whole_layer:
        with pytest.raises(UnfactorableModelError, match="frozen weight but a trainable bias"):
            fit_curvature(method, model, CE, X, y)
        return
    curv = fit_curvature(method, model, CE, X, y)
    keep = torch.arange(48 + 6 * whole_layer, 75)  # after the frozen 6 x 8 weight (and bias)
    assert curv.num_params == len(keep) == curvinf.num_params(model)
    full = ref_hessian(model, "ce", X, y) if method == "hessian" else ref_ggn(model, "ce", X, y)
    ref = full[keep][:, keep]
    if method == "hessian" or method == "ggn":
        assert rel(curv.dense(), ref) < 1e-10
    elif method == "diag_ggn":
        assert rel(curv.dense().diagonal(), ref.diagonal()) < 1e-10
    G = per_example_grads(model, CE, X, y)
    assert G.shape == (len(X), len(keep))


def test_scores_with_frozen_parameters_equal_brute_force():
    model = frozen_model(whole_layer=True)
    X, y = data()
    reg = Regularization(damping=1e-2, eps=0.0)
    keep = torch.arange(54, 75)
    for method in ("ggn", "ekfac"):
        inv = fit_curvature(method, model, CE, X, y).inverse(reg)
        got = influence_scores(model, CE, inv, train=(X, y), query=(X[:3], y[:3]))
        if method == "ggn":
            C = ref_ggn(model, "ce", X, y)[keep][:, keep]
            assert rel(got, brute_scores(model, X, y, reg, C)[:3]) < 1e-9
        else:  # the Kronecker scoring route equals the generic one
            inv_apply = inv.apply(per_example_grads(model, CE, X[:3], y[:3]))
            ref = inv_apply @ per_example_grads(model, CE, X, y).T
            assert rel(got, ref) < 1e-10


def test_no_trainable_parameters_is_a_clear_error():
    model = frozen_model().requires_grad_(False)
    X, y = data()
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit_curvature("ggn", model, CE, X, y)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, CE, X, y, TrainingRecipe(epochs=1))


# ---------------------------------------------------------------- shapes from running the model


def test_conv_front_end_after_unflatten_is_accepted():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)
    ).double()
    X, y = data(F_=16)
    curv = fit_curvature("ggn", model, CE, X, y)
    assert rel(curv.dense(), ref_ggn(model, "ce", X, y)) < 1e-10
    res = train(model.float(), CE, X.float(), y, TrainingRecipe(epochs=1, batch_size=8))
    assert len(res.epoch_losses) == 1


def test_head_registered_before_the_input_layer_is_accepted():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(6, 3)
            self.inp = nn.Linear(8, 6)

        def forward(self, x):
            return self.head(torch.relu(self.inp(x)))

    model = seeded(HeadFirst())
    X, y = data()
    assert rel(fit_curvature("ggn", model, CE, X, y).dense(), ref_ggn(model, "ce", X, y)) < 1e-10
    res = train(model, CE, X, y, TrainingRecipe(epochs=1, batch_size=8))
    assert res.final_loss > 0


def test_wrong_features_name_the_data_and_the_failure():
    model, loss, X, y = problem("ce")
    with pytest.raises(ValueError, match=r"cannot be applied to query X of shape \(3, 7\)"):
        inv = fit_curvature("ggn", model, loss, X, y).inverse()
        influence_scores(model, loss, inv, train=(X, y), query=(torch.randn(3, 7).double(), y[:3]))


# ---------------------------------------------------------------- train(): clear errors


def test_train_model_without_parameters():
    X, y = data()
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(nn.Identity(), CE, X[:, :3], y, TrainingRecipe(epochs=1))


def test_train_float16_model_with_float32_data():
    X, y = data()
    model = nn.Sequential(nn.Linear(8, 3)).half()
    with pytest.raises(ValueError, match="parameters are float16 but X is float32"):
        train(model, CE, X.float(), y, TrainingRecipe(epochs=1))


def test_train_sequence_outputs_need_one_label_per_position():
    X, y = data()
    model = nn.Sequential(nn.Unflatten(1, (2, 4)), nn.Linear(4, 3)).double()  # (N, 2, 3)
    with pytest.raises(ValueError, match=r"shape \(N, 2\), one per position"):
        train(model, CE, X, y, TrainingRecipe(epochs=1))


def test_train_warns_when_the_loss_explodes():
    X, y = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        with pytest.raises((DivergenceWarning, FloatingPointError), match="diverg"):
            train(
                model,
                nn.MSELoss(),
                X,
                torch.randn(len(X), 3).double() * 10,
                TrainingRecipe(lr=5.0, momentum=0.9, epochs=30, batch_size=8),
            )


# ---------------------------------------------------------------- numbers are validated


@pytest.mark.parametrize(
    "kwargs, error, phrase",
    [
        (dict(epochs=1.5), TypeError, "epochs must be an integer"),
        (dict(batch_size=2.5), TypeError, "batch_size must be an integer"),
        (dict(epochs=0), ValueError, "epochs must be >= 1"),
        (dict(lr=math.inf), ValueError, "lr must be a finite number"),
        (dict(lr=math.nan), ValueError, "lr must be a finite number"),
        (dict(lr=0.0), ValueError, "lr must be > 0"),
        (dict(momentum=1.0), ValueError, r"momentum must lie in \[0, 1\)"),
        (dict(weight_decay=-1.0), ValueError, "weight_decay must be >= 0"),
        (dict(seed=True), TypeError, "seed must be an integer"),
    ],
)
def test_training_recipe_numbers(kwargs, error, phrase):
    with pytest.raises(error, match=phrase):
        TrainingRecipe(**kwargs)


@pytest.mark.parametrize("cap", [math.nan, 0.0, -1.0, math.inf])
def test_max_dense_bytes_must_be_a_positive_number(cap):
    model, loss, X, y = problem("ce")
    with pytest.raises(ValueError, match="max_dense_bytes must be"):
        fit_curvature("ggn", model, loss, X, y, max_dense_bytes=cap)


@pytest.mark.parametrize("chunk", [0, -1, 2.5])
def test_chunk_sizes_are_validated(chunk):
    model, loss, X, y = problem("ce")
    inv = fit_curvature("identity", model, loss, X, y).inverse()
    error = TypeError if isinstance(chunk, float) else ValueError
    with pytest.raises(error, match="chunk_size must be"):
        influence_scores(model, loss, inv, train=(X, y), query=(X, y), chunk_size=chunk)
    with pytest.raises(error, match="chunk_size must be"):
        fit_curvature("kfac", model, loss, X, y, chunk_size=chunk)
    with pytest.raises(error, match="chunk_size must be"):
        per_example_grads(model, loss, X, y, chunk_size=chunk)


# ---------------------------------------------------------------- devices


def test_meta_device_model_and_data_are_refused():
    model, loss, X, y = problem("ce")
    with pytest.raises(ValueError, match="meta device"):
        fit_curvature("ggn", model.to("meta"), loss, X, y)
    model, loss, X, y = problem("ce")
    with pytest.raises(ValueError, match="meta device"):
        fit_curvature("ggn", model, loss, X.to("meta"), y)
    with pytest.raises(ValueError, match="meta device"):
        train(problem("ce")[0].to("meta"), loss, X, y, TrainingRecipe(epochs=1))


# ---------------------------------------------------------------- messages


def test_block_memory_cap_does_not_suggest_block_ggn():
    model, loss, X, y = problem("ce")
    with pytest.raises(ValueError, match="memory budget") as err:
        fit_curvature("block_ggn", model, loss, X, y, max_dense_bytes=100.0)
    msg = str(err.value)
    assert "partition='tensor'" in msg and "(block_ggn" not in msg


def test_nan_in_apply_does_not_talk_about_fitting():
    model, loss, X, y = problem("ce")
    inv = fit_curvature("diag_ggn", model, loss, X, y).inverse()
    V = torch.full((2, inv.num_params), math.nan, dtype=torch.float64)
    with pytest.raises(ValueError, match="V contains") as err:
        inv.apply(V)
    assert "fitting" not in str(err.value)


# ---------------------------------------------------------------- the default regulariser


def test_default_regulariser_is_damping_with_a_guard_and_paper_rule_is_explicit():
    assert Regularization() == Regularization(damping=1e-3, eps=1e-4, relative=False)
    assert Regularization.paper() == Regularization(damping=0.0, eps=1e-4)
    assert not Regularization().truncates_nonnegative()
    assert Regularization.paper().truncates_nonnegative()


def test_an_inverse_that_keeps_almost_nothing_warns():
    """A well-trained model's small spectrum (top eigenvalue ~2e-3, as on breast cancer)."""
    from curvinf.curvature.dense import DiagonalCurvature

    top = torch.linspace(2e-4, 2e-3, 14, dtype=torch.float64)
    rest = torch.linspace(1e-7, 5e-5, 1044, dtype=torch.float64)
    curv = DiagonalCurvature("diag_ggn", torch.cat([top, rest]), 1e9)
    with pytest.warns(TruncationWarning, match=r"keeps 14 of 1,058 eigen-directions \(1.3%\)"):
        paper = curv.inverse(Regularization.paper())
    assert paper.rank == 14
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncationWarning)
        default = curv.inverse()
    assert default.rank == 1058


# ---------------------------------------------------------------- progress


def test_progress_is_on_by_default_and_appears_only_for_slow_work(monkeypatch, capsys):
    import inspect

    from curvinf.curvature import FitSettings

    assert FitSettings().progress is True  # fit_curvature and matrix_free
    assert inspect.signature(influence_scores).parameters["progress"].default is True
    monkeypatch.setenv("CURVINF_PROGRESS", "1")
    with progress_bar(10, "quick work", True, delay=60.0) as advance:
        advance(10)
    assert "quick work" not in capsys.readouterr().out
    with progress_bar(10, "slow work", True, delay=0.0) as advance:
        advance(10)
    assert "slow work" in capsys.readouterr().out
    monkeypatch.setenv("CURVINF_PROGRESS", "0")
    with progress_bar(10, "silenced", True, delay=0.0) as advance:
        advance(10)
    assert "silenced" not in capsys.readouterr().out


# ---------------------------------------------------------------- small things


def test_top_k_is_argsort():
    g = torch.Generator().manual_seed(0)
    S = torch.randn(4, 50, generator=g, dtype=torch.float64)
    vals, idx = top_k(S, 5)
    assert torch.equal(idx, S.argsort(dim=1, descending=True)[:, :5])
    assert torch.equal(vals, S.gather(1, idx))
    vals, idx = top_k(S, 3, largest=False)
    assert torch.equal(idx, S.argsort(dim=1)[:, :3])
    with pytest.raises(ValueError, match="exceeds the 50 training points"):
        top_k(S, 51)


def test_constant_ground_truth_suggests_margin():
    masks = torch.rand(20, 30, generator=torch.Generator().manual_seed(0)) < 0.5
    truth = torch.zeros(20, 4)
    truth[:, 0] = torch.arange(20.0)
    scores = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="measure='margin'"):
        res = lds_function(scores, masks, truth, num_bootstrap=0)
    assert res.constant_queries == [1, 2, 3] and "measure='margin'" in str(res)


def test_package_names_do_not_shadow_modules():
    import importlib
    import pkgutil
    import types

    assert curvinf.lds.make_subsets is not None
    for info in pkgutil.iter_modules(curvinf.__path__):
        attr = getattr(curvinf, info.name, None)
        if attr is not None:
            assert isinstance(attr, types.ModuleType), info.name
            assert attr is importlib.import_module(f"curvinf.{info.name}")


# ---------------------------------------------------------------- cases that already behaved well


def test_indefinite_hessian_under_too_little_damping():
    model, loss, X, y = problem("ce", act="tanh")
    curv = fit_curvature("hessian", model, loss, X, y)
    lam_min = float(curv.eigenvalues()[0])
    assert lam_min < 0
    with pytest.raises(ValueError, match="singular or indefinite"):
        curv.inverse(Regularization(damping=-lam_min / 2, eps=0.0))
    inv = curv.inverse(Regularization(damping=-2 * lam_min, eps=0.0))
    assert inv.rank == curv.num_params


@pytest.mark.parametrize("where", ["train X", "query X", "query y"])
def test_inf_anywhere_in_scoring_inputs(where):
    model, loss, X, y = problem("mse")
    inv = fit_curvature("identity", model, loss, X, y).inverse()
    Xq, yq = X.clone(), y.clone()
    Xt = X.clone()
    {"train X": Xt, "query X": Xq, "query y": yq}[where][0, 0] = math.inf
    with pytest.raises(ValueError, match="NaN/inf"):
        influence_scores(model, loss, inv, train=(Xt, y), query=(Xq, yq))


# ---------------------------------------------------------------- the sweep's settings


@pytest.mark.parametrize(
    "kwargs, error, phrase",
    [
        (dict(num_queries=True), TypeError, "num_queries must be an integer"),
        (dict(depth=1.5), TypeError, "depth must be an integer"),
        (dict(subsets=1), ValueError, "subsets must be >= 2"),
        (dict(max_dense_gib=math.nan), ValueError, "max_dense_gib must be a finite number"),
        (dict(max_dense_gib=0.0), ValueError, "max_dense_gib must be > 0"),
        (dict(lr=math.inf), ValueError, "lr must be a finite number"),
    ],
)
def test_sweep_settings_numbers(kwargs, error, phrase):
    from curvinf.study.sweep import SweepSettings

    with pytest.raises(error, match=phrase):
        SweepSettings(**kwargs)


def test_sweep_refuses_more_queries_than_the_data_has(tmp_path):
    from curvinf.study.sweep import SweepSettings, run_sweep

    with pytest.raises(ValueError, match="has 360 query points"):
        run_sweep(SweepSettings(num_queries=361, subsets=2), tmp_path / "sweep", progress=False)
    assert not (tmp_path / "sweep" / "groundtruth").exists()

"""Models beyond (N, F) -> (N, C): images, integer tokens, per-position outputs, MSE on any
shape, and the models torch.func cannot trace.

References are built here from torch.func alone (``hessian``, ``jacrev``, ``grad``,
``vmap``) on the flat parameter vector, with the per-example loss written out
independently: per-position cross-entropy as the mean over positions, MSE as the mean
over every output entry.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from references import block_diag_of, flat_fn
from torch import nn
from torch.func import grad, hessian, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvinf import (
    Regularization,
    TrainingRecipe,
    fit_curvature,
    influence_scores,
    per_example_grads,
    train,
)
from curvinf.curvature import Gram, matrix_free
from curvinf.losses import output_hessian, output_sqrt
from curvinf.tracing import UntraceableModelError

CE, MSE = nn.CrossEntropyLoss(), nn.MSELoss()
REG = Regularization(damping=1e-2, eps=0.0)


# ---------------------------------------------------------------- models and data


class TinyCNN(nn.Module):
    """Conv2d on (N, 1, 8, 8) images -> (N, 3) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, stride=2)
        self.head = nn.Linear(18, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class TokenModel(nn.Module):
    """Integer tokens (N, T) -> per-position outputs (N, T, out); positions interact."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.head = nn.Linear(3, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.emb(x))
        return self.head(h + h.mean(1, keepdim=True))


def unflatten_mlp() -> nn.Module:
    """``nn.Linear`` layers only, (N, 4) -> (N, 3, 2): the Linear fast routes."""
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6), nn.Unflatten(1, (3, 2)))


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.7)
    return model.double().eval()


def case(name: str):
    """``(model, loss, X, y)`` of a named problem, float64, tiny."""
    g = torch.Generator().manual_seed(1)
    if name == "cnn-ce":
        X = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
        return seeded(TinyCNN()), CE, X, torch.randint(0, 3, (6,), generator=g)
    if name == "tokens-ce":
        X = torch.randint(0, 5, (5, 4), generator=g)
        return seeded(TokenModel(3)), CE, X, torch.randint(0, 3, (5, 4), generator=g)
    if name == "tokens-mse":
        X = torch.randint(0, 5, (5, 4), generator=g)
        return seeded(TokenModel(2)), MSE, X, torch.randn(5, 4, 2, generator=g, dtype=torch.float64)
    if name == "unflatten-mse":
        X = torch.randn(6, 4, generator=g, dtype=torch.float64)
        y = torch.randn(6, 3, 2, generator=g, dtype=torch.float64)
        return seeded(unflatten_mlp()), MSE, X, y
    raise ValueError(name)


CASES = ["cnn-ce", "tokens-ce", "tokens-mse", "unflatten-mse"]


# ---------------------------------------------------------------- independent references


def ref_example_loss(loss: nn.Module, out_n: torch.Tensor, y_n: torch.Tensor) -> torch.Tensor:
    """One example: CE averaged over its positions (classes last); MSE over all entries."""
    if isinstance(loss, nn.CrossEntropyLoss):
        return F.cross_entropy(out_n.reshape(-1, out_n.shape[-1]), y_n.reshape(-1))
    return ((out_n - y_n) ** 2).sum() / out_n.numel()


def ref_mean_loss(loss, out, y):
    return torch.stack([ref_example_loss(loss, out[n], y[n]) for n in range(len(out))]).mean()


def ref_hessian(model, loss, X, y) -> torch.Tensor:
    f, theta = flat_fn(model)
    return hessian(lambda t: ref_mean_loss(loss, f(t, X), y))(theta)


def ref_ggn(model, loss, X, y) -> torch.Tensor:
    """``1/N Σ J_nᵀ (∂²ℓ_n/∂f²) J_n`` over flattened outputs, each factor by torch.func."""
    f, theta = flat_fn(model)
    G = torch.zeros(len(theta), len(theta), dtype=torch.float64)
    for n in range(len(X)):
        out_n = f(theta, X[n : n + 1])[0].detach()
        J = jacrev(lambda t, n=n: f(t, X[n : n + 1])[0].reshape(-1))(theta)
        H = hessian(lambda o, n=n, s=out_n.shape: ref_example_loss(loss, o.reshape(s), y[n]))(
            out_n.reshape(-1)
        )
        G += J.T @ H @ J
    return G / len(X)


def ref_grads(model, loss, X, y, measure=None) -> torch.Tensor:
    """Per-example gradients (N, D) by vmap(grad) of the reference loss (or ``measure``)."""
    f, theta = flat_fn(model)
    ell = measure or (lambda o, t: ref_example_loss(loss, o, t))
    return vmap(grad(lambda t, x, yy: ell(f(t, x[None])[0], yy)), in_dims=(None, 0, 0))(theta, X, y)


def module_blocks(model: nn.Module) -> list[slice]:
    out, start = [], 0
    for m in model.modules():
        size = sum(p.numel() for p in m.parameters(recurse=False))
        if size:
            out.append(slice(start, start + size))
            start += size
    return out


def brute_scores(Gq: torch.Tensor, Gt: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    return Gq @ torch.linalg.solve(C + REG.damping * torch.eye(len(C), dtype=C.dtype), Gt.T)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- exact rungs and scores


@pytest.mark.parametrize("name", CASES)
def test_exact_rungs_dense_and_matrix_free_match_torch_func(name):
    model, loss, X, y = case(name)
    H, G = ref_hessian(model, loss, X, y), ref_ggn(model, loss, X, y)
    BG = block_diag_of(G, module_blocks(model))
    for method, ref in (("hessian", H), ("ggn", G), ("block_ggn", BG)):
        assert rel(fit_curvature(method, model, loss, X, y).dense(), ref) < 1e-10, method
        assert rel(matrix_free(method, model, loss, X, y).dense(), ref) < 1e-10, method
    assert X.dtype == case(name)[2].dtype  # integer tokens stay integer, inputs untouched


@pytest.mark.parametrize("name", CASES)
def test_per_example_grads_and_scores_match_brute_force(name):
    model, loss, X, y = case(name)
    Gref = ref_grads(model, loss, X, y)
    assert rel(per_example_grads(model, loss, X, y), Gref) < 1e-12
    G = ref_ggn(model, loss, X, y)
    want = brute_scores(Gref[:3], Gref, G)
    inv = fit_curvature("ggn", model, loss, X, y).inverse(REG)
    got = influence_scores(model, loss, inv, train=(X, y), query=(X[:3], y[:3]))
    assert rel(got, want) < 1e-9
    gram = matrix_free("ggn", model, loss, X, y).inverse(REG, solver=Gram())
    assert rel(influence_scores(model, loss, gram, train=(X, y), query=(X[:3], y[:3])), want) < 1e-9
    V = torch.randn(2, len(G), dtype=torch.float64)
    C_inv = torch.linalg.inv(G + REG.damping * torch.eye(len(G), dtype=torch.float64))
    assert rel(gram.apply(V), V @ C_inv) < 1e-9


def test_block_ggn_through_gram_on_per_position_outputs():
    model, loss, X, y = case("tokens-ce")
    BG = block_diag_of(ref_ggn(model, loss, X, y), module_blocks(model))
    inv = matrix_free("block_ggn", model, loss, X, y).inverse(REG, solver=Gram())
    V = torch.randn(3, len(BG), dtype=torch.float64)
    want = V @ torch.linalg.inv(BG + REG.damping * torch.eye(len(BG), dtype=torch.float64))
    assert rel(inv.apply(V), want) < 1e-9


def test_margin_measure_is_the_mean_over_positions():
    model, loss, X, y = case("tokens-ce")

    def margin(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # o (T, C), t (T,)
        rows = torch.arange(len(t))
        correct = o[rows, t]
        mask = torch.arange(o.shape[-1])[None, :] == t[:, None]
        others = torch.where(mask, torch.full_like(o, -1e300), o).amax(-1)
        return -(correct - others).mean()

    want = ref_grads(model, loss, X, y, measure=margin)
    assert rel(per_example_grads(model, loss, X, y, measure="margin"), want) < 1e-12


def test_empirical_fisher_on_positions_is_scaled_by_sqrt_T():
    """``Q = √T ∇_f ℓ``: the empirical GGN is ``T/N Σ g_n g_nᵀ`` of the loss gradients."""
    model, loss, X, y = case("tokens-ce")
    Gref = ref_grads(model, loss, X, y)
    want = X.shape[1] * Gref.T @ Gref / len(X)
    assert rel(fit_curvature("ggn", model, loss, X, y, fisher="empirical").dense(), want) < 1e-10


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_mc_roots_match_the_output_hessian_in_expectation(kind):
    """Sampled roots of per-position outputs average to ∂²ℓ/∂f² (not 1/T of it)."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1, 3, 4, generator=g, dtype=torch.float64).expand(4000, 3, 4)
    y = torch.randint(0, 4, (4000, 3)) if kind == "ce" else torch.zeros(4000, 3, 4).double()
    Q = output_sqrt(kind, "mc", f, y, mc_samples=10, generator=g)
    H = output_hessian(kind, f[:1])
    assert Q.shape == (4000, 12, 10) and H.shape == (1, 12, 12)
    assert rel((Q @ Q.transpose(1, 2)).mean(0, keepdim=True), H) < 0.05
    T2 = output_sqrt(kind, "type2", f[:1], y[:1])
    assert rel(T2 @ T2.transpose(1, 2), H) < 1e-12


def test_kfac_on_linear_layers_with_multi_dim_outputs_is_exact_for_one_example():
    model, loss, X, y = case("unflatten-mse")
    kfac = fit_curvature("kfac", model, loss, X[:1], y[:1]).dense()
    assert rel(kfac, fit_curvature("block_ggn", model, loss, X[:1], y[:1]).dense()) < 1e-10


def test_kronecker_scores_on_multi_dim_outputs_match_their_inverse():
    """The Kronecker scoring route (per-layer factors of flattened output gradients) equals
    reference gradients times the fitted inverse."""
    model, loss, X, y = case("unflatten-mse")
    inv = fit_curvature("ekfac", model, loss, X, y).inverse(REG)
    Gref = ref_grads(model, loss, X, y)
    want = Gref[:3] @ inv.dense() @ Gref.T
    got = influence_scores(model, loss, inv, train=(X, y), query=(X[:3], y[:3]))
    assert rel(got, want) < 1e-9


def test_kronecker_rungs_refuse_layers_they_cannot_factor():
    """An Embedding has no adapter: refused by default (tests/test_weight_sharing.py covers
    the ``uncovered=`` choices and the Conv2d adapter, which the CNN here now goes through)."""
    model, loss, X, y = case("tokens-ce")
    for method in ("kfac", "ekfac"):
        with pytest.raises(TypeError, match=rf"\(Embedding\) is not supported by {method}"):
            fit_curvature(method, model, loss, X, y)
    cnn = case("cnn-ce")
    assert fit_curvature("kfac", *cnn).num_params == sum(p.numel() for p in cnn[0].parameters())


def test_train_takes_integer_tokens_and_per_position_labels():
    model, loss, X, y = case("tokens-ce")
    res = train(model, loss, X, y, TrainingRecipe(epochs=3, batch_size=len(X), lr=0.1))
    f, theta = flat_fn(model)
    assert math.isclose(res.epoch_losses[0], float(ref_mean_loss(loss, f(theta, X), y)))
    assert res.epoch_losses[-1] < res.epoch_losses[0]


def test_targets_that_do_not_fit_the_outputs_are_refused():
    model, loss, X, y = case("tokens-ce")
    with pytest.raises(ValueError, match=r"shape \(N, 4\), one per position"):
        fit_curvature("ggn", model, loss, X, y[:, 0])
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        per_example_grads(model, loss, X, y + 3)
    model, loss, X, y = case("tokens-mse")
    with pytest.raises(ValueError, match=r"MSELoss must be a float tensor of shape \(N, 4, 2\)"):
        fit_curvature("ggn", model, loss, X, y.reshape(5, 8))


# ---------------------------------------------------------------- models torch.func cannot trace


class GRUModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(x))[0])


class AlwaysTrainBN(nn.BatchNorm1d):
    """A BatchNorm that ignores ``.eval()`` (keeps updating its running statistics)."""

    def train(self, mode: bool = True) -> AlwaysTrainBN:
        return super().train(True)


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(x)


class NoJvpTanh(torch.autograd.Function):
    """tanh with a backward but no forward-mode rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (t,) = ctx.saved_tensors
        return g * (1 - t * t)


class NoJvpAct(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NoJvpTanh.apply(x)


def float_data(n: int = 6):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 3, (n,), generator=g)


def test_gru_is_refused_naming_the_module_and_the_cell_to_use():
    model, _, X, y = case("tokens-ce")
    model = seeded(GRUModel())
    for call in (
        lambda: fit_curvature("ggn", model, CE, X, y),
        lambda: per_example_grads(model, CE, X, y),
    ):
        with pytest.raises(UntraceableModelError, match=r"module 'rnn' \(GRU\).*nn\.GRUCell"):
            call()


def test_batchnorm_kept_in_training_or_on_batch_statistics_is_refused():
    X, y = float_data()
    for bn, why in (
        (AlwaysTrainBN(5), "stays in training mode"),
        (nn.BatchNorm1d(5, track_running_stats=False), "track_running_stats=False"),
    ):
        model = seeded(nn.Sequential(nn.Linear(4, 5), bn, nn.Linear(5, 3)))
        with pytest.raises(UntraceableModelError, match=rf"module '1' \(\w+\) .*{why}"):
            fit_curvature("hessian", model, CE, X, y)
        with pytest.raises(UntraceableModelError, match="module '1'"):
            per_example_grads(model, CE, X, y)


def test_batchnorm_in_train_mode_with_running_statistics_uses_the_eval_function():
    """A model passed in train mode is differentiated in eval mode (its running statistics)."""
    X, y = float_data()
    model = seeded(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)))
    model[1].running_mean.normal_()
    want = ref_hessian(model.eval(), CE, X, y)
    assert rel(fit_curvature("hessian", model.train(), CE, X, y).dense(), want) < 1e-10


def test_in_place_buffer_update_is_refused_naming_the_module():
    X, y = float_data()
    model = seeded(nn.Sequential(Counter()))
    for method in ("hessian", "ggn"):  # the Linear-factor routes never trace: ggn is fine
        with pytest.raises(UntraceableModelError, match=r"module '0' \(Counter\).*in place"):
            matrix_free(method, model, CE, X, y).matvec(torch.ones(15, dtype=torch.float64))
    with pytest.raises(UntraceableModelError, match=r"module '0' \(Counter\).*in place"):
        fit_curvature("hessian", model, CE, X, y)


def test_missing_forward_mode_rule_is_refused_for_the_hessian_but_not_the_dense_ggn():
    X, y = float_data()
    model = seeded(nn.Sequential(nn.Linear(4, 5), NoJvpAct(), nn.Linear(5, 3)))
    with pytest.raises(UntraceableModelError, match=r"module '1' \(NoJvpAct\).*forward-mode"):
        fit_curvature("hessian", model, CE, X, y)
    with pytest.raises(UntraceableModelError, match=r"module '1' \(NoJvpAct\)"):
        matrix_free("ggn", model, CE, X, y).matvec(torch.ones(43, dtype=torch.float64))
    ref = ref_ggn(seeded(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))), CE, X, y)
    assert rel(fit_curvature("ggn", model, CE, X, y).dense(), ref) < 1e-10


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.enc = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)))


def autograd_hessian(model, loss, X, y) -> torch.Tensor:
    """Row by row by double backward (torch.autograd), for models where torch.func's own
    ``hessian`` is off: on this transformer it misses ~9% of the Hessian in the rows of the
    LayerNorm weights (torch 2.13), which central differences below expose."""
    f, theta = flat_fn(model)
    t = theta.clone().requires_grad_(True)
    g = torch.autograd.grad(ref_mean_loss(loss, f(t, X), y), t, create_graph=True)[0]
    return torch.stack([torch.autograd.grad(g[i], t, retain_graph=True)[0] for i in range(len(t))])


def test_transformer_encoder_layer_hessian_and_ggn_products_match_references():
    """The fused CPU attention has no forward-mode rule; curvinf runs the math kernel."""
    model, _, X, y = case("tokens-ce")
    model = seeded(TinyTransformer())
    f, theta = flat_fn(model)

    def loss_grad(th: torch.Tensor) -> torch.Tensor:
        t = th.clone().requires_grad_(True)
        return torch.autograd.grad(ref_mean_loss(CE, f(t, X), y), t)[0]

    with sdpa_kernel([SDPBackend.MATH]):  # the references need it too
        H, G = autograd_hessian(model, CE, X, y), ref_ggn(model, CE, X, y)
        names = [n for n, _ in model.named_parameters()]
        norm1 = sum(p.numel() for p in list(model.parameters())[: names.index("enc.norm1.weight")])
        for i in (0, norm1, len(theta) - 1):  # an embedding, a LayerNorm weight, the head bias
            e = torch.zeros_like(theta)
            e[i] = 1e-5
            fd = (loss_grad(theta + e) - loss_grad(theta - e)) / 2e-5
            assert rel(H[i], fd) < 1e-6
    assert rel(fit_curvature("hessian", model, CE, X, y).dense(), H) < 1e-10
    assert rel(matrix_free("hessian", model, CE, X, y).matvec(H[:3]), H[:3] @ H) < 1e-10
    V = torch.randn(3, len(G), dtype=torch.float64)
    assert rel(matrix_free("ggn", model, CE, X, y).matvec(V), V @ G) < 1e-10
    assert rel(fit_curvature("ggn", model, CE, X, y).dense(), G) < 1e-10

"""Influence scores: brute force, the sign convention, chunking, measurements."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from references import flat_fn, problem, ref_loss

from curvinf import Regularization, fit_curvature, influence_scores, make_mlp, per_example_grads


def per_example_reference(model, kind, X, y, measure="loss") -> torch.Tensor:
    f, theta = flat_fn(model)

    def meas(t, n):
        out = f(t, X[n : n + 1])
        if measure == "loss":
            return ref_loss(kind, out, y[n : n + 1])
        z = out[0]
        others = torch.cat([z[: y[n]], z[y[n] + 1 :]])
        return -(z[y[n]] - others.max())

    return torch.stack([torch.func.grad(meas)(theta, n) for n in range(len(X))])


@pytest.mark.parametrize("method", ["hessian", "ggn", "block_ggn", "ekfac", "kfac", "identity"])
def test_scores_equal_brute_force(kind, method):
    model, loss, X, y = problem(kind, n=16, act="tanh")
    Xq, yq = X[:5] + 0.1, y[:5]
    inv = fit_curvature(method, model, loss, X, y).inverse(Regularization(damping=1e-3, eps=1e-6))
    scores = influence_scores(model, loss, inv, train=(X, y), query=(Xq, yq))
    Gq = per_example_reference(model, kind, Xq, yq)
    Gt = per_example_reference(model, kind, X, y)
    expected = Gq @ inv.dense() @ Gt.T
    assert scores.shape == (5, 16)
    assert torch.allclose(scores, expected, rtol=1e-9, atol=1e-12)


def test_margin_measure_brute_force():
    model, loss, X, y = problem("ce", n=10, act="tanh")
    inv = fit_curvature("ggn", model, loss, X, y).inverse(Regularization(damping=1e-2, eps=0))
    scores = influence_scores(
        model, loss, inv, train=(X, y), query=(X[:4], y[:4]), measure="margin"
    )
    Gq = per_example_reference(model, "ce", X[:4], y[:4], measure="margin")
    Gt = per_example_reference(model, "ce", X, y)
    assert torch.allclose(scores, Gq @ inv.dense() @ Gt.T, rtol=1e-9, atol=1e-12)


def test_margin_needs_classification():
    model, loss, X, y = problem("mse", n=6)
    inv = fit_curvature("identity", model, loss, X, y).inverse()
    with pytest.raises(ValueError, match="margin"):
        influence_scores(model, loss, inv, train=(X, y), query=(X, y), measure="margin")


def test_chunked_equals_unchunked(kind):
    model, loss, X, y = problem(kind, n=23, act="tanh")
    inv = fit_curvature("ekfac", model, loss, X, y).inverse(Regularization(damping=1e-3))
    a = influence_scores(model, loss, inv, train=(X, y), query=(X[:9], y[:9]), chunk_size=4)
    b = influence_scores(model, loss, inv, train=(X, y), query=(X[:9], y[:9]), chunk_size=1000)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def _fit_weighted(model, X, y, weights, damping, steps=200):
    """argmin_θ Σ_n w_n ℓ_n(θ) / N + δ/2 ‖θ‖², by L-BFGS in float64 from the model's weights."""
    f, theta0 = flat_fn(model)
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1,
        max_iter=steps,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        losses = F.cross_entropy(f(theta, X), y, reduction="none")
        obj = (weights * losses).sum() / len(X) + 0.5 * damping * theta.pow(2).sum()
        obj.backward()
        return obj

    for _ in range(5):
        opt.step(closure)
    return theta.detach(), f


def test_sign_and_size_match_actual_upweighting():
    """Upweight training example m by ε and re-solve: Δ query loss ≈ −ε · score[q, m] / N."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    Xq = torch.randn(3, 5, generator=g, dtype=torch.float64)
    yq = torch.randint(0, 3, (3,), generator=g)
    damping, eps = 1e-2, 1e-3
    model = make_mlp(5, 3, depth=0, seed=0, dtype=torch.float64)  # convex: linear softmax
    theta, f = _fit_weighted(model, X, y, torch.ones(40, dtype=torch.float64), damping)
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(theta[offset : offset + p.numel()].reshape(p.shape))
            offset += p.numel()
    loss = torch.nn.CrossEntropyLoss()
    inv = fit_curvature("hessian", model, loss, X, y).inverse(Regularization(damping, eps=0.0))
    scores = influence_scores(model, loss, inv, train=(X, y), query=(Xq, yq))
    for m in (0, 7, 21):
        w = torch.ones(40, dtype=torch.float64)
        w[m] += eps
        theta_eps, _ = _fit_weighted(model, X, y, w, damping)
        q_before = F.cross_entropy(f(theta, Xq), yq, reduction="none")
        q_after = F.cross_entropy(f(theta_eps, Xq), yq, reduction="none")
        predicted = -(eps / len(X)) * scores[:, m]
        assert torch.allclose(q_after - q_before, predicted, rtol=2e-2, atol=1e-9)


def test_duplicate_of_query_scores_positive():
    """A training copy of the query helps it: positive self-influence under any PSD rung."""
    model, loss, X, y = problem("ce", n=20, act="tanh")
    for method in ("identity", "ggn", "kfac"):
        inv = fit_curvature(method, model, loss, X, y).inverse(Regularization(damping=1e-3))
        scores = influence_scores(model, loss, inv, train=(X, y), query=(X, y))
        assert bool((torch.diag(scores) > 0).all())


def test_float32_model_scores_agree_with_float64(kind):
    model, loss, X, y = problem(kind, n=12, act="tanh")
    inv = fit_curvature("kfac", model, loss, X, y).inverse(Regularization(damping=1e-2))
    s64 = influence_scores(model, loss, inv, train=(X, y), query=(X[:3], y[:3]))
    y32 = y.float() if kind == "mse" else y
    m32 = model.float()
    s32 = influence_scores(m32, loss, inv, train=(X.float(), y32), query=(X[:3].float(), y32[:3]))
    assert s32.dtype == torch.float64
    assert torch.allclose(s32, s64, rtol=1e-4, atol=1e-6)


def test_gradient_scores_is_the_generic_route_of_influence_scores():
    from curvinf.curvature import CG, matrix_free
    from curvinf.influence import gradient_scores

    model, loss, X, y = problem("ce")
    reg = Regularization(damping=1e-2, eps=0.0)
    Gq = per_example_grads(model, loss, X[:4], y[:4])
    Gt = per_example_grads(model, loss, X, y)
    for inv in (
        fit_curvature("block_ggn", model, loss, X, y).inverse(reg),
        matrix_free("ggn", model, loss, X, y).inverse(reg, solver=CG(tol=1e-12)),
    ):
        ref = influence_scores(model, loss, inv, train=(X, y), query=(X[:4], y[:4]))
        got = gradient_scores(inv, Gq, Gt, chunk_size=3)
        assert float((got - ref).norm() / ref.norm()) < 1e-9


@pytest.mark.parametrize("method", ["hessian", "ggn", "ekfac", "kfac"])
def test_self_influence_is_the_diagonal_of_brute_force_scores(kind, method):
    from torch.utils.data import DataLoader, TensorDataset

    from curvinf import self_influence

    model, loss, X, y = problem(kind, n=16, act="tanh")
    inv = fit_curvature(method, model, loss, X, y).inverse(Regularization(damping=1e-3, eps=1e-6))
    s = self_influence(model, loss, inv, train=(X, y), chunk_size=5, progress=False)
    G = per_example_reference(model, kind, X, y)
    expected = torch.einsum("nd,de,ne->n", G, inv.dense(), G)
    assert s.shape == (16,) and s.dtype == torch.float64
    torch.testing.assert_close(s, expected, rtol=1e-9, atol=1e-12)
    loader = DataLoader(TensorDataset(X, y), batch_size=6)
    torch.testing.assert_close(
        self_influence(model, loss, inv, train=loader, progress=False), s, rtol=1e-12, atol=0
    )
    with pytest.raises(TypeError, match="InverseCurvature"):
        self_influence(model, loss, inv.dense(), train=(X, y))


@pytest.mark.parametrize("method", ["ggn", "ekfac"])
def test_top_k_influences_stream_to_the_top_k_of_all_scores(kind, method):
    from torch.utils.data import DataLoader, TensorDataset

    from curvinf import top_k, top_k_influences

    model, loss, X, y = problem(kind, n=30, act="tanh")
    Xq, yq = X[:6] + 0.1, y[:6]
    inv = fit_curvature(method, model, loss, X, y).inverse(Regularization(damping=1e-3, eps=1e-6))
    scores = influence_scores(model, loss, inv, train=(X, y), query=(Xq, yq), progress=False)
    for largest in (True, False):
        want_v, want_i = top_k(scores, k=4, largest=largest)
        for train in ((X, y), DataLoader(TensorDataset(X, y), batch_size=8)):
            v, i = top_k_influences(model, loss, inv, train=train, query=(Xq, yq), k=4,
                                    largest=largest, chunk_size=5, progress=False)  # fmt: skip
            assert torch.equal(i, want_i)
            torch.testing.assert_close(v, want_v, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="exceeds the 30"):
        top_k_influences(model, loss, inv, train=(X, y), query=(Xq, yq), k=31)

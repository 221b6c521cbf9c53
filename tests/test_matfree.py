"""Matrix-free Hessian/GGN products equal the dense rungs' products (float64, small models)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvinf import Regularization, fit_curvature, influence_scores, make_mlp
from curvinf.curvature import CG, MatrixFreeCurvature, matrix_free

N, F, C = 24, 4, 3


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, F, generator=g)
    y_ce = torch.randint(0, C, (N,), generator=g)
    y_mse = torch.randn(N, C, generator=g)
    model = make_mlp(F, C, depth=2, width=6, activation="tanh", seed=1)
    return model, X, y_ce, y_mse


def _targets(problem, kind):
    model, X, y_ce, y_mse = problem
    return (nn.CrossEntropyLoss(), y_ce) if kind == "ce" else (nn.MSELoss(), y_mse)


@pytest.mark.parametrize(
    ("method", "fisher"),
    [
        ("hessian", "type2"),
        ("ggn", "type2"),
        ("ggn", "mc"),
        ("ggn", "empirical"),
        ("block_hessian", "type2"),
        ("block_ggn", "type2"),
        ("block_ggn", "mc"),
    ],
)
def test_products_equal_dense_rungs(problem, kind, method, fisher):
    model, X, *_ = problem
    loss, y = _targets(problem, kind)
    kw = dict(fisher=fisher, mc_samples=2, seed=3, chunk_size=10)
    dense = fit_curvature(method, model, loss, X, y, **kw).dense()
    mf = matrix_free(method, model, loss, X, y, vector_chunk=4, **kw)
    assert isinstance(mf, MatrixFreeCurvature)
    V = torch.randn(
        6, mf.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(mf.matvec(V), V @ dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mf.matvec(V[0]), V[0] @ dense, rtol=1e-10, atol=1e-12)
    assert mf.products == 7


def test_dense_and_exact_inverse_of_matrix_free(problem):
    model, X, y, _ = problem
    loss = nn.CrossEntropyLoss()
    ref = fit_curvature("ggn", model, loss, X, y)
    mf = matrix_free("ggn", model, loss, X, y)
    torch.testing.assert_close(mf.dense(), ref.dense(), rtol=1e-10, atol=1e-12)
    reg = Regularization(eps=1e-4)
    torch.testing.assert_close(
        mf.inverse(reg).dense(), ref.inverse(reg).dense(), rtol=1e-7, atol=1e-8
    )


def test_rows_give_the_subset_curvature(problem):
    model, X, y, _ = problem
    loss = nn.CrossEntropyLoss()
    rows = torch.tensor([0, 3, 5, 11, 20])
    mf = matrix_free("hessian", model, loss, X, y, chunk_size=2)
    ref = fit_curvature("hessian", model, loss, X[rows], y[rows]).dense()
    V = torch.randn(3, mf.num_params, dtype=torch.float64)
    torch.testing.assert_close(mf.matvec(V, rows=rows), V @ ref, rtol=1e-10, atol=1e-12)


def test_float32_products_are_close(problem):
    model, X, y, _ = problem
    loss = nn.CrossEntropyLoss()
    V = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    a = matrix_free("ggn", model, loss, X, y).matvec(V)
    b = matrix_free("ggn", model, loss, X, y, dtype=torch.float32).matvec(V)
    assert b.dtype == torch.float64
    assert float((a - b).norm() / a.norm()) < 1e-5


def test_cg_scores_equal_dense_scores(problem):
    model, X, y, _ = problem
    loss = nn.CrossEntropyLoss()
    reg = Regularization(damping=1e-2, eps=0.0)
    want = influence_scores(
        model,
        loss,
        fit_curvature("ggn", model, loss, X, y).inverse(reg),
        train=(X, y),
        query=(X[:5], y[:5]),
    )
    inv = matrix_free("ggn", model, loss, X, y).inverse(reg, solver=CG(tol=1e-10))
    got = influence_scores(model, loss, inv, train=(X, y), query=(X[:5], y[:5]))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    assert inv.last_report.all_converged and len(inv.last_report.iterations) == 5


def test_bad_arguments_say_what_to_do(problem):
    model, X, y, _ = problem
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="unknown method"):
        matrix_free("kfac", model, loss, X, y)
    with pytest.raises(ValueError, match="dtype"):
        matrix_free("ggn", model, loss, X, y, dtype=torch.float16)
    with pytest.raises(ValueError, match="vector_chunk"):
        matrix_free("ggn", model, loss, X, y, vector_chunk=0)
    mf = matrix_free("ggn", model, loss, X, y, max_dense_bytes=100)
    with pytest.raises(ValueError, match="memory budget"):
        mf.dense()
    with pytest.raises(ValueError, match="shape"):
        mf.matvec(torch.ones(2, 3, dtype=torch.float64))


def test_smallest_eigenvalue_of_the_hessian_matches_the_dense_spectrum():
    from references import problem, ref_hessian

    from curvinf.curvature.krylov import smallest_eigenvalue

    model, loss, X, y = problem("ce", n=40, width=12, act="tanh")  # D = 267
    H = ref_hessian(model, "ce", X, y)
    lam = float(torch.linalg.eigvalsh(H)[0])
    curv = matrix_free("hessian", model, loss, X, y)
    assert curv.num_params > 120  # Lanczos sees a subspace, not the whole space
    theta, res = smallest_eigenvalue(curv, progress=False)
    assert lam <= theta + 1e-12  # a Ritz value bounds λ_min from above
    assert abs(theta - lam) <= max(res, 1e-10) and res < 1e-6  # found the bottom here
    short, short_res = smallest_eigenvalue(curv, steps=3, progress=False)
    assert short >= lam - 1e-12 and short_res > res  # fewer steps: a looser estimate

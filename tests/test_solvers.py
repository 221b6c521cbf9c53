"""Iterative inverses equal the dense regularised inverse within their stated tolerance."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from curvinf import Regularization, fit_curvature, influence_scores, make_mlp
from curvinf.curvature import (
    CG,
    ConvergenceError,
    Lanczos,
    LiSSA,
    Preconditioned,
    matrix_free,
)
from curvinf.curvature.dense import DenseCurvature
from curvinf.curvature.solvers import power_iteration
from curvinf.params import ParamBlock

D = 40


def synthetic(evals: torch.Tensor, seed: int = 0) -> DenseCurvature:
    """``U diag(evals) Uᵀ`` with a seeded random orthogonal ``U``, as a dense rung."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=g, dtype=torch.float64))
    C = (U * evals) @ U.T
    d = len(evals)
    return DenseCurvature(
        "ggn", d, [(ParamBlock("all", torch.arange(d), ()), 0.5 * (C + C.T))], 1e9
    )


@pytest.fixture(scope="module")
def psd() -> DenseCurvature:
    """Rank-deficient PSD curvature: 30 eigenvalues in [1e-3, 2], 10 zeros."""
    return synthetic(torch.cat([torch.logspace(-3, 0.3, 30), torch.zeros(10)]).double())


def rhs(k: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(k, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def cond(curv, reg) -> float:
    e = curv.eigenvalues() + reg.damping
    return float(e.max() / e.min())


def test_cg_equals_dense_damped_inverse(psd):
    reg = Regularization(damping=1e-2, eps=0.0)
    V = rhs()
    V[2] = 0.0  # a zero right-hand side is answered by zero, converged
    inv = psd.inverse(reg, solver=CG(tol=1e-9))
    X, rep = inv.solve(V)
    want = V @ psd.inverse(reg).dense()
    assert rel_err(X, want) <= cond(psd, reg) * 1e-9
    assert rep.all_converged and bool((rep.residual <= 1e-9).all())
    assert rep.iterations[2] == 0 and float(X[2].abs().max()) == 0.0
    assert rep.history.shape[1] == 5 and rep.solver == "cg"
    torch.testing.assert_close(inv.dense(), psd.inverse(reg).dense(), rtol=1e-6, atol=1e-6)


def test_cg_refuses_truncation(psd):
    with pytest.raises(ValueError, match="cannot truncate"):
        psd.inverse(Regularization(damping=0.0, eps=1e-4), solver=CG())


def test_cg_that_cannot_converge_says_so(psd):
    reg = Regularization(damping=1e-6, eps=0.0)
    with pytest.raises(ConvergenceError, match="hit the iteration cap") as err:
        psd.inverse(reg, solver=CG(tol=1e-10, max_iter=3)).apply(rhs())
    assert not err.value.report.converged.any()
    inv = psd.inverse(reg, solver=CG(tol=1e-10, max_iter=3, on_failure="warn"))
    with pytest.warns(RuntimeWarning, match="did not converge"):
        inv.apply(rhs())
    assert inv.last_report.iterations.max() == 3


def test_cg_reports_indefinite_breakdown():
    curv = synthetic(torch.linspace(-1.0, 1.0, D).double())
    with pytest.raises(ConvergenceError, match="not positive definite"):
        curv.inverse(Regularization(damping=0.0, eps=0.0), solver=CG()).apply(rhs())


def test_lissa_equals_dense_within_tolerance(psd):
    reg = Regularization(damping=0.2, eps=0.0)
    inv = psd.inverse(reg, solver=LiSSA(tol=1e-8, max_iter=5000))
    X, rep = inv.solve(rhs())
    assert rep.all_converged
    assert rel_err(X, rhs() @ psd.inverse(reg).dense()) <= cond(psd, reg) * 1e-8


def test_lissa_with_too_small_scale_reports_divergence(psd):
    reg = Regularization(damping=0.2, eps=0.0)
    with pytest.raises(ConvergenceError, match="diverged"):
        psd.inverse(reg, solver=LiSSA(scale=0.5, max_iter=2000)).apply(rhs())


def test_stochastic_lissa_needs_matrix_free(psd):
    with pytest.raises(ValueError, match="matrix-free"):
        psd.inverse(Regularization(damping=0.2, eps=0), solver=LiSSA(batch_size=4)).apply(rhs())


def test_lanczos_top_k_match_dense_spectrum(psd):
    inv = psd.inverse(Regularization(damping=1e-2, eps=0), solver=Lanczos(k=8, max_iter=D))
    top = psd.eigenvalues().flip(0)[:8]
    torch.testing.assert_close(inv.ritz_values, top, rtol=1e-8, atol=1e-10)
    assert inv.report.all_converged


def test_lanczos_full_space_equals_dense_pseudo_inverse(psd):
    reg = Regularization.paper()  # eps=1e-4, no damping
    inv = psd.inverse(reg, solver=Lanczos(k=D, max_iter=D))
    want = psd.inverse(reg).dense()
    assert rel_err(inv.dense(), want) < 1e-8
    assert inv.rank == psd.inverse(reg).rank == 30


def test_lanczos_complement_is_damped_as_eigenvalue_zero(psd):
    reg = Regularization(damping=1e-2, eps=0.0)
    inv = psd.inverse(reg, solver=Lanczos(k=8, max_iter=D))
    U = inv.U
    evals = psd.eigenvalues().flip(0)[:8]
    want = (U / (evals + 1e-2)) @ U.T + (torch.eye(D, dtype=torch.float64) - U @ U.T) / 1e-2
    torch.testing.assert_close(inv.dense(), want, rtol=1e-8, atol=1e-8)
    zero = psd.inverse(reg, solver=Lanczos(k=8, max_iter=D, complement="zero"))
    torch.testing.assert_close(zero.dense(), (U / (evals + 1e-2)) @ U.T, rtol=1e-8, atol=1e-8)


def test_lanczos_unconverged_pairs_are_reported(psd):
    with pytest.raises(ConvergenceError, match="Ritz pairs"):
        psd.inverse(Regularization.paper(), solver=Lanczos(k=8, max_iter=9, tol=1e-10))


def _preconditioner(psd, seed=5):
    """A rough inverse: the dense inverse of a perturbed curvature."""
    g = torch.Generator().manual_seed(seed)
    E = 0.05 * torch.randn(D, D, generator=g, dtype=torch.float64)
    rough = DenseCurvature(
        "ggn", D, [(ParamBlock("all", torch.arange(D), ()), psd.dense() + E @ E.T)], 1e9
    )
    return rough.inverse(Regularization(damping=1e-2, eps=0.0))


@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_preconditioned_starts_at_preconditioner_and_converges(psd, method):
    reg = Regularization(damping=1e-2, eps=0.0)
    P = _preconditioner(psd)
    V = rhs()
    first = psd.inverse(
        reg,
        solver=Preconditioned(preconditioner=P, iteration=method, max_iter=0, on_failure="warn"),
    )
    with pytest.warns(RuntimeWarning):
        torch.testing.assert_close(first.apply(V), P.apply(V), rtol=0, atol=0)
    step = 1.0
    if method == "neumann":
        step = 1.0 / (1.05 * power_iteration(lambda W: P.apply(psd.matvec(W) + 1e-2 * W), D, 50))
    inv = psd.inverse(
        reg,
        solver=Preconditioned(
            preconditioner=P, iteration=method, step=step, tol=1e-9, max_iter=5000
        ),
    )
    X, rep = inv.solve(V)
    assert rep.all_converged
    assert rel_err(X, V @ psd.inverse(reg).dense()) <= cond(psd, reg) * 1e-9
    assert rep.solver == f"custom-{method}"


def test_settings_are_validated():
    with pytest.raises(ValueError, match="tol"):
        CG(tol=0)
    with pytest.raises(ValueError, match="max_iter"):
        CG(max_iter=-1)
    with pytest.raises(ValueError, match="on_failure"):
        CG(on_failure="ignore")
    with pytest.raises(ValueError, match="k must"):
        Lanczos(k=0)
    with pytest.raises(ValueError, match="scale"):
        LiSSA(scale=-1.0)
    with pytest.raises(ValueError, match="iteration"):
        Preconditioned(iteration="gmres")
    with pytest.raises(TypeError, match="preconditioner"):
        Preconditioned(preconditioner=3)
    with pytest.raises(TypeError, match="solver"):
        synthetic(torch.ones(3).double()).inverse(Regularization(), solver="cg")


# ---------------------------------------------------------------- on a model, matrix-free


@pytest.fixture(scope="module")
def model_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 4, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)
    model = make_mlp(4, 3, depth=2, width=6, activation="tanh", seed=2)
    return model, nn.CrossEntropyLoss(), X, y


def test_ekfac_preconditioned_first_iterate_is_ekfac_and_converges_to_exact(model_problem):
    model, loss, X, y = model_problem
    reg = Regularization(damping=5e-2, eps=0.0)
    mf = matrix_free("ggn", model, loss, X, y)
    ekfac = fit_curvature("ekfac", model, loss, X, y).inverse(reg)
    V = torch.randn(3, mf.num_params, dtype=torch.float64)
    with pytest.warns(RuntimeWarning):
        first = mf.inverse(reg, solver=Preconditioned(max_iter=0, on_failure="warn")).apply(V)
    torch.testing.assert_close(first, ekfac.apply(V), rtol=1e-12, atol=1e-12)
    inv = mf.inverse(reg, solver=Preconditioned(tol=1e-8))
    want = V @ fit_curvature("ggn", model, loss, X, y).inverse(reg).dense()
    assert rel_err(inv.apply(V), want) < 1e-6
    assert inv.last_report.all_converged


@pytest.mark.slow
def test_solver_inverses_work_in_influence_scores(model_problem):
    model, loss, X, y = model_problem
    reg = Regularization(damping=5e-2, eps=0.0)
    want = influence_scores(
        model,
        loss,
        fit_curvature("block_ggn", model, loss, X, y).inverse(reg),
        train=(X, y),
        query=(X[:4], y[:4]),
    )
    mf = matrix_free("block_ggn", model, loss, X, y)
    for solver in (CG(tol=1e-10), Preconditioned(tol=1e-10)):
        got = influence_scores(
            model, loss, mf.inverse(reg, solver), train=(X, y), query=(X[:4], y[:4])
        )
        assert rel_err(got, want) < 1e-6, solver
    paper = Regularization.paper()
    lz = mf.inverse(paper, solver=Lanczos(k=mf.num_params, max_iter=mf.num_params))
    want_p = influence_scores(
        model,
        loss,
        fit_curvature("block_ggn", model, loss, X, y).inverse(paper),
        train=(X, y),
        query=(X[:4], y[:4]),
    )
    got_p = influence_scores(model, loss, lz, train=(X, y), query=(X[:4], y[:4]))
    assert rel_err(got_p, want_p) < 1e-6


@pytest.mark.slow
def test_stochastic_lissa_runs_and_reports_full_residual(model_problem):
    model, loss, X, y = model_problem
    mf = matrix_free("ggn", model, loss, X, y)
    inv = mf.inverse(
        Regularization(damping=0.5, eps=0),
        solver=LiSSA(batch_size=10, max_iter=200, tol=1e-3, on_failure="warn"),
    )
    V = torch.randn(2, mf.num_params, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        X_ = inv.apply(V)
    assert torch.isfinite(X_).all() and torch.isfinite(inv.last_report.residual).all()


def test_lanczos_finds_every_copy_of_a_repeated_eigenvalue():
    """One start vector reaches one direction per distinct eigenvalue; the restart on an
    invariant subspace must find the rest (found by the contract test: MSE blocks A ⊗ I)."""
    from curvinf.curvature.krylov import lanczos

    evals = torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)).double())
    C = Q @ torch.diag(evals) @ Q.T
    U, theta, res, steps = lanczos(lambda V: V @ C, 6, 6, progress=False)
    assert torch.allclose(theta, evals, atol=1e-12)
    assert torch.allclose(U.T @ U, torch.eye(6, dtype=torch.float64), atol=1e-12)
    assert float(res.max()) < 1e-10

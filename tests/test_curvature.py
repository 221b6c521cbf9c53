"""Every rung's dense matrix against independent float64 references."""

from __future__ import annotations

import pytest
import torch
from references import (
    block_diag_of,
    layer_slices,
    matrix_to_flat_perm,
    problem,
    ref_ggn,
    ref_hessian,
)

from curvinf import fit_curvature


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_hessian_matches_torch_func(kind, act):
    model, loss, X, y = problem(kind, act=act)
    H = fit_curvature("hessian", model, loss, X, y, chunk_size=5).dense()
    assert rel(H, ref_hessian(model, kind, X, y)) < 1e-8


@pytest.mark.parametrize("fisher", ["type2", "empirical"])
def test_ggn_matches_jacobian_reference(kind, fisher):
    model, loss, X, y = problem(kind, act="tanh")
    G = fit_curvature("ggn", model, loss, X, y, fisher=fisher, chunk_size=5).dense()
    assert rel(G, ref_ggn(model, kind, X, y, fisher)) < 1e-8


@pytest.mark.parametrize("method,ref", [("block_ggn", "ggn"), ("block_hessian", "hessian")])
def test_block_rungs_are_slices_of_the_dense_reference(kind, method, ref):
    model, loss, X, y = problem(kind, act="tanh")
    full = ref_ggn(model, kind, X, y) if ref == "ggn" else ref_hessian(model, kind, X, y)
    B = fit_curvature(method, model, loss, X, y).dense()
    assert rel(B, block_diag_of(full, layer_slices(model))) < 1e-8


def test_tensor_partition_blocks(kind):
    model, loss, X, y = problem(kind, act="tanh")
    full = ref_ggn(model, kind, X, y)
    sizes = [p.numel() for p in model.parameters()]
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    B = fit_curvature("block_ggn", model, loss, X, y, partition="tensor").dense()
    assert rel(B, block_diag_of(full, slices)) < 1e-8


def test_diag_ggn_is_the_ggn_diagonal(kind):
    model, loss, X, y = problem(kind, act="tanh")
    d = fit_curvature("diag_ggn", model, loss, X, y).dense()
    assert rel(d, torch.diag(torch.diag(ref_ggn(model, kind, X, y)))) < 1e-8


def test_identity_is_identity(kind):
    model, loss, X, y = problem(kind)
    D = sum(p.numel() for p in model.parameters())
    assert torch.equal(fit_curvature("identity", model, loss, X, y).dense(), torch.eye(D).double())


def test_relu_block_hessian_equals_block_ggn(kind):
    """Each layer of a ReLU MLP is linear in its own weights: no within-block residual."""
    model, loss, X, y = problem(kind, act="relu", n=20)
    Bh = fit_curvature("block_hessian", model, loss, X, y).dense()
    Bg = fit_curvature("block_ggn", model, loss, X, y).dense()
    assert rel(Bh, Bg) < 1e-8
    # ... while the full Hessian and GGN differ (cross-layer residual).
    H = fit_curvature("hessian", model, loss, X, y).dense()
    G = fit_curvature("ggn", model, loss, X, y).dense()
    assert rel(H, G) > 1e-3


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_kronecker_rungs_exact_for_one_example(kind, method):
    model, loss, X, y = problem(kind, n=1, act="tanh")
    C = fit_curvature(method, model, loss, X, y, fisher="type2").dense()
    target = block_diag_of(ref_ggn(model, kind, X, y), layer_slices(model))
    assert rel(C, target) < 1e-8


def test_kfac_factors_match_their_definition(kind):
    """A = mean ã ãᵀ of layer inputs; S ⊗ A reproduces the K-FAC block."""
    model, loss, X, y = problem(kind, n=9, act="tanh")
    curv = fit_curvature("kfac", model, loss, X, y)
    with torch.no_grad():
        h = X
        first = curv.factors[0].A
        a = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], dim=1)
        assert rel(first, a.T @ a / len(a)) < 1e-12
    dense = curv.dense()
    for fac, s, lin in zip(curv.factors, layer_slices(model), _linears(model), strict=True):
        perm = matrix_to_flat_perm(lin.out_features, lin.in_features)
        block_in_matrix_order = dense[s, s][perm][:, perm]
        assert rel(block_in_matrix_order, torch.kron(fac.S, fac.A)) < 1e-10


def _linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_ekfac_eigenvalues_are_block_ggn_diagonal_in_kronecker_basis(kind):
    model, loss, X, y = problem(kind, n=15, act="tanh")
    curv = fit_curvature("ekfac", model, loss, X, y)
    G = ref_ggn(model, kind, X, y)
    for (_, U_S, _, U_A), ev, s, lin in zip(
        curv.bases, curv.corrected_evals, layer_slices(model), _linears(model), strict=True
    ):
        perm = matrix_to_flat_perm(lin.out_features, lin.in_features)
        Gl = G[s, s][perm][:, perm]
        U = torch.kron(U_S, U_A)
        expected = torch.diag(U.T @ Gl @ U).reshape(lin.out_features, lin.in_features + 1)
        assert rel(ev, expected) < 1e-8


@pytest.mark.parametrize("fisher", ["type2", "empirical", "mc"])
def test_ekfac_never_farther_from_block_ggn_than_kfac(kind, fisher):
    model, loss, X, y = problem(kind, n=30, act="tanh", width=6)
    kw = dict(fisher=fisher, mc_samples=4, seed=3)
    B = fit_curvature("block_ggn", model, loss, X, y, **kw).dense()
    ek = fit_curvature("ekfac", model, loss, X, y, **kw).dense()
    k = fit_curvature("kfac", model, loss, X, y, **kw).dense()
    assert (ek - B).norm() <= (k - B).norm() + 1e-12
    assert (ek - B).norm() < (k - B).norm()  # strictly better for N > 1


@pytest.mark.parametrize("method", ["ggn", "block_ggn", "kfac", "ekfac", "diag_ggn"])
def test_mc_fisher_converges_to_type2(kind, method):
    """MC Fisher is an unbiased estimate of the type-2 GGN: error shrinks like 1/sqrt(samples)."""
    model, loss, X, y = problem(kind, n=10, act="tanh")
    exact = fit_curvature(method, model, loss, X, y, fisher="type2").dense()
    errs = []
    for samples in (10, 1000):
        mc = fit_curvature(method, model, loss, X, y, fisher="mc", mc_samples=samples, seed=1)
        errs.append(rel(mc.dense(), exact))
    assert errs[1] < 0.1
    assert errs[1] < errs[0] / 3


def test_mc_is_reproducible_from_seed(kind):
    model, loss, X, y = problem(kind)
    a = fit_curvature("ggn", model, loss, X, y, fisher="mc", seed=5).dense()
    b = fit_curvature("ggn", model, loss, X, y, fisher="mc", seed=5).dense()
    c = fit_curvature("ggn", model, loss, X, y, fisher="mc", seed=6).dense()
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("method", ["hessian", "ggn", "block_ggn", "ekfac", "kfac", "diag_ggn"])
def test_chunking_does_not_change_the_result(kind, method):
    model, loss, X, y = problem(kind, n=13, act="tanh")
    a = fit_curvature(method, model, loss, X, y, chunk_size=4).dense()
    b = fit_curvature(method, model, loss, X, y, chunk_size=100).dense()
    assert rel(a, b) < 1e-12


def test_float32_model_is_fitted_in_float64(kind):
    model, loss, X, y = problem(kind, act="tanh")
    G64 = fit_curvature("ggn", model, loss, X, y).dense()
    m32 = model.float()
    y32 = y.float() if kind == "mse" else y
    G = fit_curvature("ggn", m32, loss, X.float(), y32).dense()
    assert G.dtype == torch.float64
    assert rel(G, G64) < 1e-5


def test_matvec_and_eigenvalues_consistent_with_dense(kind):
    model, loss, X, y = problem(kind, act="tanh")
    for method in ("ggn", "kfac", "ekfac", "block_hessian"):
        curv = fit_curvature(method, model, loss, X, y)
        C = curv.dense()
        V = torch.randn(3, C.shape[0], dtype=torch.float64)
        assert rel(curv.matvec(V), V @ C) < 1e-10
        assert rel(curv.eigenvalues(), torch.linalg.eigvalsh(C)) < 1e-8

"""Regularised inverses: apply vs dense vs an independent eigendecomposition; hand-built spectra."""

from __future__ import annotations

import pytest
import torch
from references import problem, ref_pinv

from curvinf import Regularization, fit_curvature
from curvinf.curvature import DenseCurvature
from curvinf.params import ParamBlock

REGS = [
    Regularization(damping=0.0, eps=1e-4, relative=False),
    Regularization(damping=1e-2, eps=0.0),
    Regularization(damping=1e-3, eps=1e-3, relative=True),
]


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "method",
    ["hessian", "ggn", "block_hessian", "block_ggn", "ekfac", "kfac", "diag_ggn", "identity"],
)
@pytest.mark.parametrize("reg", REGS, ids=["trunc-abs", "damp", "damp+trunc-rel"])
def test_apply_matches_dense_and_reference_pinv(method, reg):
    model, loss, X, y = problem("ce", n=20, act="tanh")
    curv = fit_curvature(method, model, loss, X, y)
    if method in ("hessian", "block_hessian") and reg.eps == 0:
        reg = Regularization(
            damping=reg.damping + 10.0, eps=0.0
        )  # make the indefinite H invertible
    inv = curv.inverse(reg)
    dense_inv = inv.dense()
    V = torch.randn(4, curv.num_params, dtype=torch.float64)
    assert rel(inv.apply(V), V @ dense_inv) < 1e-10
    expected = ref_pinv(curv.dense(), reg.damping, reg.eps, reg.relative)
    assert rel(dense_inv, expected) < 1e-7
    assert torch.allclose(inv.apply(V[0]), inv.apply(V)[0])


def _spectrum_curvature(evals: list[float]) -> tuple[DenseCurvature, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=g, dtype=torch.float64))
    C = Q @ torch.diag(torch.tensor(evals, dtype=torch.float64)) @ Q.T
    block = ParamBlock("all", torch.arange(len(evals)), ())
    return DenseCurvature("custom", len(evals), [(block, C)], 2**30), Q


def _inverse_spectrum(inv, Q):
    return torch.diag(Q.T @ inv.dense() @ Q)


def test_absolute_truncation_drops_small_and_negative_eigenvalues():
    curv, Q = _spectrum_curvature([-2.0, 1e-6, 1e-3, 0.5, 4.0])
    got = _inverse_spectrum(curv.inverse(Regularization(damping=0.0, eps=1e-4)), Q)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, 1e3, 2.0, 0.25], dtype=torch.float64))


def test_relative_truncation_uses_largest_eigenvalue():
    curv, Q = _spectrum_curvature([1e-3, 0.05, 4.0])
    reg = Regularization(damping=0.0, eps=0.1, relative=True)  # τ = 0.4
    got = _inverse_spectrum(curv.inverse(reg), Q)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, 0.25], dtype=torch.float64))


def test_damping_shifts_then_truncation_applies_to_shifted_values():
    curv, Q = _spectrum_curvature([-0.5, 0.0, 1.0])
    got = _inverse_spectrum(curv.inverse(Regularization(damping=0.6, eps=0.2)), Q)
    # shifted: 0.1 (dropped, <= 0.2), 0.6, 1.6
    assert torch.allclose(got, torch.tensor([0.0, 1 / 0.6, 1 / 1.6], dtype=torch.float64))


def test_rank_counts_kept_directions():
    curv, _ = _spectrum_curvature([-1.0, 1e-8, 2.0, 3.0])
    assert curv.inverse(Regularization(damping=0.0, eps=1e-4)).rank == 2


def test_singular_without_regularization_is_an_error():
    curv, _ = _spectrum_curvature([0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="singular or indefinite"):
        curv.inverse(Regularization(damping=0.0, eps=0.0))


def test_indefinite_with_damping_only_is_an_error():
    curv, _ = _spectrum_curvature([-1.0, 1.0])
    with pytest.raises(ValueError, match="eps"):
        curv.inverse(Regularization(damping=0.5, eps=0.0))


def test_plain_inverse_of_positive_definite():
    curv, Q = _spectrum_curvature([0.5, 2.0])
    got = _inverse_spectrum(curv.inverse(Regularization(damping=0.0, eps=0.0)), Q)
    assert torch.allclose(got, torch.tensor([2.0, 0.5], dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(eps=-1.0), "eps"),
        (dict(damping=-1e-3), "damping"),
        (dict(damping=float("nan")), "damping"),
        (dict(eps=1.0, relative=True), "every eigenvalue"),
    ],
)
def test_bad_regularization_is_rejected(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        Regularization(**kwargs)


def test_kfac_eigenvalues_are_products_of_factor_eigenvalues():
    model, loss, X, y = problem("mse", n=20, act="tanh")
    curv = fit_curvature("kfac", model, loss, X, y)
    expected = []
    for fac in curv.factors:
        lS = torch.linalg.eigvalsh(fac.S).clamp_min(0)
        lA = torch.linalg.eigvalsh(fac.A).clamp_min(0)
        expected.append(torch.outer(lS, lA).reshape(-1))
    assert torch.allclose(curv.eigenvalues(), torch.cat(expected).sort().values, atol=1e-12)

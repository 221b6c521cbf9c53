"""Metrics of curvinf.diagnostics on hand-built matrices with known answers, and the
structured error paths against their dense definitions on a tiny MLP."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvinf import Regularization, fit_curvature, make_mlp
from curvinf.curvature.operators import DenseEigenBlock, KroneckerEigenBlock
from curvinf.diagnostics import (
    LADDER_STEPS,
    basis_overlap,
    curvature_form,
    eigen_distance,
    eigen_inner,
    eigen_norm,
    error_shares,
    influence_error,
    influence_space_error,
    inverse_error,
    layer_basis_overlap,
    negative_eigenvalues,
    off_block_mass,
    overlap_ks,
    relative_frobenius_error,
    spectrum_mismatch,
    top_eigenvectors,
)
from curvinf.params import param_blocks


def test_relative_frobenius_error_known_value():
    ref = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    assert relative_frobenius_error(ref, ref) == 0.0
    assert relative_frobenius_error(ref + torch.tensor([[1.0, 0], [0, 0]]), ref) == pytest.approx(
        1 / 5
    )
    with pytest.raises(ValueError, match="same shape"):
        relative_frobenius_error(ref, ref[0])
    with pytest.raises(ValueError, match="zero"):
        relative_frobenius_error(ref, torch.zeros(2, 2))


def test_off_block_mass_block_diagonal_is_zero():
    C = torch.block_diag(torch.randn(3, 3), torch.randn(2, 2))
    blocks = [torch.arange(0, 3), torch.arange(3, 5)]
    assert off_block_mass(C, blocks) == 0.0


def test_off_block_mass_known_value():
    a = 0.5
    C = torch.tensor([[1.0, a], [a, 1.0]], dtype=torch.float64)
    expected = math.sqrt(2 * a**2 / (2 + 2 * a**2))
    assert off_block_mass(C, [torch.tensor([0]), torch.tensor([1])]) == pytest.approx(expected)
    # One block holding everything: nothing is off-block.
    assert off_block_mass(C, [torch.arange(2)]) == 0.0


def test_off_block_mass_rejects_bad_input():
    with pytest.raises(ValueError, match="overlap"):
        off_block_mass(torch.eye(2), [torch.arange(2), torch.tensor([1])])
    with pytest.raises(ValueError, match="square"):
        off_block_mass(torch.ones(2, 3), [torch.arange(2)])


def test_basis_overlap_identical_and_orthogonal():
    Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert basis_overlap(Q, Q, [1, 3, 6]) == pytest.approx([1.0, 1.0, 1.0])
    # Reversed order: the top-3 subspaces are orthogonal complements.
    assert basis_overlap(Q, Q.flip(1), [3])[0] == pytest.approx(0.0, abs=1e-12)
    # Full space always overlaps completely.
    assert basis_overlap(Q, Q.flip(1), [6])[0] == pytest.approx(1.0)


def test_basis_overlap_rotation_is_cos_squared():
    th = 0.3
    V = torch.eye(2, dtype=torch.float64)
    U = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    assert basis_overlap(V, U.double(), [1])[0] == pytest.approx(math.cos(th) ** 2)
    with pytest.raises(ValueError, match="outside"):
        basis_overlap(V, U.double(), [3])


def test_error_shares_sum_to_one_and_known_values():
    errors = {"hessian": 0.0, "ggn": 0.1, "block_ggn": 0.3, "ekfac": 0.8, "kfac": 1.0}
    shares = error_shares(errors)
    assert list(shares) == [name for name, _, _ in LADDER_STEPS]
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares == pytest.approx(
        {
            "ggn_substitution": 0.1,
            "block_diagonalisation": 0.2,
            "kronecker_basis": 0.5,
            "kronecker_eigenvalues": 0.2,
        }
    )
    # The reference may be omitted (error 0 against itself); non-monotone errors give a
    # negative share and the shares still sum to 1.
    shares = error_shares({"ggn": 0.1, "block_ggn": 0.05, "ekfac": 0.5, "kfac": 0.4})
    assert shares["block_diagonalisation"] < 0
    assert sum(shares.values()) == pytest.approx(1.0)


def test_error_shares_errors():
    with pytest.raises(ValueError, match="no error for rung 'ekfac'"):
        error_shares({"ggn": 0.1, "block_ggn": 0.2, "kfac": 0.3})
    with pytest.raises(ValueError, match="zero"):
        error_shares({"ggn": 0.0, "block_ggn": 0.0, "ekfac": 0.0, "kfac": 0.0})
    nan = error_shares({"ggn": 0.1, "block_ggn": 0.2, "ekfac": 0.3, "kfac": math.nan})
    assert all(math.isnan(v) for v in nan.values())


def test_spectrum_mismatch_and_negative_count():
    a = torch.tensor([3.0, 1.0, 2.0])
    assert spectrum_mismatch(a, a.flip(0)) == 0.0
    assert spectrum_mismatch(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 2.0, 2.0])) == (
        pytest.approx(2 / 3)
    )
    assert negative_eigenvalues(torch.tensor([-1.0, -1e-14, 0.0, 2.0])) == 1
    assert negative_eigenvalues(torch.tensor([])) == 0


def test_overlap_ks():
    assert overlap_ks(7) == [1, 2, 5, 7]
    assert overlap_ks(1000, max_k=100) == [1, 2, 5, 10, 20, 50, 100]


# ---------------------------------------------------------------------------------------
# Structured paths against dense definitions on a tiny model.


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = make_mlp(4, 3, depth=2, width=3, seed=1)
    X = torch.randn(20, 4)
    y = torch.randint(0, 3, (20,))
    loss = nn.CrossEntropyLoss()
    rungs = {
        m: fit_curvature(m, model, loss, X, y)
        for m in ("hessian", "ggn", "block_ggn", "ekfac", "kfac", "diag_ggn")
    }
    return model, loss, X, y, rungs


DAMPED = Regularization(damping=0.1, eps=1e-3, relative=True)


@pytest.mark.parametrize("reg", [Regularization(), DAMPED])
@pytest.mark.parametrize("ref_name", ["hessian", "block_ggn", "ekfac", "diag_ggn"])
def test_inverse_error_matches_dense(tiny, reg, ref_name):
    *_, rungs = tiny
    ref = rungs[ref_name].inverse(reg)
    R = ref.dense()
    for name, curv in rungs.items():
        inv = curv.inverse(reg)
        expected = float(torch.linalg.norm(inv.dense() - R) / torch.linalg.norm(R))
        # squared: the distance comes as the root of a difference, so round-off of 1e-16 in
        # the square is 1e-8 in an error that should be 0
        err = inverse_error(inv, ref, chunk_size=7)
        assert err**2 == pytest.approx(expected**2, rel=1e-9, abs=1e-13), name
    assert inverse_error(ref, ref) == pytest.approx(0.0, abs=1e-6)


def test_eigen_distance_of_every_rung_pair_matches_dense(tiny):
    """‖A − B‖_F and tr(AB) from the block eigen forms equal the dense values for every pair
    of rungs (dense, per-layer dense, Kronecker and diagonal blocks), whichever side the
    eigenvectors are drawn from."""
    *_, rungs = tiny
    D = rungs["hessian"].num_params
    for a_name, a in rungs.items():
        A = a.dense()
        for b_name, b in rungs.items():
            B = b.dense()
            fa, fb = curvature_form(a), curvature_form(b)
            assert eigen_inner(fa, fb, D, chunk_size=5) == pytest.approx(
                float((A * B).sum()), rel=1e-10, abs=1e-12
            ), (a_name, b_name)
            dist = float(torch.linalg.norm(A - B))
            scale = float(torch.linalg.norm(A)) * float(torch.linalg.norm(B))
            assert eigen_distance(fa, fb, D) ** 2 == pytest.approx(dist**2, abs=1e-12 * scale)
        assert eigen_norm(curvature_form(a)) == pytest.approx(float(torch.linalg.norm(A)))


def test_eigen_inner_same_basis_shortcut_equals_rotation(tiny):
    """EK-FAC and K-FAC share their Kronecker basis: the Σ a_i b_i shortcut gives what the
    rotation of every eigenvector gives (forced by perturbing one basis by a sign flip)."""
    *_, rungs = tiny
    D = rungs["kfac"].num_params
    fk, fe = curvature_form(rungs["kfac"]), curvature_form(rungs["ekfac"])
    shortcut = eigen_inner(fk, fe, D)
    flipped = [KroneckerEigenBlock(b.index, -b.U_out, b.U_in, b.evals, b.has_bias) for b in fe[0]]
    rotated = eigen_inner(fk, (flipped, fe[1]), D)
    assert shortcut == pytest.approx(rotated, rel=1e-12)


def test_influence_space_error_matches_dense(tiny):
    model, loss, X, y, rungs = tiny
    from curvinf.influence import per_example_grads

    Gq = per_example_grads(model, loss, X[:5], y[:5])
    Gt = per_example_grads(model, loss, X, y)
    ref = rungs["hessian"].inverse()
    inv = rungs["kfac"].inverse()
    dense = float(
        torch.linalg.norm(Gq @ (inv.dense() - ref.dense()) @ Gt.T)
        / torch.linalg.norm(Gq @ ref.dense() @ Gt.T)
    )
    assert influence_space_error(inv, ref, Gq, Gt) == pytest.approx(dense, rel=1e-9)
    S_ref, S = Gq @ ref.dense() @ Gt.T, Gq @ inv.dense() @ Gt.T
    assert influence_error(S, S_ref) == pytest.approx(dense, rel=1e-9)


def test_top_eigenvectors_are_eigenvectors(tiny):
    *_, rungs = tiny
    for name in ("block_ggn", "kfac"):
        curv = rungs[name]
        C = curv.dense()
        for block in curv.eigen():
            k = 3
            U = top_eigenvectors(block, k)
            assert U.shape == (len(block.index), k)
            assert torch.allclose(U.T @ U, torch.eye(k, dtype=torch.float64), atol=1e-10)
            Cb = C[block.index[:, None], block.index[None, :]]
            top = block.eigenvalues.reshape(-1).sort(descending=True).values[:k]
            assert torch.allclose(Cb @ U, U * top, atol=1e-8)
            assert isinstance(block, (DenseEigenBlock, KroneckerEigenBlock))


def test_layer_basis_overlap_identical_bases_is_one(tiny):
    model, *_, rungs = tiny
    same = layer_basis_overlap(rungs["kfac"], rungs["kfac"])
    assert len(same) == len(param_blocks(model))
    for curve in same.values():
        assert all(v == pytest.approx(1.0) for v in curve.values())
    cross = layer_basis_overlap(rungs["block_ggn"], rungs["ekfac"], ks=[1, 2])
    for curve in cross.values():
        assert set(curve) == {1, 2}
        assert all(-1e-12 <= v <= 1 + 1e-12 for v in curve.values())
    with pytest.raises(ValueError, match="no block"):
        layer_basis_overlap(rungs["ggn"], rungs["kfac"])

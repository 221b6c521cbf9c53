"""Randomized estimators of curvinf.estimators against their exact, dense values: within a
few standard errors of the truth, standard errors that match the spread over seeds,
exactness where the sketch spans the map, seeding, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from references import problem

from curvinf import Regularization, fit_curvature, make_mlp
from curvinf.curvature import CG, matrix_free
from curvinf.curvature.operators import InverseOperator, InverseReport
from curvinf.diagnostics import (
    basis_overlap,
    inverse_error,
    off_block_mass,
    top_eigenvectors,
)
from curvinf.estimators import (
    Estimate,
    distance_estimate,
    frobenius_estimate,
    inverse_error_any,
    inverse_error_estimate,
    off_block_mass_estimate,
    top_block_eigenvectors,
)
from curvinf.params import param_blocks

SEEDS = 60


def spread_check(estimates: list[Estimate], truth: float) -> None:
    """Over seeds: the mean is within 4 standard errors of the mean of ``truth`` (unbiased
    or nearly), 90% of them within 5 of their own SE (an SE from a few probes is itself
    noisy), and the reported SE (RMS) matches the empirical spread within a factor of 2."""
    values = torch.tensor([e.value for e in estimates], dtype=torch.float64)
    ses = torch.tensor([e.standard_error for e in estimates], dtype=torch.float64)
    spread = float(values.std())
    reported = float(ses.pow(2).mean().sqrt())
    assert 0.5 < reported / spread < 2.0, (reported, spread)
    assert abs(float(values.mean()) - truth) < 4 * spread / math.sqrt(len(values)) + 1e-12
    assert float(((values - truth).abs() <= 5 * ses).double().mean()) >= 0.9


def random_symmetric(dim: int, evals: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return (U * evals) @ U.T


def times(A: torch.Tensor):
    return lambda V: V @ A


# ---------------------------------------------------------------------------------------
# frobenius_estimate


def test_frobenius_estimate_calibrated():
    D = 60
    k = torch.arange(D, dtype=torch.float64)
    A = random_symmetric(D, (1 + k) ** -0.6 * (-1) ** k)  # indefinite, slow decay
    truth = float(A.pow(2).sum())
    ests = [frobenius_estimate(times(A), D, 24, seed=s) for s in range(SEEDS)]
    assert all(e.num_matvecs == 24 and e.method == "hutch++" for e in ests)
    spread_check(ests, truth)


def test_frobenius_estimate_exact_cases():
    D = 50
    zero = frobenius_estimate(lambda V: torch.zeros_like(V), D, 12)
    assert (zero.value, zero.standard_error) == (0.0, 0.0)
    # rank 5 < sketch size 8: the sketch holds the whole range, the residual is round-off
    evals = torch.zeros(D, dtype=torch.float64)
    evals[:5] = torch.tensor([3.0, -2.0, 1.0, 0.5, 0.1])
    A = random_symmetric(D, evals)
    est = frobenius_estimate(times(A), D, 24, seed=3)
    assert est.value == pytest.approx(float(A.pow(2).sum()), rel=1e-12)
    assert est.standard_error < 1e-12 * est.value
    # a sketch as large as the space: exact, no probes spent
    small = random_symmetric(4, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    full = frobenius_estimate(times(small), 4, 12)
    assert full.method == "exact" and full.standard_error == 0.0 and full.num_matvecs == 8
    assert full.value == pytest.approx(30.0, rel=1e-12)


def test_frobenius_estimate_seeded_and_dtype():
    D = 30
    A = random_symmetric(D, torch.linspace(1, 0.01, D, dtype=torch.float64))
    a = frobenius_estimate(times(A), D, 10, seed=7)
    assert a == frobenius_estimate(times(A), D, 10, seed=7)
    assert a.value != frobenius_estimate(times(A), D, 10, seed=8).value
    seen = []

    def f32(V):
        seen.append(V.dtype)
        return V @ A.float()

    b = frobenius_estimate(f32, D, 10, seed=7, dtype=torch.float32, chunk_size=3)
    assert set(seen) == {torch.float32} and len(seen) > 3
    assert b.value == pytest.approx(a.value, rel=1e-5)


def test_frobenius_estimate_errors():
    A = torch.eye(6, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_matvecs=3 is too small.*at least 4"):
        frobenius_estimate(times(A), 6, 3)
    with pytest.raises(TypeError, match="num_matvecs"):
        frobenius_estimate(times(A), 6, 10.0)
    with pytest.raises(ValueError, match="dim"):
        frobenius_estimate(times(A), 0, 10)
    with pytest.raises(ValueError, match=r"matvec must map rows"):
        frobenius_estimate(lambda V: torch.zeros(len(V), 6), 5, 10)  # dim is not the map's
    with pytest.raises(ValueError, match="NaN/inf"):
        frobenius_estimate(lambda V: V * float("nan"), 6, 10)
    with pytest.raises(ValueError, match="dtype"):
        frobenius_estimate(times(A), 6, 10, dtype=torch.int64)


# ---------------------------------------------------------------------------------------
# On a small MLP: inverse errors, off-block mass, block eigenvectors.


@pytest.fixture(scope="module")
def mlp():
    model, loss, X, y = problem("ce", n=40, depth=2, width=6, seed=1)
    rungs = {m: fit_curvature(m, model, loss, X, y) for m in ("ggn", "block_ggn", "kfac")}
    return model, loss, X, y, rungs


DAMPED = Regularization(damping=0.05, eps=0.0)


def dense_error(approx: InverseOperator, ref: InverseOperator) -> float:
    R = ref.dense()
    return float(torch.linalg.norm(approx.dense() - R) / torch.linalg.norm(R))


def test_inverse_error_estimate_calibrated(mlp):
    *_, rungs = mlp
    ref = rungs["ggn"].inverse(DAMPED)
    approx = rungs["kfac"].inverse(DAMPED)
    truth = dense_error(approx, ref)
    assert truth == pytest.approx(inverse_error(approx, ref), rel=1e-8)
    ests = [inverse_error_estimate(approx, ref, 20, seed=s) for s in range(SEEDS)]
    assert all(e.num_matvecs == 20 for e in ests)
    spread_check(ests, truth)


def test_distance_estimate_applies_a_shared_reference_once(mlp):
    """With ``B = R`` (an error against the reference) each vector goes through the
    reference once, also when the two are passed as separate bound methods."""
    *_, rungs = mlp
    ref, approx = rungs["ggn"].inverse(DAMPED), rungs["kfac"].inverse(DAMPED)
    rows = {"ref": 0, "approx": 0}

    class Counting:
        def __init__(self, inv, name):
            self.inv, self.name, self.num_params = inv, name, inv.num_params

        def apply(self, V):
            rows[self.name] += len(V)
            return self.inv.apply(V)

    counted = Counting(ref, "ref")
    est = distance_estimate(
        Counting(approx, "approx").apply, counted.apply, counted.apply, ref.num_params, 20
    )
    assert rows["ref"] == rows["approx"] == est.num_matvecs


def test_inverse_error_estimate_exact_cases(mlp):
    *_, rungs = mlp
    inv = rungs["ggn"].inverse(DAMPED)
    same = inverse_error_estimate(inv, inv, 10)
    assert (same.value, same.standard_error) == (0.0, 0.0)
    D = inv.num_params
    full = inverse_error_estimate(rungs["kfac"].inverse(DAMPED), inv, 3 * D)  # 2s >= D
    assert full.method == "exact" and full.standard_error == 0.0
    assert full.value == pytest.approx(dense_error(rungs["kfac"].inverse(DAMPED), inv), rel=1e-9)


def test_inverse_error_any_picks_exact_or_estimate(mlp):
    *_, rungs = mlp
    ref = rungs["block_ggn"].inverse(DAMPED)
    approx = rungs["kfac"].inverse(DAMPED)
    value, se, method = inverse_error_any(approx, ref)
    assert (se, method) == (0.0, "exact")
    assert value == pytest.approx(inverse_error(approx, ref), rel=1e-12)
    # an iterative inverse has no eigen form: the estimate runs
    cg = rungs["ggn"].inverse(DAMPED, solver=CG(tol=1e-10, progress=False))
    assert cg.eigen_form() is None
    value, se, method = inverse_error_any(cg, ref, 40, seed=2)
    truth = dense_error(rungs["ggn"].inverse(DAMPED), ref)
    assert method == "hutch++" and 0 < se < 0.2 * truth
    assert abs(value - truth) < 4 * se
    est = inverse_error_estimate(cg, ref, 40, seed=2)
    assert (est.value, est.standard_error) == (value, se)


class _Zero(InverseOperator):
    def __init__(self, curvature):
        self.curvature = curvature

    def apply(self, V):
        return torch.zeros_like(V, dtype=torch.float64)

    @property
    def report(self):
        return InverseReport(route="zero")


def test_inverse_error_estimate_errors(mlp):
    model, loss, X, y, rungs = mlp
    inv = rungs["ggn"].inverse(DAMPED)
    with pytest.raises(ValueError, match="reference inverse is zero"):
        inverse_error_estimate(inv, _Zero(rungs["ggn"]), 10)
    other = fit_curvature("kfac", make_mlp(5, 3, depth=1, width=4), loss, X, y).inverse(DAMPED)
    with pytest.raises(ValueError, match="parameters"):
        inverse_error_estimate(inv, other, 10)
    with pytest.raises(ValueError, match="too small.*at least 5"):
        inverse_error_estimate(inv, inv, 4)


def test_off_block_mass_estimate_calibrated(mlp):
    model, *_, rungs = mlp
    C = rungs["ggn"].dense()
    blocks = [b.index for b in param_blocks(model)]
    truth = off_block_mass(C, blocks)
    ests = [off_block_mass_estimate(times(C), blocks, len(C), 45, seed=s) for s in range(SEEDS)]
    assert all(e.num_matvecs == 45 for e in ests)  # 15 evaluations x 3 blocks
    spread_check(ests, truth)


def test_off_block_mass_estimate_matrix_free_and_partial_blocks(mlp):
    model, loss, X, y, rungs = mlp
    C = rungs["ggn"].dense()
    D = len(C)
    blocks = [b.index for b in param_blocks(model)]
    mf = matrix_free("ggn", model, loss, X, y, progress=False)
    est = off_block_mass_estimate(mf.matvec, blocks, D, 24, seed=1)
    dense = off_block_mass_estimate(times(C), blocks, D, 24, seed=1)
    assert est.value == pytest.approx(dense.value, rel=1e-8)
    assert est.standard_error == pytest.approx(dense.standard_error, rel=1e-6)
    assert abs(est.value - off_block_mass(C, blocks)) < 4 * est.standard_error
    # positions in no block are off-block, their diagonal too: exact with a full sketch
    part = [blocks[0], blocks[2][:5]]
    full = off_block_mass_estimate(times(C), part, D, 4 * 4 * D)
    assert full.method == "exact"
    assert full.value == pytest.approx(off_block_mass(C, part), rel=1e-9)
    # a diagonal C with one position in no block: only that diagonal entry is off-block
    diag = torch.diag(torch.arange(1.0, D + 1, dtype=torch.float64))
    rest = off_block_mass_estimate(times(diag), [torch.arange(D - 1)], D, 2 * 4 * D)
    assert rest.value == pytest.approx(off_block_mass(diag, [torch.arange(D - 1)]), rel=1e-9)


def test_off_block_mass_estimate_exact_cases(mlp):
    model, *_, rungs = mlp
    blocks = [b.index for b in param_blocks(model)]
    Cb = rungs["block_ggn"].dense()
    zero = off_block_mass_estimate(times(Cb), blocks, len(Cb), 15)
    assert zero.value == 0.0 and zero.standard_error == 0.0
    C = rungs["ggn"].dense()
    one = off_block_mass_estimate(times(C), [torch.arange(len(C))], len(C), 10)
    assert one.value == 0.0 and one.standard_error == 0.0


def test_off_block_mass_estimate_errors():
    C = torch.eye(6, dtype=torch.float64)
    two = [torch.arange(3), torch.arange(3, 6)]
    with pytest.raises(ValueError, match="overlap"):
        off_block_mass_estimate(times(C), [torch.arange(3), torch.arange(2, 6)], 6, 20)
    with pytest.raises(ValueError, match="outside"):
        off_block_mass_estimate(times(C), [torch.arange(3), torch.arange(3, 7)], 6, 20)
    with pytest.raises(ValueError, match="empty"):
        off_block_mass_estimate(times(C), [], 6, 20)
    with pytest.raises(ValueError, match="too small.*at least 10"):
        off_block_mass_estimate(times(C), two, 6, 9)
    with pytest.raises(ValueError, match="at least 15"):  # 3 groups: two blocks and the rest
        off_block_mass_estimate(times(C), [torch.arange(2), torch.arange(3, 6)], 6, 12)
    with pytest.raises(ValueError, match="curvature_matvec must map rows"):
        off_block_mass_estimate(lambda V: V[:, :5], two, 6, 20)
    with pytest.raises(ValueError, match="C is zero"):
        off_block_mass_estimate(lambda V: 0 * V, two, 6, 20)


def test_top_block_eigenvectors_match_dense_blocks(mlp):
    model, loss, X, y, rungs = mlp
    ref = rungs["block_ggn"]
    mf = matrix_free("ggn", model, loss, X, y, progress=False)  # same diagonal blocks
    for block in ref.eigen():
        d, k = len(block.index), 4
        exact = top_block_eigenvectors(mf, block.index, k, max_iter=d)  # d steps: exact
        U = top_eigenvectors(block, k)
        assert exact.vectors.shape == (d, k) and exact.num_matvecs == d
        top = block.eigenvalues.sort(descending=True).values[:k]
        assert torch.allclose(exact.values, top, rtol=1e-8, atol=1e-10)
        assert basis_overlap(exact.vectors, U, [1, k]) == pytest.approx([1.0, 1.0], abs=1e-8)
    # fewer steps than the block: converged top pairs, and the per-layer overlap with the
    # Kronecker basis that the dense block eigh gives
    big = max(ref.eigen(), key=lambda b: len(b.index))
    ritz = top_block_eigenvectors(ref, big.index, 3, max_iter=30)
    assert ritz.num_matvecs == 30 and float(ritz.residuals.max()) < 1e-6 * float(ritz.values[0])
    kron = next(b for b in rungs["kfac"].eigen() if torch.equal(b.index, big.index))
    expected = basis_overlap(top_eigenvectors(big, 3), top_eigenvectors(kron, 3), [1, 3])
    got = basis_overlap(ritz.vectors, top_eigenvectors(kron, 3), [1, 3])
    assert got == pytest.approx(expected, abs=1e-6)


def test_top_block_eigenvectors_errors(mlp):
    *_, rungs = mlp
    curv = rungs["ggn"]
    D = curv.num_params
    with pytest.raises(ValueError, match="larger than the block"):
        top_block_eigenvectors(curv, torch.arange(3), 4)
    with pytest.raises(ValueError, match="positions in"):
        top_block_eigenvectors(curv, torch.tensor([0, D]), 1)
    with pytest.raises(ValueError, match="repeated"):
        top_block_eigenvectors(curv, torch.tensor([0, 0, 1]), 1)
    with pytest.raises(ValueError, match="max_iter"):
        top_block_eigenvectors(curv, torch.arange(10), 4, max_iter=2)

"""The certified partial eigendecomposition equals ``torch.linalg.eigh`` on the pairs it
returns, counts exactly, and the Gram route through it equals the dense reference."""

from __future__ import annotations

import math

import pytest
import torch
from references import problem
from test_gram import ref_inverse

from curvinf import Regularization
from curvinf.curvature import Gram, matrix_free
from curvinf.curvature.partial_eigh import count_above, eigenpairs_above, predicted_ratio


def decaying(R: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A PSD (R, R) matrix with ``k`` eigenvalues in [1e-3, 1] and a geometric tail from
    5e-4 down to 1e-14 (the shape of the study's Gram spectra), and its eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(R, R, dtype=torch.float64, generator=g))
    top = torch.logspace(0, -3, k, dtype=torch.float64)
    tail = torch.logspace(math.log10(5e-4), -14, R - k, dtype=torch.float64)
    s = torch.cat([top, tail])
    A = (Q * s) @ Q.T
    return (A + A.T) / 2, s.sort().values


@pytest.mark.parametrize("seed", range(4))
def test_count_above_equals_the_eigenvalue_count(seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(120, 120, dtype=torch.float64, generator=g)
    A = (B + B.T) / 2  # indefinite: Bunch–Kaufman takes 2x2 pivots
    pivots = torch.linalg.ldl_factor_ex(A).pivots
    assert bool((pivots < 0).any())  # the 2x2 blocks are exercised
    evals = torch.linalg.eigvalsh(A)
    for t in [-5.0, -1.0, 0.0, 0.3, 2.0, 50.0, float(evals[60]) + 1e-9]:
        assert count_above(A, t) == int((evals > t).sum())


def test_eigenpairs_above_equal_eigh_on_the_pairs_above():
    A, s = decaying(800, 30)
    pairs = eigenpairs_above(A, 1e-3 * 0.99, max_cost_ratio=math.inf)
    assert pairs is not None
    vals, vecs = pairs
    assert vals.shape == (30,) and vecs.shape == (800, 30)
    assert bool((vals[1:] >= vals[:-1]).all())  # ascending, as eigh orders them
    torch.testing.assert_close(vals, s[-30:], rtol=1e-12, atol=1e-14)
    resid = (A @ vecs - vecs * vals).norm(dim=0)
    assert float(resid.max()) <= 1e-13 * float(vals.max())
    torch.testing.assert_close(
        vecs.T @ vecs, torch.eye(30, dtype=torch.float64), atol=1e-12, rtol=0
    )
    # the operator a truncated inverse applies: U diag(1/s) Uᵀ, as from the full eigh
    ev, U = torch.linalg.eigh(A)
    ref = U[:, -30:] @ torch.diag(1 / ev[-30:]) @ U[:, -30:].T
    got = vecs @ torch.diag(1 / vals) @ vecs.T
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))


def test_eigenpairs_above_are_reproducible_and_handle_edges():
    A, _ = decaying(600, 20)
    a = eigenpairs_above(A, 5e-4 * 1.5, max_cost_ratio=math.inf)
    b = eigenpairs_above(A, 5e-4 * 1.5, max_cost_ratio=math.inf)
    assert a is not None and b is not None
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    none = eigenpairs_above(A, 2.0, max_cost_ratio=math.inf)  # nothing above
    assert none is not None and none[0].numel() == 0 and none[1].shape == (600, 0)
    # half the spectrum above t: predicted dearer than eigh, so declined
    B, s = decaying(600, 300)
    assert predicted_ratio(600, 300) > 0.7
    assert eigenpairs_above(B, 0.99e-3) is None
    assert eigenpairs_above(torch.eye(50, dtype=torch.float64), 0.5) is None  # too small to pay
    with pytest.raises(ValueError, match="square"):
        eigenpairs_above(torch.zeros(3, 4, dtype=torch.float64), 0.1)


def test_slow_convergence_gives_up_instead_of_running_on():
    """A spectrum with no gap below the k-th eigenvalue converges slowly: the route
    declines (the caller then runs eigh) within its cost budget."""
    g = torch.Generator().manual_seed(1)
    R = 700
    Q, _ = torch.linalg.qr(torch.randn(R, R, dtype=torch.float64, generator=g))
    s = torch.linspace(1.0, 0.5, R, dtype=torch.float64)  # flat: λ_{m+1}/λ_k near 1
    A = (Q * s) @ Q.T
    A = (A + A.T) / 2
    assert eigenpairs_above(A, 0.99, max_cost_ratio=5.0) is None
    assert eigenpairs_above(A, 0.99, max_cost_ratio=math.inf) is None  # capped, not endless


PARTIAL_REGS = [
    Regularization(damping=0.0, eps=1e-2),  # the paper's form, a threshold that keeps few
    Regularization(damping=1e-3, eps=2e-2),  # truncation above the damping
]


@pytest.mark.filterwarnings("ignore::curvinf.curvature.regularization.TruncationWarning")
@pytest.mark.parametrize("method", ["ggn", "block_ggn"])
@pytest.mark.parametrize("reg", PARTIAL_REGS, ids=["eps", "damp+eps"])
def test_gram_route_through_the_partial_eigh_equals_the_dense_reference(method, reg, tmp_path):
    model, loss, X, y = problem("ce", n=150, width=12)
    mf = matrix_free(method, model, loss, X, y)
    inv = mf.inverse(reg, solver=Gram(partial_eigh=math.inf))
    assert inv.partial_threshold() == pytest.approx(reg.eps - reg.damping)
    assert inv.partial_blocks == len(inv.param_blocks)
    kept = sum(int(s.numel()) for s in inv.eigenvalues)
    assert 0 < kept < inv.R / 3  # the iteration ran on a strict subspace
    ref = ref_inverse(model, "ce", X, y, method, "type2", reg)
    torch.testing.assert_close(inv.dense(), ref, rtol=1e-7, atol=1e-7 * float(ref.abs().max()))
    full = mf.inverse(reg, solver=Gram(partial_eigh=0)).dense()
    torch.testing.assert_close(inv.dense(), full, rtol=0, atol=1e-9 * float(full.abs().max()))
    assert inv.report.rank == kept and "partial eigh" in inv.report.notes

    cached = mf.inverse(reg, solver=Gram(cache=str(tmp_path), partial_eigh=math.inf))
    assert len(list(tmp_path.glob("eigh-above-*.pt"))) == len(inv.param_blocks)
    again = mf.inverse(reg, solver=Gram(cache=str(tmp_path), partial_eigh=math.inf))
    assert again.partial_blocks == 0  # read back, not recomputed
    assert torch.equal(again.dense(), cached.dense())


def test_a_stored_full_eigh_is_used_and_other_rules_take_the_full_eigh(tmp_path):
    model, loss, X, y = problem("ce", n=150, width=12)
    mf = matrix_free("ggn", model, loss, X, y)
    reg = PARTIAL_REGS[0]
    full = mf.inverse(reg, solver=Gram(cache=str(tmp_path), partial_eigh=0))
    assert [p.name.startswith("eigh-above") for p in tmp_path.glob("eigh-*.pt")] == [False]
    reuse = mf.inverse(reg, solver=Gram(cache=str(tmp_path), partial_eigh=math.inf))
    assert reuse.partial_blocks == 0 and torch.equal(reuse.dense(), full.dense())
    relative = Regularization(damping=0.0, eps=1e-3, relative=True)
    keep_null = Regularization(damping=2e-3, eps=1e-3)  # eps < damping: Cholesky, no eigh
    assert mf.inverse(relative, solver=Gram(partial_eigh=math.inf)).partial_threshold() is None
    assert mf.inverse(keep_null, solver=Gram(partial_eigh=math.inf)).mode == "cholesky"
    with pytest.raises(ValueError, match="partial_eigh"):
        Gram(partial_eigh=-1.0)

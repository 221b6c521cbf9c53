"""The Gram (sample-space) route equals the dense regularised inverse of the GGN rungs.

References are independent: the GGN from ``jacrev`` Jacobians and output Hessians
(``tests/references.py``), blocks by slicing, ``eigh`` pseudo-inverses.
"""

from __future__ import annotations

import pytest
import torch
from references import block_diag_of, layer_slices, problem, ref_ggn, ref_hessian, ref_pinv
from torch import nn

from curvinf import Regularization, influence_scores, per_example_grads
from curvinf.curvature import CG, Gram, GramInverse, Preconditioned, matrix_free
from curvinf.curvature.gram import thin_roots

REGS = [
    Regularization(damping=1e-2, eps=0.0),
    Regularization(damping=0.0, eps=1e-4),
    Regularization(damping=2e-3, eps=1e-3),  # the null space of G kept, at 1/δ
    Regularization(damping=1e-3, eps=2e-3),  # the null space dropped
    Regularization(damping=0.0, eps=1e-3, relative=True),
]
IDS = ["damped", "paper", "keep-null", "drop-null", "relative"]


def tensor_slices(model: nn.Module) -> list[slice]:
    """Contiguous flat ranges of each parameter tensor (``partition="tensor"``)."""
    out, start = [], 0
    for p in model.parameters():
        out.append(slice(start, start + p.numel()))
        start += p.numel()
    return out


def ref_inverse(model, kind, X, y, method, fisher, reg, slices=None):
    G = ref_ggn(model, kind, X, y, fisher)
    if method == "block_ggn":
        slices = slices or layer_slices(model)
        G = block_diag_of(G, slices)
        # the truncation threshold is global, so invert block by block with the global τ
        top = max(float(torch.linalg.eigvalsh(G[s, s]).max()) for s in slices) + reg.damping
        out = torch.zeros_like(G)
        for s in slices:
            tau = reg.eps * top if reg.relative else reg.eps
            evals, U = torch.linalg.eigh(G[s, s] + reg.damping * torch.eye(s.stop - s.start))
            inv = torch.where(evals > tau, 1.0 / evals, torch.zeros_like(evals))
            out[s, s] = U @ torch.diag(inv) @ U.T
        return out
    return ref_pinv(G, reg.damping, reg.eps, reg.relative)


@pytest.mark.parametrize("method", ["ggn", "block_ggn"])
@pytest.mark.parametrize("reg", REGS, ids=IDS)
@pytest.mark.parametrize("n", [12, 40], ids=["D>R", "D<R"])
def test_gram_inverse_equals_dense_reference(kind, method, reg, n):
    model, loss, X, y = problem(kind, n=n)
    mf = matrix_free(method, model, loss, X, y, chunk_size=7)
    inv = mf.inverse(reg, solver=Gram())
    assert isinstance(inv, GramInverse)
    assert inv.mode == ("eigh" if reg.truncates_nonnegative() else "cholesky")
    ref = ref_inverse(model, kind, X, y, method, "type2", reg)
    torch.testing.assert_close(inv.dense(), ref, rtol=1e-7, atol=1e-7 * float(ref.abs().max()))
    ref_evals = torch.linalg.eigvalsh(ref).abs()
    assert inv.report.rank == int((ref_evals > 1e-9 * float(ref_evals.max())).sum())


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_gram_other_fishers(fisher):
    model, loss, X, y = problem("ce", n=12)
    reg = Regularization(damping=1e-2, eps=0.0)
    mf = matrix_free("ggn", model, loss, X, y, fisher=fisher, mc_samples=2, seed=4)
    dense_mf = mf.inverse(reg)  # eigh of the matrix-free rung's dense(): same MC samples
    torch.testing.assert_close(
        mf.inverse(reg, solver=Gram()).dense(), dense_mf.dense(), rtol=1e-8, atol=1e-8
    )


def test_non_linear_models_form_the_rows():
    """A LayerNorm (no K-FAC adapter) takes the explicit-rows route; same answer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    _, loss, X, y = problem("ce", n=10)
    reg = Regularization(damping=1e-2, eps=0.0)
    for partition in ("layer", "tensor"):
        mf = matrix_free("block_ggn", model, loss, X, y, partition=partition)
        inv = mf.inverse(reg, solver=Gram())
        assert type(inv.rows).__name__ == "_DenseRows"
        torch.testing.assert_close(inv.dense(), mf.inverse(reg).dense(), rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="pseudo-gradient matrix"):
        matrix_free("ggn", model, loss, X, y, max_dense_bytes=100).inverse(reg, solver=Gram())


@pytest.mark.parametrize("reg", REGS[:3], ids=IDS[:3])
@pytest.mark.parametrize("n", [12, 40], ids=["D>R", "D<R"])
def test_tensor_blocks_use_the_layer_factors(reg, n, monkeypatch):
    """Per-tensor blocks (weight and bias apart; one layer without a bias) of an
    ``nn.Linear`` network: Gram matrices and products from the layer factors, never the
    explicit rows; equal to the dense per-tensor reference."""
    from curvinf.curvature import gram

    model, loss, X, y = problem("ce", n=n)
    model[-1].bias = None  # the last layer has a weight only
    monkeypatch.setattr(gram, "_dense_rows", None)  # calling it would fail
    mf = matrix_free("block_ggn", model, loss, X, y, partition="tensor", chunk_size=7)
    inv = mf.inverse(reg, solver=Gram())
    assert type(inv.rows).__name__ == "_LinearRows"
    ref = ref_inverse(model, "ce", X, y, "block_ggn", "type2", reg, tensor_slices(model))
    torch.testing.assert_close(inv.dense(), ref, rtol=1e-7, atol=1e-7 * float(ref.abs().max()))
    Gq = per_example_grads(model, loss, X[:4] + 0.1, y[:4])
    S = influence_scores(model, loss, inv, train=(X, y), query=(X[:4] + 0.1, y[:4]))
    Gt = per_example_grads(model, loss, X, y)
    torch.testing.assert_close(S, Gq @ ref @ Gt.T, rtol=1e-7, atol=1e-9 * float(S.abs().max()))


def test_convolutions_form_the_rows_from_layer_factors(monkeypatch):
    """A CNN (every parameter in an adapted layer, weights shared over positions): the rows
    come from the captured factors, not per-example Jacobians; same answer as dense."""
    from curvinf.curvature.context import FitContext

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)
    ).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    reg = Regularization(damping=1e-2, eps=0.0)
    loss = nn.CrossEntropyLoss()
    want = {m: matrix_free(m, model, loss, X, y).inverse(reg).dense() for m in ("ggn", "block_ggn")}

    def refuse(*args, **kwargs):
        raise AssertionError("per-example Jacobians were formed")

    monkeypatch.setattr(FitContext, "pseudo_grads", refuse)
    for method, dense in want.items():
        mf = matrix_free(method, model, loss, X, y, chunk_size=5)
        inv = mf.inverse(reg, solver=Gram())
        assert type(inv.rows).__name__ == "_DenseRows"
        torch.testing.assert_close(inv.dense(), dense, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("measure", ["loss", "margin"])
@pytest.mark.parametrize("method", ["ggn", "block_ggn"])
@pytest.mark.parametrize("reg", REGS[:4], ids=IDS[:4])
def test_gram_scores_equal_dense_scores(kind, measure, method, reg):
    if kind == "mse" and measure == "margin":
        pytest.skip("margin needs classes")
    model, loss, X, y = problem(kind, n=16)
    Xq, yq = X[:5] + 0.1, y[:5]
    inv = matrix_free(method, model, loss, X, y).inverse(reg, solver=Gram())
    assert inv.train_coefficients() is not None
    S = influence_scores(model, loss, inv, train=(X, y), query=(Xq, yq), measure=measure)
    ref = ref_inverse(model, kind, X, y, method, "type2", reg)
    Gq = per_example_grads(model, loss, Xq, yq, measure=measure)
    Gt = per_example_grads(model, loss, X, y)
    torch.testing.assert_close(S, Gq @ ref @ Gt.T, rtol=1e-7, atol=1e-9 * float(S.abs().max()))
    # a different training set goes through apply() (Woodbury / (1)); same numbers
    S2 = influence_scores(model, loss, inv, train=(X[:9], y[:9]), query=(Xq, yq), measure=measure)
    torch.testing.assert_close(S2, S[:, :9], rtol=1e-6, atol=1e-8 * float(S.abs().max()))


def test_train_gradients_lie_in_the_row_space():
    """σ reproduces every training gradient: Mᵀσ_t = ∇ℓ(z_t) (type2, empirical); not for mc."""
    model, loss, X, y = problem("ce", n=10)
    Gt = per_example_grads(model, loss, X, y)
    for fisher in ("type2", "empirical"):
        inv = matrix_free("ggn", model, loss, X, y, fisher=fisher).inverse(
            Regularization(damping=1.0, eps=0.0), solver=Gram()
        )
        sigma = inv.train_coefficients()
        N, K = sigma.shape
        W = torch.zeros(N * K, N, dtype=torch.float64)
        W.view(N, K, N)[torch.arange(N), :, torch.arange(N)] = sigma
        torch.testing.assert_close(inv.rows.tmul(0, W), Gt, rtol=1e-9, atol=1e-12)
    mc = matrix_free("ggn", model, loss, X, y, fisher="mc").inverse(
        Regularization(damping=1.0, eps=0.0), solver=Gram()
    )
    assert mc.train_coefficients() is None


def test_thin_roots_keep_the_output_curvature():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    evals, U = torch.linalg.eigh(Lam)
    Q = (U * evals.clamp_min(0).sqrt()[:, None, :]) @ U.transpose(1, 2)  # symmetric root
    T = thin_roots(Q)
    assert T.shape == (6, 4, 3)  # the softmax Hessian's null direction 1 is dropped
    torch.testing.assert_close(T @ T.transpose(1, 2), Lam, rtol=1e-10, atol=1e-14)


def test_gram_errors():
    model, loss, X, y = problem("ce", n=10)
    with pytest.raises(TypeError, match="GGN-type"):
        matrix_free("hessian", model, loss, X, y).inverse(
            Regularization(damping=1.0, eps=0.0), solver=Gram()
        )
    with pytest.raises(ValueError, match="singular"):
        matrix_free("ggn", model, loss, X, y).inverse(
            Regularization(damping=0.0, eps=0.0), solver=Gram()
        )
    with pytest.raises(ValueError, match="float64"):
        matrix_free("ggn", model, loss, X, y, dtype=torch.float32).inverse(
            Regularization(damping=1.0, eps=0.0), solver=Gram()
        )
    with pytest.raises(ValueError, match="memory budget"):
        matrix_free("block_ggn", model, loss, X, y, max_dense_bytes=2000).inverse(
            Regularization.paper(), solver=Gram()
        )


def test_hessian_preconditioned_by_the_exact_ggn():
    """PCG on H + δI from the Gram GGN answer: first iterate = (G + δI)⁻¹ b; converges to
    the dense (H + δI)⁻¹ b, in fewer iterations than plain CG."""
    model, loss, X, y = problem("ce", n=20, act="tanh")
    H = ref_hessian(model, "ce", X, y)
    delta = max(0.0, -float(torch.linalg.eigvalsh(H).min())) + 0.05
    reg = Regularization(damping=delta, eps=0.0)
    mf = matrix_free("hessian", model, loss, X, y)
    B = torch.randn(
        3, mf.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    ref = torch.linalg.solve(H + delta * torch.eye(len(H), dtype=torch.float64), B.T).T
    first = mf.inverse(
        reg, solver=Preconditioned(preconditioner="ggn", max_iter=0, on_failure="warn")
    )
    G = ref_ggn(model, "ce", X, y)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        x0 = first.apply(B)
    torch.testing.assert_close(
        x0, torch.linalg.solve(G + delta * torch.eye(len(G), dtype=torch.float64), B.T).T
    )
    pcg = mf.inverse(reg, solver=Preconditioned(preconditioner="ggn", tol=1e-10))
    torch.testing.assert_close(pcg.apply(B), ref, rtol=1e-7, atol=1e-9)
    cg = mf.inverse(reg, solver=CG(tol=1e-10))
    cg.apply(B)
    assert int(pcg.reports[0].iterations.max()) < int(cg.reports[0].iterations.max())


def test_mc_scores_fall_back_to_apply():
    """fisher='mc' has no row-space form for training gradients: scores go through apply()."""
    model, loss, X, y = problem("ce", n=12)
    reg = Regularization(damping=1e-2, eps=0.0)
    mf = matrix_free("ggn", model, loss, X, y, fisher="mc", mc_samples=3, seed=1)
    S = influence_scores(model, loss, mf.inverse(reg, solver=Gram()), train=(X, y), query=(X, y))
    ref = influence_scores(model, loss, mf.inverse(reg), train=(X, y), query=(X, y))
    torch.testing.assert_close(S, ref, rtol=1e-7, atol=1e-9 * float(ref.abs().max()))


def test_eigen_cache_gives_the_same_inverse_without_recomputing(tmp_path, monkeypatch):
    model, loss, X, y = problem("ce", n=30)
    reg = Regularization(damping=0.0, eps=1e-4)
    mf = matrix_free("block_ggn", model, loss, X, y)
    fresh = mf.inverse(reg, solver=Gram()).dense()
    cached = mf.inverse(reg, solver=Gram(cache=str(tmp_path))).dense()
    files = sorted(tmp_path.glob("eigh-*.pt"))
    assert len(files) == len(layer_slices(model))  # one per block's Gram matrix
    # the same factors; products with the file-backed copy may round apart in the last bits
    torch.testing.assert_close(cached, fresh, rtol=1e-12, atol=1e-14 * float(fresh.abs().max()))

    calls = []
    real = torch.linalg.eigh

    def counted(A):  # Gram matrices only, not the (n, C, C) output roots
        if A.dim() == 2:
            calls.append(A.shape)
        return real(A)

    monkeypatch.setattr(torch.linalg, "eigh", counted)
    again = mf.inverse(reg, solver=Gram(cache=str(tmp_path))).dense()
    assert calls == [] and torch.equal(again, cached)  # every block read back

    files[0].write_bytes(files[0].read_bytes()[:-100])  # a torn file is recomputed
    repaired = mf.inverse(reg, solver=Gram(cache=str(tmp_path))).dense()
    assert len(calls) == 1 and torch.equal(repaired, cached)

    other = matrix_free("block_ggn", model, loss, X[:20], y[:20])  # another Gram matrix
    other.inverse(reg, solver=Gram(cache=str(tmp_path)))
    assert len(sorted(tmp_path.glob("eigh-*.pt"))) == 2 * len(files)


def test_tensor_file_digest_catches_altered_values(tmp_path):
    from curvinf.storage import CorruptFileError, read_tensors, write_tensors

    U = torch.randn(50, 50, dtype=torch.float64)
    write_tensors(tmp_path / "t.pt", {"U": U})
    assert torch.equal(read_tensors(tmp_path / "t.pt")["U"], U)
    record = torch.load(tmp_path / "t.pt", weights_only=True)
    record["tensors"]["U"][3, 4] += 1.0  # a file rewritten with one value changed
    torch.save(record, tmp_path / "t.pt")
    with pytest.raises(CorruptFileError, match="digest"):
        read_tensors(tmp_path / "t.pt")


def test_cholesky_factors_are_kept_in_the_cache_too(tmp_path, monkeypatch):
    model, loss, X, y = problem("ce", n=30)
    reg = Regularization(damping=1e-2, eps=0.0)
    mf = matrix_free("block_ggn", model, loss, X, y)
    fresh = mf.inverse(reg, solver=Gram()).dense()
    cached = mf.inverse(reg, solver=Gram(cache=str(tmp_path)))
    first = cached.dense()
    assert cached.mode == "cholesky"
    torch.testing.assert_close(first, fresh, rtol=1e-12, atol=1e-14 * float(fresh.abs().max()))
    assert len(list(tmp_path.glob("chol-*.pt"))) == len(layer_slices(model))
    calls = []
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda A: calls.append(1) or real(A))
    again = mf.inverse(reg, solver=Gram(cache=str(tmp_path))).dense()
    assert calls == [] and torch.equal(again, first)
    other = Regularization(damping=2e-2, eps=0.0)  # another damping: another factor
    mf.inverse(other, solver=Gram(cache=str(tmp_path))).dense()
    assert len(calls) == len(layer_slices(model))


def test_a_full_disk_keeps_the_factorisation_in_memory(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    model, loss, X, y = problem("ce", n=30)
    reg = Regularization(damping=0.0, eps=1e-4)
    mf = matrix_free("ggn", model, loss, X, y)
    fresh = mf.inverse(reg, solver=Gram()).dense()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1, 1, 10))
    with pytest.warns(RuntimeWarning, match="kept in memory only"):
        full = mf.inverse(reg, solver=Gram(cache=str(tmp_path))).dense()
    assert not list(tmp_path.glob("*.pt")) and torch.equal(full, fresh)

"""save_curvature / load_curvature: bit-exact round trips, weights_only files, fingerprints,
clear errors for unsaveable objects and damaged files, and the file size."""

from __future__ import annotations

import os

import pytest
import torch
from references import problem
from torch import nn

from curvinf import (
    METHODS,
    Curvature,
    InverseCurvature,
    Regularization,
    fit_curvature,
    influence_scores,
    load_curvature,
    make_mlp,
    save_curvature,
)
from curvinf.curvature import CG, Gram, matrix_free
from curvinf.params import model_fingerprint
from curvinf.persistence import FORMAT_VERSION, LoadedCurvature
from curvinf.storage import CorruptFileError

DENSE_RUNGS = ("hessian", "ggn", "block_hessian", "block_ggn", "unshared_ggn")
REG = Regularization(damping=1e-3, eps=1e-8)


def fitted(method: str, kind: str = "ce", seed: int = 0):
    """A fitted curvature carrying its model's fingerprint, with the model and data."""
    model, loss, X, y = problem(kind, seed=seed)
    curv = fit_curvature(method, model, loss, X, y)
    if getattr(curv, "model_fingerprint", None) is None:  # before fit_curvature records it
        curv.model_fingerprint = model_fingerprint(model)
    return curv, model, loss, X, y


def rows(D: int) -> torch.Tensor:
    return torch.randn(4, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_is_bit_exact_for_every_method(method, kind, tmp_path):
    curv, *_ = fitted(method, kind)
    path = save_curvature(curv, tmp_path / "c.pt")
    loaded = load_curvature(path)
    assert isinstance(loaded, Curvature)
    assert (loaded.method, loaded.num_params) == (method, curv.num_params)
    V = rows(curv.num_params)
    assert torch.equal(loaded.inverse(REG).apply(V), curv.inverse(REG).apply(V))
    assert torch.equal(loaded.matvec(V), curv.matvec(V))
    assert torch.equal(loaded.eigenvalues(), curv.eigenvalues())
    # the file holds U and λ only: a dense rung comes back as U diag(λ) Uᵀ, equal to the
    # fitted matrix to rounding; every other rung's dense() is that product already
    assert torch.equal(loaded.dense(), Curvature.dense(curv))
    if method in DENSE_RUNGS:
        torch.testing.assert_close(loaded.dense(), curv.dense(), rtol=1e-12, atol=1e-14)
    else:
        assert torch.equal(loaded.dense(), curv.dense())


@pytest.mark.parametrize("method", ["ggn", "block_hessian", "ekfac", "diag_ggn"])
def test_inverse_round_trip(method, tmp_path):
    curv, *_ = fitted(method)
    inv = curv.inverse(Regularization(damping=1e-2, eps=1e-3, relative=True))
    loaded = load_curvature(save_curvature(inv, tmp_path / "inv.pt"))
    assert isinstance(loaded, InverseCurvature)
    assert loaded.reg == inv.reg and loaded.rank == inv.rank
    assert loaded.curvature.method == method
    V = rows(curv.num_params)
    assert torch.equal(loaded.apply(V), inv.apply(V))
    assert torch.equal(loaded.dense(), inv.dense())
    assert torch.equal(loaded.curvature.matvec(V), curv.matvec(V))


def test_scores_of_a_loaded_inverse_equal_the_original(tmp_path):
    for method in ("ggn", "kfac"):  # dense route and the Kronecker scoring route
        curv, model, loss, X, y = fitted(method)
        inv = curv.inverse(REG)
        loaded = load_curvature(save_curvature(inv, tmp_path / "inv.pt"), model=model)
        score = {"train": (X, y), "query": (X[:3], y[:3])}
        assert torch.equal(
            influence_scores(model, loss, loaded, **score),
            influence_scores(model, loss, inv, **score),
        )


def test_file_loads_with_torch_weights_only(tmp_path):
    curv, model, *_ = fitted("ekfac")
    path = save_curvature(curv.inverse(REG), tmp_path / "inv.pt")
    record = torch.load(path, weights_only=True)
    assert torch.load(path)["checksum"] == record["checksum"]  # torch's default
    assert record["format_version"] == FORMAT_VERSION
    assert (record["kind"], record["method"]) == ("inverse", "ekfac")
    assert record["inverse"]["regularization"] == {"damping": 1e-3, "eps": 1e-8, "relative": False}
    assert record["model_fingerprint"] == model_fingerprint(model)


def test_loaded_objects_carry_the_fingerprint(tmp_path):
    curv, model, *_ = fitted("block_ggn")
    fp = model_fingerprint(model)
    loaded = load_curvature(save_curvature(curv, tmp_path / "c.pt"))
    assert loaded.model_fingerprint == fp
    assert loaded.inverse(REG).curvature.model_fingerprint == fp
    inv = load_curvature(save_curvature(curv.inverse(REG), tmp_path / "inv.pt"))
    assert inv.model_fingerprint == fp and inv.curvature.model_fingerprint == fp
    # a loaded object saves again to an equal file
    again = load_curvature(save_curvature(loaded, tmp_path / "again.pt"))
    assert again.model_fingerprint == fp and torch.equal(again.dense(), loaded.dense())


def test_load_with_model_refuses_another_model(tmp_path):
    curv, model, *_ = fitted("kfac")
    path = save_curvature(curv, tmp_path / "c.pt")
    assert load_curvature(path, model=model).model_fingerprint == model_fingerprint(model)
    other, *_ = problem("ce", seed=1)  # same structure and size, other weights
    assert sum(p.numel() for p in other.parameters()) == curv.num_params
    with pytest.raises(ValueError, match="fingerprint") as err:
        load_curvature(path, model=other)
    assert "fit the curvature on this model or load the file that was fitted on it" in str(
        err.value
    )
    bigger, *_ = problem("ce", width=6)
    with pytest.raises(ValueError, match="parameters"):
        load_curvature(path, model=bigger)


def test_load_with_model_needs_a_recorded_fingerprint(tmp_path):
    curv, model, *_ = fitted("diag_ggn")
    curv.model_fingerprint = None
    path = save_curvature(curv, tmp_path / "c.pt")
    assert load_curvature(path).model_fingerprint is None
    with pytest.raises(ValueError, match="records no model fingerprint"):
        load_curvature(path, model=model)


def test_unsaveable_objects_raise_type_error(tmp_path):
    model, loss, X, y = problem("ce")
    mf = matrix_free("ggn", model, loss, X, y)
    cases = [
        (mf, "matrix_free"),
        (mf.inverse(Regularization(damping=1e-2, eps=0), solver=CG()), "solver"),
        (mf.inverse(Regularization(damping=1e-2, eps=0), solver=Gram()), "Gram"),
        (torch.eye(3), "fit_curvature"),
    ]
    for obj, phrase in cases:
        with pytest.raises(TypeError, match=phrase) as err:
            save_curvature(obj, tmp_path / "x.pt")
        assert "fit_curvature" in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary


def test_save_replaces_atomically(tmp_path):
    path = tmp_path / "c.pt"
    save_curvature(fitted("identity")[0], path)
    save_curvature(fitted("diag_ggn")[0], path)
    assert load_curvature(path).method == "diag_ggn"
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    with pytest.raises(TypeError):
        save_curvature(matrix_free("ggn", *problem("ce")), path)
    assert load_curvature(path).method == "diag_ggn"  # a failed save leaves the old file


def test_damaged_or_foreign_files_raise_corrupt_file_error(tmp_path):
    path = save_curvature(fitted("ggn")[0], tmp_path / "c.pt")
    raw = path.read_bytes()
    cases = {
        "truncated.pt": raw[: len(raw) // 2],
        "empty.pt": b"",
        "random.pt": os.urandom(4096),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"weights": torch.ones(3)}, tmp_path / "foreign.pt")
    record = torch.load(path)
    record["blocks"][0]["evals"][0] += 1.0
    torch.save(record, tmp_path / "altered.pt")
    for name in [*cases, "foreign.pt", "altered.pt"]:
        with pytest.raises(CorruptFileError, match=name):
            load_curvature(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        load_curvature(tmp_path / "missing.pt")


def test_newer_format_version_is_refused(tmp_path):
    path = save_curvature(fitted("identity")[0], tmp_path / "c.pt")
    record = torch.load(path)
    record["format_version"] = FORMAT_VERSION + 1
    torch.save(record, path)
    with pytest.raises(ValueError, match="newer curvinf") as err:
        load_curvature(path)
    assert not isinstance(err.value, CorruptFileError)


def test_dense_ggn_file_holds_one_d_by_d_matrix(tmp_path):
    torch.manual_seed(0)
    model = make_mlp(20, 3, depth=1, width=8, seed=0, dtype=torch.float64)
    X, y = torch.randn(40, 20, dtype=torch.float64), torch.randint(0, 3, (40,))
    curv = fit_curvature("ggn", model, nn.CrossEntropyLoss(), X, y)
    D = curv.num_params
    size = save_curvature(curv, tmp_path / "ggn.pt").stat().st_size
    assert 8 * D * D < size < 8 * D * D + 64 * D + 64 * 1024  # U once, not also C (2x)
    assert isinstance(load_curvature(tmp_path / "ggn.pt"), LoadedCurvature)


def test_eigendecomposed_inverse_of_a_matrix_free_curvature_saves(tmp_path):
    model, loss, X, y = problem("mse")
    inv = matrix_free("block_ggn", model, loss, X, y).inverse(REG)  # no solver: eigh of dense()
    loaded = load_curvature(save_curvature(inv, tmp_path / "inv.pt"))
    V = rows(inv.num_params)
    assert torch.equal(loaded.apply(V), inv.apply(V))
    assert loaded.curvature.method == "block_ggn"

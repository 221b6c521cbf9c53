"""The factored GGN and the chain Hessian (curvature/chain.py) against torch.func references.

References (tests/test_any_model.py) are ``torch.func`` alone on the flat parameter vector,
float64: ``hessian`` of the mean loss, per-example ``jacrev`` Jacobians for the GGN.
"""

from __future__ import annotations

import pytest
import torch
from references import block_diag_of
from test_any_model import TinyCNN, ref_ggn, ref_hessian, seeded
from torch import nn

from curvinf import fit_curvature
from curvinf.curvature import chain
from curvinf.curvature.context import FitContext, FitSettings

CE, MSE = nn.CrossEntropyLoss(), nn.MSELoss()


def chains() -> dict[str, nn.Sequential]:
    return {
        "cnn": nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(3, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 5),
            nn.ReLU(),
            nn.Linear(5, 3),
        ),
        "cnn-variants": nn.Sequential(
            nn.Conv2d(1, 2, 3, dilation=2, padding="same", bias=False),
            nn.LeakyReLU(0.1),
            nn.MaxPool2d(2),
            nn.Conv2d(2, 3, 2, padding=1, padding_mode="reflect"),
            nn.ReLU6(),
            nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Dropout(0.5)),
            nn.Flatten(),
            nn.Linear(12, 4, bias=False),
            nn.Hardtanh(),
            nn.Identity(),
            nn.Linear(4, 3),
        ),
        "unflatten-first": nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 2, 3, stride=2),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(18, 3),
        ),
    }


def data(name: str, kind: str, n: int = 7):
    g = torch.Generator().manual_seed(3)
    shape = (n, 64) if name == "unflatten-first" else (n, 1, 8, 8)
    X = torch.randn(shape, dtype=torch.float64, generator=g)
    if kind == "ce":
        return X, torch.randint(0, 3, (n,), generator=g)
    return X, torch.randn(n, 3, dtype=torch.float64, generator=g)


def module_blocks(model: nn.Module, partition: str) -> list[slice]:
    out, start = [], 0
    for m in model.modules():
        sizes = [p.numel() for p in m.parameters(recurse=False)]
        if partition == "tensor":
            for s in sizes:
                out.append(slice(start, start + s))
                start += s
        elif sizes:
            out.append(slice(start, start + sum(sizes)))
            start += sum(sizes)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def route(method: str, model, loss, X, y, **kw):
    """The chain module's own result (``None``: refused), not the dispatcher's."""
    ctx = FitContext.build(model, loss, X, y, FitSettings(progress=False, **kw))
    whole = method in ("hessian", "ggn")
    blocks = ctx.whole() if whole else ctx.blocks(kw.get("partition", "layer"))
    fn = chain.hessian_blocks if "hessian" in method else chain.ggn_blocks
    got = fn(ctx, blocks)
    if got is None:
        return None
    C = torch.zeros(ctx.num_params, ctx.num_params, dtype=torch.float64)
    for b, M in got:
        C[b.index[:, None], b.index[None, :]] = M
    return C


@pytest.mark.parametrize("name", list(chains()))
@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_chain_hessian_equals_torch_func(name, kind):
    model = seeded(chains()[name])
    X, y = data(name, kind)
    loss = CE if kind == "ce" else MSE
    H = ref_hessian(model, loss, X, y)
    got = route("hessian", model, loss, X, y, chunk_size=3)
    assert got is not None, "the chain route refused a chain it describes"
    assert rel(got, H) < 1e-10
    assert rel(fit_curvature("hessian", model, loss, X, y, chunk_size=3).dense(), H) < 1e-10
    for partition in ("layer", "tensor"):
        want = block_diag_of(H, module_blocks(model, partition))
        got = route("block_hessian", model, loss, X, y, partition=partition)
        assert got is not None and rel(got, want) < 1e-10


def test_chain_hessian_with_a_conv_output_and_mse():
    """No head: the last layer's output (N, C, H, W) is the model's output."""
    model = seeded(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3, stride=2)))
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 1, 8, 8, dtype=torch.float64, generator=g)
    y = torch.randn(5, 2, 2, 2, dtype=torch.float64, generator=g)
    got = route("hessian", model, MSE, X, y)
    assert got is not None and rel(got, ref_hessian(model, MSE, X, y)) < 1e-10


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_factored_ggn_equals_torch_func(kind):
    """TinyCNN: not a Sequential, tanh between its layers: the GGN route takes it, the
    Hessian route not."""
    X, y = data("cnn", kind)
    loss = CE if kind == "ce" else MSE
    for model in (seeded(TinyCNN()), seeded(chains()["cnn"])):
        G = ref_ggn(model, loss, X, y)
        got = route("ggn", model, loss, X, y, chunk_size=4)
        assert got is not None and rel(got, G) < 1e-10
        want = block_diag_of(G, module_blocks(model, "layer"))
        assert rel(route("block_ggn", model, loss, X, y), want) < 1e-10
    assert route("hessian", model, loss, X, y) is not None
    assert route("hessian", seeded(TinyCNN()), loss, X, y) is None


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_factored_ggn_fisher_variants_equal_the_generic_route(monkeypatch, fisher):
    model = seeded(TinyCNN())
    X, y = data("cnn", "ce")
    kw = {"fisher": fisher, "mc_samples": 3, "seed": 4, "chunk_size": 3}
    fast = fit_curvature("ggn", model, CE, X, y, **kw).dense()
    monkeypatch.setattr(chain, "ggn_blocks", lambda ctx, blocks: None)
    assert rel(fast, fit_curvature("ggn", model, CE, X, y, **kw).dense()) < 1e-12


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def refused_models() -> dict[str, nn.Module]:
    shared = nn.Linear(3, 3)
    hooked = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3))
    hooked[1].register_forward_hook(lambda m, a, out: 2 * out)
    return {
        "tanh glue": nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(72, 3)),
        "hook": hooked,
        "shared layer": nn.Sequential(
            nn.Flatten(), nn.Linear(64, 3), nn.ReLU(), shared, nn.ReLU(), shared
        ),
        "Sequential subclass": type(
            "Sub", (nn.Sequential,), {"forward": lambda s, x: nn.Sequential.forward(s, 2 * x)}
        )(nn.Flatten(), nn.Linear(64, 3)),
    }


@pytest.mark.parametrize("name", list(refused_models()))
def test_chain_hessian_refuses_what_it_cannot_prove(name):
    model = seeded(refused_models()[name])
    X, y = data("cnn", "ce", n=4)
    assert route("hessian", model, CE, X, y) is None


def test_the_probe_catches_glue_the_route_misdescribes(monkeypatch):
    """Declaring tanh piecewise linear passes the structure check; the Hessian-vector product
    check refuses it, and the fit is still right (generic route)."""
    monkeypatch.setattr(chain, "GLUE", (*chain.GLUE, nn.Tanh))
    monkeypatch.setattr(chain, "ELEMENTWISE", (*chain.ELEMENTWISE, nn.Tanh))
    model = seeded(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(72, 3)))
    X, y = data("cnn", "ce", n=4)
    assert route("hessian", model, CE, X, y) is None
    assert route("block_hessian", model, CE, X, y) is None  # each block is checked
    H = ref_hessian(model, CE, X, y)
    assert rel(fit_curvature("hessian", model, CE, X, y).dense(), H) < 1e-10


@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_lower_block_gram_is_the_full_gram(block):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(11, 13, dtype=torch.float64, generator=g)
    acc = torch.zeros(13, 13, dtype=torch.float64)
    chain.add_gram(acc, M, block)
    chain.add_gram(acc, 2 * M, block)
    assert rel(chain.mirror_gram(acc, block), 5 * M.T @ M) < 1e-14

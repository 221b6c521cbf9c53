"""K-FAC / EK-FAC with weight sharing: Conv2d, Linear over sequences, a Linear called twice,
and the parameters no adapter covers.

References are built here, independently of curvinf's capture: layer inputs unfolded with
``F.unfold`` (checked to reproduce the layer's output first), Jacobians of the model's
output with respect to each layer output by ``jacrev``, output Hessians by ``hessian`` of
the per-example loss written out (per-position cross-entropy as the mean over positions,
MSE over every entry), block GGNs from ``jacrev`` over the flat parameters. Definitions
(Eschenhagen et al. 2023), T positions per example:

    expand: A = 1/(N T) Σ_{n,t} ã_nt ã_ntᵀ,   S = 1/N Σ_n Σ_t J_ntᵀ H_n J_nt
    reduce: A = 1/N Σ_n ā_n ā_nᵀ (ā_n = 1/T Σ_t ã_nt),   S = 1/N Σ_n J̄_nᵀ H_n J̄_n
            (J̄_n = Σ_t J_nt)

with ``J_nt = ∂f_n/∂z_nt`` (F, out) and ``H_n = ∂²ℓ_n/∂f_n²`` (type-2). Exactness (the
paper's Sec. 3): expand is exact for deep linear networks whose loss treats positions
independently (MSE per position), reduce for deep linear networks that pool positions
before an MSE loss; both for one example with one position.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from references import flat_fn
from torch import nn
from torch.func import grad, hessian, jacrev, vmap

from curvinf import Regularization, fit_curvature, influence_scores

CE, MSE = nn.CrossEntropyLoss(), nn.MSELoss()
REG = Regularization(damping=1e-2, eps=0.0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.6)
    return model.double().eval()


def example_loss(loss: nn.Module, out_n: torch.Tensor, y_n: torch.Tensor) -> torch.Tensor:
    if isinstance(loss, nn.CrossEntropyLoss):
        return F.cross_entropy(out_n.reshape(-1, out_n.shape[-1]), y_n.reshape(-1))
    return ((out_n - y_n) ** 2).sum() / out_n.numel()


def output_hessians(loss, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``H_n`` (N, F, F) over the flattened outputs."""
    shape = f.shape[1:]
    return torch.stack(
        [
            hessian(lambda o, n=n: example_loss(loss, o.reshape(shape), y[n]))(f[n].reshape(-1))
            for n in range(len(f))
        ]
    )


def ref_block_ggn(model, loss, X, y) -> torch.Tensor:
    """The exact GGN restricted to each module's own parameters (blocks), (D, D)."""
    f, theta = flat_fn(model)
    G = torch.zeros(len(theta), len(theta), dtype=torch.float64)
    out = f(theta, X).detach()
    H = output_hessians(loss, out, y)
    for n in range(len(X)):
        J = jacrev(lambda t, n=n: f(t, X[n : n + 1])[0].reshape(-1))(theta)
        G += J.T @ H[n] @ J
    G /= len(X)
    B = torch.zeros_like(G)
    for s in module_slices(model):
        B[s, s] = G[s, s]
    return B


def module_slices(model: nn.Module) -> list[slice]:
    """Flat ranges of each module's own parameters (contiguous in these models)."""
    sizes: dict[str, int] = {}
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        sizes[owner] = sizes.get(owner, 0) + p.numel()
    bounds = torch.tensor([0, *sizes.values()]).cumsum(0).tolist()
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def matrix_perm(out: int, n_in: int, bias: bool) -> torch.Tensor:
    """Flat position (weight row-major, then bias) of each entry of ``[W | b]``."""
    w = torch.arange(out * n_in).reshape(out, n_in)
    if bias:
        w = torch.cat([w, out * n_in + torch.arange(out)[:, None]], dim=1)
    return w.reshape(-1)


def ref_factors(calls, H: torch.Tensor, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, S)`` from ``calls``: per use of the layer ``(ã (N, T_c, in'), J (N, F, T_c, out))``,
    positions of all uses together (module doc)."""
    a = torch.cat([c[0] for c in calls], dim=1)
    J = torch.cat([c[1] for c in calls], dim=2)
    N, T = a.shape[:2]
    if variant == "expand":
        A = torch.einsum("nti,ntj->ij", a, a) / (N * T)
        S = torch.einsum("nfto,nfg,ngtp->op", J, H, J) / N
    else:
        abar, Jbar = a.mean(1), J.sum(2)
        A = abar.T @ abar / N
        S = torch.einsum("nfo,nfg,ngp->op", Jbar, H, Jbar) / N
    return A, S


def conv_jacobian(post, z: torch.Tensor) -> torch.Tensor:
    """``J[n, f, t, o] = ∂post(z)_n,f / ∂z[n, o, t]`` for a conv output ``z`` (N, out, H, W),
    ``t`` the pixel in row-major order: (N, F, T, out)."""
    J = torch.stack([jacrev(lambda zn: post(zn[None])[0].reshape(-1))(zn) for zn in z])
    return J.flatten(3).transpose(2, 3)


def with_ones(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


# ---------------------------------------------------------------- models


class ConvNet(nn.Module):
    def __init__(self, C: int = 3, **conv) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, **conv)
        self.head = nn.LazyLinear(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def conv_net(**conv) -> nn.Module:
    model = ConvNet(**conv)
    model(torch.zeros(1, 2, 5, 5))  # materialise the head
    return seeded(model)


class SeqNet(nn.Module):
    """(N, T, 3) -> (N, T, C); positions mix after the first layer."""

    def __init__(self, C: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.head = nn.Linear(4, C)

    def post(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(z)
        return self.head(h + h.mean(1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.inp(x))


class SharedNet(nn.Module):
    """One square Linear called twice: (N, 4) -> (N, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inp(torch.tanh(self.inp(x)))))


def data(shape, n: int, out_shape=None, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    if out_shape is None:
        return X, torch.randint(0, classes, (n,), generator=g)
    return X, torch.randint(0, classes, (n, *out_shape), generator=g)


# ---------------------------------------------------------------- factors


CONVS = [
    {"stride": 2, "padding": 1},
    {"padding": "same", "dilation": 2, "padding_mode": "reflect"},
    {"stride": (1, 2), "padding": (1, 0), "bias": False},
]


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("variant", ["expand", "reduce"])
def test_conv2d_factors_match_unfolded_patches(conv, variant):
    model = conv_net(**conv)
    X, y = data((2, 5, 5), 4)
    layer = model.conv
    with torch.no_grad():
        z = layer(X)
        if conv.get("padding") == "same":  # dilation 2, kernel 3: 2 pixels each side
            padded = F.pad(X, (2, 2, 2, 2), mode="reflect")
            patches = F.unfold(padded, 3, dilation=2)
        else:
            patches = F.unfold(X, 3, padding=conv["padding"], stride=conv["stride"])
    patches = patches.transpose(1, 2)  # (N, T, 2·3·3)
    W = layer.weight.detach().reshape(3, -1)
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(3).double()
    assert rel(patches @ W.T + bias, z.flatten(2).transpose(1, 2)) < 1e-12  # the patches are right
    a = with_ones(patches) if layer.bias is not None else patches

    def post(zz):
        return model.head(torch.tanh(zz).flatten(1))

    J = conv_jacobian(post, z)
    H = output_hessians(CE, model(X).detach(), y)
    A, S = ref_factors([(a, J)], H, variant)
    curv = fit_curvature("kfac", model, CE, X, y, kfac_variant=variant)
    assert rel(curv.factors[0].A, A) < 1e-10
    assert rel(curv.factors[0].S, S) < 1e-10
    s = module_slices(model)[0]
    perm = matrix_perm(3, 18, layer.bias is not None)
    assert rel(curv.dense()[s, s][perm][:, perm], torch.kron(S, A)) < 1e-10


def sequence_case():
    """:class:`SeqNet` on 4 sequences with the references of its first layer:
    ``(model, X, y, calls, H)`` (module doc)."""
    model = seeded(SeqNet())
    X, y = data((5, 3), 4, out_shape=(5,))
    with torch.no_grad():
        z = model.inp(X)
    J = torch.stack([jacrev(lambda zn: model.post(zn[None])[0].reshape(-1))(zn) for zn in z])
    H = output_hessians(CE, model(X).detach(), y)
    return model, X, y, [(with_ones(X), J)], H


@pytest.mark.parametrize("variant", ["expand", "reduce"])
def test_sequence_linear_factors(variant):
    model, X, y, calls, H = sequence_case()
    A, S = ref_factors(calls, H, variant)
    curv = fit_curvature("kfac", model, CE, X, y, kfac_variant=variant)
    assert rel(curv.factors[0].A, A) < 1e-10
    assert rel(curv.factors[0].S, S) < 1e-10


def shared_case():
    """:class:`SharedNet` on 5 examples with the references of its twice-called layer:
    ``(model, X, y, calls, H)``, ``calls`` one ``(ã, J)`` per call (module doc)."""
    model = seeded(SharedNet())
    X, y = data((4,), 5)
    lin, head = model.inp, model.head
    with torch.no_grad():
        z1 = lin(X)
        h = torch.tanh(z1)
        z2 = lin(h)
    J1 = jacrev(lambda z: head(torch.tanh(lin(torch.tanh(z)))).reshape(-1))
    J2 = jacrev(lambda z: head(torch.tanh(z)).reshape(-1))
    J1 = torch.stack([J1(z1[n]) for n in range(len(X))])[:, :, None]  # (N, F, 1, out)
    J2 = torch.stack([J2(z2[n]) for n in range(len(X))])[:, :, None]
    H = output_hessians(CE, model(X).detach(), y)
    return model, X, y, [(with_ones(X)[:, None], J1), (with_ones(h)[:, None], J2)], H


@pytest.mark.parametrize("variant", ["expand", "reduce"])
def test_linear_called_twice_has_the_positions_of_both_calls(variant):
    model, X, y, calls, H = shared_case()
    A, S = ref_factors(calls, H, variant)
    curv = fit_curvature("kfac", model, CE, X, y, kfac_variant=variant)
    assert rel(curv.factors[0].A, A) < 1e-10
    assert rel(curv.factors[0].S, S) < 1e-10


# ---------------------------------------------------------------- exactness


class PerPosition(nn.Module):
    """Deep linear, positions independent: (N, T, 3) -> (N, T, 2) or images -> images."""

    def __init__(self, conv: bool, pool: bool) -> None:
        super().__init__()
        self.pool = pool
        if conv:
            self.a, self.b, self.dims = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 1), (2, 3)
        else:
            self.a, self.b, self.dims = nn.Linear(3, 4), nn.Linear(4, 2), (1,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.b(self.a(x))
        return out.mean(self.dims) if self.pool else out


def linear_case(conv: bool, pool: bool, n: int = 3):
    model = seeded(PerPosition(conv, pool))
    g = torch.Generator().manual_seed(2)
    X = torch.randn(n, *((2, 4, 4) if conv else (5, 3)), generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = torch.randn(model(X).shape, generator=g, dtype=torch.float64)
    return model, X, y


@pytest.mark.parametrize("conv", [False, True], ids=["sequence", "conv"])
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
@pytest.mark.parametrize(
    ("pool", "exact", "other"),
    [(False, "expand", "reduce"), (True, "reduce", "expand")],
    ids=["per-position-loss:expand", "pooled:reduce"],
)
def test_the_papers_exact_variant_equals_the_block_ggn(conv, method, pool, exact, other):
    """Deep linear networks under MSE: expand is exact when the loss treats positions
    independently, reduce when the positions are pooled before the loss; the other
    variant is not."""
    model, X, y = linear_case(conv, pool)
    B = ref_block_ggn(model, MSE, X, y)
    got = fit_curvature(method, model, MSE, X, y, kfac_variant=exact).dense()
    assert rel(got, B) < 1e-10
    wrong = fit_curvature(method, model, MSE, X, y, kfac_variant=other).dense()
    assert rel(wrong, B) > 1e-3


def one_position_cases():
    g = torch.Generator().manual_seed(3)
    conv = nn.Sequential(nn.Conv2d(2, 3, 5), nn.Tanh(), nn.Flatten(), nn.Linear(3, 3))
    X = torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64)
    yield "conv", seeded(conv), X, torch.tensor([1])
    Xs = torch.randn(1, 1, 3, generator=g, dtype=torch.float64)
    yield "sequence", seeded(SeqNet()), Xs, torch.tensor([[2]])


@pytest.mark.parametrize("variant", ["expand", "reduce"])
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_one_example_one_position_type2_equals_block_ggn(variant, method):
    for _, model, X, y in one_position_cases():
        B = ref_block_ggn(model, CE, X, y)
        got = fit_curvature(method, model, CE, X, y, kfac_variant=variant, fisher="type2")
        assert rel(got.dense(), B) < 1e-9


@pytest.mark.parametrize("variant", ["expand", "reduce"])
@pytest.mark.parametrize("name", ["conv", "shared"])
def test_ekfac_eigenvalues_are_the_block_ggn_diagonal_in_the_kronecker_basis(variant, name):
    if name == "conv":
        model, (X, y) = conv_net(stride=2, padding=1), data((2, 5, 5), 4)
    else:
        model, (X, y) = seeded(SharedNet()), data((4,), 5)
    B = ref_block_ggn(model, CE, X, y)
    curv = fit_curvature("ekfac", model, CE, X, y, kfac_variant=variant)
    for (_, U_S, _, U_A), ev, s, ad in zip(
        curv.bases, curv.corrected_evals, module_slices(model), curv.adapters, strict=True
    ):
        out, n_in = ad.matrix_shape
        perm = matrix_perm(out, n_in, ad.has_bias)
        U = torch.kron(U_S, U_A)
        expected = torch.diag(U.T @ B[s, s][perm][:, perm] @ U).reshape(ev.shape)
        assert rel(ev, expected) < 1e-9
    kfac = fit_curvature("kfac", model, CE, X, y, kfac_variant=variant).dense()
    assert (curv.dense() - B).norm() < (kfac - B).norm()


# ---------------------------------------------------------------- scores


def ref_grads(model, loss, X, y) -> torch.Tensor:
    f, theta = flat_fn(model)
    one = grad(lambda t, x, yy: example_loss(loss, f(t, x[None])[0], yy))
    return vmap(one, in_dims=(None, 0, 0))(theta, X, y)


@pytest.mark.parametrize("name", ["conv", "sequence", "shared"])
def test_kronecker_scores_with_weight_sharing_match_brute_force(name):
    if name == "conv":
        model, (X, y) = conv_net(stride=2, padding=1), data((2, 5, 5), 5)
    elif name == "sequence":
        model, (X, y) = seeded(SeqNet()), data((5, 3), 5, out_shape=(5,))
    else:
        model, (X, y) = seeded(SharedNet()), data((4,), 5)
    inv = fit_curvature("ekfac", model, CE, X, y, kfac_variant="reduce").inverse(REG)
    G = ref_grads(model, CE, X, y)
    want = G[:3] @ inv.dense() @ G.T
    got = influence_scores(model, CE, inv, train=(X, y), query=(X[:3], y[:3]), chunk_size=2)
    assert rel(got, want) < 1e-9


# ---------------------------------------------------------------- uncovered parameters


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.norm = nn.LayerNorm(3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.emb(x)))
        return self.head(h + h.mean(1, keepdim=True))


def token_case():
    g = torch.Generator().manual_seed(4)
    X = torch.randint(0, 5, (4, 3), generator=g)
    return seeded(TokenNet()), X, torch.randint(0, 3, (4, 3), generator=g)


def test_uncovered_parameters_are_refused_by_default_naming_the_option():
    model, X, y = token_case()
    with pytest.raises(TypeError, match=r"\(Embedding\) is not supported by kfac.*uncovered="):
        fit_curvature("kfac", model, CE, X, y)


@pytest.mark.parametrize("policy", ["exact", "diagonal"])
def test_uncovered_parameters_get_an_exact_block_or_the_ggn_diagonal(policy):
    model, X, y = token_case()
    B = ref_block_ggn(model, CE, X, y)
    curv = fit_curvature("ekfac", model, CE, X, y, uncovered=policy)
    want = "exact GGN block" if policy == "exact" else "GGN diagonal"
    assert curv.uncovered == {"emb": want, "norm": want}
    C = curv.dense()
    emb, norm, head = module_slices(model)
    for s in (emb, norm):
        ref = B[s, s] if policy == "exact" else torch.diag(torch.diag(B[s, s]))
        assert rel(C[s, s], ref) < 1e-10
    assert C[emb, head].abs().max() == 0 and C[norm, emb].abs().max() == 0
    # the covered layer is EK-FAC's: the exact block's diagonal in its Kronecker basis
    (_, U_S, _, U_A), ev = curv.bases[0], curv.corrected_evals[0]
    U = torch.kron(U_S, U_A)
    perm = matrix_perm(3, 3, True)
    assert rel(ev.reshape(-1), torch.diag(U.T @ B[head, head][perm][:, perm] @ U)) < 1e-9
    inv = curv.inverse(REG)
    G = ref_grads(model, CE, X, y)
    got = influence_scores(model, CE, inv, train=(X, y), query=(X[:2], y[:2]))
    assert rel(got, G[:2] @ inv.dense() @ G.T) < 1e-9


def test_multihead_attention_projections_are_uncovered_and_recorded():
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x, need_weights=False)[0])

    model = seeded(Attn())
    g = torch.Generator().manual_seed(5)
    X = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (3, 4), generator=g)
    with pytest.raises(TypeError, match="MultiheadAttention"):
        fit_curvature("kfac", model, CE, X, y)
    curv = fit_curvature("kfac", model, CE, X, y, uncovered="diagonal")
    assert curv.uncovered == {"attn": "GGN diagonal", "attn.out_proj": "GGN diagonal"}
    B = ref_block_ggn(model, CE, X, y)
    C = curv.dense()
    attn = slice(0, module_slices(model)[1].stop)
    assert rel(C[attn, attn], torch.diag(torch.diag(B[attn, attn]))) < 1e-10


def test_grouped_conv_is_refused_or_treated_as_uncovered():
    model = seeded(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(18, 3)))
    X, y = data((2, 5, 5), 3)
    with pytest.raises(TypeError, match="groups=2"):
        fit_curvature("kfac", model, CE, X, y)
    curv = fit_curvature("kfac", model, CE, X, y, uncovered="exact")
    assert curv.uncovered == {"0": "exact GGN block"}
    s = module_slices(model)[0]
    assert rel(curv.dense()[s, s], ref_block_ggn(model, CE, X, y)[s, s]) < 1e-10


def test_an_exact_uncovered_block_over_the_memory_budget_is_refused():
    model, X, y = token_case()
    with pytest.raises(ValueError, match="uncovered='diagonal'"):
        fit_curvature("kfac", model, CE, X, y, uncovered="exact", max_dense_bytes=100)


# ---------------------------------------------------------------- the unshared GGN


def ref_unshared(calls, H: torch.Tensor, variant: str) -> torch.Tensor:
    """The matrix K-FAC factorises (curvinf.curvature.sharing), in ``[W | b]`` matrix order:
    expand ``1/N Σ_{n,t} (J_ntᵀ H_n J_nt) ⊗ ã_nt ã_ntᵀ``, reduce ``1/N Σ_n (J̄_nᵀ H_n J̄_n) ⊗
    ā_n ā_nᵀ``, positions of all uses together."""
    a = torch.cat([c[0] for c in calls], dim=1)
    J = torch.cat([c[1] for c in calls], dim=2)
    if variant == "reduce":
        a, J = a.mean(1, keepdim=True), J.sum(2, keepdim=True)
    S = torch.einsum("nfto,nfg,ngtp->ntop", J, H, J)
    G = torch.einsum("ntop,nti,ntj->oipj", S, a, a) / len(a)
    d = G.shape[0] * G.shape[1]
    return G.reshape(d, d).detach()


def unshared_block(model, X, y, variant: str, index: int = 0) -> torch.Tensor:
    """Module ``index``'s block of curvinf's unshared GGN, in ``[W | b]`` matrix order."""
    curv = fit_curvature("unshared_ggn", model, CE, X, y, kfac_variant=variant)
    assert curv.variant == variant
    s = module_slices(model)[index]
    weight = list(model.modules())[1 + index].weight  # the module's own weight
    perm = matrix_perm(weight.shape[0], weight[0].numel(), True)
    return curv.dense()[s, s][perm][:, perm]


@pytest.mark.parametrize("variant", ["expand", "reduce"])
def test_unshared_ggn_of_a_conv2d_from_unfolded_patches(variant):
    model = conv_net(stride=2, padding=1)
    X, y = data((2, 5, 5), 4)
    with torch.no_grad():
        z = model.conv(X)
    patches = F.unfold(X, 3, padding=1, stride=2).transpose(1, 2)

    def post(zz):
        return model.head(torch.tanh(zz).flatten(1))

    H = output_hessians(CE, model(X).detach(), y)
    want = ref_unshared([(with_ones(patches), conv_jacobian(post, z))], H, variant)
    assert rel(unshared_block(model, X, y, variant), want) < 1e-10


@pytest.mark.parametrize("variant", ["expand", "reduce"])
def test_unshared_ggn_of_sequence_and_twice_called_linears(variant):
    for model, X, y, calls, H in (sequence_case(), shared_case()):
        want = ref_unshared(calls, H, variant)
        assert rel(unshared_block(model, X, y, variant), want) < 1e-10


@pytest.mark.parametrize("variant", ["expand", "reduce"])
def test_unshared_ggn_is_the_block_ggn_without_weight_sharing(variant):
    """One position per example (an MLP): the weight-sharing step is exact, per layer
    (joint bias) or per tensor (separate bias)."""
    model = seeded(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    X, y = data((4,), 6)
    B = ref_block_ggn(model, CE, X, y)
    got = fit_curvature("unshared_ggn", model, CE, X, y, kfac_variant=variant).dense()
    assert rel(got, B) < 1e-12
    tensors = fit_curvature("block_ggn", model, CE, X, y, partition="tensor").dense()
    sep = fit_curvature("unshared_ggn", model, CE, X, y, kfac_variant=variant, bias="separate")
    assert rel(sep.dense(), tensors) < 1e-12
    kfac = fit_curvature("kfac", model, CE, X, y, kfac_variant=variant).dense()
    assert rel(kfac, B) > 1e-3  # the factorisation step is not exact here


@pytest.mark.parametrize("conv", [False, True], ids=["sequence", "conv"])
@pytest.mark.parametrize(
    ("pool", "exact", "other"),
    [(False, "expand", "reduce"), (True, "reduce", "expand")],
    ids=["per-position-loss:expand", "pooled:reduce"],
)
def test_unshared_ggn_of_the_exact_variant_is_the_block_ggn(conv, pool, exact, other):
    """Where a K-FAC variant is exact (deep linear, MSE), so is its weight-sharing step."""
    model, X, y = linear_case(conv, pool)
    B = ref_block_ggn(model, MSE, X, y)
    got = fit_curvature("unshared_ggn", model, MSE, X, y, kfac_variant=exact).dense()
    assert rel(got, B) < 1e-10
    wrong = fit_curvature("unshared_ggn", model, MSE, X, y, kfac_variant=other).dense()
    assert rel(wrong, B) > 1e-3


@pytest.mark.parametrize("policy", ["exact", "diagonal"])
def test_unshared_ggn_treats_uncovered_parameters_as_kfac_does(policy):
    model, X, y = token_case()
    with pytest.raises(TypeError, match="uncovered="):
        fit_curvature("unshared_ggn", model, CE, X, y)
    got = fit_curvature("unshared_ggn", model, CE, X, y, uncovered=policy)
    kfac = fit_curvature("kfac", model, CE, X, y, uncovered=policy)
    assert got.uncovered == kfac.uncovered
    emb, norm, _ = module_slices(model)
    both = slice(emb.start, norm.stop)
    assert rel(got.dense()[both, both], kfac.dense()[both, both]) < 1e-12

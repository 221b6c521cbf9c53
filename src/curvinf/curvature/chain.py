"""Dense GGN and Hessian from per-layer factors when layers share weights (``Conv2d``, ...).

The generic routes of :mod:`curvinf.curvature.dense` ``vmap`` a reverse pass over every
example (GGN) and a forward-over-reverse pass over every basis vector (Hessian). For a
model whose trainable parameters all sit in layers with an adapter
(:mod:`curvinf.curvature.layers`: ``nn.Linear`` on any input, ``nn.Conv2d``) both matrices
have a cheaper exact form built from one forward and a few backward passes per chunk.

GGN (any such model, any ``fisher``; the capture proves the factorisation on the first
chunk). The pseudo-gradient of example ``n``, output root ``k`` and layer ``l`` is the
matrix

    g_{l,nk} = Σ_t s_{l,nkt} ã_{l,nt}ᵀ        (out_l, in_l'),  t over the T_l positions,

(``ã`` the input patch with a trailing 1 for the bias, ``s`` the root backpropagated to the
layer output). Flattened in θ's order they are the rows of ``M`` (n·K, D) and
``G = 1/N Σ_chunks MᵀM``: ``2 n T_l K d_l`` flops for the rows and one GEMM, of which
:func:`add_gram` computes the lower block triangle only (about ``N K D²`` flops).

Hessian (``nn.Sequential`` chains; :func:`sequential_chain` says which). Between the
parameterised layers ``z_l = W̃_l ã_l`` (per position, ``W̃ = [W | b]``) sit only
parameter-free modules that are piecewise linear and act channel by channel (ReLU,
LeakyReLU, ReLU6, Hardtanh, max / average pooling, ``Flatten``, ``Identity``, eval-mode
``Dropout``). Their second derivatives vanish (almost everywhere), so the only nodes of the
computation with second derivatives are the loss and the products ``W̃_m ã_m``, and

    ∇²ℓ_n = J_nᵀ (∂²ℓ_n/∂f²) J_n + Σ_{l<m} (B_{ml,n} + B_{ml,n}ᵀ),
    B_{ml,n}[(o, j), (p, i)] = Σ_t g_{m,nt}[o] · ∂ã_{m,nt}[j] / ∂W̃_l[p, i],

with ``g_m = ∂ℓ_n/∂z_m`` (out_m) and ``j`` over the non-bias columns of ``ã_m`` (the bias
column is constant). The first term is the type-2 GGN (above, ``K = F``); ``∂ã_m/∂W̃_l[p, i]``
is the forward tangent of ``ã_m`` when ``z_l`` moves by ``ż_{l,t}[p'] = δ_{pp'} ã_{l,t}[i]``
(the derivative of ``z_l = W̃_l ã_l``), pushed through the glue by ``jvp`` and through the
layers in between with their weights fixed (``W_k`` times the unfolded tangent). Because
the glue acts channel by channel, the ``out_l`` tangents of one input column ``i`` reach
layer ``l + 1`` in disjoint channels and travel as one tangent until then (a column ``j``
of ``ã_{l+1}`` comes from channel ``j // (in_{l+1} / out_l)``); past layer ``l + 1`` they
are split (``out_l · in_l'`` tangents). Every ``B_{ml}`` is then one GEMM over the (n, t)
rows: ``2 n T_m out_m in_m d_l`` flops. Within one layer ``B`` is zero, so the block
Hessian of such a chain is its block type-2 GGN.

The Hessian route proves itself before it is used: the chain's own forward pass must
give the model's output, and on up to :data:`PROBE_EXAMPLES` examples of the first chunk
each assembled block times a random vector must equal a forward-over-reverse
Hessian-vector product of the model with only that block free (relative 1e-8). Every
function returns ``None`` for a model it does not describe; callers then take the generic
route.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from curvinf.curvature.context import FitContext
from curvinf.curvature.gram import thin_roots
from curvinf.curvature.layers import (
    Captures,
    LayerAdapter,
    UnfactorableModelError,
    capture_layer_factors,
    factored_layers,
    pseudo_grad_rows,
)
from curvinf.devices import cpu_generator
from curvinf.losses import batch_loss, output_grad, output_sqrt
from curvinf.params import ParamBlock
from curvinf.progress import progress_bar
from curvinf.tracing import traced

GRAM_BLOCK = 512
"""Columns per block of :func:`add_gram` (lower block triangle of ``MᵀM``)."""

GLUE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Identity,
    nn.Dropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
)
"""Parameter-free modules the Hessian route lets sit between layers (exact types): piecewise
linear (zero second derivative almost everywhere) and channel by channel on (n, C, ...)."""

PROBE_EXAMPLES = 32
TANGENT_BUDGET = 2**23
"""Floats per tangent tensor of the Hessian route (64 MiB in float64); tangents are chunked
to stay under it."""


# ----------------------------------------------------------------------------- Gram products


def add_gram(acc: torch.Tensor, M: torch.Tensor, block: int = GRAM_BLOCK) -> None:
    """``acc += MᵀM`` on the lower block triangle: ``M`` (R, d), ``acc`` (d, d).

    Row panel ``a`` (``block`` rows) gets ``M[:, a]ᵀ M[:, :a + block]``: about ``R d²`` flops
    instead of ``2 R d²``. The strictly upper blocks are left as they are; :func:`mirror_gram`
    fills them once the sum is complete.
    """
    d = M.shape[1]
    for a in range(0, d, block):
        b = min(a + block, d)
        acc[a:b, :b].addmm_(M[:, a:b].T, M[:, :b])


def mirror_gram(acc: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """Copy the lower block triangle of :func:`add_gram` onto the upper one; returns ``acc``."""
    d = len(acc)
    for a in range(block, d, block):
        acc[:a, a : a + block] = acc[a : a + block, :a].T
    return acc


# ----------------------------------------------------------------------------- GGN rows


def gram_accumulators(
    blocks: list[ParamBlock], D: int, device: torch.device
) -> tuple[list[torch.Tensor], Callable[[torch.Tensor], None]]:
    """Accumulators per block (lower block triangles, :func:`add_gram`) and the function
    adding a chunk's ``M`` (n·K, D) to them; finish each with :func:`mirror_gram`."""
    accs = [torch.zeros(b.size, b.size, dtype=torch.float64, device=device) for b in blocks]
    cols = [_columns(b.index) for b in blocks]

    def add(M: torch.Tensor) -> None:
        for acc, c in zip(accs, cols, strict=True):
            add_gram(acc, M[:, c])

    return accs, add


def _columns(index: torch.Tensor) -> slice | torch.Tensor:
    """``index`` as a slice when it is a contiguous range (``M[:, slice]`` is a view, which
    the GEMMs read in place), else as it is (``M[:, index]`` copies)."""
    a = int(index[0]) if index.numel() else 0
    if index.numel() and int(index[-1]) - a + 1 == index.numel():
        if torch.equal(index, torch.arange(a, a + index.numel(), device=index.device)):
            return slice(a, a + index.numel())
    return index


def _thin(Q: torch.Tensor) -> torch.Tensor:
    """Type-2 roots (n, F, F) without the directions null for every example (:func:`thin_roots`:
    ``K = C - 1`` for cross-entropy, the same ``Q Qᵀ``); as they are if the GGN is zero."""
    try:
        return thin_roots(Q)
    except ValueError:
        return Q


def _fit_roots(ctx: FitContext, yb: torch.Tensor, gen: torch.Generator):
    """The cotangents of a fit chunk: the ``fisher``'s output roots (type-2 thinned)."""

    def roots(out: torch.Tensor) -> torch.Tensor:
        Q = output_sqrt(
            ctx.loss_kind, ctx.fisher, out, yb, mc_samples=ctx.mc_samples, generator=gen
        )
        return _thin(Q) if ctx.fisher == "type2" else Q

    return roots


def ggn_blocks(
    ctx: FitContext, blocks: list[ParamBlock]
) -> list[tuple[ParamBlock, torch.Tensor]] | None:
    """GGN blocks from layer factors for models every parameter of which sits in an adapted
    layer (module doc); ``None`` for other models."""
    adapters = factored_layers(ctx.model, "the factored GGN")
    if adapters is None:
        return None
    accs, add = gram_accumulators(blocks, ctx.num_params, ctx.device)
    gen = ctx.generator()
    with progress_bar(ctx.n, "GGN examples", ctx.progress) as advance:
        for c, (xb, yb) in enumerate(ctx.chunks()):
            try:
                caps = capture_layer_factors(
                    ctx.model, adapters, xb, _fit_roots(ctx, yb, gen), verify=c == 0
                )
            except UnfactorableModelError:
                return None
            add(pseudo_grad_rows(adapters, caps.grads, caps.inputs))
            advance(len(xb))
    return [(b, mirror_gram(C).div_(ctx.n)) for b, C in zip(blocks, accs, strict=True)]


# ----------------------------------------------------------------------------- the chain


class _Chain:
    """An ``nn.Sequential`` flattened into modules, with the position of every adapted layer."""

    def __init__(self, modules: list[nn.Module], adapters: list[LayerAdapter]) -> None:
        self.modules = modules
        where = {id(m): q for q, m in enumerate(modules)}
        self.at = [where[id(ad.module)] for ad in adapters]
        self.adapters = adapters

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The input of every module and the output, without gradients."""
        inputs = []
        with torch.no_grad():
            for mod in self.modules:
                inputs.append(x)
                x = mod(x.clone() if getattr(mod, "inplace", False) else x)
        return inputs, x

    def glue(self, k: int) -> range:
        """Positions of the modules between layer ``k`` and layer ``k + 1``."""
        return range(self.at[k] + 1, self.at[k + 1])


def _flatten_sequential(module: nn.Module) -> list[nn.Module] | None:
    if type(module) is not nn.Sequential or _has_hooks_here(module):
        return None
    out: list[nn.Module] = []
    for child in module.children():
        if type(child) is nn.Sequential:
            inner = _flatten_sequential(child)
            if inner is None:
                return None
            out += inner
        else:
            out.append(child)
    return out


def _has_hooks_here(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _is_glue(module: nn.Module) -> bool:
    if type(module) not in GLUE or any(True for _ in module.parameters()):
        return False
    if isinstance(module, nn.Flatten):
        return module.start_dim == 1 and module.end_dim == -1
    if isinstance(module, nn.MaxPool2d | nn.AdaptiveMaxPool2d):
        return not module.return_indices
    return True


def sequential_chain(model: nn.Module, adapters: list[LayerAdapter]) -> _Chain | None:
    """The model as a chain for the Hessian route, or ``None``.

    Proven from the structure: ``model`` (and any ``nn.Sequential`` nested in it) is an
    ``nn.Sequential`` of the exact type (its own ``forward``), no forward hooks, every adapted
    layer appears once, and after the first layer every other module is one of :data:`GLUE`
    (exact types; ``Flatten`` from dimension 1, pools without indices). Modules before the
    first layer are data transforms (no trainable parameters, as the adapters cover them all).
    :func:`hessian_blocks` also checks the chain's output and a Hessian-vector product.
    """
    modules = _flatten_sequential(model)
    if modules is None or any(_has_hooks_here(m) for m in model.modules()) or not adapters:
        return None
    ids = [id(m) for m in modules]
    if any(ids.count(id(ad.module)) != 1 for ad in adapters):
        return None
    chain = _Chain(modules, adapters)
    if chain.at != sorted(chain.at):
        return None
    layer_ids = {id(ad.module) for ad in adapters}
    if not all(_is_glue(m) for m in modules[chain.at[0] :] if id(m) not in layer_ids):
        return None
    return chain


# ----------------------------------------------------------------------------- the Hessian


def _to_layout(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Layer outputs as rows (..., n, T, out) -> the module's layout (..., n, out, *S) with
    ``shape = (n, out, *S)``, ``∏S = T`` (channels in dimension 1, as :func:`sequential_chain`
    requires)."""
    lead = rows.shape[:-3]
    return rows.transpose(-1, -2).reshape(*lead, *shape)


def _tangent_inputs(ad: LayerAdapter, x: torch.Tensor) -> torch.Tensor:
    """The layer's input patches of tangents ``x`` (V, n, ...) -> (V, n, T, in), no bias column."""
    V, n = x.shape[:2]
    a = ad.inputs(x.reshape(V * n, *x.shape[2:]), bias=False)
    return a.reshape(V, n, *a.shape[1:])


ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.Identity, nn.Dropout)
"""Glue acting entry by entry: its tangent map is a product with the slope at the primal."""
LINEAR = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)
"""Linear glue: its tangent map is the module itself."""


def _push_glue(chain: _Chain, inputs: list[torch.Tensor], k: int, x: torch.Tensor) -> torch.Tensor:
    """Tangents ``x`` (V, n, ...) of layer ``k``'s output through the glue after it: a product
    with the slope for entry-by-entry glue, the module itself for linear glue, ``jvp``
    (``vmap``-ed over the tangents) for max pooling."""
    for q in chain.glue(k):
        mod, primal = chain.modules[q], inputs[q]
        if isinstance(mod, ELEMENTWISE):
            slope = jvp(lambda u, mod=mod: mod(u.clone()), (primal,), (torch.ones_like(primal),))
            x = x * slope[1]
        elif isinstance(mod, LINEAR):
            V, n = x.shape[:2]
            x = mod(x.reshape(V * n, *x.shape[2:]))
            x = x.reshape(V, n, *x.shape[1:])
        else:

            def step(v: torch.Tensor, mod: nn.Module = mod, primal: torch.Tensor = primal):
                return jvp(lambda u: mod(u.clone()), (primal,), (v,))[1]

            x = vmap(step)(x)
    return x


def _bilinear_from(
    chain: _Chain,
    inputs: list[torch.Tensor],
    caps: Captures,
    g: list[torch.Tensor],
    lo: int,
    last: int,
) -> dict[int, torch.Tensor]:
    """``B_{m,lo}`` for ``m = lo+1 .. last``, summed over the chunk (module doc):
    ``m -> (out_m·in_m, out_l, in_l')``. ``g[m]`` (n, T, out): ``∂ℓ_n/∂z_m``."""
    ads = chain.adapters
    a_l = caps.inputs[lo]  # (n, T_l, in_l')
    n, _, width = a_l.shape
    out_l = ads[lo].matrix_shape[0]
    z_shape = inputs[chain.at[lo] + 1].shape  # (n, out_l, *S)
    sizes = [x[0].numel() for x in inputs[chain.at[lo] + 1 :]]
    sizes += [a[0].numel() for a in caps.inputs[lo + 1 : last + 1]]  # unfolded patches
    per_example = int(max(sizes))
    split = out_l if last > lo + 1 else 1
    step = max(1, TANGENT_BUDGET // (n * per_example * split))
    out: dict[int, torch.Tensor] = {}
    for i0 in range(0, width, step):
        cols = a_l[..., i0 : i0 + step]  # (n, T_l, V)
        V = cols.shape[-1]
        # one tangent per input column, every channel at once: ż[v, n, p, *S] = ã_l[n, S, i0 + v]
        zt = cols.permute(2, 0, 1).reshape(V, n, 1, *z_shape[2:]).expand(V, *z_shape)
        m = lo + 1
        x = _push_glue(chain, inputs, lo, zt)
        at = _tangent_inputs(ads[m], x)  # (V, n, T_m, in_m)
        out_m, in_m = ads[m].matrix_shape
        if in_m % out_l:
            raise UnfactorableModelError("channels of consecutive layers do not line up")
        blk = in_m // out_l
        T_m = at.shape[2]
        C = _contract(g[m], at).permute(1, 2, 0)  # (out_m, in_m, V)
        B = torch.zeros(out_m, in_m, out_l, V, dtype=C.dtype, device=C.device)
        j = torch.arange(in_m, device=C.device)
        B[:, j, j // blk, :] = C
        _add_cols(out, m, B.view(out_m * in_m, out_l, V), i0, width)
        if last == m:
            continue
        # split by channel: ż_m^{(p, i)} = W_m[:, channel p] ȧ^{(i)}[..., channel p]
        W = ads[m].module.weight.detach().reshape(out_m, out_l, blk)
        rows = torch.einsum("vntpr,opr->pvnto", at.view(V, n, T_m, out_l, blk), W)
        z = _to_layout(rows.reshape(out_l * V, n, T_m, out_m), inputs[chain.at[m] + 1].shape)
        for m in range(lo + 2, last + 1):
            x = _push_glue(chain, inputs, m - 1, z)
            at = _tangent_inputs(ads[m], x)  # (out_l·V, n, T_m, in_m)
            out_m, in_m = ads[m].matrix_shape
            C = _contract(g[m], at).view(out_l, V, out_m * in_m)
            _add_cols(out, m, C.permute(2, 0, 1), i0, width)
            if m < last:
                W = ads[m].module.weight.detach().reshape(out_m, in_m)
                z = _to_layout(at @ W.T, inputs[chain.at[m] + 1].shape)
    return out


def _contract(g: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """``Σ_{n,t} g[n, t, o] at[v, n, t, j]``: ``g`` (n, T, out), ``at`` (V, n, T, in) ->
    (V, out, in), one batched GEMM over the (n, t) rows, no copy of the tangents."""
    V, n, T, n_in = at.shape
    return g.reshape(n * T, -1).T @ at.reshape(V, n * T, n_in)


def _add_cols(out: dict[int, torch.Tensor], m: int, B: torch.Tensor, i0: int, width: int) -> None:
    """``out[m][:, :, i0:i0+V] += B`` (rows, out_l, V), creating ``out[m]`` (rows, out_l, width)."""
    if m not in out:
        out[m] = torch.zeros(B.shape[0], B.shape[1], width, dtype=B.dtype, device=B.device)
    out[m][:, :, i0 : i0 + B.shape[2]] += B


def _aug_to_flat(ad: LayerAdapter) -> torch.Tensor:
    """θ positions of the augmented layout (out, in'): ``W[p, i]`` then the bias as column in."""
    out, n_in = ad.matrix_shape
    start, device = int(ad.index[0]), ad.index.device
    p = torch.arange(out, device=device)[:, None]
    W = start + p * n_in + torch.arange(n_in, device=device)[None, :]
    if not ad.has_bias:
        return W.reshape(-1)
    return torch.cat([W, start + out * n_in + p], dim=1).reshape(-1)


def _hessian_chunk(
    ctx: FitContext,
    chain: _Chain,
    xb: torch.Tensor,
    yb: torch.Tensor,
    pairs: set[tuple[int, int]],
    *,
    verify: bool,
) -> tuple[torch.Tensor, dict[tuple[int, int], torch.Tensor]] | None:
    """A chunk's ``M`` (type-2 roots) and bilinear sums ``B_{ml}`` for ``pairs``; ``None`` if
    the chain is not the model."""
    inputs, f = chain.forward(xb)
    ads = chain.adapters
    for ad, q in zip(ads, chain.at, strict=True):
        if type(ad.module) is nn.Linear and inputs[q].ndim != 2:
            return None  # Linear over positions: channels last, not what the glue rules assume
    kind = ctx.loss_kind

    def roots_and_grad(out: torch.Tensor) -> torch.Tensor:
        Q = _thin(output_sqrt(kind, "type2", out, yb))
        return torch.cat([Q, output_grad(kind, out, yb)[:, :, None]], dim=2)

    try:
        caps = capture_layer_factors(ctx.model, ads, xb, roots_and_grad, verify=verify)
    except UnfactorableModelError:
        return None
    if verify:
        with torch.no_grad():
            if not torch.allclose(f, ctx.model(xb), rtol=1e-10, atol=1e-12):
                return None  # the chain is not what the model computes
    K = caps.grads[0].shape[1] - 1
    M = pseudo_grad_rows(ads, [s[:, :K] for s in caps.grads], caps.inputs)
    g = [s[:, K] for s in caps.grads]  # (n, T, out): ∂ℓ_n/∂z
    bil: dict[tuple[int, int], torch.Tensor] = {}
    try:
        for first in sorted({lo for _, lo in pairs}):
            last = max(m for m, lo in pairs if lo == first)
            for m, B in _bilinear_from(chain, inputs, caps, g, first, last).items():
                if (m, first) in pairs:
                    bil[(m, first)] = B
    except UnfactorableModelError:
        return None
    return M, bil


def _bilinear_product(
    chain: _Chain, bil: dict[tuple[int, int], torch.Tensor], v: torch.Tensor
) -> torch.Tensor:
    """``Σ (B_{ml} + B_{mlᵀ}) v`` for flat ``v`` (D,)."""
    out = torch.zeros_like(v)
    for (m, lo), B in bil.items():
        rows = chain.adapters[m].index[: B.shape[0]]
        cols = _aug_to_flat(chain.adapters[lo])
        Bf = B.reshape(B.shape[0], -1)
        out[rows] += Bf @ v[cols]
        out[cols] += Bf.T @ v[rows]
    return out


def _probe(
    ctx: FitContext,
    chain: _Chain,
    xb: torch.Tensor,
    yb: torch.Tensor,
    blocks: list[ParamBlock],
    pairs: set[tuple[int, int]],
) -> bool:
    """Whether the route's Hessian blocks of ``xb`` (the bilinear ``pairs`` the blocks need)
    times a random vector equal the model's forward-over-reverse Hessian-vector products
    with only each block free (relative 1e-8 per block)."""
    got = _hessian_chunk(ctx, chain, xb, yb, pairs, verify=False)
    if got is None:
        return False
    M, bil = got
    gen = cpu_generator(0)
    v = torch.randn(ctx.num_params, generator=gen, dtype=M.dtype, device="cpu").to(M.device)
    bv = _bilinear_product(chain, bil, v)  # rows of a block see only pairs inside it
    with traced(ctx.model, "the Hessian route's check"):
        for b in blocks:
            cols = _columns(b.index)
            Mb = M[:, cols]
            Hv = (Mb.T @ (Mb @ v[cols]) + bv[cols]) / len(xb)
            f, theta = ctx.outputs_fn(b.names)
            gfun = grad(lambda t, f=f: batch_loss(ctx.loss_kind, f(t, xb), yb))
            want = jvp(gfun, (theta,), (v[cols],))[1]
            if float((Hv - want).norm()) > 1e-8 * max(float(want.norm()), 1e-300):
                return False
    return True


def hessian_blocks(
    ctx: FitContext, blocks: list[ParamBlock]
) -> list[tuple[ParamBlock, torch.Tensor]] | None:
    """Hessian blocks of the mean loss for chains of adapted layers and piecewise-linear,
    channel-by-channel glue (module doc); ``None`` for other models."""
    adapters = factored_layers(ctx.model, "the chain Hessian")
    chain = None if adapters is None else sequential_chain(ctx.model, adapters)
    if chain is None:
        return None
    owner = torch.full((ctx.num_params,), -1, dtype=torch.long, device=ctx.device)
    for i, ad in enumerate(adapters):
        owner[ad.index] = i
    covers = [sorted(set(owner[b.index].tolist())) for b in blocks]
    pairs = {(m, lo) for c in covers for m in c for lo in c if m > lo}
    accs, add = gram_accumulators(blocks, ctx.num_params, ctx.device)
    bil: dict[tuple[int, int], torch.Tensor] = {}
    with progress_bar(ctx.n, "Hessian examples", ctx.progress) as advance:
        for c, (xb, yb) in enumerate(ctx.chunks()):
            got = _hessian_chunk(ctx, chain, xb, yb, pairs, verify=c == 0)
            if got is None:
                return None
            probe = xb[:PROBE_EXAMPLES], yb[:PROBE_EXAMPLES]
            if c == 0 and not _probe(ctx, chain, *probe, blocks, pairs):
                return None
            M, chunk_bil = got
            add(M)
            for key, B in chunk_bil.items():
                bil[key] = B if key not in bil else bil[key] + B
            advance(len(xb))
    out = []
    for b, C in zip(blocks, accs, strict=True):
        C = mirror_gram(C)
        for (m, lo), B in bil.items():
            rows = adapters[m].index[: B.shape[0]]
            cols = _aug_to_flat(adapters[lo])
            r_in, c_in = torch.isin(rows, b.index), torch.isin(cols, b.index)
            if not (r_in.any() and c_in.any()):
                continue
            Bf = B.reshape(len(rows), -1)[r_in][:, c_in]
            r = torch.searchsorted(b.index, rows[r_in])
            k = torch.searchsorted(b.index, cols[c_in])
            C[r[:, None], k[None, :]] += Bf
            C[k[:, None], r[None, :]] += Bf.T
        out.append((b, C.div_(ctx.n)))
    return out

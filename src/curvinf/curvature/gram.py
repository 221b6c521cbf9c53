"""Exact GGN rungs through their Gram matrix in sample space: no ``D x D`` matrix, no iterations.

A GGN-type rung is ``G = MᵀM`` with pseudo-gradient rows
``M[(n, k)] = N^{-1/2} (J_nᵀ Q_n[:, k])ᵀ`` — ``R = N·K`` rows, ``D`` columns, ``Q_n``
(F, K) an output-space root of the ``fisher`` over the ``F`` entries of an example's
flattened output (directions that are zero for every example are dropped: ``K = C - 1``
for ``type2`` cross-entropy, ``K = T (C - 1)`` for per-position outputs (T, C)). The non-zero
eigenvalues of ``G`` are those of the Gram matrix ``Γ = MMᵀ`` (R, R); with
``Γ = U diag(s) Uᵀ`` the eigenvectors of ``G`` are ``Mᵀ U s^{-1/2}``. So the
:class:`~curvinf.curvature.regularization.Regularization` rule ``φ`` (``φ(λ) =
1/(λ + δ)`` or 0, and ``φ₀ = φ(0)`` on the null space of ``G``) gives

    C⁺ v = φ₀ v + Mᵀ U diag((φ(s) - φ₀) / s) Uᵀ M v                        (1)

and with damping only (``eps = 0``, ``δ > 0``) Woodbury's identity
``C⁺ v = (v - Mᵀ (Γ + δI)⁻¹ M v) / δ``: one Cholesky factor of ``Γ + δI``.

Influence scores avoid the ``1/δ`` cancellation of (1). A training gradient is
``g_t = J_tᵀ r_t`` (``r_t = ∂ℓ/∂f``); when ``r_t = Q_t c_t`` (``type2``: ``r_t`` lies in the
range of the output Hessian; ``empirical``: ``Q_t = r_t``; not ``mc``) it is
``g_t = Mᵀ σ_t`` with ``σ_t = √N c_t`` on example t's rows and zero elsewhere, and
``C⁺ Mᵀ = Mᵀ U φ(s) Uᵀ``, so

    score[q, t] = (M g_q)ᵀ U φ(s) Uᵀ σ_t      (damping only: (M g_q)ᵀ (Γ + δI)⁻¹ σ_t)   (2)

Letters: ``K`` is always the number of output roots per example, ``Γ`` the Gram
matrix, ``Q`` the output roots (``self.roots`` in code).

Block-diagonal rungs (``block_ggn``) do all of this per block, with each
block's own Gram matrix ``Γ_b = M_b M_bᵀ``.

Cost. For networks of ``nn.Linear`` layers on (N, features) inputs, a row of
``M`` restricted to layer ``l`` is the outer product ``s ãᵀ``, so
``Γ_b = Σ_{l ∈ b} (S_l S_lᵀ) ∘ (A_l A_lᵀ ⊗ 1_{K×K})`` with ``S_l`` (R, out_l)
and ``A_l`` (N, in_l + 1): ``R² Σ_l out_l`` flops, and products with ``M`` or
``Mᵀ`` are two GEMMs per layer. A block holding a layer's weight alone
(``partition="tensor"``) takes ``A_l`` without its column of ones, its bias alone that
column (``A_l A_lᵀ = 1 1ᵀ``). Then Cholesky ``R³/3`` flops (damping) or
``eigh`` (truncation, about ``9 R³``; an absolute truncation that keeps ``k ≪ R``
eigenvalues computes those alone, :mod:`~curvinf.curvature.partial_eigh`). Other models
form ``M`` explicitly (``R·D`` floats, under ``max_dense_bytes``). Memory: about ``2 R²`` floats per
block being factorised; factorisations are kept while they fit
``max_dense_bytes`` and recomputed otherwise.
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from curvinf.curvature.context import FitContext
from curvinf.curvature.layers import (
    UnfactorableModelError,
    capture_layer_factors,
    factored_layers,
    linear_layers,
    pseudo_grad_rows,
)
from curvinf.curvature.operators import (
    Curvature,
    InverseOperator,
    InverseReport,
    ScoringTask,
    as_rows,
    layer_flat,
    layer_matrix,
)
from curvinf.curvature.partial_eigh import eigenpairs_above
from curvinf.curvature.regularization import Regularization
from curvinf.losses import output_grad
from curvinf.params import ParamBlock
from curvinf.progress import announce, progress_bar
from curvinf.storage import CorruptFileError, read_tensors, tensor_digest, write_tensors
from curvinf.validation import cast_floating, format_bytes

ANNOUNCE_ROWS = 3000  # announce an eigh of a Gram matrix at least this large
EIGH_FLOPS = 3e10  # rough float64 eigh rate on this class of machine (flop/s)


@dataclass(frozen=True)
class Gram:
    """The sample-space route for GGN-type rungs (module doc): exact, no iterations.

    ``matrix_free("ggn" | "block_ggn", ...).inverse(reg, solver=Gram())``. Damping
    only (``eps=0``, ``damping > 0``, or ``eps < damping``, which truncates nothing of a
    PSD rung) uses a Cholesky factor of ``Γ + δI``; truncation an eigendecomposition of ``Γ``.
    """

    progress: bool = True
    cache: str | None = None
    """A folder keeping each factorisation of a Gram matrix (``eigh`` under truncation,
    Cholesky under damping), named by the sha256 of the matrix (and the damping): a later
    fit with the same matrix, in this or another process, loads it instead of recomputing
    (``9 R³`` or ``R³/3`` flops) after checking its digest. The factors are used
    memory-mapped from there, so every block's stays available without holding them all
    in memory. ``None`` keeps nothing on disk. The files are about ``8 R²`` bytes each;
    delete the folder when done."""
    partial_eigh: float = 0.7
    """Under an absolute truncation above the damping (``eps > damping``, not relative),
    which keeps only the Gram eigenvalues above ``eps − damping``: compute those eigenpairs
    alone (:func:`~curvinf.curvature.partial_eigh.eigenpairs_above`, certified by an
    inertia count) when that is predicted to cost at most this fraction of a full
    ``eigh``; ``0`` always takes the full ``eigh``, ``math.inf`` the partial route
    wherever it applies."""

    def __post_init__(self) -> None:
        v = self.partial_eigh
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
            raise ValueError(
                f"Gram.partial_eigh must be a number >= 0 (a cost ratio; 0 turns the partial "
                f"eigendecomposition off), got {v!r}."
            )

    def build_inverse(self, curvature: Curvature, reg: Regularization) -> GramInverse:
        """The exact inverse through the Gram matrix (:class:`GramInverse`); ``TypeError``
        for a rung that is not a GGN-type matrix-free rung."""
        return GramInverse(curvature, reg, self)


def thin_roots(Q: torch.Tensor) -> torch.Tensor:
    """Output-space roots (N, C, K) -> (N, C, K') with ``Q' Q'ᵀ = Q Qᵀ`` and orthogonal
    columns, dropping the eigen-directions of ``Q Qᵀ`` that vanish for every example."""
    lam, U = torch.linalg.eigh(Q @ Q.transpose(1, 2))  # ascending per example
    lam = lam.clamp_min(0.0)
    top = float(lam.max()) if lam.numel() else 0.0
    if top == 0.0:
        raise ValueError(
            "the GGN is zero (the output-space curvature vanishes on every training example); "
            "there is nothing to invert."
        )
    keep = lam.max(dim=0).values > 1e-13 * top
    return (U * lam.sqrt()[:, None, :])[:, :, keep]


@dataclass(frozen=True, eq=False)
class _Part:
    """A block's share of one ``nn.Linear`` layer: the layer (``layer``), the columns of
    its ``ã`` that multiply it (weight: the inputs, bias: the column of ones, or both),
    whether it holds a weight and a bias (flat order ``[W | b]`` of :func:`layer_matrix`)
    or one tensor (row-major; a bias as one column), and its flat indices."""

    layer: int
    cols: slice
    both: bool
    index: torch.Tensor


class _LinearRows:
    """``M`` of an ``nn.Linear`` network as per-layer factors (module doc); a block may hold
    whole layers or single weight / bias tensors (``partition="tensor"``)."""

    def __init__(self, A: list[torch.Tensor], S: list[torch.Tensor], parts) -> None:
        self.A, self.S = A, S  # (N, in'), (N, K, out) (the N^{-1/2} inside S)
        self.parts: list[list[_Part]] = parts  # per block, in its flat order
        self.N, self.K = S[0].shape[:2]
        self.R = self.N * self.K

    def gram(self, b: int) -> torch.Tensor:
        out = None
        for part in self.parts[b]:
            S = self.S[part.layer].reshape(self.R, -1)
            A = self.A[part.layer][:, part.cols]
            SS = S @ S.T
            SS.view(self.N, self.K, self.N, self.K).mul_((A @ A.T)[:, None, :, None])
            if out is None:
                out = SS
            else:
                out += SS
                del SS
        return out

    def _matrix(self, part: _Part, V: torch.Tensor) -> torch.Tensor:
        """The part's columns of rows ``V`` (Kv, d_part) as matrices (Kv, out, cols)."""
        out = self.S[part.layer].shape[2]
        if part.both:
            return layer_matrix(V, out, self.A[part.layer].shape[1] - 1, True)
        return V.reshape(len(V), out, -1)

    def times(self, b: int, V: torch.Tensor) -> torch.Tensor:
        """``M_b V_bᵀ`` (R, Kv) for rows ``V`` (Kv, D) in the flat order."""
        Z = torch.zeros(self.N, self.K, len(V), dtype=torch.float64, device=V.device)
        for part in self.parts[b]:
            W = self._matrix(part, V[:, part.index])  # (Kv, out, cols)
            A = self.A[part.layer][:, part.cols]
            T = (W.reshape(-1, W.shape[2]) @ A.T).view(len(V), W.shape[1], self.N)
            Z.baddbmm_(self.S[part.layer], T.permute(2, 1, 0))  # (N, K, out) @ (N, out, Kv)
        return Z.view(self.R, len(V))

    def tmul(self, b: int, W: torch.Tensor) -> torch.Tensor:
        """``(M_bᵀ W)ᵀ`` (Kw, d_b) in the block's flat order for ``W`` (R, Kw)."""
        Wn = W.view(self.N, self.K, -1)
        out = []
        for part in self.parts[b]:
            S, A = self.S[part.layer], self.A[part.layer][:, part.cols]
            P = S.transpose(1, 2) @ Wn  # (N, out, Kw)
            G = (P.permute(2, 1, 0).reshape(-1, self.N) @ A).view(W.shape[1], S.shape[2], -1)
            out.append(layer_flat(G, True) if part.both else G.reshape(W.shape[1], -1))
        return torch.cat(out, dim=1)


class _DenseRows:
    """``M`` (R, D) formed explicitly (models that are not ``nn.Linear`` networks)."""

    def __init__(self, M: torch.Tensor, blocks: list[ParamBlock], K: int) -> None:
        self.M, self.blocks, self.K = M, blocks, K
        self.R = M.shape[0]
        self.N = self.R // K

    def gram(self, b: int) -> torch.Tensor:
        Mb = self.M[:, self.blocks[b].index]
        return Mb @ Mb.T

    def times(self, b: int, V: torch.Tensor) -> torch.Tensor:
        idx = self.blocks[b].index
        return self.M[:, idx] @ V[:, idx].T

    def tmul(self, b: int, W: torch.Tensor) -> torch.Tensor:
        return (self.M[:, self.blocks[b].index].T @ W).T


def _tensor_parts(i: int, adapter) -> list[_Part]:
    """Layer ``i``'s weight and (if trainable) bias as parts of their own."""
    n_in = adapter.module.weight.shape[1]
    w = adapter.module.weight.numel()
    parts = [_Part(i, slice(0, n_in), False, adapter.index[:w])]
    if adapter.has_bias:
        parts.append(_Part(i, slice(n_in, n_in + 1), False, adapter.index[w:]))
    return parts


def _block_parts(adapters, block: ParamBlock) -> list[_Part] | None:
    """Block ``block`` as whole layers and single tensors of ``adapters``, in its flat
    order; ``None`` when it holds part of a tensor or parameters outside the layers."""
    parts = []
    for i, ad in enumerate(adapters):
        inside = torch.isin(ad.index, block.index)
        if bool(inside.all()):
            parts.append(_Part(i, slice(None), ad.has_bias, ad.index))
        elif bool(inside.any()):
            parts += [
                p for p in _tensor_parts(i, ad) if bool(torch.isin(p.index, block.index).all())
            ]
    union = torch.cat([p.index for p in parts]) if parts else block.index.new_empty(0)
    return parts if torch.equal(union, block.index) else None


def _linear_rows(ctx: FitContext, Q: torch.Tensor, blocks: list[ParamBlock]) -> _LinearRows | None:
    adapters = linear_layers(ctx.model, ctx.X, "the Gram route")
    if adapters is None:
        return None
    parts = [_block_parts(adapters, block) for block in blocks]
    if any(p is None for p in parts):
        return None  # a block that splits a weight or bias tensor
    A = [[] for _ in adapters]
    S = [[] for _ in adapters]
    scale = 1.0 / math.sqrt(ctx.n)
    for a in range(0, ctx.n, ctx.chunk_size):
        xb, Qb = ctx.X[a : a + ctx.chunk_size], Q[a : a + ctx.chunk_size]
        try:
            caps = capture_layer_factors(
                ctx.model, adapters, xb, lambda f, Qb=Qb: Qb, verify=a == 0
            )
        except UnfactorableModelError:
            return None
        if not caps.one_position:
            return None
        a_all, s_all = caps.rows()
        for i in range(len(adapters)):
            A[i].append(a_all[i])
            S[i].append(s_all[i] * scale)
    return _LinearRows([torch.cat(t) for t in A], [torch.cat(t) for t in S], parts)


def _dense_rows(
    ctx: FitContext, Q: torch.Tensor, blocks: list[ParamBlock], max_bytes: float
) -> _DenseRows:
    R, D = Q.shape[0] * Q.shape[2], ctx.num_params
    need = 8.0 * R * D
    if need > max_bytes:
        raise ValueError(
            f"the Gram route for a model that is not an nn.Linear network stores the {R} x {D} "
            f"pseudo-gradient matrix ({format_bytes(need)}), over the memory budget of "
            f"{format_bytes(max_bytes)}; raise max_dense_bytes or use solver=CG(...)."
        )
    # Rows from the layer factors (no vmap over examples) when every parameter sits in an
    # adapted layer (Conv2d, Linear over positions) and the first chunk's capture proves
    # the factorisation; else (or once the proof fails) from per-example Jacobians.
    adapters = factored_layers(ctx.model, "the Gram route")
    rows = []
    for a in range(0, ctx.n, ctx.chunk_size):
        xb, Qb = ctx.X[a : a + ctx.chunk_size], Q[a : a + ctx.chunk_size]
        M = None
        if adapters is not None:
            try:
                caps = capture_layer_factors(
                    ctx.model, adapters, xb, lambda f, Qb=Qb: Qb, verify=a == 0
                )
                M = pseudo_grad_rows(adapters, caps.grads, caps.inputs)
            except UnfactorableModelError:
                adapters = None
        rows.append(M if M is not None else ctx.pseudo_grads(xb, None, None, Q=Qb).reshape(-1, D))
    M = torch.cat(rows).reshape(R, D) / math.sqrt(ctx.n)
    return _DenseRows(M, blocks, Q.shape[2])


def train_coefficients(ctx: FitContext, Q: torch.Tensor) -> torch.Tensor | None:
    """``σ`` (N, K) with ``∇ℓ(z_t) = Mᵀ σ_t`` (module doc), or ``None`` when a loss
    gradient leaves the range of its root (``fisher="mc"``)."""
    with torch.no_grad():
        f = torch.cat([ctx.model(xb) for xb, _ in ctx.chunks()])
    r = output_grad(ctx.loss_kind, f, ctx.y)  # (N, F)
    sq = (Q * Q).sum(1)  # (N, K): squared column norms (columns orthogonal)
    proj = (Q * r[:, :, None]).sum(1)
    c = torch.where(sq > 0, proj / sq.clamp_min(1e-300), torch.zeros_like(proj))
    resid = (r - (Q * c[:, None, :]).sum(2)).norm(dim=1)
    scale = r.norm(dim=1)
    if bool((resid > 1e-8 * scale + 1e-12 * float(scale.max())).any()):
        return None
    return c * math.sqrt(ctx.n)


class GramInverse(InverseOperator):
    """``C⁺`` of a GGN-type rung through the Gram matrix (module doc).

    Attributes:
        mode: ``"cholesky"`` (damping only) or ``"eigh"`` (truncation).
        R: the number of pseudo-gradient rows (an upper bound of ``rank G``).
        eigenvalues: per block, the eigenvalues of ``K_b`` (``"eigh"`` mode; else ``None``);
            those above :meth:`partial_threshold` only, when it is not ``None``.
        partial_blocks: blocks whose eigenpairs came from :func:`eigenpairs_above`.
        kept: eigen-directions with a non-zero inverse eigenvalue (every one under damping).
        seconds: time spent building and factorising Gram matrices so far.
        reports: empty (the route has no iterations; kept for the solver interface).

    Scoring on the fit's own training set goes through :meth:`pairwise_scores`, (2) of
    the module doc, without training gradients or ``1/δ`` cancellation.
    """

    def __init__(self, curvature: Curvature, reg: Regularization, solver: Gram) -> None:
        if not getattr(curvature, "is_ggn", False):
            raise TypeError(
                f"solver=Gram() needs a GGN-type matrix-free rung ('ggn' or 'block_ggn'), got "
                f"{curvature.method!r}; for the Hessian use CG or Preconditioned("
                "preconditioner='ggn')."
            )
        ctx: FitContext = curvature.ctx  # type: ignore[attr-defined]
        if ctx.dtype != torch.float64:
            raise ValueError(
                "solver=Gram() computes in float64; build the rung with "
                "matrix_free(..., dtype=torch.float64)."
            )
        self.curvature, self.reg, self.solver = curvature, reg, solver
        self.reports: list = []
        self.seconds = 0.0
        t0 = time.perf_counter()
        self.ctx = ctx
        self.roots = thin_roots(curvature.output_roots.to(torch.float64))  # type: ignore[attr-defined]
        self.param_blocks: list[ParamBlock] = curvature.param_blocks  # type: ignore[attr-defined]
        rows = _linear_rows(ctx, self.roots, self.param_blocks)
        self.rows = (
            rows
            if rows is not None
            else _dense_rows(ctx, self.roots, self.param_blocks, curvature.max_dense_bytes)
        )
        self.R = self.rows.R
        self._sigma: torch.Tensor | None | bool = False  # False: not computed yet
        self._cache: dict[int, tuple] = {}
        self._cache_bytes = 0.0
        self.eigenvalues: list[torch.Tensor] | None = None
        self.partial_blocks = 0
        if not reg.truncates_nonnegative():  # plain damping on the PSD GGN: Cholesky
            if reg.damping == 0:
                raise ValueError(
                    f"solver=Gram() needs damping > 0 or eps > 0: the {curvature.method} rung has "
                    f"rank <= {self.R} (training examples x output roots), singular whenever "
                    f"that is below its {curvature.num_params} parameters. Set "
                    "Regularization(damping=...) > 0 or eps > 0 (pseudo-inverse)."
                )
            self.mode = "cholesky"
            self.kept = self.num_params  # λ + δ >= δ > 0 for every direction
        else:
            self.mode = "eigh"
            self._eigh_all()
        self.seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ factorisations

    def _eigh_all(self) -> None:
        need = 8.0 * self.R * self.R * len(self.param_blocks)
        if need > self.curvature.max_dense_bytes:
            raise ValueError(
                f"truncation (eps > 0) needs the eigendecomposition of every block's {self.R} x "
                f"{self.R} Gram matrix at once ({format_bytes(need)}), over the memory budget of "
                f"{format_bytes(self.curvature.max_dense_bytes)}; raise max_dense_bytes or use "
                "damping only (eps=0), which goes block by block."
            )
        if self.R >= ANNOUNCE_ROWS:
            seconds = 9.0 * self.R**3 * len(self.param_blocks) / EIGH_FLOPS
            announce(
                f"Gram route: eigendecomposing {len(self.param_blocks)} Gram matrix(es) of "
                f"{self.R:,} x {self.R:,} for the truncation eps={self.reg.eps:g} (roughly "
                f"{seconds / 60:.0f} min or more on 2 cores; damping with eps < damping uses a "
                "Cholesky factor instead, minutes faster)",
                self.solver.progress,
            )
        eig = []
        with progress_bar(len(self.param_blocks), "Gram eigh", self.solver.progress) as advance:
            for b in range(len(self.param_blocks)):
                s, U = self._eigh(b)
                eig.append((s.clamp_min(0.0), U))
                advance(1)
        # the rule on every block's eigenvalues plus one null-space eigenvalue (global τ)
        null = torch.zeros(1, dtype=torch.float64, device=self.ctx.device)
        parts = [s for s, _ in eig] + [null]
        inv = self.reg.inverse_eigenvalues(parts, dim=self.num_params)
        self.null_value = float(inv[-1][0])
        top = max((float(s.max()) for s, _ in eig if s.numel()), default=0.0)
        tol = self.R * torch.finfo(torch.float64).eps * top
        for b, ((s, U), phi) in enumerate(zip(eig, inv[:-1], strict=True)):
            phi = torch.where(s > tol, phi, torch.zeros_like(phi))
            self._cache[b] = (U, phi, self._correction(s, phi, tol))
        self.eigenvalues = [s for s, _ in eig]
        kept = sum(int((self._cache[b][1] != 0).sum()) for b in range(len(eig)))
        if self.null_value:
            kept += sum(
                blk.size - int((s > tol).sum())
                for blk, (s, _) in zip(self.param_blocks, eig, strict=True)
            )
        self.kept = kept
        self.reg.warn_if_mostly_truncated(
            kept, self.num_params, f"the {self.curvature.method} inverse"
        )

    def partial_threshold(self) -> float | None:
        """The rule's :meth:`~Regularization.nonnegative_cutoff` ``t`` (only the Gram
        eigenpairs above it are needed) when the solver allows the partial ``eigh``; else
        ``None``."""
        return self.reg.nonnegative_cutoff() if self.solver.partial_eigh else None

    def _eigh(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The eigenpairs of block ``b``'s Gram matrix the rule needs (every one, or those
        above :meth:`partial_threshold` by :func:`eigenpairs_above` where that is
        cheaper), from the solver's cache when it holds them."""
        gram = self.rows.gram(b)
        t = self.partial_threshold()

        def full() -> dict[str, torch.Tensor]:
            s, U = torch.linalg.eigh(gram)
            return {"s": s, "U": U}

        def above() -> dict[str, torch.Tensor]:
            pairs = eigenpairs_above(gram, t, max_cost_ratio=self.solver.partial_eigh)
            if pairs is None:
                every = full()
                keep = every["s"] > t
                return {"s": every["s"][keep].contiguous(), "U": every["U"][:, keep].contiguous()}
            self.partial_blocks += 1
            return {"s": pairs[0], "U": pairs[1]}

        if self.solver.cache is None:
            kept = full() if t is None else above()
            return kept["s"], kept["U"]
        digest = tensor_digest(gram)[:40]
        whole = Path(self.solver.cache) / f"eigh-{digest}.pt"  # type: ignore[arg-type]
        if t is None or whole.exists():
            kept = self._stored(f"eigh-{digest}", gram.shape, full)
        else:
            kept = self._stored(f"eigh-above-{digest}-{t!r}", gram.shape, above)
        return kept["s"], kept["U"]

    def _stored(
        self, key: str, shape: torch.Size, compute: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The factorisation ``key`` of an (R, R) Gram matrix from the solver's cache folder,
        else ``compute()``d and written there; either way memory-mapped from the file, so
        the kept factorisations of every block cost page cache, not resident memory."""
        file = Path(self.solver.cache) / f"{key}.pt"  # type: ignore[arg-type]
        file.parent.mkdir(parents=True, exist_ok=True)
        need = 8.0 * shape[0] * shape[0] * 2 + 2**30  # the file twice (temporary) + 1 GiB
        if not file.exists() and shutil.disk_usage(file.parent).free < need:
            warnings.warn(
                f"less than {format_bytes(need)} free under {file.parent}: this Gram "
                "factorisation is kept in memory only (not cached for a resume)",
                RuntimeWarning,
                stacklevel=2,
            )
            return compute()
        kept = None
        if file.exists():
            try:
                kept = read_tensors(file, mmap=True)
            except CorruptFileError:
                pass  # recomputed and rewritten below
        if kept is None or any(t.shape[0] != shape[0] for t in kept.values() if t.dim() == 2):
            write_tensors(file, compute())
            kept = read_tensors(file, mmap=True)  # CorruptFileError if it cannot be read back
        return {k: t.to(self.ctx.device) for k, t in kept.items()}

    def _correction(self, s: torch.Tensor, phi: torch.Tensor, tol: float) -> torch.Tensor:
        """``(φ(s) - φ₀) / s`` of (1) in closed forms free of cancellation; 0 for ``s <= tol``."""
        if self.null_value:
            c = -phi * self.null_value  # 1/(s+δ) - 1/δ = -s / (δ (s+δ))
        else:
            c = phi / s.clamp_min(1e-300)
        return torch.where(s > tol, c, torch.zeros_like(c))

    def _cholesky(self, b: int, keep: bool = True) -> torch.Tensor:
        """The Cholesky factor of ``K_b + δI``; kept for later calls (``keep``) while the
        kept factors fit ``max_dense_bytes``."""
        if b in self._cache:
            return self._cache[b][0]
        t0 = time.perf_counter()
        gram = self.rows.gram(b)

        def compute() -> dict[str, torch.Tensor]:
            gram.diagonal().add_(self.reg.damping)
            L, info = torch.linalg.cholesky_ex(gram)
            if int(info) != 0:
                raise ValueError(
                    f"the Cholesky factorisation of the Gram matrix + {self.reg.damping:g} I "
                    f"failed for block {self.param_blocks[b].name!r} (damping too small for "
                    "float64 at this scale); increase damping or use eps > 0."
                )
            return {"L": L}

        if self.solver.cache is not None:  # on disk, memory-mapped: always kept
            key = f"chol-{tensor_digest(gram)[:40]}-{self.reg.damping!r}"
            self._cache[b] = (self._stored(key, gram.shape, compute)["L"],)
            self.seconds += time.perf_counter() - t0
            return self._cache[b][0]
        L = compute()["L"]
        if keep and self._cache_bytes + 8.0 * self.R**2 <= self.curvature.max_dense_bytes:
            self._cache[b] = (L,)
            self._cache_bytes += 8.0 * self.R**2
        self.seconds += time.perf_counter() - t0
        return L

    def _solve(self, b: int, W: torch.Tensor, values: str, keep: bool = True) -> torch.Tensor:
        """``F W`` for (R, k) ``W``: ``(Γ + δI)⁻¹ W`` (cholesky) or ``U diag(v) Uᵀ W`` with
        ``v = φ`` (``values="phi"``) or the correction of (1) (``values="correction"``)."""
        if self.mode == "cholesky":
            return torch.cholesky_solve(W, self._cholesky(b, keep))
        U, phi, corr = self._cache[b]
        v = phi if values == "phi" else corr
        return U @ (v[:, None] * (U.T @ W))

    # ------------------------------------------------------------------ the interface

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """Rows of ``V`` (K, D) times ``C⁺``, by (1) or Woodbury -> (K, D) float64."""
        V2, vector = as_rows(V, self.num_params, "V")
        out = torch.empty_like(V2)
        for b, block in enumerate(self.param_blocks):
            X = self._solve(b, self.rows.times(b, V2), "correction")
            Vb = V2[:, block.index]
            if self.mode == "cholesky":
                out[:, block.index] = (Vb - self.rows.tmul(b, X)) / self.reg.damping
            else:
                out[:, block.index] = self.null_value * Vb + self.rows.tmul(b, X)
        return out[0] if vector else out

    def train_coefficients(self) -> torch.Tensor | None:
        """``σ`` (N, K) of (2) for the fit's training data; ``None`` for ``fisher="mc"``."""
        if self._sigma is False:
            self._sigma = train_coefficients(self.ctx, self.roots)
        return self._sigma  # type: ignore[return-value]

    def scores(self, Gq: torch.Tensor) -> torch.Tensor:
        """``Gq C⁺ G_trᵀ`` (Q, N) by (2) for query gradients ``Gq`` (Q, D) and the fit's
        own training examples as the training set. ``ValueError`` for ``fisher="mc"``."""
        sigma = self.train_coefficients()
        if sigma is None:
            raise ValueError(
                "scores by (2) need loss gradients in the range of the output roots, which "
                "fisher='mc' does not give; use influence_scores, which falls back to apply()."
            )
        Gq, _ = as_rows(Gq, self.num_params, "Gq")
        N, K = sigma.shape
        out = torch.zeros(N, len(Gq), dtype=torch.float64, device=Gq.device)
        with progress_bar(len(self.param_blocks), "Gram blocks", self.solver.progress) as advance:
            for b in range(len(self.param_blocks)):
                Z = self.rows.times(b, Gq)
                FZ = self._solve(b, Z, "phi", keep=False).view(N, K, len(Gq))
                out += (FZ * sigma[:, :, None]).sum(1)
                advance(1)
        return out.T.contiguous()

    @property
    def report(self) -> InverseReport:
        notes = f"{self.mode}, R = {self.R}"
        if self.partial_blocks:
            notes += f", {self.partial_blocks} block(s) by partial eigh"
        return InverseReport(route="gram", rank=self.kept, notes=notes)

    def pairwise_scores(self, task: ScoringTask) -> torch.Tensor | None:
        """Scores by (2) when the training set is the curvature's own (not for ``mc``)."""
        Xt, yt = task.train
        if Xt.shape != self.ctx.X.shape or not torch.equal(
            cast_floating(Xt, torch.float64), self.ctx.X
        ):
            return None
        if not torch.equal(yt.to(self.ctx.y.dtype), self.ctx.y):
            return None
        if self.train_coefficients() is None:
            return None
        scores = self.scores(task.gradients(*task.query, task.measure))
        task.advance(len(Xt))
        return scores

    def __repr__(self) -> str:
        return (
            f"GramInverse(method={self.curvature.method!r}, R={self.R}, mode={self.mode!r}, "
            f"reg={self.reg})"
        )


__all__ = ["Gram", "GramInverse", "thin_roots", "train_coefficients"]

"""How far a rung is from a reference rung, which ladder step the gap comes from, and why.

Approximation error of a rung ``C̃`` against a reference ``H`` (the exact
Hessian in the study), both inverted under the same
:class:`~curvinf.curvature.regularization.Regularization`:

- in parameter space, ``‖C̃⁺ − H⁺‖_F / ‖H⁺‖_F`` (:func:`inverse_error`);
- in influence space, ``‖G_q (C̃⁺ − H⁺) G_trᵀ‖_F / ‖G_q H⁺ G_trᵀ‖_F`` with query
  gradients ``G_q`` (Q, D) and training gradients ``G_tr`` (N, D): the relative
  Frobenius error of the (Q, N) score matrices (:func:`influence_error`).

Error decomposition (:func:`error_shares`): along the ladder
Hessian → GGN → block-GGN → EK-FAC → K-FAC the errors ``e_0 = 0, e_1, …, e_4``
telescope, so the steps' shares ``(e_i − e_{i−1}) / (e_4 − e_0)`` sum to 1.

Diagnostics of *why*: off-block mass of a dense curvature
(:func:`off_block_mass`), per-layer overlap of the block-GGN's and the Kronecker
basis's top-k eigenvectors (:func:`basis_overlap`, :func:`layer_basis_overlap`),
mismatch of eigenvalue spectra (:func:`spectrum_mismatch`), and the count of
negative Hessian eigenvalues (:func:`negative_eigenvalues`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch

from curvinf.curvature.operators import (
    Curvature,
    DenseEigenBlock,
    DiagonalEigenBlock,
    EigenBlock,
    InverseOperator,
    KroneckerEigenBlock,
)
from curvinf.influence import gradient_scores
from curvinf.names import LADDER_STEPS


def relative_frobenius_error(approx: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖approx − ref‖_F / ‖ref‖_F`` for two tensors of one shape (float64 internally).

    Raises ``ValueError`` for mismatched shapes or a zero reference.
    """
    if approx.shape != ref.shape:
        raise ValueError(
            f"approx and ref must have the same shape, got {tuple(approx.shape)} and "
            f"{tuple(ref.shape)}."
        )
    a, r = approx.to(torch.float64), ref.to(torch.float64)
    denom = float(torch.linalg.norm(r))
    if denom == 0.0:
        raise ValueError("the reference is zero, so a relative error is undefined.")
    return float(torch.linalg.norm(a - r)) / denom


def influence_error(approx_scores: torch.Tensor, ref_scores: torch.Tensor) -> float:
    """Influence-space error from score matrices ``S = G_q C⁺ G_trᵀ`` (Q, N):
    ``‖S̃ − S_ref‖_F / ‖S_ref‖_F = ‖G_q (C̃⁺ − H⁺) G_trᵀ‖_F / ‖G_q H⁺ G_trᵀ‖_F``."""
    return relative_frobenius_error(approx_scores, ref_scores)


def influence_space_error(
    approx: InverseOperator,
    ref: InverseOperator,
    G_query: torch.Tensor,
    G_train: torch.Tensor,
) -> float:
    """``‖G_q (C̃⁺ − H⁺) G_trᵀ‖_F / ‖G_q H⁺ G_trᵀ‖_F`` from gradients ``G_q`` (Q, D),
    ``G_tr`` (N, D), with only ``inv.apply`` (no dense inverse)."""
    _eigen_pair(approx, ref)
    return influence_error(
        gradient_scores(approx, G_query, G_train), gradient_scores(ref, G_query, G_train)
    )


def _eigen_pair(approx: InverseOperator, ref: InverseOperator) -> tuple:
    """Both inverses' ``eigen_form()``; a clear error for one without it or other sizes."""
    forms = []
    for name, inv in (("approx", approx), ("ref", ref)):
        form = inv.eigen_form() if hasattr(inv, "eigen_form") else None
        if form is None:
            raise TypeError(
                f"{name} must be an eigendecomposed inverse (fit_curvature(...).inverse(reg)), "
                f"got {type(inv).__name__}."
            )
        forms.append(form)
    if approx.num_params != ref.num_params:
        raise ValueError(
            f"approx has {approx.num_params} parameters, ref {ref.num_params}; fit both rungs on "
            "the same model."
        )
    return forms[0], forms[1]


def _eigenvector_rows(
    block: EigenBlock, keep: torch.Tensor, chunk_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Eigenvectors of ``block`` where ``keep`` (shaped like its eigenvalues) is true, as rows in
    the block's local coordinates ``(k, d)``, with their positions into ``keep.flatten()``."""
    positions = keep.reshape(-1).nonzero().squeeze(1)
    for a in range(0, len(positions), chunk_size):
        pos = positions[a : a + chunk_size]
        yield block.eigenvectors(pos).to(torch.float64), pos


EigenForm = tuple[list[EigenBlock], list[torch.Tensor]]
"""A symmetric matrix ``Σ_β U_β diag(v_β) U_βᵀ`` as blocks (disjoint positions, orthonormal
eigenvectors) and their values shaped like each block's ``eigenvalues``: a curvature's
``(eigen(), [b.eigenvalues ...])`` or an inverse's ``eigen_form()``."""


def _positions(form: EigenForm, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per global position, the block holding it (-1: none) and its local position there."""
    device = form[0][0].index.device if form[0] else None
    label = torch.full((dim,), -1, dtype=torch.long, device=device)
    local = torch.zeros(dim, dtype=torch.long, device=device)
    for i, blk in enumerate(form[0]):
        label[blk.index] = i
        local[blk.index] = torch.arange(len(blk.index), device=device)
    return label, local


def _same_basis(x: EigenBlock, y: EigenBlock) -> bool:
    """Whether two blocks have one eigenbasis (same positions and eigenvectors)."""
    if type(x) is not type(y) or not torch.equal(x.index, y.index):
        return False
    if isinstance(x, KroneckerEigenBlock):
        return torch.equal(x.U_out, y.U_out) and torch.equal(x.U_in, y.U_in)  # type: ignore[attr-defined]
    if isinstance(x, DenseEigenBlock):
        return torch.equal(x.U, y.U)  # type: ignore[attr-defined]
    return isinstance(x, DiagonalEigenBlock)


def _coefficient_flops(blk: EigenBlock, p: int) -> float:
    """Flops per row of :meth:`EigenBlock.coefficients` for rows on ``p`` positions."""
    if isinstance(blk, DenseEigenBlock):
        return 2.0 * p * blk.U.shape[1]
    if isinstance(blk, KroneckerEigenBlock):
        n_out, n_in = blk.U_out.shape[0], blk.U_in.shape[0]
        return 2.0 * n_out * n_in * (n_out + n_in)
    return float(p)


def _inner_cost(rows: EigenForm, cols: EigenForm, dim: int) -> float:
    """Flops of :func:`eigen_inner` drawing eigenvectors from ``rows``."""
    label, _ = _positions(cols, dim)
    total = 0.0
    for blk, v in zip(*rows, strict=True):
        k = int((v != 0).sum())
        found = label[blk.index]
        for j in found.unique().tolist():
            if j >= 0:
                total += k * _coefficient_flops(cols[0][j], int((found == j).sum()))
    return total


def eigen_inner(a: EigenForm, b: EigenForm, dim: int, *, chunk_size: int = 512) -> float:
    """``tr(A B)`` of two symmetric (dim, dim) matrices in block eigen form (:data:`EigenForm`).

    With ``B = Σ_j b_j v_j v_jᵀ`` and ``A = Σ_i a_i u_i u_iᵀ``,

        tr(A B) = Σ_j b_j v_jᵀ A v_j,   v_jᵀ A v_j = Σ_i a_i (u_iᵀ v_j)²,

    over the ``v_j`` with ``b_j ≠ 0``, ``chunk_size`` at a time, and only the blocks of ``A``
    that share positions with ``v_j``'s block: one rotation (:meth:`EigenBlock.coefficients`)
    where ``A v`` would take two. Blocks with one eigenbasis give ``Σ a_i b_i`` directly.
    The eigenvectors are drawn from whichever side costs fewer flops (``Σ_j`` over its
    rows of the rotation cost on the other): ``D³`` for two dense ``D x D`` forms,
    ``D Σ d_b²`` for a dense one against blocks ``d_b``.
    """
    if _inner_cost(b, a, dim) > _inner_cost(a, b, dim):
        a, b = b, a
    label, local = _positions(a, dim)
    total = 0.0
    for blk, v in zip(*b, strict=True):
        v_flat = v.reshape(-1).to(torch.float64)
        found = label[blk.index]
        if bool((found < 0).all()):
            continue
        if bool((found == found[0]).all()) and _same_basis(a[0][int(found[0])], blk):
            total += float((a[1][int(found[0])].reshape(-1).to(torch.float64) * v_flat).sum())
            continue
        parts = [(j, (found == j).nonzero().squeeze(1)) for j in found.unique().tolist() if j >= 0]
        for rows, pos in _eigenvector_rows(blk, v != 0, chunk_size):
            quad = torch.zeros(len(rows), dtype=torch.float64, device=rows.device)
            for j, mine in parts:
                coef = a[0][j].coefficients(rows[:, mine], local[blk.index[mine]])
                quad += coef.pow(2) @ a[1][j].reshape(-1).to(torch.float64)
            total += float(v_flat[pos] @ quad)
    return total


def eigen_distance(a: EigenForm, b: EigenForm, dim: int, *, chunk_size: int = 512) -> float:
    """``‖A − B‖_F = (Σ a² + Σ b² − 2 tr(AB))^{1/2}`` of two :data:`EigenForm` matrices
    (:func:`eigen_inner`), never forming either."""
    sq = eigen_norm(a) ** 2 + eigen_norm(b) ** 2
    sq -= 2.0 * eigen_inner(a, b, dim, chunk_size=chunk_size)
    return math.sqrt(max(sq, 0.0))


def eigen_norm(form: EigenForm) -> float:
    """``‖A‖_F = (Σ a²)^{1/2}`` of an :data:`EigenForm` (orthonormal eigenvectors)."""
    return math.sqrt(sum(float(v.to(torch.float64).pow(2).sum()) for v in form[1]))


def curvature_form(curvature: Curvature) -> EigenForm:
    """A curvature's own eigendecomposition as an :data:`EigenForm`."""
    blocks = curvature.eigen()
    return blocks, [blk.eigenvalues for blk in blocks]


def inverse_error(approx: InverseOperator, ref: InverseOperator, *, chunk_size: int = 512) -> float:
    """``‖C̃⁺ − H⁺‖_F / ‖H⁺‖_F`` without forming either inverse densely.

    Both are block eigendecompositions (``eigen_form()``), so
    ``‖C̃⁺ − H⁺‖²_F = Σ_j s_j² − 2 tr(C̃⁺ H⁺) + Σ_i t_i²`` (:func:`eigen_distance`):
    memory ``O(chunk_size · D)``, at most ``D³`` flops for two dense inverses.
    """
    form_a, form_r = _eigen_pair(approx, ref)
    norm_r = eigen_norm(form_r)
    if norm_r == 0.0:
        raise ValueError(
            "the reference inverse is zero (every eigenvalue truncated); lower Regularization.eps."
        )
    return eigen_distance(form_a, form_r, ref.num_params, chunk_size=chunk_size) / norm_r


def error_shares(
    errors: Mapping[str, float],
    steps: Sequence[tuple[str, str, str]] = LADDER_STEPS,
) -> dict[str, float]:
    """Each ladder step's share of the total gap: ``(e_to − e_from) / (e_last − e_first)``.

    ``errors`` maps rung -> error against the reference (the reference itself may
    be missing; it counts as 0 when it is ``steps[0]``'s source). Shares of
    consecutive steps sum to 1; a step can have a negative share when a coarser
    rung happens to be closer to the reference. Raises ``ValueError`` for a missing
    rung or a zero total gap; NaN errors give NaN shares.
    """
    chain = [steps[0][1]] + [to for _, _, to in steps]
    for (_, _, to), (_, frm, _) in zip(steps, steps[1:], strict=False):
        if to != frm:
            raise ValueError(f"steps must form a chain; {to!r} is followed by {frm!r}.")
    values = {}
    for i, rung in enumerate(chain):
        if rung in errors:
            values[rung] = float(errors[rung])
        elif i == 0:
            values[rung] = 0.0
        else:
            raise ValueError(f"no error for rung {rung!r}; need {', '.join(chain)}.")
    total = values[chain[-1]] - values[chain[0]]
    if math.isnan(total):
        return {name: math.nan for name, _, _ in steps}
    if total == 0.0:
        raise ValueError("the total error gap is zero, so shares are undefined.")
    return {name: (values[to] - values[frm]) / total for name, frm, to in steps}


def off_block_mass(C: torch.Tensor, blocks: Sequence[torch.Tensor]) -> float:
    """``‖C − blockdiag(C)‖_F / ‖C‖_F`` for a (D, D) matrix and disjoint index sets ``blocks``
    (e.g. ``[b.index for b in param_blocks(model)]``); positions in no block count as off-block."""
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be a square matrix, got shape {tuple(C.shape)}.")
    label = torch.full((C.shape[0],), -1, dtype=torch.long, device=C.device)
    for b, idx in enumerate(blocks):
        if bool((label[idx] >= 0).any()):
            raise ValueError("blocks overlap; each position may belong to one block only.")
        label[idx] = b
    total = off = 0.0
    for a in range(0, C.shape[0], 1024):  # row chunks: no second (D, D) temporary
        rows = C[a : a + 1024].to(torch.float64).pow(2)
        la = label[a : a + 1024, None]
        same = (la == label[None, :]) & (la >= 0)
        total += float(rows.sum())
        off += float(rows[~same].sum())
    if total == 0.0:
        raise ValueError("C is zero, so off-block mass is undefined.")
    return math.sqrt(off / total)


def basis_overlap(V: torch.Tensor, U: torch.Tensor, ks: Sequence[int]) -> list[float]:
    """``‖V_kᵀ U_k‖_F² / k`` for each ``k`` in ``ks``: overlap of two top-k subspaces.

    ``V``, ``U`` (d, m): orthonormal columns sorted by eigenvalue, largest first;
    ``V_k`` is the first ``k`` columns. 1 means the same subspace, ``k/d`` is what
    random subspaces give on average.
    """
    if V.ndim != 2 or V.shape != U.shape:
        raise ValueError(f"V and U must be (d, m) of one shape, got {V.shape} and {U.shape}.")
    out = []
    for k in ks:
        if not 1 <= k <= V.shape[1]:
            raise ValueError(f"k={k} is outside [1, {V.shape[1]}].")
        M = V[:, :k].to(torch.float64).T @ U[:, :k].to(torch.float64)
        out.append(float(M.pow(2).sum()) / k)
    return out


def top_eigenvectors(block: EigenBlock, k: int, evals: torch.Tensor | None = None) -> torch.Tensor:
    """The ``k`` eigenvectors of ``block`` with the largest eigenvalues (``evals``, shaped like
    ``block.eigenvalues``, reorders them; default the block's own): (d, k), local coordinates."""
    evals = block.eigenvalues if evals is None else evals
    order = evals.reshape(-1).argsort(descending=True)[:k]
    keep = torch.zeros(evals.numel(), dtype=torch.bool, device=evals.device)
    keep[order] = True
    rows, pos = next(_eigenvector_rows(block, keep.reshape(evals.shape), evals.numel()))
    rank = {int(p): r for r, p in enumerate(pos)}
    return rows[[rank[int(p)] for p in order]].T


def overlap_ks(d: int, max_k: int = 512) -> list[int]:
    """``k`` = 1, 2, 5, 10, 20, 50, … up to ``min(d, max_k)``, plus that end."""
    top = min(d, max_k)
    ks, base = [], 1
    while base <= top:
        ks += [k for k in (base, 2 * base, 5 * base) if k <= top]
        base *= 10
    return sorted(set(ks + [top]))


def layer_basis_overlap(
    reference: Curvature, kronecker: Curvature, ks: Sequence[int] | None = None
) -> dict[str, dict[int, float]]:
    """Per layer, overlap of ``reference``'s top-k eigenvectors (the block-GGN) with the top-k of
    ``kronecker``'s basis ``U_S ⊗ U_A`` ordered by its own eigenvalues (K-FAC or EK-FAC).

    Blocks are matched by their positions in θ; returns ``{layer: {k: overlap}}``, with
    ``ks`` default :func:`overlap_ks` of the layer size. Blocks of parameters no adapter
    covers (``uncovered``) have no Kronecker basis and are left out.
    """
    names = getattr(kronecker, "kblocks", None)
    out: dict[str, dict[int, float]] = {}
    ref_blocks = {tuple(b.index.tolist()): b for b in reference.eigen()}
    blocks = kronecker.eigen()
    if names is not None:  # the Kronecker blocks come first; uncovered parameters' after
        blocks = blocks[: len(names)]
    for i, kb in enumerate(blocks):
        key = tuple(kb.index.tolist())
        if key not in ref_blocks:
            raise ValueError(
                "the reference has no block at the positions of a Kronecker block; use a "
                "block rung with the same partition (partition='layer' for bias='joint', "
                "'tensor' for bias='separate')."
            )
        d = len(key)
        layer_ks = list(ks) if ks is not None else overlap_ks(d)
        m = max(layer_ks)
        V = top_eigenvectors(ref_blocks[key], m)
        U = top_eigenvectors(kb, m)
        name = names[i].name if names is not None else str(i)
        out[name] = dict(zip(layer_ks, basis_overlap(V, U, layer_ks), strict=True))
    return out


def spectrum_mismatch(approx: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖sort(λ̃) − sort(λ)‖₂ / ‖λ‖₂`` between two spectra with the same number of
    eigenvalues (any shapes): how well the eigenvalues match, ignoring the eigenvectors."""
    a = approx.reshape(-1).to(torch.float64).sort().values
    r = ref.reshape(-1).to(torch.float64).sort().values
    return relative_frobenius_error(a, r)


def negative_eigenvalues(evals: torch.Tensor, rtol: float = 1e-10) -> int:
    """How many eigenvalues are below ``−rtol · max|λ|`` (negative beyond round-off)."""
    if evals.numel() == 0:
        return 0
    tol = rtol * float(evals.abs().max())
    return int((evals < -tol).sum())


__all__ = [
    "LADDER_STEPS",
    "basis_overlap",
    "curvature_form",
    "eigen_distance",
    "eigen_inner",
    "eigen_norm",
    "error_shares",
    "influence_error",
    "influence_space_error",
    "inverse_error",
    "layer_basis_overlap",
    "negative_eigenvalues",
    "off_block_mass",
    "overlap_ks",
    "relative_frobenius_error",
    "spectrum_mismatch",
    "top_eigenvectors",
]

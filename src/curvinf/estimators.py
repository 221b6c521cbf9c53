"""Errors and diagnostics at any size: randomized estimates from products only.

:mod:`curvinf.diagnostics` computes its quantities exactly, from eigendecompositions
or dense matrices. Past dense memory — a matrix-free Hessian or GGN, an iterative
inverse — only products are available, and this module estimates the same
quantities from them, each with a standard error:

- :func:`frobenius_estimate`: ``‖A‖_F² = tr(AᵀA)`` of a linear map by Hutch++;
- :func:`inverse_error_estimate`: ``‖C̃⁺ − H⁺‖_F / ‖H⁺‖_F`` (the quantity of
  :func:`curvinf.diagnostics.inverse_error`) from ``apply`` alone;
  :func:`inverse_error_any` uses the exact route when both inverses are
  eigendecompositions and the estimate otherwise;
- :func:`off_block_mass_estimate`: ``‖C − blockdiag(C)‖_F / ‖C‖_F`` (the quantity of
  :func:`curvinf.diagnostics.off_block_mass`) from products with ``C``;
- :func:`top_block_eigenvectors`: one block's top eigenvectors by Lanczos, to feed
  :func:`curvinf.diagnostics.basis_overlap` where a dense block ``eigh`` does not fit.

Operators follow the library's row convention (:data:`curvinf.curvature.krylov.Operator`):
a ``matvec`` maps rows ``V`` (k, D) to ``V A`` (k, D) — for the symmetric maps here that
is ``(A Vᵀ)ᵀ`` — so ``curvature.matvec`` and ``inverse.apply`` plug in unchanged.

The Hutch++ estimator (Meyer, Musco, Musco & Woodruff, *Hutch++: Optimal Stochastic
Trace Estimation*, SOSA 2021), as used here for ``J`` maps ``A_1 … A_J`` evaluated on
the same vectors (one "evaluation" applies all of them to a row):

1. sketch: ``S`` (s, D) Gaussian rows; ``Y_j = S A_j`` (s, D) for every ``j``;
2. ``Q`` (D, q): an orthonormal basis of the span of all ``J·s`` rows of ``Y``
   (``q = min(J·s, D)``), ``P = Q Qᵀ``; the span holds each ``A_j``'s dominant
   directions (for symmetric ``A_j`` the row and column spaces agree);
3. exact part: ``‖A_j Q‖_F²`` from ``q`` evaluations on the columns of ``Q``;
4. residual part: ``r`` Rademacher probes ``g_i`` (D,), deflated to ``(I − P) g_i``;
   ``x_{j,i} = ‖A_j (I − P) g_i‖²``.

Then ``‖A_j‖_F² = ‖A_j P‖_F² + ‖A_j (I − P)‖_F²`` exactly for any map (the cross term
``tr(P AᵀA (I − P))`` vanishes), ``‖A_j P‖_F² = ‖A_j Q‖_F²``, and
``E[x_{j,i} | Q] = tr((I − P) A_jᵀA_j (I − P)) = ‖A_j (I − P)‖_F²``, so

    est_j = ‖A_j Q‖_F² + mean_i x_{j,i}

is unbiased for every ``Q``; its standard error is the residual part's,
``sd_i(x_{j,i}) / √r`` (the low-rank part is exact given ``Q``). Products of
``AᵀA = A²`` are never needed: the sketch ``S A`` already finds ``A``'s top
directions, which are those of ``A²``, at half the cost of sketching ``A²``.
With ``A`` of rank ``≤ s`` the residual vanishes and the estimate is exact
(standard error 0 up to round-off); with ``q = D`` the residual part is skipped.
A budget of ``m`` evaluations splits ``s = max(1, m // (J + 2))``, ``J·s`` exact,
``r = m − (J + 1)·s`` probes (Hutch++'s thirds for ``J = 1``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from curvinf.curvature.krylov import Operator, lanczos
from curvinf.curvature.operators import Curvature, InverseOperator
from curvinf.devices import DeviceSpec, cpu_generator
from curvinf.diagnostics import inverse_error
from curvinf.validation import check_finite, check_int

MIN_PROBES = 2
"""Residual probes needed for a sample variance (a standard error)."""


@dataclass(frozen=True)
class Estimate:
    """A randomized estimate: ``value`` ± ``standard_error``.

    ``num_matvecs``: products with the underlying operator the estimate used (for
    :func:`inverse_error_estimate`, products with *each* of the two inverses; for
    :func:`off_block_mass_estimate`, products with ``C``). ``method``: ``"hutch++"``,
    or ``"exact"`` where the sketch spanned the whole space (standard error 0).
    """

    value: float
    standard_error: float
    num_matvecs: int
    method: str


@dataclass(frozen=True)
class RitzPairs:
    """Top Ritz pairs of one block: ``vectors`` (d, k) orthonormal columns in the block's
    local coordinates, ``values`` (k,) descending, ``residuals`` (k,)
    ``‖C_bb u_i − θ_i u_i‖``, and the ``num_matvecs`` products with ``C`` used."""

    vectors: torch.Tensor
    values: torch.Tensor
    residuals: torch.Tensor
    num_matvecs: int


@dataclass(frozen=True)
class _Parts:
    """Hutch++ pieces for ``J`` maps: ``exact`` (J,) ``‖A_j Q‖_F²``, ``samples`` (J, r)
    residual terms ``x_{j,i}`` (r = 0 when ``Q`` spans the space), ``evaluations`` used."""

    exact: torch.Tensor
    samples: torch.Tensor
    evaluations: int

    @property
    def values(self) -> torch.Tensor:
        """(J,) estimates ``‖A_j Q‖_F² + mean_i x_{j,i}``."""
        if self.samples.shape[1] == 0:
            return self.exact
        return self.exact + self.samples.mean(dim=1)

    @property
    def covariance(self) -> torch.Tensor:
        """(J, J) covariance of :attr:`values` (given ``Q``): sample covariance / r."""
        J, r = self.samples.shape
        if r < MIN_PROBES:
            return torch.zeros(J, J, dtype=torch.float64, device=self.samples.device)
        centred = self.samples - self.samples.mean(dim=1, keepdim=True)
        return centred @ centred.T / ((r - 1) * r)

    @property
    def method(self) -> str:
        return "exact" if self.samples.shape[1] == 0 else "hutch++"


def _budget(num_matvecs: object, num_maps: int, what: str) -> tuple[int, int]:
    """``(s, r)``: sketch size and residual probes for ``num_matvecs`` evaluations of
    ``num_maps`` maps (``s`` sketch + ``num_maps·s`` exact + ``r`` probes)."""
    m = check_int("num_matvecs", num_matvecs, low=1)
    s = max(1, m // (num_maps + 2))
    r = m - (num_maps + 1) * s
    if r < MIN_PROBES:
        need = num_maps + 1 + MIN_PROBES
        raise ValueError(
            f"num_matvecs={m} is too small for {what}: Hutch++ needs a sketch, its exact part "
            f"and {MIN_PROBES} residual probes for a standard error; pass at least {need}."
        )
    return s, r


def _in_rows(maps: Callable[[torch.Tensor], torch.Tensor], V: torch.Tensor, chunk: int):
    """``maps`` (rows (k, D) -> (J, k, D)) on the rows of ``V`` in chunks of ``chunk``."""
    return torch.cat([maps(V[a : a + chunk]) for a in range(0, len(V), chunk)], dim=1)


def _hutchpp(
    maps: Callable[[torch.Tensor], torch.Tensor],
    num_maps: int,
    dim: int,
    sketch: int,
    probes: int,
    gen: torch.Generator,
    chunk: int,
    device: DeviceSpec = "cpu",
) -> _Parts:
    """Hutch++ on ``J`` maps evaluated together (module docstring); ``maps`` takes float64
    rows (k, D) on ``device`` and returns (J, k, D) float64. The sketch stops at ``⌈D / J⌉``
    rows, where ``Q`` already spans the space. The random vectors are drawn with the CPU
    generator ``gen`` and moved to ``device`` (the same vectors on every device)."""
    sketch = min(sketch, -(-dim // num_maps))
    S = torch.randn(sketch, dim, generator=gen, dtype=torch.float64, device="cpu").to(device)
    Y = _in_rows(maps, S, chunk)
    Q, _ = torch.linalg.qr(Y.reshape(-1, dim).T)  # (D, q), q = min(J·s, D)
    Z = _in_rows(maps, Q.T.contiguous(), chunk)
    exact = Z.pow(2).sum(dim=(1, 2))
    used = sketch + Q.shape[1]
    if Q.shape[1] == dim:  # the sketch spans the space: nothing left to estimate
        none = torch.zeros(len(exact), 0, dtype=torch.float64, device=exact.device)
        return _Parts(exact, none, used)
    G = torch.randint(0, 2, (probes, dim), generator=gen, device="cpu")
    G = G.to(device=device, dtype=torch.float64) * 2 - 1
    G = G - (G @ Q) @ Q.T
    W = _in_rows(maps, G, chunk)
    return _Parts(exact, W.pow(2).sum(dim=2), used + probes)


def _checked(out: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """A product's result as float64, refusing a wrong shape or NaN/inf."""
    if not torch.is_tensor(out) or tuple(out.shape) != shape:
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"{name} must map rows (k, D) to (k, D); got {got} for {shape}.")
    check_finite(name, out)
    return out.to(torch.float64)


def _check_dtype(dtype: object) -> torch.dtype:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
    return dtype


def _generator(seed: object) -> torch.Generator:
    return cpu_generator(check_int("seed", seed))


def _sqrt_ratio(parts: _Parts, num: int, den: int, what: str) -> tuple[float, float]:
    """``√(N/T)`` of two of ``parts``' estimates and its delta-method standard error.

    With ``R = N/T``: ``Var R ≈ (Var N − 2R Cov(N, T) + R² Var T) / T²`` (shared probes
    make the covariance count), and ``SE(√R) = SE(R) / (2√R)`` (``√SE(R)`` at ``R = 0``).
    """
    values, cov = parts.values, parts.covariance
    N, T = float(values[num]), float(values[den])
    if not T > 0.0:
        raise ValueError(f"{what} is zero, so a relative value is undefined.")
    R = N / T
    var = (cov[num, num] - 2 * R * cov[num, den] + R * R * cov[den, den]) / (T * T)
    se_R = math.sqrt(max(float(var), 0.0))
    if R == 0.0:
        return 0.0, math.sqrt(se_R)
    rho = math.sqrt(R)
    return rho, se_R / (2 * rho)


def frobenius_estimate(
    matvec: Operator,
    dim: int,
    num_matvecs: int = 60,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    chunk_size: int = 64,
    device: DeviceSpec = "cpu",
) -> Estimate:
    """Hutch++ estimate of ``‖A‖_F² = tr(AᵀA)`` (``= tr(A²)`` for symmetric ``A``).

    Args:
        matvec: rows ``V`` (k, D) -> ``V A`` (k, D). The estimate is unbiased for any
            ``A``; its variance reduction assumes ``A`` symmetric (the sketch ``S A`` spans
            ``A``'s top row space, which for symmetric ``A`` is its column space too).
        dim: ``D``.
        num_matvecs: products with ``A`` to spend (at least 4): ``s = num_matvecs // 3``
            sketch rows, ``s`` for the exact part ``‖A Q‖_F²``, the rest Rademacher probes
            of the deflated residual (module docstring for the math); with ``s ≥ D`` only
            ``2D`` are spent and the value is exact.
        seed: seeds the sketch and the probes (same seed, same estimate).
        dtype: dtype of the vectors handed to ``matvec`` (float32 for a float32 operator);
            the arithmetic here is float64.
        chunk_size: rows per ``matvec`` call.
        device: where ``matvec`` takes its rows (the operator's device; the random
            vectors are drawn on the CPU and moved there).

    Returns:
        :class:`Estimate` with the standard error ``sd(‖A (I − P) g_i‖²) / √r`` of the
        residual part; ``method="exact"`` (standard error 0) when ``s ≥ D``.
    """
    D = check_int("dim", dim, low=1)
    dtype = _check_dtype(dtype)
    sketch, probes = _budget(num_matvecs, 1, "frobenius_estimate")
    chunk = check_int("chunk_size", chunk_size, low=1)

    def maps(V: torch.Tensor) -> torch.Tensor:
        return _checked(matvec(V.to(dtype)), tuple(V.shape), "matvec")[None]

    parts = _hutchpp(maps, 1, D, sketch, probes, _generator(seed), chunk, device)
    se = math.sqrt(float(parts.covariance[0, 0]))
    return Estimate(float(parts.values[0]), se, parts.evaluations, parts.method)


def distance_estimate(
    apply_a: Operator,
    apply_b: Operator,
    apply_ref: Operator,
    dim: int,
    num_matvecs: int = 60,
    *,
    seed: int = 0,
    chunk_size: int = 64,
    reference: str = "the reference",
    device: DeviceSpec = "cpu",
) -> Estimate:
    """Estimate of ``‖A − B‖_F / ‖R‖_F`` for symmetric maps given by row products only.

    One Hutch++ run on the two maps ``Δ = A − B`` and ``R`` with shared vectors: every
    vector goes through the three products once, giving ``V Δ`` and ``V R`` together; the
    basis ``Q`` spans both maps' sketches, and the residual probes are shared, so the two
    estimates ``N ≈ ‖Δ‖_F²`` and ``T ≈ ‖R‖_F²`` are correlated. The value is ``√(N / T)``
    (consistent, not unbiased: a ratio); its standard error is the delta method's with the
    probes' sample covariance of ``N`` and ``T`` (:func:`_sqrt_ratio`). ``apply_b`` may be
    ``apply_ref`` (then each vector is applied to it once).

    ``num_matvecs``: products with *each* map (at least 5; ``s = num_matvecs // 4``
    sketch, ``2s`` exact, the rest probes). ``device``: where the maps take their rows.
    Raises ``ValueError`` for a zero ``R``.
    """
    D = check_int("dim", dim, low=1)
    sketch, probes = _budget(num_matvecs, 2, "distance_estimate")
    chunk = check_int("chunk_size", chunk_size, low=1)

    def maps(V: torch.Tensor) -> torch.Tensor:
        R = _checked(apply_ref(V), tuple(V.shape), "the reference product")
        # ``==``, not ``is``: ``inv.apply`` makes a new bound method at every access
        B = R if apply_b == apply_ref else _checked(apply_b(V), tuple(V.shape), "apply_b")
        A = _checked(apply_a(V), tuple(V.shape), "apply_a")
        return torch.stack([A - B, R])

    parts = _hutchpp(maps, 2, D, sketch, probes, _generator(seed), chunk, device)
    value, se = _sqrt_ratio(parts, 0, 1, reference)
    return Estimate(value, se, parts.evaluations, parts.method)


def inverse_error_estimate(
    approx: InverseOperator,
    ref: InverseOperator,
    num_matvecs: int = 60,
    *,
    seed: int = 0,
    chunk_size: int = 64,
) -> Estimate:
    """Estimate of ``‖C̃⁺ − H⁺‖_F / ‖H⁺‖_F`` from ``approx.apply`` and ``ref.apply`` only:
    :func:`distance_estimate` with ``A = C̃⁺``, ``B = R = H⁺``.

    Raises ``ValueError`` for inverses of different sizes or a zero reference.
    """
    if approx.num_params != ref.num_params:
        raise ValueError(
            f"approx has {approx.num_params} parameters, ref {ref.num_params}; fit both rungs on "
            "the same model."
        )
    return distance_estimate(
        approx.apply,
        ref.apply,
        ref.apply,
        ref.num_params,
        num_matvecs,
        seed=seed,
        chunk_size=chunk_size,
        reference="the reference inverse",
        device=getattr(ref, "device", "cpu"),
    )


def inverse_error_any(
    approx: InverseOperator,
    ref: InverseOperator,
    num_matvecs: int = 60,
    *,
    seed: int = 0,
    chunk_size: int = 64,
) -> tuple[float, float, str]:
    """``‖C̃⁺ − H⁺‖_F / ‖H⁺‖_F`` as ``(value, standard_error, method)``.

    Exact (:func:`curvinf.diagnostics.inverse_error`; ``(value, 0.0, "exact")``) when both
    inverses have an ``eigen_form()``; otherwise :func:`inverse_error_estimate` with these
    arguments (``method="hutch++"``, or ``"exact"`` when its sketch spanned the space).
    """
    if all(inv.eigen_form() is not None for inv in (approx, ref)):
        return inverse_error(approx, ref, chunk_size=chunk_size), 0.0, "exact"
    est = inverse_error_estimate(approx, ref, num_matvecs, seed=seed, chunk_size=chunk_size)
    return est.value, est.standard_error, est.method


def _block_groups(
    blocks: Sequence[torch.Tensor], dim: int, device: DeviceSpec = "cpu"
) -> list[torch.Tensor]:
    """The blocks as long index tensors on ``device``, checked disjoint and inside
    ``[0, dim)``, plus one group of the positions in no block (if any) at the end."""
    label = torch.full((dim,), -1, dtype=torch.long, device=device)
    groups = []
    for b, idx in enumerate(blocks):
        idx = torch.as_tensor(idx, device=device).long().reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= dim):
            raise ValueError(f"block {b} has positions outside [0, {dim}).")
        if bool((label[idx] >= 0).any()) or len(idx.unique()) != len(idx):
            raise ValueError("blocks overlap; each position may belong to one block only.")
        label[idx] = b
        groups.append(idx)
    if not groups:
        raise ValueError("blocks is empty; pass at least one index set.")
    rest = (label < 0).nonzero().squeeze(1)
    return groups + ([rest] if rest.numel() else [])


def off_block_mass_estimate(
    curvature_matvec: Operator,
    blocks: Sequence[torch.Tensor],
    dim: int,
    num_matvecs: int | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    chunk_size: int = 64,
    device: DeviceSpec = "cpu",
) -> Estimate:
    """Estimate of ``‖C − blockdiag(C)‖_F / ‖C‖_F`` from products with ``C`` only.

    The definition is :func:`curvinf.diagnostics.off_block_mass`'s: disjoint index sets
    ``blocks``; positions in no block count as off-block (their diagonal too).

    One evaluation on a vector ``z`` splits it by blocks, ``z = Σ_b M_b z`` (``M_b``: the
    0/1 mask of block ``b``; positions in no block form one more group, ``n_g`` groups
    in all), and computes ``C M_b z`` for every group in one batched ``curvature_matvec``
    call of ``n_g`` rows. Then ``C z = Σ_b C M_b z``, ``blockdiag(C) z = Σ_b M_b C M_b z``
    (blocks only) and ``Off(C) z = C z − blockdiag(C) z`` — exact products with both
    maps, so Hutch++ runs on the pair ``Off(C)``, ``C`` with shared vectors
    (module docstring) and the ratio's standard error is the delta method's
    (:func:`inverse_error_estimate`). Per evaluation this costs ``n_g`` products with ``C``
    and has no sign or masking noise (a random-sign split would cost 2 but add the
    variance of which block pairs it separates, large with a few layers).

    Args:
        curvature_matvec: rows (k, D) -> rows ``V C`` (k, D), ``C`` symmetric
            (``curvature.matvec``).
        blocks: disjoint long index tensors (``[b.index for b in param_blocks(model)]``).
        dim: ``D``.
        num_matvecs: products with ``C`` to spend, at least ``5·n_g``; default ``40·n_g``
            (``num_matvecs // n_g`` evaluations: a quarter sketch, half exact, the rest
            probes).
        seed, dtype, chunk_size, device: as in :func:`frobenius_estimate` (``chunk_size``
            counts rows handed to ``curvature_matvec``; ``device``: the curvature's).
    """
    D = check_int("dim", dim, low=1)
    dtype = _check_dtype(dtype)
    groups = _block_groups(blocks, D, device)
    n_blocks = len(blocks)
    n_g = len(groups)
    m = 40 * n_g if num_matvecs is None else check_int("num_matvecs", num_matvecs, low=1)
    if m // n_g < 2 + 1 + MIN_PROBES:
        raise ValueError(
            f"num_matvecs={m} is too small: each evaluation costs {n_g} products with C (one "
            f"per block{' and one for the positions in no block' if n_g > n_blocks else ''}) "
            f"and Hutch++ needs {2 + 1 + MIN_PROBES}; pass at least {(2 + 1 + MIN_PROBES) * n_g}."
        )
    sketch, probes = _budget(m // n_g, 2, "off_block_mass_estimate")
    chunk = max(1, check_int("chunk_size", chunk_size, low=1) // n_g)

    def maps(V: torch.Tensor) -> torch.Tensor:
        k = len(V)
        masked = torch.zeros(n_g, k, D, dtype=torch.float64, device=V.device)
        for g, idx in enumerate(groups):
            masked[g][:, idx] = V[:, idx]
        CM = _checked(
            curvature_matvec(masked.reshape(n_g * k, D).to(dtype)), (n_g * k, D), "curvature_matvec"
        ).reshape(n_g, k, D)
        full = CM.sum(dim=0)
        diag = torch.zeros_like(full)
        for g, idx in enumerate(groups[:n_blocks]):
            diag[:, idx] = CM[g][:, idx]
        return torch.stack([full - diag, full])

    parts = _hutchpp(maps, 2, D, sketch, probes, _generator(seed), chunk, device)
    value, se = _sqrt_ratio(parts, 0, 1, "C")
    return Estimate(value, se, parts.evaluations * n_g, parts.method)


def top_block_eigenvectors(
    curvature: Curvature,
    block_index: torch.Tensor,
    k: int,
    *,
    max_iter: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> RitzPairs:
    """The top-``k`` eigenpairs of one diagonal block ``C_bb`` by Lanczos, from products only.

    ``C_bb`` is ``C`` restricted to the positions ``block_index`` (an ``EigenBlock.index``
    or ``ParamBlock.index``): a local vector (d,) is placed at those positions of a zero
    (D,) vector, multiplied by ``curvature.matvec`` and read back at the same positions.
    :func:`curvinf.curvature.krylov.lanczos` (full reorthogonalisation) with
    ``max_iter`` steps (default ``min(d, 2k + 20)``; ``d`` steps are exact) gives the
    Ritz pairs, largest first — what :func:`curvinf.diagnostics.top_eigenvectors` gives
    for a fitted block, so ``basis_overlap(result.vectors, top_eigenvectors(kb, k), ks)``
    works where the dense block does not fit. Check ``residuals`` for convergence.

    Each step is one ``curvature.matvec`` of a vector that is zero off the block; for a
    matrix-free rung pass the unblocked one (``matrix_free("ggn", ...)``, not
    ``"block_ggn"``): its diagonal block is the same, and a block rung's ``matvec`` runs
    one pass per block even where the vector is zero.
    """
    D, device = curvature.num_params, curvature.device
    idx = torch.as_tensor(block_index, device=device).long().reshape(-1)
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= D:
        raise ValueError(f"block_index must be non-empty positions in [0, {D}).")
    if len(idx.unique()) != len(idx):
        raise ValueError("block_index has repeated positions.")
    d = len(idx)
    k = check_int("k", k, low=1)
    if k > d:
        raise ValueError(f"k={k} is larger than the block ({d} positions).")
    if max_iter is not None and check_int("max_iter", max_iter, low=1) < k:
        raise ValueError(f"max_iter ({max_iter}) must be >= k ({k}) or None.")

    def block_matvec(V: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(len(V), D, dtype=torch.float64, device=device)
        full[:, idx] = V
        return _checked(curvature.matvec(full), (len(V), D), "curvature.matvec")[:, idx]

    U, theta, res, steps = lanczos(
        block_matvec,
        d,
        k,
        max_iter=max_iter,
        seed=check_int("seed", seed),
        progress=progress,
        device=device,
    )
    return RitzPairs(U, theta, res, steps)


__all__ = [
    "Estimate",
    "RitzPairs",
    "frobenius_estimate",
    "inverse_error_any",
    "distance_estimate",
    "inverse_error_estimate",
    "off_block_mass_estimate",
    "top_block_eigenvectors",
]

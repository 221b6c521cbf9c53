"""Curvature objects and their regularised inverses.

Every rung is an eigendecomposition in blocks: ``C = blockdiag_b(U_b Λ_b U_bᵀ)``
over disjoint sets of positions of the flat parameter vector. A block is

- :class:`DenseEigenBlock`: ``U`` (d, d) orthogonal, ``λ`` (d,);
- :class:`KroneckerEigenBlock`: a layer whose gradient is a matrix
  ``G`` (out, in+1) (bias as the last column); ``U = U_out ⊗ U_in`` never formed,
  eigenvalues as an (out, in+1) matrix;
- :class:`DiagonalEigenBlock`: ``U = I``.

Products with ``C``, with ``C``'s regularised inverse, and ``dense()`` all
rotate into the eigenbasis, scale, and rotate back:
``V ↦ ((V U) ⊙ s) Uᵀ`` row-wise, with ``s = λ`` or the inverse eigenvalues
of :class:`~curvinf.curvature.regularization.Regularization`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from curvinf.curvature.krylov import SolveReport
from curvinf.curvature.regularization import Regularization
from curvinf.validation import check_dense_budget, check_finite

DEFAULT_MAX_DENSE_BYTES = 8 * 2**30


class EigenBlock(ABC):
    """One block of an eigendecomposed curvature, at positions ``index`` of θ."""

    index: torch.Tensor

    @property
    @abstractmethod
    def eigenvalues(self) -> torch.Tensor:
        """The block's eigenvalues (any shape)."""

    @abstractmethod
    def scale(self, V: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Rows of ``V`` (K, d) times ``U diag(s) Uᵀ``; ``s`` shaped like ``eigenvalues``."""

    @abstractmethod
    def eigenvectors(self, positions: torch.Tensor) -> torch.Tensor:
        """The eigenvectors at ``positions`` of ``eigenvalues.flatten()`` as rows (k, d) in
        the block's local coordinates."""

    @abstractmethod
    def coefficients(self, V: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``V Uᵀ``-style coordinates: rows ``V`` (K, p) that live on the local ``positions``
        (p,) of the block (zero elsewhere) in its eigenbasis -> (K, n), in the order of
        ``eigenvalues.flatten()``."""


@dataclass
class DenseEigenBlock(EigenBlock):
    index: torch.Tensor
    U: torch.Tensor
    evals: torch.Tensor

    @property
    def eigenvalues(self) -> torch.Tensor:
        return self.evals

    def scale(self, V: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return ((V @ self.U) * s) @ self.U.T

    def eigenvectors(self, positions: torch.Tensor) -> torch.Tensor:
        return self.U[:, positions].T

    def coefficients(self, V: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        whole = len(positions) == len(self.U) and bool((positions[1:] > positions[:-1]).all())
        return V @ (self.U if whole else self.U[positions])  # no (d, d) copy for all rows


@dataclass
class DiagonalEigenBlock(EigenBlock):
    index: torch.Tensor
    evals: torch.Tensor

    @property
    def eigenvalues(self) -> torch.Tensor:
        return self.evals

    def scale(self, V: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return V * s

    def eigenvectors(self, positions: torch.Tensor) -> torch.Tensor:
        rows = torch.zeros(
            len(positions), len(self.index), dtype=torch.float64, device=self.evals.device
        )
        rows[torch.arange(len(positions), device=rows.device), positions] = 1.0
        return rows

    def coefficients(self, V: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = V.new_zeros(len(V), len(self.index))
        out[:, positions] = V
        return out


def layer_matrix(V: torch.Tensor, out: int, n_in: int, has_bias: bool) -> torch.Tensor:
    """A layer's rows (K, d) in the flat order (weight row-major, then bias) ->
    the augmented matrices ``[W | b]`` (K, out, n_in + has_bias)."""
    W = V[:, : out * n_in].reshape(len(V), out, n_in)
    if has_bias:
        W = torch.cat([W, V[:, out * n_in :, None]], dim=2)
    return W


def layer_flat(M: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """Inverse of :func:`layer_matrix`: (K, out, in') -> (K, d) in the flat order."""
    if not has_bias:
        return M.reshape(len(M), -1)
    return torch.cat([M[:, :, :-1].reshape(len(M), -1), M[:, :, -1]], dim=1)


@dataclass
class KroneckerEigenBlock(EigenBlock):
    """A layer block in the Kronecker eigenbasis ``U_out ⊗ U_in``.

    Positions ``index`` hold the weight (out, in) row-major, then the bias
    (out,) if ``has_bias``; as a matrix the layer gradient is ``[W | b]``
    (out, in + has_bias). Eigenvalues ``evals`` (out, in + has_bias):
    ``λ_out,i · λ_in,j`` for K-FAC, corrected values for EK-FAC.
    """

    index: torch.Tensor
    U_out: torch.Tensor
    U_in: torch.Tensor
    evals: torch.Tensor
    has_bias: bool

    @property
    def eigenvalues(self) -> torch.Tensor:
        return self.evals

    def to_matrix(self, V: torch.Tensor) -> torch.Tensor:
        """(K, d) in flat order -> (K, out, in + has_bias)."""
        out = self.U_out.shape[0]
        return layer_matrix(V, out, self.U_in.shape[0] - int(self.has_bias), self.has_bias)

    def from_matrix(self, M: torch.Tensor) -> torch.Tensor:
        """(K, out, in + has_bias) -> (K, d) in flat order."""
        return layer_flat(M, self.has_bias)

    def scale(self, V: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        M = self.U_out.T @ self.to_matrix(V) @ self.U_in
        return self.from_matrix(self.U_out @ (M * s) @ self.U_in.T)

    def eigenvectors(self, positions: torch.Tensor) -> torch.Tensor:
        n_in = self.U_in.shape[0]
        i, j = positions // n_in, positions % n_in
        M = self.U_out[:, i].T[:, :, None] * self.U_in[:, j].T[:, None, :]
        return self.from_matrix(M)

    def coefficients(self, V: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        full = V.new_zeros(len(V), len(self.index))
        full[:, positions] = V
        return (self.U_out.T @ self.to_matrix(full) @ self.U_in).reshape(len(V), -1)


def as_rows(V: torch.Tensor, num_params: int, name: str) -> tuple[torch.Tensor, bool]:
    check_finite(name, V)
    vector = V.ndim == 1
    V2 = V[None] if vector else V
    if V2.ndim != 2 or V2.shape[1] != num_params:
        raise ValueError(
            f"{name} must have shape (K, {num_params}) or ({num_params},) — rows in the flat "
            f"parameter order — got {tuple(V.shape)}."
        )
    return V2.to(torch.float64), vector


def _apply_blocks(
    blocks: list[EigenBlock], scales: list[torch.Tensor], V: torch.Tensor
) -> torch.Tensor:
    out = torch.zeros_like(V)
    for block, s in zip(blocks, scales, strict=True):
        out[:, block.index] = block.scale(V[:, block.index], s)
    return out


class Curvature(ABC):
    """A rung of the ladder: a symmetric ``D x D`` curvature in some structure.

    Subclasses provide :meth:`_eigen`; fitting happens in
    :func:`curvinf.fit_curvature`, inversion in :meth:`inverse`.
    """

    method: str
    num_params: int
    max_dense_bytes: float = DEFAULT_MAX_DENSE_BYTES
    model_fingerprint: str | None = None
    """:func:`curvinf.params.model_fingerprint` of the model it was fitted on (if known)."""

    def __init__(self, method: str, num_params: int, max_dense_bytes: float) -> None:
        self.method = method
        self.num_params = num_params
        self.max_dense_bytes = max_dense_bytes
        self._eigen_cache: list[EigenBlock] | None = None

    @abstractmethod
    def _eigen(self) -> list[EigenBlock]:
        """Eigendecomposition in blocks (computed once, then cached)."""

    @property
    def device(self) -> torch.device:
        """Where the curvature's tensors live: the device of the model it was fitted on."""
        return self.eigen()[0].index.device

    def eigen(self) -> list[EigenBlock]:
        if self._eigen_cache is None:
            self._eigen_cache = self._eigen()
        return self._eigen_cache

    def eigenvalues(self) -> torch.Tensor:
        """All eigenvalues, ascending: (D,) float64."""
        return torch.cat([b.eigenvalues.reshape(-1) for b in self.eigen()]).sort().values

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """Rows of ``V`` (K, D) times ``C``."""
        V2, vector = as_rows(V, self.num_params, "V")
        blocks = self.eigen()
        out = _apply_blocks(blocks, [b.eigenvalues for b in blocks], V2)
        return out[0] if vector else out

    def dense(self) -> torch.Tensor:
        """``C`` as a (D, D) float64 matrix in the flat parameter order."""
        check_dense_budget(self.num_params, self.max_dense_bytes, f"{self.method}.dense()")
        return self.matvec(torch.eye(self.num_params, dtype=torch.float64, device=self.device))

    def inverse(
        self, reg: Regularization | None = None, solver: InverseSolver | None = None
    ) -> InverseOperator:
        """The regularised (pseudo-)inverse ``C⁺`` under ``reg`` — the one way to get one.

        ``reg``: default ``Regularization()`` (damping 1e-3 with a truncation guard).
        ``solver``: ``None`` eigendecomposes the curvature (its blocks) and applies
        ``reg`` to the eigenvalues exactly; a solver setting (``CG``, ``LiSSA``,
        ``Preconditioned``, ``Lanczos``, ``Gram``) builds its own inverse, refusing
        clearly where it does not apply.
        """
        reg = Regularization() if reg is None else reg
        if not isinstance(reg, Regularization):
            raise TypeError(f"reg must be a Regularization, got {type(reg).__name__}.")
        if solver is not None:
            build = getattr(solver, "build_inverse", None)
            if build is None:
                raise TypeError(
                    "solver must be a solver setting (CG, LiSSA, Preconditioned, Lanczos or "
                    f"Gram from curvinf.curvature), got {type(solver).__name__}."
                )
            return build(self, reg)
        blocks = self.eigen()
        inv = reg.inverse_eigenvalues([b.eigenvalues for b in blocks], dim=self.num_params)
        out = self.eigen_inverse(blocks, inv, reg)
        reg.warn_if_mostly_truncated(out.rank, self.num_params, f"the {self.method} inverse")
        return out

    def eigen_inverse(
        self, blocks: list[EigenBlock], inv_evals: list[torch.Tensor], reg: Regularization
    ) -> InverseCurvature:
        """The eigen-route inverse; a rung with a faster scoring route returns a subclass."""
        return InverseCurvature(self, blocks, inv_evals, reg)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.method!r}, num_params={self.num_params})"


class InverseSolver(Protocol):
    """A solver setting: builds the inverse of a curvature under a regulariser."""

    def build_inverse(self, curvature: Curvature, reg: Regularization) -> InverseOperator: ...


@dataclass
class ScoringTask:
    """What an inverse's fast scoring route may use (:meth:`InverseOperator.pairwise_scores`).

    ``model``: an eval-mode float64 copy; ``loss_kind``: ``"ce"`` or ``"mse"``;
    ``measure``: the query measurement; ``train``/``query``: validated ``(X, y)``;
    ``chunk_size``: training rows per chunk; ``advance(n)``: progress after ``n``
    training rows; ``gradients(X, y, measure)``: per-example gradients (n, D) of
    ``model``, the generic route's.
    """

    model: nn.Module
    loss_kind: str
    measure: str
    train: tuple[torch.Tensor, torch.Tensor]
    query: tuple[torch.Tensor, torch.Tensor]
    chunk_size: int
    advance: Callable[[int], None]
    gradients: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]


@dataclass
class InverseReport:
    """How an inverse was computed, in one shape for every route.

    ``route``: ``eigen``, ``cg``, ``lissa``, ``<preconditioner>-cg`` / ``-neumann``,
    ``lanczos`` or ``gram``; ``rank``: eigen-directions with a non-zero inverse
    eigenvalue (``None`` when not known, e.g. iterative solves); ``solves``: one
    :class:`~curvinf.curvature.krylov.SolveReport` per iterative call (iterations,
    residuals, convergence); ``notes``: anything else worth saying.
    """

    route: str
    rank: int | None = None
    solves: list[SolveReport] = field(default_factory=list)
    notes: str = ""

    @property
    def converged(self) -> bool:
        """Whether every iterative solve so far converged (true for direct routes)."""
        return all(r.all_converged for r in self.solves)

    all_converged = converged


class InverseOperator(ABC):
    """Anything that applies a regularised inverse ``C⁺`` to rows: what influence needs.

    Every inverse — eigen (dense, block, Kronecker, diagonal), iterative (CG, LiSSA,
    Neumann), Lanczos, Gram — has ``num_params``, ``apply(V)`` for rows ``V`` (K, D)
    -> (K, D) float64, ``dense()`` (``apply`` to the identity, under the memory
    budget) and ``report``; and two optional hooks whose defaults say "none":
    :meth:`pairwise_scores` (a faster all-pairs scoring route) and
    :meth:`eigen_form` (an explicit eigendecomposition, for the diagnostics).
    """

    curvature: Curvature
    reg: Regularization

    @property
    def num_params(self) -> int:
        return self.curvature.num_params

    @property
    def device(self) -> torch.device:
        """Where the inverse applies: its curvature's device (the fitted model's)."""
        return self.curvature.device

    @property
    def model_fingerprint(self) -> str | None:
        """The fingerprint of the model its curvature was fitted on (``None``: unknown)."""
        return getattr(self.curvature, "model_fingerprint", None)

    @abstractmethod
    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """Rows of ``V`` (K, D) times ``C⁺`` -> (K, D) float64 (a (D,) vector works too)."""

    def dense(self) -> torch.Tensor:
        """``C⁺`` as a (D, D) float64 matrix."""
        check_dense_budget(
            self.num_params, self.curvature.max_dense_bytes, f"{self.curvature.method} inverse"
        )
        return self.apply(torch.eye(self.num_params, dtype=torch.float64, device=self.device))

    @property
    @abstractmethod
    def report(self) -> InverseReport:
        """How this inverse was computed (:class:`InverseReport`)."""

    def pairwise_scores(self, task: ScoringTask) -> torch.Tensor | None:
        """All-pairs scores ``G_q C⁺ G_trᵀ`` (Q, N) by a route faster than ``apply``, or
        ``None`` when this inverse has none for ``task`` (then the generic route runs)."""
        return None

    def eigen_form(self) -> tuple[list[EigenBlock], list[torch.Tensor]] | None:
        """``(blocks, inverse eigenvalues)`` when ``C⁺`` is an explicit block
        eigendecomposition; ``None`` otherwise."""
        return None


class InverseCurvature(InverseOperator):
    """``C⁺`` of an eigendecomposed curvature under one :class:`Regularization`."""

    def __init__(
        self,
        curvature: Curvature,
        blocks: list[EigenBlock],
        inv_evals: list[torch.Tensor],
        reg: Regularization,
    ) -> None:
        self.curvature = curvature
        self.blocks = blocks
        self.inv_evals = inv_evals
        self.reg = reg

    @property
    def rank(self) -> int:
        """How many eigen-directions survive truncation."""
        return sum(int((s != 0).sum()) for s in self.inv_evals)

    @property
    def report(self) -> InverseReport:
        return InverseReport(route="eigen", rank=self.rank)

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """Rows of ``V`` (K, D) times ``C⁺`` -> (K, D) float64 (a (D,) vector works too)."""
        V2, vector = as_rows(V, self.num_params, "V")
        out = _apply_blocks(self.blocks, self.inv_evals, V2)
        return out[0] if vector else out

    def eigen_form(self) -> tuple[list[EigenBlock], list[torch.Tensor]]:
        return self.blocks, self.inv_evals

    def __repr__(self) -> str:
        return f"InverseCurvature(method={self.curvature.method!r}, reg={self.reg})"

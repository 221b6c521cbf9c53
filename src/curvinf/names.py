"""Names of the rungs and of the ladder's steps: the one place they are spelled.

No torch here, so the report (and anything that only reads stored results) can
import it cheaply. The curvature package, the study and the report all use
these tuples; a new rung is added here first.
"""

from __future__ import annotations

METHODS: tuple[str, ...] = (
    "hessian",
    "ggn",
    "block_hessian",
    "block_ggn",
    "ekfac",
    "kfac",
    "diag_ggn",
    "identity",
)
"""Every rung :func:`curvinf.fit_curvature` fits."""

LADDER: tuple[str, ...] = ("hessian", "ggn", "block_ggn", "ekfac", "kfac")
"""The paper's ladder, from the exact Hessian down to K-FAC."""

MATRIX_FREE_METHODS: tuple[str, ...] = ("hessian", "ggn", "block_hessian", "block_ggn")
"""The exact rungs, also available as products only (:func:`curvinf.curvature.matrix_free`)."""

PSD_METHODS: tuple[str, ...] = ("ggn", "block_ggn", "ekfac", "kfac", "diag_ggn", "identity")
"""Rungs that are positive semi-definite by construction: a truncation ``eps < damping``
drops nothing of them, so a solver of ``(C + λI)⁻¹`` computes the same inverse."""

DENSE_RUNGS: tuple[str, ...] = ("hessian", "ggn")
"""Rungs stored as one dense ``D x D`` matrix."""

KRONECKER_RUNGS: tuple[str, ...] = ("ekfac", "kfac")
"""Rungs stored as per-layer Kronecker factors."""

PRECONDITIONERS: tuple[str, ...] = ("ekfac", "kfac", "ggn")
"""Rungs a :class:`~curvinf.curvature.solvers.Preconditioned` solver can fit by name."""

LADDER_STEPS: tuple[tuple[str, str, str], ...] = (
    ("ggn_substitution", "hessian", "ggn"),
    ("block_diagonalisation", "ggn", "block_ggn"),
    ("kronecker_basis", "block_ggn", "ekfac"),
    ("kronecker_eigenvalues", "ekfac", "kfac"),
)
"""The four steps of the ladder as ``(name, from rung, to rung)``.

``kronecker_basis`` (block-GGN → EK-FAC) replaces each layer's eigenbasis by the
Kronecker basis and keeps the exact diagonal in it; ``kronecker_eigenvalues``
(EK-FAC → K-FAC) replaces that diagonal by products of factor eigenvalues.
Together they are the Kronecker factorisation, block-GGN → K-FAC.
"""

RUNG_COLORS: dict[str, str] = {
    "hessian": "#222222",
    "ggn": "#1f77b4",
    "block_hessian": "#9467bd",
    "block_ggn": "#2ca02c",
    "ekfac": "#ff7f0e",
    "kfac": "#d62728",
    "diag_ggn": "#8c564b",
    "identity": "#7f7f7f",
}
"""One colour per rung in every figure."""

MARKERS: dict[str, str] = {"hessian": "o", "ggn": "s", "block_ggn": "D", "ekfac": "^", "kfac": "v"}
"""One marker per ladder rung in every figure."""

assert set(LADDER) <= set(METHODS) and set(MATRIX_FREE_METHODS) <= set(METHODS)
assert set(RUNG_COLORS) == set(METHODS) and set(MARKERS) == set(LADDER)

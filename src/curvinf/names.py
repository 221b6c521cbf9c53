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
    "unshared_ggn",
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

PSD_METHODS: tuple[str, ...] = (
    "ggn",
    "block_ggn",
    "unshared_ggn",
    "ekfac",
    "kfac",
    "diag_ggn",
    "identity",
)
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

SHARING_METHODS: tuple[str, ...] = ("unshared_ggn", "ekfac", "kfac")
"""Rungs that approximate weight sharing, by ``kfac_variant`` (``expand`` / ``reduce``)."""

REDUCE = "_reduce"
"""Suffix of a study rung fitted with ``kfac_variant="reduce"`` (``kfac_reduce``)."""

STUDY_RUNGS: tuple[str, ...] = METHODS + tuple(m + REDUCE for m in SHARING_METHODS)
"""Rungs a study configuration can list: every method, and the ``reduce`` variants."""


def rung_method(rung: str) -> tuple[str, str]:
    """``(method, kfac_variant)`` of a study rung: ``kfac_reduce`` -> ``("kfac", "reduce")``,
    any other -> ``(rung, "expand")``."""
    if rung.endswith(REDUCE) and rung[: -len(REDUCE)] in SHARING_METHODS:
        return rung[: -len(REDUCE)], "reduce"
    return rung, "expand"


def variant_rung(method: str, variant: str) -> str:
    """The study rung of ``method`` fitted with ``variant``: the inverse of :func:`rung_method`
    (``("kfac", "reduce")`` -> ``kfac_reduce``, ``("kfac", "expand")`` -> ``kfac``)."""
    return method if variant == "expand" else method + REDUCE


SHARING_LADDER: tuple[str, ...] = (
    *LADDER[:3],
    "unshared_ggn",
    *LADDER[3:],
    *(variant_rung(m, "reduce") for m in SHARING_METHODS),
)
"""The ladder of the weight-sharing studies, in measuring order: the paper's five rungs with
the unshared GGN between block-GGN and EK-FAC, then the ``reduce`` variants."""


def sharing_steps(variant: str) -> tuple[tuple[str, str, str], ...]:
    """The split of block-GGN → K-FAC for layers with weight sharing, as ``(name, from,
    to)``: ``weight_sharing`` (block-GGN → unshared GGN of ``variant``), then
    ``kronecker_factorisation`` (unshared GGN → K-FAC of the same variant)."""
    unshared = variant_rung("unshared_ggn", variant)
    return (
        ("weight_sharing", "block_ggn", unshared),
        ("kronecker_factorisation", unshared, variant_rung("kfac", variant)),
    )


RUNG_COLORS: dict[str, str] = {
    "hessian": "#222222",
    "ggn": "#1f77b4",
    "block_hessian": "#9467bd",
    "block_ggn": "#2ca02c",
    "unshared_ggn": "#17becf",
    "ekfac": "#ff7f0e",
    "kfac": "#d62728",
    "diag_ggn": "#8c564b",
    "identity": "#7f7f7f",
    "unshared_ggn_reduce": "#0b6e7a",
    "ekfac_reduce": "#b35806",
    "kfac_reduce": "#8b1a1a",
}
"""One colour per rung in every figure."""

MARKERS: dict[str, str] = {"hessian": "o", "ggn": "s", "block_ggn": "D", "ekfac": "^", "kfac": "v"}
"""One marker per ladder rung in every figure."""

assert set(LADDER) <= set(METHODS) and set(MATRIX_FREE_METHODS) <= set(METHODS)
assert set(RUNG_COLORS) == set(STUDY_RUNGS) and set(MARKERS) == set(LADDER)

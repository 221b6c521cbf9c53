"""What the study measures on one configuration: each rung's scores, LDS and errors, the
ladder's decomposition, the diagnostics, and the configuration's rows of the table.

Every quantity is exact where an exact form exists at the configuration's size and a
randomised estimate with its standard error otherwise (:mod:`curvinf.estimators`):

- influence space: ``‖S̃ − S_H‖_F / ‖S_H‖_F`` from the (Q, N) score matrices: always exact;
- inverse space: ``‖C̃⁺ − H⁺‖_F / ‖H⁺‖_F``: exact when both inverses have an eigen form
  (dense, Kronecker), Hutch++ through ``apply`` otherwise;
- curvature space: ``‖C̃ − H‖_F / ‖H‖_F`` (no inverse): exact from the eigendecompositions
  (dense, Kronecker) without forming a matrix, Hutch++ through ``matvec`` otherwise;
- adjacent-rung distances, the same three measures between consecutive rungs of the
  ladder (``‖C_{k+1}⁺ − C_k⁺‖_F / ‖H⁺‖_F``, ...), so a step's size is seen directly and
  not only as a difference of two errors against ``H⁺``;
- off-block mass of the Hessian and GGN (exact or estimated), per-layer basis overlap
  of K-FAC / EK-FAC with the block-GGN (dense blocks, or top-k Ritz vectors by Lanczos).

A rung whose inverse is not certified (:mod:`curvinf.study.rungs`) keeps its status and
figures; errors against an uncertified reference are NaN with the reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from curvinf.curvature import Curvature
from curvinf.curvature.matfree import matrix_free
from curvinf.diagnostics import (
    basis_overlap,
    curvature_form,
    eigen_distance,
    eigen_norm,
    error_shares,
    influence_error,
    layer_basis_overlap,
    negative_eigenvalues,
    off_block_mass,
    relative_frobenius_error,
    spectrum_mismatch,
    top_eigenvectors,
)
from curvinf.estimators import (
    distance_estimate,
    frobenius_estimate,
    off_block_mass_estimate,
    top_block_eigenvectors,
)
from curvinf.groundtruth import GroundTruth
from curvinf.influence import influence_scores
from curvinf.names import (
    DENSE_RUNGS,
    KRONECKER_RUNGS,
    LADDER_STEPS,
    SHARING_LADDER,
    SHARING_METHODS,
    rung_method,
    sharing_steps,
    variant_rung,
)
from curvinf.params import param_blocks
from curvinf.study.rungs import EXACT, UNAVAILABLE, RungCache
from curvinf.study.specs import RunConfig, reg_label

PREVIOUS = {
    **{to: frm for _, frm, to in LADDER_STEPS},
    "unshared_ggn": "block_ggn",
    variant_rung("unshared_ggn", "reduce"): "block_ggn",
    variant_rung("ekfac", "reduce"): "block_ggn",
    variant_rung("kfac", "reduce"): variant_rung("ekfac", "reduce"),
}
"""The rung one step up the ladder from each rung (towards the Hessian); the ``reduce``
rungs and the unshared GGNs hang off the block-GGN as their variant's chain does."""

STEP_ENDING = {
    **{to: name for name, _, to in LADDER_STEPS},
    "unshared_ggn": "weight_sharing",
    variant_rung("unshared_ggn", "reduce"): "weight_sharing",
}


SHARE_RANGE = (-0.10, 1.10)
"""Shares outside this range flag a decomposition as ill-conditioned."""

OVERLAP_K = 50
"""Ritz vectors per layer for the basis overlap where the block-GGN is matrix-free."""


ZERO_REFERENCE = "{}'s inverse is zero (every eigenvalue truncated)"
"""Why an error relative to the reference is NaN when the rule truncates all of it."""


def rung_order(config: RunConfig) -> list[str]:
    """The reference first, then the rungs in ladder order (each step's source comes first)."""
    rest = sorted(
        (r for r in config.rungs if r != config.reference),
        key=lambda r: SHARING_LADDER.index(r) if r in SHARING_LADDER else len(SHARING_LADDER),
    )
    return [config.reference] + rest


def curvature_distance(cache: RungCache, a: str, b: str, seed: int) -> tuple[float, float]:
    """``(‖C_a − C_b‖_F / ‖C_ref‖_F, standard error)``: exact from the eigendecompositions
    when every rung has one (dense or Kronecker route; :func:`eigen_distance`), else
    Hutch++ through ``matvec``. Measured once per pair (``cache.distances``)."""
    key = ("curvature", a, b, None)
    if key not in cache.distances:
        cache.distances[key] = _curvature_distance(cache, a, b, seed)
    return cache.distances[key]  # type: ignore[return-value]


def _curvature_distance(cache: RungCache, a: str, b: str, seed: int) -> tuple[float, float]:
    ref = cache.config.reference
    curvs = [cache.get(r) for r in (a, b, ref)]
    if any(c is None for c in curvs):
        return math.nan, math.nan
    ca, cb, cr = curvs
    if all(cache.route_of(r) in ("dense", "kronecker") for r in (a, b, ref)):
        fa, fb, fr = (curvature_form(c) for c in (ca, cb, cr))  # type: ignore[arg-type]
        return eigen_distance(fa, fb, cr.num_params) / eigen_norm(fr), 0.0  # type: ignore[union-attr]
    est = distance_estimate(
        ca.matvec,  # type: ignore[union-attr]
        cb.matvec,  # type: ignore[union-attr]
        cr.matvec,  # type: ignore[union-attr]
        cr.num_params,  # type: ignore[union-attr]
        cache.config.estimate_matvecs,
        seed=seed,
        device=cache.device,
    )
    return est.value, est.standard_error


def inverse_distance(cache: RungCache, a: str, b: str, reg, seed: int) -> tuple[float, float, str]:
    """``(‖C_a⁺ − C_b⁺‖_F / ‖H⁺‖_F, standard error, reason)`` under ``reg``; NaN with the
    reason when an inverse is missing or not certified. Measured once per pair and
    regulariser (``cache.distances``).

    - All three inverses in eigen form: exact (:func:`eigen_distance`).
    - ``b`` the reference: one Hutch++ run on ``C_a⁺ − H⁺`` and ``H⁺`` with shared probes
      (:func:`distance_estimate`; each probe goes through ``H⁺`` once).
    - Otherwise the numerator alone: exact when ``C_a⁺`` and ``C_b⁺`` have eigen forms,
      else Hutch++ on ``C_a⁺ − C_b⁺`` (no product with ``H⁺``, whose solves dominate
      where it is iterative); divided by ``‖H⁺‖_F`` measured once per regulariser
      (:func:`reference_inverse_norm`). Standard error by the delta method, the two
      estimates taken as independent.
    """
    key = ("inverse", a, b, reg_label(reg))
    if key not in cache.distances:
        cache.distances[key] = _inverse_distance(cache, a, b, reg, seed)
    return cache.distances[key]  # type: ignore[return-value]


def reference_inverse_norm(cache: RungCache, reg, seed: int) -> tuple[float, float]:
    """``(‖H⁺‖_F, standard error)`` of the reference's certified inverse under ``reg``: from
    its eigen form, else a Hutch++ estimate of ``‖H⁺‖_F²`` (delta method for the root)."""
    key = ("inverse-norm", cache.config.reference, None, reg_label(reg))
    if key not in cache.distances:
        inv = cache.inverse(cache.config.reference, reg).inverse
        form = inv.eigen_form()  # type: ignore[union-attr]
        if form is not None:
            cache.distances[key] = (eigen_norm(form), 0.0)
        else:
            est = frobenius_estimate(
                inv.apply,  # type: ignore[union-attr]
                inv.num_params,  # type: ignore[union-attr]
                cache.config.estimate_matvecs,
                seed=seed,
                device=cache.device,
            )
            norm = math.sqrt(max(est.value, 0.0))
            cache.distances[key] = (norm, est.standard_error / (2 * norm) if norm else math.nan)
    return cache.distances[key]  # type: ignore[return-value]


def _inverse_distance(cache: RungCache, a: str, b: str, reg, seed: int) -> tuple[float, float, str]:
    ref = cache.config.reference
    invs = [cache.inverse(r, reg) for r in (a, b, ref)]
    for ri in invs:
        if ri.inverse is None or ri.status != EXACT:
            return math.nan, math.nan, f"{ri.rung} is {ri.status}"
    ia, ib, ir = (ri.inverse for ri in invs)
    if b == ref:
        forms = [i.eigen_form() for i in (ia, ir)]  # type: ignore[union-attr]
        if all(f is not None for f in forms):
            norm = eigen_norm(forms[1])  # type: ignore[arg-type]
            if norm == 0.0:
                return math.nan, math.nan, ZERO_REFERENCE.format(ref)
            dist = eigen_distance(forms[0], forms[1], ir.num_params)  # type: ignore[arg-type, union-attr]
            return dist / norm, 0.0, ""
        est = distance_estimate(
            ia.apply,  # type: ignore[union-attr]
            ir.apply,  # type: ignore[union-attr]
            ir.apply,  # type: ignore[union-attr]
            ir.num_params,  # type: ignore[union-attr]
            cache.config.estimate_matvecs,
            seed=seed,
            device=cache.device,
        )
        return est.value, est.standard_error, ""
    norm, norm_se = reference_inverse_norm(cache, reg, seed)
    if norm == 0.0:
        return math.nan, math.nan, ZERO_REFERENCE.format(ref)
    fa, fb = ia.eigen_form(), ib.eigen_form()  # type: ignore[union-attr]
    if fa is not None and fb is not None:
        dist, dist_se = eigen_distance(fa, fb, ir.num_params), 0.0  # type: ignore[union-attr]
    else:
        est = frobenius_estimate(
            lambda V: ia.apply(V) - ib.apply(V),  # type: ignore[union-attr]
            ir.num_params,  # type: ignore[union-attr]
            cache.config.estimate_matvecs,
            seed=seed,
            device=cache.device,
        )
        dist = math.sqrt(max(est.value, 0.0))
        dist_se = est.standard_error / (2 * dist) if dist else math.sqrt(est.standard_error)
    value = dist / norm
    rel = (dist_se / dist) ** 2 if dist else 0.0
    se = value * math.sqrt(rel + (norm_se / norm) ** 2) if dist else dist_se / norm
    return value, se, ""


def _off_block(cache: RungCache, rung: str, curv: Curvature) -> tuple[float, float]:
    blocks = [b.index for b in param_blocks(cache.model, cache.config.partition)]
    if cache.route_of(rung) == "dense":
        return off_block_mass(curv.dense(), blocks), 0.0
    est = off_block_mass_estimate(
        curv.matvec, blocks, curv.num_params, seed=cache.config.seed, device=cache.device
    )
    return est.value, est.standard_error


def _basis_overlap(cache: RungCache, kron: Curvature) -> dict[str, dict[int, float]] | None:
    """Per layer, top-k overlap of the block-GGN's eigenvectors with ``kron``'s basis."""
    block = cache.get("block_ggn")
    if block is None:
        return None
    if cache.route_of("block_ggn") == "dense":
        return layer_basis_overlap(block, kron)
    ggn = matrix_free("ggn", cache.model, cache.loss, *cache.data.train, **cache.options("ggn"))
    names = getattr(kron, "kblocks", None)
    out = {}
    blocks = kron.eigen() if names is None else kron.eigen()[: len(names)]  # no uncovered
    for i, kb in enumerate(blocks):
        k = min(OVERLAP_K, len(kb.index))
        ritz = top_block_eigenvectors(ggn, kb.index, k, seed=cache.config.seed, progress=False)
        ks = [j for j in (1, 2, 5, 10, 20, 50) if j <= k]
        U = top_eigenvectors(kb, k)
        name = names[i].name if names is not None else str(i)
        out[name] = dict(zip(ks, basis_overlap(ritz.vectors, U, ks), strict=True))
    return out


def rung_result(
    rung: str,
    cache: RungCache,
    gt: GroundTruth,
    blobs: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Everything measured for one rung (a blob; tensors stay tensors). ``blobs`` holds the
    rungs measured before it (the reference and the previous rung of the ladder)."""
    config = cache.config
    curv = cache.get(rung)
    route = cache.route_of(rung)
    if curv is None:
        return {"status": UNAVAILABLE, "reason": cache.failed[rung], "route": route, "per_reg": {}}
    out: dict[str, Any] = {
        "status": EXACT,
        "reason": "",
        "route": route,
        "fit_seconds": cache.seconds[rung],
        "negative_eigenvalues": -1,
        "per_reg": {},
    }
    if route in ("dense", "kronecker"):
        evals = curv.eigenvalues()
        out["spectrum"] = evals.to("cpu", torch.float64)  # blobs are stored from the CPU
        out["negative_eigenvalues"] = negative_eigenvalues(evals)
    if rung in DENSE_RUNGS:
        out["off_block_mass"], out["off_block_mass_se"] = _off_block(cache, rung, curv)
    seed = config.seed
    if rung != config.reference:
        out["curvature_error"], out["curvature_error_se"] = curvature_distance(
            cache, rung, config.reference, seed
        )
    prev = PREVIOUS.get(rung)
    if prev in blobs and blobs[prev].get("status") != UNAVAILABLE:
        out["adjacent_curvature"], out["adjacent_curvature_se"] = curvature_distance(
            cache, rung, prev, seed
        )
    ref_blob = blobs.get(config.reference, {})
    data, model, loss = cache.data, cache.model, cache.loss
    for reg in config.regularizations:
        label = reg_label(reg)
        t0 = time.perf_counter()
        ri = cache.inverse(rung, reg)
        entry: dict[str, Any] = {"route": ri.route, "status": ri.status, "reason": ri.reason}
        if ri.inverse is None:
            out["per_reg"][label] = entry
            continue
        scores = influence_scores(
            model, loss, ri.inverse, train=data.train, query=data.query, measure=config.lds.measure
        ).cpu()  # compared with the stored scores of other rungs, which are on the CPU
        ri.settle()
        entry.update(status=ri.status, reason=ri.reason, figures=dict(ri.figures))
        res = gt.lds(scores, num_bootstrap=0)  # intervals: one paired bootstrap, compare.py
        entry.update(
            scores=scores.to(torch.float32),
            rank=ri.inverse.report.rank,
            lds=res.mean,
            lds_queries=res.num_valid,
            lds_per_query=res.per_query,
        )
        if rung == config.reference:
            entry.update(inverse_error=0.0, inverse_error_se=0.0, influence_error=0.0)
        else:
            ref_entry = ref_blob.get("per_reg", {}).get(label, {})
            value, se, why = inverse_distance(cache, rung, config.reference, reg, seed)
            entry.update(inverse_error=value, inverse_error_se=se)
            if why:
                entry["error_reason"] = why
            if "scores" in ref_entry and ref_entry.get("status") == EXACT:
                ref_scores = ref_entry["scores"].double()
                if ref_scores.any():
                    entry["influence_error"] = influence_error(scores.double(), ref_scores)
                else:  # relative to nothing: undefined, not a failed configuration
                    entry["influence_error"] = math.nan
                    entry.setdefault("error_reason", ZERO_REFERENCE.format(config.reference))
        prev_entry = blobs.get(prev, {}).get("per_reg", {}).get(label, {}) if prev else {}
        if "scores" in prev_entry and "scores" in ref_entry_of(blobs, config, label):
            diff = scores.double() - prev_entry["scores"].double()
            ref_norm = ref_entry_of(blobs, config, label)["scores"].double().norm()
            entry["adjacent_influence"] = float(diff.norm() / ref_norm) if ref_norm else math.nan
            value, se, why = inverse_distance(cache, rung, prev, reg, seed)  # type: ignore[arg-type]
            entry.update(adjacent_inverse=value, adjacent_inverse_se=se)
        entry["score_seconds"] = time.perf_counter() - t0
        out["per_reg"][label] = entry
    method, variant = rung_method(rung)
    if method in SHARING_METHODS and "block_ggn" in config.rungs:
        out["weight_sharing"] = _sharing_distances(cache, rung, method, variant)
    if method in KRONECKER_RUNGS:
        curves = _basis_overlap(cache, curv)
        if curves is not None:
            out["basis_overlap"] = {name: dict(c) for name, c in curves.items()}
        block = cache.get("block_ggn")
        if block is not None and cache.route_of("block_ggn") == "dense":
            out["spectrum_mismatch"] = spectrum_mismatch(out["spectrum"], block.eigenvalues().cpu())
    if method == "kfac":
        ekfac = cache.get(variant_rung("ekfac", variant))
        if ekfac is not None:  # same basis: compare eigenvalue by eigenvalue
            a = torch.cat([b.eigenvalues.reshape(-1) for b in curv.eigen()])
            e = torch.cat([b.eigenvalues.reshape(-1) for b in ekfac.eigen()])
            out["eigenvalue_mismatch_vs_ekfac"] = relative_frobenius_error(a, e)
    return out


def _sharing_distances(cache: RungCache, rung: str, method: str, variant: str) -> dict:
    """A weight-sharing rung's distances to the block-GGN (the exact per-layer curvature it
    approximates) and, for K-FAC, to its variant's unshared GGN (the factorisation step
    alone): curvature space, and inverse space under each regulariser."""
    seed = cache.config.seed
    targets = {"block_ggn": "to_block_ggn"}
    unshared = variant_rung("unshared_ggn", variant)
    if method == "kfac" and unshared in cache.config.rungs:
        targets[unshared] = "to_unshared"
    out: dict[str, Any] = {"variant": variant}
    for other, key in targets.items():
        if cache.get(other) is None:
            continue
        value, se = curvature_distance(cache, rung, other, seed)
        out[key] = {"curvature": value, "curvature_se": se, "inverse": {}}
        for reg in cache.config.regularizations:
            v, e, why = inverse_distance(cache, rung, other, reg, seed)
            out[key]["inverse"][reg_label(reg)] = {"value": v, "se": e, "why": why}
    return out


def ref_entry_of(blobs: dict[str, dict[str, Any]], config: RunConfig, label: str) -> dict:
    """The reference rung's entry under regulariser ``label`` (empty if none)."""
    return blobs.get(config.reference, {}).get("per_reg", {}).get(label, {})


def decomposition_flags(
    errors: dict[str, float], shares: dict[str, float], reference: str
) -> list[str]:
    """Why a decomposition is ill-conditioned: every rung's inverse error ≥ 1 (nothing is
    closer to ``H⁺`` than the zero matrix), or a share outside :data:`SHARE_RANGE`."""
    flags = []
    finite = {r: e for r, e in errors.items() if r != reference and math.isfinite(e)}
    if finite and all(e >= 1.0 for e in finite.values()):
        flags.append("every rung's inverse error >= 1")
    lo, hi = SHARE_RANGE
    out = [n for n, s in shares.items() if math.isfinite(s) and not lo <= s <= hi]
    if out:
        flags.append(f"shares outside [{lo:.0%}, {hi:.0%}]: {', '.join(out)}")
    return flags


def config_diagnostics(
    config: RunConfig,
    blobs: dict[str, dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Configuration-level diagnostics (JSON): shares and their flags, adjacent distances,
    off-block mass, overlap, mismatches; ``extra`` (comparisons, noise) merged in."""
    ok = {r: b for r, b in blobs.items() if b["status"] != UNAVAILABLE}
    shares: dict[str, dict[str, Any]] = {}
    flags: dict[str, list[str]] = {}
    for reg in config.regularizations:
        label = reg_label(reg)
        shares[label] = {}
        for measure in ("inverse_error", "influence_error"):
            errs = {
                r: b["per_reg"][label][measure]
                for r, b in ok.items()
                if measure in b["per_reg"].get(label, {})
            }
            try:
                shares[label][measure] = error_shares(errs)
            except ValueError as err:
                shares[label][measure] = {name: math.nan for name, _, _ in LADDER_STEPS}
                shares[label][f"{measure}_why_nan"] = str(err)
            if measure == "inverse_error":
                flags[label] = decomposition_flags(errs, shares[label][measure], config.reference)
            for variant in ("expand", "reduce"):
                steps = LADDER_STEPS[:2] + sharing_steps(variant)
                if not all(to in errs for _, _, to in steps):
                    continue
                try:
                    split = error_shares(errs, steps)
                except ValueError:
                    split = {name: math.nan for name, _, _ in steps}
                shares[label][f"{measure}_{variant}_sharing"] = split
    return {
        "config": config.id,
        "shares": shares,
        "decomposition_flags": flags,
        "routes": {r: b.get("route") for r, b in blobs.items()},
        "off_block_mass": {r: b["off_block_mass"] for r, b in ok.items() if "off_block_mass" in b},
        "negative_eigenvalues": {r: b["negative_eigenvalues"] for r, b in ok.items()},
        "basis_overlap": {r: b["basis_overlap"] for r, b in ok.items() if "basis_overlap" in b},
        "weight_sharing": {r: b["weight_sharing"] for r, b in ok.items() if "weight_sharing" in b},
        "spectrum_mismatch_vs_block_ggn": {
            r: b["spectrum_mismatch"] for r, b in ok.items() if "spectrum_mismatch" in b
        },
        "eigenvalue_mismatch_kfac_vs_ekfac": ok.get("kfac", {}).get(
            "eigenvalue_mismatch_vs_ekfac", math.nan
        ),
        "unavailable": {r: b["reason"] for r, b in blobs.items() if b["status"] == UNAVAILABLE},
        **(extra or {}),
    }


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _mean_overlap(curves: dict[str, dict], k: int) -> float:
    vals = [c[k] for c in curves.values() if k in c]
    vals += [c[str(k)] for c in curves.values() if str(k) in c]
    return sum(vals) / len(vals) if vals else math.nan


def config_rows(
    config: RunConfig,
    num_params: int,
    gt: GroundTruth,
    blobs: dict[str, dict[str, Any]],
    diagnostics: dict[str, Any],
    seconds: float,
) -> list[dict[str, Any]]:
    """The configuration's rows of the results table (:data:`curvinf.study.tables.COLUMNS`)."""
    noise = diagnostics.get("seed_noise", {})
    intervals = diagnostics.get("lds_intervals", {})
    rows = []
    for rung in config.rungs:
        blob = blobs[rung]
        for reg in config.regularizations:
            label = reg_label(reg)
            entry = blob.get("per_reg", {}).get(label, {})
            lo, hi = intervals.get(label, {}).get(
                rung, (entry.get("lds_ci_low"), entry.get("lds_ci_high"))
            )
            share = diagnostics["shares"][label]
            step = STEP_ENDING.get(rung, "")
            if step == "weight_sharing":  # its share is in its variant's chain
                chain = f"_{rung_method(rung)[1]}_sharing"
                share = {m: share.get(m + chain, {}) for m in ("inverse_error", "influence_error")}
            overlap = blob.get("basis_overlap")
            figures = entry.get("figures") or {}
            parts = [
                entry.get("reason", blob["reason"]),
                (
                    f"every eigenvalue is truncated under {label}: the inverse and every score "
                    "are zero, so the LDS is undefined"
                    if entry.get("rank") == 0 and not math.isfinite(entry.get("lds", math.nan))
                    else ""  # (rank 0 with an LDS: an unknown rank in blobs of older runs)
                ),
                entry.get("error_reason", ""),
                ", ".join(f"{k}={v:.3g}" for k, v in figures.items()),
            ]
            reason = "; ".join(p for p in parts if p)
            rows.append(
                {
                    "config": config.id,
                    "dataset": config.dataset,
                    "depth": config.depth,
                    "width": config.width,
                    "epochs": config.epochs,
                    "seed": config.seed,
                    "num_params": num_params,
                    "rung": rung,
                    "reg": label,
                    "damping": reg.damping,
                    "eps": reg.eps,
                    "relative": reg.relative,
                    "route": entry.get("route", blob.get("route", "")),
                    "status": entry.get("status", blob["status"]),
                    "reason": reason,
                    "lds": _num(entry.get("lds")),
                    "lds_ci_low": _num(lo),
                    "lds_ci_high": _num(hi),
                    "lds_queries": entry.get("lds_queries", 0),
                    "inverse_error": _num(entry.get("inverse_error")),
                    "inverse_error_se": _num(entry.get("inverse_error_se")),
                    "influence_error": _num(entry.get("influence_error")),
                    "curvature_error": 0.0
                    if rung == config.reference
                    else _num(blob.get("curvature_error")),
                    "curvature_error_se": _num(blob.get("curvature_error_se")),
                    "step": step,
                    "share_inverse": share["inverse_error"].get(step, math.nan),
                    "share_influence": share["influence_error"].get(step, math.nan),
                    "adjacent_inverse": _num(entry.get("adjacent_inverse")),
                    "adjacent_inverse_se": _num(entry.get("adjacent_inverse_se")),
                    "adjacent_influence": _num(entry.get("adjacent_influence")),
                    "adjacent_curvature": _num(blob.get("adjacent_curvature")),
                    "adjacent_curvature_se": _num(blob.get("adjacent_curvature_se")),
                    "decomposition_flags": "; ".join(diagnostics["decomposition_flags"][label]),
                    "rank": -1 if entry.get("rank") is None else entry["rank"],  # -1: unknown
                    "fit_seconds": _num(blob.get("fit_seconds")),
                    "score_seconds": _num(entry.get("score_seconds")),
                    "off_block_mass": _num(blob.get("off_block_mass")),
                    "off_block_mass_se": _num(blob.get("off_block_mass_se")),
                    "negative_eigenvalues": blob.get("negative_eigenvalues", -1),
                    "spectrum_mismatch": _num(blob.get("spectrum_mismatch")),
                    "overlap_k10": _mean_overlap(overlap, 10) if overlap else math.nan,
                    "base_train_loss": gt.base["train_loss"],
                    "base_query_loss": gt.base["query_loss"],
                    "base_query_accuracy": _num(gt.base.get("query_accuracy")),
                    "retrained_train_loss": float(gt.train_loss.median()),
                    "num_subsets": config.lds.num_subsets,
                    "num_seeds": config.lds.num_seeds,
                    "alpha": config.lds.alpha,
                    "matched_steps": config.lds.matched_steps,
                    "seed_noise_ratio": _num(noise.get("noise_ratio")),
                    "lds_ceiling": _num(noise.get("ceiling")),
                    "gt_warnings": len(gt.warnings),
                    "config_seconds": seconds,
                }
            )
    return rows


def rungs_used_by(rung: str, config: RunConfig) -> set[str]:
    """The other rungs whose fits or inverses :func:`rung_result` reads for ``rung``: the
    reference, the rung one step up (:data:`PREVIOUS`), and for the Kronecker and
    weight-sharing rungs the block-GGN (sharing distances, basis overlap) and K-FAC's
    unshared GGN and EK-FAC. A rung is released (its Gram factorisations deleted) only
    once no rung left to measure uses it."""
    out = {config.reference, PREVIOUS.get(rung)}
    method, variant = rung_method(rung)
    if method in SHARING_METHODS or method in KRONECKER_RUNGS:
        out.add("block_ggn")
    if method == "kfac":
        out |= {variant_rung("unshared_ggn", variant), variant_rung("ekfac", variant)}
    return out & set(config.rungs)


def measure_config(
    config: RunConfig,
    cache: RungCache,
    gt: GroundTruth,
    load: Callable[[str], dict[str, Any] | None],
    save: Callable[[str, dict[str, Any]], None],
    say: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Every rung's blob, in :func:`rung_order`: ``load(rung)`` a finished one, else measure
    it and ``save(rung, blob)``."""
    blobs: dict[str, dict[str, Any]] = {}
    order = rung_order(config)
    for i, rung in enumerate(order):
        blob = load(rung)
        if blob is None:
            say(f"  {config.id}: {rung} ({cache.route_of(rung)})")
            blob = rung_result(rung, cache, gt, blobs)
            save(rung, blob)
        else:
            cache.remember(rung, blob)
        blobs[rung] = blob
        needed = {config.reference}.union(*(rungs_used_by(r, config) for r in order[i + 1 :]))
        for done in order[: i + 1]:
            if done not in needed:  # no later rung compares with it
                cache.release(done)
    return blobs


__all__ = [
    "PREVIOUS",
    "config_diagnostics",
    "config_rows",
    "curvature_distance",
    "decomposition_flags",
    "inverse_distance",
    "measure_config",
    "rung_order",
    "rung_result",
    "rungs_used_by",
]

"""The study's report from a result store: markdown tables and PNG figures.

:func:`write_report` reads ``results.jsonl`` and each configuration's
``diagnostics.json`` (and rung spectra) written by :mod:`curvinf.study.runner`, and
writes ``report.md`` with figures under ``figures/``:

- ``lds_by_setting.png``: LDS per rung against depth, width and epochs, with CIs;
- ``lds_vs_error.png``: LDS against the inverse and influence-space error;
- ``error_shares.png``: each ladder step's share of the error gap, per configuration;
- ``off_block_mass.png``: off-block mass of the Hessian and GGN against depth and epochs;
- ``basis_overlap.png``: top-k basis overlap of EK-FAC/K-FAC with the block-GGN per layer;
- ``spectra.png``: the rungs' eigenvalue spectra.

Every figure draws a rung in the same colour (:data:`RUNG_COLORS`); a ladder step
takes the colour of the rung it ends at.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scipy.stats import false_discovery_control

from curvinf.groundtruth import CHANCE_FRACTION
from curvinf.names import LADDER, LADDER_STEPS, RUNG_COLORS, STUDY_RUNGS
from curvinf.storage import atomic_write, read_blob, read_json
from curvinf.study.tables import read_table, run_dir

STEP_COLORS: dict[str, str] = {name: RUNG_COLORS[to] for name, _, to in LADDER_STEPS}
STEP_LABELS: dict[str, str] = {
    "ggn_substitution": "GGN substitution (H → GGN)",
    "block_diagonalisation": "block-diagonalisation (GGN → block-GGN)",
    "kronecker_basis": "Kronecker basis (block-GGN → EK-FAC)",
    "kronecker_eigenvalues": "Kronecker eigenvalues (EK-FAC → K-FAC)",
    "weight_sharing": "weight sharing (block-GGN → unshared GGN)",
    "kronecker_factorisation": "Kronecker factorisation (unshared GGN → K-FAC)",
}
AXES = ("depth", "width", "epochs")

assert set(RUNG_COLORS) == set(STUDY_RUNGS)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _fmt(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if _finite(v) else "–"


def _rungs_in(rows: list[dict]) -> list[str]:
    present = {r["rung"] for r in rows}
    return [m for m in STUDY_RUNGS if m in present]


def _configs_in(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in sorted(rows, key=lambda r: (r["depth"], r["width"], r["epochs"], r["seed"])):
        seen.setdefault(r["config"], None)
    return list(seen)


def _short(row: dict) -> str:
    return f"d{row['depth']} w{row['width']} e{row['epochs']}" + (
        f" s{row['seed']}" if row["seed"] else ""
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------
# Figures. Each takes rows (and diagnostics) and a path, writes one PNG, returns the path.


def plot_lds_by_setting(rows: list[dict], path: Path) -> Path:
    """LDS per rung against each of depth, width, epochs that varies (mean over the others;
    error bars: the CI when one configuration, else the mean of the CI ends)."""
    plt = _pyplot()
    ok = [r for r in rows if _certified(r) and _finite(r["lds"])]
    rungs = _rungs_in(rows)
    complete = {
        c for c in _configs_in(rows) if {r["rung"] for r in ok if r["config"] == c} >= set(rungs)
    }
    note = "configurations with every rung" if complete else "all configurations"
    if complete:  # compare rungs on the same configurations only
        ok = [r for r in ok if r["config"] in complete]
    axes_used = [a for a in AXES if len({r[a] for r in rows}) > 1] or ["epochs"]
    fig, axs = plt.subplots(
        1, len(axes_used), figsize=(max(6.4, 4.6 * len(axes_used)), 4.0), squeeze=False
    )
    for ax, axis in zip(axs[0], axes_used, strict=True):
        values = sorted({r[axis] for r in rows})
        for k, rung in enumerate(rungs):
            xs, ys, lo, hi = [], [], [], []
            for v in values:
                sel = [r for r in ok if r["rung"] == rung and r[axis] == v]
                if not sel:
                    continue
                mean = sum(r["lds"] for r in sel) / len(sel)
                low = sum(r["lds_ci_low"] for r in sel) / len(sel)
                high = sum(r["lds_ci_high"] for r in sel) / len(sel)
                xs.append(values.index(v) + (k - 2) * 0.06)
                ys.append(mean)
                lo.append(max(mean - low, 0.0) if _finite(low) else 0.0)
                hi.append(max(high - mean, 0.0) if _finite(high) else 0.0)
            if xs:
                ax.errorbar(
                    xs,
                    ys,
                    yerr=[lo, hi],
                    color=RUNG_COLORS[rung],
                    marker="o",
                    capsize=3,
                    label=rung,
                )
        ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(axis if axis != "epochs" else "training epochs")
        ax.set_ylabel("LDS (Spearman, mean over queries)")
        ax.grid(alpha=0.3)
        ax.set_title(f"LDS vs {axis}")
    axs[0][0].legend(title="rung", fontsize=8)
    fig.suptitle(
        f"Attribution quality per rung\n(mean over {note} at each value; bars: 95% bootstrap CI)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lds_vs_error(rows: list[dict], path: Path) -> Path:
    """LDS against the inverse and influence-space error, one point per configuration x rung
    (colour: rung, marker: training epochs)."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    markers = dict(zip(sorted({r["epochs"] for r in rows}), "os^Dvp*", strict=False))
    fig, axs = plt.subplots(1, 2, figsize=(10, 4))
    measures = (
        ("inverse_error", "relative error of the inverse  ‖C̃⁺ − H⁺‖_F / ‖H⁺‖_F"),
        ("influence_error", "influence-space error  ‖G_q(C̃⁺ − H⁺)G_trᵀ‖_F / ‖G_q H⁺ G_trᵀ‖_F"),
    )
    for ax, (col, label) in zip(axs, measures, strict=True):
        for rung in _rungs_in(rows):
            for epochs, marker in markers.items():
                sel = [
                    r
                    for r in rows
                    if r["rung"] == rung
                    and r["epochs"] == epochs
                    and _finite(r["lds"])
                    and _finite(r[col])
                    and r[col] > 0
                ]
                if sel:
                    ax.scatter(
                        [r[col] for r in sel],
                        [r["lds"] for r in sel],
                        color=RUNG_COLORS[rung],
                        marker=marker,
                        s=40,
                        edgecolor="white",
                        linewidth=0.5,
                    )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("LDS")
        ax.grid(alpha=0.3)
    rung_handles = [
        Line2D([], [], color=RUNG_COLORS[r], marker="o", linestyle="", label=r)
        for r in _rungs_in(rows)
        if r != "hessian"
    ]
    epoch_handles = [
        Line2D([], [], color="grey", marker=m, linestyle="", label=f"{e} epochs")
        for e, m in markers.items()
    ]
    axs[0].legend(handles=rung_handles + epoch_handles, fontsize=7, title="rung / training")
    fig.suptitle(
        "LDS against approximation error\n(reference: Hessian, error 0; one point per "
        "configuration x rung)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_error_shares(rows: list[dict], path: Path) -> Path:
    """Stacked bars: each ladder step's share of the total error gap, per configuration."""
    plt = _pyplot()
    configs = _configs_in(rows)
    first = {c: next(r for r in rows if r["config"] == c) for c in configs}
    fig, axs = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(configs) + 4), 4.2), sharey=True)
    for ax, (col, title) in zip(
        axs,
        (("share_inverse", "inverse error"), ("share_influence", "influence-space error")),
        strict=True,
    ):
        pos = [0.0] * len(configs)
        neg = [0.0] * len(configs)
        for name, _, _ in LADDER_STEPS:
            vals = []
            for c in configs:
                sel = [r[col] for r in rows if r["config"] == c and r["step"] == name]
                vals.append(sel[0] if sel and _finite(sel[0]) else 0.0)
            bottoms = [p if v >= 0 else n for v, p, n in zip(vals, pos, neg, strict=True)]
            ax.bar(
                range(len(configs)),
                vals,
                bottom=bottoms,
                color=STEP_COLORS[name],
                label=STEP_LABELS[name],
                edgecolor="white",
                linewidth=0.5,
            )
            pos = [p + max(v, 0) for p, v in zip(pos, vals, strict=True)]
            neg = [n + min(v, 0) for n, v in zip(neg, vals, strict=True)]
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(configs)), [_short(first[c]) for c in configs], rotation=45)
        ax.set_title(f"{title} gap, H → K-FAC", fontsize=10)
        ax.set_xlabel("configuration (depth, width, epochs)")
        ax.grid(axis="y", alpha=0.3)
    axs[0].set_ylabel("share of the total gap (sums to 1)")
    handles, labels = axs[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_off_block_mass(rows: list[dict], path: Path) -> Path:
    """Off-block mass of the Hessian (solid) and GGN (dashed) against depth and epochs
    (mean over widths and seeds)."""
    plt = _pyplot()
    fig, axs = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (axis, other) in zip(axs, (("depth", "epochs"), ("epochs", "depth")), strict=True):
        xs_all = sorted({r[axis] for r in rows})
        top = max(r[other] for r in rows)
        for rung, style in (("hessian", "-"), ("ggn", "--")):
            for ov in sorted({r[other] for r in rows}):
                pts = []
                for x in xs_all:
                    sel = [
                        r["off_block_mass"]
                        for r in rows
                        if r["rung"] == rung
                        and r[axis] == x
                        and r[other] == ov
                        and _finite(r["off_block_mass"])
                    ]
                    if sel:
                        pts.append((xs_all.index(x), sum(sel) / len(sel)))
                if pts:
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        style,
                        marker="o",
                        color=RUNG_COLORS[rung],
                        alpha=0.4 + 0.6 * (ov == top),
                        label=f"{rung}, {other} {ov}",
                    )
        ax.set_xticks(range(len(xs_all)), [str(x) for x in xs_all])
        ax.set_xlabel(axis if axis != "epochs" else "training epochs")
        ax.set_ylabel("off-block mass ‖C − blockdiag(C)‖_F / ‖C‖_F", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Cross-layer coupling: Hessian (solid) and GGN (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pick(items: Sequence[str], n: int) -> list[str]:
    if len(items) <= n:
        return list(items)
    step = (len(items) - 1) / (n - 1)
    return [items[round(i * step)] for i in range(n)]


def plot_basis_overlap(rows: list[dict], diagnostics: dict[str, dict], path: Path) -> Path:
    """Per configuration (up to 9), per layer: ``‖V_kᵀU_k‖²_F / k`` against ``k`` for EK-FAC
    (solid) and K-FAC (dashed), each basis ordered by its own eigenvalues."""
    plt = _pyplot()
    configs = [c for c in _configs_in(rows) if diagnostics.get(c, {}).get("basis_overlap")]
    configs = _pick(configs, 9)
    first = {c: next(r for r in rows if r["config"] == c) for c in configs}
    n = max(len(configs), 1)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axs = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.4 * nrows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, c in zip(axs.flat, configs, strict=False):
        curves = diagnostics[c]["basis_overlap"]
        for rung, style in (("ekfac", "-"), ("kfac", "--")):
            layers = curves.get(rung, {})
            for i, (layer, curve) in enumerate(layers.items()):
                ks = sorted(int(k) for k in curve)
                ax.plot(
                    ks,
                    [curve[str(k)] if str(k) in curve else curve[k] for k in ks],
                    style,
                    color=cmap(i / max(len(layers) - 1, 1)),
                    label=f"layer {layer}" if rung == "ekfac" else None,
                )
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("k (top eigenvectors)")
        ax.set_ylabel("overlap ‖V_kᵀU_k‖²_F / k")
        ax.set_title(_short(first[c]), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axs.flat)[len(configs) :]:
        ax.axis("off")
    fig.suptitle(
        "Top-k overlap of block-GGN and Kronecker eigenvectors\n"
        "(solid: Kronecker basis in EK-FAC order, dashed: in K-FAC order)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_spectra(out: Path, rows: list[dict], path: Path) -> Path:
    """Sorted ``|λ|`` of every rung (negative Hessian ones hollow), up to 4 configurations."""
    plt = _pyplot()
    configs = _pick(_configs_in(rows), 4)
    first = {c: next(r for r in rows if r["config"] == c) for c in configs}
    fig, axs = plt.subplots(
        1, max(len(configs), 1), figsize=(4.6 * len(configs), 3.8), squeeze=False
    )
    for ax, c in zip(axs[0], configs, strict=False):
        for rung in _rungs_in(rows):
            file = out / "runs" / c / "rungs" / f"{rung}.pt"
            if not file.exists():
                continue
            blob = read_blob(file)
            if blob.get("status") not in CERTIFIED or "spectrum" not in blob:
                continue
            ev = blob["spectrum"].double()
            ev = ev[ev.abs().argsort(descending=True)]
            idx = range(1, len(ev) + 1)
            ax.plot(idx, ev.abs().clamp_min(1e-16).tolist(), color=RUNG_COLORS[rung], label=rung)
            neg = (ev < 0).nonzero().squeeze(1).tolist()
            if neg and rung == "hessian":
                ax.scatter(
                    [i + 1 for i in neg],
                    ev[neg].abs().clamp_min(1e-16).tolist(),
                    s=6,
                    facecolors="none",
                    edgecolors=RUNG_COLORS[rung],
                    label="hessian, λ < 0",
                )
        ax.axhline(1e-4, color="grey", linestyle=":", linewidth=1, label="ε = 1e-4")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("eigenvalue index (largest |λ| first)")
        ax.set_ylabel("|λ|")
        ax.set_title(_short(first[c]), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Curvature spectra per rung")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------
# Tables.


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


CERTIFIED = ("exact", "ok")
"""Row statuses whose numbers are certified (``ok``: results written before routes had a
status)."""


def _certified(r: dict | None) -> bool:
    return r is not None and r["status"] in CERTIFIED


def lds_table(rows: list[dict], reg: str | None = None) -> str:
    """Markdown: one row per configuration, one column per rung, ``LDS [CI]`` (or the
    status of an uncertified route), and the LDS ceiling the ground truth's seed noise
    allows."""
    rows = [r for r in rows if reg is None or r["reg"] == reg]
    rungs = _rungs_in(rows)
    body = []
    for c in _configs_in(rows):
        sel = {r["rung"]: r for r in rows if r["config"] == c}
        first = next(iter(sel.values()))
        cells = [str(first["depth"]), str(first["width"]), str(first["epochs"])]
        for rung in rungs:
            r = sel.get(rung)
            if r is None:
                cells.append("–")
            elif r["status"] not in CERTIFIED and not _finite(r["lds"]):
                cells.append(r["status"])
            else:
                mark = "" if _certified(r) else f" ({r['status']})"
                cells.append(
                    f"{_fmt(r['lds'])} [{_fmt(r['lds_ci_low'], 2)}, {_fmt(r['lds_ci_high'], 2)}]"
                    + mark
                )
        cells.append(_fmt(first.get("lds_ceiling"), 2))
        body.append(cells)
    return _table(["depth", "width", "epochs", *rungs, "ceiling (seed noise)"], body)


def comparison_table(comparisons: list[dict], reg: str) -> str:
    """Markdown: per configuration, the paired LDS difference of each pair of adjacent
    rungs (finer minus coarser) with its 95% interval; ``*`` where it excludes 0."""
    comps = [c for c in comparisons if c["reg"] == reg]
    body = []
    for cid in dict.fromkeys(c["config"] for c in comps):
        sel = [c for c in comps if c["config"] == cid]
        cells = [f"d{sel[0]['depth']} w{sel[0]['width']} e{sel[0]['epochs']}"]
        cells += [_paired_cell(sel, frm, to) for _, frm, to in LADDER_STEPS]
        body.append(cells)
    return _table(["configuration", *[f"{f} − {t}" for _, f, t in LADDER_STEPS]], body)


def _significant(p: Any, level: float) -> bool:
    """Whether a p-value exists (no bootstrap gives none) and is below ``level``."""
    return _finite(p) and p < level


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """Benjamini–Hochberg adjusted p-values (false discovery rate; SciPy's
    ``false_discovery_control``), in input order; NaN stays NaN and is not counted."""
    idx = [i for i, p in enumerate(p_values) if _finite(p)]
    out = [math.nan] * len(p_values)
    if idx:
        adjusted = false_discovery_control([p_values[i] for i in idx], method="bh")
        for i, q in zip(idx, adjusted, strict=True):
            out[i] = float(q)
    return out


def tally_table(comparisons: list[dict], reg: str, level: float = 0.05) -> str:
    """Markdown: per ladder step, over the configurations, how often the finer rung's LDS
    is higher, lower or not distinguishable (paired interval excludes 0), the same counts
    after Benjamini–Hochberg control of the false discovery rate over every step and
    configuration of the table, and the median paired difference."""
    comps = [c for c in comparisons if c["reg"] == reg and _finite(c.get("difference"))]
    found = []
    for name, frm, to in LADDER_STEPS:
        sel = [c for c in comps if {c["rung_a"], c["rung_b"]} == {frm, to}]
        found.append((name, frm, to, sel))
    flat = [c for *_, sel in found for c in sel]
    q_values = benjamini_hochberg([c["p_value"] for c in flat])
    adjusted = {id(c): q for c, q in zip(flat, q_values, strict=True)}
    body = []
    for _, frm, to, sel in found:
        signed = [(c["difference"] if c["rung_a"] == frm else -c["difference"], c) for c in sel]
        up = sum(d > 0 and _significant(c["p_value"], level) for d, c in signed)
        down = sum(d < 0 and _significant(c["p_value"], level) for d, c in signed)
        up_bh = sum(d > 0 and _significant(adjusted[id(c)], level) for d, c in signed)
        down_bh = sum(d < 0 and _significant(adjusted[id(c)], level) for d, c in signed)
        median = statistics.median(d for d, _ in signed) if signed else math.nan
        body.append(
            [
                f"{frm} − {to}",
                str(len(signed)),
                f"{up} / {down} / {len(signed) - up - down}",
                f"{up_bh} / {down_bh} / {len(signed) - up_bh - down_bh}",
                f"{median:+.3f}" if _finite(median) else "–",
            ]
        )
    return _table(
        [
            "step (finer − coarser)",
            "configurations",
            f"finer higher / lower / undecided (p < {level:g})",
            "same, BH-adjusted",
            "median difference",
        ],
        body,
    )


SHORT = {
    "hessian": "H",
    "ggn": "GGN",
    "block_ggn": "BGGN",
    "ekfac": "EKFAC",
    "kfac": "KFAC",
    "unshared_ggn": "UGGN",
    "unshared_ggn_reduce": "UGGN-r",
    "ekfac_reduce": "EKFAC-r",
    "kfac_reduce": "KFAC-r",
}


def _paired(comps: list[dict], a: str, b: str) -> tuple[float, float] | None:
    """``(LDS(a) − LDS(b), p-value)`` of one configuration's comparisons, or ``None``."""
    for c in comps:
        if (c["rung_a"], c["rung_b"]) == (a, b) and _finite(c.get("difference")):
            return c["difference"], c["p_value"]
        if (c["rung_a"], c["rung_b"]) == (b, a) and _finite(c.get("difference")):
            return -c["difference"], c["p_value"]
    return None


def ladder_order(rows: list[dict], comps: list[dict], level: float = 0.05) -> str:
    """One configuration's certified rungs by LDS, best first: ``>`` where the paired
    difference of neighbours is significant at ``level``, ``≈`` where it is not."""
    ranked = sorted(
        (r for r in rows if _certified(r) and _finite(r["lds"])), key=lambda r: -r["lds"]
    )
    out = SHORT.get(ranked[0]["rung"], ranked[0]["rung"]) if ranked else "–"
    for hi, lo in zip(ranked, ranked[1:], strict=False):
        pair = _paired(comps, hi["rung"], lo["rung"])
        sep = " > " if pair is not None and _significant(pair[1], level) else " ≈ "
        out += sep + SHORT.get(lo["rung"], lo["rung"])
    return out


def inversions(rows: list[dict], comps: list[dict], level: float = 0.05) -> list[str]:
    """The pairs of certified ladder rungs where the coarser one has a significantly higher
    LDS (paired test at ``level``): ``"EKFAC<KFAC"`` and so on; empty when the
    configuration agrees with the paper's ordering."""
    have = [r["rung"] for r in rows if _certified(r) and _finite(r["lds"])]
    chain = [r for r in LADDER if r in have]
    out = []
    for i, fine in enumerate(chain):
        for coarse in chain[i + 1 :]:
            pair = _paired(comps, fine, coarse)
            if pair is not None and pair[0] < 0 and _significant(pair[1], level):
                out.append(f"{SHORT[fine]}<{SHORT[coarse]}")
    return out


def protocol_table(results: dict[str, tuple[list[dict], list[dict]]], reg: str) -> str:
    """Markdown: per configuration of the grid, the ladder order (:func:`ladder_order`) under
    each protocol (``results``: preset name -> (rows, comparisons)) at rule ``reg``, and
    the significant inversions of the paper's order (:func:`inversions`)."""
    names = list(results)
    keys: dict[tuple[int, int, int], None] = {}
    for rows, _ in results.values():
        for r in rows:
            keys[(r["depth"], r["width"], r["epochs"])] = None
    body = []
    for d, w, e in sorted(keys):
        cells = [f"d{d} w{w} e{e}"]
        for name in names:
            rows, comps = results[name]
            sel = [
                r
                for r in rows
                if r["reg"] == reg and (r["depth"], r["width"], r["epochs"]) == (d, w, e)
            ]
            if not sel:
                cells += ["–", "–"]
                continue
            cfg = sel[0]["config"]
            cc = [c for c in comps if c["config"] == cfg and c["reg"] == reg]
            cells += [ladder_order(sel, cc), ", ".join(inversions(sel, cc)) or "none"]
        body.append(cells)
    header = ["configuration"]
    for name in names:
        header += [f"`{name}`: order by LDS", f"`{name}`: inversions"]
    return _table(header, body)


def eigenvalue_share_table(rows: list[dict], reg: str) -> str:
    """Markdown: readings of "the Kronecker eigenvalues carry most of the error", per
    configuration: the EK-FAC → K-FAC step's share of the telescoped error gap (inverse,
    influence space), and its share of the path the four steps move (sum of adjacent
    distances) in curvature, inverse and influence space."""
    rows = [r for r in rows if r["reg"] == reg]
    body = []
    for c in _configs_in(rows):
        sel = {r["rung"]: r for r in rows if r["config"] == c}
        first = next(iter(sel.values()))
        kfac = sel.get("kfac", {})
        cells = [_short(first)]
        for key in ("share_inverse", "share_influence"):
            v = kfac.get(key)
            cells.append(f"{100 * v:.0f}%" if _finite(v) else "–")
        for key in ("adjacent_curvature", "adjacent_inverse", "adjacent_influence"):
            steps = [sel.get(to, {}).get(key) for _, _, to in LADDER_STEPS]
            if all(_finite(v) for v in steps) and sum(steps) > 0:
                cells.append(f"{100 * steps[-1] / sum(steps):.0f}%")
            else:
                cells.append("–")
        body.append(cells)
    header = [
        "configuration",
        "share of gap (inverse)",
        "share of gap (influence)",
        "share of path (curvature)",
        "share of path (inverse)",
        "share of path (influence)",
    ]
    return _table(header, body)


TREND_COLUMNS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    (
        "Kronecker share, inverse",
        "share_inverse",
        ("kronecker_basis", "kronecker_eigenvalues"),
        "%",
    ),
    (
        "Kronecker share, influence",
        "share_influence",
        ("kronecker_basis", "kronecker_eigenvalues"),
        "%",
    ),
    ("block-diag. share, inverse", "share_inverse", ("block_diagonalisation",), "%"),
    ("block-diag. share, influence", "share_influence", ("block_diagonalisation",), "%"),
    ("GGN share, inverse", "share_inverse", ("ggn_substitution",), "%"),
    ("GGN share, influence", "share_influence", ("ggn_substitution",), "%"),
    ("off-block mass (H)", "off_block_mass", ("hessian",), ""),
    ("off-block mass (GGN)", "off_block_mass", ("ggn",), ""),
    ("overlap top-10 (EK-FAC)", "overlap_k10", ("ekfac",), ""),
)
"""The columns of :func:`trend_table`: header, row field, the steps (``step`` column) or
rungs whose values add up per configuration, and the unit (``%``: a share)."""


def _trend_value(sel: dict[str, dict], field: str, parts: tuple[str, ...]) -> float:
    """One configuration's value of a trend column: the sum over ``parts`` (NaN if any is
    missing or not finite)."""
    values = [sel.get(p, {}).get(field) for p in parts]
    return float(sum(values)) if all(_finite(v) for v in values) else math.nan


def _median_range(values: list[float], unit: str) -> str:
    """``median [min, max] (n)`` of the finite values, ``–`` when there are none."""
    vals = sorted(v for v in values if _finite(v))
    if not vals:
        return "–"
    f = (lambda v: f"{100 * v:.0f}%") if unit == "%" else (lambda v: f"{v:.2f}")
    return f"{f(statistics.median(vals))} [{f(vals[0])}, {f(vals[-1])}] ({len(vals)})"


def trend_table(rows: list[dict], comparisons: list[dict], reg: str) -> str:
    """Markdown: the paper's quantitative claims as trends over the grid. One row per depth
    and per number of epochs (each over every configuration with that value), cells
    ``median [min, max] (configurations)`` of: each step's share of the telescoped error
    gap H → K-FAC (the two Kronecker steps summed) in inverse and influence space, the
    off-block mass of the Hessian and the GGN, the top-10 basis overlap of EK-FAC with the
    block-GGN, and the paired LDS difference Hessian − GGN with its verdicts
    (higher / lower / undecided at 5%)."""
    rows = [r for r in rows if r["reg"] == reg]
    comps = [c for c in comparisons if c["reg"] == reg]
    per_config: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        per_config[r["config"]][r["rung"]] = r
        if r.get("step"):
            per_config[r["config"]][r["step"]] = r
    body = []
    for axis, label in (("depth", "depth {}"), ("epochs", "{} epochs")):
        for value in sorted({r[axis] for r in rows}):
            group = {c: sel for c, sel in per_config.items() if sel[next(iter(sel))][axis] == value}
            cells = [label.format(value), str(len(group))]
            for _, field, parts, unit in TREND_COLUMNS:
                values = [_trend_value(sel, field, parts) for sel in group.values()]
                cells.append(_median_range(values, unit))
            diffs = [
                _paired([c for c in comps if c["config"] == cid], "hessian", "ggn") for cid in group
            ]
            found = [d for d in diffs if d is not None]
            up = sum(d > 0 and _significant(p, 0.05) for d, p in found)
            down = sum(d < 0 and _significant(p, 0.05) for d, p in found)
            cells.append(
                f"{statistics.median(d for d, _ in found):+.3f} ({up} / {down} / "
                f"{len(found) - up - down})"
                if found
                else "–"
            )
            body.append(cells)
    header = ["configurations of", "n", *[h for h, *_ in TREND_COLUMNS], "LDS H − GGN (+ / − / ≈)"]
    return _table(header, body)


def adjacent_table(rows: list[dict], reg: str) -> str:
    """Markdown: per configuration, the distance each ladder step moves the curvature
    (``‖C_k − C_{k−1}‖ / ‖H‖``), its inverse (``/ ‖H⁺‖``) and its scores (``/ ‖S_H‖``)."""
    rows = [r for r in rows if r["reg"] == reg]
    body = []
    for c in _configs_in(rows):
        sel = {r["rung"]: r for r in rows if r["config"] == c}
        first = next(iter(sel.values()))
        cells = [_short(first)]
        for _, _, to in LADDER_STEPS:
            r = sel.get(to)
            if r is None:
                cells.append("–")
                continue
            cells.append(
                f"{_fmt(r.get('adjacent_curvature'), 2)} / {_fmt(r.get('adjacent_inverse'), 2)}"
                f" / {_fmt(r.get('adjacent_influence'), 2)}"
            )
        flags = first.get("decomposition_flags") or ""
        cells.append(flags or "–")
        body.append(cells)
    header = ["configuration", *[f"{f} → {t}" for _, f, t in LADDER_STEPS], "ill-conditioned"]
    return _table(header, body)


def error_table(rows: list[dict], reg: str | None = None) -> str:
    """Markdown: per configuration, each rung's inverse / influence-space error."""
    rows = [r for r in rows if reg is None or r["reg"] == reg]
    rungs = [r for r in _rungs_in(rows) if r != "hessian"]
    body = []
    for c in _configs_in(rows):
        sel = {r["rung"]: r for r in rows if r["config"] == c}
        first = next(iter(sel.values()))
        cells = [_short(first)]
        for rung in rungs:
            r = sel.get(rung)
            if not _certified(r):
                cells.append("–" if r is None else r["status"])
                continue
            se = r.get("inverse_error_se")
            est = f" ± {se:.1g}" if _finite(se) and se > 0 else ""
            cells.append(f"{_fmt(r['inverse_error'])}{est} / {_fmt(r['influence_error'])}")
        body.append(cells)
    return _table(["configuration", *[f"{r}: inverse / influence" for r in rungs]], body)


def shares_table(rows: list[dict], reg: str | None = None) -> str:
    """Markdown: per configuration, each step's share of the inverse (and influence) gap."""
    rows = [r for r in rows if reg is None or r["reg"] == reg]
    body = []
    for c in _configs_in(rows):
        sel = {r["step"]: r for r in rows if r["config"] == c and r["step"]}
        first = next(r for r in rows if r["config"] == c)
        cells = [_short(first)]
        for name, _, _ in LADDER_STEPS:
            r = sel.get(name)
            cells.append(
                f"{_fmt(100 * r['share_inverse'], 1)}% / {_fmt(100 * r['share_influence'], 1)}%"
                if r is not None and _finite(r["share_inverse"])
                else "–"
            )
        body.append(cells)
    return _table(["configuration", *[STEP_LABELS[n] for n, _, _ in LADDER_STEPS]], body)


def diagnostics_table(rows: list[dict], diagnostics: dict[str, dict]) -> str:
    """Markdown: off-block mass, negative Hessian eigenvalues, overlap, eigenvalue mismatch."""
    body = []
    for c in _configs_in(rows):
        sel = {r["rung"]: r for r in rows if r["config"] == c}
        first = next(iter(sel.values()))
        d = diagnostics.get(c, {})
        hess = sel.get("hessian", {})
        neg = hess.get("negative_eigenvalues", -1) if _certified(hess or None) else -1
        n_h = d.get("num_eigenvalues", {}).get("hessian")
        body.append(
            [
                _short(first),
                str(first["num_params"]),
                _fmt(d.get("off_block_mass", {}).get("hessian")),
                _fmt(d.get("off_block_mass", {}).get("ggn")),
                f"{neg} / {n_h}" if neg >= 0 and n_h else "–",
                _fmt(sel.get("ekfac", {}).get("overlap_k10")),
                _fmt(d.get("spectrum_mismatch_vs_block_ggn", {}).get("ekfac")),
                _fmt(d.get("spectrum_mismatch_vs_block_ggn", {}).get("kfac")),
                _fmt(d.get("eigenvalue_mismatch_kfac_vs_ekfac")),
            ]
        )
    header = [
        "configuration",
        "D",
        "off-block mass H",
        "off-block mass GGN",
        "negative λ(H)",
        "overlap@10 (EK-FAC, mean over layers)",
        "spectrum mismatch EK-FAC vs block-GGN",
        "K-FAC vs block-GGN",
        "K-FAC vs EK-FAC (same basis)",
    ]
    return _table(header, body)


def _pm(v: Any, se: Any, digits: int = 3) -> str:
    """``value`` or ``value ± se`` (an estimate), ``–`` when missing."""
    if not _finite(v):
        return "–"
    return _fmt(v, digits) + (f" ± {_fmt(se, 1)}" if _finite(se) and se > 0 else "")


def _paired_cell(comps: list[dict], a: str, b: str) -> str:
    """``LDS(a) − LDS(b) [95% interval]`` with ``*`` where it excludes 0, ``–`` if absent."""
    for c in comps:
        if {c["rung_a"], c["rung_b"]} != {a, b} or not _finite(c.get("difference")):
            continue
        sign = 1.0 if c["rung_a"] == a else -1.0
        if not (_finite(c["ci_low"]) and _finite(c["ci_high"])):
            return f"{sign * c['difference']:+.3f}"
        lo, hi = sorted((sign * c["ci_low"], sign * c["ci_high"]))
        star = "*" if lo > 0 or hi < 0 else ""
        return f"{sign * c['difference']:+.3f} [{lo:+.2f}, {hi:+.2f}]{star}"
    return "–"


def weight_sharing_table(rows: list[dict], diagnostics: dict[str, dict], reg: str) -> str:
    """Markdown: per configuration and K-FAC variant, block-GGN → K-FAC split into the
    weight-sharing step (block-GGN → unshared GGN) and the Kronecker factorisation (unshared
    GGN → K-FAC): each step's share of the H → K-FAC inverse-error gap, and the distance it
    moves the curvature (``‖C_a − C_b‖_F / ‖H‖_F``) and the inverse (``/ ‖H⁺‖_F``)."""
    body = []
    for c in _configs_in(rows):
        diag = diagnostics.get(c, {})
        first = next(r for r in rows if r["config"] == c)
        for variant, suffix in (("expand", ""), ("reduce", "_reduce")):
            shares = diag.get("shares", {}).get(reg, {}).get(f"inverse_error_{variant}_sharing")
            ws = diag.get("weight_sharing", {})
            step = ws.get("unshared_ggn" + suffix, {}).get("to_block_ggn", {})
            fact = ws.get("kfac" + suffix, {}).get("to_unshared", {})
            total = ws.get("kfac" + suffix, {}).get("to_block_ggn", {})
            if not (shares or step or fact):
                continue

            def inv(d: dict) -> str:
                e = d.get("inverse", {}).get(reg, {})
                return _pm(e.get("value"), e.get("se"))

            body.append(
                [
                    f"d{first['depth']} w{first['width']} e{first['epochs']}",
                    variant,
                    _fmt((shares or {}).get("weight_sharing"), 2),
                    _fmt((shares or {}).get("kronecker_factorisation"), 2),
                    _pm(step.get("curvature"), step.get("curvature_se")),
                    _pm(fact.get("curvature"), fact.get("curvature_se")),
                    _pm(total.get("curvature"), total.get("curvature_se")),
                    inv(step),
                    inv(fact),
                    inv(total),
                ]
            )
    header = [
        "configuration",
        "variant",
        "share: weight sharing",
        "share: factorisation",
        "curvature: BGGN→UGGN",
        "curvature: UGGN→KFAC",
        "curvature: BGGN→KFAC",
        "inverse: BGGN→UGGN",
        "inverse: UGGN→KFAC",
        "inverse: BGGN→KFAC",
    ]
    return _table(header, body)


def expand_reduce_table(rows: list[dict], comps: list[dict], reg: str) -> str:
    """Markdown: per configuration, expand against reduce: each variant's LDS and inverse
    error against H, and the paired LDS difference (expand − reduce) of K-FAC, EK-FAC and
    the unshared GGN."""
    rows = [r for r in rows if r["reg"] == reg]
    comps = [c for c in comps if c["reg"] == reg]
    body = []
    for c in _configs_in(rows):
        sel = {r["rung"]: r for r in rows if r["config"] == c}
        mine = [x for x in comps if x["config"] == c]
        first = next(iter(sel.values()))
        cells = [f"d{first['depth']} w{first['width']} e{first['epochs']}"]
        for rung in ("kfac", "ekfac", "unshared_ggn"):
            e, r = sel.get(rung), sel.get(rung + "_reduce")
            if e is None or r is None:
                cells += ["–", "–"]
                continue
            cells.append(
                f"{_fmt(e['lds'])} / {_fmt(r['lds'])} "
                f"({_fmt(e['inverse_error'], 2)} / {_fmt(r['inverse_error'], 2)})"
            )
            cells.append(_paired_cell(mine, rung, rung + "_reduce"))
        body.append(cells)
    header = ["configuration"]
    for name in ("K-FAC", "EK-FAC", "unshared GGN"):
        header += [f"{name}: LDS expand / reduce (inverse error)", f"{name}: expand − reduce"]
    return _table(header, body)


# ---------------------------------------------------------------------------------------
# The report.


def load_diagnostics(out: Path, rows: list[dict]) -> dict[str, dict]:
    """``config id -> diagnostics.json`` for every configuration in ``rows``."""
    diags = {}
    for c in {r["config"] for r in rows}:
        file = out / "runs" / c / "diagnostics.json"
        if file.exists():
            diags[c] = read_json(file)
    return diags


def models_at_chance(out: Path, rows: list[dict]) -> dict[str, tuple[float, float]]:
    """``config id -> (base training loss, chance loss)`` for the configurations in ``rows``
    whose stored base model learned next to nothing
    (:attr:`~curvinf.study.status.ConfigStatus.at_chance`, read from each run's
    ``config.json`` and ground-truth store); grid rows only."""
    from curvinf.study.specs import RunConfig
    from curvinf.study.status import config_status

    found = {}
    for cid in dict.fromkeys(r["config"] for r in rows):
        file = run_dir(out, cid) / "config.json"
        if not file.exists():
            continue
        status = config_status(RunConfig.from_dict(read_json(file)), out)
        if status.at_chance:
            found[cid] = (status.base_train_loss, status.chance_loss)
    return found


def stored_results(out: Path) -> tuple[list[dict], list[dict]]:
    """A result directory's rows and paired comparisons."""
    comparisons = read_table(out, "comparisons") if (out / "comparisons.jsonl").exists() else []
    return read_table(out), comparisons


def preset_name(out: Path) -> str:
    """The preset a result directory ran (its ``grid.json``), else the directory's name."""
    grid = read_json(out / "grid.json") if (out / "grid.json").exists() else {}
    return str(grid.get("name", out.name))


def ladder_table(rows: list[dict], comps: list[dict], reg: str) -> str:
    """Markdown for one model (``measure_ladder``'s rows) under rule ``reg``: per rung its
    route and status, LDS [CI], error against the reference (inverse / influence space),
    and the step from the rung above it: the paired LDS difference [CI] and the distance
    between the two inverses (relative to the reference's)."""
    above = {to: frm for _, frm, to in LADDER_STEPS}
    body = []
    for r in (r for r in rows if r["reg"] == reg):
        ok = r["status"] in CERTIFIED
        err = f"{_fmt(r['inverse_error'])} / {_fmt(r['influence_error'])}" if ok else "–"
        frm = above.get(r["rung"])
        step = _paired_cell(comps, r["rung"], frm) if frm else "–"
        lds = f"{_fmt(r['lds'])} [{_fmt(r['lds_ci_low'], 2)}, {_fmt(r['lds_ci_high'], 2)}]"
        body.append(
            [r["rung"], r["route"], r["status"], lds if ok else "–", err,
             f"{frm} → {r['rung']}: {step}" if frm else "–", _fmt(r.get("adjacent_inverse"))]
        )  # fmt: skip
    header = [
        "rung",
        "route",
        "status",
        "LDS [95% CI]",
        "error vs reference (inverse / influence)",
        "paired ΔLDS from the rung above",
        "adjacent inverse distance",
    ]
    return _table(header, body)


def _model_report(out: Path, rows: list[dict], comps: list[dict], title: str | None) -> Path:
    """``report.md`` for one model's ladder (rows without grid coordinates)."""
    name = rows[0]["config"]
    lines = [f"# {title or f'curvinf ladder: `{name}`'}", ""]
    reasons = [r for r in rows if r["status"] not in CERTIFIED]
    for reg in dict.fromkeys(r["reg"] for r in rows):
        sub = [r for r in rows if r["reg"] == reg]
        lines += [
            f"## Regularisation `{reg}`",
            "",
            f"Order by LDS (`>` where the paired test separates neighbours at 5%): "
            f"{ladder_order(sub, [c for c in comps if c['reg'] == reg])}",
            "",
            ladder_table(rows, [c for c in comps if c["reg"] == reg], reg),
            "",
        ]
    if reasons:
        lines += ["## Uncertified or unavailable rungs", ""]
        lines += [f"- `{r['rung']}`, `{r['reg']}`: {r['status']}: {r['reason']}" for r in reasons]
        lines.append("")
    path = out / "report.md"
    atomic_write(path, "\n".join(lines).encode())
    return path


def write_report(
    out: str | Path, *, title: str | None = None, against: Sequence[str | Path] = ()
) -> Path:
    """Draw every figure into ``out/figures`` and write ``out/report.md``; return its path.

    ``against``: other result directories (e.g. the other protocol's grid) whose ladder
    orders are set beside this one's, per configuration, for every rule they share."""
    out = Path(out)
    rows, comparisons = stored_results(out)
    if not rows:
        raise ValueError(f"{out}/results.jsonl has no rows; no configuration has finished yet.")
    if all(r.get("depth") is None for r in rows) and not against:  # measure_ladder's
        return _model_report(out, rows, comparisons, title)
    grid = read_json(out / "grid.json") if (out / "grid.json").exists() else {}
    runs = []
    if (out / "run_log.jsonl").exists():
        runs = [json.loads(x) for x in (out / "run_log.jsonl").read_text().splitlines() if x]
    diags = load_diagnostics(out, rows)
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    regs = list(dict.fromkeys(r["reg"] for r in rows))
    main = [r for r in rows if r["reg"] == regs[0]]  # figures: the first regularisation
    figures = {
        "lds_by_setting": plot_lds_by_setting(main, fig_dir / "lds_by_setting.png"),
        "lds_vs_error": plot_lds_vs_error(main, fig_dir / "lds_vs_error.png"),
        "error_shares": plot_error_shares(main, fig_dir / "error_shares.png"),
        "off_block_mass": plot_off_block_mass(main, fig_dir / "off_block_mass.png"),
        "basis_overlap": plot_basis_overlap(main, diags, fig_dir / "basis_overlap.png"),
        "spectra": plot_spectra(out, main, fig_dir / "spectra.png"),
    }
    configs = _configs_in(rows)
    grid_name = grid.get("name", "?")
    total = None
    if grid:
        total = math.prod(len(grid[k]) for k in ("depths", "widths", "epochs", "seeds"))
    lines = [f"# {title or f'curvinf study: preset `{grid_name}`'}", ""]
    if grid.get("description"):
        lines += [grid["description"], ""]
    lines += [
        f"Configurations finished: {len(configs)}" + (f" of {total}" if total else "") + ".",
        "",
    ]
    if runs:
        lines += ["| run finished (UTC) | configurations | wall time |", "|---|---|---|"]
        for run in runs:
            states = defaultdict(int)
            for s in run["configs"].values():
                states[s] += 1
            summary = ", ".join(f"{n} {s}" for s, n in states.items()) or "none"
            lines.append(f"| {run['finished']} | {summary} | {run['seconds'] / 60:.1f} min |")
        lines.append("")
    for reg in regs:
        sub = [r for r in rows if r["reg"] == reg]
        lines += [
            f"## Regularisation `{reg}`",
            "",
            "### LDS per rung",
            "",
            "Mean Spearman over queries, [95% interval: centred percentile bootstrap over "
            "subsets and queries]; the last column is the correlation a perfect predictor "
            "would reach against this ground truth's retraining noise (NaN with one "
            "retraining).",
            "",
            lds_table(sub),
            "",
            "### Paired LDS differences of adjacent rungs",
            "",
            "LDS(finer) − LDS(coarser) on shared bootstrap resamples of subsets and queries, "
            "[95% interval]; `*`: the interval excludes 0.",
            "",
            comparison_table(comparisons, reg),
            "",
            "Over the configurations: how often each step's finer rung has the higher LDS "
            "(paired test at 5%, then Benjamini–Hochberg over the table's tests).",
            "",
            tally_table(comparisons, reg),
            "",
            "### Approximation error against the Hessian (inverse / influence space)",
            "",
            error_table(sub),
            "",
            "### Share of the error gap H → K-FAC per ladder step (inverse / influence space)",
            "",
            shares_table(sub),
            "",
            "### Distance moved by each ladder step (curvature / inverse / influence space)",
            "",
            adjacent_table(sub, reg),
            "",
            "### The Kronecker-eigenvalue step (EK-FAC → K-FAC), read five ways",
            "",
            eigenvalue_share_table(sub, reg),
            "",
            "### The paper's quantitative claims by depth and by epochs",
            "",
            "`median [min, max] (configurations)` over the configurations with that depth "
            "or number of epochs: each step's share of the gap (the two Kronecker steps "
            "summed), off-block mass, top-10 basis overlap (mean over layers), and the "
            "paired LDS difference Hessian − GGN with its verdicts (higher / lower / "
            "undecided at 5%).",
            "",
            trend_table(sub, comparisons, reg),
            "",
        ]
        if any(r["rung"] in ("unshared_ggn", "kfac_reduce") for r in sub):
            lines += [
                "### Weight sharing: block-GGN → K-FAC in two steps",
                "",
                "Block-GGN → unshared GGN (the K-FAC variant's treatment of the positions "
                "that share a weight, no factorisation) and unshared GGN → K-FAC (the "
                "Kronecker factorisation alone). Shares of the H → K-FAC inverse-error gap "
                "along H → GGN → block-GGN → unshared GGN → K-FAC; distances relative to "
                "‖H‖_F (curvature) and ‖H⁺‖_F (inverse), ± a standard error where estimated.",
                "",
                weight_sharing_table(sub, diags, reg),
                "",
                "### Expand or reduce",
                "",
                "LDS of each variant (its inverse error against H in brackets) and the "
                "paired LDS difference expand − reduce [95% interval]; `*`: the interval "
                "excludes 0.",
                "",
                expand_reduce_table(sub, comparisons, reg),
                "",
            ]
    if against:
        results = {preset_name(out): (rows, comparisons)}
        for other in map(Path, against):
            results[preset_name(other)] = stored_results(other)
        shared = [
            g for g in regs if all(any(r["reg"] == g for r in x) for x, _ in results.values())
        ]
        lines += [
            "## Protocols side by side",
            "",
            "Rungs by LDS, best first (`>`: paired difference significant at 5%, `≈`: not), "
            "and the significant inversions of the paper's order Hessian ≥ GGN ≥ block-GGN ≥ "
            "EK-FAC ≥ K-FAC (`EKFAC<KFAC`: K-FAC's LDS is significantly higher). Each "
            "protocol has its own models and ground truth, so the protocols are compared "
            "by their orders, not by paired tests.",
            "",
        ]
        for reg in shared:
            lines += [f"### Rule `{reg}`", "", protocol_table(results, reg), ""]
    lines += [
        "## Diagnostics",
        "",
        diagnostics_table([r for r in rows if r["reg"] == regs[0]], diags),
        "",
    ]
    skipped = sorted(
        {
            (r["config"], r["rung"], r["reg"], r["status"], r["reason"])
            for r in rows
            if not _certified(r)
        }
    )
    if skipped:
        lines += ["## Uncertified or unavailable rungs", ""]
        lines += [f"- `{c}` {rung} `{reg}`: {st}: {why}" for c, rung, reg, st, why in skipped]
        lines.append("")
    chance = models_at_chance(out, rows)
    if chance:
        lines += [
            "## Base models at chance",
            "",
            "These base models learned next to nothing (training loss at least "
            f"{CHANCE_FRACTION:.0%} of the loss of predicting the label frequencies), so "
            "their rows say nothing about the curvature ladder:",
            "",
        ]
        lines += [
            f"- `{c}`: training loss {loss:.4g} against {ch:.4g} at chance"
            for c, (loss, ch) in sorted(chance.items())
        ]
        lines.append("")
    warned = sorted({r["config"] for r in rows if r.get("gt_warnings")})
    if warned:
        lines += [
            "Ground-truth health warnings were raised for: "
            + ", ".join(f"`{c}`" for c in warned)
            + " (see `groundtruth/*/manifest.json`).",
            "",
        ]
    captions = {
        "lds_by_setting": "LDS per rung across depth / width / epochs",
        "lds_vs_error": "LDS against approximation error",
        "error_shares": "Error share of each ladder step",
        "off_block_mass": "Off-block mass against depth and epochs",
        "basis_overlap": "Basis overlap, block-GGN vs Kronecker basis",
        "spectra": "Spectra",
    }
    lines += ["## Figures", "", f"Figures use the regularisation `{regs[0]}`.", ""]
    for key, fig in figures.items():
        lines += [f"### {captions[key]}", "", f"![{captions[key]}](figures/{fig.name})", ""]
    lines += [
        "Table: `results.csv` / `results.jsonl` (one row per configuration x "
        "regularisation x rung); per-configuration artefacts under `runs/`.",
        "",
    ]
    path = out / "report.md"
    atomic_write(path, "\n".join(lines).encode())
    return path


__all__ = [
    "RUNG_COLORS",
    "STEP_COLORS",
    "adjacent_table",
    "benjamini_hochberg",
    "comparison_table",
    "diagnostics_table",
    "eigenvalue_share_table",
    "error_table",
    "expand_reduce_table",
    "inversions",
    "ladder_order",
    "lds_table",
    "load_diagnostics",
    "models_at_chance",
    "plot_basis_overlap",
    "plot_error_shares",
    "plot_lds_by_setting",
    "plot_lds_vs_error",
    "plot_off_block_mass",
    "plot_spectra",
    "preset_name",
    "protocol_table",
    "shares_table",
    "stored_results",
    "tally_table",
    "weight_sharing_table",
    "write_report",
]

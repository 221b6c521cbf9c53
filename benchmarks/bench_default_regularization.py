"""Which default ``Regularization`` should curvinf ship? (issue 9, "The default regulariser
throws the curvature away").

For a few datasets and MLPs, every rung (hessian, ggn, block_ggn, ekfac, kfac) is
fitted once on the ground truth's own base model (``gt.base_model(data)``) and
inverted under each candidate regulariser:

    A  Regularization(damping=0,    eps=1e-4)                 old default, the paper's rule
    B  Regularization(damping=1e-3, eps=1e-4)                 proposed default
    C  Regularization(damping=1e-4, eps=1e-5)
    D  Regularization(damping=0,    eps=1e-3, relative=True)  threshold 1e-3 * max eigenvalue
    E  Regularization(damping=1e-2, eps=1e-4)

and, exploratory (not expressible by ``Regularization`` today), a damping relative to the
rung's own largest eigenvalue: F, G, H = ``damping = r · λ_max(C)`` for r = 0.01, 0.03,
0.1, with ``eps=1e-3, relative=True``.

Per (dataset, rung, candidate): LDS of ``influence_scores`` against the retrained
ground truth (``GroundTruth.lds``: mean Spearman over queries, 95 % bootstrap CI
over subsets), the rank of the inverse (directions kept, out of D), and a
*paired* bootstrap of the LDS difference to candidate B and to the cell's best
candidate (the same resampled subsets for both candidates, so it is much tighter
than comparing the two marginal CIs). A candidate whose fit, inverse or scores raise gets the error
string instead of an LDS.

Datasets (``--datasets``, comma-separated):

    breast_cancer       scikit-learn's breast-cancer data (569 x 30, 2 classes), seeded
                        80/20 split (455 train, 114 queries) standardised with training
                        statistics (as ``curvinf.load_dataset`` does for digits), MLP depth 1
                        width 32 (D = 1,058), 2000 epochs at lr 0.2: a well-trained model
                        (train loss ~1e-5, largest GGN eigenvalue ~3e-3: the issue's setting,
                        where eps=1e-4 keeps ~14 of 1,058 directions)
    breast_cancer_margin  the same model, measured by the query margin instead of the query
                        loss (the loss of about half the queries is saturated at 0 in
                        float32, so their ground truth is constant and they drop out of LDS)
    breast_cancer_e200  the same data and model, 200 epochs at lr 0.05 (train loss ~2e-3,
                        largest GGN eigenvalue ~0.26)
    digits              ``load_dataset("digits")``, depth 1 width 32 (D = 2,410), 100
                        epochs at lr 0.05: the configuration of
                        benchmarks/data/sweep_regularization_d1w32.csv
    digits_d2           digits, depth 2 width 32 (D = 3,466), 100 epochs at lr 0.05
    diabetes            ``load_dataset("diabetes")``, regression with MSE, depth 1 width 32
                        (D = 385), 100 epochs at lr 0.05

Ground truth: ``--subsets`` (100) half-data subsets x ``--seeds`` (2) retraining
seeds, all queries, stored under ``--out`` (default /tmp/bench_default_reg,
resumable). ``--seed`` (0) seeds the split, initialisation, batches and subsets; results
of seed s > 0 are kept under ``<dataset>@seed<s>``. Results: ``--json`` (default
benchmarks/data/default_regularization.json), rewritten after every rung (entries of
datasets not run this time are kept; run one process at a time per file).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_default_regularization.py \
        --datasets breast_cancer,breast_cancer_e200,digits,digits_d2,diabetes --threads 1

``--table`` only prints the markdown tables from the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curvinf import (
    DataSplit,
    GroundTruthConfig,
    Regularization,
    TrainingRecipe,
    fit_curvature,
    ground_truth,
    influence_scores,
    load_dataset,
)
from curvinf.data import split_dataset
from curvinf.groundtruth import RetrainingWarning
from curvinf.lds import group_effects, spearman_columns

RUNGS = ("hessian", "ggn", "block_ggn", "ekfac", "kfac")

CANDIDATES: dict[str, Regularization] = {
    "A": Regularization(damping=0.0, eps=1e-4, relative=False),
    "B": Regularization(damping=1e-3, eps=1e-4, relative=False),
    "C": Regularization(damping=1e-4, eps=1e-5, relative=False),
    "D": Regularization(damping=0.0, eps=1e-3, relative=True),
    "E": Regularization(damping=1e-2, eps=1e-4, relative=False),
}
# Exploratory, not expressible by Regularization today: damping relative to the rung's own
# largest eigenvalue, δ = r · λ_max(C), with a relative threshold τ = 1e-3 · max(λ + δ)
# (which, like eps=1e-4 next to δ=1e-3, drops only eigenvalues below about -(r - 1e-3) λ_max).
RELATIVE_DAMPING: dict[str, float] = {"F": 1e-2, "G": 3e-2, "H": 1e-1}
RELATIVE_EPS = 1e-3
REFERENCE = "B"

# name -> dataset, MLP and base recipe (the ground truth retrains with the same recipe)
CONFIGS: dict[str, dict[str, Any]] = {
    "breast_cancer": {
        "dataset": "breast_cancer",
        "depth": 1,
        "width": 32,
        "epochs": 2000,
        "lr": 0.2,
    },
    "breast_cancer_margin": {
        "dataset": "breast_cancer",
        "depth": 1,
        "width": 32,
        "epochs": 2000,
        "lr": 0.2,
        "measure": "margin",
    },
    "breast_cancer_e200": {
        "dataset": "breast_cancer",
        "depth": 1,
        "width": 32,
        "epochs": 200,
        "lr": 0.05,
    },
    "digits": {"dataset": "digits", "depth": 1, "width": 32, "epochs": 100, "lr": 0.05},
    "digits_d2": {"dataset": "digits", "depth": 2, "width": 32, "epochs": 100, "lr": 0.05},
    "diabetes": {
        "dataset": "diabetes",
        "depth": 1,
        "width": 32,
        "epochs": 100,
        "lr": 0.05,
        "loss": "mse",
    },
}

JSON_DEFAULT = Path(__file__).parent / "data" / "default_regularization.json"


def load_breast_cancer(*, query_fraction: float = 0.2, seed: int = 0) -> DataSplit:
    """scikit-learn's breast-cancer data split and standardised like ``curvinf.load_dataset``:
    a seeded permutation, ``floor((1 - query_fraction) n)`` training examples (455 of 569),
    features standardised with statistics of the training part only."""
    from sklearn import datasets

    X, y = datasets.load_breast_cancer(return_X_y=True)
    return split_dataset(
        "breast_cancer", "classification", X, y, query_fraction=query_fraction, seed=seed
    )


def load(name: str, seed: int) -> DataSplit:
    return (
        load_breast_cancer(seed=seed) if name == "breast_cancer" else load_dataset(name, seed=seed)
    )


def candidate_names() -> list[str]:
    return [*CANDIDATES, *RELATIVE_DAMPING]


def candidate_text(name: str) -> str:
    if name in CANDIDATES:
        return reg_text(CANDIDATES[name])
    return (
        f"damping = {RELATIVE_DAMPING[name]:g} · λ_max(C), eps={RELATIVE_EPS:g}, relative=True"
        " (exploratory)"
    )


def candidate_reg(name: str, lambda_max: float) -> Regularization:
    """The regulariser of candidate ``name`` for a rung whose largest eigenvalue is given."""
    if name in CANDIDATES:
        return CANDIDATES[name]
    return Regularization(
        damping=RELATIVE_DAMPING[name] * max(lambda_max, 0.0), eps=RELATIVE_EPS, relative=True
    )


def reg_dict(reg: Regularization) -> dict[str, Any]:
    return {"damping": reg.damping, "eps": reg.eps, "relative": reg.relative}


def reg_text(reg: Regularization) -> str:
    rel = ", relative=True" if reg.relative else ""
    return f"Regularization(damping={reg.damping:g}, eps={reg.eps:g}{rel})"


def bootstrap_spearman(
    preds: dict[str, np.ndarray], target: np.ndarray, *, num_bootstrap: int, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per candidate, the Spearman of every query on all subsets (Q,) and on each of
    ``num_bootstrap`` resamples of the subsets (B, Q); the same resamples for every candidate.

    ``preds[c]`` (M, Q): predicted group effects of candidate ``c``; ``target`` (M, Q):
    ``-truth`` (:func:`curvinf.lds.lds` takes the same Spearman per query).
    """
    M, Q = target.shape
    rows = np.random.default_rng(seed).integers(0, M, size=(num_bootstrap, M))
    step = max(1, int(2e7 // max(1, M * Q)))
    full, boot = {}, {}
    for name, pred in preds.items():
        full[name] = spearman_columns(pred, target)
        boot[name] = np.concatenate(
            [
                spearman_columns(pred[rows[a : a + step]], target[rows[a : a + step]])
                for a in range(0, num_bootstrap, step)
            ]
        )
    return full, boot


def paired_differences(
    full: dict[str, np.ndarray], boot: dict[str, np.ndarray], reference: str
) -> dict[str, dict[str, float]]:
    """LDS(candidate) - LDS(reference) with a paired percentile bootstrap over subsets
    (inputs from :func:`bootstrap_spearman`). Queries where either Spearman is undefined
    (constant column) are left out of both means, so the difference is over the same queries.
    """
    if reference not in full:
        return {}
    out: dict[str, dict[str, float]] = {}
    for name in full:
        if name == reference:
            continue
        valid = np.isfinite(full[name]) & np.isfinite(full[reference])
        if not valid.any():
            continue
        diff = float(full[name][valid].mean() - full[reference][valid].mean())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resample
            means = np.nanmean(boot[name][:, valid] - boot[reference][:, valid], axis=1)
        means = means[np.isfinite(means)]
        lo, hi = (float(v) for v in np.percentile(means, [2.5, 97.5]))
        out[name] = {"diff": diff, "ci_low": lo, "ci_high": hi, "queries": int(valid.sum())}
    return out


def run_config(name: str, args: argparse.Namespace, entry: dict[str, Any], save) -> None:
    """Fill ``entry`` (a dict inside the results, saved by ``save()`` after every rung)."""
    spec = dict(CONFIGS[name])
    data = load(spec["dataset"], args.seed)
    if args.queries:
        q = args.queries
        data = replace(data, X_query=data.X_query[:q], y_query=data.y_query[:q])
    config = GroundTruthConfig(
        depth=spec["depth"],
        width=spec["width"],
        model_seed=args.seed,
        recipe=TrainingRecipe(epochs=spec["epochs"], lr=spec["lr"], seed=args.seed),
        loss=spec.get("loss", "ce"),
        measure=spec.get("measure", "loss"),
        num_subsets=args.subsets,
        num_seeds=args.seeds,
        seed=args.seed,
    )
    entry.update(
        {
            "dataset": spec["dataset"],
            "depth": spec["depth"],
            "width": spec["width"],
            "epochs": spec["epochs"],
            "lr": spec["lr"],
            "loss": config.loss,
            "measure": config.measure,
            "seed": args.seed,
            "subsets": args.subsets,
            "seeds": args.seeds,
            "n_train": len(data.X_train),
            "n_query": len(data.X_query),
            "status": "running",
            "rungs": {},
        }
    )
    print(f"\n== {name}: {entry}", flush=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RetrainingWarning)
        gt = ground_truth(data, config, Path(args.out), progress=args.progress)
    entry["groundtruth_seconds"] = time.perf_counter() - t0
    entry["groundtruth_store"] = str(gt.path)
    entry["groundtruth_warnings"] = list(gt.warnings)
    entry["base"] = {k: float(v) for k, v in gt.base.items() if v is not None}
    model, loss = gt.base_model(data), config.make_loss()
    D = sum(p.numel() for p in model.parameters())
    entry["num_params"] = D
    print(
        f"ground truth {entry['groundtruth_seconds']:.0f} s ({gt.models_trained} models trained);"
        f" base {entry['base']}; D = {D}",
        flush=True,
    )
    target = -gt.truth.to(torch.float64).numpy()
    diffs: dict[str, Any] = {}
    entry["paired_vs_" + REFERENCE] = diffs
    vs_best: dict[str, Any] = {}
    entry["paired_vs_best"] = vs_best
    for rung in args.rungs:
        rec: dict[str, Any] = {"candidates": {}}
        entry["rungs"][rung] = rec
        t0 = time.perf_counter()
        try:
            curv = fit_curvature(rung, model, loss, *data.train, seed=args.seed)
            ev = curv.eigenvalues()
            rec.update(
                fit_seconds=time.perf_counter() - t0,
                lambda_max=float(ev.max()),
                lambda_min=float(ev.min()),
                num_negative=int((ev < 0).sum()),
                num_below_1e4=int((ev <= 1e-4).sum()),
            )
        except Exception as err:  # record, don't crash
            rec["error"] = f"fit failed: {type(err).__name__}: {err}"
            print(f"  {rung}: {rec['error']}", flush=True)
            save()
            continue
        print(
            f"  {rung}: fitted in {rec['fit_seconds']:.1f} s, λ_max {rec['lambda_max']:.3e}, "
            f"λ_min {rec['lambda_min']:.3e}, {rec['num_negative']} negative",
            flush=True,
        )
        preds: dict[str, np.ndarray] = {}
        for cname in candidate_names():
            reg = candidate_reg(cname, rec["lambda_max"])
            row: dict[str, Any] = {"reg": reg_dict(reg)}
            rec["candidates"][cname] = row
            t1 = time.perf_counter()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    inv = curv.inverse(reg)
                    row["rank"] = int(inv.rank)
                    scores = influence_scores(
                        model, loss, inv, train=data.train, query=data.query, measure=config.measure
                    )
                    if not torch.isfinite(scores).all():
                        raise FloatingPointError("non-finite scores")
                    res = gt.lds(scores, num_bootstrap=args.bootstrap, seed=args.seed)
                row["warnings"] = sorted({str(w.message) for w in caught})
                row.update(
                    lds=res.mean if math.isfinite(res.mean) else None,
                    ci_low=res.ci_low if math.isfinite(res.ci_low) else None,
                    ci_high=res.ci_high if math.isfinite(res.ci_high) else None,
                    queries=res.num_valid,
                    constant_queries=len(res.constant_queries),
                    constant_predictions=len(res.constant_predictions),
                )
                preds[cname] = group_effects(scores, gt.masks).numpy()
            except Exception as err:  # record, don't crash
                row["error"] = f"{type(err).__name__}: {err}"
            row["seconds"] = time.perf_counter() - t1
            lds_txt = (
                f"LDS {row['lds']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
                if row.get("lds") is not None
                else f"error {row.get('error')}"
            )
            print(
                f"    {cname} {reg_text(reg)}: {lds_txt}, kept {row.get('rank')}/{D}, "
                f"{row['seconds']:.1f} s",
                flush=True,
            )
        full, boot = bootstrap_spearman(preds, target, num_bootstrap=args.bootstrap, seed=args.seed)
        diffs[rung] = paired_differences(full, boot, REFERENCE)
        ok = {c: r["lds"] for c, r in rec["candidates"].items() if r.get("lds") is not None}
        if ok:
            best = max(ok, key=ok.get)
            vs_best[rung] = {
                "best": best,
                "diffs": paired_differences(full, boot, best),
            }
        del curv
        save()
    entry["status"] = "done"


def _cell(row: dict[str, Any], D: int) -> str:
    if row.get("lds") is None:
        return "error" if row.get("error") else "–"
    return f"{row['lds']:.3f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}] · {row['rank']}/{D}"


def _diff_cell(d: dict[str, float] | None) -> str:
    if not d:
        return "–"
    mark = "" if d["ci_low"] <= 0 <= d["ci_high"] else "*"
    return f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]{mark}"


def markdown(results: dict[str, Any]) -> str:
    """Per dataset: LDS [95 % CI] · kept/D per rung x candidate, then paired differences to B."""
    names = [c for c in candidate_names() if c in results.get("candidates", {})]
    lines = []
    for cname in names:
        lines.append(f"- **{cname}**: `{candidate_text(cname)}`")
    lines.append("")
    for name, entry in results.get("datasets", {}).items():
        D = entry.get("num_params", "?")
        base = entry.get("base", {})
        head = (
            f"**{name}** (depth {entry['depth']}, width {entry['width']}, lr {entry['lr']:g}, "
            f"{entry['epochs']} epochs, D = {D}; base train loss {base.get('train_loss', 0):.2g}"
        )
        if "query_accuracy" in base:
            head += f", query accuracy {base['query_accuracy']:.3f}"
        lam = entry.get("rungs", {}).get("ggn", {}).get("lambda_max")
        if lam is not None:
            head += f"; largest GGN eigenvalue {lam:.2e}"
        valid = [
            row["queries"]
            for rec in entry.get("rungs", {}).values()
            for row in rec.get("candidates", {}).values()
            if row.get("queries") is not None
        ]
        if valid:
            head += f"; {entry.get('measure', 'loss')} measure, LDS over {min(valid)}"
            head += f" of {entry['n_query']} queries"
        lines.append(head + ")")
        lines.append("")
        lines.append("| rung | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for rung, rec in entry.get("rungs", {}).items():
            if "error" in rec:
                lines.append(f"| {rung} | " + " | ".join(["fit failed"] * len(names)) + " |")
                continue
            cells = [_cell(rec["candidates"].get(c, {}), D) for c in names]
            lines.append(f"| {rung} | " + " | ".join(cells) + " |")
        lines.append("")
        paired = entry.get("paired_vs_" + REFERENCE, {})
        others = [c for c in names if c != REFERENCE]
        if paired:
            lines.append(f"| LDS − LDS({REFERENCE}), paired | " + " | ".join(others) + " |")
            lines.append("|---" * (len(others) + 1) + "|")
            for rung, d in paired.items():
                lines.append(
                    f"| {rung} | " + " | ".join(_diff_cell(d.get(c)) for c in others) + " |"
                )
            lines.append("")
    if results.get("datasets"):
        seeds = sorted({e.get("seed", 0) for e in results["datasets"].values()})
        if len(seeds) > 1:
            lines += [summary(results, seed=s) for s in seeds]
        lines.append(summary(results))
        lines.append(versus_reference(results))
    return "\n".join(lines)


def summary(results: dict[str, Any], seed: int | None = None) -> str:
    """Per candidate over all (dataset, rung) cells where every candidate has an LDS: mean and
    worst LDS, in how many cells it has the highest LDS, and in how many it is the best or
    within noise of it (the paired 95 % CI of its difference to the cell's best holds 0).
    ``seed``: only the configurations of that seed (default: all)."""
    names = [c for c in candidate_names() if c in results.get("candidates", {})]
    tot: dict[str, list[float]] = {c: [] for c in names}
    best = dict.fromkeys(names, 0)
    tied = dict.fromkeys(names, 0)
    cells = 0
    for entry in results["datasets"].values():
        if seed is not None and entry.get("seed") != seed:
            continue
        for rung, rec in entry.get("rungs", {}).items():
            vals = {c: rec.get("candidates", {}).get(c, {}).get("lds") for c in names}
            if any(v is None for v in vals.values()):
                continue
            cells += 1
            for c, v in vals.items():
                tot[c].append(v)
            top = max(vals, key=vals.get)
            best[top] += 1
            paired = entry.get("paired_vs_best", {}).get(rung, {})
            for c in names:
                d = paired.get("diffs", {}).get(c)
                if c == paired.get("best") or (d and d["ci_low"] <= 0 <= d["ci_high"]):
                    tied[c] += 1
    return "\n".join(
        [
            f"| {'seed ' + str(seed) if seed is not None else 'all seeds'}: {cells} cells | "
            + " | ".join(names)
            + " |",
            "|---" * (len(names) + 1) + "|",
            "| mean LDS | "
            + " | ".join(f"{sum(v) / len(v):.3f}" if v else "–" for v in tot.values())
            + " |",
            "| worst LDS | "
            + " | ".join(f"{min(v):.3f}" if v else "–" for v in tot.values())
            + " |",
            "| highest LDS in cell | " + " | ".join(str(best[c]) for c in names) + " |",
            "| best or within noise of it | " + " | ".join(str(tied[c]) for c in names) + " |",
            "",
        ]
    )


def versus_reference(results: dict[str, Any]) -> str:
    """Per candidate, in how many (dataset, rung) cells its LDS is above / within noise of /
    below the reference's (paired 95 % bootstrap CI of the difference)."""
    names = [c for c in candidate_names() if c in results.get("candidates", {})]
    others = [c for c in names if c != REFERENCE]
    counts = {c: [0, 0, 0] for c in others}
    for entry in results["datasets"].values():
        for diffs in entry.get("paired_vs_" + REFERENCE, {}).values():
            for c, d in diffs.items():
                if c in counts:
                    counts[c][0 if d["ci_low"] > 0 else 2 if d["ci_high"] < 0 else 1] += 1
    return "\n".join(
        [
            f"| vs {REFERENCE}, all cells (paired 95 % CI) | " + " | ".join(others) + " |",
            "|---" * (len(others) + 1) + "|",
            *(
                f"| {label} | " + " | ".join(str(counts[c][i]) for c in others) + " |"
                for i, label in enumerate(("higher LDS", "within noise", "lower LDS"))
            ),
            "",
        ]
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", default=",".join(CONFIGS))
    p.add_argument("--rungs", default=",".join(RUNGS))
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--queries", type=int, default=0, help="first Q queries only (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="/tmp/bench_default_reg", help="ground-truth stores")
    p.add_argument("--json", default=str(JSON_DEFAULT))
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--table", action="store_true", help="only print the tables from --json")
    args = p.parse_args(argv)
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    args.rungs = [r.strip() for r in args.rungs.split(",") if r.strip()]
    for d in args.datasets:
        if d not in CONFIGS:
            p.error(f"unknown dataset {d!r}; choose from {', '.join(CONFIGS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    path = Path(args.json)
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if args.table:
        print(markdown(results))
        return
    torch.set_num_threads(args.threads)
    results.setdefault("datasets", {})
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_default_regularization.py " + (
        " ".join(sys.argv[1:] if argv is None else argv)
    )
    results.update(
        command=command,
        candidates={c: candidate_text(c) for c in candidate_names()},
        reference=REFERENCE,
        machine={
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "note": "2-core machine shared with other developers' jobs; 1 torch thread",
        },
    )

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(path)

    t0 = time.perf_counter()
    for name in args.datasets:
        entry: dict[str, Any] = {}
        key = name if args.seed == 0 else f"{name}@seed{args.seed}"
        results["datasets"][key] = entry
        entry["command"] = command
        try:
            run_config(name, args, entry, save)
        except Exception as err:
            entry.update(status="failed", error=f"{type(err).__name__}: {err}")
            traceback.print_exc()
        save()
        print(f"-- {key} finished; {time.perf_counter() - t0:.0f} s so far", flush=True)
    print()
    print(markdown(results))
    print(f"total {time.perf_counter() - t0:.0f} s; results in {path}")


if __name__ == "__main__":
    main()

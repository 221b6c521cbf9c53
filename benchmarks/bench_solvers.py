"""Matrix-free solvers against the dense path (issue 5 acceptance).

Parts (one process each, so peak RSS is the part's own):

``small``  depth-4, width-64 MLP on digits (D = 17,290; dense still fits):
           all-pairs scores (queries x 1,437 train) by
           - the dense path: ``fit_curvature("ggn")`` + eigh + ``inverse`` + scores;
           - CG on the matrix-free GGN, ``(G + λI)⁻¹``, against dense with the same λ;
           - Lanczos top-k on the matrix-free GGN, paper regularisation
             (``eps=1e-4``, no damping), against dense with the same rule.
           CG cost is linear in the number of queries: ``--cg-queries`` solves a
           subset and the report extrapolates to all queries.
``scale``  depth-8, width-128 MLP (D = 125,194; a dense float64 GGN would be
           125 GB): exact-rung scores by CG for ``--scale-queries`` queries,
           rungs ``--scale-methods`` (ggn, hessian, block_ggn); time, products,
           iterations and peak RSS.
``gram``   the same model, every query (360 x 1,437 pairs): GGN and block-GGN
           scores by the Gram route (``solver=Gram()``, exact, damping λ),
           checked against CG on ``--check-queries`` queries; the Hessian by CG
           preconditioned with the exact damped GGN (``Preconditioned(
           preconditioner=<Gram inverse>)``) at a damping ``δ_H`` above
           ``|λ_min(H)|`` (Lanczos estimate times ``--hessian-margin``); the
           GGN under the paper's rule (eps=1e-4) by the Gram eigendecomposition.

Run from the repository root::

    .venv/bin/python benchmarks/bench_solvers.py --part small
    .venv/bin/python benchmarks/bench_solvers.py --part scale
    .venv/bin/python benchmarks/bench_solvers.py --part gram --epochs 100 --lr 0.02

Results go to ``benchmarks/data/solvers_<part>.json``; ``--part figure``
draws ``docs/figures/solvers_*.png`` from them and prints the tables of
``docs/benchmarks.md``. Wall-clock seconds on the
machine that ran them (2 cores shared with other jobs: compare ratios).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
from scipy.stats import spearmanr
from torch import nn

from curvinf import (
    Regularization,
    TrainingRecipe,
    fit_curvature,
    influence_scores,
    load_dataset,
    make_mlp,
    train,
)
from curvinf.curvature.gram import Gram
from curvinf.curvature.krylov import lanczos, power_iteration
from curvinf.curvature.matfree import matrix_free
from curvinf.curvature.solvers import CG, Lanczos, Preconditioned

RESULTS = Path("benchmarks/data")  # JSON summaries (committed)
SCORES = Path("benchmarks/results")  # score matrices (git-ignored)
FIGURES = Path("docs/figures")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", choices=("small", "scale", "gram", "figure"), required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--damping", type=float, default=1e-3, help="λ of the CG comparisons")
    p.add_argument("--tol", type=float, default=1e-6, help="CG relative residual")
    p.add_argument("--max-iter", type=int, default=1000, help="CG iteration cap")
    p.add_argument("--cg-queries", type=int, default=36, help="queries solved by CG (small)")
    p.add_argument("--lanczos-k", type=int, default=1000)
    p.add_argument("--lanczos-steps", type=int, default=1500)
    p.add_argument("--scale-queries", type=int, default=36)
    p.add_argument("--scale-methods", default="ggn,block_ggn,hessian")
    p.add_argument("--scale-dtype", choices=("float64", "float32"), default="float64")
    p.add_argument(
        "--gram-parts",
        default="ggn,block_ggn,hessian,ggn_paper",
        help="gram part: ggn / block_ggn (Gram, damping λ), hessian (GGN-preconditioned CG), "
        "ggn_paper (Gram eigh, eps=1e-4), lanczos_paper (Lanczos, eps=1e-4, GGN and Hessian; "
        "--lanczos-k, --lanczos-steps)",
    )
    p.add_argument("--lanczos-methods", default="ggn,hessian", help="gram: lanczos_paper rungs")
    p.add_argument("--check-queries", type=int, default=2, help="gram: queries re-solved by CG")
    p.add_argument("--hessian-queries", type=int, default=360)
    p.add_argument("--hessian-lanczos", type=int, default=80, help="Lanczos steps for λ_min(H)")
    p.add_argument("--hessian-margin", type=float, default=1.5, help="δ_H = margin·|λ_min(H)|")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="results file (default by part)")
    return p.parse_args(argv)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def trained_model(depth: int, width: int, args) -> tuple[nn.Module, object, float]:
    data = load_dataset("digits", seed=args.seed)
    loss = nn.CrossEntropyLoss()
    model = make_mlp(data.num_features, data.num_outputs, depth=depth, width=width, seed=args.seed)
    t0 = time.perf_counter()
    res = train(
        model, loss, *data.train, TrainingRecipe(epochs=args.epochs, lr=args.lr, seed=args.seed)
    )
    print(f"trained depth={depth} width={width}: loss {res.final_loss:.4f}", flush=True)
    return res.model, data, time.perf_counter() - t0


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {
        "rel_frobenius": float((a - b).norm() / b.norm()),
        "spearman": float(spearmanr(a.flatten().numpy(), b.flatten().numpy())[0]),
    }


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_small(args) -> dict:
    model, data, train_s = trained_model(4, 64, args)
    loss = nn.CrossEntropyLoss()
    D = sum(p.numel() for p in model.parameters())
    Q = len(data.X_query)
    q_cg = min(args.cg_queries, Q)
    query_cg = (data.X_query[:q_cg], data.y_query[:q_cg])
    damped = Regularization(damping=args.damping, eps=0.0)
    paper = Regularization()
    out: dict = {"D": D, "n_train": len(data.X_train), "n_query": Q, "train_s": train_s}

    # dense path: fit, eigendecompose once, invert under both rules, score
    t0 = time.perf_counter()
    curv = fit_curvature("ggn", model, loss, *data.train)
    t1 = time.perf_counter()
    curv.eigen()
    t2 = time.perf_counter()
    inv_d = curv.inverse(damped)
    S_dense = influence_scores(model, loss, inv_d, train=data.train, query=data.query)
    t3 = time.perf_counter()
    fit_s, eig_s, score_s = t1 - t0, t2 - t1, t3 - t2
    S_dense_paper = influence_scores(
        model, loss, curv.inverse(paper), train=data.train, query=data.query
    )
    lam_max = float(curv.eigenvalues()[-1])
    out["dense"] = {
        "fit_s": fit_s,
        "eigh_s": eig_s,
        "score_s": score_s,
        "total_s": fit_s + eig_s + score_s,
        "lambda_max": lam_max,
        "rank_paper": curv.inverse(paper).rank,
    }
    print("dense", out["dense"], flush=True)
    _write(args, out)  # each phase is kept if a later one is interrupted
    del curv, inv_d

    # CG on the matrix-free GGN, damping λ
    mf = matrix_free("ggn", model, loss, *data.train)
    inv_cg = mf.inverse(damped, solver=CG(tol=args.tol, max_iter=args.max_iter, on_failure="warn"))
    S_cg, cg_s = timed(
        lambda: influence_scores(model, loss, inv_cg, train=data.train, query=query_cg)
    )
    rep = inv_cg.reports[0]
    out["cg"] = {
        "queries": q_cg,
        "seconds": cg_s,
        "seconds_all_queries_extrapolated": cg_s * Q / q_cg,
        "products": mf.products,
        "iterations_median": float(rep.iterations.double().median()),
        "iterations_max": int(rep.iterations.max()),
        "converged": int(rep.converged.sum()),
        "worst_residual": float(rep.residual.max()),
        "history_median": rep.history.nanmedian(dim=1).values.tolist(),
        "agreement_vs_dense": agreement(S_cg, S_dense[:q_cg]),
        "damping": args.damping,
        "tol": args.tol,
    }
    print("cg", {k: v for k, v in out["cg"].items() if k != "history_median"}, flush=True)
    _write(args, out)

    # Lanczos top-k, the paper's truncation rule
    mf.products = 0
    inv_l, lz_fit_s = timed(
        lambda: mf.inverse(
            paper,
            solver=Lanczos(k=args.lanczos_k, max_iter=args.lanczos_steps, on_failure="warn"),
        )
    )
    S_l, lz_score_s = timed(
        lambda: influence_scores(model, loss, inv_l, train=data.train, query=data.query)
    )
    out["lanczos"] = {
        "k": len(inv_l.ritz_values),
        "steps": int(inv_l.eigen_report.iterations[0]),
        "converged_pairs": int(inv_l.eigen_report.converged.sum()),
        "fit_s": lz_fit_s,
        "score_s": lz_score_s,
        "total_s": lz_fit_s + lz_score_s,
        "rank": inv_l.rank,
        "smallest_ritz_value": float(inv_l.ritz_values.min()),
        "agreement_vs_dense_paper_rule": agreement(S_l, S_dense_paper),
    }
    print("lanczos", out["lanczos"], flush=True)
    return out


def run_scale(args) -> dict:
    model, data, train_s = trained_model(8, 128, args)
    loss = nn.CrossEntropyLoss()
    D = sum(p.numel() for p in model.parameters())
    q = min(args.scale_queries, len(data.X_query))
    query = (data.X_query[:q], data.y_query[:q])
    dtype = torch.float64 if args.scale_dtype == "float64" else torch.float32
    reg = Regularization(damping=args.damping, eps=0.0)
    out: dict = {
        "D": D,
        "n_train": len(data.X_train),
        "queries": q,
        "n_query_all": len(data.X_query),
        "dtype": args.scale_dtype,
        "train_s": train_s,
        "damping": args.damping,
        "tol": args.tol,
        "dense_ggn_would_need_gib": 8 * D * D / 2**30,
    }
    for method in args.scale_methods.split(","):
        rss0 = peak_rss_gib()
        mf = matrix_free(method, model, loss, *data.train, dtype=dtype, vector_chunk=36)
        _, one_s = timed(lambda mf=mf: mf.matvec(torch.randn(1, D, dtype=torch.float64)))
        lam_max = power_iteration(mf.matvec, D, 20)
        mf.products = 0
        inv = mf.inverse(reg, solver=CG(tol=args.tol, max_iter=args.max_iter, on_failure="warn"))
        S, s = timed(
            lambda inv=inv: influence_scores(model, loss, inv, train=data.train, query=query)
        )
        rep = inv.reports[0]
        out[method] = {
            "seconds": s,
            "seconds_per_query": s / q,
            "seconds_all_queries_extrapolated": s * len(data.X_query) / q,
            "one_product_s": one_s,
            "lambda_max_estimate": lam_max,
            "products": mf.products,
            "iterations_median": float(rep.iterations.double().median()),
            "iterations_max": int(rep.iterations.max()),
            "converged": int(rep.converged.sum()),
            "worst_residual": float(rep.residual.nan_to_num(float("inf")).max()),
            "notes": rep.notes,
            "max_ihvp_norm": float(rep.solution_norm.max()),
            "history_median": rep.history.nanmedian(dim=1).values.tolist(),
            "peak_rss_gib": peak_rss_gib(),
            "peak_rss_before_gib": rss0,
            "scores_finite": bool(torch.isfinite(S).all()),
        }
        SCORES.mkdir(parents=True, exist_ok=True)
        torch.save(S, SCORES / f"solvers_scale_{method}_scores.pt")
        print(method, {k: v for k, v in out[method].items() if k != "history_median"}, flush=True)
        _write(args, out)
    return out


def run_gram(args) -> dict:
    """Exact-rung scores at depth 8, width 128 for every query: GGN and block-GGN by the
    Gram route, the Hessian by CG preconditioned with the exact GGN (see the module doc)."""
    model, data, train_s = trained_model(8, 128, args)
    loss = nn.CrossEntropyLoss()
    D = sum(p.numel() for p in model.parameters())
    Q = len(data.X_query)
    reg = Regularization(damping=args.damping, eps=0.0)
    parts = args.gram_parts.split(",")
    path = Path(args.out) if args.out else RESULTS / "solvers_gram.json"
    out: dict = json.loads(path.read_text()) if path.exists() else {}
    out.pop("meta", None)
    out.update(
        {
            "D": D,
            "n_train": len(data.X_train),
            "n_query": Q,
            "train_s": train_s,
            "epochs": args.epochs,
            "lr": args.lr,
            "damping": args.damping,
            "tol": args.tol,
        }
    )
    SCORES.mkdir(parents=True, exist_ok=True)
    qc = (data.X_query[: args.check_queries], data.y_query[: args.check_queries])

    def gram_scores(method: str, r: Regularization) -> tuple[torch.Tensor, dict]:
        rss0 = peak_rss_gib()
        t0 = time.perf_counter()
        mf = matrix_free(method, model, loss, *data.train)
        inv = mf.inverse(r, solver=Gram(progress=True))
        t1 = time.perf_counter()
        S = influence_scores(model, loss, inv, train=data.train, query=data.query)
        t2 = time.perf_counter()
        rec = {
            "R": inv.R,
            "mode": inv.mode,
            "setup_s": t1 - t0,
            "scores_s": t2 - t1,
            "seconds": t2 - t0,
            "peak_rss_gib": peak_rss_gib(),
            "peak_rss_before_gib": rss0,
            "scores_finite": bool(torch.isfinite(S).all()),
        }
        if inv.mode == "eigh":
            evals = torch.cat(inv.eigenvalues)
            rec.update({"rank": int((evals > r.eps).sum()), "lambda_max": float(evals.max())})
        return S, rec

    if "ggn" in parts or "block_ggn" in parts:
        for method in ("ggn", "block_ggn"):
            if method not in parts:
                continue
            S, rec = gram_scores(method, reg)
            torch.save(S, SCORES / f"solvers_gram_{method}_scores.pt")
            if method == "ggn" and args.check_queries:
                mf = matrix_free(method, model, loss, *data.train, vector_chunk=36)
                inv = mf.inverse(reg, solver=CG(tol=1e-8, max_iter=args.max_iter))
                S_cg, cg_s = timed(
                    lambda mf=mf, inv=inv: influence_scores(
                        model, loss, inv, train=data.train, query=qc
                    )
                )
                rep = inv.reports[0]
                rec["cg_check"] = {
                    "queries": args.check_queries,
                    "seconds": cg_s,
                    "tol": 1e-8,
                    "iterations_max": int(rep.iterations.max()),
                    "agreement": agreement(S[: args.check_queries], S_cg),
                }
            out[method] = rec
            print(method, rec, flush=True)
            _write(args, out)
    if "hessian" in parts:
        mfh = matrix_free("hessian", model, loss, *data.train, vector_chunk=64)
        (_, theta, res, steps), lz_s = timed(
            lambda: lanczos(mfh.matvec, D, args.hessian_lanczos, max_iter=args.hessian_lanczos)
        )
        lam_min, lam_max = float(theta.min()), float(theta.max())
        delta = max(args.damping, args.hessian_margin * max(0.0, -lam_min))
        reg_h = Regularization(damping=delta, eps=0.0)
        (S_g, rec_g) = gram_scores("ggn", reg_h)  # the GGN at the Hessian's damping
        ggn_pre = matrix_free("ggn", model, loss, *data.train).inverse(reg_h, solver=Gram())
        hq = min(args.hessian_queries, Q)
        query = (data.X_query[:hq], data.y_query[:hq])
        rss0 = peak_rss_gib()
        mfh.products = 0
        inv = mfh.inverse(
            reg_h,
            solver=Preconditioned(
                preconditioner=ggn_pre,
                tol=args.tol,
                max_iter=args.max_iter,
                on_failure="warn",
                progress=True,
            ),
        )
        S_h, h_s = timed(lambda: influence_scores(model, loss, inv, train=data.train, query=query))
        torch.save(S_h, SCORES / "solvers_gram_hessian_scores.pt")
        its = torch.cat([r.iterations for r in inv.reports])
        conv = torch.cat([r.converged for r in inv.reports])
        resid = torch.cat([r.residual for r in inv.reports])
        rec = {
            "lanczos_steps": steps,
            "lanczos_s": lz_s,
            "lambda_min_ritz": lam_min,
            "lambda_max_ritz": lam_max,
            "damping": delta,
            "queries": hq,
            "seconds": h_s,
            "seconds_per_query": h_s / hq,
            "products": mfh.products,
            "iterations_median": float(its.double().median()),
            "iterations_max": int(its.max()),
            "converged": int(conv.sum()),
            "worst_residual": float(resid.max()),
            "peak_rss_gib": peak_rss_gib(),
            "peak_rss_before_gib": rss0,
            "ggn_same_damping": {**rec_g, "agreement_hessian_vs_ggn": agreement(S_h, S_g[:hq])},
        }
        if args.check_queries:
            mfh.products = 0
            cg = mfh.inverse(
                reg_h, solver=CG(tol=args.tol, max_iter=args.max_iter, on_failure="warn")
            )
            S_c, c_s = timed(lambda: influence_scores(model, loss, cg, train=data.train, query=qc))
            rec["plain_cg_check"] = {
                "queries": args.check_queries,
                "seconds": c_s,
                "iterations_max": int(cg.reports[0].iterations.max()),
                "agreement": agreement(S_h[: args.check_queries], S_c),
            }
        out["hessian"] = rec
        print("hessian", rec, flush=True)
        _write(args, out)
    if "ggn_paper" in parts:
        S, rec = gram_scores("ggn", Regularization())
        torch.save(S, SCORES / "solvers_gram_ggn_paper_scores.pt")
        out["ggn_paper"] = rec
        print("ggn_paper", rec, flush=True)
        _write(args, out)
    if "lanczos_paper" in parts:
        # the paper's rule by Lanczos for the GGN (checked against the exact Gram eigh above)
        # and for the Hessian, whose positive part above ε has no Gram form
        paper = Regularization()
        ref_path = SCORES / "solvers_gram_ggn_paper_scores.pt"
        S_ref = torch.load(ref_path) if ref_path.exists() else None
        rec = out.get("lanczos_paper", {})
        S_by = {}
        for method in args.lanczos_methods.split(","):
            mf = matrix_free(method, model, loss, *data.train, vector_chunk=1)
            solver = Lanczos(k=args.lanczos_k, max_iter=args.lanczos_steps, on_failure="warn")
            inv, fit_s = timed(lambda mf=mf, solver=solver: mf.inverse(paper, solver=solver))
            S, score_s = timed(
                lambda inv=inv: influence_scores(
                    model, loss, inv, train=data.train, query=data.query
                )
            )
            theta = inv.ritz_values
            rel = inv.eigen_report.residual
            kept = inv.inv_values != 0
            S_by[method] = S
            rec[method] = {
                "k": args.lanczos_k,
                "steps": args.lanczos_steps,
                "fit_s": fit_s,
                "score_s": score_s,
                "rank": inv.rank,
                "kept_converged": int((kept & inv.eigen_report.converged).sum()),
                "kept_worst_residual": float(rel[kept].max()) if bool(kept.any()) else 0.0,
                "smallest_ritz": float(theta.min()),
                "largest_ritz": float(theta.max()),
                "peak_rss_gib": peak_rss_gib(),
            }
            torch.save(S, SCORES / f"solvers_gram_{method}_lanczos_paper_scores.pt")
        if S_ref is not None and "ggn" in S_by:
            rec["ggn"]["agreement_vs_gram_eigh"] = agreement(S_by["ggn"], S_ref)
        if S_ref is not None and "hessian" in S_by:
            rec["agreement_hessian_vs_ggn"] = agreement(S_by["hessian"], S_ref)
        out["lanczos_paper"] = rec
        print("lanczos_paper", rec, flush=True)
        _write(args, out)
    return out


def _write(args, out: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = Path(args.out) if args.out else RESULTS / f"solvers_{args.part}.json"
    meta = {
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
    }
    path.write_text(json.dumps({"meta": meta, **out}, indent=1))
    return path


def markdown_tables() -> str:
    """The tables of ``docs/benchmarks.md`` (Matrix-free solvers) from the JSON results."""
    lines = []
    small_path = RESULTS / "solvers_small.json"
    if small_path.exists():
        s = json.loads(small_path.read_text())
        d, cg, lz = s["dense"], s["cg"], s.get("lanczos")
        lz_row = (
            f"| Lanczos k={lz['k']} ({lz['steps']} steps), eps=1e-4 | {lz['total_s']:.0f} | "
            f"Spearman {lz['agreement_vs_dense_paper_rule']['spearman']:.4f}, rel. Frobenius "
            f"{lz['agreement_vs_dense_paper_rule']['rel_frobenius']:.2e} |"
            if lz
            else "| Lanczos | not measured (run interrupted) | |"
        )
        lz_note = (
            f"Lanczos: rank {lz['rank']}, {lz['converged_pairs']} of {lz['k']} Ritz pairs "
            f"converged, smallest Ritz value {lz['smallest_ritz_value']:.2e}. "
            if lz
            else ""
        )
        lines += [
            f"depth-4 width-64, D = {s['D']}, {s['n_query']} queries x {s['n_train']} train:",
            "",
            "| path | seconds (all queries) | agreement with dense |",
            "|---|---|---|",
            f"| dense GGN: fit {d['fit_s']:.0f} + eigh {d['eigh_s']:.0f} + scores "
            f"{d['score_s']:.0f} | {d['total_s']:.0f} | reference |",
            f"| CG, λ={cg['damping']:g}, tol {cg['tol']:g} ({cg['queries']} queries, "
            f"{cg['iterations_median']:.0f} it. median) | {cg['seconds']:.0f} "
            f"(extrapolated {cg['seconds_all_queries_extrapolated']:.0f}) | Spearman "
            f"{cg['agreement_vs_dense']['spearman']:.6f}, rel. Frobenius "
            f"{cg['agreement_vs_dense']['rel_frobenius']:.1e} |",
            lz_row,
            "",
            f"Dense GGN: largest eigenvalue {d['lambda_max']:.3g}, rank under eps=1e-4 "
            f"{d['rank_paper']}. {lz_note}CG: {cg['converged']}/{cg['queries']} "
            f"right-hand sides converged, worst residual {cg['worst_residual']:.1e}, "
            f"{cg['products']} products. Peak RSS {s.get('peak_rss_gib', float('nan')):.2f} GiB.",
            "",
        ]
    scale: dict = {}
    for path in sorted(RESULTS.glob("solvers_scale*.json")):
        scale.update(json.loads(path.read_text()))
    rows = [m for m in ("ggn", "block_ggn", "hessian") if m in scale]
    if rows:
        lines += [
            f"depth-8 width-128, D = {scale['D']} (a dense float64 GGN would need "
            f"{scale['dense_ggn_would_need_gib']:.0f} GiB), λ = {scale['damping']:g}, tol "
            f"{scale['tol']:g}, {scale['dtype']}:",
            "",
            "| rung | queries | seconds | s / query | s / product | CG it. (median, max) | "
            "converged | worst residual | peak RSS GiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m in rows:
            r = scale[m]
            q = round(r["seconds"] / r["seconds_per_query"])
            lines.append(
                f"| {m} | {q} | {r['seconds']:.0f} | {r['seconds_per_query']:.0f} | "
                f"{r['one_product_s']:.2f} | {r['iterations_median']:.0f}, "
                f"{r['iterations_max']} | {r['converged']}/{q} | {r['worst_residual']:.1e} | "
                f"{r['peak_rss_gib']:.2f} |"
            )
    return "\n".join(lines)


def gram_table(name: str = "solvers_gram.json") -> str:
    """The table of ``docs/benchmarks.md`` (every query at depth 8) from a ``--part gram`` file."""
    path = RESULTS / name
    if not path.exists():
        return ""
    g = json.loads(path.read_text())
    n = f"{g['n_query']} x {g['n_train']}"
    lines = [
        f"depth-8 width-128, D = {g['D']}, all {n} pairs, tol {g['tol']:g}:",
        "",
        "| rung, route | regulariser | seconds | peak RSS GiB | check |",
        "|---|---|---:|---:|---|",
    ]
    for key, label in (
        ("ggn", "GGN, Gram (Cholesky)"),
        ("block_ggn", "block-GGN, Gram (Cholesky)"),
    ):
        if key in g:
            r = g[key]
            chk = r.get("cg_check")
            check = (
                f"CG (tol {chk['tol']:g}, {chk['iterations_max']} it.) on {chk['queries']} "
                f"queries: {chk['seconds']:.0f} s, rel. Frobenius "
                f"{chk['agreement']['rel_frobenius']:.1e}"
                if chk
                else "equal to dense in tests/test_gram.py"
            )
            lines.append(
                f"| {label} | δ = {g['damping']:g} | {r['seconds']:.0f} | "
                f"{r['peak_rss_gib']:.2f} | {check} |"
            )
    if "hessian" in g:
        h = g["hessian"]
        chk = h.get("plain_cg_check")
        check = (
            f"plain CG on {chk['queries']} queries: {chk['iterations_max']} it., "
            f"{chk['seconds']:.0f} s, rel. Frobenius {chk['agreement']['rel_frobenius']:.1e}"
            if chk
            else ""
        )
        lines.append(
            f"| Hessian, CG preconditioned by the exact GGN ({h['iterations_median']:.0f} it. "
            f"median, max {h['iterations_max']}, {h['converged']}/{h['queries']} converged) | "
            f"δ_H = {h['damping']:.3g} | {h['seconds']:.0f} | {h['peak_rss_gib']:.2f} | {check} |"
        )
    if "ggn_paper" in g:
        r = g["ggn_paper"]
        lines.append(
            f"| GGN, Gram (eigh), rank {r['rank']} | ε = 1e-4 (paper) | {r['seconds']:.0f} | "
            f"{r['peak_rss_gib']:.2f} | equal to dense in tests/test_gram.py |"
        )
    return "\n".join(lines)


def draw_figures() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    print(markdown_tables())
    for name in ("solvers_gram.json", "solvers_gram_2threads.json"):
        print(f"\n{name}:\n{gram_table(name)}")
    small_path = RESULTS / "solvers_small.json"
    if small_path.exists():
        _draw_small(plt, json.loads(small_path.read_text()))
    _draw_scale(plt)


def _draw_small(plt, small: dict) -> None:
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    names = ["dense", "CG (extrap.)", "Lanczos"]
    vals = [small["dense"]["total_s"], small["cg"]["seconds_all_queries_extrapolated"]]
    if small.get("lanczos"):
        vals.append(small["lanczos"]["total_s"])
    ax[0].bar(names[: len(vals)], vals, color=["0.5", "C0", "C1"][: len(vals)])
    ax[0].set_ylabel("seconds to all-pairs scores")
    ax[0].set_title(f"depth-4 width-64 MLP, D={small['D']}")
    ax[1].semilogy(small["cg"]["history_median"], label="CG, median over RHS")
    ax[1].set_xlabel("iteration")
    ax[1].set_ylabel("relative residual")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(FIGURES / "solvers_small.png", dpi=120)


def _draw_scale(plt) -> None:
    scale: dict = {}
    for path in sorted(RESULTS.glob("solvers_scale*.json")):
        scale.update(json.loads(path.read_text()))
    if scale:
        fig, ax = plt.subplots(figsize=(5, 3.8))
        for m in ("ggn", "block_ggn", "hessian"):
            if m in scale:
                ax.semilogy(scale[m]["history_median"], label=m)
        ax.set_xlabel("CG iteration")
        ax.set_ylabel("relative residual (median over RHS)")
        ax.set_title(f"depth-8 width-128 MLP, D={scale['D']}, λ={scale['damping']:g}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(FIGURES / "solvers_scale.png", dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("always")
    if args.part == "figure":
        draw_figures()
        return
    run = {"small": run_small, "scale": run_scale, "gram": run_gram}[args.part]
    out = run(args)
    out["peak_rss_gib"] = peak_rss_gib()
    print("wrote", _write(args, out))


if __name__ == "__main__":
    main()

"""Curvature ladder vs curvlinops 3.0.1 and kronfluence 1.0.1 (issue 2 acceptance).

(a) Dense rungs: curvinf ``fit_curvature("hessian"/"ggn").dense()`` against
    curvlinops building the same matrix (its linear operator applied to blocks
    of identity columns), float64 on both sides; the matrices must agree; the
    eigendecomposition (``torch.linalg.eigh``, the floor of any dense rung) is
    timed on its own.
(b) K-FAC / EK-FAC fit + all-pairs scores (query x train) against kronfluence,
    empirical Fisher on both sides, the same absolute damping; Spearman of the
    flattened score matrices.

Run from the repository root with the bench environment (``make bench``)::

    .venv-bench/bin/python benchmarks/bench_curvature.py

Flags shrink the problem (``--n-train 200 --depth 2`` runs in seconds).
Times are wall-clock seconds; on a shared machine compare the ratios, which
are measured in the same process.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=None, help="first N training points (all)")
    p.add_argument("--n-query", type=int, default=None, help="first Q query points (all)")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--epochs", type=int, default=40, help="brief training of the base model")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--parts", default="dense,kron", help="dense and/or kron")
    p.add_argument("--dense-methods", default="ggn,hessian")
    p.add_argument("--kron-methods", default="kfac,ekfac")
    p.add_argument("--fisher", default="type2", help="GGN output curvature in part (a)")
    p.add_argument("--damping", type=float, default=1e-3, help="absolute damping, part (b)")
    p.add_argument("--repeat", type=int, default=5, help="part (b): best of this many runs")
    p.add_argument("--no-peers", action="store_true", help="time curvinf only")
    p.add_argument("--cl-columns", type=int, default=512, help="curvlinops: identity columns/call")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="examples per batch on all sides: curvinf chunk_size, curvlinops data batches,\n"
        "kronfluence per-device batch (default: all training points in one batch)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def timed(fn, repeat: int = 1):
    """(best wall time, result of the last call)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.reshape(-1).double().numpy(), b.reshape(-1).double().numpy())[0])


def setup(args):
    data = load_dataset(args.dataset, seed=args.seed)
    Xt, yt = data.train
    Xq, yq = data.query
    Xt, yt = Xt[: args.n_train], yt[: args.n_train]
    Xq, yq = Xq[: args.n_query], yq[: args.n_query]
    model = make_mlp(
        data.num_features, data.num_outputs, depth=args.depth, width=args.width, seed=args.seed
    )
    recipe = TrainingRecipe(epochs=args.epochs, lr=args.lr, seed=args.seed)
    t, res = timed(lambda: train(model, nn.CrossEntropyLoss(), Xt, yt, recipe))
    D = sum(p.numel() for p in model.parameters())
    print(
        f"model: depth {args.depth}, width {args.width}, D = {D:,}; train {len(Xt)}, "
        f"query {len(Xq)}; trained {args.epochs} epochs in {t:.1f}s, final loss "
        f"{res.final_loss:.4f}",
        flush=True,
    )
    return res.model, (Xt, yt), (Xq, yq), D


# ----------------------------------------------------------------------------- (a) dense


def curvlinops_dense(method, model, X, y, columns: int, batch: int | None) -> torch.Tensor:
    from curvlinops import GGNLinearOperator, HessianLinearOperator

    model = copy.deepcopy(model).double()
    params = [p for p in model.parameters() if p.requires_grad]
    X = X.double()
    b = batch or len(X)
    data = [(X[a : a + b], y[a : a + b]) for a in range(0, len(X), b)]
    cls = GGNLinearOperator if method == "ggn" else HessianLinearOperator
    op = cls(model, nn.CrossEntropyLoss(), params, data, check_deterministic=False)
    D = op.shape[0]
    eye = torch.eye(D, dtype=torch.float64)
    return torch.cat([op @ eye[:, a : a + columns] for a in range(0, D, columns)], dim=1)


def part_dense(args, model, train_data, D) -> list[dict]:
    X, y = train_data
    rows = []
    loss = nn.CrossEntropyLoss()
    for method in args.dense_methods.split(","):
        t_ci, C = timed(
            lambda m=method: fit_curvature(
                m, model, loss, X, y, fisher=args.fisher, chunk_size=args.batch or len(X)
            ).dense()
        )
        t_eigh, _ = timed(lambda C=C: torch.linalg.eigh(C))
        row = {"method": method, "curvinf_s": t_ci, "eigh_s": t_eigh}
        print(f"[dense] {method}: curvinf {t_ci:.2f}s, eigh {t_eigh:.2f}s", flush=True)
        if not args.no_peers:
            if method == "ggn" and args.fisher != "type2":
                raise SystemExit("curvlinops' GGN is the type-2 GGN; use --fisher type2")
            t_cl, C_cl = timed(
                lambda m=method: curvlinops_dense(m, model, X, y, args.cl_columns, args.batch)
            )
            diff = float((C - C_cl).abs().max() / C_cl.abs().max())
            row |= {"curvlinops_s": t_cl, "speedup": t_cl / t_ci, "max_rel_diff": diff}
            print(
                f"[dense] {method}: curvlinops {t_cl:.2f}s -> speedup {t_cl / t_ci:.2f}x, "
                f"max|Δ|/max|C| = {diff:.2e}",
                flush=True,
            )
            del C_cl
        rows.append(row)
        del C
    return rows


# ----------------------------------------------------------------------------- (b) K-FAC


def curvinf_scores(method, model, train_data, query_data, damping, batch) -> torch.Tensor:
    loss = nn.CrossEntropyLoss()
    bs = batch or len(train_data[0])
    curv = fit_curvature(method, model, loss, *train_data, fisher="empirical", chunk_size=bs)
    inv = curv.inverse(Regularization(damping=damping, eps=0.0))
    return influence_scores(model, loss, inv, train=train_data, query=query_data, chunk_size=bs)


def kronfluence_scores(method, model, train_data, query_data, damping, batch, workdir):
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class SummedCE(Task):
        """kronfluence wants *summed* losses; per-example gradients are then ∇ℓ_n."""

        def compute_train_loss(self, batch, model, sample=False):
            x, t = batch
            logits = model(x)
            if sample:  # true Fisher; unused here (empirical Fisher on both sides)
                with torch.no_grad():
                    t = torch.multinomial(torch.softmax(logits.detach(), -1), 1).squeeze(-1)
            return F.cross_entropy(logits, t, reduction="sum")

        def compute_measurement(self, batch, model):
            x, t = batch
            return F.cross_entropy(model(x), t, reduction="sum")

    task = SummedCE()
    wrapped = prepare_model(copy.deepcopy(model), task)
    analyzer = Analyzer(
        analysis_name="bench",
        model=wrapped,
        task=task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(workdir),
    )
    train_ds, query_ds = TensorDataset(*train_data), TensorDataset(*query_data)
    n_train = len(train_ds)
    bs = batch or n_train
    # overwrite_output_dir: without it kronfluence silently reuses factors on disk.
    analyzer.fit_all_factors(
        factors_name=method,
        dataset=train_ds,
        per_device_batch_size=bs,
        factor_args=FactorArguments(strategy=method, use_empirical_fisher=True),
        overwrite_output_dir=True,
    )
    analyzer.compute_pairwise_scores(
        scores_name=f"{method}_scores",
        factors_name=method,
        query_dataset=query_ds,
        train_dataset=train_ds,
        per_device_query_batch_size=len(query_ds),
        per_device_train_batch_size=bs,
        score_args=ScoreArguments(damping_factor=damping),
        overwrite_output_dir=True,
    )
    return analyzer.load_pairwise_scores(f"{method}_scores")["all_modules"]


def part_kron(args, model, train_data, query_data) -> list[dict]:
    """curvinf and kronfluence runs alternate (best of ``--repeat`` each), so that load
    from other processes hits both sides alike."""
    rows = []
    for method in args.kron_methods.split(","):
        t_ci = t_kf = float("inf")
        for _ in range(args.repeat):
            t, S = timed(
                lambda m=method: curvinf_scores(
                    m, model, train_data, query_data, args.damping, args.batch
                )
            )
            t_ci = min(t_ci, t)
            if not args.no_peers:
                with tempfile.TemporaryDirectory() as tmp:
                    t, S_kf = timed(
                        lambda m=method, tmp=tmp: kronfluence_scores(
                            m, model, train_data, query_data, args.damping, args.batch, tmp
                        )
                    )
                t_kf = min(t_kf, t)
        row = {"method": method, "curvinf_s": t_ci}
        print(f"[kron] {method}: curvinf fit + scores {t_ci:.2f}s", flush=True)
        if not args.no_peers:
            rho = spearman(S, S_kf)
            rel = float((S - S_kf.double()).norm() / S_kf.double().norm())
            row |= {"kronfluence_s": t_kf, "speedup": t_kf / t_ci, "spearman": rho, "rel_fro": rel}
            print(
                f"[kron] {method}: kronfluence {t_kf:.2f}s -> speedup {t_kf / t_ci:.2f}x, "
                f"Spearman {rho:.6f}, ‖ΔS‖/‖S‖ = {rel:.2e}",
                flush=True,
            )
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}; "
        f"command: {' '.join(sys.argv)}",
        flush=True,
    )
    model, train_data, query_data, D = setup(args)
    parts = args.parts.split(",")
    results = {"args": vars(args) | {"json": str(args.json)}, "num_params": D}
    if "dense" in parts:
        results["dense"] = part_dense(args, model, train_data, D)
    if "kron" in parts:
        results["kron"] = part_kron(args, model, train_data, query_data)
    print("\n| part | method | curvinf (s) | peer (s) | speedup | agreement |")
    print("|---|---|---:|---:|---:|---|")
    for r in results.get("dense", []):
        peer = r.get("curvlinops_s", float("nan"))
        agree = f"max rel diff {r['max_rel_diff']:.1e}" if "max_rel_diff" in r else ""
        print(
            f"| dense (eigh {r['eigh_s']:.1f}s) | {r['method']} | {r['curvinf_s']:.2f} | "
            f"{peer:.2f} | {r.get('speedup', float('nan')):.2f}x | {agree} |"
        )
    for r in results.get("kron", []):
        peer = r.get("kronfluence_s", float("nan"))
        agree = f"Spearman {r['spearman']:.6f}" if "spearman" in r else ""
        print(
            f"| fit+scores | {r['method']} | {r['curvinf_s']:.2f} | {peer:.2f} | "
            f"{r.get('speedup', float('nan')):.2f}x | {agree} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

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
    p.add_argument(
        "--arch",
        choices=("mlp", "cnn"),
        default="mlp",
        help="mlp: make_mlp(depth, width); cnn: bench_models.small_cnn on (N, 1, 8, 8)\n"
        "digits images (--depth and --width ignored)",
    )
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
    p.add_argument(
        "--kf-dtype",
        choices=("float32", "float64"),
        default="float32",
        help="part (b), kronfluence: float32 = its defaults (float32 covariances, Lambda,\n"
        "per-sample gradients and scores; float64 eigendecomposition); float64 = model,\n"
        "data and every one of those in float64, curvinf's precision",
    )
    p.add_argument("--repeat", type=int, default=5, help="part (b): best of this many runs")
    p.add_argument(
        "--eigh",
        choices=("once", "all", "none"),
        default="once",
        help="time torch.linalg.eigh of the dense matrix: for the first dense method\n"
        "(both are D x D, the same cost), for each, or not at all",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
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


CPU: dict[str, float] = {}


def timed(fn, repeat: int = 1, key: str | None = None):
    """(best wall time, result of the last call); the CPU time (all threads,
    ``time.process_time``) of that best call goes to ``CPU[key]``."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall = time.perf_counter() - t
        if wall < best:
            best = wall
            if key:
                CPU[key] = time.process_time() - c
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
    if args.arch == "cnn":
        from bench_models import small_cnn

        Xt, Xq = Xt.reshape(-1, 1, 8, 8), Xq.reshape(-1, 1, 8, 8)
        torch.manual_seed(args.seed)
        model = small_cnn(classes=data.num_outputs)
    else:
        model = make_mlp(
            data.num_features, data.num_outputs, depth=args.depth, width=args.width, seed=args.seed
        )
    recipe = TrainingRecipe(epochs=args.epochs, lr=args.lr, seed=args.seed)
    t, res = timed(lambda: train(model, nn.CrossEntropyLoss(), Xt, yt, recipe))
    D = sum(p.numel() for p in model.parameters())
    arch = "small_cnn" if args.arch == "cnn" else f"depth {args.depth}, width {args.width}"
    print(
        f"model: {arch}, D = {D:,}; train {len(Xt)}, "
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
            ).dense(),
            key="ci",
        )
        row = {"method": method, "curvinf_s": t_ci, "curvinf_cpu_s": CPU["ci"]}
        if args.eigh == "all" or (args.eigh == "once" and not rows):
            row["eigh_s"], _ = timed(lambda C=C: torch.linalg.eigh(C), key="eigh")
            row["eigh_cpu_s"] = CPU["eigh"]
        eigh = f", eigh {row['eigh_s']:.2f}s" if "eigh_s" in row else ""
        print(f"[dense] {method}: curvinf {t_ci:.2f}s{eigh}", flush=True)
        if not args.no_peers:
            if method == "ggn" and args.fisher != "type2":
                raise SystemExit("curvlinops' GGN is the type-2 GGN; use --fisher type2")
            t_cl, C_cl = timed(
                lambda m=method: curvlinops_dense(m, model, X, y, args.cl_columns, args.batch),
                key="cl",
            )
            diff = float((C - C_cl).abs().max() / C_cl.abs().max())
            row |= {
                "curvlinops_s": t_cl,
                "curvlinops_cpu_s": CPU["cl"],
                "speedup": t_cl / t_ci,
                "cpu_speedup": CPU["cl"] / CPU["ci"],
                "max_rel_diff": diff,
            }
            print(
                f"[dense] {method}: curvlinops {t_cl:.2f}s -> speedup {t_cl / t_ci:.2f}x "
                f"(CPU {CPU['cl']:.1f}s vs {CPU['ci']:.1f}s: {row['cpu_speedup']:.2f}x), "
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


def precision(dtype: torch.dtype, *names: str) -> dict[str, torch.dtype]:
    """kronfluence's ``<name>_dtype`` arguments, all ``dtype`` (none for float32: its defaults)."""
    return {} if dtype == torch.float32 else {f"{n}_dtype": dtype for n in names}


def kronfluence_scores(
    method, model, train_data, query_data, damping, batch, workdir, dtype=torch.float32
):
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
    model = copy.deepcopy(model)
    if dtype == torch.float64:
        model = model.double()
        train_data = (train_data[0].double(), train_data[1])
        query_data = (query_data[0].double(), query_data[1])
    wrapped = prepare_model(model, task)
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
        factor_args=FactorArguments(
            strategy=method,
            use_empirical_fisher=True,
            **precision(dtype, "activation_covariance", "gradient_covariance")
            | precision(dtype, "per_sample_gradient", "lambda"),
        ),
        overwrite_output_dir=True,
    )
    analyzer.compute_pairwise_scores(
        scores_name=f"{method}_scores",
        factors_name=method,
        query_dataset=query_ds,
        train_dataset=train_ds,
        per_device_query_batch_size=len(query_ds),
        per_device_train_batch_size=bs,
        score_args=ScoreArguments(
            damping_factor=damping,
            **precision(dtype, "query_gradient_svd", "per_sample_gradient")
            | precision(dtype, "precondition", "score"),
        ),
        overwrite_output_dir=True,
    )
    return analyzer.load_pairwise_scores(f"{method}_scores")["all_modules"]


def gemm_rate(dtype: torch.dtype = torch.float64, n: int = 1024, repeat: int = 5) -> float:
    """Best GEMM rate (flop/s) of an (n, n) @ (n, n) product at the current thread count."""
    a = torch.randn(n, n, dtype=dtype)
    best = min(timed(lambda: a @ a)[0] for _ in range(repeat))
    return 2 * n**3 / best


def kron_flops(method: str, model: nn.Module, train_data, query_data) -> dict[str, float]:
    """Matmul flops of curvinf's K-FAC / EK-FAC fit plus all-pairs scores, empirical Fisher,
    every set in one chunk. Per layer ``(T, in', out)`` (positions, inputs with the bias 1,
    outputs), forward ``F = Σ 2 T in' out`` per example; ``F_in`` the input-gradient GEMMs
    (every layer but the first). Passes: the fit capture (N), the query (Q) and train (N)
    score captures, each with a backward to the layer outputs and, being one chunk, the
    factorisation check (a backward with parameter gradients). Factors ``2 N T (in'² +
    out²)``, ``eigh`` ``9 (in'³ + out³)``, EK-FAC correction and score rotations ``2 T (in'² +
    out² + in' out)`` per example, score GEMM ``2 Q N D``. Element-wise work not counted."""
    from curvinf.curvature.layers import factored_layers, measure_captures

    m64 = copy.deepcopy(model).double().eval()
    ads = factored_layers(m64, "flops")
    x1, y1 = train_data[0][:2].double(), train_data[1][:2]
    caps = measure_captures(m64, ads, "ce", "loss", x1, y1)
    pairs = zip(caps.inputs, caps.grads, strict=True)
    shapes = [(a.shape[1], a.shape[2], g.shape[-1]) for a, g in pairs]  # (T, in', out)
    N, Q = len(train_data[0]), len(query_data[0])
    D = sum(i * o for _, i, o in shapes)
    fwd = sum(2 * T * i * o for T, i, o in shapes)
    fwd_in = fwd - 2 * shapes[0][0] * shapes[0][1] * shapes[0][2]
    rot = sum(2 * T * (i * i + o * o + i * o) for T, i, o in shapes)
    out = {
        "passes": (2 * N + Q) * (fwd + fwd_in + fwd_in + fwd),
        "factors": N * sum(2 * T * (i * i + o * o) for T, i, o in shapes),
        "eigh": sum(9 * (i**3 + o**3) for _, i, o in shapes),
        "ekfac_correction": N * rot if method == "ekfac" else 0,
        "score_rotations": (N + Q) * rot,
        "score_gemm": 2 * Q * N * D,
    }
    out["total"] = sum(out.values())
    return out


def part_kron(args, model, train_data, query_data) -> list[dict]:
    """curvinf and kronfluence runs alternate (best of ``--repeat`` each), so that load
    from other processes hits both sides alike."""
    rows = []
    for method in args.kron_methods.split(","):
        t_ci = t_kf = c_ci = c_kf = float("inf")
        for _ in range(args.repeat):
            t, S = timed(
                lambda m=method: curvinf_scores(
                    m, model, train_data, query_data, args.damping, args.batch
                ),
                key="ci",
            )
            if t < t_ci:
                t_ci, c_ci = t, CPU["ci"]
            if not args.no_peers:
                with tempfile.TemporaryDirectory() as tmp:
                    t, S_kf = timed(
                        lambda m=method, tmp=tmp: kronfluence_scores(
                            m,
                            model,
                            train_data,
                            query_data,
                            args.damping,
                            args.batch,
                            tmp,
                            getattr(torch, args.kf_dtype),
                        ),
                        key="kf",
                    )
                if t < t_kf:
                    t_kf, c_kf = t, CPU["kf"]
        row = {"method": method, "curvinf_s": t_ci, "curvinf_cpu_s": c_ci}
        print(f"[kron] {method}: curvinf fit + scores {t_ci:.2f}s (CPU {c_ci:.1f}s)", flush=True)
        flops, rate = kron_flops(method, model, train_data, query_data), gemm_rate()
        row |= {"flops": flops, "gemm_rate": rate, "floor_s": flops["total"] / rate}
        print(
            f"[kron] {method}: {flops['total'] / 1e9:.2f} GFLOP of matmuls ("
            + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in flops.items() if k != "total")
            + f"); float64 GEMM here {rate / 1e9:.1f} GFLOP/s: floor {row['floor_s']:.3f}s, "
            f"curvinf at {t_ci / row['floor_s']:.1f}x the floor",
            flush=True,
        )
        if not args.no_peers:
            rho = spearman(S, S_kf)
            rel = float((S - S_kf.double()).norm() / S_kf.double().norm())
            row |= {
                "kronfluence_s": t_kf,
                "kronfluence_cpu_s": c_kf,
                "speedup": t_kf / t_ci,
                "cpu_speedup": c_kf / c_ci,
                "spearman": rho,
                "rel_fro": rel,
            }
            print(
                f"[kron] {method}: kronfluence {t_kf:.2f}s (CPU {c_kf:.1f}s) -> speedup "
                f"{t_kf / t_ci:.2f}x (CPU {c_kf / c_ci:.2f}x), "
                f"Spearman {rho:.6f}, ‖ΔS‖/‖S‖ = {rel:.2e}",
                flush=True,
            )
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
    print("\n| part | method | curvinf s (CPU s) | peer s (CPU s) | speedup (CPU) | agreement |")
    print("|---|---|---:|---:|---:|---|")
    nan = float("nan")
    for part, peer_key, rows in (
        ("dense", "curvlinops", results.get("dense", [])),
        ("fit+scores", "kronfluence", results.get("kron", [])),
    ):
        for r in rows:
            if "max_rel_diff" in r:
                agree = f"max rel diff {r['max_rel_diff']:.1e}"
            else:
                agree = f"Spearman {r['spearman']:.6f}" if "spearman" in r else ""
            eigh = f" (eigh {r['eigh_s']:.1f}s)" if "eigh_s" in r else ""
            print(
                f"| {part}{eigh} | {r['method']} | {r['curvinf_s']:.2f} "
                f"({r['curvinf_cpu_s']:.1f}) | {r.get(peer_key + '_s', nan):.2f} "
                f"({r.get(peer_key + '_cpu_s', nan):.1f}) | {r.get('speedup', nan):.2f}x "
                f"({r.get('cpu_speedup', nan):.2f}x) | {agree} |"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

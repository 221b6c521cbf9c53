"""Time the study's per-configuration measurements against the routes they replaced.

    .venv/bin/python benchmarks/bench_measure.py --threads 1 --width 64 --depth 1

Two measurements that every configuration of the grid repeats:

- **Distances between rungs** (``‖C_a⁺ − C_b⁺‖_F``, and the same on the curvatures):
  ``eigen`` is :func:`curvinf.diagnostics.eigen_distance` on the block eigen forms
  (``Σa² + Σb² − 2 tr(AB)``, one rotation per eigenvector, the cheaper side drawn);
  ``dense`` forms both inverses as ``D x D`` matrices and subtracts, what the study did
  before. Pairs: GGN vs Hessian (both dense, the ``D³`` case), block-GGN vs Hessian and
  K-FAC vs Hessian (blocks against a dense form), K-FAC vs EK-FAC (one Kronecker basis).
- **Paired-bootstrap Spearman** (``B`` resamples of ``M`` subsets for ``Q`` queries and
  several rungs): ``counts`` is :func:`curvinf.lds.bootstrap_spearman` (ranks of every
  resample from one GEMM of counts against the tie matrix), ``sort`` ranks each
  resample's expanded sample with :func:`curvinf.lds.spearman_columns`, the definition.

Both routes run in this process, alternating, best of ``--repeats``; the script checks that
they agree (distances to 1e-8 relative, Spearman to 1e-12) before it reports times.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from curvinf import Regularization, fit_curvature, make_mlp
from curvinf.data import load_dataset
from curvinf.diagnostics import eigen_distance
from curvinf.lds import bootstrap_spearman, spearman_columns


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def distances(args) -> list[dict]:
    data = load_dataset("digits", seed=0)
    X, y = data.train
    torch.manual_seed(0)
    model = make_mlp(X.shape[1], 10, depth=args.depth, width=args.width)
    loss = torch.nn.CrossEntropyLoss()
    rungs = {
        m: fit_curvature(m, model, loss, X, y, progress=False)
        for m in ("hessian", "ggn", "block_ggn", "ekfac", "kfac")
    }
    reg = Regularization(damping=0.1, eps=1e-4)  # untrained model: H has eigenvalues < -δ
    inv = {m: c.inverse(reg) for m, c in rungs.items()}
    D = rungs["hessian"].num_params
    out = []
    for a, b in (
        ("ggn", "hessian"),
        ("block_ggn", "hessian"),
        ("kfac", "hessian"),
        ("kfac", "ekfac"),
    ):
        t_eigen, fast = best_time(
            lambda a=a, b=b: eigen_distance(inv[a].eigen_form(), inv[b].eigen_form(), D),
            args.repeats,
        )
        t_dense, slow = best_time(
            lambda a=a, b=b: float(torch.linalg.norm(inv[a].dense() - inv[b].dense())),
            args.repeats,
        )
        assert abs(fast - slow) <= 1e-8 * slow, (a, b, fast, slow)
        out.append(
            {
                "pair": f"{a} vs {b}",
                "D": D,
                "eigen_s": t_eigen,
                "dense_s": t_dense,
                "speedup": t_dense / t_eigen,
            }
        )
        print(out[-1], flush=True)
    return out


def bootstrap(args) -> dict:
    rng = np.random.default_rng(0)
    M, Q, B, R = args.subsets, args.queries, args.resamples, args.rungs
    target = rng.normal(size=(M, Q))
    preds = [target + rng.normal(size=(M, Q)) * s for s in np.linspace(0.5, 3, R)]
    rows = rng.integers(0, M, size=(B, M))

    def sort_route():
        return [np.stack([spearman_columns(p[r], target[r]) for r in rows]) for p in preds]

    t_counts, fast = best_time(lambda: bootstrap_spearman(preds, target, rows), args.repeats)
    t_sort, slow = best_time(sort_route, args.repeats)
    err = max(float(np.nanmax(np.abs(f - s))) for f, s in zip(fast, slow, strict=True))
    assert err < 1e-12, err
    res = {
        "M": M,
        "Q": Q,
        "B": B,
        "rungs": R,
        "counts_s": t_counts,
        "sort_s": t_sort,
        "speedup": t_sort / t_counts,
    }
    print(res, flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--queries", type=int, default=360)
    p.add_argument("--resamples", type=int, default=200)
    p.add_argument("--rungs", type=int, default=10)
    p.add_argument("--out", default="results/bench_measure.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "distances": distances(args), "bootstrap": bootstrap(args)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

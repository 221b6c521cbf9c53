"""The paper grids' cost: the retraining flop floor per configuration, the rungs'
factorisation floor, and the wall time each finished configuration took (ground truth
and rungs), from the result directories.

    .venv/bin/python benchmarks/grid_cost.py --presets paper paper-code --threads 1

Flops are the matmul flops of training (forward, weight gradients, input gradients;
:func:`bench_groundtruth.training_flops`) of every retrained model (``M x R`` per
configuration, subsets of ``round(alpha · N)`` rows, matched or base epochs) and of the
base model. The floor is that count at the float32 ``bmm`` rate measured in this process
at the same thread count. The rungs' floor is their largest factorisations
(:meth:`RunConfig.factorisations`: dense and Gram ``eigh``s, Gram Cholesky factors, and
the partial Gram ``eigh``'s inertia count, an LDLᵀ factorisation, as its lower bound) at
the float64 ``eigh``, Cholesky and ``ldl_factor`` times measured here (``eigh`` is bound
by the memory traffic of its tridiagonal reduction, so it is timed, not counted in
flops), scaled as ``n³`` from a 3,000² matrix. Wall times: ``cost.wall_s_total`` of the ground-truth
store's manifest and ``wall_seconds`` of ``runs/<id>/timing.json`` (rungs, errors,
diagnostics), on whatever else the machine was running (the study's log says).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from bench_groundtruth import bmm_rate, training_flops

from curvinf.groundtruth import store_name
from curvinf.lds import subset_size
from curvinf.retrain import subset_recipe
from curvinf.study import config_data, get_preset, groundtruth_config


def seconds_per_cube(kind: str, n: int = 3000, repeats: int = 2) -> float:
    """Best time of a float64 ``eigh`` or Cholesky factor of a random SPD ``n x n`` matrix,
    divided by ``n³``."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = X @ X.T / n + torch.eye(n, dtype=torch.float64)
    f = {"eigh": torch.linalg.eigh, "cholesky": torch.linalg.cholesky}.get(
        kind, torch.linalg.ldl_factor
    )
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(A)
        best = min(best, time.perf_counter() - t0)
    return best / n**3


def config_cost(config, out: Path, per_cube: dict[str, float]) -> dict:
    """Flops, the rungs' factorisation floor (``per_cube``: seconds per ``n³`` of each
    kind, :func:`seconds_per_cube`) and measured seconds of one configuration of a grid
    stored in ``out``."""
    data = config_data(config)
    gtc = groundtruth_config(config)
    model = gtc.make_model(data)
    n = len(data.X_train)
    size = subset_size(n, config.lds.alpha)
    epochs = subset_recipe(gtc.recipe, n, size, gtc.matched_steps).epochs
    models = config.lds.num_subsets * config.lds.num_seeds
    flops = models * training_flops(model, size, epochs) + training_flops(model, n, config.epochs)
    manifest = out / "groundtruth" / store_name(gtc, data) / "manifest.json"
    gt = json.loads(manifest.read_text()) if manifest.exists() else {}
    timing = out / "runs" / config.id / "timing.json"
    rungs = json.loads(timing.read_text())["wall_seconds"] if timing.exists() else math.nan
    done = (out / "runs" / config.id / "rows.json").exists()
    return {
        "config": f"d{config.depth} w{config.width} e{config.epochs}",
        "D": config.num_params,
        "flops": flops,
        "gt_complete": gt.get("progress", {}).get("complete", False),
        "gt_seconds": gt.get("cost", {}).get("wall_s_total", math.nan),
        "gt_threads": {r["torch_threads"] for r in gt.get("runs", [])},
        "rung_floor": sum(per_cube[k] * n**3 for k, n, _ in config.factorisations()),
        "rung_seconds": rungs,
        "done": done,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["paper", "paper-code"])
    parser.add_argument("--root", default="results")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rate, _ = bmm_rate(100, 128, 64)
    per_cube = {kind: seconds_per_cube(kind) for kind in ("eigh", "cholesky", "ldl")}
    per_cube["eigh-above"] = per_cube["ldl"]  # the partial eigh's inertia count alone
    print(
        f"float32 bmm (100 x 64 x 128 @ 128 x 128), {args.threads} thread(s): {rate:.1f} GFLOP/s; "
        f"float64 eigh of 3,000²: {per_cube['eigh'] * 3000**3:.2f} s, Cholesky "
        f"{per_cube['cholesky'] * 3000**3:.3f} s, LDLᵀ {per_cube['ldl'] * 3000**3:.3f} s (a "
        f"12,933² eigh at that rate: {per_cube['eigh'] * 12933**3 / 60:.1f} min)\n"
    )
    for name in args.presets:
        out = Path(args.root) / name
        rows = [config_cost(c, out, per_cube) for c in get_preset(name).configs()]
        total = sum(r["flops"] for r in rows)
        hours = total / rate / 1e9 / 3600
        rung_hours = sum(r["rung_floor"] for r in rows) / 3600
        wall = sum(r["gt_seconds"] + r["rung_seconds"] for r in rows) / 3600
        print(
            f"## {name}: retraining {total / 1e12:.0f} TFLOP, floor {hours:.1f} h at "
            f"{rate:.0f} GFLOP/s; the rungs' factorisations {rung_hours:.1f} h; recorded wall "
            f"time (ground truth + rungs) {wall:.1f} h\n"
        )
        print(
            "| configuration | D | retraining TFLOP | floor (min) | ground truth (min) | "
            "% of floor rate | rung floor (min) | rungs (min) | done |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: r["flops"]):
            floor = r["flops"] / rate / 1e9
            gt = r["gt_seconds"] if r["gt_complete"] else math.nan
            frac = 100 * floor / gt if gt == gt and gt > 0 else math.nan
            print(
                f"| {r['config']} | {r['D']:,} | {r['flops'] / 1e12:.2f} | {floor / 60:.1f} | "
                f"{gt / 60:.1f} | {frac:.0f}% | {r['rung_floor'] / 60:.1f} | "
                f"{r['rung_seconds'] / 60:.1f} | {'yes' if r['done'] else 'no'} |"
            )
        print()


if __name__ == "__main__":
    main()

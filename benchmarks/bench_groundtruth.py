"""Time LDS ground truth: batched retraining (curvinf.groundtruth) against the sequential path.

    .venv/bin/python benchmarks/bench_groundtruth.py --depth 4 --width 64 --epochs 100 \
        --subsets 100 --seeds 5 --sequential 3 --threads 1 --write-doc

The sequential path is :func:`curvinf.training.train`, one model at a time (what
dattri's ``retrain_lds`` or a TRAK job array does per model). A few of the very
models the ground truth needs are trained that way and the time is scaled to
``M x R``; they are also checked against the batched results (1e-5). The batched
path is a full :func:`curvinf.groundtruth.ground_truth` build into a fresh store
(base model excluded: it is one ordinary training run, reported separately).

Floating-point work: per model and epoch, forward ``2 n Σ_l i_l o_l`` and
backward ``2 n Σ_l i_l o_l`` (weights) ``+ 2 n Σ_{l>1} i_l o_l`` (inputs), ``n``
the subset size; element-wise work is not counted. The floor is that count at
the batched-matmul rate measured on this machine in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from curvinf.data import load_dataset
from curvinf.groundtruth import GroundTruthConfig, ground_truth
from curvinf.lds import make_subsets
from curvinf.retrain import measure_many, stack_params, subset_recipe
from curvinf.training import TrainingRecipe, train

HEADING = "## Ground truth (LDS retraining)"


def training_flops(model: nn.Module, n: int, epochs: int) -> float:
    """Matmul flops of training one model on ``n`` examples for ``epochs`` (module doc)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    macs = [m.in_features * m.out_features for m in layers]
    return float(epochs * 2 * n * (2 * sum(macs) + sum(macs[1:])))


def bmm_rate(k: int, width: int, batch: int, repeats: int = 30) -> tuple[float, float]:
    """GFLOP/s of a (k, batch, width) @ (k, width, width) float32 bmm: per wall second and
    per CPU second (all threads), best of 3."""
    a, b = torch.randn(k, batch, width), torch.randn(k, width, width)
    torch.bmm(a, b)
    wall = cpu = float("inf")
    for _ in range(3):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            torch.bmm(a, b)
        wall = min(wall, (time.perf_counter() - w0) / repeats)
        cpu = min(cpu, (time.process_time() - c0) / repeats)
    flops = 2 * k * batch * width * width
    return flops / wall / 1e9, flops / cpu / 1e9


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--sequential", type=int, default=3, help="models timed on the sequential path")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk", type=int, default=0, help="models per chunk (0: default)")
    p.add_argument("--write-doc", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data = load_dataset("digits", seed=0)
    config = GroundTruthConfig(
        depth=args.depth,
        width=args.width,
        recipe=TrainingRecipe(epochs=args.epochs),
        num_subsets=args.subsets,
        num_seeds=args.seeds,
    )
    loss = config.make_loss()
    model = config.make_model(data)
    n_train = len(data.X_train)
    masks = make_subsets(n_train, config.num_subsets, config.alpha, config.seed)
    n_sub = int(masks[0].sum())
    recipe = subset_recipe(config.recipe, n_train, n_sub, config.matched_steps)
    flops_per_model = training_flops(model, n_sub, recipe.epochs)
    num_models = config.num_models
    print(f"{num_models} models, {flops_per_model / 1e9:.2f} GFLOP each", file=sys.stderr)

    # Sequential: a few of the ground truth's own models, one at a time, half of them
    # before and half after the batched build (the machine is shared; load drifts).
    from curvinf.groundtruth import retrain_seeds

    seeds = retrain_seeds(config.seed, config.num_subsets, config.num_seeds)
    picks = [(j, 0) for j in range(args.sequential)]
    train(model, loss, *data.train, replace(recipe, epochs=1), subset=torch.arange(10))  # warm-up
    seq_wall, seq_cpu, seq_meas = [], [], []

    def sequential(some: list[tuple[int, int]]) -> None:
        for j, r in some:
            w0, c0 = time.perf_counter(), time.process_time()
            alone = train(
                model, loss, *data.train, replace(recipe, seed=int(seeds[j, r])),
                subset=masks[j],
            )  # fmt: skip
            params = stack_params([alone.model])
            seq_meas.append(measure_many(model, loss, params, *data.query, config.measure)[0])
            seq_wall.append(time.perf_counter() - w0)
            seq_cpu.append(time.process_time() - c0)
            print(f"sequential model {j}: {seq_wall[-1]:.2f} s wall", file=sys.stderr)

    half = (len(picks) + 1) // 2
    sequential(picks[:half])
    rates = [bmm_rate(100, args.width, config.recipe.batch_size)]

    # Batched: a full build into a fresh store.
    with tempfile.TemporaryDirectory() as store:
        w0, c0 = time.perf_counter(), time.process_time()
        gt = ground_truth(data, config, store, progress=True, models_per_chunk=args.chunk or None)
        total_wall, total_cpu = time.perf_counter() - w0, time.process_time() - c0
        manifest = gt.manifest
    sequential(picks[half:])
    rates.append(bmm_rate(100, args.width, config.recipe.batch_size))
    seq_per_model = sum(seq_wall) / len(seq_wall)
    seq_cpu_per_model = sum(seq_cpu) / len(seq_cpu)
    rate = max(r[0] for r in rates)
    cpu_rate = max(r[1] for r in rates)
    base_wall = manifest["cost"]["base_wall_s"]
    batched_wall = manifest["cost"]["retrain_wall_s"]  # chunks only: training + measuring
    batched_cpu = manifest["cost"]["retrain_cpu_s"]
    max_diff = max(
        float((gt.measurements[j, r] - m).abs().max())
        for (j, r), m in zip(picks, seq_meas, strict=True)
    )
    total_flops = flops_per_model * num_models
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": (
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
            f"thread(s), torch {torch.__version__}"
        ),
        "depth": args.depth,
        "width": args.width,
        "total_wall_s": round(total_wall, 1),
        "total_cpu_s": round(total_cpu, 1),
        "models": num_models,
        "models_per_chunk": manifest["layout"]["models_per_chunk"],
        "epochs": recipe.epochs,
        "subset_size": n_sub,
        "sequential_s_per_model": round(seq_per_model, 3),
        "sequential_cpu_s_per_model": round(seq_cpu_per_model, 3),
        "sequential_models": len(seq_wall),
        "sequential_s_scaled": round(seq_per_model * num_models, 1),
        "sequential_cpu_s_scaled": round(seq_cpu_per_model * num_models, 1),
        "batched_s": round(batched_wall, 1),
        "batched_cpu_s": round(batched_cpu, 1),
        "base_model_s": base_wall,
        "speedup_wall": round(seq_per_model * num_models / batched_wall, 2),
        "speedup_cpu": round(seq_cpu_per_model * num_models / batched_cpu, 2),
        "gflop_total": round(total_flops / 1e9, 1),
        "batched_gflops": round(total_flops / batched_wall / 1e9, 2),
        "batched_gflops_per_cpu_s": round(total_flops / batched_cpu / 1e9, 2),
        "bmm_peak_gflops": round(rate, 1),
        "bmm_peak_gflops_per_cpu_s": round(cpu_rate, 1),
        "floor_s": round(total_flops / rate / 1e9, 1),
        "floor_cpu_s": round(total_flops / cpu_rate / 1e9, 1),
        "fraction_of_floor": round(total_flops / rate / 1e9 / batched_wall, 3),
        "fraction_of_floor_cpu": round(total_flops / cpu_rate / 1e9 / batched_cpu, 3),
        "load_average_1min": round(__import__("os").getloadavg()[0], 1),
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "max_abs_diff_batched_vs_sequential": max_diff,
        "warnings": gt.warnings,
    }
    print(json.dumps(result, indent=2))
    if args.write_doc:
        write_doc(result)


def write_doc(r: dict) -> None:
    path = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    verdict = (
        f"met in wall time ({r['speedup_wall']}x)"
        if r["speedup_wall"] >= 10
        else f"not met in wall time ({r['speedup_wall']}x)"
    ) + (
        f", met in CPU time ({r['speedup_cpu']}x)"
        if r["speedup_cpu"] >= 10
        else f", not met in CPU time ({r['speedup_cpu']}x)"
    )
    scaled_row = (
        f"| sequential, scaled to {r['models']} models | {r['sequential_s_scaled']} "
        f"| {r['sequential_cpu_s_scaled']} |"
    )
    section = f"""{HEADING}

LDS ground truth for a depth-{r["depth"]}, width-{r["width"]} MLP on digits: {r["models"]} models
(subsets x seeds), {r["epochs"]} epochs on subsets of {r["subset_size"]} examples, batched
(`curvinf.groundtruth.ground_truth`: stacked parameters, {r["models_per_chunk"]}
models per chunk, store writes included) against the sequential path
(`curvinf.training.train`, one model at a time; {r["sequential_models"]} of the same models
timed, half before and half after the batched build, and scaled). Machine: {r["machine"]}.

```
{r["command"]}
```

| | wall s | CPU s |
|---|---|---|
| sequential, per model | {r["sequential_s_per_model"]} | {r["sequential_cpu_s_per_model"]} |
{scaled_row}
| batched, {r["models"]} models | {r["batched_s"]} | {r["batched_cpu_s"]} |
| **speed-up** | **{r["speedup_wall"]}x** | **{r["speedup_cpu"]}x** |

- The machine's 2 cores were shared with other jobs (1-minute load average
  {r["load_average_1min"]} at the end), so wall times are noisy and depend on how much
  of the CPU each phase got; CPU time (`time.process_time`) is the steadier measure.
- Work: {r["gflop_total"]} GFLOP of matmuls in all (forward, weight and input gradients;
  element-wise work not counted). A float32 bmm of the layer shape runs here at
  {r["bmm_peak_gflops_per_cpu_s"]} GFLOP per CPU second ({r["bmm_peak_gflops"]} GFLOP/s wall):
  a floor of {r["floor_cpu_s"]} CPU s ({r["floor_s"]} s wall). The batched path sustains
  {r["batched_gflops_per_cpu_s"]} GFLOP per CPU second, {100 * r["fraction_of_floor_cpu"]:.0f}%
  of the bmm rate ({100 * r["fraction_of_floor"]:.0f}% in wall time). The rest is element-wise,
  memory-bound work that a batch of 64 cannot amortise: the minibatch gather, bias, ReLU
  and its backward on every activation, two passes of the SGD update over the parameters
  (`benchmarks/bench_retraining.py` times the training loop alone).
- Peak memory (ru_maxrss of the whole benchmark process): {r["peak_rss_gib"]} GiB.
- The sequentially trained models agree with their batched twins to
  {r["max_abs_diff_batched_vs_sequential"]:.1e} (max abs difference of query losses).
- The base model (one ordinary training run on all data) took {r["base_model_s"]} s more;
  the whole `ground_truth` call {r["total_wall_s"]} s.
- Target (10x on 2 cores): {verdict}.
- Threads: both paths ran with 1 torch thread. On this shared machine 2 threads made the
  batched path 7-10x *slower* per model-step (OpenMP threads spin-waiting on oversubscribed
  cores; `OMP_WAIT_POLICY=PASSIVE` removes that, CPU time then matches 1 thread). On 2 idle
  cores 2 threads should cut the batched wall time by up to half; not measured here. The
  sequential path is overhead-bound (about 0.1 ms of matmul in a ~2 ms step) and gains
  little from a second thread.
"""
    pattern = re.compile(rf"{re.escape(HEADING)}\n.*?(?=\n## |\Z)", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n"), text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")


if __name__ == "__main__":
    main()

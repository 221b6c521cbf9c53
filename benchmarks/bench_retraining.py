"""Time batched retraining (curvinf.retrain.train_many) against the bmm rate, before and after.

    .venv/bin/python benchmarks/bench_retraining.py --threads 2 --models 100 --epochs 20 \
        --sizes 4x64 8x128 1x32

For each MLP (``DEPTHxWIDTH``, digits, batch 64, subsets of 718 examples) it trains
``--models`` models for ``--epochs`` epochs with

- ``new``: :func:`curvinf.retrain.train_many` as it is (the fused stacked-MLP path
  for plain ``nn.Sequential`` MLPs),
- ``generic``: the same function forced onto its generic path (vmap over
  ``functional_call``, in-place SGD update), what any other model gets,
- ``baseline``: a frozen copy of the step ``train_many`` used before (vmap over
  ``functional_call``, ``vmap(sgd_step)`` allocating new tensors), kept here only,

and reports the matmul GFLOP/s (``training_flops`` of bench_groundtruth.py: forward,
weight and input gradients; element-wise work not counted) as a fraction of the float32
bmm rate of the layer shape measured in the same process (best of the measurements
taken before and after each size). Runs alternate between paths, ``--repeats`` times,
and the best is kept (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import torch
from torch import nn
from torch.func import functional_call, vmap

from curvinf.data import load_dataset
from curvinf.groundtruth import GroundTruthConfig
from curvinf.lds import make_subsets
from curvinf.losses import batch_loss
from curvinf.params import trainable_parameters
from curvinf.retrain import subset_indices, train_many
from curvinf.training import TrainingRecipe, epoch_batches, sgd_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_groundtruth import bmm_rate, training_flops  # noqa: E402


def baseline_train_many(model, kind, X, y, recipe, idx, seeds):
    """The loop of train_many before the fused path (vmap(functional_call) + vmap(sgd_step))."""
    K, n = idx.shape
    params = {
        k: v.detach().unsqueeze(0).repeat(K, *([1] * v.ndim))
        for k, v in trainable_parameters(model).items()
    }
    bufs = {k: torch.zeros_like(v) for k, v in params.items()}
    per_model_loss = vmap(lambda p, xb, yb: batch_loss(kind, functional_call(model, p, (xb,)), yb))

    def step(p, xb, yb):
        leaves = {k: v.detach().requires_grad_() for k, v in p.items()}
        with torch.enable_grad():
            values = per_model_loss(leaves, xb, yb)
            grads = torch.autograd.grad(values.sum(), list(leaves.values()))
        return dict(zip(leaves, grads, strict=True)), values.detach()

    update = vmap(lambda p, g, b: sgd_step(p, g, b, recipe))
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    losses = torch.empty(K, recipe.epochs, dtype=torch.float64)
    for epoch in range(recipe.epochs):
        per_model = [epoch_batches(idx[k], recipe.batch_size, generators[k]) for k in range(K)]
        total = torch.zeros(K, dtype=torch.float64)
        for batch in zip(*per_model, strict=True):
            b = torch.stack(batch)
            grads, values = step(params, X[b], y[b])
            total += values.double() * b.shape[1]
            params, bufs = update(params, grads, bufs)
        losses[:, epoch] = total / n
    return params, losses


class _Opaque(nn.Module):
    """Wraps the MLP so train_many cannot recognise it: forces the generic path."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def run_path(path, model, loss, X, y, recipe, masks, seeds):
    if path == "baseline":
        kind = "ce" if isinstance(loss, nn.CrossEntropyLoss) else "mse"
        params, losses = baseline_train_many(
            model.eval(), kind, X, y, recipe, subset_indices(masks), seeds
        )
        return losses
    m = _Opaque(model) if path == "generic" else model
    return train_many(m, loss, X, y, recipe, subsets=masks, seeds=seeds).epoch_losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["4x64", "8x128", "1x32"], help="DEPTHxWIDTH")
    p.add_argument("--models", type=int, default=100)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--paths", nargs="+", default=["baseline", "generic", "new"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("digits", seed=0)
    X, y = data.train
    results = []
    for size in args.sizes:
        depth, width = (int(v) for v in size.split("x"))
        config = GroundTruthConfig(depth=depth, width=width, recipe=TrainingRecipe(epochs=1))
        model, loss = config.make_model(data), config.make_loss()
        masks = make_subsets(len(X), args.models, config.alpha, 0)
        n_sub = int(masks[0].sum())
        recipe = replace(config.recipe, epochs=args.epochs)
        seeds = list(range(args.models))
        flops = training_flops(model, n_sub, args.epochs) * args.models
        rates = [bmm_rate(args.models, width, recipe.batch_size)[0]]
        times: dict[str, list[float]] = {q: [] for q in args.paths}
        losses = {}
        for path in args.paths:  # warm-up (one epoch)
            run_path(path, model, loss, X, y, replace(recipe, epochs=1), masks, seeds)
        for _ in range(args.repeats):
            for path in args.paths:
                t0 = time.perf_counter()
                losses[path] = run_path(path, model, loss, X, y, recipe, masks, seeds)
                times[path].append(time.perf_counter() - t0)
                print(f"{size} {path}: {times[path][-1]:.2f} s", file=sys.stderr)
        rates.append(bmm_rate(args.models, width, recipe.batch_size)[0])
        rate = max(rates)
        row = {
            "size": size,
            "models": args.models,
            "epochs": args.epochs,
            "subset": n_sub,
            "bmm_gflops": round(rate, 1),
        }
        for path in args.paths:
            best = min(times[path])
            row[f"{path}_s"] = round(best, 2)
            row[f"{path}_gflops"] = round(flops / best / 1e9, 2)
            row[f"{path}_fraction"] = round(flops / best / 1e9 / rate, 3)
        if "baseline" in losses and "new" in losses:
            row["max_loss_diff_new_vs_baseline"] = float(
                (losses["new"] - losses["baseline"]).abs().max()
            )
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"load average {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""GPU check (issue 13): the ladder, the scores and a small ground truth on CUDA against the CPU.

    .venv/bin/python benchmarks/gpu_check.py                   # --device cuda, JSON to stdout
    .venv/bin/python benchmarks/gpu_check.py --out gpu_check.json
    .venv/bin/python benchmarks/gpu_check.py --device cpu      # the whole check, CPU vs CPU

One command, run wherever a CUDA GPU is available. On the digits data
(:func:`curvinf.data.load_dataset`) with a small MLP (:func:`curvinf.models.make_mlp`):

0. an untimed pass of everything below at tiny sizes (one-off initialisation);
1. ground truth: :func:`curvinf.groundtruth.ground_truth` with a few subsets and seeds,
   in a temporary directory, once with ``device="cpu"`` and once on the device (its base
   model and every retrained model trained there, float32 as always);
2. for every rung of :data:`curvinf.LADDER`: :func:`curvinf.fit_curvature` (float64 copy of
   the CPU ground truth's trained base model, the same model moved to the device), its
   inverse (``Regularization()``, an eigendecomposition) and
   :func:`curvinf.influence_scores` of the queries, on both devices;
3. LDS of every rung's scores against each device's own ground truth.

Each stage is timed on both devices (``torch.cuda.synchronize`` before each clock read)
after a warm-up, and compared with a stated tolerance:

- ``rung``: ``‖C_dev − C_cpu‖_F / ‖C_cpu‖_F <= 1e-10`` of the dense matrices (float64: the
  same sums in another order differ by ~1e-15 relative);
- ``scores``: ``‖S_dev − S_cpu‖_F / ‖S_cpu‖_F <= 1e-8`` (float64; the inverse amplifies
  rounding by up to ``λ_max / δ`` with damping ``δ = 1e-3``);
- ground truth (float32 retraining, where CPU and CUDA kernels round differently and
  training amplifies it over the steps): the base model's training loss within
  ``1e-3`` relative, the retrained models' measurements within ``1e-2`` of their mean
  magnitude (max over models and queries), and every rung's LDS within ``0.02``.

Without CUDA here, ``--device cuda`` (the default) or ``auto`` says so and exits 0, so the
command is safe to run anywhere; ``--device cpu`` runs the whole check CPU against CPU (a
dry run: every comparison then holds exactly). The exit status is 1 when a tolerance is
missed. The JSON holds the settings, the machine and every stage's times and errors.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvinf import LADDER, GroundTruthConfig, Regularization, fit_curvature, influence_scores
from curvinf.data import DataSplit, load_dataset
from curvinf.devices import describe_device, model_on, resolve_device
from curvinf.groundtruth import RetrainingWarning, ground_truth
from curvinf.lds import lds
from curvinf.training import TrainingRecipe

TOLERANCES = {
    "rung": 1e-10,
    "scores": 1e-8,
    "base_loss": 1e-3,
    "measurements": 1e-2,
    "lds": 0.02,
}
"""Stated tolerances of every comparison (module doc)."""


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timing CUDA needs it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall seconds on ``device`` (synchronised before both clock reads)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖_F / ‖b‖_F`` in float64 on the CPU (``‖a‖`` when ``b`` is zero)."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    scale = float(b.norm()) or 1.0
    return float((a - b).norm()) / scale


def warm_up(device: torch.device) -> None:
    """Start the device (CUDA context, cuBLAS / cuSOLVER handles) before anything is timed."""
    a = torch.randn(64, 64, dtype=torch.float64, device=device)
    torch.linalg.eigh(a @ a.T)
    (a.float() @ a.float()).sum().item()
    sync(device)


def small_data(n_train: int, queries: int) -> DataSplit:
    """Digits, the first ``n_train`` training points (0: all) and ``queries`` queries."""
    data = load_dataset("digits", seed=0)
    n = n_train or len(data.X_train)
    return replace(
        data,
        X_train=data.X_train[:n],
        y_train=data.y_train[:n],
        X_query=data.X_query[:queries],
        y_query=data.y_query[:queries],
    )


def run_check(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Every stage on the CPU and on ``device``: times, errors, verdicts (module doc), after
    one untimed pass of the whole check at tiny sizes (lazy initialisation, first calls of
    ``torch.func`` transforms, CUDA kernels loading: one-off costs, not the stages')."""
    tiny = {"n_train": 64, "queries": 4, "epochs": 1, "subsets": 2, "seeds": 1}
    measure(argparse.Namespace(**{**vars(args), **tiny}), device)
    return measure(args, device)


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """:func:`run_check`'s pass at ``args``' sizes."""
    cpu = torch.device("cpu")
    data = small_data(args.n_train, args.queries)
    loss = nn.CrossEntropyLoss()
    config = GroundTruthConfig(
        depth=args.depth,
        width=args.width,
        recipe=TrainingRecipe(epochs=args.epochs, batch_size=args.batch_size),
        num_subsets=args.subsets,
        num_seeds=args.seeds,
    )
    stages: list[dict[str, Any]] = []

    def record(stage: str, cpu_s: float, dev_s: float, metric: str, error: float) -> None:
        tol = TOLERANCES[metric]
        stages.append(
            {
                "stage": stage,
                "cpu_s": round(cpu_s, 4),
                "device_s": round(dev_s, 4),
                "metric": metric,
                "error": error,
                "tolerance": tol,
                "ok": bool(error <= tol),
            }
        )

    sides = (("cpu", cpu), ("device", device))  # the same device twice for the dry run
    warm_up(device)
    gts, gt_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for side, where in sides:
            gts[side], gt_s[side] = timed(
                where,
                lambda side=side, where=where: ground_truth(
                    data, config, Path(tmp) / side, progress=False, log=lambda msg: None,
                    device=where,
                ),
            )  # fmt: skip
    base_cpu = gts["cpu"].base["train_loss"]
    base_err = abs(gts["device"].base["train_loss"] - base_cpu) / abs(base_cpu)
    meas = float((gts["device"].measurements - gts["cpu"].measurements).abs().max())
    meas /= float(gts["cpu"].measurements.abs().mean())
    record("ground truth: base model", gt_s["cpu"], gt_s["device"], "base_loss", base_err)
    record("ground truth: retrained models", gt_s["cpu"], gt_s["device"], "measurements", meas)

    base = gts["cpu"].base_model(data)  # one trained model for both devices' fits
    inputs = {
        "cpu": (base, data),
        "device": (model_on(base, device), data.to(device=device)),
    }
    reg = Regularization()
    for rung in args.rungs:
        dense, scores, fit_s, score_s = {}, {}, {}, {}
        for side, where in sides:
            model, split = inputs[side]
            curv, fit_s[side] = timed(
                where,
                lambda model=model, split=split, rung=rung: fit_curvature(
                    rung, model, loss, *split.train, progress=False
                ),
            )
            dense[side] = curv.dense()
            scores[side], score_s[side] = timed(
                where,
                lambda curv=curv, model=model, split=split: influence_scores(
                    model, loss, curv.inverse(reg), train=split.train, query=split.query,
                    progress=False,
                ),
            )  # fmt: skip
            if scores[side].device != where:
                raise AssertionError(f"{rung} scores came back on {scores[side].device}")
        err = relative_error(dense["device"], dense["cpu"])
        record(f"fit {rung}", fit_s["cpu"], fit_s["device"], "rung", err)
        err = relative_error(scores["device"], scores["cpu"])
        record(f"inverse + scores {rung}", score_s["cpu"], score_s["device"], "scores", err)
        lds_of = {
            side: lds(scores[side], gts[side].masks, gts[side].truth, num_bootstrap=0).mean
            for side, _ in sides
        }
        record(f"LDS {rung}", 0.0, 0.0, "lds", abs(lds_of["device"] - lds_of["cpu"]))
        stages[-1].update(lds_cpu=lds_of["cpu"], lds_device=lds_of["device"])
    return {
        "device": describe_device(device),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "device")},
        "num_params": sum(p.numel() for p in base.parameters()),
        "tolerances": TOLERANCES,
        "stages": stages,
        "ok": all(s["ok"] for s in stages),
    }


def table(result: dict[str, Any]) -> str:
    """The stages as a plain-text table."""
    head = f"{'stage':40} {'cpu s':>9} {'device s':>9} {'speed-up':>8} {'error':>10} {'tol':>8}  ok"
    lines = [f"CPU vs {result['device']} (torch {result['torch']}, CUDA {result['cuda']})", head]
    for s in result["stages"]:
        speed = f"{s['cpu_s'] / s['device_s']:.1f}x" if s["device_s"] else ""
        lines.append(
            f"{s['stage']:40} {s['cpu_s']:9.3f} {s['device_s']:9.3f} {speed:>8} "
            f"{s['error']:10.2e} {s['tolerance']:8.0e}  {'yes' if s['ok'] else 'NO'}"
        )
    lines.append("all within tolerance" if result["ok"] else "TOLERANCE MISSED")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, auto or cpu")
    p.add_argument("--out", default="", help="also write the JSON here")
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--epochs", type=int, default=20, help="epochs of every training run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-train", type=int, default=0, help="training points (0: all 1,437)")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--subsets", type=int, default=20, help="LDS subsets M")
    p.add_argument("--seeds", type=int, default=2, help="retraining seeds R per subset")
    p.add_argument("--rungs", type=lambda s: tuple(s.split(",")), default=LADDER)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device.strip().lower() in ("cuda", "auto") or args.device.startswith("cuda:"):
        if not torch.cuda.is_available():
            print(
                f"gpu_check: no CUDA GPU available here (torch {torch.__version__}, "
                "torch.cuda.is_available() is False); nothing to compare. Run it on a machine "
                "with a CUDA GPU, or with --device cpu for the CPU-vs-CPU dry run.",
                file=sys.stderr,
            )
            return 0
    try:
        device = resolve_device(args.device)
    except (ValueError, TypeError) as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RetrainingWarning)  # a small ground truth, on purpose
        result = run_check(args, device)
    print(table(result), file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

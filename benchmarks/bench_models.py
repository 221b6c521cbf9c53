"""Exact rungs beyond MLPs: an MLP, a CNN and a transformer at about equal D (issue 12, item 5).

Times ``fit_curvature(method, ...)`` (``.dense()`` not included: the fit returns the
dense blocks) for the exact rungs ``hessian``, ``ggn``, ``block_hessian`` and
``block_ggn`` on three models of D ≈ 1.9k–2.4k parameters and N = 600 examples:

(a) ``mlp``: ``make_mlp(64, 10, depth=2, width=24)``, D = 2,410, digits (N, 64);
(b) ``cnn``: ``Conv2d(1, 8, 3, p=1) -> ReLU -> Conv2d(8, 16, 3, s=2, p=1) -> ReLU ->
    AvgPool2d(2) -> Flatten -> Linear(64, 10)``, D = 1,898, digits as (N, 1, 8, 8);
(c) ``transformer``: integer tokens (N, 8) over a vocabulary of 16, token and position
    embeddings (d = 20), one single-head self-attention block written with
    ``nn.Linear`` projections and plain matmuls, a residual and a ``LayerNorm``, a
    ``Linear`` head on the last position (10 classes: the sum of the tokens mod 10),
    D = 2,410.

Each model is trained briefly (so the curvature is not that of a random
initialisation), then every rung is timed (best of ``--repeat``) and reported with
its ratio to the MLP's at the same rung and per D² (the dense rungs cost O(N D²) at
best, so ``s / D²`` compares models of slightly different D).

Run from the repository root::

    .venv/bin/python benchmarks/bench_models.py                # all models, all rungs
    .venv/bin/python benchmarks/bench_models.py --models cnn --methods hessian --profile

``--profile`` prints the top of a ``cProfile`` of the first timed call per (model,
rung) (sorted by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import platform
import pstats
import sys
import time
from pathlib import Path

import torch
from torch import nn

from curvinf import TrainingRecipe, fit_curvature, load_dataset, make_mlp, train

METHODS = ("hessian", "ggn", "block_hessian", "block_ggn")
MODELS = ("mlp", "cnn", "transformer")


def small_cnn(channels: tuple[int, int] = (8, 16), classes: int = 10) -> nn.Sequential:
    """(N, 1, 8, 8) images -> (N, 10): two convolutions, average pooling, a linear head.

    conv1 (1 -> 8, 3x3, padding 1): T = 64 output positions, 80 parameters;
    conv2 (8 -> 16, 3x3, stride 2, padding 1): T = 16, 1,168 parameters;
    head (64 -> 10): 650 parameters. D = 1,898. A plain ``nn.Sequential``.
    """
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 4, classes),
    )


class TinyTransformer(nn.Module):
    """Tokens (N, T) -> logits (N, C) of the last position (or (N, T, C) with ``all_positions``).

    ``h = E[x] + P``; single-head attention ``a = softmax(q kᵀ / √d) v`` with
    ``q, k, v = h W_qᵀ + b_q, ...`` (``nn.Linear``) and plain matmuls; ``u = LayerNorm(h +
    o(a))``; logits ``head(u)``. d = 20, vocabulary 16, T = 8, C = 10: D = 2,410.
    """

    def __init__(
        self,
        vocab: int = 16,
        length: int = 8,
        d: int = 20,
        classes: int = 10,
        all_positions: bool = False,
    ) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(length, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        self.all_positions = all_positions
        self.register_buffer("positions", torch.arange(length), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos(self.positions)
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        u = self.norm(h + self.o(att @ v))
        return self.head(u if self.all_positions else u[:, -1])


def make_problem(name: str, n: int, seed: int, epochs: int):
    """``(model, loss, X, y)``, the model trained ``epochs`` epochs on the ``n`` examples."""
    torch.manual_seed(seed)
    loss = nn.CrossEntropyLoss()
    if name in ("mlp", "cnn"):
        data = load_dataset("digits", seed=seed)
        X, y = data.train
        X, y = X[:n], y[:n]
        if name == "mlp":
            model = make_mlp(64, 10, depth=2, width=24, seed=seed)
        else:
            model, X = small_cnn(), X.reshape(-1, 1, 8, 8)
    elif name == "transformer":
        g = torch.Generator().manual_seed(seed)
        X = torch.randint(0, 16, (n, 8), generator=g)
        y = X.sum(1) % 10
        model = TinyTransformer()
    else:
        raise ValueError(name)
    recipe = TrainingRecipe(epochs=epochs, lr=0.05, seed=seed)
    model = train(model, loss, X, y, recipe).model
    return model.eval(), loss, X, y


def timed(fn, repeat: int):
    """(best wall s, CPU s of that call, result of the last call)."""
    best, cpu, out = float("inf"), float("nan"), None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall = time.perf_counter() - t
        if wall < best:
            best, cpu = wall, time.process_time() - c
    return best, cpu, out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--n", type=int, default=600, help="training examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--chunk", type=int, default=256, help="chunk_size of the fits")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", action="store_true", help="cProfile the first call of each")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}; "
        f"command: {' '.join(sys.argv)}",
        flush=True,
    )
    rows = []
    for name in args.models.split(","):
        model, loss, X, y = make_problem(name, args.n, args.seed, args.epochs)
        D = sum(p.numel() for p in model.parameters())
        print(f"[{name}] D = {D:,}, N = {len(X)}, X {tuple(X.shape)} {X.dtype}", flush=True)
        for method in args.methods.split(","):

            def fit(method=method, model=model, loss=loss, X=X, y=y):
                return fit_curvature(
                    method, model, loss, X, y, chunk_size=args.chunk, progress=False
                )

            if args.profile:
                prof = cProfile.Profile()
                prof.runcall(fit)
                print(f"--- profile {name} {method}")
                pstats.Stats(prof).sort_stats("tottime").print_stats(12)
            wall, cpu, _ = timed(fit, args.repeat)
            rows.append({"model": name, "D": D, "method": method, "s": wall, "cpu_s": cpu})
            print(f"[{name}] {method}: {wall:.2f}s (CPU {cpu:.1f}s)", flush=True)
    mlp = {r["method"]: r for r in rows if r["model"] == "mlp"}
    print("\n| model | D | rung | s (CPU s) | vs MLP | vs MLP per D² |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        ref = mlp.get(r["method"])
        ratio = r["s"] / ref["s"] if ref else float("nan")
        per_d2 = ratio * (ref["D"] / r["D"]) ** 2 if ref else float("nan")
        r |= {"vs_mlp": ratio, "vs_mlp_per_d2": per_d2}
        print(
            f"| {r['model']} | {r['D']:,} | {r['method']} | {r['s']:.2f} ({r['cpu_s']:.1f}) "
            f"| {ratio:.1f}x | {per_d2:.1f}x |"
        )
    out = {"args": vars(args) | {"json": str(args.json)}, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()

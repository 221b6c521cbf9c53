"""The Gram route's truncated inverse with the full ``eigh`` against the certified partial
eigendecomposition (:mod:`curvinf.curvature.partial_eigh`), in one process.

A trained MLP (depth ``--depth``, width ``--width``, ``--epochs`` of SGD on the first
``--n`` digits training examples, so ``R = 9 n`` Gram rows) and its block-GGN or GGN
under ``Regularization.paper()`` (truncation at ε = 1e-4, no damping), which keeps the
Gram eigenvalues above 1e-4 only. The inverse is built twice, ``Gram(partial_eigh=0)``
(every block by ``torch.linalg.eigh``) and ``Gram(partial_eigh=inf)`` (every block by
``eigenpairs_above``), best of ``--repeat``; the scores of ``--queries`` query examples
against every training example must agree to 1e-8 relative (the two routes differ in how
the eigenvectors near the threshold round). Prints seconds, the speed-up, how many
eigenpairs each block keeps and the flop model's predicted cost ratio. Run from the
repository root::

    .venv/bin/python benchmarks/bench_partial_eigh.py --n 500 --epochs 100 --threads 1
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

from curvinf import Regularization, influence_scores, load_dataset, make_mlp
from curvinf.curvature import Gram, matrix_free
from curvinf.curvature.partial_eigh import predicted_ratio
from curvinf.curvature.regularization import TruncationWarning
from curvinf.training import TrainingRecipe, train


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=500, help="training examples (R = 9 n)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--method", default="block_ggn", choices=["ggn", "block_ggn"])
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("digits", seed=0)
    X, y = data.X_train[: args.n], data.y_train[: args.n]
    loss = torch.nn.CrossEntropyLoss()
    base = make_mlp(64, 10, depth=args.depth, width=args.width, seed=0)
    t0 = time.perf_counter()
    model = train(base, loss, X, y, TrainingRecipe(lr=0.01, epochs=args.epochs)).model
    train_s = time.perf_counter() - t0
    curv = matrix_free(args.method, model, loss, X, y)
    reg = Regularization.paper()
    query = (data.X_query[: args.queries], data.y_query[: args.queries])
    out: dict[str, float] = {}
    scores, kept = {}, []
    for name, solver in (
        ("eigh", Gram(progress=False, partial_eigh=0)),
        ("partial", Gram(progress=False, partial_eigh=math.inf)),
    ):
        best = math.inf
        for _ in range(args.repeat):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TruncationWarning)
                t = time.perf_counter()
                inv = curv.inverse(reg, solver=solver)
                best = min(best, time.perf_counter() - t)
        out[name] = best
        if name == "partial":
            kept = [int(s.numel()) for s in inv.eigenvalues]
            assert inv.partial_blocks == len(kept), "a block fell back to the full eigh"
        scores[name] = influence_scores(
            model, loss, inv, train=(X, y), query=query, progress=False
        ).double()
    ref = scores["eigh"]
    rel = float((scores["partial"] - ref).norm() / ref.norm())
    R = 9 * args.n
    predicted = [round(predicted_ratio(R, k), 2) for k in kept]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.method} of a "
        f"{args.depth} x {args.width} MLP, {args.epochs} epochs ({train_s:.0f} s), R = {R:,}\n"
        f"kept eigenpairs per block: {kept}; predicted cost ratio per block: {predicted}\n"
        f"inverse built: full eigh {out['eigh']:.1f} s, partial {out['partial']:.1f} s "
        f"({out['eigh'] / out['partial']:.2f}x); scores differ by {rel:.1e} relative"
    )
    if rel > 1e-8:
        raise SystemExit("the partial eigendecomposition changed the scores")
    return out


if __name__ == "__main__":
    main()

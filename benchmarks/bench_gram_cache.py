"""What a resumed study saves by keeping the Gram route's factorisations on disk.

An MLP on ``--n`` digits examples (``R = 9 n`` Gram rows): the truncated GGN inverse
(``Regularization.paper()``, an ``eigh`` of the R x R Gram matrix) built three ways in one
process, best of ``--repeat``:

- ``plain``: ``Gram()``, nothing kept (what every resume did before);
- ``cold``: ``Gram(cache=folder)`` on an empty folder (eigh + digest + write);
- ``warm``: ``Gram(cache=folder)`` again, as a resumed process does (digest + read,
  memory-mapped).

It checks that ``cold`` and ``warm`` give the same scores bit for bit (a resumed run and
an uninterrupted one, both with the cache, agree exactly) and ``plain`` the same to 1e-12
relative (products with the file-backed factor round differently in the last bits), and
prints seconds and the file size. Run from the repository root::

    .venv/bin/python benchmarks/bench_gram_cache.py --n 700
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from curvinf import Regularization, influence_scores, load_dataset, make_mlp
from curvinf.curvature import Gram, matrix_free


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=700, help="training examples (R = 9 n)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("digits", seed=0)
    X, y = data.X_train[: args.n], data.y_train[: args.n]
    model = make_mlp(64, 10, depth=2, width=32, seed=0)
    loss = torch.nn.CrossEntropyLoss()
    ggn = matrix_free("ggn", model, loss, X, y)
    reg = Regularization.paper()
    folder = Path(tempfile.mkdtemp(prefix="gram-cache-"))
    out: dict[str, float] = {}
    scores = {}
    for name, solver in (
        ("plain", Gram(progress=False)),
        ("cold", Gram(progress=False, cache=str(folder))),
        ("warm", Gram(progress=False, cache=str(folder))),
    ):
        best = float("inf")
        for _ in range(args.repeat if name != "cold" else 1):
            t = time.perf_counter()
            inv = ggn.inverse(reg, solver=solver)
            best = min(best, time.perf_counter() - t)
        out[name] = best
        scores[name] = influence_scores(
            model, loss, inv, train=(X, y), query=(data.X_query[:50], data.y_query[:50]),
            progress=False,
        )  # fmt: skip
    same = torch.equal(scores["cold"], scores["warm"])
    ref = scores["plain"]
    rel = float((scores["warm"] - ref).abs().max() / ref.abs().max())
    size = sum(f.stat().st_size for f in folder.glob("*.pt"))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; R = {9 * args.n:,}\n"
        f"inverse built: plain {out['plain']:.1f} s, cold cache {out['cold']:.1f} s, "
        f"warm cache {out['warm']:.2f} s ({out['plain'] / out['warm']:.0f}x); "
        f"file {size / 2**20:.0f} MiB; cold = warm bit for bit: {same}; "
        f"warm vs plain: {rel:.1e} relative"
    )
    if not same or rel > 1e-12:
        raise SystemExit("the cached factorisation changed the scores")
    return out


if __name__ == "__main__":
    main()

"""A small scoring demo: every rung of the ladder on one MLP, compared with the Hessian."""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr
from torch import nn

from curvinf import (
    METHODS,
    Regularization,
    TrainingRecipe,
    fit_curvature,
    influence_scores,
    load_dataset,
    make_mlp,
    train,
)
from curvinf.devices import DeviceSpec, describe_device, resolve_device


def run_demo(
    depth: int = 2,
    width: int = 32,
    epochs: int = 50,
    seed: int = 0,
    device: DeviceSpec = "cpu",
) -> None:
    """Train, fit every rung, score 50 queries and print a table; all on ``device``."""
    console = Console()
    where = resolve_device(device)
    data = load_dataset("digits", seed=seed).to(device=where)
    loss = nn.CrossEntropyLoss()
    model = make_mlp(data.num_features, data.num_outputs, depth=depth, width=width, seed=seed)
    recipe = TrainingRecipe(epochs=epochs, seed=seed)
    result = train(model, loss, *data.train, recipe, device=where)
    console.print(
        f"trained depth={depth} width={width} MLP for {epochs} epochs on "
        f"{describe_device(where)}: final train loss {result.final_loss:.4f}"
    )
    query = (data.X_query[:50], data.y_query[:50])
    scores: dict[str, torch.Tensor] = {}
    table = Table(title="influence scores per rung (50 queries x all training points)")
    for col in ("rung", "fit+score s", "Spearman vs hessian", "rank kept"):
        table.add_column(col)
    for method in METHODS:
        t0 = time.perf_counter()
        curv = fit_curvature(method, result.model, loss, *data.train)
        inv = curv.inverse(Regularization())
        scores[method] = influence_scores(result.model, loss, inv, train=data.train, query=query)
        took = time.perf_counter() - t0
        pair = [scores[m].flatten().numpy(force=True) for m in ("hessian", method)]
        rho = spearmanr(*pair).statistic
        table.add_row(method, f"{took:.2f}", f"{rho:.3f}", str(inv.rank))
    console.print(table)

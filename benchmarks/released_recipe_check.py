"""Independent check, in plain PyTorch (no curvinf code): does the authors' released recipe
train the paper's MLPs on UCI digits?

The recipe of ``SteveHong1901/Hessian`` (``scripts/train.py``, ``training/trainer.py``,
``training/models.py``): a 90/10 split standardised on the training part, ``nn.Linear`` +
GELU layers at PyTorch's default initialisation (``create_mlp`` never calls
``initialize_weights``), SGD lr 0.01 with momentum 0.9, batch 32 (``drop_last``), cosine
annealing to 1e-8 over the epochs. Prints the final training loss per (depth, width,
epochs, seed); chance (predicting the label frequencies) is about ln 10 = 2.303.

    .venv/bin/python benchmarks/released_recipe_check.py 4,32,10 8,64,10 8,32,100 1,32,10
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.preprocessing import StandardScaler
from torch import nn


def final_train_loss(depth: int, width: int, epochs: int, seed: int) -> float:
    """The released recipe's training loss after ``epochs`` (module doc)."""
    X, y = load_digits(return_X_y=True)
    perm = np.random.RandomState(0).choice(len(X), len(X), replace=False)
    k = int(len(X) * 0.9)
    Xtr = torch.tensor(StandardScaler().fit_transform(X[perm[:k]]), dtype=torch.float32)
    ytr = torch.tensor(y[perm[:k]])
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    fan_in = 64
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.GELU()]
        fan_in = width
    model = nn.Sequential(*layers, nn.Linear(fan_in, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=1e-8)
    loss_fn = nn.CrossEntropyLoss()
    data = torch.utils.data.TensorDataset(Xtr, ytr)
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, drop_last=True)
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        return float(loss_fn(model(Xtr), ytr))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="depth,width,epochs triples")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for text in args.configs:
        depth, width, epochs = map(int, text.split(","))
        losses = [final_train_loss(depth, width, epochs, s) for s in range(args.seeds)]
        shown = ", ".join(f"{v:.4f}" for v in losses)
        print(f"d{depth} w{width} e{epochs}: training loss {shown}")


if __name__ == "__main__":
    main()

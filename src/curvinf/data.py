"""Datasets that ship with scikit-learn, split and standardised reproducibly.

UCI digits: 1,797 images of 8x8 pixels (64 features), 10 classes.
Diabetes: 442 patients, 10 features, one regression target.
Majority: 1,000 sequences of 8 tokens drawn uniformly from a vocabulary of 8 (seed 0,
fixed), each labelled with its most frequent token (ties: the smallest); no download (the
transformer study's task: a model must pool over positions, which attention does).
Modular addition, the interpretability standard, was tried first and rejected: on its 529
pairs (p = 23) a small transformer stays at chance on held-out pairs for hundreds of
epochs (grokking needs thousands), so its LDS would measure noise.
Real features are standardised with statistics of the training part only; token ids
stay integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from curvinf.validation import check_choice

DATASETS = ("digits", "diabetes", "majority")

MAJORITY = {"num_sequences": 1000, "length": 8, "vocab": 8}
"""The ``majority`` dataset's size, sequence length and vocabulary (= classes)."""

DATASET_SHAPES = {
    "digits": (1797, 10),
    "diabetes": (442, 1),
    "majority": (MAJORITY["num_sequences"], MAJORITY["vocab"]),
}
"""Each dataset's ``(examples, model outputs)``, known without loading it."""


def train_count(n: int, query_fraction: float) -> int:
    """How many of ``n`` examples a split trains on: ``floor((1 - query_fraction) * n)``."""
    return int(math.floor((1.0 - query_fraction) * n))


@dataclass(frozen=True)
class DataSplit:
    """A train/query split. ``y`` is (N,) int64 for classification, (N, 1) for regression."""

    name: str
    task: str  # "classification" | "regression"
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_query: torch.Tensor
    y_query: torch.Tensor
    seed: int

    @property
    def num_features(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def num_outputs(self) -> int:
        if self.task == "classification":
            return int(max(self.y_train.max(), self.y_query.max())) + 1
        return int(self.y_train.shape[1])

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.X_train, self.y_train

    @property
    def query(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.X_query, self.y_query

    def to(
        self, dtype: torch.dtype | None = None, *, device: torch.device | str | None = None
    ) -> DataSplit:
        """Features (and regression targets) cast to ``dtype``, every tensor moved to
        ``device`` (either may be None: unchanged). Labels stay integer."""
        cast_y = self.task == "regression" and dtype is not None

        def move(t: torch.Tensor, cast: bool) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if cast else None)

        return DataSplit(
            self.name,
            self.task,
            move(self.X_train, dtype is not None),
            move(self.y_train, cast_y),
            move(self.X_query, dtype is not None),
            move(self.y_query, cast_y),
            self.seed,
        )


def load_dataset(
    name: str = "digits",
    *,
    query_fraction: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> DataSplit:
    """Load a bundled dataset and split it into train and query parts.

    The split is a seeded permutation; ``floor((1 - query_fraction) * n)``
    examples train, the rest are queries (digits: 1,437 train, 360 query at
    the default).
    """
    from sklearn import datasets

    check_choice("dataset", name, DATASETS)
    if not 0.0 < query_fraction < 1.0:
        raise ValueError(f"query_fraction must lie in (0, 1), got {query_fraction}.")
    if name == "digits":
        X, y = datasets.load_digits(return_X_y=True)
        task = "classification"
    elif name == "majority":
        X, y = majority_sequences(**MAJORITY)
        task = "classification"
    else:
        X, y = datasets.load_diabetes(return_X_y=True)
        task = "regression"
    return split_dataset(name, task, X, y, query_fraction=query_fraction, seed=seed, dtype=dtype)


def majority_sequences(
    num_sequences: int, length: int, vocab: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (num_sequences, length) int64 drawn uniformly from ``[0, vocab)``, and each
    row's most frequent token (num_sequences,) (ties: the smallest)."""
    X = np.random.default_rng(seed).integers(0, vocab, (num_sequences, length))
    counts = np.stack([(X == v).sum(1) for v in range(vocab)], axis=1)
    return X.astype(np.int64), counts.argmax(1)


def split_dataset(
    name: str,
    task: str,
    X: np.ndarray,
    y: np.ndarray,
    *,
    query_fraction: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> DataSplit:
    """Split arrays ``X`` (n, F), ``y`` (n,) into train and query parts, as every dataset is.

    A seeded permutation; ``floor((1 - query_fraction) * n)`` examples train, the rest are
    queries. Integer ``X`` (token ids) is kept as int64; real features are standardised
    with the training part's statistics (constant features keep scale 1); regression
    targets likewise, as an (n, 1) column; classification labels stay integer classes.
    """
    n = len(X)
    perm = np.random.default_rng(seed).permutation(n)
    n_query = n - train_count(n, query_fraction)
    q_idx, tr_idx = np.sort(perm[:n_query]), np.sort(perm[n_query:])
    tokens = np.issubdtype(X.dtype, np.integer)
    if not tokens:
        X = X.astype(np.float64)
        mean, std = X[tr_idx].mean(0), X[tr_idx].std(0)
        std[std == 0] = 1.0
        X = (X - mean) / std
    # on the CPU; move a split with DataSplit.to(device=...)
    if task == "classification":
        y_t = torch.as_tensor(y, dtype=torch.long, device="cpu")
    else:
        y = y.astype(np.float64)
        y = (y - y[tr_idx].mean()) / y[tr_idx].std()
        y_t = torch.as_tensor(y, dtype=dtype, device="cpu")[:, None]
    X_t = torch.as_tensor(X, dtype=torch.long if tokens else dtype, device="cpu")
    return DataSplit(name, task, X_t[tr_idx], y_t[tr_idx], X_t[q_idx], y_t[q_idx], seed)

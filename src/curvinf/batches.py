"""Training data as batches: a ``DataLoader`` (or any re-iterable of ``(X, y)`` pairs) in
place of one ``(X, y)`` pair of tensors, for data that do not fit in one tensor.

``fit_curvature(method, model, loss, loader)`` and ``influence_scores(..., train=loader)``
read the batches as they come, so memory holds one batch (and what the route keeps:
factors, dense blocks, the score matrix) rather than the whole training set. The batches
are read once to count the examples, then once per pass the route makes (K-FAC: one;
EK-FAC: two, unless the captures fit the cache; GGN / Hessian: one per block set). Every
pass must yield the same examples in the same order for the numbers to equal the tensor
route's; a shuffling loader changes only the order of the sums (and, with
``fisher="mc"``, which labels are drawn for which example).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch


def is_batches(data: Any) -> bool:
    """Whether ``data`` is a source of batches rather than a tensor or an ``(X, y)`` pair."""
    if torch.is_tensor(data) or isinstance(data, (str, bytes)):
        return False
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(map(torch.is_tensor, data)):
        return False
    return isinstance(data, Iterable)


def _pair(item: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if (
        not isinstance(item, (tuple, list))
        or len(item) != 2
        or not all(torch.is_tensor(t) for t in item)
    ):
        raise TypeError(
            f"batch {index} is a {type(item).__name__}, not an (X, y) pair of tensors; a "
            "DataLoader over TensorDataset(X, y) yields those."
        )
    return item[0], item[1]


class Batches:
    """A validated, re-iterable source of ``(X, y)`` batches with ``n`` examples in all.

    Refused with a message: a one-shot iterator (it could not be read twice), an empty
    source, a batch that is not an ``(X, y)`` pair of tensors, batches whose example shape
    or dtypes differ from the first batch's.
    """

    def __init__(self, source: Iterable, name: str = "training data") -> None:
        if iter(source) is source:
            raise TypeError(
                f"{name} is a one-shot iterator ({type(source).__name__}), which cannot be "
                "read once per pass; pass a DataLoader, a list of (X, y) batches, or tensors."
            )
        self.source, self.name = source, name
        first = next(iter(source), None)
        if first is None:
            raise ValueError(f"{name} yielded no batch; it must hold at least one example.")
        self.first = _pair(first, 0)
        self.n = sum(len(x) for x, _ in self)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        X0, y0 = self.first
        for i, item in enumerate(self.source):
            X, y = _pair(item, i)
            if X.shape[1:] != X0.shape[1:] or X.dtype != X0.dtype or y.dtype != y0.dtype:
                raise ValueError(
                    f"{self.name}: batch {i} has X {tuple(X.shape)} {X.dtype}, y {y.dtype}, "
                    f"but batch 0 has X {tuple(X0.shape)} {X0.dtype}, y {y0.dtype}; every "
                    "batch must hold examples of one shape and dtype."
                )
            if len(X) != len(y):
                raise ValueError(
                    f"{self.name}: batch {i} has {len(X)} inputs but {len(y)} targets."
                )
            yield X, y


__all__ = ["Batches", "is_batches"]

"""A block-diagonal rung assembled from rungs fitted on disjoint parameter subsets.

A block rung (block-GGN, block-Hessian) is ``C = blockdiag(C_1, …, C_B)``, so any
partition of its blocks into groups ``g`` gives ``C = blockdiag(C_g)`` and

    C⁺ = blockdiag(C_g⁺),    G_q C⁺ G_trᵀ = Σ_g G_q[:, I_g] C_g⁺ G_tr[:, I_g]ᵀ

(the regulariser's rule acts eigenvalue by eigenvalue; a relative threshold needs the
largest eigenvalue of all groups, so only absolute thresholds compose). Each group is
fitted on a copy of the model whose other parameters are frozen (curvinf
differentiates trainable parameters only), so each group may take its own route: small
blocks dense, large ones through the Gram matrix. The study uses this where the whole
block rung does not fit densely (:mod:`curvinf.study.rungs`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from curvinf.curvature.operators import (
    Curvature,
    InverseOperator,
    InverseReport,
    ScoringTask,
    as_rows,
)
from curvinf.curvature.regularization import Regularization
from curvinf.params import evaluation_copy


@dataclass
class Part:
    """One group: its positions ``index`` in the full θ, the frozen-elsewhere model copy it
    was fitted on, and its fitted rung."""

    index: torch.Tensor
    model: nn.Module
    curvature: Curvature


def frozen_except(model: nn.Module, names: set[str]) -> nn.Module:
    """A copy of ``model`` whose trainable parameters are ``names`` (the rest frozen)."""
    out = copy.deepcopy(model)
    for name, p in out.named_parameters():
        p.requires_grad_(name in names)
    return out


class CompositeCurvature:
    """``blockdiag(C_g)`` over :class:`Part`\\ s: ``matvec`` and ``inverse`` by parts."""

    def __init__(self, method: str, parts: list[Part], num_params: int, fingerprint: str) -> None:
        covered = torch.cat([p.index for p in parts])
        if len(covered) != num_params or len(torch.unique(covered)) != num_params:
            raise ValueError("the parts must cover every parameter exactly once.")
        self.method, self.parts, self.num_params = method, parts, num_params
        self.model_fingerprint = fingerprint
        self.is_ggn = all(getattr(p.curvature, "is_ggn", True) for p in parts)
        self.dtype = torch.float64

    @property
    def device(self) -> torch.device:
        """Where the parts' curvatures live (the fitted model's device)."""
        return self.parts[0].curvature.device

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        V2, vector = as_rows(V, self.num_params, "V")
        out = torch.zeros_like(V2, dtype=torch.float64)
        for p in self.parts:
            out[:, p.index] = p.curvature.matvec(V2[:, p.index]).to(torch.float64)
        return out[0] if vector else out

    def inverse(self, reg: Regularization, solvers: list[object | None]) -> CompositeInverse:
        """``blockdiag(C_g⁺)``; ``solvers[g]`` inverts part ``g`` (None: its default)."""
        if reg.relative:
            raise ValueError(
                "a relative threshold needs the largest eigenvalue of every block at once; "
                "composite rungs take absolute thresholds only."
            )
        invs = [
            p.curvature.inverse(reg) if s is None else p.curvature.inverse(reg, solver=s)
            for p, s in zip(self.parts, solvers, strict=True)
        ]
        return CompositeInverse(self, reg, invs)

    def __repr__(self) -> str:
        return f"CompositeCurvature({self.method!r}, parts={[len(p.index) for p in self.parts]})"


class CompositeInverse(InverseOperator):
    """``blockdiag(C_g⁺)``: ``apply`` and all-pairs scores as sums over the parts."""

    def __init__(
        self, curvature: CompositeCurvature, reg: Regularization, parts: list[InverseOperator]
    ) -> None:
        self.curvature = curvature  # type: ignore[assignment]
        self.reg = reg
        self.parts = parts

    @property
    def num_params(self) -> int:
        return self.curvature.num_params

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        V2, vector = as_rows(V, self.num_params, "V")
        out = torch.zeros_like(V2, dtype=torch.float64)
        for p, inv in zip(self.curvature.parts, self.parts, strict=True):
            out[:, p.index] = inv.apply(V2[:, p.index])
        return out[0] if vector else out

    def dense(self) -> torch.Tensor:
        return self.apply(torch.eye(self.num_params, dtype=torch.float64, device=self.device))

    @property
    def report(self) -> InverseReport:
        reports = [inv.report for inv in self.parts]
        ranks = [r.rank for r in reports]
        return InverseReport(
            route="+".join(r.route for r in reports),
            rank=None if any(r is None for r in ranks) else sum(ranks),  # type: ignore[misc]
            solves=[s for r in reports for s in r.solves],
            notes="; ".join(r.notes for r in reports if r.notes),
        )

    @property
    def rank(self) -> int | None:
        return self.report.rank

    def pairwise_scores(self, task: ScoringTask) -> torch.Tensor:
        """``Σ_g G_q[:, I_g] C_g⁺ G_tr[:, I_g]ᵀ``: each part by its own fast route on its
        model copy, else from the full model's gradients restricted to its positions."""
        total = None
        for p, inv in zip(self.curvature.parts, self.parts, strict=True):
            idx = p.index

            def grads(X, y, f, idx=idx):
                return task.gradients(X, y, f)[:, idx]

            sub = ScoringTask(
                evaluation_copy(p.model, torch.float64),
                task.loss_kind,
                task.measure,
                task.train,
                task.query,
                task.chunk_size,
                lambda n: None,
                grads,
            )
            S = inv.pairwise_scores(sub)
            if S is None:
                Xq, yq = task.query
                P = inv.apply(grads(Xq, yq, task.measure))
                Xt, yt = task.train
                S = torch.cat(
                    [
                        P
                        @ grads(Xt[a : a + task.chunk_size], yt[a : a + task.chunk_size], "loss").T
                        for a in range(0, len(Xt), task.chunk_size)
                    ],
                    dim=1,
                )
            total = S if total is None else total + S
        task.advance(len(task.train[0]))
        return total  # type: ignore[return-value]


__all__ = ["CompositeCurvature", "CompositeInverse", "Part", "frozen_except"]

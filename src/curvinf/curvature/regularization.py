"""How any rung is inverted: Tikhonov damping and eigenvalue truncation.

For an eigenvalue ``λ`` of the curvature ``C`` (for K-FAC: a product
``λ_A,i · λ_S,j``; for EK-FAC: a corrected eigenvalue), the regularised
inverse uses

    1 / (λ + δ)   if  λ + δ > τ,      0 otherwise,

with damping ``δ = damping`` and threshold ``τ = eps`` (``relative=False``)
or ``τ = eps · max(λ + δ)`` over the whole curvature (``relative=True``).
This is the released code of the paper: ``eigh(C + δI)``, then a
pseudo-inverse that drops eigenvalues at or below ``τ``. The paper itself
uses ``δ = 0``, ``τ = 1e-4`` absolute, the default here.

Negative curvature (the Hessian away from a minimum) is handled explicitly:
with ``eps > 0`` every eigenvalue ``λ + δ <= τ`` — negative ones included — is
dropped. With ``eps = 0`` no eigenvalue is dropped, so an eigenvalue
``λ + δ`` that is not clearly positive (singular or indefinite curvature) raises
``ValueError`` instead of returning an inverse that explodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Regularization:
    """Damping ``δ >= 0`` and truncation ``eps >= 0`` (absolute or relative to the largest)."""

    damping: float = 0.0
    eps: float = 1e-4
    relative: bool = False

    def __post_init__(self) -> None:
        for name in ("damping", "eps"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Regularization.{name} must be a finite number >= 0, got {v!r}.")
        if self.relative and self.eps >= 1:
            raise ValueError(
                f"relative eps={self.eps} >= 1 would drop every eigenvalue; use eps < 1."
            )

    def threshold(self, max_shifted: float) -> float:
        """τ for a curvature whose largest damped eigenvalue is ``max_shifted``."""
        return self.eps * max_shifted if self.relative else self.eps

    def inverse_eigenvalues(
        self, evals: list[torch.Tensor], *, dim: int | None = None
    ) -> list[torch.Tensor]:
        """Regularised inverse eigenvalues for a curvature given as a list of eigenvalue tensors.

        The threshold is global (the largest eigenvalue over all tensors), so a
        block-diagonal curvature is treated exactly like its dense matrix.
        """
        shifted = [e + self.damping for e in evals]
        max_shifted = max(float(s.max()) for s in shifted if s.numel())
        max_abs = max(float(s.abs().max()) for s in shifted if s.numel())
        dim = dim if dim is not None else sum(int(s.numel()) for s in shifted)
        tau = self.threshold(max_shifted)
        if self.eps == 0:
            tol = dim * torch.finfo(torch.float64).eps * max(max_abs, 1e-300)
            bad = sum(int((s <= tol).sum()) for s in shifted)
            if bad:
                raise ValueError(
                    f"the curvature has {bad} eigenvalue(s) <= {tol:.2e} after damping "
                    f"{self.damping:g} (singular or indefinite), so it has no inverse; set "
                    "Regularization(eps=...) > 0 to drop them (pseudo-inverse) or increase damping."
                )
        return [torch.where(s > tau, 1.0 / s, torch.zeros_like(s)) for s in shifted]

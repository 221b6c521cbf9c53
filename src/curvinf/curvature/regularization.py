"""How any rung is inverted: Tikhonov damping and eigenvalue truncation.

For an eigenvalue ``λ`` of the curvature ``C`` (for K-FAC: a product
``λ_A,i · λ_S,j``; for EK-FAC: a corrected eigenvalue), the regularised
inverse uses

    1 / (λ + δ)   if  λ + δ > τ,      0 otherwise,

with damping ``δ = damping`` and threshold ``τ = eps`` (``relative=False``)
or ``τ = eps · max(λ + δ)`` over the whole curvature (``relative=True``).
This is the released code of the paper: ``eigh(C + δI)``, then a
pseudo-inverse that drops eigenvalues at or below ``τ``. The paper itself
uses ``δ = 0``, ``τ = 1e-4`` absolute: :meth:`Regularization.paper`.

The default, ``δ = 1e-3``, ``τ = 1e-4``, is damping with a guard: for a
positive semi-definite rung (GGN, block-GGN, EK-FAC, K-FAC) every ``λ + δ >= δ > τ``,
so nothing is truncated and it is plain damping; for the indefinite Hessian it
drops the directions with ``λ < τ - δ``, whose ``1/(λ + δ)`` would otherwise
explode. It was chosen from measurements (docs/benchmarks.md "Default
regulariser"): its LDS is higher than the paper's truncation in 43 of 55
(configuration, rung) cells over four datasets and two seeds (paired bootstrap),
and the truncation keeps 13 of 1,058 directions of a well-trained breast-cancer
MLP; no fixed damping is best everywhere.
An inverse that keeps under ``MIN_KEPT_FRACTION`` of its directions warns.

Negative curvature (the Hessian away from a minimum) is handled explicitly:
with ``eps > 0`` every eigenvalue ``λ + δ <= τ`` — negative ones included — is
dropped. With ``eps = 0`` no eigenvalue is dropped, so an eigenvalue
``λ + δ`` that is not clearly positive (singular or indefinite curvature) raises
``ValueError`` instead of returning an inverse that explodes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

MIN_KEPT_FRACTION = 0.03


class TruncationWarning(UserWarning):
    """An inverse keeps so few eigen-directions that it discards most of the curvature."""


@dataclass(frozen=True)
class Regularization:
    """Damping ``δ >= 0`` and truncation ``eps >= 0`` (absolute or relative to the largest).

    Default: ``damping=1e-3, eps=1e-4`` (module doc); the paper's rule is
    :meth:`paper`.
    """

    damping: float = 1e-3
    eps: float = 1e-4
    relative: bool = False

    @classmethod
    def paper(cls) -> Regularization:
        """The paper's rule: truncation at ``1e-4`` (absolute), no damping."""
        return cls(damping=0.0, eps=1e-4)

    def truncates_nonnegative(self) -> bool:
        """Whether the rule can drop an eigenvalue ``λ >= 0`` (else it is plain damping for a
        positive semi-definite curvature: ``λ + δ >= δ > eps``)."""
        return self.eps > 0 and (self.relative or self.eps >= self.damping)

    def nonnegative_cutoff(self) -> float | None:
        """``t > 0`` when the rule keeps exactly the eigenvalues ``λ > t`` of a positive
        semi-definite curvature (an absolute truncation above the damping: ``λ + δ > ε``
        with ``t = ε − δ``), so the eigenpairs above ``t`` are all its inverse needs; else
        ``None`` (damping only, a relative threshold, or ``ε = δ``, which keeps every
        positive eigenvalue)."""
        t = self.eps - self.damping
        return None if self.relative or t <= 0 else t

    def __post_init__(self) -> None:
        for name in ("damping", "eps"):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or v < 0
            ):
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

    def warn_if_mostly_truncated(self, kept: int, dim: int, what: str = "the inverse") -> None:
        """Warn (:class:`TruncationWarning`) when ``kept`` of ``dim`` directions is under
        ``MIN_KEPT_FRACTION``, saying what to change."""
        if dim <= 0 or kept >= MIN_KEPT_FRACTION * dim:
            return
        rule = f"relative eps={self.eps:g}" if self.relative else f"eps={self.eps:g}"
        warnings.warn(
            f"{what} keeps {kept:,} of {dim:,} eigen-directions ({100 * kept / dim:.1f}%): "
            f"truncation at {rule} with damping={self.damping:g} discards most of the "
            "curvature. Add damping (e.g. Regularization(damping=1e-3), the default) or "
            "lower eps.",
            TruncationWarning,
            stacklevel=3,
        )

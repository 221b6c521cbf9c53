"""What a study runs: LDS settings, one configuration, a grid of them, the named presets.

A :class:`Preset` is a grid over depth x width x training epochs x seeds; each point is a
:class:`RunConfig` (one base model and everything done to it: its ground truth, the rungs
fitted on it, the regularisers they are inverted under). Both are validated frozen
dataclasses; a configuration's :attr:`RunConfig.id` hashes every setting, so a result
directory never mixes numbers of two settings.

This module imports no curvature code beyond :class:`Regularization` (a pure rule on
eigenvalues), so the report can read stored specs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from curvinf.curvature.regularization import Regularization
from curvinf.data import DATASET_SHAPES, DATASETS, train_count
from curvinf.losses import MEASURES
from curvinf.models import ACTIVATIONS, INITS
from curvinf.names import LADDER, METHODS, SHARING_LADDER, STUDY_RUNGS
from curvinf.storage import request_hash
from curvinf.training import TrainingRecipe
from curvinf.validation import check_choice, check_int, check_number

FISHERS = ("type2", "mc")
ARCHITECTURES = {"mlp": ("digits", "diabetes"), "cnn": ("digits",), "transformer": ("majority",)}
"""Each model family and the datasets it takes (:mod:`curvinf.architectures`)."""
UNCOVERED = ("error", "exact", "diagonal")
BIAS_LAYOUTS = ("joint", "separate")
PARTITIONS = ("layer", "tensor")
GRAM_FLOPS = 3e10
"""Rough float64 rate (flop/s) of one Gram factorisation beside other grid work, for
:meth:`RunConfig.rung_cost`."""
DENSE_RATE = 1e-9
"""Rough seconds per ``D³`` of a configuration's dense rungs (their builds and
eigendecompositions; fitted to the grids' rows), for :meth:`RunConfig.rung_cost`."""


def reg_label(reg: Regularization) -> str:
    """A short, file-safe name: ``eps1e-04`` or ``damp1e-03+eps1e-04`` (``+rel``)."""
    parts = []
    if reg.damping:
        parts.append(f"damp{reg.damping:.0e}")
    parts.append(f"eps{reg.eps:.0e}" if reg.eps else "eps0")
    if reg.relative:
        parts.append("rel")
    return "+".join(parts)


def parse_regularization(text: str) -> Regularization:
    """``"eps=1e-4"``, ``"damping=1e-3,eps=1e-4"``, ``"damping=1e-3,eps=0,relative"`` ->
    :class:`Regularization`. Keys not given are 0 (``damping``, ``eps``) and False
    (``relative``): the text says the whole rule, so ``"damping=1e-3"`` is pure damping."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a regulariser must be text like 'eps=1e-4' or 'damping=1e-3,eps=1e-4'.")
    values: dict[str, Any] = {"damping": 0.0, "eps": 0.0, "relative": False}
    for part in text.replace("+", ",").split(","):
        key, _, value = part.strip().partition("=")
        key = {"damp": "damping", "δ": "damping", "ε": "eps", "rel": "relative"}.get(key, key)
        if key not in values:
            raise ValueError(
                f"unknown regulariser key {key!r} in {text!r}; use damping=, eps= and relative."
            )
        if key == "relative":
            if value.lower() not in ("", "1", "true", "yes"):
                raise ValueError(f"relative takes no value (or true), got {value!r} in {text!r}.")
            values[key] = True
            continue
        try:
            values[key] = float(value)
        except ValueError:
            raise ValueError(f"{key} must be a number, got {value!r} in {text!r}.") from None
    return Regularization(**values)


@dataclass(frozen=True)
class LDSSettings:
    """How the LDS ground truth is built and scored.

    ``num_subsets`` (M) subsets of fraction ``alpha``, each retrained ``num_seeds`` (R)
    times (batch order varies, initialisation shared) with the subsets seeded by
    ``seed``; ``num_queries`` the first queries of the split (0: all); ``measure``
    ``loss`` or ``margin``; ``num_bootstrap`` resamples of the CIs; ``matched_steps``
    retrains subsets for ``ceil(epochs · N / |S|)`` epochs (the base model's number of
    optimiser steps) instead of the base epochs (Park et al.'s protocol).
    """

    num_subsets: int = 100
    alpha: float = 0.5
    num_seeds: int = 1
    seed: int = 0
    num_queries: int = 0
    measure: str = "loss"
    num_bootstrap: int = 1000
    matched_steps: bool = False

    def __post_init__(self) -> None:
        check_choice("measure", self.measure, MEASURES)
        check_int("num_subsets", self.num_subsets, low=2)
        if check_number("alpha", self.alpha, low=0.0, strict_low=True) >= 1:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha!r}.")
        check_int("num_seeds", self.num_seeds, low=1)
        check_int("seed", self.seed, low=0)
        check_int("num_queries", self.num_queries, low=0)
        check_int("num_bootstrap", self.num_bootstrap, low=0)
        if not isinstance(self.matched_steps, bool):
            raise TypeError(f"matched_steps must be True or False, got {self.matched_steps!r}.")


def check_measurement(s: Any) -> None:
    """Check the measurement settings ``s`` shares with :class:`RunConfig` (rungs, rules,
    reference, Fisher and Kronecker knobs, routes, seed); ``ValueError`` / ``TypeError``
    naming the bad one."""
    check_choice("uncovered", s.uncovered, UNCOVERED)
    check_choice("reference", s.reference, METHODS)
    check_choice("fisher", s.fisher, FISHERS)
    check_choice("kronecker_fisher", s.kronecker_fisher, FISHERS)
    check_choice("kronecker_bias", s.kronecker_bias, BIAS_LAYOUTS)
    check_choice("partition", s.partition, PARTITIONS)
    check_int("seed", s.seed, low=0)
    check_int("lanczos_k", s.lanczos_k, low=1)
    check_int("solver_max_iter", s.solver_max_iter, low=1)
    check_int("estimate_matvecs", s.estimate_matvecs, low=6)
    check_number("solver_tol", s.solver_tol, low=0.0, high=1.0, strict_low=True)
    if not s.rungs or len(set(s.rungs)) != len(s.rungs):
        raise ValueError(f"rungs must be non-empty and distinct, got {s.rungs}.")
    for r in s.rungs:
        check_choice("rung", r, STUDY_RUNGS)
    if not s.regularizations or not all(isinstance(r, Regularization) for r in s.regularizations):
        raise ValueError("regularizations must be a non-empty tuple of Regularization.")
    labels = [reg_label(r) for r in s.regularizations]
    if len(set(labels)) != len(labels):
        raise ValueError(f"regularizations repeat a rule: {labels}.")
    check_number("max_dense_bytes", s.max_dense_bytes, low=0.0, strict_low=True)
    check_number("gram_bytes", s.gram_bytes, low=0.0, strict_low=True)


def _check_ints(name: str, values: tuple[int, ...], low: int) -> None:
    if not values:
        raise ValueError(f"{name} must not be empty.")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
        raise ValueError(f"{name} must be integers >= {low}, got {values}.")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {values}.")


_NEW_DEFAULTS = {
    "activation": "relu",
    "init": "torch",
    "query_fraction": 0.2,
    "kronecker_fisher": "type2",
    "kronecker_bias": "joint",
    "partition": "layer",
    "lanczos_k": 300,
    "solver_tol": 1e-6,
    "solver_max_iter": 300,
    "estimate_matvecs": 60,
    "gram_bytes": 14 * 2**30,
    "architecture": "mlp",
    "uncovered": "error",
}
"""Settings added after the first grids ran: left out of :meth:`RunConfig.to_dict` at these
values, so the ids of those configurations stay valid."""


@dataclass(frozen=True)
class RunConfig:
    """One configuration of the grid: one base model, every rung and regularisation on it.

    Model and data: an MLP of ``depth`` hidden layers of ``width`` units, ``activation``
    and initialisation ``init`` (:func:`curvinf.models.make_mlp`) on ``dataset``
    (``query_fraction`` of it held out as queries), trained by ``recipe`` for ``epochs``
    with ``seed`` (split, initialisation, batches).

    Rungs: ``rungs`` under every regulariser of ``regularizations``; errors against
    ``reference``. ``fisher``: output-space curvature of the GGN-type rungs;
    ``kronecker_fisher``, ``kronecker_bias`` (``joint``: one Kronecker block per layer
    with the bias as an extra input column; ``separate``: weight and bias blocks) and
    ``partition`` (``layer`` or ``tensor`` blocks for block-GGN and off-block mass) are
    the knobs of the paper's released code.

    Routes: dense where the matrix fits ``max_dense_bytes``, else matrix-free
    (:mod:`curvinf.study.rungs`): ``lanczos_k`` Ritz pairs for the truncated Hessian,
    ``solver_tol`` / ``solver_max_iter`` for its CG, ``estimate_matvecs`` products per
    randomised error estimate, ``gram_bytes`` the memory the Gram route may hold (its
    sample-space factorisations).

    Architecture: ``mlp`` (the default, above), ``cnn`` (``depth`` 3x3 convolutions of
    ``width`` channels on the digits images) or ``transformer`` (``depth`` blocks of width
    ``width`` on the ``majority`` sequences), :mod:`curvinf.architectures`. ``uncovered``:
    what the Kronecker rungs do with parameters no layer adapter covers (the transformer's
    embeddings), :class:`~curvinf.curvature.FitSettings`. Rungs may include the
    ``reduce`` variants of the weight-sharing rungs (``kfac_reduce``, ...).
    """

    depth: int
    width: int
    epochs: int
    seed: int = 0
    dataset: str = "digits"
    recipe: TrainingRecipe = field(default_factory=TrainingRecipe)
    rungs: tuple[str, ...] = LADDER
    regularizations: tuple[Regularization, ...] = (Regularization.paper(),)
    lds: LDSSettings = field(default_factory=LDSSettings)
    reference: str = "hessian"
    fisher: str = "type2"
    max_dense_bytes: float = 2**30
    activation: str = "relu"
    init: str = "torch"
    query_fraction: float = 0.2
    kronecker_fisher: str = "type2"
    kronecker_bias: str = "joint"
    partition: str = "layer"
    lanczos_k: int = 300
    solver_tol: float = 1e-6
    solver_max_iter: int = 300
    estimate_matvecs: int = 60
    gram_bytes: float = 14 * 2**30
    architecture: str = "mlp"
    uncovered: str = "error"

    def __post_init__(self) -> None:
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("architecture", self.architecture, ARCHITECTURES)
        if self.dataset not in ARCHITECTURES[self.architecture]:
            raise ValueError(
                f"architecture={self.architecture!r} takes dataset "
                f"{' or '.join(map(repr, ARCHITECTURES[self.architecture]))}, got "
                f"{self.dataset!r}."
            )
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("init", self.init, INITS)
        _check_ints("depth", (self.depth,), 0)
        _check_ints("width", (self.width,), 1)
        _check_ints("epochs", (self.epochs,), 1)
        v = check_number("query_fraction", self.query_fraction, low=0.0, strict_low=True)
        if v >= 1:
            raise ValueError(f"query_fraction must lie in (0, 1), got {self.query_fraction!r}.")
        check_measurement(self)

    @property
    def recipe_used(self) -> TrainingRecipe:
        """The base recipe with this configuration's epochs and seed."""
        return replace(self.recipe, epochs=self.epochs, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["recipe"] = self.recipe_used.to_dict()
        d["regularizations"] = [asdict(r) for r in self.regularizations]
        d["rungs"] = list(self.rungs)
        if not self.lds.matched_steps:  # the default is left out: ids of older runs stay valid
            del d["lds"]["matched_steps"]
        for name, default in _NEW_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        d["regularizations"] = tuple(Regularization(**r) for r in d["regularizations"])
        d["lds"] = LDSSettings(**d["lds"])
        d["recipe"] = TrainingRecipe(**d["recipe"])
        d["rungs"] = tuple(d["rungs"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def id(self) -> str:
        """``d<depth>-w<width>-e<epochs>-s<seed>-<hash8>``; the hash covers every setting."""
        return (
            f"d{self.depth}-w{self.width}-e{self.epochs}-s{self.seed}-"
            f"{request_hash(self.to_dict())[:8]}"
        )

    @property
    def num_params(self) -> int:
        """D of the model (an MLP on digits: 64 inputs, 10 outputs; diabetes: 10 inputs, 1
        output)."""
        return sum(self.layer_sizes)

    @property
    def layer_sizes(self) -> list[int]:
        """Parameters per module (weight and bias), the block-GGN's block sizes."""
        if self.architecture != "mlp":
            from curvinf.params import param_blocks  # torch: only where needed
            from curvinf.study.truth import model_factory

            return [b.size for b in param_blocks(model_factory(self)(), "layer")]
        n_in, n_out = (64, 10) if self.dataset == "digits" else (10, 1)
        fans = [n_in] + [self.width] * self.depth
        outs = [self.width] * self.depth + [n_out]
        return [(a + 1) * b for a, b in zip(fans, outs, strict=True)]

    @property
    def loss_name(self) -> str:
        """``ce`` for classification (digits, majority), ``mse`` for regression (diabetes)."""
        return "mse" if self.dataset == "diabetes" else "ce"

    def cost(self, *, models_left: int | None = None) -> float:
        """Rough seconds on 2 busy cores, for running cheap configurations first: retraining
        (models x steps x D, fitted to the grids' stores; a subset model takes ``alpha`` of
        the base model's steps, or all of them with matched steps) plus :meth:`rung_cost`.
        ``models_left``: the ground truth's models still to train (default all ``M·R``; 0
        once it is stored)."""
        steps = 1.0 if self.lds.matched_steps else self.lds.alpha
        if models_left is None:
            models_left = self.lds.num_subsets * self.lds.num_seeds
        retrain = 4e-7 * self.num_params * self.epochs * steps * models_left
        return retrain + self.rung_cost()

    def factorisations(self) -> list[tuple[str, int, str]]:
        """The largest matrix factorisations the exact rungs need, ``(kind, order, route)``:
        a lower bound on the rungs' work (the Kronecker rungs' small ``eigh``s, products,
        the Hessian's iterations and the errors come on top).

        Dense (``8 D² <= max_dense_bytes``): an ``eigh`` of the ``D x D`` Hessian and GGN
        and one per block-GGN block. Above the cap the GGN rungs take the Gram route
        (:mod:`curvinf.curvature.gram`): one factorisation of the ``R x R`` Gram matrix
        (``R`` = training examples x output roots) for the GGN and one per block of at
        least ``R`` parameters: a Cholesky factor under damping only; under truncation an
        ``eigh``, or ``"eigh-above"`` when every truncating rule is absolute with
        ``eps > damping``, where the Gram route computes only the eigenpairs it keeps
        (:mod:`~curvinf.curvature.partial_eigh`: an ``R³/3`` inertia count, then products
        whose number depends on how many it keeps); the smaller blocks are dense ``eigh``s."""
        D = self.num_params
        sizes = self.layer_sizes
        if 8.0 * D * D <= self.max_dense_bytes:
            full = [("eigh", D, "dense") for r in ("hessian", "ggn") if r in self.rungs]
            blocks = [("eigh", d, "dense") for d in sizes] if "block_ggn" in self.rungs else []
            return full + blocks
        examples, outputs = DATASET_SHAPES[self.dataset]
        roots = outputs - 1 if self.loss_name == "ce" else outputs
        R = train_count(examples, self.query_fraction) * max(roots, 1)
        truncating = [r for r in self.regularizations if r.truncates_nonnegative()]
        if not truncating:
            kind = "cholesky"
        elif all(r.nonnegative_cutoff() is not None for r in truncating):
            kind = "eigh-above"
        else:
            kind = "eigh"
        out = [(kind, R, "gram")] if "ggn" in self.rungs else []
        if "block_ggn" in self.rungs:
            out += [(kind, R, "gram") if d >= R else ("eigh", d, "dense") for d in sizes]
        return out

    def rung_cost(self) -> float:
        """Rough seconds of the rungs on 2 busy cores (fitted to the finished grid rows).

        Dense rungs: ``O(D³)`` eigendecompositions and a minute of fixed cost. Above the
        cap, :meth:`factorisations`: a Gram ``eigh`` at ``9 R³`` flops, its partial form
        at ``2 R³`` (what session 10 measured on the d8-w128 grids: 0.1–0.4 of an
        ``eigh``), a Cholesky factor at ``R³ / 3`` (:data:`GRAM_FLOPS`), the dense blocks
        at :data:`DENSE_RATE`; the Hessian's iterative routes and the randomised errors
        grow with ``D``."""
        D = self.num_params
        if 8.0 * D * D <= self.max_dense_bytes:
            return 60.0 + DENSE_RATE * D**3
        flops = {"eigh": 9.0, "eigh-above": 2.0, "cholesky": 1 / 3}
        return (
            sum(
                flops[kind] * n**3 / GRAM_FLOPS if route == "gram" else DENSE_RATE * n**3
                for kind, n, route in self.factorisations()
            )
            + 2e-2 * D
        )


_SHARED = tuple(
    f.name for f in fields(RunConfig) if f.name not in ("depth", "width", "epochs", "seed")
)
"""The settings a preset passes unchanged to every configuration of its grid."""


@dataclass(frozen=True)
class Preset:
    """A grid: ``depths x widths x epochs x seeds`` configurations sharing everything else
    (every other field of :class:`RunConfig`, same names and defaults)."""

    name: str
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    epochs: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)
    rungs: tuple[str, ...] = LADDER
    regularizations: tuple[Regularization, ...] = (Regularization.paper(),)
    lds: LDSSettings = field(default_factory=LDSSettings)
    dataset: str = "digits"
    recipe: TrainingRecipe = field(default_factory=TrainingRecipe)
    reference: str = "hessian"
    fisher: str = "type2"
    max_dense_bytes: float = 2**30
    activation: str = "relu"
    init: str = "torch"
    query_fraction: float = 0.2
    kronecker_fisher: str = "type2"
    kronecker_bias: str = "joint"
    partition: str = "layer"
    lanczos_k: int = 300
    solver_tol: float = 1e-6
    solver_max_iter: int = 300
    estimate_matvecs: int = 60
    gram_bytes: float = 14 * 2**30
    architecture: str = "mlp"
    uncovered: str = "error"
    description: str = ""

    def __post_init__(self) -> None:
        _check_ints("depths", self.depths, 0)
        _check_ints("widths", self.widths, 1)
        _check_ints("epochs", self.epochs, 1)
        _check_ints("seeds", self.seeds, 0)
        self.configs()  # validates the rest through RunConfig

    def configs(self) -> list[RunConfig]:
        """Every configuration, cheapest first (so a time-limited run covers the most)."""
        shared = {name: getattr(self, name) for name in _SHARED}
        out = [
            RunConfig(depth=d, width=w, epochs=e, seed=s, **shared)
            for d in self.depths
            for w in self.widths
            for e in self.epochs
            for s in self.seeds
        ]
        return sorted(out, key=lambda c: (c.cost(), c.depth, c.width, c.epochs, c.seed))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["regularizations"] = [asdict(r) for r in self.regularizations]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preset:
        d = dict(d)
        d["regularizations"] = tuple(Regularization(**r) for r in d["regularizations"])
        d["lds"] = LDSSettings(**d["lds"])
        d["recipe"] = TrainingRecipe(**d["recipe"])
        for k in ("depths", "widths", "epochs", "seeds", "rungs"):
            d[k] = tuple(d[k])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


DAMPED = Regularization(damping=0.1, eps=0.0)
"""The damped rule of the paper presets: pure damping, chosen when ``λ_min(H)`` measured
between −0.02 and −0.03 on the pilot's configurations, so that ``H + δI`` is positive
definite and the Hessian's inverse certified (GGN-preconditioned CG). The grids found
more negative curvature since (``λ_min(H) ≈ −0.115`` at `paper` d8-w64-e10, ``−0.3`` at
`paper-code` d4-w64-e10); there ``(H + δI)⁻¹`` is indefinite and the Hessian's row says
``unavailable`` with ``λ_min``, never a number. δ is 2–10% of the largest eigenvalue
(1–4), the range where damping beat truncation in docs/benchmarks.md "Default regulariser".
The library default (``δ = 1e-3, ε = 1e-4``) truncates the Hessian's ~10³ eigenvalues
below ``ε − δ``, which no matrix-free route can find at D = 10⁵."""

SHARING_DAMPED = Regularization(damping=0.1, eps=1e-4)
"""The damped rule of the weight-sharing presets: damping 0.1 as in the paper presets, with
the summary's truncation after it as a guard: a 3-epoch trial of the smallest CNN had 60 of
1,370 Hessian eigenvalues below −0.1, where pure damping has no inverse. At the presets' 50
epochs ``λ_min(H) >= −0.100`` everywhere, so the guard removes at most the one-block
transformer's nearly singular direction (docs/results.md)."""

PAPER_GRID = {"depths": (1, 4, 8), "widths": (32, 64, 128), "epochs": (10, 100, 1000)}

PRESETS: dict[str, Preset] = {
    "paper": Preset(
        name="paper",
        **PAPER_GRID,
        regularizations=(Regularization.paper(), DAMPED),
        lds=LDSSettings(num_subsets=100, alpha=0.5, num_seeds=3, matched_steps=True),
        init="he",
        recipe=TrainingRecipe(lr=0.01, schedule="cosine"),
        max_dense_bytes=1.5 * 2**30,
        description=(
            "The paper's grid under curvinf's protocol: UCI digits (80/20 split), ReLU MLPs of "
            "depth {1, 4, 8} x width {32, 64, 128} (He initialisation), trained {10, 100, "
            "1000} epochs (SGD, momentum 0.9, lr 0.01 with cosine annealing, batch 64); all "
            "five rungs (type-2 Fisher, per-layer "
            "blocks, joint weight-bias Kronecker blocks) under the summary's rule "
            "(truncation eps = 1e-4, no damping) and a damped rule (damping 0.1; the "
            "damped Hessian is unavailable where λ_min(H) < -0.1); LDS with 100 subsets of "
            "alpha = 0.5, 3 "
            "retrainings each, matched steps. "
            "Dense matrices up to 1.5 GiB (D <= 14,190), matrix-free routes above."
        ),
    ),
    "paper-code": Preset(
        name="paper-code",
        **PAPER_GRID,
        regularizations=(Regularization(damping=1e-4, eps=1e-6), Regularization.paper(), DAMPED),
        lds=LDSSettings(num_subsets=100, alpha=0.5, num_seeds=1, matched_steps=True),
        activation="gelu",
        recipe=TrainingRecipe(lr=0.01, batch_size=32, schedule="cosine"),
        query_fraction=0.1,
        kronecker_fisher="mc",
        kronecker_bias="separate",
        partition="tensor",
        max_dense_bytes=1.5 * 2**30,
        description=(
            "The paper's grid under the authors' released code (SteveHong1901/Hessian): "
            "GELU MLPs (PyTorch's initialisation), SGD lr 0.01, momentum 0.9, batch 32, "
            "cosine annealing, 90/10 split, K-FAC/EK-FAC with a one-sample Monte-Carlo Fisher and "
            "separate weight and bias blocks, per-tensor blocks for block-GGN and off-block "
            "mass, damping 1e-4 with truncation 1e-6 (and the summary's eps = 1e-4, and the "
            "damping 0.1 of the paper preset); LDS "
            "with 100 subsets of alpha = 0.5, one retraining each (time), matched steps."
        ),
    ),
    "cnn": Preset(
        name="cnn",
        depths=(1, 2),
        widths=(8, 16),
        epochs=(50,),
        architecture="cnn",
        rungs=SHARING_LADDER,
        regularizations=(Regularization.paper(), SHARING_DAMPED),
        lds=LDSSettings(num_subsets=100, alpha=0.5, num_seeds=3, matched_steps=True),
        recipe=TrainingRecipe(lr=0.01, schedule="cosine"),
        max_dense_bytes=1.5 * 2**30,
        description=(
            "Weight sharing in convolutions: CNNs of 1 or 2 3x3 convolutions of 8 or 16 "
            "channels (the last with stride 2) and a linear head on the UCI digits images "
            "(80/20 split, the MLPs' split), trained 50 epochs (SGD, momentum 0.9, lr 0.01, "
            "cosine, batch 64); the ladder with both K-FAC variants (expand, reduce) and "
            "their unshared GGNs (the weight-sharing step alone), type-2 Fisher, per-layer "
            "blocks; eps = 1e-4, and damping 0.1 then eps = 1e-4; LDS with 100 subsets "
            "of alpha = 0.5, 3 retrainings each, matched steps."
        ),
    ),
    "transformer": Preset(
        name="transformer",
        depths=(1, 2),
        widths=(16,),
        epochs=(50,),
        dataset="majority",
        architecture="transformer",
        uncovered="exact",
        rungs=SHARING_LADDER,
        regularizations=(Regularization.paper(), SHARING_DAMPED),
        lds=LDSSettings(num_subsets=100, alpha=0.5, num_seeds=3, matched_steps=True),
        recipe=TrainingRecipe(optimizer="adamw", lr=3e-3, schedule="cosine"),
        max_dense_bytes=1.5 * 2**30,
        description=(
            "Weight sharing over sequence positions: transformers of 1 or 2 blocks "
            "(single-head attention written with matrix products, a ReLU MLP, width 16) on "
            "the majority task (1,000 sequences of 8 tokens, 80/20 split), trained 50 epochs "
            "(AdamW, lr 3e-3, cosine, batch 64); the ladder with both K-FAC variants and "
            "their unshared GGNs, the embeddings (which no K-FAC adapter covers) as exact "
            "GGN blocks in every Kronecker rung; eps = 1e-4, and damping 0.1 then eps = "
            "1e-4; LDS with 100 subsets of alpha = 0.5, 3 retrainings each, matched steps."
        ),
    ),
    "quick": Preset(
        name="quick",
        depths=(1,),
        widths=(32,),
        epochs=(10, 100),
        seeds=(0,),
        lds=LDSSettings(num_subsets=50, alpha=0.5, num_seeds=1, num_bootstrap=500),
        max_dense_bytes=2**30,
        description=(
            "A corner of the paper grid that runs in minutes on 2 cores: depth 1, width 32 "
            "(D = 2,410), 10 and 100 epochs, all five rungs, eps = 1e-4; LDS with 50 subsets "
            "of alpha = 0.5, one retraining each."
        ),
    ),
}


def get_preset(name: str) -> Preset:
    check_choice("preset", name, PRESETS)
    return PRESETS[name]


__all__ = [
    "BIAS_LAYOUTS",
    "DAMPED",
    "FISHERS",
    "PARTITIONS",
    "PRESETS",
    "LDSSettings",
    "Preset",
    "RunConfig",
    "get_preset",
    "parse_regularization",
    "reg_label",
]

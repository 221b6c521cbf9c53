"""LDS ground truth: retrain ``M`` subsets x ``R`` seeds, measure, keep it in a resumable store.

For subset ``j`` (:func:`curvinf.lds.make_subsets`) and seed ``r``, model
``(j, r)`` is trained by the base recipe on ``S_j`` and measured on every query:

    meas[j, r, q] = f(z_q; θ*(S_j, r))            (M, R, Q), lower is better
    truth[j, q]   = 1/R Σ_r meas[j, r, q]          (M, Q)

Retraining protocol (defaults):

- Initialisation: every retrained model starts from the base model's weights
  at initialisation (``make_mlp(seed=model_seed)``), as influence functions
  assume. ``vary_init=True`` draws a fresh initialisation per ``(j, r)``.
- Seed ``r`` changes the minibatch order only (batch seed
  ``retrain_seed(seed, j, r)``, a hash of ``(seed, j, r)``, so adding subsets
  or seeds keeps the existing ones).
- Steps: the base recipe's *epochs* (``matched_steps=False``, the default and
  Park et al.'s protocol), so a half-data model takes half the steps;
  ``matched_steps=True`` scales the epochs by ``N / |S_j|`` to match steps.

Models are trained in chunks by :func:`curvinf.retrain.train_many` (vmap over
stacked parameters); model ``i`` is subset ``i // R``, seed ``i % R``.

Any model, any training (``GroundTruthConfig.model``, ``.train_fn``): the model is the
library's MLP (``depth``, ``width``, ...) or the user's, a factory ``() -> nn.Module``
(called under ``torch.manual_seed(model_seed)``) or a module used as a template (its
initial weights are the start of every model). It is trained either by ``recipe``, batched
over models by :func:`curvinf.retrain.train_many` (SGD, Adam or AdamW), or by the user's
``train_fn(model, X, y, seed) -> nn.Module``, called once per model, one after another:
``model`` is a fresh copy of the initial model, ``(X, y)`` the rows of subset ``j``
(all rows for the base model, whose seed is ``config.seed``), ``seed`` the batch seed
``retrain_seed(seed, j, r)``, and the global torch RNG is seeded with it first. A
``train_fn`` must be deterministic given these; it may train ``model`` in place and return
it. Measurements always use the eval-mode function of the returned parameters and
floating buffers.

The store (:mod:`curvinf.gtstore`) is one directory per request, named by a hash of
everything that determines the numbers (:func:`store_request`: data, model, recipe, loss,
measurement, subsets, seeds; a user's model by its structure, the source of its own module
classes and a fingerprint of its initial weights, a ``train_fn`` by its name and source),
holding a manifest, the base model and one checksummed file per chunk of models. Every
chunk is written atomically (temp file, fsync, rename) before the manifest records it, so
a run killed at any point (SIGKILL included) resumes from the last finished chunk and ends
with the same numbers; a lost manifest is rebuilt with the layout of the chunks on disk
and nothing finished is retrained. A finished store is read
without its lock and without writing (a read-only directory will do).

The build (:func:`ground_truth`) is: check the arguments, load a finished store, else
under the store's lock open its manifest, train the base model if missing, train the
missing chunks, assemble the :class:`GroundTruth` with its health warnings and record
its summary.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import math
import pickle
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvinf.data import DataSplit
from curvinf.devices import DeviceSpec, describe_device, model_on, resolve_device
from curvinf.executors import Executor, chunk_executor
from curvinf.gtstore import (
    BASE,
    FORMAT,
    check_request,
    chunk_path,
    chunk_range,
    locked_store,
    models_in,
    open_manifest,
    read_base,
    read_chunks,
    read_finished,
    store_path,
    stored_manifest,
    utc_now,
    write_manifest,
)
from curvinf.lds import LDSResult, lds, make_subsets, subset_size
from curvinf.losses import MEASURES, check_targets
from curvinf.models import ACTIVATIONS, INITS, ModelSource, build_model, make_mlp, model_structure
from curvinf.noise import seed_noise
from curvinf.params import count_trainable, model_fingerprint
from curvinf.progress import progress_bar
from curvinf.retrain import (
    accuracy_many,
    bytes_per_model,
    losses_many,
    measure_many,
    stack_params,
    subset_recipe,
    train_many,
)
from curvinf.storage import check_directory, request_hash, tensor_digest, write_blob
from curvinf.training import TrainingRecipe, train, training_model
from curvinf.validation import check_choice, check_int, check_number, check_xy

LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_MEMORY_BYTES = 2 * 2**30
DEFAULT_MAX_CHUNK = 100
DEFAULT_FN_CHUNK = 10  # models per chunk for a train_fn: run one by one, saved often
CHUNK_FLOPS = 1e13
"""Training flops per chunk at most (``6·D`` per example seen, each model's share): about
10 minutes at the 15–20 GFLOP/s the batched trainer sustains on 2 loaded cores, so a
killed run loses little. A model's numbers do not depend on the chunk it trains in."""
TrainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], nn.Module]
MLP_FIELDS = ("depth", "width", "activation", "init", "dtype")
CPU = torch.device("cpu")


class RetrainingWarning(UserWarning):
    """Retrained models are far from the base model, or the ground truth is mostly noise."""


@dataclass(frozen=True)
class GroundTruthConfig:
    """Everything besides the data that determines the LDS ground truth.

    Model: ``make_mlp(F, C, depth=, width=, activation=, seed=model_seed, dtype=)``, or
    the user's ``model``: a factory ``() -> nn.Module`` (called under
    ``torch.manual_seed(model_seed)``; the MLP fields then stay at their defaults) or an
    ``nn.Module`` whose initial weights every model starts from; the data are cast to
    its parameters' dtype. Training: ``recipe`` (the base model's; its ``seed`` orders
    the base model's batches; SGD, Adam or AdamW), or the user's ``train_fn(model, X, y,
    seed) -> nn.Module`` run per model (module doc; ``recipe`` then stays at its
    default), ``loss`` ``"ce"`` or ``"mse"``. Measurement: ``measure``
    (``"loss"`` or ``"margin"``, lower is better). Subsets: ``num_subsets`` (M)
    of fraction ``alpha``, seeded by ``seed``. Retraining: ``num_seeds`` (R)
    batch-order seeds per subset, ``matched_steps`` and ``vary_init`` (module doc).
    """

    depth: int = 4
    width: int = 64
    activation: str = "relu"
    init: str = "torch"
    model_seed: int = 0
    recipe: TrainingRecipe = field(default_factory=TrainingRecipe)
    loss: str = "ce"
    measure: str = "loss"
    num_subsets: int = 100
    alpha: float = 0.5
    num_seeds: int = 5
    seed: int = 0
    matched_steps: bool = False
    vary_init: bool = False
    dtype: str = "float32"
    model: ModelSource | None = None
    train_fn: TrainFn | None = None

    def __post_init__(self) -> None:
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("init", self.init, INITS)
        check_choice("loss", self.loss, LOSSES)
        check_choice("measure", self.measure, MEASURES)
        check_choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.recipe, TrainingRecipe):
            raise TypeError(f"recipe must be a TrainingRecipe, got {type(self.recipe).__name__}.")
        check_int("depth", self.depth, low=0)
        check_int("width", self.width, low=1)
        check_int("model_seed", self.model_seed, low=0)
        check_int("num_subsets", self.num_subsets, low=2)
        check_fraction("alpha (subset fraction)", self.alpha)
        check_int("num_seeds", self.num_seeds, low=1)
        check_int("seed", self.seed, low=0)
        for name in ("matched_steps", "vary_init"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.measure == "margin" and self.loss != "ce":
            raise ValueError("measure='margin' needs loss='ce'; use measure='loss'.")
        self._check_user_parts()

    def _check_user_parts(self) -> None:
        """The user's ``model`` and ``train_fn``: types, and no settings they make unused."""
        if self.model is not None:
            if not (isinstance(self.model, nn.Module) or callable(self.model)):
                raise TypeError(
                    "model must be a function of no arguments building an nn.Module (a "
                    f"factory) or an nn.Module, got {type(self.model).__name__}."
                )
            defaults = {f.name: f.default for f in fields(self)}
            changed = [f for f in MLP_FIELDS if getattr(self, f) != defaults[f]]
            if changed:
                raise ValueError(
                    f"{', '.join(changed)} describe the library's MLP and have no effect with "
                    "model=; leave them at their defaults (the data are cast to the model's "
                    "dtype)."
                )
            if self.vary_init and isinstance(self.model, nn.Module):
                raise ValueError(
                    "vary_init=True draws a fresh initialisation per model, which a module "
                    "template cannot do; pass a factory, model=lambda: MyNet()."
                )
        if self.train_fn is not None:
            if not callable(self.train_fn):
                raise TypeError(
                    "train_fn must be a function (model, X, y, seed) -> trained nn.Module, "
                    f"got {type(self.train_fn).__name__}."
                )
            if self.recipe != TrainingRecipe():
                raise ValueError(
                    "recipe is the library's batched training and is unused with train_fn; "
                    "leave it at its default (the train_fn decides the training)."
                )
            if self.matched_steps:
                raise ValueError(
                    "matched_steps=True scales the recipe's epochs, which a train_fn does not "
                    "have; scale the steps inside train_fn (it sees len(X))."
                )

    @property
    def num_models(self) -> int:
        """M x R, the models to retrain."""
        return self.num_subsets * self.num_seeds

    def to_dict(self) -> dict[str, Any]:
        """The settings; a user's ``model`` and ``train_fn`` only when given, by name."""
        d = asdict(replace(self, model=None, train_fn=None))
        del d["model"], d["train_fn"]
        if self.model is not None:
            source = self.model
            d["model"] = type(source).__name__ if isinstance(source, nn.Module) else _name(source)
        if self.train_fn is not None:
            d["train_fn"] = _name(self.train_fn)
        return d

    def make_model(self, data: DataSplit) -> nn.Module:
        """The base model at initialisation, on the CPU (:func:`ground_truth` moves it to
        the device that retrains)."""
        if self.model is not None:
            return model_on(build_model(self.model, self.model_seed), torch.device("cpu"))
        return make_mlp(
            data.num_features,
            data.num_outputs,
            depth=self.depth,
            width=self.width,
            activation=self.activation,
            seed=self.model_seed,
            dtype=DTYPES[self.dtype],
            init=self.init,
        )

    def make_loss(self) -> nn.Module:
        return LOSSES[self.loss]()


def _name(obj: object) -> str:
    """``module.qualname`` of a function or class (of a callable object: its class)."""
    target = obj if hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(target, '__module__', '?')}.{target.__qualname__}"


def function_identity(fn: Callable) -> dict[str, Any]:
    """What identifies a ``train_fn`` in a store request: its name and a sha256 of its source
    (None when there is none, e.g. defined interactively); a ``functools.partial`` adds the
    ``repr`` of its bound arguments. Settings the function reads from elsewhere (globals,
    closures) are not seen: bind them with ``functools.partial`` so they are."""
    if isinstance(fn, functools.partial):
        return {
            **function_identity(fn.func),
            "args": repr(fn.args),
            "keywords": repr(sorted(fn.keywords.items())),
        }
    try:
        source = inspect.getsource(fn if inspect.isroutine(fn) else type(fn))
    except (OSError, TypeError):
        source = None
    digest = None if source is None else hashlib.sha256(source.encode()).hexdigest()[:16]
    return {"function": _name(fn), "source_sha256": digest}


def model_identity(config: GroundTruthConfig, model: nn.Module) -> dict[str, Any]:
    """The request's ``model`` of a user's model at initialisation: its structure
    (:func:`curvinf.models.model_structure`), the seed its factory runs under, and
    fingerprints of its initial weights (:func:`curvinf.params.model_fingerprint`) and of
    its buffers."""
    buffers = [b for _, b in model.named_buffers()]
    return {
        "kind": "custom",
        **model_structure(model),
        **({} if isinstance(config.model, nn.Module) else {"seed": config.model_seed}),
        "init": model_fingerprint(model),
        **({"buffers": tensor_digest(*buffers)[:16]} if buffers else {}),
    }


@dataclass
class GroundTruth:
    """The LDS ground truth of one request, as built or loaded by :func:`ground_truth`.

    Shapes: ``M`` subsets, ``R`` seeds, ``Q`` queries, ``N`` training examples.

    - ``truth`` (M, Q) float64: measurement averaged over seeds (lower is better).
    - ``masks`` (M, N) bool: the subsets. ``seeds`` (M, R) int64: batch seeds.
    - ``measurements`` (M, R, Q): every retrained model's measurement.
    - ``train_loss`` (M, R): final training loss of each model on its subset.
    - ``query_loss`` (M, R): mean query loss; ``query_accuracy`` (M, R) or None.
    - ``base``: the base model's ``train_loss``, ``query_loss``, ``query_accuracy``;
      ``base_params``: its trained weights (and a ``train_fn``'s floating buffers;
      :meth:`base_model` builds the module), ``base_fingerprint`` its
      :func:`curvinf.params.model_fingerprint`, ``base_structure`` its
      :func:`curvinf.models.model_structure`. It is trained by
      :func:`curvinf.training.train` on all the data with ``config.recipe`` (or by
      ``config.train_fn``).
    - ``warnings``: health problems (retrained models far from the base model,
      ground truth dominated by seed noise); empty when none.
    - ``path``: the store directory; ``manifest``: its manifest.
    - ``models_trained``: models this call trained (0 when fully loaded).
    """

    truth: torch.Tensor
    masks: torch.Tensor
    seeds: torch.Tensor
    measurements: torch.Tensor
    train_loss: torch.Tensor
    query_loss: torch.Tensor
    query_accuracy: torch.Tensor | None
    base: dict[str, float]
    warnings: list[str]
    path: Path
    manifest: dict[str, Any]
    models_trained: int
    config: GroundTruthConfig
    base_params: dict[str, torch.Tensor] = field(default_factory=dict)
    base_fingerprint: str = ""
    base_structure: dict[str, Any] = field(default_factory=dict)

    def base_model(self, data: DataSplit) -> nn.Module:
        """The trained base model (``config.make_model(data)`` holding ``base_params``)."""
        model = self.config.make_model(data)
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if name in self.base_params:
                    t.copy_(self.base_params[name])
        return model

    def lds(
        self, scores: torch.Tensor, *, model: nn.Module | str | None = None, **kwargs: Any
    ) -> LDSResult:
        """:func:`curvinf.lds.lds` of ``scores`` (Q, N) against this ground truth.

        ``scores`` must be (queries, training points) of this ground truth's data.
        ``model``: the model the scores were computed from (or its
        :func:`curvinf.params.model_fingerprint`); when given, it must be this ground
        truth's trained base model (:meth:`base_model`), else ``ValueError``: LDS compares
        the scores with retraining of that model, and means nothing for another.
        """
        Q, N = self.truth.shape[1], self.masks.shape[1]
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (Q, N):
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores)
            raise ValueError(
                f"scores must be (queries, training points) = ({Q}, {N}) for this ground "
                f"truth, got {got}; score its queries against all its training points"
                + (" (transpose the scores)" if got == (N, Q) else "")
                + "."
            )
        if model is not None:
            self.check_model(model)
        return lds(scores, self.masks, self.truth, **kwargs)

    def check_model(self, model: nn.Module | str) -> None:
        """``ValueError`` unless ``model`` (or a fingerprint) is this ground truth's trained
        base model: same structure and trained weights (:func:`model_fingerprint`)."""
        fingerprint = model if isinstance(model, str) else model_fingerprint(model)
        if fingerprint == self.base_fingerprint:
            return
        base = self.base_structure
        if (
            isinstance(model, nn.Module)
            and model_structure(model)["structure"] != base["structure"]
        ):
            raise ValueError(
                f"the scores' model ({type(model).__name__}, {count_trainable(model)} "
                f"parameters) is not the ground truth's ({base['class']}, "
                f"{base['num_params']} parameters): its LDS would compare them with retraining "
                "of another architecture. Build the ground truth of your model "
                "(GroundTruthConfig(model=...))."
            )
        raise ValueError(
            f"the scores' model (fingerprint {fingerprint}) is not the ground truth's trained "
            f"base model ({self.base_fingerprint}): same architecture at most, other weights. "
            "Score gt.base_model(data), or build the ground truth of the model you scored "
            "(its initial weights and training)."
        )

    def summary(self) -> dict[str, Any]:
        """The manifest's ``summary``: base and median retrained metrics, mean truth, warnings."""
        acc = self.query_accuracy
        return {
            "base": self.base,
            "retrained_median": {
                "train_loss": float(self.train_loss.median()),
                "query_loss": float(self.query_loss.median()),
                "query_accuracy": None if acc is None else float(acc.median()),
            },
            "truth_mean": float(self.truth.mean()),
            "warnings": self.warnings,
        }


def check_fraction(name: str, value: object) -> float:
    """``value`` as a float if it is a number strictly between 0 and 1; else raise naming it."""
    v = check_number(name, value, low=0.0, high=1.0, strict_low=True)
    if v >= 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {value!r}.")
    return v


def take_queries(data: DataSplit, num_queries: int, name: str = "num_queries") -> DataSplit:
    """``data`` with only its first ``num_queries`` query points (0: all of them).

    Refuses a negative count and more queries than ``data`` has (a slice would silently
    take fewer).
    """
    check_int(name, num_queries, low=0)
    available = len(data.X_query)
    if num_queries > available:
        raise ValueError(
            f"{name} is {num_queries} but {data.name} has {available} query points; pass at "
            f"most {available} (0: all)."
        )
    if num_queries in (0, available):
        return data
    return replace(data, X_query=data.X_query[:num_queries], y_query=data.y_query[:num_queries])


def retrain_seed(seed: int, subset: int, replicate: int, purpose: str = "batches") -> int:
    """A 31-bit seed for model ``(subset, replicate)``: a hash, independent of M and R."""
    digest = hashlib.sha256(f"curvinf/{purpose}/{seed}/{subset}/{replicate}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def retrain_seeds(
    seed: int, num_subsets: int, num_seeds: int, purpose: str = "batches"
) -> torch.Tensor:
    """(M, R) int64 matrix of :func:`retrain_seed`, on the CPU."""
    return torch.tensor(
        [[retrain_seed(seed, j, r, purpose) for r in range(num_seeds)] for j in range(num_subsets)],
        dtype=torch.int64,
        device="cpu",
    )


def data_fingerprint(data: DataSplit) -> dict[str, Any]:
    """What identifies a split: its name, task, seed, shapes and a sha256 of its tensors."""
    return {
        "name": data.name,
        "task": data.task,
        "seed": data.seed,
        "n_train": len(data.X_train),
        "n_query": len(data.X_query),
        "num_features": data.num_features,
        "num_outputs": data.num_outputs,
        "sha256": tensor_digest(data.X_train, data.y_train, data.X_query, data.y_query),
    }


def store_request(config: GroundTruthConfig, data: DataSplit) -> dict[str, Any]:
    """The manifest's ``request``: everything that determines the numbers (hashed into the key).

    The library's MLP trained by ``recipe`` gives the request it always gave (so existing
    stores keep their keys); a user's model is described by :func:`model_identity`, a
    ``train_fn`` by :func:`function_identity` in place of ``recipe`` (and no epochs).
    """
    n = len(data.X_train)
    size = subset_size(n, config.alpha)
    sub = subset_recipe(config.recipe, n, size, config.matched_steps)
    if config.model is not None:
        model = model_identity(config, config.make_model(data))
    else:
        model = {
            "kind": "mlp",
            "depth": config.depth,
            "width": config.width,
            "activation": config.activation,
            "seed": config.model_seed,
            "dtype": config.dtype,
            **({} if config.init == "torch" else {"init": config.init}),
        }
    if config.train_fn is None:
        training = {"recipe": config.recipe.to_dict()}
        epochs = {"epochs": sub.epochs}
    else:
        training, epochs = {"training": function_identity(config.train_fn)}, {}
    return {
        "format": FORMAT,
        "data": data_fingerprint(data),
        "model": model,
        **training,
        "loss": config.loss,
        "measure": config.measure,
        "subsets": {
            "num_subsets": config.num_subsets,
            "alpha": config.alpha,
            "size": size,
            "seed": config.seed,
        },
        "retraining": {
            "num_seeds": config.num_seeds,
            "seed": config.seed,
            "matched_steps": config.matched_steps,
            **epochs,
            "vary_init": config.vary_init,
        },
    }


def store_name(config: GroundTruthConfig, data: DataSplit) -> str:
    """The store directory: ``<data>-d<depth>w<width><activation>-e<epochs>-M<M>R<R>-<measure>-
    <hash12>``; a user's model puts its class name in place of ``d<depth>w<width>...``, a
    ``train_fn`` ``fn-<its name>`` in place of ``e<epochs>``."""
    key = request_hash(store_request(config, data))
    if config.model is None:
        model = f"d{config.depth}w{config.width}{config.activation}"
    else:
        model = _safe(type(config.make_model(data)).__name__)
    train = f"e{config.recipe.epochs}"
    if config.train_fn is not None:
        train = "fn-" + _safe(_name(config.train_fn).rsplit(".", 1)[-1])
    size = f"M{config.num_subsets}R{config.num_seeds}"
    return f"{data.name}-{model}-{train}-{size}-{config.measure}-{key[:12]}"


def _safe(name: str) -> str:
    """``name`` reduced to a short file-name part."""
    return re.sub(r"[^A-Za-z0-9_]", "", name)[:32] or "model"


def _request_data(data: DataSplit, config: GroundTruthConfig) -> DataSplit:
    """``data`` as :func:`ground_truth` hashes it (checked, on the CPU, in the model's dtype)."""
    if isinstance(data, DataSplit):
        data = data.to(device="cpu")
    return _checked_inputs(data, config, None, DEFAULT_MEMORY_BYTES, 2.0, 0.1)[0]


def store_location(data: DataSplit, config: GroundTruthConfig, store_dir: str | Path) -> Path:
    """The directory :func:`ground_truth` builds ``config``'s store in under ``store_dir``
    (nothing is read or written: it may not exist yet)."""
    return store_path(Path(store_dir), store_name(config, _request_data(data, config)))


def store_key(data: DataSplit, config: GroundTruthConfig) -> str:
    """The request hash a store of ``config`` on ``data`` has (its manifest's ``key``):
    equal keys mean the same data, model, recipe, subsets and seeds."""
    return request_hash(store_request(config, _request_data(data, config)))


def ground_truth(
    data: DataSplit,
    config: GroundTruthConfig,
    store_dir: str | Path,
    *,
    progress: bool = True,
    models_per_chunk: int | None = None,
    max_memory_bytes: float = DEFAULT_MEMORY_BYTES,
    repair: bool = False,
    warn_factor: float = 2.0,
    warn_margin: float = 0.1,
    log: Callable[[str], None] | None = None,
    executor: Executor | None = None,
    device: DeviceSpec = "cpu",
) -> GroundTruth:
    """Build, resume or load the LDS ground truth of ``config`` on ``data``.

    A finished store is loaded without taking its lock or writing anything, so it can
    be read from a read-only directory; building or resuming needs write access.

    Args:
        data: the train/query split (queries are every row of ``data.X_query``).
        config: model, recipe, measurement, subsets and seeds.
        store_dir: parent directory; the store is ``store_dir/<store_name>``.
            If ``store_dir`` itself holds a ``manifest.json`` (or is named like the
            store) it is used as the store, and must match the request.
        progress: draw a progress bar over models x epochs.
        models_per_chunk: models trained together and written as one file;
            default: as many as ``max_memory_bytes`` allows, at most 100, chunks
            of equal size. An existing store keeps the layout it was created with,
            and a manifest rebuilt after it was lost takes the layout of the chunk
            files on disk.
        max_memory_bytes: memory budget of one chunk (rough estimate,
            :func:`curvinf.retrain.bytes_per_model`); a finite number > 0.
        repair: recompute corrupt or missing chunk files (and a corrupt
            manifest) with a message, instead of raising.
        warn_factor, warn_margin: a retrained metric ``a`` is "far" from the
            base model's ``b`` when ``a > warn_factor * b + warn_margin``
            (median over retrained models; losses).
        log: where messages go (default: stderr).
        executor: where the chunks train (:mod:`curvinf.executors`; default: in this
            process, or :func:`curvinf.executors.chunks_on`'s). Whatever trains a chunk,
            this process alone writes the store, each chunk as it arrives; a chunk trains
            from its inputs only, so the numbers are the same on every executor whose
            tasks run with the same torch thread count.
        device: where the models are trained and measured (``"cpu"``, ``"cuda"``,
            ``"cuda:N"``, ``"auto"``: :func:`curvinf.devices.resolve_device`), in the
            config's dtype (float32 by default). The request, its hash and the stored
            tensors do not depend on it (the data and model are hashed, and every file
            written, on the CPU; the returned :class:`GroundTruth` holds CPU tensors); the
            manifest records the device type, and a store started on one device type is
            not resumed on another (CPU and CUDA round differently). A finished store
            loads on any device.

    Returns:
        :class:`GroundTruth`. The manifest's ``summary`` is written by the run that
        completes the store; ``GroundTruth.warnings`` uses this call's thresholds.

    Raises:
        ValueError: the store at ``store_dir`` was built for another request, or an
            argument is out of range (``TypeError`` for a wrong type).
        CorruptFileError: a store file is damaged and ``repair`` is False.
        FloatingPointError: a retrained model diverged.
        NotADirectoryError, PermissionError: ``store_dir`` is a file, or the store
            must be written and cannot be.
        StoreBusyError: another process is building the same store.
    """
    say = log or (lambda msg: print(msg, file=sys.stderr))
    target = resolve_device(device)
    if isinstance(data, DataSplit):
        data = data.to(device="cpu")  # checked, hashed and stored on the CPU
    data, model, loss = _checked_inputs(
        data, config, models_per_chunk, max_memory_bytes, warn_factor, warn_margin
    )
    executor = executor or chunk_executor()
    _check_shippable(config, executor)
    if target.type == "cuda" and getattr(executor, "num_gpus", None) == 0:
        raise ValueError(
            f"device={str(device)!r} with Ray tasks that declare no GPU (num_gpus=0): Ray hides "
            "every GPU from such a task. Use RayExecutor(..., num_gpus=1), or "
            "make_executor('ray', device='cuda') (CLI: --executor ray --device cuda)."
        )
    request = store_request(config, data)
    key = request_hash(request)
    path = store_path(check_directory(store_dir, name="store_dir"), store_name(config, data))
    stored = stored_manifest(path)
    if stored is not None:
        check_request(stored, request, key, path)
        finished = _load_finished(path, stored, config, data, warn_factor, warn_margin)
        if finished is not None:
            return finished
    with locked_store(path, say):
        manifest = open_manifest(
            path,
            request,
            key,
            config.num_models,
            models_per_chunk,
            lambda: _default_chunk(config, data, config.make_model(data), max_memory_bytes),
            repair,
            say,
            device=target.type,
        )
        run = _Run(path, manifest, config, data, model, loss, executor, target)
        return _build(run, progress, repair, warn_factor, warn_margin, say)


def _check_shippable(config: GroundTruthConfig, executor: Executor) -> None:
    """A user's ``train_fn`` / model factory must reach spawned worker processes, which
    import it by name: refuse one ``pickle`` cannot send (a lambda, a function defined
    inside another) before any work. Ray pickles by value and takes both."""
    if executor.in_process or executor.name == "ray":
        return
    for name in ("train_fn", "model"):
        obj = getattr(config, name)
        if obj is None:
            continue
        try:
            pickle.dumps(obj)
        except (pickle.PicklingError, AttributeError, TypeError) as err:
            raise ValueError(
                f"{name}={_name(obj)} cannot be sent to the executor's worker processes "
                f"({err}); define it at module level in an importable module, or train in "
                "this process (LocalExecutor(workers=1))."
            ) from None


def _checked_inputs(
    data: DataSplit,
    config: GroundTruthConfig,
    models_per_chunk: int | None,
    max_memory_bytes: float,
    warn_factor: float,
    warn_margin: float,
) -> tuple[DataSplit, nn.Module, nn.Module]:
    """Check :func:`ground_truth`'s arguments; return the data in the config's dtype, the
    base model at initialisation and the loss."""
    if not isinstance(config, GroundTruthConfig):
        raise TypeError(f"config must be a GroundTruthConfig, got {type(config).__name__}.")
    if not isinstance(data, DataSplit):
        raise TypeError(
            f"data must be a DataSplit (curvinf.load_dataset), got {type(data).__name__}."
        )
    if models_per_chunk is not None:
        check_int("models_per_chunk", models_per_chunk, low=1)
    check_number("max_memory_bytes", max_memory_bytes, low=0.0, strict_low=True)
    check_number("warn_factor", warn_factor, low=0.0)
    check_number("warn_margin", warn_margin)
    if config.model is not None:
        return _checked_user_inputs(data, config)
    data = data.to(DTYPES[config.dtype])
    loss = config.make_loss()
    model = config.make_model(data)
    check_xy(*data.train, name="train", model=model)
    check_xy(*data.query, name="query", model=model)
    if config.loss == "ce" and data.task != "classification":
        raise ValueError(
            f"loss='ce' needs a classification dataset; {data.name} is a regression task: "
            "use loss='mse'."
        )
    check_targets(config.loss, data.num_outputs, data.y_train, "train y")
    return data, model, loss


def _checked_user_inputs(
    data: DataSplit, config: GroundTruthConfig
) -> tuple[DataSplit, nn.Module, nn.Module]:
    """:func:`_checked_inputs` for a user's model: build it, cast the data's floating tensors
    to its dtype, check that both splits fit it and that its factory is reproducible."""
    model = config.make_model(data)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters; there is nothing to retrain.")
    dtype = next(p.dtype for p in model.parameters() if p.requires_grad)
    data = _cast_floating(data, dtype)
    loss = config.make_loss()
    with warnings.catch_warnings():
        if config.train_fn is not None:  # a train_fn may train in train mode (dropout)
            warnings.filterwarnings("ignore", message=r".*in train mode", category=UserWarning)
        training_model(model, loss, *data.train)
        training_model(model, loss, *data.query)
    again = config.make_model(data)
    if model_fingerprint(again) != model_fingerprint(model):
        raise ValueError(
            "the model factory built different initial weights in two calls under "
            f"torch.manual_seed({config.model_seed}); a store must know its model's start: "
            "draw the weights from torch's global RNG (the default), seed them inside the "
            "factory, or pass the built module as model=."
        )
    return data, model, loss


def _cast_floating(data: DataSplit, dtype: torch.dtype) -> DataSplit:
    """``data`` with its floating tensors in ``dtype`` (integer inputs and labels kept)."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    return replace(
        data,
        X_train=cast(data.X_train),
        y_train=cast(data.y_train),
        X_query=cast(data.X_query),
        y_query=cast(data.y_query),
    )


def _load_finished(
    path: Path,
    manifest: dict[str, Any],
    config: GroundTruthConfig,
    data: DataSplit,
    warn_factor: float,
    warn_margin: float,
) -> GroundTruth | None:
    """A finished store read without its lock and without writing, or None if the manifest
    does not say it is complete or any file fails to verify (the locked path then decides)."""
    blobs = read_finished(path, manifest)
    if blobs is None:
        return None
    base, chunks = blobs
    return _assemble(path, manifest, config, data, base, chunks, warn_factor, warn_margin, 0)


def _default_chunk(
    config: GroundTruthConfig, data: DataSplit, model: nn.Module, max_memory_bytes: float
) -> int:
    """Models per chunk: as many as the memory budget allows, at most 100 (a ``train_fn``'s
    run one by one: at most 10) and at most :data:`CHUNK_FLOPS` of training, so a crash
    loses little; in chunks of equal size."""
    example = None if config.model is None else data.X_train[:1]
    per_model = bytes_per_model(
        model, len(data.X_train), len(data.X_query), config.recipe.batch_size, example=example
    )
    most = DEFAULT_MAX_CHUNK if config.train_fn is None else DEFAULT_FN_CHUNK
    _, _, sub = _retraining_plan(config, len(data.X_train))
    seen = subset_size(len(data.X_train), config.alpha) * sub.epochs  # examples per model
    flops = 6.0 * count_trainable(model) * seen
    cap = max(1, min(most, int(max_memory_bytes // per_model), int(CHUNK_FLOPS // flops)))
    num_chunks = math.ceil(config.num_models / cap)
    return math.ceil(config.num_models / num_chunks)


def _retraining_plan(
    config: GroundTruthConfig, n: int
) -> tuple[torch.Tensor, torch.Tensor, TrainingRecipe]:
    """The (M, N) subset masks, the (M, R) batch seeds and the retraining recipe."""
    masks = make_subsets(n, config.num_subsets, config.alpha, config.seed)
    seeds = retrain_seeds(config.seed, config.num_subsets, config.num_seeds)
    sub = subset_recipe(config.recipe, n, int(masks[0].sum()), config.matched_steps)
    return masks, seeds, sub


def _build(
    run: _Run,
    progress: bool,
    repair: bool,
    warn_factor: float,
    warn_margin: float,
    say: Callable[[str], None],
) -> GroundTruth:
    """Under the store's lock: train what the store lacks (the base model, then the
    missing chunks), assemble the ground truth and record its summary."""
    path, manifest = run.path, run.manifest
    base = read_base(path, manifest["key"], repair, say)
    if base is None:
        base = run.train_base()
    chunks = read_chunks(path, manifest, repair, say)
    manifest["progress"]["chunks_done"] = sorted(chunks)
    manifest["progress"]["models_done"] = models_in(manifest, chunks)
    run.train_missing(chunks, progress, say)

    was_complete = manifest["progress"]["complete"]
    old_summary = manifest.get("summary")
    manifest["progress"]["complete"] = True
    gt = _assemble(
        path,
        manifest,
        run.config,
        run.data,
        base,
        chunks,
        warn_factor,
        warn_margin,
        run.models_trained,
    )
    manifest["summary"] = gt.summary()
    if not was_complete or json.loads(json.dumps(manifest["summary"])) != old_summary:
        run.save(worked=False)  # a plain load of a finished store writes nothing
    return gt


class _Run:
    """One build of the store ``path``: trains the base model and the missing chunks, and
    keeps this run's entry in the manifest's ``runs`` and the store's cost up to date."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        config: GroundTruthConfig,
        data: DataSplit,
        model: nn.Module,
        loss: nn.Module,
        executor: Executor,
        device: torch.device = CPU,
    ) -> None:
        self.path, self.manifest, self.config = path, manifest, config
        self.data, self.model, self.loss = data, model, loss  # on the CPU
        self.executor = executor
        self.device = device  # where models train and are measured
        self.plan = _retraining_plan(config, len(data.X_train))
        self.record: dict[str, Any] = {
            "started": utc_now(),
            "wall_s": 0.0,
            "models_trained": 0,
            "chunks_written": [],
            "torch_threads": executor.threads or torch.get_num_threads(),
        }
        if not executor.in_process:  # in-process runs keep the record they always had
            self.record["executor"] = executor.name
        if device.type != "cpu":  # CPU runs too
            self.record["device"] = describe_device(device)
        self.start_time = time.perf_counter()

    @property
    def models_trained(self) -> int:
        return self.record["models_trained"]

    def save(self, worked: bool = True) -> None:
        """Write the manifest with this run's wall time (listing the run if it ``worked``)."""
        manifest, record = self.manifest, self.record
        if worked and not any(r is record for r in manifest["runs"]):
            manifest["runs"].append(record)  # loads that train nothing are not runs
        record["wall_s"] = round(time.perf_counter() - self.start_time, 3)
        manifest["cost"]["wall_s_total"] = round(sum(r["wall_s"] for r in manifest["runs"]), 3)
        write_manifest(self.path, manifest)

    def train_base(self) -> dict[str, Any]:
        """Train the base model once on all the data by the ordinary path (:func:`train`),
        measure it, write ``base.pt`` and record its cost."""
        config, loss, device = self.config, self.loss, self.device
        data, model = self.data.to(device=device), model_on(self.model, device)
        X, y = data.train
        t0 = time.perf_counter()
        if config.train_fn is None:
            trained = train(model, loss, X, y, config.recipe).model
            params = {k: v.detach()[None] for k, v in trained.named_parameters()}
        else:
            start = copy.deepcopy(model)  # the train_fn may train it in place
            trained = _call_train_fn(config.train_fn, start, X, y, config.seed, "the base model")
            params = {k: v[None].to(device) for k, v in trained.items()}
        everything = torch.ones(1, len(X), dtype=torch.bool, device="cpu")  # masks: CPU
        base = {
            "key": self.manifest["key"],
            "params": {k: v[0].clone() for k, v in params.items()},
            **_metrics(model, loss, params, data, everything, config.measure),
        }
        base = _on_cpu(base)  # stored on the CPU, whatever the device
        write_blob(self.path / BASE, base)
        self.manifest["cost"]["base_wall_s"] = round(time.perf_counter() - t0, 3)
        self.save()
        return base

    def train_missing(
        self, chunks: dict[int, dict], progress: bool, say: Callable[[str], None]
    ) -> None:
        """Train every chunk not in ``chunks`` (adding it there); each file is written
        before the manifest records it."""
        manifest = self.manifest
        todo = [c for c in range(manifest["layout"]["num_chunks"]) if c not in chunks]
        if not todo:
            return
        masks, seeds, sub = self.plan
        done = manifest["progress"]["models_done"]
        if done:
            say(
                f"resuming {self.path.name}: {done} of {self.config.num_models} models "
                "already trained"
            )
        remaining = models_in(manifest, todo)
        desc = f"retraining {remaining} models x {sub.epochs} epochs"
        units = sub.epochs
        if self.config.train_fn is not None:
            desc, units = f"retraining {remaining} models by train_fn", 1
        executor = self.executor
        spans = [(c, *chunk_range(manifest, c)) for c in todo]
        with progress_bar(remaining * units, desc, progress) as advance:
            task = functools.partial(_chunk_task, advance=advance)
            # another process (a Ray task given its own GPU) trains on its current device
            device = self.device if executor.in_process else torch.device(self.device.type)
            shared = (self.config, self.data, self.model, self.loss, self.plan, device)
            for (c, a, b), (blob, wall, cpu) in executor.map(
                task if executor.in_process else _chunk_task, spans, *shared
            ):
                if not executor.in_process:
                    advance((b - a) * units)
                blob.update(
                    key=manifest["key"], start=a, stop=b, wall_s=round(wall, 3), cpu_s=round(cpu, 3)
                )
                write_blob(chunk_path(self.path, c), blob)  # the driver alone writes
                chunks[c] = blob
                self._chunk_written(c, b - a, wall, cpu)

    def _chunk_written(self, index: int, models: int, wall: float, cpu: float) -> None:
        """Record chunk ``index`` (``models`` models, ``wall``/``cpu`` seconds) as done; save."""
        progress, cost = self.manifest["progress"], self.manifest["cost"]
        progress["chunks_done"] = sorted({*progress["chunks_done"], index})
        progress["models_done"] += models
        cost["models_trained_total"] += models
        cost["retrain_wall_s"] = round(cost.get("retrain_wall_s", 0.0) + wall, 3)
        cost["retrain_cpu_s"] = round(cost.get("retrain_cpu_s", 0.0) + cpu, 3)
        self.record["models_trained"] += models
        self.record["chunks_written"].append(index)
        self.save()


def _assemble(
    path: Path,
    manifest: dict[str, Any],
    config: GroundTruthConfig,
    data: DataSplit,
    base: dict[str, Any],
    chunks: dict[int, dict],
    warn_factor: float,
    warn_margin: float,
    models_trained: int,
) -> GroundTruth:
    """The :class:`GroundTruth` of verified ``base`` and ``chunks`` blobs (every chunk),
    with health warnings under this call's thresholds (also issued as warnings)."""
    masks, seeds, sub = _retraining_plan(config, len(data.X_train))
    M, R = config.num_subsets, config.num_seeds
    order = range(manifest["layout"]["num_chunks"])
    cat = {
        k: torch.cat([chunks[c][k] for c in order])
        for k in ("measurements", "train_loss", "query_loss")
    }
    measurements = cat["measurements"].reshape(M, R, -1)
    train_loss = cat["train_loss"].reshape(M, R)
    query_loss = cat["query_loss"].reshape(M, R)
    query_accuracy = None
    if chunks[0].get("query_accuracy") is not None:
        query_accuracy = torch.cat([chunks[c]["query_accuracy"] for c in order]).reshape(M, R)
    base_metrics = {k: float(base[k][0]) for k in ("train_loss", "query_loss")}
    base_metrics["query_accuracy"] = (
        float(base["query_accuracy"][0]) if base.get("query_accuracy") is not None else None
    )
    found = health_warnings(
        base_metrics,
        train_loss,
        query_loss,
        query_accuracy,
        measurements,
        epochs=sub.epochs,
        matched_steps=config.matched_steps,
        factor=warn_factor,
        margin=warn_margin,
        chance_loss=chance_loss(data, config.loss),
    )
    for msg in found:
        warnings.warn(msg, RetrainingWarning, stacklevel=4)
    gt = GroundTruth(
        truth=measurements.mean(1),
        masks=masks,
        seeds=seeds,
        measurements=measurements,
        train_loss=train_loss,
        query_loss=query_loss,
        query_accuracy=query_accuracy,
        base=base_metrics,
        warnings=found,
        path=path,
        manifest=manifest,
        models_trained=models_trained,
        config=config,
        base_params=base["params"],
    )
    trained_base = gt.base_model(data)
    gt.base_fingerprint = model_fingerprint(trained_base)
    gt.base_structure = model_structure(trained_base)
    return gt


def _chunk_task(
    span: tuple[int, int, int],
    config: GroundTruthConfig,
    data: DataSplit,
    model: nn.Module,
    loss: nn.Module,
    plan: tuple[torch.Tensor, torch.Tensor, TrainingRecipe],
    device: torch.device = CPU,
    advance: Callable[[int], None] = lambda n: None,
) -> tuple[dict[str, Any], float, float]:
    """Chunk ``span = (index, start, stop)`` trained and measured from its inputs alone (an
    executor's task; it writes nothing) on ``device`` (``data`` and ``model`` come on the
    CPU and are moved there): its blob, on the CPU, and its wall and CPU seconds."""
    _, start, stop = span
    masks, seeds, recipe = plan
    t0, c0 = time.perf_counter(), time.process_time()
    data, model = data.to(device=device), model_on(model, device)
    blob = _train_chunk(config, data, model, loss, masks, seeds, recipe, start, stop, advance)
    return _on_cpu(blob), time.perf_counter() - t0, time.process_time() - c0


def _train_chunk(
    config: GroundTruthConfig,
    data: DataSplit,
    model: nn.Module,
    loss: nn.Module,
    masks: torch.Tensor,
    seeds: torch.Tensor,
    recipe: TrainingRecipe,
    start: int,
    stop: int,
    advance: Callable[[int], None],
) -> dict[str, Any]:
    """Train models ``start..stop-1`` together (a ``train_fn``: one after another) and
    measure them, where ``data`` and ``model`` are (``masks`` and ``seeds``: the CPU)."""
    R = config.num_seeds
    device = data.X_train.device
    ids = torch.arange(start, stop, device="cpu")
    subsets = masks[ids // R]
    if config.train_fn is not None:
        X, y = data.train
        states = []
        for i in range(start, stop):
            j, r = divmod(i, R)
            init_model = copy.deepcopy(model)
            if config.vary_init:
                seed = retrain_seed(config.seed, j, r, "init")
                init_model = replace(config, model_seed=seed).make_model(data).to(device)
            rows = masks[j].nonzero().squeeze(1).to(device)
            what = f"model {i} (subset {j}, seed {r})"
            states.append(
                _call_train_fn(
                    config.train_fn, init_model, X[rows], y[rows], int(seeds[j, r]), what
                )
            )
            advance(1)
        params = {k: torch.stack([s[k] for s in states]).to(device) for k in states[0]}
        return _metrics(model, loss, params, data, subsets, config.measure)
    init = None
    if config.vary_init:
        init_seeds = [retrain_seed(config.seed, int(i) // R, int(i) % R, "init") for i in ids]
        init = stack_params([replace(config, model_seed=s).make_model(data) for s in init_seeds])
    try:
        result = train_many(
            model,
            loss,
            *data.train,
            recipe,
            subsets=subsets,
            seeds=seeds.reshape(-1)[ids],
            init=init,
            on_epoch=advance,
            device=device,
        )
    except FloatingPointError as err:
        raise FloatingPointError(
            f"{err} (models {start}..{stop - 1} of this chunk; model i is subset i // {R}, "
            f"seed i % {R}). The retrained models must train stably in the base recipe: lower "
            "the learning rate, or check the base model's recipe."
        ) from err
    return _metrics(model, loss, result.params, data, subsets, config.measure)


def _call_train_fn(
    train_fn: TrainFn, model: nn.Module, X: torch.Tensor, y: torch.Tensor, seed: int, what: str
) -> dict[str, torch.Tensor]:
    """``train_fn(model, X, y, seed)`` under ``torch.manual_seed(seed)`` (the global RNG
    restored after); the trained parameters and floating buffers, checked to be finite and
    shaped as ``model``'s."""
    want = _state(model)
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        trained = train_fn(model, X, y, seed)
    if not isinstance(trained, nn.Module):
        raise TypeError(
            f"train_fn returned {type(trained).__name__} for {what}; it must return the trained "
            "nn.Module (training the model it is given in place and returning it will do)."
        )
    state = _state(trained)
    shapes = {k: (v.shape, v.dtype) for k, v in state.items()}
    if shapes != {k: (v.shape, v.dtype) for k, v in want.items()}:
        raise ValueError(
            f"train_fn returned a model for {what} whose parameters and buffers differ from the "
            f"model it was given (names, shapes or dtypes: {sorted(set(shapes) ^ set(want))[:5]} "
            "differ, or a shape or dtype); return the model it was given, trained."
        )
    bad = [k for k, v in state.items() if not bool(v.isfinite().all())]
    if bad:
        raise FloatingPointError(
            f"train_fn diverged for {what}: non-finite values in {', '.join(bad[:5])}; lower "
            "its learning rate."
        )
    return state


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of ``model``'s parameters and floating buffers (on the CPU)."""
    items = [*model.named_parameters(), *model.named_buffers()]
    return {k: v.detach().cpu().clone() for k, v in items if v.is_floating_point()}


def _metrics(
    model: nn.Module,
    loss: nn.Module,
    params: dict[str, torch.Tensor],
    data: DataSplit,
    subsets: torch.Tensor,
    measure: str,
) -> dict[str, Any]:
    """Per stacked model: query measurements (K, Q), subset train loss, query loss and accuracy."""
    X, y = data.train
    Xq, yq = data.query
    per_example = losses_many(model, loss, params, X, y)  # (K, N)
    w = subsets.to(per_example.device, per_example.dtype)
    return {
        "measurements": measure_many(model, loss, params, Xq, yq, measure),
        "train_loss": (per_example * w).sum(1) / w.sum(1),
        "query_loss": losses_many(model, loss, params, Xq, yq).mean(1),
        "query_accuracy": accuracy_many(model, params, Xq, yq)
        if data.task == "classification"
        else None,
    }


def _on_cpu(blob: dict[str, Any]) -> dict[str, Any]:
    """``blob`` with every tensor (also inside nested dicts) on the CPU: what a store holds
    and what an executor's task sends back. CPU tensors are kept as they are."""
    return {
        k: _on_cpu(v) if isinstance(v, dict) else v.cpu() if torch.is_tensor(v) else v
        for k, v in blob.items()
    }


CHANCE_FRACTION = 0.9
"""A base model whose training loss is at least this fraction of :func:`chance_loss` is
reported as not having learned (:func:`health_warnings`)."""


def chance_loss(data: DataSplit, loss: str) -> float | None:
    """The mean cross-entropy of predicting the training labels' frequencies (their entropy,
    nats): the training loss of a classifier that learned nothing. ``None`` for ``mse``."""
    if loss != "ce":
        return None
    counts = torch.bincount(data.y_train.reshape(-1).long()).to(torch.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def at_chance(train_loss: float, chance: float | None) -> bool:
    """Whether a model with training loss ``train_loss`` has learned next to nothing: at
    least ``CHANCE_FRACTION`` of the ``chance`` loss (:func:`chance_loss`; never for None)."""
    return chance is not None and train_loss >= CHANCE_FRACTION * chance


def health_warnings(
    base: dict[str, float | None],
    train_loss: torch.Tensor,
    query_loss: torch.Tensor,
    query_accuracy: torch.Tensor | None,
    measurements: torch.Tensor,
    *,
    epochs: int,
    matched_steps: bool,
    factor: float = 2.0,
    margin: float = 0.1,
    chance_loss: float | None = None,
) -> list[str]:
    """Why the ground truth may not mean much; empty when it looks healthy.

    - The base model's training loss at least ``CHANCE_FRACTION`` of ``chance_loss`` (the
      loss of predicting the training labels' frequencies, :func:`chance_loss`): the
      model has learned next to nothing, and attribution on it says nothing about the
      rungs.
    - Median retrained training loss (on its subset) or query loss above
      ``factor * base + margin``: the retrained models have not trained like
      the base model, and LDS against them measures little.
    - Median query accuracy more than 10 points below the base model's.
    - Seed noise (:func:`curvinf.noise.seed_noise`): for most queries, the variance of the
      seed mean (``Var_r / R``) exceeds the signal variance across subsets (the truth's
      variance less that noise), so a perfect predictor's correlation is below ~0.71.
    """
    found = []
    if at_chance(base["train_loss"], chance_loss):
        found.append(
            f"the base model has not learned: training loss {base['train_loss']:.4g} against "
            f"{chance_loss:.4g} for predicting the training labels' frequencies (chance); "
            "attribution on a model at chance says nothing about the curvature. Fix: train "
            "longer, with a larger learning rate or another initialisation."
        )
    hint = "train longer or with a larger learning rate" + (
        ""
        if matched_steps
        else ", or scale steps to the subset size (matched_steps=True, --matched-steps)"
    )
    med_train, med_query = float(train_loss.median()), float(query_loss.median())
    if med_train > factor * base["train_loss"] + margin:
        found.append(
            f"retrained models have not converged: median training loss on their subsets "
            f"{med_train:.4g} against {base['train_loss']:.4g} for the base model on all data "
            f"after {epochs} epochs; LDS against this ground truth measures little. Fix: {hint}."
        )
    if med_query > factor * base["query_loss"] + margin:
        unconverged = bool(found)
        why = (
            hint
            if unconverged
            else "the retrained models fit their subsets but generalise much worse than the "
            "base model (overfitting on less data); consider weight decay, a larger alpha or "
            "fewer epochs"
        )
        found.append(
            f"retrained models are far from the base model: median query loss {med_query:.4g} "
            f"against {base['query_loss']:.4g} for the base model; LDS against this ground truth "
            f"measures little. Fix: {why}."
        )
    if query_accuracy is not None and base.get("query_accuracy") is not None:
        med_acc = float(query_accuracy.median())
        if med_acc < base["query_accuracy"] - 0.1:
            found.append(
                f"retrained models are far less accurate than the base model: median query "
                f"accuracy {med_acc:.3f} against {base['query_accuracy']:.3f}. Fix: {hint}."
            )
    noise = seed_noise(measurements)
    if noise.num_seeds >= 2 and noise.noise_dominated > 0.5:
        found.append(
            f"ground truth is dominated by retraining noise: for "
            f"{100 * noise.noise_dominated:.0f}% of queries the variance of the mean over "
            f"{noise.num_seeds} seeds exceeds the subsets' signal variance (a perfect predictor "
            f"would reach a Pearson correlation of about {noise.mean_ceiling:.2f}); raise the "
            "number of seeds."
        )
    return found


__all__ = [
    "GroundTruth",
    "GroundTruthConfig",
    "RetrainingWarning",
    "TrainFn",
    "at_chance",
    "chance_loss",
    "check_fraction",
    "data_fingerprint",
    "function_identity",
    "model_identity",
    "ground_truth",
    "health_warnings",
    "retrain_seed",
    "retrain_seeds",
    "store_key",
    "store_location",
    "store_name",
    "store_request",
    "take_queries",
]

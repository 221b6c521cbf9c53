"""The one ground-truth path of the study: a configuration's data split and its LDS store.

The grid runner and the regularisation sweep both call :func:`config_ground_truth`, so
both build (or find) the very same store for the same configuration: the store's key
hashes the data split, model, recipe, loss, measurement, subsets and seeds
(:func:`curvinf.groundtruth.store_request`), never the rungs or regularisers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

from torch import nn

from curvinf.architectures import make_cnn, make_transformer
from curvinf.data import MAJORITY, DataSplit, load_dataset
from curvinf.devices import DeviceSpec
from curvinf.groundtruth import (
    GroundTruth,
    GroundTruthConfig,
    RetrainingWarning,
    ground_truth,
    take_queries,
)
from curvinf.storage import StoreBusyError
from curvinf.study.specs import RunConfig


def config_data(config: RunConfig) -> DataSplit:
    """The train/query split of ``config`` (its first ``lds.num_queries`` queries)."""
    data = load_dataset(config.dataset, query_fraction=config.query_fraction, seed=config.seed)
    return take_queries(data, config.lds.num_queries)


def model_factory(config: RunConfig) -> Callable[[], nn.Module]:
    """A function building ``config``'s CNN or transformer at initialisation (seeded by
    ``config.seed``); the MLP is built by :class:`GroundTruthConfig` itself."""
    if config.architecture == "cnn":
        return partial(
            make_cnn,
            64,
            10,
            depth=config.depth,
            width=config.width,
            activation=config.activation,
            seed=config.seed,
        )
    if config.architecture == "transformer":
        vocab, length = MAJORITY["vocab"], MAJORITY["length"]
        return partial(
            make_transformer,
            vocab,
            length,
            vocab,
            depth=config.depth,
            width=config.width,
            seed=config.seed,
        )
    raise ValueError(f"the {config.architecture} is built by GroundTruthConfig, not a factory.")


def groundtruth_config(config: RunConfig) -> GroundTruthConfig:
    """The :class:`GroundTruthConfig` of ``config``: its model, recipe, loss and LDS settings
    (the MLP from its fields, other architectures through :func:`model_factory`)."""
    if config.architecture == "mlp":
        model = {
            "depth": config.depth,
            "width": config.width,
            "activation": config.activation,
            "init": config.init,
        }
    else:
        model = {"model": model_factory(config)}
    return GroundTruthConfig(
        **model,
        model_seed=config.seed,
        recipe=config.recipe_used,
        loss=config.loss_name,
        measure=config.lds.measure,
        num_subsets=config.lds.num_subsets,
        alpha=config.lds.alpha,
        num_seeds=config.lds.num_seeds,
        seed=config.lds.seed,
        matched_steps=config.lds.matched_steps,
    )


def config_ground_truth(
    config: RunConfig,
    store_dir: str | Path,
    *,
    data: DataSplit | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    device: DeviceSpec = "cpu",
) -> GroundTruth:
    """Build, resume or load the ground truth of ``config`` under ``store_dir``, retraining
    on ``device`` (:func:`curvinf.groundtruth.ground_truth`).

    Retraining warnings are not raised here: they stay in ``GroundTruth.warnings`` (and in
    the results table). Raises ``StoreBusyError`` naming the configuration if another
    process is building the store.
    """
    data = config_data(config) if data is None else data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RetrainingWarning)
        try:
            return ground_truth(
                data,
                groundtruth_config(config),
                store_dir,
                progress=progress,
                log=log,
                device=device,
            )
        except StoreBusyError as err:
            raise StoreBusyError(
                f"the ground truth of configuration {config.id} is being built by another "
                f"process (pid {err.pid or 'unknown'})",
                pid=err.pid,
            ) from err


__all__ = ["config_data", "config_ground_truth", "groundtruth_config", "model_factory"]

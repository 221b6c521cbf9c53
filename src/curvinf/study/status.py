"""Where a grid run stands, read from its result directory without locking or writing.

Per configuration of the preset recorded in ``out/grid.json``: models of its ground truth
retrained (of ``M·R``), rungs measured (``runs/<id>/rungs/<rung>.pt``), its state and the
wall seconds recorded so far. States: ``done`` (``rows.json`` written), ``running`` (a
process holds the configuration's or its ground truth's lock; its pid is given),
``partial`` (rungs or retrained models kept for a resume), ``ready`` (the ground truth
complete, no rung measured yet), ``not started``. The work left is
:meth:`~curvinf.study.specs.RunConfig.cost` of the models still to train and, unless done,
the rungs (rough: a factor of 2 either way). ``at_chance``: the stored base model's
training loss is that of a model that learned next to nothing (``chance_loss``,
:func:`curvinf.groundtruth.at_chance`), so its rows say nothing about the rungs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from curvinf.groundtruth import at_chance, chance_loss, store_location
from curvinf.gtstore import stored_manifest
from curvinf.storage import lock_holder, read_json
from curvinf.study.specs import Preset, RunConfig
from curvinf.study.tables import run_dir
from curvinf.study.truth import config_data, groundtruth_config

DONE, RUNNING, PARTIAL, READY, NOT_STARTED = "done", "running", "partial", "ready", "not started"


@dataclass(frozen=True)
class ConfigStatus:
    """One configuration's progress (module doc)."""

    config: str
    models_done: int
    models_total: int
    rungs_done: int
    rungs_total: int
    state: str
    pid: int | None
    seconds: float | None
    seconds_left: float
    base_train_loss: float | None = None
    chance_loss: float | None = None

    @property
    def at_chance(self) -> bool:
        return self.base_train_loss is not None and at_chance(
            self.base_train_loss, self.chance_loss
        )

    @property
    def ground_truth_complete(self) -> bool:
        return self.models_done == self.models_total


def config_status(config: RunConfig, out: str | Path) -> ConfigStatus:
    """The progress of ``config`` in the grid directory ``out`` (module doc)."""
    out = Path(out)
    data = config_data(config)
    store = store_location(data, groundtruth_config(config), out / "groundtruth")
    manifest = stored_manifest(store) or {}
    total = config.lds.num_subsets * config.lds.num_seeds
    progress = manifest.get("progress", {})
    models = total if progress.get("complete") else int(progress.get("models_done", 0))
    rdir = run_dir(out, config.id)
    rungs = sum((rdir / "rungs" / f"{r}.pt").exists() for r in config.rungs)
    timing = rdir / "timing.json"
    seconds = read_json(timing).get("wall_seconds") if timing.exists() else None
    pid = lock_holder(rdir)
    if pid is None and not progress.get("complete"):
        pid = lock_holder(store)
    if (rdir / "rows.json").exists():  # every rung measured (their blobs are not committed)
        state, pid, rungs = DONE, None, len(config.rungs)
    elif pid is not None:
        state = RUNNING
    elif rungs or 0 < models < total:
        state = PARTIAL
    elif models == total:
        state = READY
    else:
        state = NOT_STARTED
    left = 0.0 if state == DONE else config.cost(models_left=total - models)
    base_loss = manifest.get("summary", {}).get("base", {}).get("train_loss")
    chance = chance_loss(data, config.loss_name)
    return ConfigStatus(
        config.id, models, total, rungs, len(config.rungs), state, pid, seconds, left,
        base_loss, chance,
    )  # fmt: skip


def grid_status(out: str | Path) -> tuple[Preset, list[ConfigStatus]]:
    """The preset a grid in ``out`` runs and each of its configurations' progress.

    Raises ``FileNotFoundError`` if ``out`` holds no ``grid.json`` (no grid was started
    there).
    """
    grid = Path(out) / "grid.json"
    if not grid.is_file():
        raise FileNotFoundError(
            f"{grid} not found: {out} holds no grid run; `curvinf reproduce --out {out}` "
            "starts one."
        )
    preset = Preset.from_dict(read_json(grid))
    return preset, [config_status(c, out) for c in preset.configs()]


__all__ = [
    "DONE",
    "NOT_STARTED",
    "PARTIAL",
    "READY",
    "RUNNING",
    "ConfigStatus",
    "config_status",
    "grid_status",
]

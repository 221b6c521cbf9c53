"""The study: what to run (:mod:`.specs`), its tables (:mod:`.tables`), the one
ground-truth path (:mod:`.truth`), the one rung cache with its routes (:mod:`.rungs`),
what is measured per configuration (:mod:`.measure`, :mod:`.compare`), the grid runner
(:mod:`.runner`) and its progress (:mod:`.status`), the regulariser sweep (:mod:`.sweep`),
the same measurements for a model you bring (:mod:`.ladder`) and the report
(:mod:`.report`, which reads stored results only).
"""

from curvinf.study.ladder import LadderResult, LadderSettings, measure_ladder
from curvinf.study.runner import (
    BUSY,
    GROUND_TRUTH_DONE,
    GridRun,
    ReproducePlan,
    collect_rows,
    reproduce,
    reproduce_plan,
    run_config,
    run_grid,
    run_plan,
    select_configs,
)
from curvinf.study.specs import (
    DAMPED,
    PRESETS,
    LDSSettings,
    Preset,
    RunConfig,
    get_preset,
    parse_regularization,
    reg_label,
)
from curvinf.study.status import ConfigStatus, grid_status
from curvinf.study.tables import COLUMNS, COMPARISON_COLUMNS, read_table, write_table
from curvinf.study.truth import config_data, config_ground_truth, groundtruth_config

__all__ = [
    "BUSY",
    "GROUND_TRUTH_DONE",
    "COLUMNS",
    "COMPARISON_COLUMNS",
    "DAMPED",
    "PRESETS",
    "ConfigStatus",
    "GridRun",
    "LDSSettings",
    "LadderResult",
    "LadderSettings",
    "Preset",
    "ReproducePlan",
    "RunConfig",
    "collect_rows",
    "config_data",
    "config_ground_truth",
    "get_preset",
    "grid_status",
    "groundtruth_config",
    "measure_ladder",
    "parse_regularization",
    "read_table",
    "reg_label",
    "reproduce",
    "reproduce_plan",
    "run_config",
    "run_grid",
    "run_plan",
    "select_configs",
    "write_table",
]

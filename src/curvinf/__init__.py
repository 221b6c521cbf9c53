"""curvinf: influence functions with a measurable ladder of curvature approximations."""

from curvinf import lds  # the module; its function is lds_score (no shadowing)
from curvinf.curvature import (
    LADDER,
    METHODS,
    Curvature,
    InverseCurvature,
    Regularization,
    fit_curvature,
)
from curvinf.curvature.regularization import TruncationWarning
from curvinf.data import DataSplit, load_dataset
from curvinf.groundtruth import GroundTruth, GroundTruthConfig, ground_truth
from curvinf.influence import (
    influence_scores,
    per_example_grads,
    self_influence,
    top_k,
    top_k_influences,
)
from curvinf.lds import LDSResult, make_subsets
from curvinf.lds import lds as lds_score
from curvinf.models import make_mlp, num_params
from curvinf.persistence import load_curvature, save_curvature
from curvinf.training import DivergenceWarning, TrainingRecipe, TrainingResult, train

__all__ = [
    "LADDER",
    "METHODS",
    "Curvature",
    "DataSplit",
    "GroundTruth",
    "GroundTruthConfig",
    "LDSResult",
    "InverseCurvature",
    "Regularization",
    "TrainingRecipe",
    "TrainingResult",
    "fit_curvature",
    "ground_truth",
    "influence_scores",
    "lds",
    "lds_score",
    "self_influence",
    "top_k",
    "top_k_influences",
    "TruncationWarning",
    "DivergenceWarning",
    "load_curvature",
    "load_dataset",
    "make_subsets",
    "make_mlp",
    "num_params",
    "per_example_grads",
    "save_curvature",
    "train",
]

__version__ = "0.1.0"

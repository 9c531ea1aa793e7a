"""Models, data, training recipes, the paper's study, the command line, reports and plots."""

from neuralign.experiments.checkpoints import load_endpoint, read_weights, write_weights
from neuralign.experiments.data import DataBundle, load_data
from neuralign.experiments.models import available_models, build_model
from neuralign.experiments.study import PRESETS, StudyConfig, run_study
from neuralign.experiments.training import TrainResult, train_model

__all__ = [
    "DataBundle",
    "PRESETS",
    "StudyConfig",
    "TrainResult",
    "available_models",
    "build_model",
    "load_data",
    "load_endpoint",
    "read_weights",
    "write_weights",
    "run_study",
    "train_model",
]

"""Reusable, paper-agnostic tools: data (sources, augmentation, resumable loaders), the model zoo, training
recipes and checkpoint formats. The paper's protocols are in :mod:`neuralign.study`, the command line in
:mod:`neuralign.cli`.

Names are imported on first use, so that ``import neuralign.experiments`` stays cheap.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__all__ = [
    "DataBundle",
    "TrainResult",
    "TrainingOptions",
    "available_models",
    "build_model",
    "load_data",
    "load_endpoint",
    "read_weights",
    "train_model",
    "write_weights",
]

_HOMES = {
    "DataBundle": "neuralign.experiments.data",
    "load_data": "neuralign.experiments.data",
    "available_models": "neuralign.experiments.models",
    "build_model": "neuralign.experiments.models",
    "load_endpoint": "neuralign.experiments.checkpoints",
    "read_weights": "neuralign.experiments.checkpoints",
    "write_weights": "neuralign.experiments.checkpoints",
    "TrainResult": "neuralign.experiments.training",
    "TrainingOptions": "neuralign.experiments.training",
    "train_model": "neuralign.experiments.training",
}
# moved to neuralign.study in 0.2: still served, with a DeprecationWarning, until 0.3
_MOVED = {"PRESETS": "neuralign.study", "StudyConfig": "neuralign.study", "run_study": "neuralign.study"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    if name in _MOVED:
        warnings.warn(f"neuralign.experiments.{name} moved to {_MOVED[name]}.{name} in neuralign 0.2; the old name "
                      "will be removed in 0.3", DeprecationWarning, stacklevel=2)  # fmt: skip
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'neuralign.experiments' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

"""The paper's protocols: the Table 1 study and the robust study (Tatro et al. 2020, arXiv:2009.02439).

:class:`StudyConfig` holds every setting (start from a :data:`PRESETS` entry); :func:`study_stages` is the stage
graph; :func:`run_study` runs it in this process and :mod:`neuralign.study.executors` as local or Slurm jobs;
its results are a :class:`StudyResults` (:mod:`neuralign.study.results`, ``results.json``), which
:mod:`neuralign.study.report` and :mod:`neuralign.study.plots` turn into ``report.md`` and figures.
"""

from neuralign.study.config import (
    LEGACY_NAMES,
    PRESETS,
    SETTINGS,
    DataOptions,
    EvaluationOptions,
    ModelOptions,
    RobustOptions,
    StudyConfig,
)
from neuralign.study.results import PairResults, StudyResults
from neuralign.study.runner import prepare_study, run_stage, run_study
from neuralign.study.stages import STAGE_KINDS, Stage, stage_done, study_stages

__all__ = [
    "LEGACY_NAMES",
    "PRESETS",
    "DataOptions",
    "EvaluationOptions",
    "ModelOptions",
    "PairResults",
    "RobustOptions",
    "SETTINGS",
    "STAGE_KINDS",
    "Stage",
    "StudyConfig",
    "StudyResults",
    "prepare_study",
    "run_stage",
    "run_study",
    "stage_done",
    "study_stages",
]

"""The paper's Table 1 protocol end to end: endpoints, alignment, four kinds of curves, evaluation, verification.

:func:`run_study` trains (or loads) ``2 x pairs`` end points, aligns every pair by activation correlation, fits the
four curves of Tatro et al. (2020, Table 1) — Unaligned, PAM Unaligned, PAM Aligned, Aligned — evaluates each at
``num_points`` values of ``t`` with batch norm re-estimated, verifies the alignment, and aggregates mean ± std over
pairs into ``results.json``, a markdown report and figures. Every stage writes its result atomically into the
output folder and is skipped when the result is already there; long stages checkpoint every epoch, so an
interrupted study resumes without losing finished work.

The stages form a graph (:func:`study_stages`: end points -> alignment -> curves -> evaluations ->
verification, plane -> report; stages of different pairs and settings are independent). :func:`run_stage` runs
one stage in any process, reading its inputs from the files of the stages it needs; :func:`run_study` runs them
all in order in this process, and :mod:`neuralign.experiments.cluster` runs them as concurrent local jobs or Slurm
jobs through the same :func:`run_stage`. The stage files are the single source of truth: a stage is done when all
its outputs exist, and each stage writes only its own outputs and its record ``stages/<stage>.json`` (seconds,
job, process group), which the manifest's ``completed`` and ``stage_seconds`` are merged from. Each stage starts
from seeds of its own (torch's global RNG and the training loader's generator), so its result does not depend on
which stages ran before it in the same process.

Why one module: the configuration, the stage graph and the stages' bodies share the stage names, the output
layout and the per-process state (:class:`_Study`); split apart, each piece would have to restate the others.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import neuralign
from neuralign import _distributed
from neuralign._utils import atomic_save, atomic_write_text, stable_seed
from neuralign.alignment import (
    PermutationFile,
    align,
    apply_permutation,
    load_permutation_file,
    save_permutation_file,
    state_dict_hash,
    state_dict_layout,
    trace_spec,
)
from neuralign.attacks import PGD, _check_number
from neuralign.curves import (
    Bezier,
    CurveEvaluation,
    Line,
    evaluate_curve,
    evaluate_model,
    evaluate_plane,
    fit_curve,
    fit_curve_pam,
    garipov_lr_factor,
    midpoint_alignment,
    paper_lr_factor,
    project_to_plane,
)
from neuralign.errors import CheckpointError, ConvergenceWarning
from neuralign.experiments.checkpoints import load_endpoint
from neuralign.experiments.data import DataBundle, load_data
from neuralign.experiments.jobs import refuse_live_jobs
from neuralign.experiments.models import build_model
from neuralign.experiments.training import train_model
from neuralign.verification import verify_alignment

__all__ = [
    "SETTINGS", "PRESETS", "Stage", "StudyConfig", "prepare_study", "run_stage", "run_study", "stage_done",
    "study_stages",
]

logger = logging.getLogger(__name__)

SETTINGS = ("unaligned", "pam_unaligned", "pam_aligned", "aligned")

Progress = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class StudyConfig:
    """Every setting of a study (the defaults are the paper's, PAPER_NOTES §5.4; see :data:`PRESETS`).

    Data: ``dataset`` (a name known to :func:`~neuralign.experiments.data.load_data` or an ``.npz`` path),
    ``data_root``, ``download``, ``batch_size``, ``train_size`` / ``test_size`` (subsets, ``None`` = all),
    ``align_size`` (the paper's first 10k training images), ``resize``.
    Models: ``arch``, ``width`` (ResNet/VGG), ``hidden`` (MLP), ``pairs`` (end points ``1 .. 2*pairs``,
    paired (1, 2), (3, 4), ...), ``seed`` (base of every derived seed).
    End points: ``epochs``, ``lr``, ``weight_decay``. Curves: ``curve_epochs``, ``curve_lr``,
    ``curve_weight_decay``. PAM: ``pam_iters`` outer iterations of ``pam_x_epochs`` curve epochs each (default
    ``curve_epochs``), ``pam_lam``, ``pam_method``, ``pam_max_moved`` and ``pam_p_steps`` (bounded linearised
    P-steps), ``pam_birkhoff_steps`` and ``pam_birkhoff_lr`` (the relaxed P-step: projected gradient steps on the
    Birkhoff polytope, each on ``pam_gradient_batches`` batches; see :class:`~neuralign.optim.PAM`) and
    ``pam_birkhoff_samples`` (Birkhoff-von Neumann draws among its rounding candidates; the ``pam_birkhoff_*``
    settings are unused with ``pam_method="linearized"``, so that a preset's can stay), ``pam_value_batches``
    (training batches, each at t = 0.25, 0.5, 0.75, on which every P-step candidate's objective is evaluated),
    ``pam_local_search``, ``pam_gradient_batches``; every outer
    iteration's curve is evaluated like the final one (Min accuracy per iteration). Evaluation: ``num_points``,
    ``bn_batches`` (``None``: a full training pass per point, as in the paper), ``plane_grid`` (0: no plane).
    Verification: ``verify`` and the budgets ``verify_iters`` (PAM iterations), ``verify_swaps`` (best-ranked
    swaps scored per group), ``verify_batches`` and ``verify_ts`` (held-out batches and times scoring every move),
    ``verify_local_search`` (swaps PAM tries per group), ``verify_random_starts``. ``settings``: which of
    :data:`SETTINGS` to fit.
    ``max_batches``: cut every epoch short (smoke tests only).
    ``endpoints``: given end points instead of training them, ``2 * pairs`` files paired in order (any format
    :func:`~neuralign.experiments.load_endpoint` reads: end points, plain or wrapped state dicts, safetensors;
    plain files are read as ``arch`` with the dataset's number of classes); ``None`` trains them. A robust study
    refuses an end point whose recorded data description has normalisation statistics (``neuralign train``
    records them); plain files record nothing and are taken as trained on [0, 1] inputs.
    ``num_classes``: classes of the models' heads (default: the dataset's), ``model_args``: extra builder arguments
    (e.g. for ``torchvision:<name>``), ``mean`` / ``std``: normalisation statistics (default: computed or known).
    ``lr_schedule``: ``"paper"`` (:func:`~neuralign.curves.paper_lr_factor`) or ``"garipov"``
    (:func:`~neuralign.curves.garipov_lr_factor`, the official robust schedule) for end points and curves.
    Robust mode connectivity (Tatro et al. 2020 §4): ``robust`` trains the end points adversarially (Madry),
    fits robust curves and evaluates clean and robust accuracy along them, against L-infinity PGD with ``eps``,
    ``alpha`` and ``attack_steps``; inputs stay in [0, 1] (no normalisation, as the official adversarial
    transforms); ``robust_bn`` (``"adversarial"`` or ``"clean"``) is what batch norm is re-estimated on;
    ``align_inputs`` (``"clean"`` or ``"adversarial"``) what the alignment correlates. Robust studies fit the
    Unaligned and Aligned settings (PAM is not robust) and have no verification (its checks use the clean loss).
    """

    arch: str = "tinyten"
    dataset: str = "cifar10"
    data_root: str | None = None
    download: bool = False
    pairs: int = 3
    seed: int = 0
    width: float | None = None
    hidden: tuple[int, ...] | None = None
    batch_size: int = 128
    train_size: int | float | None = None
    test_size: int | float | None = None
    align_size: int | float | None = 10000
    resize: int | None = None
    epochs: int = 250
    lr: float = 0.1
    weight_decay: float = 5e-4
    curve_epochs: int = 250
    curve_lr: float = 0.1
    curve_weight_decay: float = 5e-4
    pam_iters: int = 1
    pam_x_epochs: int | None = None
    pam_lam: float = 1000.0
    pam_method: str = "linearized"
    pam_max_moved: float | None = None
    pam_p_steps: int = 1
    pam_birkhoff_steps: int = 20
    pam_birkhoff_lr: float | None = None
    pam_birkhoff_samples: int = 32
    pam_value_batches: int = 8
    pam_local_search: int = 0
    pam_gradient_batches: int | None = None
    num_points: int = 65
    bn_batches: int | None = None
    plane_grid: int = 17
    verify: bool = True
    verify_iters: int = 2
    verify_swaps: int = 64
    verify_batches: int = 8
    verify_ts: tuple[float, ...] = (0.25, 0.5, 0.75)
    verify_local_search: int = 16
    verify_random_starts: int = 1
    settings: tuple[str, ...] = SETTINGS
    max_batches: int | None = None
    endpoints: tuple[str, ...] | None = None
    num_classes: int | None = None
    model_args: dict[str, Any] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    lr_schedule: str = "paper"
    robust: bool = False
    eps: float = 8 / 255
    alpha: float = 2 / 255
    attack_steps: int = 5
    robust_bn: str = "adversarial"
    align_inputs: str = "clean"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # `--set robust=no` or robust=0 must not pass as true or be kept as int
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"`{f.name}` must be a bool (true or false), got {getattr(self, f.name)!r}")
        for name in ("pairs", "epochs", "curve_epochs", "pam_iters", "pam_p_steps", "num_points", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        if self.pam_x_epochs is not None and (isinstance(self.pam_x_epochs, bool)
                                              or not isinstance(self.pam_x_epochs, int) or self.pam_x_epochs < 1):
            raise ValueError(f"`pam_x_epochs` must be a positive int, got {self.pam_x_epochs!r}")
        if self.pam_method not in ("linearized", "birkhoff"):
            raise ValueError(f"`pam_method` must be 'linearized' or 'birkhoff', got {self.pam_method!r}")
        if self.pam_method != "linearized" and (self.pam_max_moved is not None or self.pam_p_steps != 1):
            raise ValueError("`pam_max_moved` and `pam_p_steps` apply to pam_method='linearized', not "
                             f"{self.pam_method!r}")  # fmt: skip
        if self.pam_max_moved is not None and (isinstance(self.pam_max_moved, bool)
                                               or not isinstance(self.pam_max_moved, (int, float))
                                               or not 0.0 < self.pam_max_moved <= 1.0):  # fmt: skip
            raise ValueError(f"`pam_max_moved` must be a fraction in (0, 1], got {self.pam_max_moved!r}")
        if isinstance(self.pam_birkhoff_steps, bool) or not isinstance(self.pam_birkhoff_steps, int) \
                or self.pam_birkhoff_steps < 1:  # fmt: skip
            raise ValueError(f"`pam_birkhoff_steps` must be a positive int, got {self.pam_birkhoff_steps!r}")
        if isinstance(self.pam_birkhoff_samples, bool) or not isinstance(self.pam_birkhoff_samples, int) \
                or self.pam_birkhoff_samples < 0:  # fmt: skip
            raise ValueError(f"`pam_birkhoff_samples` must be an int >= 0, got {self.pam_birkhoff_samples!r}")
        if isinstance(self.pam_value_batches, bool) or not isinstance(self.pam_value_batches, int) \
                or self.pam_value_batches < 1:  # fmt: skip
            raise ValueError(f"`pam_value_batches` must be a positive int, got {self.pam_value_batches!r}")
        if self.pam_birkhoff_lr is not None and (isinstance(self.pam_birkhoff_lr, bool)
                                                 or not isinstance(self.pam_birkhoff_lr, (int, float))
                                                 or not self.pam_birkhoff_lr > 0):  # fmt: skip
            raise ValueError(f"`pam_birkhoff_lr` must be a positive number, got {self.pam_birkhoff_lr!r}")
        if isinstance(self.settings, str):  # one setting from the command line (--set settings=aligned)
            object.__setattr__(self, "settings", (self.settings,))
        unknown = [s for s in self.settings if s not in SETTINGS]
        if unknown or not self.settings:
            raise ValueError(f"unknown settings {unknown}; expected a non-empty subset of {list(SETTINGS)}")
        object.__setattr__(self, "settings", tuple(s for s in SETTINGS if s in self.settings))
        if self.hidden is not None:
            object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.endpoints is not None:
            given = tuple(str(p) for p in self.endpoints)
            if len(given) != 2 * self.pairs:
                raise ValueError(f"`endpoints` must name 2 * pairs = {2 * self.pairs} files, got {len(given)}")
            object.__setattr__(self, "endpoints", given)
        ts = self.verify_ts if isinstance(self.verify_ts, (tuple, list)) else (self.verify_ts,)
        object.__setattr__(self, "verify_ts", tuple(float(t) for t in ts))
        if self.num_classes is not None and (isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int)
                                             or self.num_classes < 1):  # fmt: skip
            raise ValueError(f"`num_classes` must be a positive int, got {self.num_classes!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.model_args is not None:
            object.__setattr__(self, "model_args", dict(self.model_args))
        if self.lr_schedule not in ("paper", "garipov"):
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; expected one of ['paper', 'garipov']")
        if self.robust_bn not in ("adversarial", "clean"):
            raise ValueError(f"unknown robust_bn {self.robust_bn!r}; expected one of ['adversarial', 'clean']")
        if self.align_inputs not in ("clean", "adversarial"):
            raise ValueError(f"unknown align_inputs {self.align_inputs!r}; expected one of ['clean', 'adversarial']")
        # the attack's settings under the study's names (PGD would name `steps`)
        _check_number(self.eps, "eps", positive=False)
        _check_number(self.alpha, "alpha", positive=True)
        if isinstance(self.attack_steps, bool) or not isinstance(self.attack_steps, int) or self.attack_steps < 0:
            raise ValueError(f"`attack_steps` must be an int >= 0, got {self.attack_steps!r}")
        if self.robust:
            pam = [s for s in self.settings if s.startswith("pam")]
            if pam:
                raise ValueError(f"settings {pam} are not robust (PAM fits clean curves); a robust study fits "
                                 "settings=('unaligned', 'aligned')")  # fmt: skip
            if self.verify:
                raise ValueError("verify=True checks the clean curve objective; a robust study needs verify=False")
            if self.mean is not None or self.std is not None:
                raise ValueError("a robust study attacks [0, 1] inputs, which are not normalised: drop mean/std")
        elif self.align_inputs == "adversarial":
            raise ValueError("align_inputs='adversarial' needs robust=True")

    def attack(self) -> PGD | None:
        """The study's attack, or None for a standard study."""
        pgd = PGD(eps=self.eps, alpha=self.alpha, steps=self.attack_steps)
        return pgd if self.robust else None

    def lr_lambda(self, epochs: int) -> Callable[[int], float]:
        """The learning-rate factor for a run of ``epochs`` epochs."""
        if self.lr_schedule == "garipov":
            return functools.partial(garipov_lr_factor, epochs=epochs)
        return paper_lr_factor

    def replace(self, **overrides: Any) -> StudyConfig:
        """A copy with some settings changed; unknown names raise ``ValueError`` listing the known ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(k for k in overrides if k not in names)
        if unknown:
            raise ValueError(f"unknown study settings {unknown}; expected some of {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["settings"] = list(self.settings)
        out["hidden"] = None if self.hidden is None else list(self.hidden)
        out["verify_ts"] = list(self.verify_ts)
        out["endpoints"] = None if self.endpoints is None else list(self.endpoints)
        for name in ("mean", "std"):
            out[name] = None if getattr(self, name) is None else list(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudyConfig:
        data = dict(data)
        for key in ("settings", "hidden", "verify_ts", "endpoints", "mean", "std"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls().replace(**data)


PRESETS: dict[str, StudyConfig] = {
    # PAPER_NOTES §5.4: 250 epochs, 65 points, full BN passes, 3 pairs; for GPUs.
    "paper": StudyConfig(),
    # TinyTen on CIFAR-10 scaled to 2 CPU cores: 82 min with --executor local --jobs 2 (README, Table 1 evidence).
    # PAM: the official relaxed P-step (projected SGD on the Birkhoff polytope, then BvN rounding) over 2 epochs of
    # single batches (the official code: 20 epochs at lr 0.05; lr 1 moves as far in 1/10 of the steps), in 2 outer
    # iterations whose x-steps add up to the other curves' 10 epochs; rounding among 10 candidates on 4 batches
    # (32 draws on 8 batches: ~20 min per P-step here under load, most of PAM's time; pair 1 Min 64.7 against 64.5).
    "cpu": StudyConfig(
        pairs=3, train_size=10000, test_size=5000, align_size=5000, epochs=20, curve_epochs=10, num_points=17,
        bn_batches=10, plane_grid=9, pam_iters=2, pam_x_epochs=5, pam_method="birkhoff", pam_birkhoff_steps=160,
        pam_birkhoff_lr=1.0, pam_birkhoff_samples=8, pam_value_batches=4, pam_gradient_batches=1, verify_iters=1,
        verify_swaps=16, verify_batches=4, verify_ts=(0.5,), verify_local_search=8, verify_random_starts=1,
    ),
    # The offline demo on the shipped UCI digits (8x8, resized to 16x16 for TinyTen): a few minutes on a CPU.
    "demo": StudyConfig(
        dataset="digits", pairs=1, resize=16, batch_size=64, epochs=15, curve_epochs=6, num_points=11,
        bn_batches=4, plane_grid=7, align_size=None, pam_gradient_batches=4, verify_iters=1, verify_swaps=8,
        verify_batches=4, verify_ts=(0.5,), verify_local_search=4, verify_random_starts=0,
    ),
    # Robust curves between adversarially trained end points (PAPER_NOTES §4): PGD-5 at 8/255 (step 2/255),
    # 200 epochs for end points and curves with Garipov's schedule, 65 points; for GPUs.
    "robust": StudyConfig(
        robust=True, epochs=200, curve_epochs=200, lr_schedule="garipov", settings=("unaligned", "aligned"),
        verify=False, plane_grid=0,
    ),
    # The robust study at CPU scale: MLPs (784-256-256-10, batch norm) on MNIST, eps 0.1, step 0.025, PGD-5.
    # Measured on this 2-core machine (1 thread, shared): a robust TinyTen epoch on CIFAR-10 costs ~130 s per 10k
    # images, so 4 robust end points and 4 robust curves worth attacking do not fit in an hour; a robust epoch of
    # this MLP costs ~5.5 s per 20k MNIST images (6 epochs on 20k: 96.1 % clean, 79.2 % robust test accuracy;
    # standard training: 96.9 % and 9.6 %). All 60k images, 10 + 10 epochs: ~25 min for 2 pairs.
    "robust-cpu": StudyConfig(
        robust=True, dataset="mnist", arch="mlp", hidden=(256, 256), pairs=2, train_size=None, test_size=None,
        align_size=5000, epochs=10, curve_epochs=10, lr=0.05, curve_lr=0.05, lr_schedule="garipov",
        eps=0.1, alpha=0.025, attack_steps=5, num_points=17, bn_batches=10, settings=("unaligned", "aligned"),
        verify=False, plane_grid=0,
    ),
}


_DEFAULTS = StudyConfig().to_dict()


# ------------------------------------------------------------------------------------------------- the graph
@dataclass(frozen=True)
class Stage:
    """One stage of a study: its ``name`` (as recorded in the manifest), the stages it ``needs``, and its
    ``outputs`` (paths relative to the study folder; the stage is done when they all exist)."""

    name: str
    needs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def slug(self) -> str:
        """The name as a file name (``pair_1_curve_aligned``)."""
        return self.name.replace(" ", "_")


def study_stages(config: StudyConfig) -> list[Stage]:
    """The stages of a study in an order that respects their dependencies (the order of a sequential run).

    End points (unless given) -> per pair: alignment -> per setting: curve -> evaluation; the aligned curve ->
    verification and (pair 1) the plane; everything -> ``report``. Stages of different pairs and settings do not
    depend on each other.
    """
    c = config
    stages: list[Stage] = []
    if c.endpoints is None:
        stages += [Stage(f"endpoint {s}", (), (f"endpoints/seed{s}.pt",)) for s in range(1, 2 * c.pairs + 1)]
    for k in range(1, c.pairs + 1):
        ends = () if c.endpoints is not None else (f"endpoint {2 * k - 1}", f"endpoint {2 * k}")
        alignment = Stage(f"pair {k} alignment", ends, (f"pair{k}/alignment.pt",))
        stages.append(alignment)
        for setting in c.settings:
            curve = Stage(f"pair {k} curve {setting}", (alignment.name,),
                          (f"pair{k}/curve_{setting}.pt", f"pair{k}/curve_{setting}.json"))  # fmt: skip
            stages += [curve, Stage(f"pair {k} eval {setting}", (curve.name,), (f"pair{k}/eval_{setting}.json",))]
        if "aligned" in c.settings:
            needs = (f"pair {k} curve aligned",)
            stages.append(Stage(f"pair {k} midpoint alignment",
                                needs + ((f"pair {k} curve unaligned",) if "unaligned" in c.settings else ()),
                                (f"pair{k}/midpoint_alignment.json",)))  # fmt: skip
            if c.verify:
                stages.append(Stage(f"pair {k} verification", needs,
                                    (f"pair{k}/verification.json", f"pair{k}/verification.md")))  # fmt: skip
            if c.plane_grid and k == 1:
                stages.append(Stage(f"pair {k} plane", needs, (f"pair{k}/plane.json",)))
    stages.append(Stage("report", tuple(s.name for s in stages), ("results.json", "report.md")))
    return stages


def stage_done(out: str | os.PathLike, stage: Stage) -> bool:
    """Whether every output of ``stage`` exists in the study folder ``out``."""
    return all((Path(out) / name).exists() for name in stage.outputs)


# ----------------------------------------------------------------------------------------------------- helpers
def _versions() -> dict[str, str]:
    import numpy
    import scipy

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "neuralign": neuralign.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
    }


def _model_kwargs(config: StudyConfig, data: DataBundle) -> dict[str, Any]:
    """Builder arguments of the study's architecture: the zoo's from the data, then ``model_args``."""
    return {**_zoo_kwargs(config, data), **(config.model_args or {})}


def _zoo_kwargs(config: StudyConfig, data: DataBundle) -> dict[str, Any]:
    arch = config.arch.lower()
    if ":" in arch:  # torchvision:<name>, timm:<name>: their builders' own defaults
        return {}
    if arch == "mlp":
        h, w = data.image_size
        kw: dict[str, Any] = {"in_features": data.in_channels * h * w, "batch_norm": True}
        if config.hidden is not None:
            kw["hidden"] = config.hidden
        return kw
    kw = {"in_channels": data.in_channels}
    if config.width is not None:
        kw["width"] = config.width
    return kw


def _pam_step_options(c: StudyConfig) -> dict[str, Any]:
    if c.pam_method == "birkhoff":
        return {"birkhoff_steps": c.pam_birkhoff_steps, "birkhoff_lr": c.pam_birkhoff_lr,
                "birkhoff_samples": c.pam_birkhoff_samples}
    return {"max_moved": c.pam_max_moved, "p_steps": c.pam_p_steps}


def _portable_paths(described: Mapping[str, Any]) -> dict[str, Any]:
    """The data description with its file path relative to the working directory, so that a manifest published
    with the results names no folder of the machine that ran it."""
    out = dict(described)
    if isinstance(out.get("path"), str):
        out["path"] = os.path.relpath(out["path"])
    return out


def _json_floats(obj: Any) -> Any:
    """NaN and infinities as the strings "nan", "inf", "-inf" (strict JSON; ``read_results_json`` decodes them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Mapping):
        return {k: _json_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_floats(v) for v in obj]
    return obj


def _params(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = {k for k, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k in names}


def _train_history(history: Any) -> list[dict[str, float]]:
    """Per curve epoch (1-based, counted over PAM's outer iterations in order), the training loss and accuracy."""
    return [{"epoch": i + 1, "loss": float(r["loss"]), "accuracy": float(r["accuracy"])}
            for i, r in enumerate(history)]  # fmt: skip


class _Study:
    """The stages' shared state in one process: the data (loaded once) and the inputs read from earlier stages'
    files (cached), so that a sequential run does not reload them and a job loads only what its stage needs."""

    def __init__(self, config: StudyConfig, out: Path, device: torch.device, progress: Progress | None) -> None:
        self.config = config
        self.out = out
        self.device = device
        self.progress = progress
        self.mark = time.perf_counter()  # start of the running stage
        self._pairs: dict[int, dict[str, Any]] = {}

    @functools.cached_property
    def data(self) -> DataBundle:
        c = self.config
        return load_data(
            c.dataset, root=c.data_root, download=c.download, batch_size=c.batch_size, train_size=c.train_size,
            test_size=c.test_size, align_size=c.align_size, resize=c.resize, generator=c.seed, mean=c.mean,
            std=c.std, normalize=not c.robust,
        )  # fmt: skip

    def emit(self, **event: Any) -> Any:
        if self.progress is not None:
            return self.progress(event)
        return None

    # ------------------------------------------------------------------ manifest
    def check_manifest(self) -> dict[str, Any]:
        path = self.out / "manifest.json"
        config = self.config.to_dict()
        manifest = None
        if path.exists():
            try:
                manifest = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
            if not manifest.get("completed") and not any(p != path for p in self.out.iterdir()):
                manifest = None  # a study that stopped before any stage (e.g. on a setting error) starts afresh
        if manifest is not None:
            # settings added after the folder was written take their defaults (which reproduce the older behaviour)
            saved = {**_DEFAULTS, **manifest.get("config", {})}
            if saved != config:
                diff = sorted(k for k in config if saved.get(k) != config[k])
                raise CheckpointError(
                    f"{self.out} holds a study with other settings ({', '.join(diff)}); use another --out folder"
                )
            manifest.setdefault("runs", []).append({"started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        else:
            manifest = {
                "kind": "study_manifest",
                "config": config,
                "seeds": list(range(1, 2 * self.config.pairs + 1)),
                "versions": _versions(),
                "device": str(self.device),
                "threads": torch.get_num_threads(),
                "command": ["neuralign", *sys.argv[1:]],
                "runs": [{"started": time.strftime("%Y-%m-%dT%H:%M:%S")}],
                "completed": [],
            }
        manifest["runs"][-1]["started_unix"] = time.time()
        manifest["runs"][-1]["distributed"] = _distributed.describe()
        self.manifest = manifest
        self.save_manifest()
        return manifest

    def save_manifest(self) -> None:
        atomic_write_text(self.out / "manifest.json", json.dumps(self.manifest, indent=1))

    def done(self, stage: str) -> None:
        """Record that ``stage`` has written its outputs: ``stages/<stage>.json`` with its wall-clock seconds (since
        it started), where it ran (job id, process group) and when it finished. Only this stage writes that file."""
        record = {
            "stage": stage, "seconds": round(time.perf_counter() - self.mark, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "job_id": _job_id(),
            "distributed": _distributed.describe(), "device": str(self.device),
        }  # fmt: skip
        atomic_write_text(self.out / "stages" / f"{stage.replace(' ', '_')}.json", json.dumps(record, indent=1))

    def merge_stage_records(self) -> None:
        """Merge the stage records into the manifest (``completed`` in graph order, ``stage_seconds``) and save it.
        Called by the one process that owns the manifest at that moment (a sequential run, or the report stage)."""
        records = {}
        for stage in study_stages(self.config):
            path = self.out / "stages" / f"{stage.slug}.json"
            if path.exists():
                records[stage.name] = json.loads(path.read_text())
        self.manifest["completed"] = list(records)
        self.manifest["stage_seconds"] = {name: r["seconds"] for name, r in records.items()}
        self.manifest["stage_jobs"] = {name: r["job_id"] for name, r in records.items() if r.get("job_id")}
        self.save_manifest()

    # ------------------------------------------------------------------ stages
    def endpoint(self, seed: int) -> tuple[nn.Module, dict]:
        c = self.config
        if c.endpoints is not None:
            model, meta = load_endpoint(c.endpoints[seed - 1], arch=c.arch,
                                        num_classes=c.num_classes or self.data.num_classes,
                                        model_kwargs=_model_kwargs(c, self.data))  # fmt: skip
            described = meta.get("dataset") if isinstance(meta.get("dataset"), dict) else {}
            if c.robust and (described.get("mean") is not None or described.get("std") is not None):
                raise ValueError(
                    f"end point {c.endpoints[seed - 1]!r} was trained on normalised inputs (mean "
                    f"{described.get('mean')}, std {described.get('std')}), but a robust study attacks and evaluates "
                    "[0, 1] inputs: give end points trained without normalisation (or with it inside the model)"
                )
            model = model.to(self.device)
            if "test" not in meta:
                test_loss, test_acc = evaluate_model(model, self.data.test)
                meta["test"] = {"test_loss": test_loss, "test_acc": test_acc}
            if c.robust and "robust_test_acc" not in meta["test"]:
                meta["test"].update(self.robust_test(model, seed))
            return model, meta
        path = self.out / "endpoints" / f"seed{seed}.pt"
        if path.exists():
            model, meta = load_endpoint(path)
            return model.to(self.device), meta
        kwargs = _model_kwargs(c, self.data)
        model = build_model(c.arch, c.num_classes or self.data.num_classes, seed=stable_seed(c.seed, "init", seed),
                            **kwargs)  # fmt: skip
        model = model.to(self.device)
        self.data.train.generator.manual_seed(stable_seed(c.seed, "data", seed))
        self.emit(stage="train", label=f"end point {seed}", step=0, total=c.epochs, start=True)

        def on_epoch(record: dict[str, Any]) -> None:
            self.emit(stage="train", label=f"end point {seed}", step=record["epoch"], total=c.epochs, record=record)

        res = train_model(
            model, self.data.train, epochs=c.epochs, lr=c.lr, weight_decay=c.weight_decay, test_loader=None,
            checkpoint=path.with_suffix(".ckpt"), callback=on_epoch, max_batches_per_epoch=c.max_batches,
            lr_lambda=c.lr_lambda(c.epochs), adversarial=c.attack(), generator=stable_seed(c.seed, "attack", seed),
        )  # fmt: skip
        model.load_state_dict(res.state_dict)
        model.eval()
        test_loss, test_acc = evaluate_model(model, self.data.test)
        test = {"test_loss": test_loss, "test_acc": test_acc}
        if c.robust:
            test.update(self.robust_test(model, seed))
        meta = {
            "kind": "endpoint", "arch": c.arch, "num_classes": c.num_classes or self.data.num_classes,
            "model_kwargs": kwargs,
            "seed": seed, "history": res.history, "test": test,
            "dataset": self.data.describe(),
        }  # fmt: skip
        if c.robust:
            meta["adversarial"] = c.attack().to_dict()
        atomic_save({**meta, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}, path)
        path.with_suffix(".ckpt").unlink(missing_ok=True)
        self.done(f"endpoint {seed}")
        return model, meta

    def robust_test(self, model: nn.Module, seed: int) -> dict[str, float]:
        """Robust test loss and accuracy of an end point as trained (its own batch-norm statistics, eval mode)."""
        loss, acc = evaluate_model(model, self.data.test, adversarial=self.config.attack(),
                                   generator=stable_seed(self.config.seed, "endpoint-attack", seed))  # fmt: skip
        return {"robust_test_loss": loss, "robust_test_acc": acc}

    def source(self, seed: int) -> str:
        if self.config.endpoints is not None:
            return self.config.endpoints[seed - 1]
        return f"endpoints/seed{seed}.pt"

    def alignment(self, k: int, a: nn.Module, b: nn.Module) -> dict[str, Any]:
        c = self.config
        path = self.out / f"pair{k}" / "alignment.pt"
        if not path.exists():
            self.emit(stage="align", label=f"pair {k}", step=0, total=1)
            attack = c.attack() if c.align_inputs == "adversarial" else None
            extra = {"inputs": "adversarial", "adversarial": attack, "generator": stable_seed(c.seed, "align", k)}
            res = align(a, b, self.data.align, **(extra if attack is not None else {}))
            record = PermutationFile(
                perms={g: p.cpu() for g, p in res.perms.items()}, spec=res.spec, method=res.method,
                settings={"data": self.config.dataset, "align_images": len(self.data.align.dataset),
                          **({"inputs": c.align_inputs, "adversarial": attack.to_dict()} if attack else {})},
                model_a={"hash": state_dict_hash(a.state_dict()), "source": self.source(2 * k - 1),
                         "layout": state_dict_layout(a.state_dict())},
                model_b={"hash": state_dict_hash(b.state_dict()), "source": self.source(2 * k),
                         "layout": state_dict_layout(b.state_dict())},
                arch=self.config.arch,
                results={"correlation_before": res.correlation_before, "correlation_after": res.correlation_after},
            )  # fmt: skip
            save_permutation_file(path, record)
            self.emit(stage="align", label=f"pair {k}", step=1, total=1)
            self.done(f"pair {k} alignment")
        record = load_permutation_file(path)
        record.check_pair(arch=self.config.arch, hash_a=state_dict_hash(a.state_dict()),
                          hash_b=state_dict_hash(b.state_dict()))  # fmt: skip
        return {"perms": record.perms, "groups": record.spec.groups, "sizes": record.spec.sizes, **record.results}

    def curve(self, k: int, setting: str, a: nn.Module, sd_a: dict, sd_b: dict, perms: dict, spec) -> tuple:
        c = self.config
        folder = self.out / f"pair{k}"
        path = folder / f"curve_{setting}.pt"
        meta_path = folder / f"curve_{setting}.json"
        if path.exists() and meta_path.exists():
            return Bezier.load(path), json.loads(meta_path.read_text())
        seed = stable_seed(c.seed, "curve", k, setting)
        self.data.train.generator.manual_seed(stable_seed(c.seed, "curve-data", k, setting))
        label = f"pair {k} {setting.replace('_', ' ')}"

        def optimizer(params):
            return torch.optim.SGD(params, lr=c.curve_lr, momentum=0.9, nesterov=True)

        def on_epoch(record: dict[str, Any]) -> None:
            self.emit(stage="curve", label=label, step=record.get("epoch", 0) + 1, total=c.curve_epochs,
                      record=record)  # fmt: skip

        meta: dict[str, Any] = {"setting": setting}
        x_epochs = c.pam_x_epochs or c.curve_epochs
        if setting.startswith("pam"):
            self.emit(stage="pam", label=label, step=0, total=x_epochs * c.pam_iters, start=True)
        else:
            self.emit(stage="curve", label=label, step=0, total=c.curve_epochs, start=True)
        if setting in ("unaligned", "aligned"):
            end_b = sd_b if setting == "unaligned" else apply_permutation(sd_b, spec.restrict(sd_b), perms)
            res = fit_curve(
                a, _params(a, sd_a), _params(a, end_b), self.data.train, epochs=c.curve_epochs, optimizer=optimizer,
                weight_decay=c.curve_weight_decay, generator=seed, callback=on_epoch,
                checkpoint=folder / f"curve_{setting}.ckpt", max_batches_per_epoch=c.max_batches,
                lr_lambda=c.lr_lambda(c.curve_epochs), adversarial=c.attack(),
            )  # fmt: skip
            curve = res.curve
            meta["history"] = res.history
            (folder / f"curve_{setting}.ckpt").unlink(missing_ok=True)
        else:
            total = x_epochs * c.pam_iters

            def on_event(record: dict[str, Any]) -> None:
                if record["stage"] == "x-epoch":
                    step = (record["iteration"] - 1) * x_epochs + record.get("epoch", 0) + 1
                    self.emit(stage="pam", label=label, step=step, total=total, record=record)
                elif record["iteration"] < c.pam_iters:  # an earlier iteration's curve, evaluated like the last
                    record["curve"].save(folder / f"curve_{setting}_iter{record['iteration']}.pt")

            with warnings.catch_warnings():
                # the paper's protocol is a fixed number of outer iterations; the status is recorded in the meta
                warnings.simplefilter("ignore", ConvergenceWarning)
                res = fit_curve_pam(
                a, sd_a, sd_b, self.data.train, init="identity" if setting == "pam_unaligned" else perms, spec=spec,
                method=c.pam_method, lam=c.pam_lam, max_iter=c.pam_iters, x_epochs=x_epochs,
                optimizer=optimizer, weight_decay=c.curve_weight_decay, gradient_batches=c.pam_gradient_batches,
                value_loader=self.data.train_eval, value_batches=c.pam_value_batches, local_search=c.pam_local_search,
                generator=seed,
                lr_lambda=c.lr_lambda(c.curve_epochs),
                callback=on_event, checkpoint=folder / f"curve_{setting}.ckpt", max_batches_per_epoch=c.max_batches,
                **_pam_step_options(c),
                )  # fmt: skip
            curve = res.curve
            meta.update(history=res.curve_history, objective=res.history, changed=res.changed,
                        backtracks=res.backtracks, status=res.status, message=res.message,
                        perms={g: p.tolist() for g, p in res.perms.items()})  # fmt: skip
            (folder / f"curve_{setting}.ckpt").unlink(missing_ok=True)
        curve.save(path)
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
        self.done(f"pair {k} curve {setting}")
        return curve, meta

    def bn_loader(self) -> Any:
        """The batches batch norm is re-estimated on: with ``bn_batches``, the same ``bn_batches`` training batches
        (drawn once, with the training augmentation) at every t, on every curve and the plane, so that differences
        between points and curves are not differences of batches; without, a full pass of the training images
        without augmentation, in a fixed order."""
        c = self.config
        if c.bn_batches is None:
            return self.data.train_eval
        if getattr(self, "_bn_batches", None) is None:
            self.data.train.generator.manual_seed(stable_seed(c.seed, "bn"))
            batches = []
            for batch in self.data.train:
                if len(batches) == c.bn_batches:
                    break
                batches.append(batch)
            self._bn_batches = batches
        return self._bn_batches

    def evaluate(self, k: int, setting: str, a: nn.Module, curve) -> CurveEvaluation:
        c = self.config
        path = self.out / f"pair{k}" / f"eval_{setting}.json"
        if path.exists():
            return CurveEvaluation.from_dict(json.loads(path.read_text()))
        label = f"pair {k} {setting.replace('_', ' ')}"

        def on_point(record: dict[str, Any]) -> None:
            self.emit(stage="evaluate", label=label, step=record.get("index", 0) + 1, total=c.num_points,
                      record=record)  # fmt: skip

        self.emit(stage="evaluate", label=label, step=0, total=c.num_points, start=True)
        ev = evaluate_curve(a, curve, self.bn_loader(), self.data.test, num_points=c.num_points,
                            max_bn_batches=c.bn_batches, callback=on_point, adversarial=c.attack(),
                            bn_inputs=c.robust_bn, generator=stable_seed(c.seed, "eval-attack"))  # fmt: skip
        atomic_write_text(path, json.dumps(ev.to_dict(), indent=1))
        if setting in c.settings:  # not an earlier PAM iteration's curve, which is part of its setting's stage
            self.done(f"pair {k} eval {setting}")
        return ev

    def pam_iterations(self, k: int, setting: str, meta: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Per outer iteration: the objective, the units moved, and Avg / Min test accuracy of that iteration's
        curve (evaluated like the final curve by the setting's eval stage; the last iteration is the final curve)."""
        rows = []
        objective = meta["objective"]
        for j in range(1, len(objective)):
            name = f"eval_{setting}_iter{j}.json" if j < len(objective) - 1 else f"eval_{setting}.json"
            ev = json.loads((self.out / f"pair{k}" / name).read_text())
            rows.append({"iteration": j, "objective": objective[j],
                         "moved": sum(int(v[j - 1]) for v in meta["changed"].values()),
                         "avg_accuracy": ev["avg_accuracy"], "min_accuracy": ev["min_accuracy"]})  # fmt: skip
        return rows

    def verification(self, k: int, a: nn.Module, sd_a, sd_b, perms, spec, curve) -> dict[str, Any]:
        c = self.config
        path = self.out / f"pair{k}" / "verification.json"
        if path.exists():
            return json.loads(path.read_text())
        checks = ("stability", "certificate", "neighbourhood", "gradient", "alignment")

        def label(name: str) -> str:
            return f"pair {k} {name} ({checks.index(name) + 1}/{len(checks)})"

        def on_check(name: str) -> None:
            self.emit(stage="verify", label=label(name), step=0, total=None, start=True)

        def on_progress(name: str, done: int, total: int) -> None:
            self.emit(stage="verify", label=label(name), step=done, total=total)

        self.data.train.generator.manual_seed(stable_seed(c.seed, "verify-data", k))

        report = verify_alignment(
            a, sd_a, sd_b, perms, self.data.train, curve=curve, spec=spec, heldout_loader=self.data.train_eval,
            align_loader=self.data.align, lam=c.pam_lam, stability_iters=c.verify_iters,
            stability_x_epochs=1, n_swaps=c.verify_swaps, gradient_batches=c.pam_gradient_batches or 4,
            value_batches=c.verify_batches, value_ts=c.verify_ts, local_search=c.verify_local_search,
            random_starts=c.verify_random_starts,
            max_batches_per_epoch=c.max_batches, generator=stable_seed(c.seed, "verify", k), callback=on_check,
            progress=on_progress,
        )  # fmt: skip
        report.save(self.out / f"pair{k}")
        self.done(f"pair {k} verification")
        return json.loads(report.to_json())

    def midpoint(self, k: int, a: nn.Module, sd_a, sd_b, perms, spec, curves: Mapping[str, Any]) -> dict[str, Any]:
        """Alignment along the curve (Tatro et al. §4; PAPER_NOTES §2.6): the network at t = 0.5 of each case,
        batch norm re-estimated on the study's batch-norm batches, aligned to each end point by correlation.

        Cases and their end points: ``aligned``, the fitted Aligned curve between A and P·B (P the alignment);
        ``unaligned``, the fitted Unaligned curve between A and B; ``linear``, the straight line between A and
        P·B, i.e. the Aligned curve at epoch 0 (its control point starts at that midpoint), the paper's "Linear
        Midpoint". Written atomically to ``pair<k>/midpoint_alignment.json``; skipped when there."""
        path = self.out / f"pair{k}" / "midpoint_alignment.json"
        if path.exists():
            return json.loads(path.read_text())
        b_aligned = apply_permutation(sd_b, spec.restrict(sd_b), perms)
        cases = {"aligned": (curves["aligned"], b_aligned)}
        if "unaligned" in curves:
            cases["unaligned"] = (curves["unaligned"], sd_b)
        cases["linear"] = (Line.between(_params(a, sd_a), _params(a, b_aligned)), b_aligned)
        out: dict[str, Any] = {"t": 0.5, "end_b": {"aligned": "P w_B", "unaligned": "w_B", "linear": "P w_B"},
                               "cases": {}}  # fmt: skip
        for index, (case, (curve, end_b)) in enumerate(cases.items()):
            self.emit(stage="midpoint alignment", label=f"pair {k}", step=index, total=len(cases), start=index == 0)
            res = midpoint_alignment(a, curve, sd_a, end_b, self.data.align, self.bn_loader(), t=0.5,
                                     bn_batches=self.config.bn_batches, spec=spec)  # fmt: skip
            out["cases"][case] = res.to_dict()
        self.emit(stage="midpoint alignment", label=f"pair {k}", step=len(cases), total=len(cases))
        atomic_write_text(path, json.dumps(_json_floats(out), indent=1))
        self.done(f"pair {k} midpoint alignment")
        return out

    def plane(self, k: int, a: nn.Module, sd_a, sd_b, perms, spec, curve) -> dict[str, Any]:
        c = self.config
        path = self.out / f"pair{k}" / "plane.json"
        if path.exists():
            return json.loads(path.read_text())
        pa, pb = _params(a, sd_a), _params(a, apply_permutation(sd_b, spec.restrict(sd_b), perms))
        theta = curve.points[1]

        def on_point(record: dict[str, Any]) -> None:
            step = record["i"] * c.plane_grid + record["j"] + 1
            self.emit(stage="plane", label=f"pair {k}", step=step, total=c.plane_grid**2)

        self.emit(stage="plane", label=f"pair {k}", step=0, total=c.plane_grid**2, start=True)
        plane = evaluate_plane(a, pa, pb, theta, self.bn_loader(), self.data.test, grid=c.plane_grid,
                               max_bn_batches=c.bn_batches, callback=on_point)  # fmt: skip
        xy = project_to_plane(curve, pa, pb, theta, t=[i / 40 for i in range(41)])
        out = {**plane.to_dict(), "curve_xy": xy.tolist(), "labels": ["w_A", "P w_B", "theta"]}
        atomic_write_text(path, json.dumps(out, indent=1))
        self.done(f"pair {k} plane")
        return out

    # ------------------------------------------------------------------ inputs of later stages
    def pair(self, k: int) -> dict[str, Any]:
        """End points, alignment and spec of pair ``k``, read from their stages' files (cached)."""
        if k not in self._pairs:
            a, meta_a = self.endpoint(2 * k - 1)
            b, meta_b = self.endpoint(2 * k)
            al = self.alignment(k, a, b)
            self._pairs[k] = {
                "a": a, "meta_a": meta_a, "meta_b": meta_b,
                "sd_a": {key: v.to(self.device) for key, v in a.state_dict().items()},
                "sd_b": {key: v.to(self.device) for key, v in b.state_dict().items()},
                "al": al, "perms": {g: p.cpu() for g, p in al["perms"].items()},
                # traced on test inputs: the (unshuffled) test loader draws nothing from any generator
                "spec": trace_spec(a, next(iter(self.data.test))[0][:2].to(self.device)),
            }  # fmt: skip
        return self._pairs[k]

    def pair_curve(self, k: int, setting: str) -> tuple:
        p = self.pair(k)
        return self.curve(k, setting, p["a"], p["sd_a"], p["sd_b"], p["perms"], p["spec"])

    # ------------------------------------------------------------------ one stage
    def run(self, stage: Stage, report_options: Mapping[str, Any]) -> None:
        """Run ``stage`` (its inputs must be done), seeded by its name alone, and record it."""
        torch.manual_seed(stable_seed(self.config.seed, "stage", stage.name))
        self.mark = time.perf_counter()
        words = stage.name.split()
        if words[0] == "endpoint":
            self.endpoint(int(words[1]))
        elif words[0] == "report":
            self.report(**report_options)
        elif words[2] == "alignment":
            self.pair(int(words[1]))
        elif words[2] == "curve":
            self.pair_curve(int(words[1]), words[3])
        elif words[2] == "eval":
            k, setting = int(words[1]), words[3]
            curve, meta = self.pair_curve(k, setting)
            a = self.pair(k)["a"]
            if setting.startswith("pam"):  # earlier outer iterations first: the stage is done when the last is
                for j in range(1, len(meta["objective"]) - 1):
                    self.evaluate(k, f"{setting}_iter{j}", a, Bezier.load(self.out / f"pair{k}" /
                                                                          f"curve_{setting}_iter{j}.pt"))
            self.evaluate(k, setting, a, curve)
        elif words[2] == "midpoint":
            k = int(words[1])
            p = self.pair(k)
            curves = {s: self.pair_curve(k, s)[0] for s in ("aligned", "unaligned") if s in self.config.settings}
            self.midpoint(k, p["a"], p["sd_a"], p["sd_b"], p["perms"], p["spec"], curves)
        elif words[2] == "verification":
            p = self.pair(int(words[1]))
            self.verification(int(words[1]), p["a"], p["sd_a"], p["sd_b"], p["perms"], p["spec"],
                              self.pair_curve(int(words[1]), "aligned")[0])  # fmt: skip
        elif words[2] == "plane":
            p = self.pair(int(words[1]))
            self.plane(int(words[1]), p["a"], p["sd_a"], p["sd_b"], p["perms"], p["spec"],
                       self.pair_curve(int(words[1]), "aligned")[0])  # fmt: skip
        else:  # pragma: no cover - study_stages names every stage
            raise ValueError(f"unknown study stage {stage.name!r}")

    def report(self, paper_row: Mapping[str, Any] | None = None, notes: str | None = None) -> dict[str, Any]:
        """Gather every stage's results from its files into ``results.json``, the figures and the report."""
        from neuralign.experiments.plots import plot_study
        from neuralign.experiments.report import write_report, write_results_json

        c = self.config
        pairs_out = []
        for k in range(1, c.pairs + 1):
            p = self.pair(k)
            curves, evals, pam, histories = {}, {}, {}, {}
            for setting in c.settings:
                curve, meta = self.pair_curve(k, setting)
                curves[setting] = curve
                histories[setting] = _train_history(meta.get("history", []))
                evals[setting] = self.evaluate(k, setting, p["a"], curve).to_dict()
                if setting.startswith("pam"):
                    pam[setting] = {"history": meta["objective"], "changed": meta["changed"],
                                    "iterations": self.pam_iterations(k, setting, meta)}
            aligned = curves.get("aligned")
            verification = plane = midpoint = None
            args = (k, p["a"], p["sd_a"], p["sd_b"], p["perms"], p["spec"], aligned)
            if aligned is not None:
                midpoint = self.midpoint(*args[:-1], curves)
            if c.verify and aligned is not None:
                verification = self.verification(*args)
            if c.plane_grid and aligned is not None and k == 1:
                plane = self.plane(*args)
            al = p["al"]
            pairs_out.append({
                "pair": k,
                "seeds": [2 * k - 1, 2 * k],
                "endpoints": {"a": p["meta_a"]["test"], "b": p["meta_b"]["test"]},
                "alignment": {key: al[key] for key in ("groups", "sizes", "correlation_before", "correlation_after")},
                "curves": evals,
                "pam": pam,
                "verification": verification,
                "plane": plane,
                "midpoint_alignment": midpoint,
                "train_history": histories,
            })  # fmt: skip
        results = {"kind": "study_results", "config": c.to_dict(), "settings": list(c.settings), "pairs": pairs_out,
                   "test_images": len(self.data.test.dataset),
                   "bn_batches": {"count": len(self.bn_loader()) if c.bn_batches is not None else None,
                                  "shared": True}}  # fmt: skip
        write_results_json(results, self.out)
        figures = plot_study(results, self.out / "figures")
        report = write_report(results, self.out, figures=figures, paper_row=paper_row, notes=notes)
        results["report"] = str(report)
        return results


def _job_id() -> str | None:
    """The scheduler's id of the job running this process (Slurm or submitit's local executor), if any."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")


def _stage(config: StudyConfig, name: str) -> Stage:
    stages = {s.name: s for s in study_stages(config)}
    if name not in stages:
        raise ValueError(f"unknown study stage {name!r}; this study has {list(stages)}")
    return stages[name]


def run_stage(
    config: StudyConfig,
    out: str | os.PathLike,
    name: str,
    *,
    device: str | torch.device = "cpu",
    paper_row: Mapping[str, Any] | None = None,
    notes: str | None = None,
    progress: Progress | None = None,
) -> bool:
    """Run the stage ``name`` of the study in ``out`` in this process, unless it is done; True if it ran.

    The entry point of a study's jobs (:mod:`neuralign.experiments.cluster`). Its inputs are read from the files of
    the stages it needs; it writes only its own outputs and its record ``stages/<stage>.json``. The ``report``
    stage always runs (it is cheap and reflects the files present) and then merges the stage records into the
    manifest, which :func:`prepare_study` wrote before any job started. Under a process group (``--gpus-per-job``
    above 1) the stage runs data-parallel and rank 0 writes.

    Raises
    ------
    ValueError
        For a stage this study does not have.
    RuntimeError
        If a stage it needs is not done (names it).
    """
    out = Path(out)
    stage = _stage(config, name)
    missing = [n for n in stage.needs if not stage_done(out, _stage(config, n))]
    if missing:
        raise RuntimeError(f"study stage {name!r} needs {missing}, which are not done in {out}")
    if stage.name != "report" and stage_done(out, stage):
        return False
    study = _Study(config, out, torch.device(device), progress)
    study.run(stage, {"paper_row": paper_row, "notes": notes})
    if stage.name == "report":
        study.manifest = json.loads((out / "manifest.json").read_text())
        _finish_manifest(study, stage)
    return True


def _finish_manifest(study: _Study, report: Stage) -> None:
    run = study.manifest["runs"][-1]
    run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    run["seconds"] = round(time.time() - run.get("started_unix", time.time()), 2)
    study.manifest["report"] = report.outputs[1]  # relative to the study folder
    study.merge_stage_records()


def prepare_study(config: StudyConfig, out: str | os.PathLike, *, device: str | torch.device = "cpu") -> None:
    """Check or start the manifest of a study in ``out`` (refusing a folder that holds other settings, or one with
    a job still queued or running: :func:`neuralign.experiments.jobs.refuse_live_jobs`) and record this run in it;
    done once by the process that runs or submits the stages, before any of them."""
    _prepare(config, Path(out), torch.device(device), None)


def _prepare(config: StudyConfig, out: Path, device: torch.device, progress: Progress | None) -> _Study:
    if out.is_dir():  # no run of any kind while a job of this folder is queued or running
        refuse_live_jobs(out, done={s.name for s in study_stages(config) if s.name != "report" and stage_done(out, s)})
    out.mkdir(parents=True, exist_ok=True)
    study = _Study(config, out, device, progress)
    study.check_manifest()
    study.manifest["data"] = _portable_paths(study.data.describe())
    study.save_manifest()
    return study


def run_study(
    config: StudyConfig,
    out: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    paper_row: Mapping[str, Any] | None = None,
    notes: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) a study and write its results, report and figures into ``out``.

    Every stage of :func:`study_stages` that is not done runs in this process, in order (the same
    :func:`run_stage` work as the jobs of :mod:`neuralign.experiments.cluster`); then the report is written.

    Parameters
    ----------
    config : StudyConfig
        The settings (start from a :data:`PRESETS` entry and ``replace`` what you need).
    out : path-like
        Output folder. A folder from an earlier run with the same config is resumed; one with another config
        is refused.
    device : str or torch.device
        Where models are trained and evaluated (``"cpu"``, ``"cuda"``, ...).
    progress : callable, optional
        Receives dict events ``{"stage", "label", "step", "total", ...}`` (the command line draws progress
        bars from them).
    paper_row : mapping, optional
        The paper's Table 1 numbers to print beside the result (see :mod:`neuralign.experiments.report`).
    notes : str, optional
        Free markdown added to the report.

    Returns
    -------
    dict
        The ``results`` written to ``results.json`` (format documented in :mod:`neuralign.experiments.report`).

    Raises
    ------
    JobError
        While a job of ``out`` (``--executor local|slurm``, listed in ``jobs.json``) is queued or running.
    """
    out = Path(out)
    study = _prepare(config, out, torch.device(device), progress)
    results: dict[str, Any] = {}
    for stage in study_stages(config):
        if stage.name == "report":
            results = study.report(paper_row=paper_row, notes=notes)
            _finish_manifest(study, stage)
        elif not stage_done(out, stage):
            study.run(stage, {})
            study.merge_stage_records()
    return results

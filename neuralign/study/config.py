"""The settings of a study: :class:`StudyConfig`, made of the library's own option objects, and the
:data:`PRESETS` (Tatro et al. 2020, PAPER_NOTES §5.4).

A study's settings are grouped as the library's functions take them, and each group is the library's object:
``pam`` is :class:`~neuralign.curves.CurvePAMOptions`, ``verification`` is
:class:`~neuralign.verification.VerificationOptions`, ``train`` and ``curve`` are
:class:`~neuralign.experiments.training.TrainingOptions`, ``robust.attack`` is :class:`~neuralign.attacks.PGD`; so an
option is defined, validated and documented once, where the library defines it. Settings are addressed by dotted
paths: ``config.set("pam.lam", 10)``, ``neuralign study --set pam.step=birkhoff --set pam.step.lr=1``.

The flat names of before 0.2 (``pam_lam``, ``curve_epochs``, ``verify_swaps``, ...) are still read from older
manifests and accepted by :meth:`StudyConfig.set` with a :class:`DeprecationWarning` (:data:`LEGACY_NAMES` maps
each to its path).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from neuralign._options import Options, nested, set_path
from neuralign._validate import check_bool, check_choice, check_int, check_real
from neuralign.attacks import PGD
from neuralign.curves import CurvePAMOptions
from neuralign.experiments.data.text import parse_text_dataset
from neuralign.experiments.training import TrainingOptions
from neuralign.optim import BirkhoffStep
from neuralign.verification import VerificationOptions

__all__ = [
    "LEGACY_NAMES",
    "PRESETS",
    "SETTINGS",
    "IMAGE_SETTINGS",
    "DataOptions",
    "EvaluationOptions",
    "ModelOptions",
    "RobustOptions",
    "StudyConfig",
]

#: The curve settings of Tatro et al. (2020, Table 1), in the order of the table.
SETTINGS = ("unaligned", "pam_unaligned", "pam_aligned", "aligned")

#: The :class:`DataOptions` that apply to images only (a text dataset such as ``pydoc`` takes none of them).
IMAGE_SETTINGS = ("resize", "mean", "std")


def _size(value: Any, name: str) -> int | float | None:
    """A subset size: None (all), a count >= 1 or a fraction in (0, 1]."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return check_int(value, name, minimum=1, allow_none=True)
    return check_real(value, name, low=0.0, high=1.0, low_open=True)


def _floats(value: Any, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = value if isinstance(value, (tuple, list)) else (value,)
    return tuple(check_real(v, name) for v in values)


@dataclass(frozen=True)
class DataOptions(Options):
    """The data of a study (:func:`~neuralign.experiments.data.load_data`).

    Attributes
    ----------
    dataset : str
        A name known to :func:`~neuralign.experiments.data.load_data` (``cifar10``, ``mnist``, ``digits``, ...),
        an ``.npz`` path or ``imagefolder:PATH``.
    root : str, optional
        The folder holding the dataset.
    download : bool
        Let torchvision download it (needs network).
    batch_size : int
        Training batch size (>= 1; default 128).
    train_size, test_size : int or float, optional
        Subsets: a count or a fraction (default all).
    align_size : int or float, optional
        Alignment images: the first N training images with test transforms (default 10000, the paper's).
    resize : int, optional
        Resize images to this side length.
    mean, std : tuple of float, optional
        Normalisation statistics (default: the dataset's, or computed on the training images).

    Notes
    -----
    :meth:`replace` (so also ``StudyConfig.set("data.dataset", ...)`` and ``neuralign study/compare --data``) to a
    text dataset drops the image settings (:data:`IMAGE_SETTINGS`) not given in the same call: a preset's
    ``resize=16`` for the digits does not follow ``--data pydoc``. One set afterwards stays, and
    :func:`~neuralign.experiments.data.load_data` refuses it, naming it.
    """

    dataset: str = "cifar10"
    root: str | None = None
    download: bool = False
    batch_size: int = 128
    train_size: int | float | None = None
    test_size: int | float | None = None
    align_size: int | float | None = 10000
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise TypeError(f"`dataset` must be a dataset name or path, got {self.dataset!r}")
        self._check("download", check_bool)
        self._check("batch_size", check_int, minimum=1)
        for name in ("train_size", "test_size", "align_size"):
            _size(getattr(self, name), name)
        self._check("resize", check_int, minimum=1, allow_none=True)
        object.__setattr__(self, "mean", _floats(self.mean, "mean"))
        object.__setattr__(self, "std", _floats(self.std, "std"))

    def replace(self, **changes: Any) -> DataOptions:
        """A validated copy with ``changes``; a new text ``dataset`` drops the image settings not in ``changes``
        (see Notes)."""
        dataset = changes.get("dataset")
        if isinstance(dataset, str) and parse_text_dataset(dataset) is not None:
            changes = {**dict.fromkeys(IMAGE_SETTINGS), **changes}
        return super().replace(**changes)


@dataclass(frozen=True)
class ModelOptions(Options):
    """The architecture of a study's end points (:func:`~neuralign.experiments.build_model`).

    Attributes
    ----------
    arch : str
        A zoo name, ``torchvision:<name>`` or ``timm:<name>``.
    width : float, optional
        Width multiplier (ResNet, VGG).
    hidden : tuple of int, optional
        Hidden widths (MLP).
    num_classes : int, optional
        Classes of the heads (default: the dataset's).
    args : dict, optional
        Further builder arguments (e.g. for ``torchvision:<name>``).
    """

    arch: str = "tinyten"
    width: float | None = None
    hidden: tuple[int, ...] | None = None
    num_classes: int | None = None
    args: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not self.arch:
            raise TypeError(f"`arch` must be an architecture name, got {self.arch!r}")
        self._check("width", check_real, low=0.0, low_open=True, allow_none=True)
        if self.hidden is not None:
            hidden = self.hidden if isinstance(self.hidden, (tuple, list)) else (self.hidden,)
            object.__setattr__(self, "hidden", tuple(check_int(h, "hidden", minimum=1) for h in hidden))
        self._check("num_classes", check_int, minimum=1, allow_none=True)
        if self.args is not None:
            if not isinstance(self.args, Mapping):
                raise TypeError(f"`args` must be a dict of builder arguments, got {type(self.args).__name__}")
            object.__setattr__(self, "args", dict(self.args))

    def __hash__(self) -> int:  # `args` is a dict
        return hash((self.arch, self.width, self.hidden, self.num_classes, tuple(sorted((self.args or {}).items()))))


@dataclass(frozen=True)
class EvaluationOptions(Options):
    """How curves are evaluated (:func:`~neuralign.curves.evaluate_curve`, :func:`~neuralign.curves.evaluate_plane`).

    Attributes
    ----------
    num_points : int
        Points along t (>= 2; the paper: 65).
    max_bn_batches : int, optional
        Batches of each batch-norm re-estimation (default None: a full training pass per point, as in the paper).
    plane_grid : int
        Grid side of the loss plane of pair 1 (0: no plane; default 17).
    """

    num_points: int = 65
    max_bn_batches: int | None = None
    plane_grid: int = 17

    def __post_init__(self) -> None:
        self._check("num_points", check_int, minimum=2)
        self._check("max_bn_batches", check_int, minimum=1, allow_none=True)
        if check_int(self.plane_grid, "plane_grid", minimum=0) == 1:
            raise ValueError("`plane_grid` must be 0 (no plane) or at least 2, got 1")


@dataclass(frozen=True)
class RobustOptions(Options):
    """Robust mode connectivity (Tatro et al. 2020 §4): the end points are trained adversarially (Madry), the
    curves are robust and are evaluated on clean and adversarial inputs. Inputs stay in [0, 1] (no normalisation,
    as the official adversarial transforms).

    Attributes
    ----------
    attack : PGD
        The L-infinity PGD attack (:class:`~neuralign.attacks.PGD`; default 8/255, step 2/255, 5 steps).
    bn_inputs : {"adversarial", "clean"}
        What batch norm is re-estimated on along the curves.
    align_inputs : {"clean", "adversarial"}
        What the alignment correlates.
    """

    attack: PGD = nested(PGD, default=PGD())
    bn_inputs: str = "adversarial"
    align_inputs: str = "clean"

    def __post_init__(self) -> None:
        if not isinstance(self.attack, PGD):
            raise TypeError(f"`attack` must be a neuralign.attacks.PGD, got {type(self.attack).__name__}")
        check_choice(self.bn_inputs, "bn_inputs", ("adversarial", "clean"))
        check_choice(self.align_inputs, "align_inputs", ("clean", "adversarial"))


@dataclass(frozen=True)
class StudyConfig(Options):
    """Every setting of a study (the defaults are the paper's, PAPER_NOTES §5.4; see :data:`PRESETS`).

    Attributes
    ----------
    pairs : int
        End-point pairs: end points ``1 .. 2 * pairs``, paired (1, 2), (3, 4), ...
    seed : int
        Base of every derived seed.
    settings : tuple of str
        Which of :data:`SETTINGS` to fit (in that order).
    endpoints : tuple of str, optional
        Given end points instead of training them: ``2 * pairs`` files paired in order (any format
        :func:`~neuralign.experiments.load_endpoint` reads; plain files are read as ``model.arch`` with the
        dataset's classes). A robust study refuses an end point whose recorded data has normalisation statistics.
    max_batches : int, optional
        Cut every epoch short (smoke tests only).
    data : DataOptions
    model : ModelOptions
    train : TrainingOptions
        The end points' training.
    curve : TrainingOptions
        The curves' fitting (and the schedule of PAM's x-steps).
    pam : CurvePAMOptions
        PAM on the curve (the PAM settings); every outer iteration's curve is evaluated like the final one.
    evaluation : EvaluationOptions
    verification : VerificationOptions or None
        The checks of the alignment (None: none).
    robust : RobustOptions or None
        A robust study (None: standard). Robust studies fit the Unaligned and Aligned settings (PAM is not
        robust) and have no verification (its checks use the clean loss).

    Raises
    ------
    TypeError, ValueError
        For a setting of the wrong kind or value, or settings that contradict each other (names them).

    Examples
    --------
    >>> c = PRESETS["demo"].set("pam.lam", 10.0)
    >>> c.pam.lam, c.set("pam.step", "birkhoff").pam.step.method
    (10.0, 'birkhoff')
    """

    pairs: int = 3
    seed: int = 0
    settings: tuple[str, ...] = SETTINGS
    endpoints: tuple[str, ...] | None = None
    max_batches: int | None = None
    data: DataOptions = nested(DataOptions, default=DataOptions())
    model: ModelOptions = nested(ModelOptions, default=ModelOptions())
    train: TrainingOptions = nested(TrainingOptions, default=TrainingOptions())
    curve: TrainingOptions = nested(TrainingOptions, default=TrainingOptions())
    pam: CurvePAMOptions = nested(CurvePAMOptions, default=CurvePAMOptions(x_epochs=250))
    evaluation: EvaluationOptions = nested(EvaluationOptions, default=EvaluationOptions())
    verification: VerificationOptions | None = nested(VerificationOptions, optional=True,
                                                      default=VerificationOptions(n_swaps=64))  # fmt: skip
    robust: RobustOptions | None = nested(RobustOptions, optional=True, default=None)

    def __post_init__(self) -> None:
        self._check("pairs", check_int, minimum=1)
        self._check("seed", check_int)
        self._check("max_batches", check_int, minimum=1, allow_none=True)
        settings = (self.settings,) if isinstance(self.settings, str) else tuple(self.settings)
        unknown = [s for s in settings if s not in SETTINGS]
        if unknown or not settings:
            raise ValueError(f"unknown settings {unknown}; expected a non-empty subset of {list(SETTINGS)}")
        object.__setattr__(self, "settings", tuple(s for s in SETTINGS if s in settings))
        if self.endpoints is not None:
            given = (self.endpoints,) if isinstance(self.endpoints, str) else tuple(str(p) for p in self.endpoints)
            if len(given) != 2 * self.pairs:
                raise ValueError(f"`endpoints` must name 2 * pairs = {2 * self.pairs} files, got {len(given)}")
            object.__setattr__(self, "endpoints", given)
        for name, cls in (("data", DataOptions), ("model", ModelOptions), ("train", TrainingOptions),
                          ("curve", TrainingOptions), ("pam", CurvePAMOptions),
                          ("evaluation", EvaluationOptions)):  # fmt: skip
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"`{name}` must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        if self.verification is not None and not isinstance(self.verification, VerificationOptions):
            raise TypeError(f"`verification` must be a VerificationOptions or None, got "
                            f"{type(self.verification).__name__}")  # fmt: skip
        if self.robust is not None:
            if not isinstance(self.robust, RobustOptions):
                raise TypeError(f"`robust` must be a RobustOptions or None, got {type(self.robust).__name__}")
            pam = [s for s in self.settings if s.startswith("pam")]
            if pam:
                raise ValueError(f"settings {pam} are not robust (PAM fits clean curves); a robust study fits "
                                 "settings=('unaligned', 'aligned')")  # fmt: skip
            if self.verification is not None:
                raise ValueError("verification checks the clean curve objective; a robust study needs "
                                 "verification=None")  # fmt: skip
            if self.data.mean is not None or self.data.std is not None:
                raise ValueError("a robust study attacks [0, 1] inputs, which are not normalised: drop data.mean and "
                                 "data.std")  # fmt: skip

    def __getattr__(self, name: str) -> Any:
        # the flat names of before 0.2 still read, with a DeprecationWarning (``config.pam_lam``)
        if name in LEGACY_NAMES and name not in _FIELDS:
            path = LEGACY_NAMES[name]
            path = path if isinstance(path, str) else path[0]
            warnings.warn(f"the study setting {name!r} is {_shown(LEGACY_NAMES[name])!r} since neuralign 0.2",
                          DeprecationWarning, stacklevel=2)  # fmt: skip
            if name == "verify":
                return self.verification is not None
            value: Any = self
            for part in path.split("."):
                value = getattr(value, part, None)
            return value.method if name == "pam_method" else value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def replace(self, **changes: Any) -> StudyConfig:
        """A copy with ``changes`` (field names; the flat names of before 0.2 with a :class:`DeprecationWarning`)."""
        config = self
        legacy = {k: changes.pop(k) for k in list(changes) if k not in _FIELDS and k in LEGACY_NAMES}
        if changes:
            config = super().replace(**changes)
        for name, value in legacy.items():
            config = config.set(name, value, _stacklevel=3)
        return config

    def attack(self) -> PGD | None:
        """The study's attack, or None for a standard study."""
        return None if self.robust is None else self.robust.attack

    def set(self, path: str, value: Any, *, _stacklevel: int = 2) -> StudyConfig:
        """A copy with the setting at the dotted ``path`` changed (``"pam.lam"``, ``"verification"``); a flat name
        of before 0.2 (:data:`LEGACY_NAMES`) is translated with a :class:`DeprecationWarning`.

        Raises
        ------
        TypeError, ValueError
            For an unknown path (names the known settings there) or a value the setting refuses (names the
            setting by its path: "`pam.lam` must be a number > 0 ...").
        """
        if path in LEGACY_NAMES and path not in _FIELDS:
            new = LEGACY_NAMES[path]
            warnings.warn(f"the study setting {path!r} is {_shown(new)!r} since neuralign 0.2", DeprecationWarning,
                          stacklevel=_stacklevel)  # fmt: skip
            return _set_legacy(self, path, value)
        if path in ("verification", "robust") and not isinstance(value, (Options, Mapping)) and value is not None:
            kind = VerificationOptions if path == "verification" else RobustOptions
            if not isinstance(value, bool):  # `--set robust=no` must not run a robust study
                raise TypeError(f"`{path}` must be true, false or {kind.__name__} settings, got {value!r}")
            current = getattr(self, path)  # on (with its defaults when it was off), or off
            value = (current if current is not None else kind()) if value else None
        try:
            return set_path(self, path, value)
        except (TypeError, ValueError) as exc:
            leaf, message = path.rsplit(".", 1)[-1], str(exc)
            if "." in path and message.startswith(f"`{leaf}`"):  # say which `lam`: pam's or verification's
                raise type(exc)(f"`{path}`{message[len(leaf) + 2:]}") from None
            raise

    def apply(self, settings: Mapping[str, Any]) -> StudyConfig:
        """A copy with every ``{path: value}`` of ``settings`` set, in order (see :meth:`set`)."""
        config = self
        for path, value in settings.items():
            config = config.set(path, value, _stacklevel=3)
        return config

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudyConfig:
        """Inverse of :meth:`to_dict`; also reads the flat configuration of a manifest written before 0.2."""
        if isinstance(data, Mapping) and any(k in _LEGACY_DEFAULTS and k not in _FIELDS for k in data):
            return _from_legacy(data)
        return super().from_dict(data)


_FIELDS = {f.name for f in dataclasses.fields(StudyConfig)}

#: The flat study settings of before 0.2 -> their dotted paths now (a tuple where one name set two).
LEGACY_NAMES: dict[str, str | tuple[str, ...]] = {
    "arch": "model.arch", "dataset": "data.dataset", "data_root": "data.root", "download": "data.download",
    "width": "model.width", "hidden": "model.hidden", "batch_size": "data.batch_size",
    "train_size": "data.train_size", "test_size": "data.test_size", "align_size": "data.align_size",
    "resize": "data.resize", "epochs": "train.epochs", "lr": "train.lr", "weight_decay": "train.weight_decay",
    "curve_epochs": "curve.epochs", "curve_lr": "curve.lr", "curve_weight_decay": "curve.weight_decay",
    "pam_iters": "pam.max_iter", "pam_x_epochs": "pam.x_epochs", "pam_lam": "pam.lam", "pam_method": "pam.step",
    "pam_max_moved": "pam.step.max_moved", "pam_p_steps": "pam.step.p_steps", "pam_birkhoff_steps": "pam.step.steps",
    "pam_birkhoff_lr": "pam.step.lr", "pam_birkhoff_samples": "pam.step.samples",
    "pam_value_batches": "pam.value_batches", "pam_local_search": "pam.swap_trials",
    "pam_gradient_batches": "pam.gradient_batches", "num_points": "evaluation.num_points",
    "bn_batches": "evaluation.max_bn_batches", "plane_grid": "evaluation.plane_grid", "verify": "verification",
    "verify_iters": "verification.stability_iters", "verify_swaps": "verification.n_swaps",
    "verify_batches": "verification.value_batches", "verify_ts": "verification.value_ts",
    "verify_local_search": "verification.swap_trials", "verify_random_starts": "verification.random_starts",
    "num_classes": "model.num_classes", "model_args": "model.args", "mean": "data.mean", "std": "data.std",
    "lr_schedule": ("train.schedule", "curve.schedule"), "robust": "robust", "eps": "robust.attack.eps",
    "alpha": "robust.attack.alpha", "attack_steps": "robust.attack.steps", "robust_bn": "robust.bn_inputs",
    "align_inputs": "robust.align_inputs",
}  # fmt: skip


def _shown(new: str | tuple[str, ...]) -> str:
    return new if isinstance(new, str) else " and ".join(new)


def _set_legacy(config: StudyConfig, name: str, value: Any) -> StudyConfig:
    new = LEGACY_NAMES[name]
    if name == "verify":
        return config.set("verification", value)
    if name == "pam_x_epochs" and value is None:  # before 0.2: None meant the curves' epochs
        value = config.curve.epochs
    if name.startswith("pam_birkhoff") and config.pam.step.method != "birkhoff":
        return config  # before 0.2 the Birkhoff settings were kept (unused) with the linearised step
    for path in (new,) if isinstance(new, str) else new:
        config = config.set(path, value)
    return config


# the defaults of the flat configuration of before 0.2 (what a missing name of an older manifest meant)
_LEGACY_DEFAULTS: dict[str, Any] = {
    "arch": "tinyten", "dataset": "cifar10", "data_root": None, "download": False, "pairs": 3, "seed": 0,
    "width": None, "hidden": None, "batch_size": 128, "train_size": None, "test_size": None, "align_size": 10000,
    "resize": None, "epochs": 250, "lr": 0.1, "weight_decay": 5e-4, "curve_epochs": 250, "curve_lr": 0.1,
    "curve_weight_decay": 5e-4, "pam_iters": 1, "pam_x_epochs": None, "pam_lam": 1000.0, "pam_method": "linearized",
    "pam_max_moved": None, "pam_p_steps": 1, "pam_birkhoff_steps": 20, "pam_birkhoff_lr": None,
    "pam_birkhoff_samples": 32, "pam_value_batches": 8, "pam_local_search": 0, "pam_gradient_batches": None,
    "num_points": 65, "bn_batches": None, "plane_grid": 17, "verify": True, "verify_iters": 2, "verify_swaps": 64,
    "verify_batches": 8, "verify_ts": (0.25, 0.5, 0.75), "verify_local_search": 16, "verify_random_starts": 1,
    "settings": SETTINGS, "max_batches": None, "endpoints": None, "num_classes": None, "model_args": None,
    "mean": None, "std": None, "lr_schedule": "paper", "robust": False, "eps": 8 / 255, "alpha": 2 / 255,
    "attack_steps": 5, "robust_bn": "adversarial", "align_inputs": "clean",
}  # fmt: skip


def _from_legacy(flat: Mapping[str, Any]) -> StudyConfig:
    """The study of a flat configuration of before 0.2 (a manifest's ``config``), with its defaults then."""
    c = {**_LEGACY_DEFAULTS, **flat}
    unknown = sorted(k for k in flat if k not in _LEGACY_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown study settings {unknown} in a configuration of before neuralign 0.2")
    tup = (lambda v: None if v is None else tuple(v))  # noqa: E731
    if c["pam_method"] == "birkhoff":
        step: Any = BirkhoffStep(steps=c["pam_birkhoff_steps"], lr=c["pam_birkhoff_lr"],
                                 samples=c["pam_birkhoff_samples"])  # fmt: skip
    else:
        step = CurvePAMOptions().step.replace(max_moved=c["pam_max_moved"], p_steps=c["pam_p_steps"])
    verification = None
    if c["verify"]:
        verification = VerificationOptions(
            lam=c["pam_lam"], stability_iters=c["verify_iters"], n_swaps=c["verify_swaps"],
            value_batches=c["verify_batches"], value_ts=tuple(c["verify_ts"]), swap_trials=c["verify_local_search"],
            random_starts=c["verify_random_starts"], gradient_batches=c["pam_gradient_batches"] or 4,
        )  # fmt: skip
    robust = None
    if c["robust"]:
        robust = RobustOptions(attack=PGD(eps=c["eps"], alpha=c["alpha"], steps=c["attack_steps"]),
                               bn_inputs=c["robust_bn"], align_inputs=c["align_inputs"])  # fmt: skip
    return StudyConfig(
        pairs=c["pairs"], seed=c["seed"], settings=tuple(c["settings"]), endpoints=tup(c["endpoints"]),
        max_batches=c["max_batches"],
        data=DataOptions(dataset=c["dataset"], root=c["data_root"], download=c["download"],
                         batch_size=c["batch_size"], train_size=c["train_size"], test_size=c["test_size"],
                         align_size=c["align_size"], resize=c["resize"], mean=tup(c["mean"]), std=tup(c["std"])),
        model=ModelOptions(arch=c["arch"], width=c["width"], hidden=tup(c["hidden"]), num_classes=c["num_classes"],
                           args=c["model_args"]),
        train=TrainingOptions(epochs=c["epochs"], lr=c["lr"], weight_decay=c["weight_decay"],
                              schedule=c["lr_schedule"]),
        curve=TrainingOptions(epochs=c["curve_epochs"], lr=c["curve_lr"], weight_decay=c["curve_weight_decay"],
                              schedule=c["lr_schedule"]),
        pam=CurvePAMOptions(step=step, lam=c["pam_lam"], max_iter=c["pam_iters"],
                            x_epochs=c["pam_x_epochs"] or c["curve_epochs"], gradient_batches=c["pam_gradient_batches"],
                            value_batches=c["pam_value_batches"], swap_trials=c["pam_local_search"]),
        evaluation=EvaluationOptions(num_points=c["num_points"], max_bn_batches=c["bn_batches"],
                                     plane_grid=c["plane_grid"]),
        verification=verification,
        robust=robust,
    )  # fmt: skip


_ROBUST = RobustOptions()

PRESETS: dict[str, StudyConfig] = {
    # PAPER_NOTES §5.4: 250 epochs, 65 points, full BN passes, 3 pairs; for GPUs.
    "paper": StudyConfig(),
    # TinyTen on CIFAR-10 scaled to 2 CPU cores: 82 min with --executor local --jobs 2 (README, Table 1 evidence).
    # PAM: the official relaxed P-step (projected SGD on the Birkhoff polytope, then BvN rounding) over 2 epochs of
    # single batches (the official code: 20 epochs at lr 0.05; lr 1 moves as far in 1/10 of the steps), in 2 outer
    # iterations whose x-steps add up to the other curves' 10 epochs; rounding among 10 candidates on 4 batches
    # (32 draws on 8 batches: ~20 min per P-step here under load, most of PAM's time; pair 1 Min 64.7 against 64.5).
    "cpu": StudyConfig(
        pairs=3,
        data=DataOptions(train_size=10000, test_size=5000, align_size=5000),
        train=TrainingOptions(epochs=20),
        curve=TrainingOptions(epochs=10),
        pam=CurvePAMOptions(step=BirkhoffStep(steps=160, lr=1.0, samples=8), max_iter=2, x_epochs=5,
                            value_batches=4, gradient_batches=1),  # fmt: skip
        evaluation=EvaluationOptions(num_points=17, max_bn_batches=10, plane_grid=9),
        # stability runs PAM from the alignment only: the study's PAM Unaligned curve is PAM from the identity with
        # the study's budget (the other starts, two thirds of stability's time, informed no verdict)
        verification=VerificationOptions(stability_iters=1, n_swaps=16, value_batches=4, value_ts=(0.5,),
                                         swap_trials=8, identity_start=False, random_starts=0, gradient_batches=1),
    ),
    # The offline demo on the shipped UCI digits (8x8, resized to 16x16 for TinyTen): a few minutes on a CPU.
    "demo": StudyConfig(
        pairs=1,
        data=DataOptions(dataset="digits", resize=16, batch_size=64, align_size=None),
        train=TrainingOptions(epochs=15),
        # six curve epochs with Garipov's decaying rate: at a constant 0.1 the last SGD iterate was noisy (held-out
        # loss 0.105 at t = 0.5 against 0.005-0.009 elsewhere) and the verification rightly found moves improving it
        curve=TrainingOptions(epochs=6, schedule="garipov"),
        pam=CurvePAMOptions(x_epochs=6, gradient_batches=4),
        evaluation=EvaluationOptions(num_points=11, max_bn_batches=4, plane_grid=7),
        # screen_pairs 16: the race runs on the 16 best transpositions of each group by the linearised screen (every
        # group has a chain); measured with benchmarks/bench_verification.py --screen-pairs 512 16: the same
        # verdicts and best scored move in 7 of 8 groups, the neighbourhood check 5.7x faster
        verification=VerificationOptions(stability_iters=1, n_swaps=8, value_batches=4, value_ts=(0.5,),
                                         swap_trials=4, identity_start=False, random_starts=0, gradient_batches=4,
                                         screen_pairs=16),
    ),
    # Robust curves between adversarially trained end points (PAPER_NOTES §4): PGD-5 at 8/255 (step 2/255),
    # 200 epochs for end points and curves with Garipov's schedule, 65 points; for GPUs.
    "robust": StudyConfig(
        settings=("unaligned", "aligned"),
        train=TrainingOptions(epochs=200, schedule="garipov"),
        curve=TrainingOptions(epochs=200, schedule="garipov"),
        pam=CurvePAMOptions(x_epochs=200),
        evaluation=EvaluationOptions(plane_grid=0),
        verification=None,
        robust=_ROBUST,
    ),
    # The robust study at CPU scale: MLPs (784-256-256-10, batch norm) on MNIST, eps 0.1, step 0.025, PGD-5.
    # Measured on this 2-core machine (1 thread, shared): a robust TinyTen epoch on CIFAR-10 costs ~130 s per 10k
    # images, so 4 robust end points and 4 robust curves worth attacking do not fit in an hour; a robust epoch of
    # this MLP costs ~5.5 s per 20k MNIST images (6 epochs on 20k: 96.1 % clean, 79.2 % robust test accuracy;
    # standard training: 96.9 % and 9.6 %). All 60k images, 10 + 10 epochs: ~25 min for 2 pairs.
    "robust-cpu": StudyConfig(
        pairs=2,
        settings=("unaligned", "aligned"),
        data=DataOptions(dataset="mnist", align_size=5000),
        model=ModelOptions(arch="mlp", hidden=(256, 256)),
        train=TrainingOptions(epochs=10, lr=0.05, schedule="garipov"),
        curve=TrainingOptions(epochs=10, lr=0.05, schedule="garipov"),
        pam=CurvePAMOptions(x_epochs=10),
        evaluation=EvaluationOptions(num_points=17, max_bn_batches=10, plane_grid=0),
        verification=None,
        robust=RobustOptions(attack=PGD(eps=0.1, alpha=0.025, steps=5)),
    ),
}

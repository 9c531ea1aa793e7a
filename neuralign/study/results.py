"""A study's results as frozen dataclasses, and their JSON form ``results.json`` (Tatro et al. 2020, Table 1).

:class:`StudyResults` is what the runner (:func:`neuralign.study.run_study`) builds and writes, and what the report
(:mod:`neuralign.study.report`) and the figures (:mod:`neuralign.study.plots`) read. Its parts are the library's
own result types where there is one (:class:`~neuralign.curves.CurveEvaluation`,
:class:`~neuralign.curves.PlaneEvaluation`, :class:`~neuralign.curves.MidpointAlignment`,
:class:`~neuralign.verification.VerificationReport`) and the small records of this module otherwise.
:meth:`StudyResults.to_dict` gives the JSON form below (accuracies are fractions in [0, 1]);
:meth:`StudyResults.from_dict` reads it back and validates it, naming the first wrong part ("`results['pairs'][1]`
lacks the key 'endpoints'").

.. code-block:: text

    {"kind": "study_results",
     "config": StudyConfig.to_dict() (or the flat configuration of before 0.2),
     "settings": [subset of SETTINGS, in that order],
     "pairs": [{"pair": 1, "seeds": [1, 2],                                                   # PairResults
                "endpoints": {"a": {"test_loss", "test_acc"[, "robust_test_loss", "robust_test_acc"]},
                              "b": {...}},                                                   # EndpointMetrics
                "alignment": {"groups", "sizes", "correlation_before", "correlation_after"} or None,
                "curves": {setting: CurveEvaluation.to_dict()},
                "pam": {pam setting: {"history": [...], "changed": {group: [...]},            # PAMRun
                                      "iterations": [{"iteration", "objective", "moved", "avg_accuracy",
                                                      "min_accuracy"}, ...]}},
                "verification": VerificationReport.to_dict() or None,
                "plane": PlaneEvaluation.to_dict() + {"curve_xy", "labels"} or None,         # PlaneResults
                "midpoint_alignment": {"t", "end_b", "cases": {case: MidpointAlignment.to_dict()}} or None,
                "train_history": {setting: [{"epoch", "loss", "accuracy"}, ...]}}, ...],
     "test_images": 10000, "bn_batches": {"count": 10 or None, "shared": true}}

Required: ``settings``, ``pairs`` (at least one) and in every pair ``endpoints`` (``test_acc`` of ``a`` and ``b``)
and ``curves`` (one evaluation per setting); every other key is optional. A key that a file lacks (results written
by an older version, or made by hand) stays absent when the results are written back, and keys this version does
not know are kept (``extra``) at the top level, in a pair and in an end point's metrics, so that
``StudyResults.from_dict(d).to_dict() == d``. :func:`write_results_json` and :func:`read_results_json` (and
:meth:`StudyResults.write`, :meth:`StudyResults.read`) write and read ``results.json`` with the one codec of result
files, :mod:`neuralign._json`: strict JSON, NaN and infinities as the strings ``"nan"``, ``"inf"``, ``"-inf"``.

Why one module: the records are the parts of one schema, ``results.json``; defining, validating, writing and reading
them in one place keeps the file, its validation and the code that reads it from drifting apart.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuralign import _json
from neuralign._utils import atomic_write_text
from neuralign._validate import require_key
from neuralign.curves import CurveEvaluation, MidpointAlignment, PlaneEvaluation
from neuralign.study.config import SETTINGS, StudyConfig
from neuralign.verification import VerificationReport

__all__ = [
    "AlignmentSummary",
    "BNBatches",
    "EndpointMetrics",
    "Endpoints",
    "MidpointResults",
    "PAMIteration",
    "PAMRun",
    "PairResults",
    "PlaneResults",
    "StudyResults",
    "TrainEpoch",
    "as_study_results",
    "read_results_json",
    "validate_results",
    "write_results_json",
]

_RESULT_KEYS = ["kind", "config", "settings", "pairs"]
#: The fields of a curve evaluation that every table and figure reads (checked first, in this order).
_CURVE_KEYS = ("t", "test_loss", "test_accuracy", "avg_accuracy", "min_accuracy", "loss_barrier", "mid_accuracy")
_CURVE_REQUIRED = tuple(
    f.name for f in dataclasses.fields(CurveEvaluation)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)  # fmt: skip
_PLANE_REQUIRED = tuple(
    f.name for f in dataclasses.fields(PlaneEvaluation)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)  # fmt: skip
_ENDPOINT_KEYS = ("test_loss", "test_acc", "robust_test_loss", "robust_test_acc")
_MIDPOINT_KEYS = ("t", "groups", "before", "after", "moved")


# ----------------------------------------------------------------------------------------------------------------
# validation of the JSON form


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"`{where}` must be a dict, got {type(value).__name__}")
    return value


def _sequence(value: Any, where: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"`{where}` must be a list, got {type(value).__name__}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any, where: str) -> Any:
    if not _is_number(value):
        raise TypeError(f"`{where}` must be a number, got {value!r}")
    return value


def _optional_number(value: Any, where: str) -> Any:
    return None if value is None else _number(value, where)


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{where}` must be an int, got {value!r}")
    return value


def _numbers(value: Any, where: str) -> tuple[Any, ...]:
    return tuple(_number(v, f"{where}[{i}]") for i, v in enumerate(_sequence(value, where)))


def _by_group(value: Any, where: str, check: Any = _number) -> dict[str, Any]:
    return {str(g): check(v, f"{where}[{g!r}]") for g, v in _mapping(value, where).items()}


def _closed(data: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ValueError(f"`{where}` has unknown keys {unknown}; expected some of {list(known)}")


def _library(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """``cls.from_dict(data)`` for a result type of the library, its error naming ``where``."""
    try:
        return cls.from_dict(data)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"`{where}` is not a {cls.__name__}: {exc}") from exc


def _check_settings(settings: Any) -> tuple[str, ...]:
    if isinstance(settings, str) or not isinstance(settings, Sequence):
        raise TypeError(f"`results['settings']` must be a list of setting names, got {type(settings).__name__}")
    for s in settings:
        if s not in SETTINGS:
            raise ValueError(f"unknown setting {s!r} in `results['settings']`; expected a subset of {list(SETTINGS)}")
    order = [SETTINGS.index(s) for s in settings]
    if order != sorted(set(order)):
        raise ValueError(
            f"`results['settings']` must list distinct settings in the order {list(SETTINGS)}, got {list(settings)}"
        )
    return tuple(settings)


def _curve(data: Any, where: str) -> CurveEvaluation:
    for key in _CURVE_KEYS:
        require_key(data, key, where)
    n = len(data["t"])
    if n < 2 or len(data["test_loss"]) != n or len(data["test_accuracy"]) != n:
        raise ValueError(
            f"`{where}` must have 't', 'test_loss' and 'test_accuracy' of one length >= 2, got "
            f"{n}, {len(data['test_loss'])} and {len(data['test_accuracy'])}"
        )
    for key in _CURVE_REQUIRED:
        require_key(data, key, where)
    return _library(CurveEvaluation, data, where)


def _computed(report: dict[str, Any]) -> dict[str, Any]:
    """A verification report's JSON form without its checks' ``seconds`` and ``expected_seconds`` (costs measured,
    kept in ``pairK/verification.json``): results hold what is computed, equal from run to run and executor to
    executor."""
    out = copy.deepcopy(report)
    for key in ("seconds", "expected_seconds"):
        out.get("config", {}).pop(key, None)
    return out


def _verification(data: Any, where: str) -> VerificationReport:
    for i, check in _mapping(require_key(data, "checks", where), f"{where}['checks']").items():
        for key in ("name", "verdict", "summary"):
            require_key(check, key, f"{where}['checks'][{i!r}]")
    return _library(VerificationReport, copy.deepcopy(data), where)


# ----------------------------------------------------------------------------------------------------------------
# the records
@dataclass(frozen=True)
class EndpointMetrics:
    """Test metrics of one end point as trained (its own batch-norm statistics); accuracies are fractions.

    ``robust_test_loss`` and ``robust_test_acc`` (a robust study's PGD examples) are None in a standard study;
    ``extra`` keeps what else the end point's file recorded.
    """

    test_acc: float
    test_loss: float | None = None
    robust_test_loss: float | None = None
    robust_test_acc: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """``{"test_loss", "test_acc"[, "robust_test_loss", "robust_test_acc"]}`` (None values left out)."""
        out = {k: getattr(self, k) for k in _ENDPOINT_KEYS if getattr(self, k) is not None}
        return {**out, **copy.deepcopy(self.extra)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "endpoint") -> EndpointMetrics:
        """Inverse of :meth:`to_dict`; ``where`` names the dict in error messages."""
        acc = require_key(data, "test_acc", where)
        if not _is_number(acc):
            raise TypeError(f"`{where}['test_acc']` must be a number, got {acc!r}")
        values = {k: _optional_number(data.get(k), f"{where}[{k!r}]") for k in _ENDPOINT_KEYS}
        extra = {k: v for k, v in data.items() if k not in _ENDPOINT_KEYS}
        return cls(**values, extra=copy.deepcopy(extra))


@dataclass(frozen=True)
class Endpoints:
    """The metrics of a pair's end points A (``a``, at :math:`t = 0`) and B (``b``, at :math:`t = 1`)."""

    a: EndpointMetrics
    b: EndpointMetrics

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a.to_dict(), "b": self.b.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "endpoints") -> Endpoints:
        ends = {e: EndpointMetrics.from_dict(require_key(data, e, where), where=f"{where}[{e!r}]") for e in ("a", "b")}
        _closed(data, ("a", "b"), where)
        return cls(**ends)


@dataclass(frozen=True)
class AlignmentSummary:
    """A pair's alignment by activation correlation: the permutation groups (input to output), their sizes, and
    per group the mean correlation of matched units before and after aligning B to A."""

    groups: tuple[str, ...]
    correlation_before: dict[str, float]
    correlation_after: dict[str, float]
    sizes: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"groups": list(self.groups)}
        if self.sizes is not None:
            out["sizes"] = dict(self.sizes)
        return {**out, "correlation_before": dict(self.correlation_before),
                "correlation_after": dict(self.correlation_after)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "alignment") -> AlignmentSummary:
        groups = tuple(str(g) for g in _sequence(require_key(data, "groups", where), f"{where}['groups']"))
        before = _by_group(require_key(data, "correlation_before", where), f"{where}['correlation_before']")
        after = _by_group(require_key(data, "correlation_after", where), f"{where}['correlation_after']")
        sizes = data.get("sizes")
        _closed(data, ("groups", "sizes", "correlation_before", "correlation_after"), where)
        sizes = None if sizes is None else _by_group(sizes, f"{where}['sizes']", _integer)
        return cls(groups, before, after, sizes)


@dataclass(frozen=True)
class PAMIteration:
    """One outer iteration of PAM on a curve: its objective, the units it moved, and the Avg / Min test accuracy
    of that iteration's curve (evaluated like the final curve)."""

    iteration: int
    objective: float
    moved: int
    avg_accuracy: float
    min_accuracy: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "iteration") -> PAMIteration:
        names = [f.name for f in dataclasses.fields(cls)]
        values = {k: require_key(data, k, where) for k in names}
        _closed(data, names, where)
        for k in ("iteration", "moved"):
            _integer(values[k], f"{where}[{k!r}]")
        for k in ("objective", "avg_accuracy", "min_accuracy"):
            _number(values[k], f"{where}[{k!r}]")
        return cls(**values)


@dataclass(frozen=True)
class PAMRun:
    """A PAM setting's run on one pair: the objective after each outer iteration (the start first), the units
    changed per group and iteration, and the per-iteration rows (None when not recorded)."""

    history: tuple[float, ...]
    changed: dict[str, tuple[int, ...]]
    iterations: tuple[PAMIteration, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"history": list(self.history), "changed": {g: list(v) for g, v in self.changed.items()}}
        if self.iterations is not None:
            out["iterations"] = [row.to_dict() for row in self.iterations]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "pam") -> PAMRun:
        history = _numbers(require_key(data, "history", where), f"{where}['history']")
        changed = _by_group(require_key(data, "changed", where), f"{where}['changed']",
                            lambda v, w: tuple(_integer(c, f"{w}[{i}]") for i, c in enumerate(_sequence(v, w))))
        _closed(data, ("history", "changed", "iterations"), where)
        rows = data.get("iterations")
        iterations = None if rows is None else tuple(
            PAMIteration.from_dict(r, where=f"{where}['iterations'][{i}]")
            for i, r in enumerate(_sequence(rows, f"{where}['iterations']"))
        )  # fmt: skip
        return cls(history, changed, iterations)

    @property
    def n_iter(self) -> int:
        """Outer iterations run (the longest list of changes per group)."""
        return max((len(v) for v in self.changed.values()), default=0)


@dataclass(frozen=True)
class TrainEpoch:
    """One epoch of a curve's fit (1-based, counted over PAM's outer iterations in order): the mean training loss
    and accuracy over its batches."""

    epoch: int
    loss: float
    accuracy: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "epoch") -> TrainEpoch:
        values = {k: require_key(data, k, where) for k in ("epoch", "loss", "accuracy")}
        _closed(data, ("epoch", "loss", "accuracy"), where)
        _integer(values["epoch"], f"{where}['epoch']")
        for k in ("loss", "accuracy"):
            _number(values[k], f"{where}[{k!r}]")
        return cls(**values)


@dataclass(frozen=True)
class PlaneResults:
    """Loss and accuracy over the plane through A, P·B and the Aligned curve's control point, with the curve
    projected into it (``curve_xy``, ``[[x, y], ...]``) and the names of the three points (``labels``)."""

    evaluation: PlaneEvaluation
    curve_xy: tuple[tuple[float, float], ...] | None = None
    labels: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """:meth:`PlaneEvaluation.to_dict <neuralign.curves.PlaneEvaluation.to_dict>` with ``curve_xy`` and
        ``labels`` added (each only when not None)."""
        out = self.evaluation.to_dict()
        if self.curve_xy is not None:
            out["curve_xy"] = [list(p) for p in self.curve_xy]
        if self.labels is not None:
            out["labels"] = list(self.labels)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "plane") -> PlaneResults:
        for key in _PLANE_REQUIRED:
            require_key(data, key, where)
        evaluation = _library(PlaneEvaluation, {k: v for k, v in data.items() if k not in ("curve_xy", "labels")},
                              where)  # fmt: skip
        xy, labels = data.get("curve_xy"), data.get("labels")
        if xy is not None:
            xw = f"{where}['curve_xy']"
            xy = tuple(_numbers(p, f"{xw}[{i}]") for i, p in enumerate(_sequence(xy, xw)))
        if labels is not None:
            labels = tuple(str(n) for n in _sequence(labels, f"{where}['labels']"))
        return cls(evaluation, xy, labels)


@dataclass(frozen=True)
class MidpointResults:
    """Alignment along the curve (Tatro et al. §4): per case (``aligned``, ``unaligned``, ``linear``), the network
    at ``t`` of that curve aligned to each end point (:class:`~neuralign.curves.MidpointAlignment`); ``end_b``
    names each case's end point B (``"P w_B"`` or ``"w_B"``), when recorded."""

    t: float
    cases: dict[str, MidpointAlignment]
    end_b: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": self.t}
        if self.end_b is not None:
            out["end_b"] = dict(self.end_b)
        out["cases"] = {case: copy.deepcopy(res.to_dict()) for case, res in self.cases.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "midpoint_alignment") -> MidpointResults:
        t = _number(require_key(data, "t", where), f"{where}['t']")
        cases = {}
        for case, res in _mapping(require_key(data, "cases", where), f"{where}['cases']").items():
            cw = f"{where}['cases'][{case!r}]"
            for key in _MIDPOINT_KEYS:
                require_key(res, key, cw)
            _closed(res, _MIDPOINT_KEYS, cw)
            cases[str(case)] = _library(MidpointAlignment, res, cw)
        end_b = data.get("end_b")
        _closed(data, ("t", "end_b", "cases"), where)
        return cls(t, cases, None if end_b is None else {str(k): str(v) for k, v in _mapping(end_b, where).items()})


@dataclass(frozen=True)
class BNBatches:
    """What batch norm was re-estimated on: ``count`` training batches (None: a full pass of the training images),
    ``shared`` by every t, curve and the plane."""

    count: int | None
    shared: bool

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "shared": self.shared}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "results['bn_batches']") -> BNBatches:
        count, shared = require_key(data, "count", where), require_key(data, "shared", where)
        _closed(data, ("count", "shared"), where)
        if count is not None:
            _integer(count, f"{where}['count']")
        if not isinstance(shared, bool):
            raise TypeError(f"`{where}['shared']` must be a bool, got {shared!r}")
        return cls(count, shared)


# ----------------------------------------------------------------------------------------------------------------
# a pair and the study
_PAIR_OPTIONAL = ("pair", "seeds", "alignment", "pam", "verification", "plane", "midpoint_alignment", "train_history")
_PAIR_KEYS = ("pair", "seeds", "endpoints", "alignment", "curves", "pam", "verification", "plane",
              "midpoint_alignment", "train_history")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class PairResults:
    """Everything measured on one pair of end points.

    Attributes
    ----------
    pair : int
        The pair's number (1-based); its end points are the seeds ``seeds``.
    seeds : tuple of int
        The seeds of end points A and B (empty when not recorded).
    endpoints : Endpoints
        Test metrics of A and B as trained.
    alignment : AlignmentSummary or None
        The alignment of B to A.
    curves : dict str -> CurveEvaluation
        The evaluation of each setting's curve.
    pam : dict str -> PAMRun
        The PAM settings' runs.
    verification : VerificationReport or None
        The checks of the alignment (on the Aligned curve).
    plane : PlaneResults or None
        The plane through the Aligned curve (the first pair only).
    midpoint_alignment : MidpointResults or None
        Alignment along the curve.
    train_history : dict str -> tuple of TrainEpoch
        Per setting, the curve fit's epochs.
    extra : dict
        Keys of the JSON form this version does not know (kept, written back after the others).
    absent : frozenset of str
        Optional keys that the JSON form read lacked (left out again by :meth:`to_dict`).
    """

    pair: int
    seeds: tuple[int, ...]
    endpoints: Endpoints
    alignment: AlignmentSummary | None = None
    curves: dict[str, CurveEvaluation]
    pam: dict[str, PAMRun] = field(default_factory=dict)
    verification: VerificationReport | None = None
    plane: PlaneResults | None = None
    midpoint_alignment: MidpointResults | None = None
    train_history: dict[str, tuple[TrainEpoch, ...]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    absent: frozenset[str] = field(default=frozenset(), repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.endpoints, Endpoints):
            raise TypeError(f"`endpoints` must be an Endpoints, got {type(self.endpoints).__name__}")
        for s, ev in self.curves.items():
            if not isinstance(ev, CurveEvaluation):
                raise TypeError(f"`curves[{s!r}]` must be a CurveEvaluation, got {type(ev).__name__}")
        object.__setattr__(self, "seeds", tuple(self.seeds))

    def to_dict(self) -> dict[str, Any]:
        """The pair's JSON form (see :mod:`neuralign.study.results`)."""
        values = {
            "pair": self.pair,
            "seeds": list(self.seeds),
            "endpoints": self.endpoints.to_dict(),
            "alignment": None if self.alignment is None else self.alignment.to_dict(),
            "curves": {s: ev.to_dict() for s, ev in self.curves.items()},
            "pam": {s: run.to_dict() for s, run in self.pam.items()},
            "verification": None if self.verification is None else _computed(self.verification.to_dict()),
            "plane": None if self.plane is None else self.plane.to_dict(),
            "midpoint_alignment": None if self.midpoint_alignment is None else self.midpoint_alignment.to_dict(),
            "train_history": {s: [e.to_dict() for e in h] for s, h in self.train_history.items()},
        }
        out = {k: v for k, v in values.items() if k not in self.absent}
        return {**out, **copy.deepcopy(self.extra)}

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, settings: Sequence[str] = (), index: int = 0, where: str | None = None
    ) -> PairResults:
        """Inverse of :meth:`to_dict`, checking that ``curves`` holds each of ``settings``; ``index`` (0-based)
        numbers a pair that does not record its number, ``where`` names it in error messages (default
        ``results['pairs'][index]``)."""
        where = f"results['pairs'][{index}]" if where is None else where
        endpoints = Endpoints.from_dict(require_key(data, "endpoints", where), where=f"{where}['endpoints']")
        curves_in = _mapping(require_key(data, "curves", where), f"{where}['curves']")
        for s in settings:
            if s not in curves_in:
                raise ValueError(f"`{where}['curves']` lacks the setting {s!r} listed in `results['settings']`")
        curves = {str(s): _curve(ev, f"{where}['curves'][{s!r}]") for s, ev in curves_in.items()}
        number = _integer(data.get("pair", index + 1), f"{where}['pair']")
        seeds = tuple(_integer(v, f"{where}['seeds'][{i}]")
                      for i, v in enumerate(_sequence(data.get("seeds", ()), f"{where}['seeds']")))  # fmt: skip
        alignment = data.get("alignment")
        if alignment is not None:
            alignment = AlignmentSummary.from_dict(alignment, where=f"{where}['alignment']")
        pam = {str(s): PAMRun.from_dict(run, where=f"{where}['pam'][{s!r}]")
               for s, run in _mapping(data.get("pam") or {}, f"{where}['pam']").items()}  # fmt: skip
        verification = data.get("verification")
        if verification is not None:
            verification = _verification(verification, f"{where}['verification']")
        plane = data.get("plane")
        if plane is not None:
            plane = PlaneResults.from_dict(plane, where=f"{where}['plane']")
        midpoint = data.get("midpoint_alignment")
        if midpoint is not None:
            midpoint = MidpointResults.from_dict(midpoint, where=f"{where}['midpoint_alignment']")
        history = {}
        for s, rows in _mapping(data.get("train_history") or {}, f"{where}['train_history']").items():
            hw = f"{where}['train_history'][{s!r}]"
            history[str(s)] = tuple(TrainEpoch.from_dict(r, where=f"{hw}[{i}]")
                                    for i, r in enumerate(_sequence(rows, hw)))  # fmt: skip
        return cls(
            pair=number, seeds=seeds, endpoints=endpoints, alignment=alignment, curves=curves, pam=pam,
            verification=verification, plane=plane, midpoint_alignment=midpoint, train_history=history,
            extra=copy.deepcopy({k: v for k, v in data.items() if k not in _PAIR_KEYS}),
            absent=frozenset(k for k in _PAIR_OPTIONAL if k not in data),
        )  # fmt: skip


_STUDY_OPTIONAL = ("kind", "config", "test_images", "bn_batches")
_STUDY_KEYS = ("kind", "config", "settings", "pairs", "test_images", "bn_batches")


@dataclass(frozen=True, kw_only=True)
class StudyResults:
    """The results of a study: what ``results.json`` holds, and what the report and the figures read.

    Attributes
    ----------
    config : dict
        The study's configuration as recorded: :meth:`StudyConfig.to_dict <neuralign.study.StudyConfig.to_dict>`
        (a :class:`~neuralign.study.StudyConfig` given here is stored so), or the flat configuration of before 0.2
        of an older file, kept as it was so that the file round-trips; :attr:`study_config` reads either as a
        :class:`~neuralign.study.StudyConfig`.
    settings : tuple of str
        The curve settings, a subset of :data:`~neuralign.study.SETTINGS` in that order.
    pairs : tuple of PairResults
        At least one; each has an evaluation of every setting's curve.
    test_images : int or None
        The size of the test set.
    bn_batches : BNBatches or None
        What batch norm was re-estimated on.
    extra : dict
        Keys of the JSON form this version does not know (kept, written back after the others).
    absent : frozenset of str
        Optional keys that the JSON form read lacked (left out again by :meth:`to_dict`).

    Raises
    ------
    TypeError, ValueError
        For settings that are not a subset of :data:`~neuralign.study.SETTINGS` in order, no pair, or a pair
        without a curve of a setting.

    Examples
    --------
    >>> from neuralign.curves import CurveEvaluation
    >>> ev = CurveEvaluation.from_values([0, 0.5, 1], [0.3, 0.9, 0.3], [0.9, 0.6, 0.8], [0, 1, 2]).to_dict()
    >>> ends = {"a": {"test_loss": 0.3, "test_acc": 0.9}, "b": {"test_loss": 0.3, "test_acc": 0.8}}
    >>> data = {"settings": ["aligned"], "pairs": [{"endpoints": ends, "curves": {"aligned": ev}}]}
    >>> res = StudyResults.from_dict(data)
    >>> res.pairs[0].endpoints.b.test_acc, res.pairs[0].curves["aligned"].min_accuracy, res.to_dict() == data
    (0.8, 0.6, True)
    """

    config: Mapping[str, Any] = field(default_factory=dict)
    settings: tuple[str, ...]
    pairs: tuple[PairResults, ...]
    test_images: int | None = None
    bn_batches: BNBatches | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    absent: frozenset[str] = field(default=frozenset(), repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.config, StudyConfig):
            object.__setattr__(self, "config", self.config.to_dict())
        elif not isinstance(self.config, Mapping):
            raise TypeError(f"`results['config']` must be a dict, got {type(self.config).__name__}")
        object.__setattr__(self, "settings", _check_settings(self.settings))
        if isinstance(self.pairs, (str, Mapping)) or not isinstance(self.pairs, Sequence):
            raise TypeError(f"`results['pairs']` must be a list of pairs, got {type(self.pairs).__name__}")
        object.__setattr__(self, "pairs", tuple(self.pairs))
        if not self.pairs:
            raise ValueError("`results['pairs']` is empty; expected at least one pair")
        for i, pair in enumerate(self.pairs):
            if not isinstance(pair, PairResults):
                raise TypeError(f"`results['pairs'][{i}]` must be a PairResults, got {type(pair).__name__}")
            for s in self.settings:
                if s not in pair.curves:
                    raise ValueError(
                        f"`results['pairs'][{i}]['curves']` lacks the setting {s!r} listed in `results['settings']`"
                    )

    # ------------------------------------------------------------------------------------------ JSON form
    def to_dict(self) -> dict[str, Any]:
        """The JSON form (see :mod:`neuralign.study.results`); :func:`neuralign._json.dumps` writes it."""
        values = {
            "kind": "study_results",
            "config": copy.deepcopy(dict(self.config)),
            "settings": list(self.settings),
            "pairs": [p.to_dict() for p in self.pairs],
            "test_images": self.test_images,
            "bn_batches": None if self.bn_batches is None else self.bn_batches.to_dict(),
        }
        out = {k: v for k, v in values.items() if k not in self.absent}
        return {**out, **copy.deepcopy(self.extra)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudyResults:
        """Read and validate the JSON form (parsed, with :func:`neuralign._json.loads` for a file).

        Raises
        ------
        TypeError
            If ``data`` or one of its parts is not of the expected kind.
        ValueError
            Naming the first missing key or wrong value, e.g. "`results` lacks the key 'pairs'".
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"`results` must be a dict of study results, got {type(data).__name__}")
        for key in ("settings", "pairs"):
            if key not in data:
                raise ValueError(
                    f"`results` lacks the key {key!r}; expected a study results dict with keys {_RESULT_KEYS}"
                )
        if "kind" in data and data["kind"] != "study_results":
            raise ValueError(f"`results['kind']` is {data['kind']!r}, expected 'study_results'")
        config = data.get("config")
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"`results['config']` must be a dict, got {type(config).__name__}")
        settings = _check_settings(data["settings"])
        pairs = data["pairs"]
        if isinstance(pairs, (str, Mapping)) or not isinstance(pairs, Sequence):
            raise TypeError(f"`results['pairs']` must be a list of pairs, got {type(pairs).__name__}")
        if not pairs:
            raise ValueError("`results['pairs']` is empty; expected at least one pair")
        pairs = tuple(PairResults.from_dict(p, settings=settings, index=i) for i, p in enumerate(pairs))
        test_images = data.get("test_images")
        if test_images is not None:
            _integer(test_images, "results['test_images']")
        bn = data.get("bn_batches")
        return cls(
            config=copy.deepcopy(dict(config or {})), settings=settings, pairs=pairs, test_images=test_images,
            bn_batches=None if bn is None else BNBatches.from_dict(bn),
            extra=copy.deepcopy({k: v for k, v in data.items() if k not in _STUDY_KEYS}),
            absent=frozenset(k for k in _STUDY_OPTIONAL if k not in data),
        )  # fmt: skip

    def write(self, folder: str | os.PathLike) -> Path:
        """Write ``results.json`` into ``folder`` (see :func:`write_results_json`); returns its path."""
        return write_results_json(self, folder)

    @classmethod
    def read(cls, path: str | os.PathLike) -> StudyResults:
        """Read ``results.json`` (or the folder holding it), as :func:`read_results_json` does."""
        return cls.from_dict(_read_json(path))

    # ------------------------------------------------------------------------------------------ derived
    @functools.cached_property
    def study_config(self) -> StudyConfig | None:
        """:attr:`config` read as a :class:`~neuralign.study.StudyConfig` (the flat configuration of before 0.2
        too); None when it is empty or not a study's configuration (results made by hand)."""
        if not self.config:
            return None
        try:
            return StudyConfig.from_dict(self.config)
        except (TypeError, ValueError):
            return None

    @property
    def arch(self) -> str | None:
        """The architecture the configuration names, or None."""
        if self.study_config is not None:
            return self.study_config.model.arch
        value = self.config.get("arch", self.config.get("model"))
        if isinstance(value, Mapping):
            value = value.get("arch")
        return None if value is None else str(value)

    @property
    def dataset(self) -> str | None:
        """The data set the configuration names (a name or a path, as given), or None."""
        if self.study_config is not None:
            return self.study_config.data.dataset
        value = self.config.get("dataset")
        if value is None and isinstance(self.config.get("data"), Mapping):
            value = self.config["data"].get("dataset")
        return None if value is None else str(value)

    @property
    def robust(self) -> bool:
        """Whether every curve of every setting carries a robust evaluation (a robust study)."""
        return bool(self.settings) and all(
            p.curves[s].robust_test_accuracy is not None for p in self.pairs for s in self.settings
        )


# ----------------------------------------------------------------------------------------------------------------
def as_study_results(results: StudyResults | Mapping[str, Any]) -> StudyResults:
    """``results`` itself if it is a :class:`StudyResults`, else :meth:`StudyResults.from_dict` of it: the two
    forms every function of :mod:`neuralign.study.report` and :mod:`neuralign.study.plots` accepts."""
    return results if isinstance(results, StudyResults) else StudyResults.from_dict(results)


def validate_results(results: StudyResults | Mapping[str, Any]) -> None:
    """Check that ``results`` has the structure of a study's results (see :meth:`StudyResults.from_dict`).

    Required: ``settings`` (a subset of :data:`~neuralign.study.SETTINGS` in that order), ``pairs`` (non-empty),
    and per pair ``endpoints`` (``a`` and ``b`` with ``test_acc``) and ``curves`` with one evaluation per setting
    holding ``t``, ``test_loss``, ``test_accuracy`` of one length and the summary fields. ``kind``, when present,
    must be ``"study_results"``. ``alignment``, ``pam``, ``verification``, ``plane``, ``midpoint_alignment`` and
    ``train_history`` are optional (missing or None), and checked when present.

    Parameters
    ----------
    results : StudyResults or dict
        The study's results.

    Raises
    ------
    TypeError
        If ``results`` or one of its parts is not of the expected kind.
    ValueError
        Naming the first missing key or wrong value, e.g. "`results` lacks the key 'pairs'".

    Examples
    --------
    >>> validate_results({"kind": "study_results", "settings": []})
    Traceback (most recent call last):
    ...
    ValueError: `results` lacks the key 'pairs'; expected a study results dict with keys ['kind', 'config', \
'settings', 'pairs']
    """
    as_study_results(results)


def write_results_json(results: StudyResults | Mapping[str, Any], folder: str | os.PathLike) -> Path:
    """Write ``results.json`` (strict JSON, atomically) into ``folder``.

    Non-finite floats become the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (the codec :mod:`neuralign._json`);
    tuples become lists, numpy and torch values plain numbers or lists. :func:`read_results_json` reads it back.

    Parameters
    ----------
    results : StudyResults or dict
        A study's results (a dict is validated with :meth:`StudyResults.from_dict`).
    folder : path-like
        Where ``results.json`` goes (created if needed).

    Returns
    -------
    pathlib.Path
        The path of ``results.json``.

    Raises
    ------
    TypeError
        If a value cannot be written as JSON (names where it is).
    ValueError
        For malformed ``results``.

    Examples
    --------
    >>> import tempfile
    >>> from neuralign.curves import CurveEvaluation
    >>> ev = CurveEvaluation.from_values([0, 0.5, 1], [0.3, 0.9, 0.3], [0.9, 0.6, 0.8], [0, 1, 2]).to_dict()
    >>> ends = {"a": {"test_loss": 0.3, "test_acc": 0.9}, "b": {"test_loss": 0.3, "test_acc": 0.8}}
    >>> res = {"settings": ["aligned"], "pairs": [{"endpoints": ends, "curves": {"aligned": ev}}]}
    >>> ev["loss_barrier"] = float("inf")
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     back = read_results_json(write_results_json(res, tmp))
    >>> back["pairs"][0]["curves"]["aligned"]["loss_barrier"]
    inf
    """
    text = _json.dumps(as_study_results(results).to_dict(), where="results")
    return atomic_write_text(Path(folder) / "results.json", text + "\n")


def _read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {str(path)!r}")
    try:
        data = _json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("kind", "study_results") != "study_results":
        raise ValueError(f"{str(path)!r} does not hold study results (a dict with kind 'study_results')")
    return data


def read_results_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by :func:`write_results_json` as its dict (validated), turning ``"inf"``, ``"-inf"``,
    ``"nan"`` into floats; :meth:`StudyResults.read` gives the :class:`StudyResults` instead.

    Any string value equal to one of these three is decoded, wherever it is.

    Parameters
    ----------
    path : path-like
        ``results.json`` or a folder holding it.

    Returns
    -------
    dict
        The JSON form of :class:`StudyResults`.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If the file is not JSON or not a dict of study results.
    """
    data = _read_json(path)
    StudyResults.from_dict(data)
    return data

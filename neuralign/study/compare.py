"""Alignment methods compared under one protocol: N pairs of end points, the chosen matchings, one
:class:`~neuralign.curves.InterpolationProtocol` (``neuralign compare``).

For every pair of end points (trained as the study trains them, or given as checkpoints) and every method of
:data:`COMPARE_METHODS` the stages find the permutation of B (recording its cost: wall seconds, passes over the
data, linear assignments where the method counts them), evaluate the segment between A and the permuted B under the
protocol (:func:`~neuralign.curves.evaluate_interpolation`: both barrier definitions for loss and accuracy, on
train and test, the area under the curve, batch norm re-estimated, interpolated or REPAIRed), and optionally fit a
quadratic Bezier curve from that permutation (its "Min" accuracy, Tatro et al. 2020). The report has one table row
per method (mean ± std over pairs), a figure of loss and accuracy against λ with one band per method, and the
method x method agreement matrix: the share of hidden units two methods map alike, averaged over pairs.

The stages form a graph (:func:`compare_stages`), each writing its own files and skipped when they exist, so an
interrupted comparison resumes where it stopped (the learned methods and PAM checkpoint every epoch). They run
sequentially in one process (:func:`run_compare`) or as jobs through the study's executors
(:mod:`neuralign.study.executors`: concurrent local processes, or Slurm jobs with dependencies), each job running
one stage with :func:`run_compare_stage`.

Methods are chosen by name (:data:`COMPARE_METHODS`). ``identity`` (the naive interpolation), ``correlation``,
``l2`` and ``weight`` (:func:`~neuralign.alignment.align`), ``pam`` (:func:`~neuralign.curves.fit_curve_pam` from
the identity, its permutation learned jointly with a curve), and every method of
:data:`~neuralign.alignment.LEARNED_METHODS` (``straight_through``, ``sinkhorn``, ``learned``), each called as
``fn(model_a, model_b, train_loader, spec=, init=, options=, generator=, checkpoint=)`` and returning a
:class:`~neuralign.alignment.LearnedResult`: a new learned method is compared by adding it to that registry.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuralign import _json
from neuralign._options import Options, nested
from neuralign._utils import atomic_write_text, environment_versions, stable_seed
from neuralign._validate import check_bool, check_int
from neuralign.alignment import (
    LEARNED_METHODS,
    LearnedOptions,
    PermutationFile,
    align,
    apply_permutation,
    load_permutation_file,
    save_permutation_file,
    state_dict_hash,
    trace_spec,
)
from neuralign.curves import (
    Bezier,
    CurvePAMOptions,
    InterpolationProtocol,
    InterpolationResult,
    evaluate_curve,
    evaluate_interpolation,
    fit_curve,
    fit_curve_pam,
)
from neuralign.errors import CheckpointError, ConvergenceWarning
from neuralign.experiments.runfolder import RunFolder
from neuralign.experiments.training import TrainingOptions
from neuralign.study.compare_report import plot_comparison, summary_table, write_comparison_report
from neuralign.study.config import PRESETS, DataOptions, EvaluationOptions, ModelOptions, StudyConfig
from neuralign.study.jobs import refuse_live_jobs
from neuralign.study.runner import _Study
from neuralign.study.stages import Stage, endpoint_stages, first_run, stage_done, stage_to_run
from neuralign.verification import VerificationOptions

__all__ = [
    "COMPARE_METHODS",
    "COMPARE_PRESETS",
    "CompareConfig",
    "agreement_matrix",
    "check_compare_folder",
    "compare_stages",
    "prepare_compare",
    "run_compare",
    "run_compare_stage",
    "verdicts",
]

logger = logging.getLogger(__name__)

#: The matchings of :func:`~neuralign.alignment.align` and the naive baseline (the identity).
_ALIGN_METHODS = ("identity", "correlation", "l2", "weight")


#: Every method name :class:`CompareConfig` accepts: the matchings, ``pam``, then the learned methods.
COMPARE_METHODS = (*_ALIGN_METHODS, "pam", *LEARNED_METHODS)


@dataclass(frozen=True)
class CompareConfig(Options):
    """Every setting of a comparison (start from a :data:`COMPARE_PRESETS` entry).

    Attributes
    ----------
    pairs : int
        End-point pairs: end points ``1 .. 2 * pairs``, paired (1, 2), (3, 4), ... (>= 1).
    seed : int
        Base of every derived seed (the end points are those of a study with the same seed, data, model and
        training settings).
    methods : tuple of str
        Methods of :data:`COMPARE_METHODS`, in the order of the report (default the four non-learned ones).
    endpoints : tuple of str, optional
        Given end points instead of training them: ``2 * pairs`` files paired in order (any format
        :func:`~neuralign.experiments.load_endpoint` reads).
    max_batches : int, optional
        Cut every epoch short (smoke tests only).
    data, model : DataOptions, ModelOptions
        As in :class:`~neuralign.study.StudyConfig`; the alignment data is ``data.align_size`` training images.
    train : TrainingOptions
        The end points' training.
    protocol : InterpolationProtocol
        How every method's interpolation is evaluated; its ``alignment_data`` and ``alignment_size`` are filled in
        from ``data`` when not given.
    curve : TrainingOptions
        Curve fitting: PAM's x-steps (learning rate, weight decay, schedule, optimizer) and, with ``fit_curves``, the
        Bezier curve fitted from each method's permutation (``epochs``).
    fit_curves : bool
        Also fit a quadratic Bezier curve between A and each method's permuted B and report its Min accuracy.
    pam : CurvePAMOptions
        The ``pam`` method (from the identity).
    learned : LearnedOptions
        Options of the learned methods (:class:`~neuralign.alignment.LearnedOptions`; the fields left None take
        each method's own default).
    learned_init : {"weight", "identity", "correlation", "l2"}
        Start of the learned methods: weight matching (default; run by the method, its cost included), the
        identity, or the permutation of the ``correlation`` or ``l2`` stage (which must be among ``methods``; its
        seconds and data passes are added to the learned method's cost).
    verification : VerificationOptions, optional
        Also check each method's permutation for local optimality on its Bezier curve
        (:func:`~neuralign.verification.verify_alignment`, as the study's verification stage does); needs
        ``fit_curves``. None (default): no verification. ``set("verification", True)`` turns it on with the
        default options.

    Raises
    ------
    TypeError, ValueError
        For a setting of the wrong kind or value (names it).
    """

    pairs: int = 3
    seed: int = 0
    methods: tuple[str, ...] = _ALIGN_METHODS
    endpoints: tuple[str, ...] | None = None
    max_batches: int | None = None
    data: DataOptions = nested(DataOptions, default=DataOptions())
    model: ModelOptions = nested(ModelOptions, default=ModelOptions())
    train: TrainingOptions = nested(TrainingOptions, default=TrainingOptions())
    protocol: InterpolationProtocol = nested(InterpolationProtocol, default=InterpolationProtocol())
    curve: TrainingOptions = nested(TrainingOptions, default=TrainingOptions())
    fit_curves: bool = False
    pam: CurvePAMOptions = nested(CurvePAMOptions, default=CurvePAMOptions())
    learned: LearnedOptions = nested(LearnedOptions, default=LearnedOptions())
    learned_init: str = "weight"
    verification: VerificationOptions | None = nested(VerificationOptions, optional=True, default=None)

    def __post_init__(self) -> None:
        self._check("pairs", check_int, minimum=1)
        self._check("seed", check_int)
        self._check("max_batches", check_int, minimum=1, allow_none=True)
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        known = COMPARE_METHODS
        unknown = [m for m in methods if m not in known]
        if unknown or not methods or len(set(methods)) != len(methods):
            raise ValueError(f"unknown methods {unknown}; expected distinct names among {list(known)}"
                             if unknown else f"`methods` must name distinct methods, got {list(methods)}")  # fmt: skip
        object.__setattr__(self, "methods", methods)
        if self.endpoints is not None:
            given = (self.endpoints,) if isinstance(self.endpoints, str) else tuple(str(p) for p in self.endpoints)
            if len(given) != 2 * self.pairs:
                raise ValueError(f"`endpoints` must name 2 * pairs = {2 * self.pairs} files, got {len(given)}")
            object.__setattr__(self, "endpoints", given)
        for name, cls in (("data", DataOptions), ("model", ModelOptions), ("train", TrainingOptions),
                          ("protocol", InterpolationProtocol), ("curve", TrainingOptions),
                          ("pam", CurvePAMOptions), ("learned", LearnedOptions)):  # fmt: skip
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"`{name}` must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        self._check("fit_curves", check_bool)
        if self.verification is not None:
            if not isinstance(self.verification, VerificationOptions):
                raise TypeError(f"`verification` must be a VerificationOptions or None, got "
                                f"{type(self.verification).__name__}")  # fmt: skip
            if not self.fit_curves:
                raise ValueError("`verification` checks each method's permutation on its Bezier curve: it needs "
                                 "fit_curves=True")  # fmt: skip
        starts = ("weight", "identity", *(m for m in ("correlation", "l2") if m in methods))
        if self.learned_init not in starts:
            raise ValueError(f"unknown learned_init {self.learned_init!r}; expected one of {list(starts)} "
                             "(correlation or l2 must also be among `methods`)")  # fmt: skip

    def set(self, path: str, value: Any) -> CompareConfig:
        """A copy with the setting at the dotted ``path`` changed (``"protocol.bn"``, ``"pairs"``); ``"verification"``
        also takes true (its default options, or the current ones) and false (None)."""
        from neuralign._options import set_path

        if path == "verification" and isinstance(value, bool):
            value = (self.verification or VerificationOptions()) if value else None
        return set_path(self, path, value)

    def study_config(self) -> StudyConfig:
        """The study whose end points, data and batch-norm batches this comparison shares (same seeds)."""
        return StudyConfig(
            pairs=self.pairs, seed=self.seed, settings=("aligned",), endpoints=self.endpoints,
            max_batches=self.max_batches, data=self.data, model=self.model, train=self.train, curve=self.curve,
            pam=self.pam, verification=self.verification,
            evaluation=EvaluationOptions(max_bn_batches=self.protocol.max_bn_batches, plane_grid=0),
        )  # fmt: skip


#: Starting settings of ``neuralign compare``.
COMPARE_PRESETS: dict[str, CompareConfig] = {
    # The offline demo on the shipped UCI digits (8x8, resized to 16x16 for TinyTen): minutes on a CPU.
    "demo": CompareConfig(
        pairs=2,
        data=DataOptions(dataset="digits", resize=16, batch_size=64, align_size=None),
        train=TrainingOptions(epochs=15),
        curve=TrainingOptions(epochs=6, schedule="garipov"),  # as the study's demo preset
        pam=CurvePAMOptions(x_epochs=6, gradient_batches=4),
        protocol=InterpolationProtocol(num_points=11, max_bn_batches=4),
    ),
    # The MLP 3x512 on MNIST, the one setting where Git Re-Basin, Sinkhorn re-basin and Navon et al. (ICML 2024,
    # Table 1) all report; no batch norm, 25 points (Ainsworth et al.), train and test.
    "mnist-mlp": CompareConfig(
        pairs=3,
        data=DataOptions(dataset="mnist", batch_size=128, align_size=5000),
        model=ModelOptions(arch="mlp", hidden=(512, 512, 512), args={"batch_norm": False}),
        train=TrainingOptions(epochs=10, lr=0.05, schedule="garipov"),
        curve=TrainingOptions(epochs=5, lr=0.05, schedule="garipov"),
        pam=CurvePAMOptions(x_epochs=5),
        protocol=InterpolationProtocol(num_points=25),
    ),
    # TinyTen on CIFAR-10 with the study's cpu preset's data, training and PAM (the same end points for the same
    # seed), Bezier curves from each method's permutation, batch norm re-estimated on 10 batches.
    "cpu": CompareConfig(
        pairs=3,
        data=DataOptions(train_size=10000, test_size=5000, align_size=5000),
        train=TrainingOptions(epochs=20),
        curve=TrainingOptions(epochs=10),
        pam=PRESETS["cpu"].pam,
        protocol=InterpolationProtocol(num_points=25, max_bn_batches=10),
        fit_curves=True,
    ),
}


# ------------------------------------------------------------------------------------------------- the graph
def compare_stages(config: CompareConfig) -> list[Stage]:
    """The stages of a comparison in an order that respects their dependencies.

    End points (unless given) -> per pair and method: alignment -> evaluation (and, with ``fit_curves``, the
    Bezier curve -> with ``verification``, its verification) -> ``report``. A learned method started from another
    method's permutation needs that method's alignment.
    """
    c = config
    stages, pair_ends = endpoint_stages(c.pairs, given=c.endpoints is not None)
    for k, ends in enumerate(pair_ends, start=1):
        for m in c.methods:
            needs = ends
            if m in LEARNED_METHODS and c.learned_init in ("correlation", "l2"):
                needs = (*ends, f"pair {k} align {c.learned_init}")
            alignment = Stage(f"pair {k} align {m}", needs, (f"pair{k}/align_{m}.pt",), "alignment", k, m)
            stages += [alignment, Stage(f"pair {k} eval {m}", (alignment.name,), (f"pair{k}/eval_{m}.json",),
                                        "eval", k, m)]  # fmt: skip
            if c.fit_curves:
                curve = Stage(f"pair {k} curve {m}", (alignment.name,), (f"pair{k}/curve_{m}.json",), "curve", k, m)
                stages.append(curve)
                if c.verification is not None:
                    stages.append(Stage(f"pair {k} verify {m}", (curve.name,),
                                        (f"pair{k}/verify_{m}.json", f"pair{k}/verify_{m}.md"), "verification", k,
                                        m))  # fmt: skip
    stages.append(Stage("report", tuple(s.name for s in stages), ("results.json", "report.md"), "report"))
    return stages


# ------------------------------------------------------------------------------------------------- agreement
def agreement_matrix(perms: Mapping[str, Mapping[str, torch.Tensor]]) -> np.ndarray:
    """Share of units two permutations map alike, for every pair of methods.

    .. math::  A_{mn} = \\frac{\\sum_g |\\{i : \\pi^m_g(i) = \\pi^n_g(i)\\}|}{\\sum_g K_g}

    Parameters
    ----------
    perms : dict method -> (dict group -> LongTensor)
        One permutation per method, over the same groups.

    Returns
    -------
    numpy.ndarray
        float64 ``(M, M)`` in the order of ``perms``, symmetric with ones on the diagonal.

    Raises
    ------
    ValueError
        If the methods' groups or group sizes differ.

    Examples
    --------
    >>> import torch
    >>> agreement_matrix({"a": {"g": torch.tensor([0, 1, 2, 3])}, "b": {"g": torch.tensor([0, 1, 3, 2])}})
    array([[1. , 0.5],
           [0.5, 1. ]])
    """
    names = list(perms)
    out = np.ones((len(names), len(names)))
    for i, m in enumerate(names):
        for j, n in enumerate(names[:i]):
            if set(perms[m]) != set(perms[n]):
                raise ValueError(f"methods {n!r} and {m!r} permute different groups")
            same = total = 0
            for g, p in perms[m].items():
                q = perms[n][g]
                if p.shape != q.shape:
                    raise ValueError(f"methods {n!r} and {m!r} give group {g!r} sizes {q.numel()} and {p.numel()}")
                same += int((p.cpu() == q.cpu()).sum())
                total += p.numel()
            out[i, j] = out[j, i] = same / total if total else 1.0
    return out


def verdicts(report: Mapping[str, Any], path: str) -> dict[str, Any]:
    """A verification report (:meth:`~neuralign.verification.VerificationReport.to_dict`) as the comparison
    records it: the overall verdict, each check's verdict, the summary of each failing check (it names the move
    that improves the objective) and the path of the full report.

    Examples
    --------
    >>> v = verdicts({"verdict": "fail", "checks": {"stability": {"verdict": "pass", "summary": "stable"},
    ...               "neighbourhood": {"verdict": "fail", "summary": "swap (3, 7) of fc1 improves it"}}}, "v.md")
    >>> v["verdict"], v["checks"]
    ('fail', {'stability': 'pass', 'neighbourhood': 'fail'})
    >>> v["failing"]
    {'neighbourhood': 'swap (3, 7) of fc1 improves it'}
    """
    checks = report["checks"]
    return {"verdict": report["verdict"], "checks": {name: c["verdict"] for name, c in checks.items()},
            "failing": {name: c["summary"] for name, c in checks.items() if c["verdict"] == "fail"},
            "report": path}  # fmt: skip


# ------------------------------------------------------------------------------------------------- the runner
class _Compare:
    """The stages' shared state in one process: the study's data and end points, and the pairs' specs."""

    def __init__(self, config: CompareConfig, out: Path, device: torch.device,
                 progress: Callable[[dict[str, Any]], Any] | None) -> None:  # fmt: skip
        self.config = config
        self.out = out
        self.study = _Study(config.study_config(), out, device, progress)
        self._pairs: dict[int, dict[str, Any]] = {}

    @property
    def data(self) -> Any:
        return self.study.data

    def protocol(self) -> InterpolationProtocol:
        """The configured protocol, with the alignment data filled in where not given."""
        p = self.config.protocol
        n = len(self.data.align.dataset)
        first = f"the first {n} training " + ("windows" if self.data.context_length is not None else
                                                "images, test transforms")  # fmt: skip
        described = p.alignment_data or f"{self.config.data.dataset}: {first}"
        return p.replace(alignment_data=described, alignment_size=p.alignment_size or n)

    def pair(self, k: int) -> dict[str, Any]:
        if k not in self._pairs:
            a, meta_a = self.study.endpoint(2 * k - 1)
            b, meta_b = self.study.endpoint(2 * k)
            device = self.study.device
            self._pairs[k] = {
                "a": a, "b": b, "meta_a": meta_a, "meta_b": meta_b,
                "sd_a": {key: v.to(device) for key, v in a.state_dict().items()},
                "sd_b": {key: v.to(device) for key, v in b.state_dict().items()},
                # traced on test inputs: the (unshuffled) test loader draws nothing from any generator
                "spec": trace_spec(a, next(iter(self.data.test))[0][:2].to(device)),
            }  # fmt: skip
        return self._pairs[k]

    # ------------------------------------------------------------------ stages
    def alignment(self, k: int, method: str) -> dict[str, torch.Tensor]:
        """The permutation of pair ``k``'s B found by ``method`` (from its file; found and written if absent)."""
        c = self.config
        p = self.pair(k)
        path = self.out / f"pair{k}" / f"align_{method}.pt"
        hashes = {"hash_a": state_dict_hash(p["a"].state_dict()), "hash_b": state_dict_hash(p["b"].state_dict())}
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.study.emit(stage="align", label=f"pair {k} {method}", step=0, total=1, start=True)
            perms, results = self._find(k, method, p)
            sources = [self.study.source(2 * k - 1), self.study.source(2 * k)]
            record = PermutationFile(
                perms={g: v.cpu() for g, v in perms.items()}, spec=p["spec"], method=method,
                settings={"data": c.data.dataset, "align_images": len(self.data.align.dataset)},
                model_a={"hash": hashes["hash_a"], "source": sources[0]},
                model_b={"hash": hashes["hash_b"], "source": sources[1]},
                arch=c.model.arch, results=results,
            )  # fmt: skip
            save_permutation_file(path, record)
            self.study.emit(stage="align", label=f"pair {k} {method}", step=1, total=1)
            self.study.done(f"pair {k} align {method}")
        record = load_permutation_file(path)
        record.check_pair(arch=c.model.arch, **hashes)
        return record.perms

    def _find(self, k: int, method: str, p: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Run ``method`` on pair ``k``: its permutation and its cost record."""
        c = self.config
        a, b, spec = p["a"], p["b"], p["spec"]
        seed = stable_seed(c.seed, "compare", k, method)
        folder = self.out / f"pair{k}"
        start = time.perf_counter()
        if method == "identity":
            perms = {g: torch.arange(n) for g, n in spec.sizes.items()}
            return perms, {"seconds": time.perf_counter() - start, "data_passes": 0.0, "assignments": 0}
        if method in ("correlation", "l2", "weight"):
            res = align(a, b, None if method == "weight" else self.data.align, method=method, spec=spec,
                        generator=seed)  # fmt: skip
            # correlation and l2: one pass over the alignment data and one assignment per group (dead units aside)
            data = method != "weight"
            return res.perms, {"seconds": time.perf_counter() - start, "data_passes": 1.0 if data else 0.0,
                               "assignments": len(spec.groups) if data else None,
                               "n_iter": res.n_iter, "fun": res.fun}  # fmt: skip
        if method == "pam":
            pam = c.pam
            self.data.train.generator.manual_seed(stable_seed(c.seed, "compare-data", k, method))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # a fixed budget; the status is recorded
                res = fit_curve_pam(
                    a, p["sd_a"], p["sd_b"], self.data.train, init="identity", spec=spec,
                    heldout_loader=self.data.train_eval, options=pam, optimizer=c.curve.curve_optimizer(),
                    weight_decay=c.curve.weight_decay, lr_lambda=c.curve.lr_lambda(), generator=seed,
                    checkpoint=folder / f"align_{method}.ckpt", max_batches=c.max_batches,
                )  # fmt: skip
            for stale in folder.glob(f"align_{method}.ckpt*"):
                stale.unlink()
            # passes: the x-steps' curve epochs, each of max_batches batches when set (the P-steps' gradient and
            # value batches are not counted)
            share = 1.0 if c.max_batches is None else min(1.0, c.max_batches / max(1, len(self.data.train)))
            return res.perms, {"seconds": time.perf_counter() - start,
                               "data_passes": float(pam.x_epochs * pam.max_iter) * share, "assignments": None,
                               "history": [float(v) for v in res.history], "status": int(res.status)}  # fmt: skip
        fn = LEARNED_METHODS[method]
        init: Any = c.learned_init
        start_cost = {"seconds": 0.0, "data_passes": 0.0}
        if init in ("correlation", "l2"):  # the stage's permutation; its cost is part of this method's
            init = self.alignment(k, c.learned_init)
            start_cost = load_permutation_file(folder / f"align_{c.learned_init}.pt").results
        self.data.train.generator.manual_seed(stable_seed(c.seed, "compare-data", k, method))
        res = fn(a, b, self.data.train, spec=spec, init=init, options=c.learned, generator=seed,
                 checkpoint=folder / f"align_{method}.ckpt")  # fmt: skip
        (folder / f"align_{method}.ckpt").unlink(missing_ok=True)
        cost = res.cost
        return res.perms, {"seconds": float(cost.wall_seconds) + start_cost["seconds"],
                           "data_passes": float(cost.data_passes) + start_cost["data_passes"],
                           "assignments": int(cost.assignments), "history": res.history,
                           "init": c.learned_init}  # fmt: skip

    def aligned_b(self, k: int, method: str) -> dict[str, torch.Tensor]:
        p = self.pair(k)
        perms = self.alignment(k, method)
        return apply_permutation(p["sd_b"], p["spec"].restrict(p["sd_b"]), perms)

    def evaluate(self, k: int, method: str) -> InterpolationResult:
        path = self.out / f"pair{k}" / f"eval_{method}.json"
        if path.exists():
            return InterpolationResult.from_dict(_json.loads(path.read_text()))
        protocol = self.protocol()
        label = f"pair {k} {method}"
        self.study.emit(stage="evaluate", label=label, step=0, total=protocol.num_points, start=True)

        def on_point(record: dict[str, Any]) -> None:
            self.study.emit(stage="evaluate", label=label, step=record["index"] + 1, total=protocol.num_points)

        p = self.pair(k)
        res = evaluate_interpolation(p["a"], p["sd_a"], self.aligned_b(k, method), self.study.bn_loader(),
                                     self.data.test, train_loader=self.data.train_eval, protocol=protocol,
                                     callback=on_point)  # fmt: skip
        atomic_write_text(path, _json.dumps(res.to_dict()))
        self.study.done(f"pair {k} eval {method}")
        return res

    def curve(self, k: int, method: str) -> dict[str, Any]:
        """The quadratic Bezier curve fitted between A and B permuted by ``method``: its evaluation (Min, Avg)."""
        c = self.config
        path = self.out / f"pair{k}" / f"curve_{method}.json"
        if path.exists():
            return _json.loads(path.read_text())
        p = self.pair(k)
        names = {n for n, _ in p["a"].named_parameters()}
        end_b = {n: v for n, v in self.aligned_b(k, method).items() if n in names}
        label = f"pair {k} {method} curve"
        self.study.emit(stage="curve", label=label, step=0, total=c.curve.epochs, start=True)
        self.data.train.generator.manual_seed(stable_seed(c.seed, "compare-curve-data", k, method))
        ckpt = self.out / f"pair{k}" / f"curve_{method}.ckpt"
        res = fit_curve(
            p["a"], {n: v for n, v in p["sd_a"].items() if n in names}, end_b, self.data.train,
            epochs=c.curve.epochs, optimizer=c.curve.curve_optimizer(), weight_decay=c.curve.weight_decay,
            generator=stable_seed(c.seed, "compare-curve", k, method), checkpoint=ckpt,
            max_batches=c.max_batches, lr_lambda=c.curve.lr_lambda(),
            callback=lambda r: self.study.emit(stage="curve", label=label, step=r.get("epoch", 0) + 1,
                                               total=c.curve.epochs),
        )  # fmt: skip
        ckpt.unlink(missing_ok=True)
        ev = evaluate_curve(p["a"], res.curve, self.study.bn_loader(), self.data.test,
                            num_points=c.protocol.num_points, max_bn_batches=c.protocol.max_bn_batches)  # fmt: skip
        out = {"evaluation": ev.to_dict(), "history": res.history}
        res.curve.save(self.out / f"pair{k}" / f"curve_{method}.pt")
        atomic_write_text(path, _json.dumps(out))
        self.study.done(f"pair {k} curve {method}")
        return out

    def verify(self, k: int, method: str) -> dict[str, Any]:
        """The verification of ``method``'s permutation on its Bezier curve (the study's verification stage, on
        this method's files): the report as JSON data."""
        self.curve(k, method)
        p = self.pair(k)
        curve = Bezier.load(self.out / f"pair{k}" / f"curve_{method}.pt")
        return self.study.verification(k, p["a"], p["sd_a"], p["sd_b"], self.alignment(k, method), p["spec"], curve,
                                       method=method)  # fmt: skip

    def run(self, stage: Stage) -> None:
        torch.manual_seed(stable_seed(self.config.seed, "stage", stage.name))
        self.study.mark, self.study.started = time.perf_counter(), time.time()
        if stage.kind == "endpoint":
            self.study.endpoint(stage.index)
        elif stage.kind == "alignment":
            self.alignment(stage.index, stage.setting)
        elif stage.kind == "eval":
            self.evaluate(stage.index, stage.setting)
        elif stage.kind == "curve":
            self.curve(stage.index, stage.setting)
        elif stage.kind == "verification":
            self.verify(stage.index, stage.setting)
        elif stage.kind == "report":
            self.reported = self.report()
            self.finish(stage)

    # ------------------------------------------------------------------ the report
    def results(self) -> dict[str, Any]:
        c = self.config
        pairs = []
        for k in range(1, c.pairs + 1):
            p = self.pair(k)
            methods = {}
            for m in c.methods:
                record = load_permutation_file(self.out / f"pair{k}" / f"align_{m}.pt")
                methods[m] = {"cost": record.results, "evaluation": self.evaluate(k, m).to_dict(),
                              "curve": self.curve(k, m)["evaluation"] if c.fit_curves else None,
                              "verification": (verdicts(self.verify(k, m), f"pair{k}/verify_{m}.md")
                                               if c.verification is not None else None)}  # fmt: skip
            perms = {m: self.alignment(k, m) for m in c.methods}
            pairs.append({"pair": k, "seeds": [2 * k - 1, 2 * k],
                          "endpoints": {"a": p["meta_a"]["test"], "b": p["meta_b"]["test"]},
                          "methods": methods, "agreement": agreement_matrix(perms).tolist()})  # fmt: skip
        agreement = np.mean([np.array(q["agreement"]) for q in pairs], axis=0)
        return {"kind": "compare_results", "config": c.to_dict(), "protocol": self.protocol().to_dict(),
                "methods": list(c.methods), "test_images": len(self.data.test.dataset), "pairs": pairs,
                "summary": summary_table(pairs, c.methods), "agreement": agreement.tolist()}  # fmt: skip

    def report(self) -> dict[str, Any]:
        results = self.results()
        atomic_write_text(self.out / "results.json", _json.dumps(results))
        figure = plot_comparison(results, self.out / "figures" / "compare.png")
        report = write_comparison_report(results, self.out / "report.md", figure=figure)
        return {**results, "report": str(report)}

    def finish(self, report: Stage) -> None:
        """Close this run in the manifest: the seconds (and jobs) of the stages from their records, the run's end
        and the report. Only the ``report`` stage, which runs last, writes the manifest after it was prepared."""
        folder = _folder(self.out)
        manifest = folder.manifest()
        if manifest is None:
            raise CheckpointError(f"{self.out} holds no comparison manifest: run the comparison (neuralign compare), "
                                  "which writes it before any stage")  # fmt: skip
        records = {}
        for stage in compare_stages(self.config):
            path = self.out / "stages" / f"{stage.slug}.json"
            if path.exists():
                records[stage.name] = _json.loads(path.read_text())
        manifest["stage_seconds"] = {name: r["seconds"] for name, r in records.items()}
        jobs = {name: r["job_id"] for name, r in records.items() if r.get("job_id")}
        if jobs:
            manifest["stage_jobs"] = jobs
        manifest["runs"][-1]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        manifest["report"] = report.outputs[1]
        folder.save(manifest)


# ------------------------------------------------------------------------------------------------- entry points
def _folder(out: Path) -> RunFolder:
    return RunFolder(out, key="config", normalize=lambda c: CompareConfig.from_dict(c).to_dict())


def check_compare_folder(config: CompareConfig, out: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of the comparison in ``out`` (None for a folder to start afresh), refusing, writing nothing, one
    that holds a comparison with other settings than ``config``.

    Raises
    ------
    CheckpointError
        Naming the settings that differ.
    """
    return _folder(Path(out)).refuse_other_settings(config.to_dict(), "a comparison")


def prepare_compare(
    config: CompareConfig,
    out: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    run: Mapping[str, Any] | None = None,
    live_jobs: bool = False,
) -> None:
    """Check or start the manifest of a comparison in ``out`` and record this run in it, with the entries of ``run``
    (e.g. the executor and the jobs' resources); done once by the process that runs or submits the stages, before
    any of them.

    Refuses a folder that holds other settings (:func:`check_compare_folder`) and, unless ``live_jobs`` (a Slurm
    submission, which keeps them), one with a job still queued or running
    (:func:`neuralign.study.jobs.refuse_live_jobs`).

    Raises
    ------
    CheckpointError, JobError
        As said above; nothing is written then.
    """
    if not isinstance(config, CompareConfig):
        raise TypeError(f"`config` must be a CompareConfig, got {type(config).__name__}")
    out = Path(out)
    if out.is_dir() and not live_jobs:
        refuse_live_jobs(out, compare_stages(config), command="compare")
    manifest = check_compare_folder(config, out)
    if manifest is None:
        manifest = {"kind": "compare_manifest", "config": config.to_dict(), "versions": environment_versions(),
                    "device": str(device), "threads": torch.get_num_threads(),
                    "command": ["neuralign", *sys.argv[1:]], "runs": []}  # fmt: skip
    manifest["runs"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), **(run or {})})
    out.mkdir(parents=True, exist_ok=True)
    _folder(out).save(manifest)


def run_compare_stage(
    config: CompareConfig,
    out: str | os.PathLike,
    name: str,
    *,
    device: str | torch.device = "cpu",
    progress: Callable[[dict[str, Any]], Any] | None = None,
) -> bool:
    """Run the stage ``name`` of the comparison in ``out`` in this process, unless it is done; True if it ran.

    The entry point of a comparison's jobs (:mod:`neuralign.study.executors`), and the work of
    :func:`run_compare` for that stage. Its inputs are read from the files of the stages it needs; it writes only
    its own outputs and its record ``stages/<stage>.json``. The ``report`` stage always runs (it reflects the files
    present) and then closes the run in the manifest, which :func:`prepare_compare` wrote before any job started.

    Raises
    ------
    ValueError
        For a stage this comparison does not have.
    RuntimeError
        If a stage it needs is not done (names it).
    """
    out = Path(out)
    stage = stage_to_run(out, compare_stages(config), name, what="comparison")
    if stage is None:
        return False
    _Compare(config, out, torch.device(device), progress).run(stage)
    return True


def run_compare(
    config: CompareConfig,
    out: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    progress: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a comparison and write ``results.json``, ``report.md`` and ``figures/compare.png`` in ``out``.

    Every stage of :func:`compare_stages` that is not done runs in this process, in order (the same
    :func:`run_compare_stage` work as the jobs of :mod:`neuralign.study.executors`); then the report is written
    from the stages' files. A first run that fails before any stage is done leaves no manifest
    (:meth:`~neuralign.experiments.runfolder.RunFolder.first_run`).

    Parameters
    ----------
    config : CompareConfig
        The settings (start from a :data:`COMPARE_PRESETS` entry).
    out : path-like
        Output folder; one from an earlier run with the same settings is resumed, one with other settings refused.
    device : str or torch.device
        Where models are trained and evaluated.
    progress : callable, optional
        Receives dict events ``{"stage", "label", "step", "total", ...}``.

    Returns
    -------
    dict
        The results written to ``results.json``, with ``"report"``, the report's path.

    Raises
    ------
    CheckpointError
        If ``out`` holds a comparison with other settings (names them).
    JobError
        While a job of ``out`` (``--executor local|slurm``, listed in ``jobs.json``) is queued or running.
    """
    if not isinstance(config, CompareConfig):
        raise TypeError(f"`config` must be a CompareConfig, got {type(config).__name__}")
    out = Path(out)
    stages = compare_stages(config)
    with first_run(out, stages):
        prepare_compare(config, out, device=device)
        run = _Compare(config, out, torch.device(device), progress)
        for stage in stages:
            if stage.kind == "report" or not stage_done(out, stage):
                run.run(stage)
    return run.reported

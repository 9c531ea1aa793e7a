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
sequentially in one process; the study's executors (local jobs, Slurm) run only the study's stage graph.

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
from neuralign.study.config import PRESETS, DataOptions, EvaluationOptions, ModelOptions, StudyConfig
from neuralign.study.report import _fmt_number, _mean_std
from neuralign.study.runner import _Study
from neuralign.study.stages import Stage, endpoint_stages, stage_done

__all__ = [
    "COMPARE_METHODS",
    "COMPARE_PRESETS",
    "CompareConfig",
    "agreement_matrix",
    "compare_stages",
    "run_compare",
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
        Curve fitting: PAM's x-steps (learning rate, weight decay, schedule) and, with ``fit_curves``, the Bezier
        curve fitted from each method's permutation (``epochs``).
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
        check_bool(self.fit_curves, "fit_curves")
        starts = ("weight", "identity", *(m for m in ("correlation", "l2") if m in methods))
        if self.learned_init not in starts:
            raise ValueError(f"unknown learned_init {self.learned_init!r}; expected one of {list(starts)} "
                             "(correlation or l2 must also be among `methods`)")  # fmt: skip

    def set(self, path: str, value: Any) -> CompareConfig:
        """A copy with the setting at the dotted ``path`` changed (``"protocol.bn"``, ``"pairs"``)."""
        from neuralign._options import set_path

        return set_path(self, path, value)

    def study_config(self) -> StudyConfig:
        """The study whose end points, data and batch-norm batches this comparison shares (same seeds)."""
        return StudyConfig(
            pairs=self.pairs, seed=self.seed, settings=("aligned",), endpoints=self.endpoints,
            max_batches=self.max_batches, data=self.data, model=self.model, train=self.train, curve=self.curve,
            pam=self.pam, verification=None,
            evaluation=EvaluationOptions(max_bn_batches=self.protocol.max_bn_batches, plane_grid=0),
        )  # fmt: skip


#: Starting settings of ``neuralign compare``.
COMPARE_PRESETS: dict[str, CompareConfig] = {
    # The offline demo on the shipped UCI digits (8x8, resized to 16x16 for TinyTen): minutes on a CPU.
    "demo": CompareConfig(
        pairs=2,
        data=DataOptions(dataset="digits", resize=16, batch_size=64, align_size=None),
        train=TrainingOptions(epochs=15),
        curve=TrainingOptions(epochs=6),
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
    Bezier curve) -> ``report``. A learned method started from another method's permutation needs that method's
    alignment.
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
                stages.append(Stage(f"pair {k} curve {m}", (alignment.name,), (f"pair{k}/curve_{m}.json",), "curve",
                                    k, m))  # fmt: skip
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
        described = p.alignment_data or f"{self.config.data.dataset}: the first {n} training images, test transforms"
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

    def _optimizer(self) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
        lr = self.config.curve.lr
        return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)

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
                    heldout_loader=self.data.train_eval, options=pam, optimizer=self._optimizer(),
                    weight_decay=c.curve.weight_decay, lr_lambda=c.curve.lr_lambda(), generator=seed,
                    checkpoint=folder / f"align_{method}.ckpt", max_batches=c.max_batches,
                )  # fmt: skip
            for stale in folder.glob(f"align_{method}.ckpt*"):
                stale.unlink()
            # passes: the x-steps' curve epochs (the P-steps' gradient and value batches are not counted)
            return res.perms, {"seconds": time.perf_counter() - start,
                               "data_passes": float(pam.x_epochs * pam.max_iter), "assignments": None,
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
            epochs=c.curve.epochs, optimizer=self._optimizer(), weight_decay=c.curve.weight_decay,
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
                              "curve": self.curve(k, m)["evaluation"] if c.fit_curves else None}  # fmt: skip
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


# ------------------------------------------------------------------------------------------------- summary
_ROWS = (  # (results key path, column title, percent?)
    ("test.loss_barrier_average", "test loss barrier", False),
    ("test.accuracy_barrier_average", "test acc. barrier (pts)", True),
    ("train.loss_barrier_average", "train loss barrier", False),
    ("train.accuracy_barrier_average", "train acc. barrier (pts)", True),
    ("test.loss_barrier_linear", "test loss barrier (linear)", False),
    ("test.accuracy_barrier_linear", "test acc. barrier (linear, pts)", True),
    ("test.midpoint_accuracy", "midpoint test acc. (%)", True),
    ("test.loss_auc", "test loss AUC", False),
)


def _value(entry: Mapping[str, Any], key: str) -> float | None:
    if key in ("seconds", "data_passes"):
        v = entry["cost"].get(key)
        return None if v is None else float(v)
    if key == "curve_min":
        return None if entry.get("curve") is None else float(entry["curve"]["min_accuracy"])
    split, field = key.split(".")
    splits = entry["evaluation"]["splits"]
    return float(splits[split][field]) if split in splits else None


def summary_table(pairs: list[Mapping[str, Any]], methods: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Per method and quantity, mean and sample std over pairs (``{"mean", "std", "n"}``; std None for one pair)."""
    keys = [k for k, _, _ in _ROWS] + ["curve_min", "seconds", "data_passes"]
    out: dict[str, Any] = {}
    for m in methods:
        out[m] = {}
        for key in keys:
            values = [_value(p["methods"][m], key) for p in pairs]
            if any(v is None for v in values):
                continue
            mean, std = _mean_std(values)
            out[m][key] = {"mean": mean, "std": std, "n": len(values)}
    return out


def _fmt(stat: Mapping[str, Any] | None, scale: float, decimals: int) -> str:
    if not stat:
        return "—"
    text = _fmt_number(scale * stat["mean"], decimals)
    if stat.get("std") is not None:
        text += " ± " + _fmt_number(scale * stat["std"], decimals)
    return text


def write_comparison_report(results: Mapping[str, Any], path: Path, *, figure: Path | None = None) -> Path:
    """Write the comparison's markdown report (the table, the agreement matrix, the protocol) atomically."""
    methods = results["methods"]
    summary = results["summary"]
    protocol = results["protocol"]
    config = results["config"]
    n = len(results["pairs"])
    lines = [f"# Alignment methods compared: {config['model']['arch']} on {config['data']['dataset']}", "",
             f"{n} pair{'s' if n != 1 else ''} of end points"
             + (", mean ± sample std over pairs." if n > 1 else "."), ""]  # fmt: skip
    ends = [(q["endpoints"]["a"]["test_acc"] + q["endpoints"]["b"]["test_acc"]) / 2 for q in results["pairs"]]
    lines += [f"End points' test accuracy (mean of A and B): "
              f"{', '.join(_fmt_number(100 * e, 2) for e in ends)} % (pairs 1..{n}). "
              f"Test set: {results['test_images']} images (one image is {100 / results['test_images']:.2g} points).",
              ""]  # fmt: skip
    columns = [(k, title, pct) for k, title, pct in _ROWS]
    if config.get("fit_curves"):
        columns.append(("curve_min", "Bezier curve Min test acc. (%)", True))
    columns += [("seconds", "wall seconds", False), ("data_passes", "data passes", False)]
    header = ["method", *(title for _, title, _ in columns)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        cells = [m]
        for key, _, pct in columns:
            decimals = 1 if key == "seconds" else 2 if pct or key == "data_passes" else 3
            cells.append(_fmt(summary[m].get(key), 100.0 if pct else 1.0, decimals))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Barriers: *average* is max_λ L(λ) − ½(L_A + L_B) (Ainsworth et al. 2023); *linear* is "
              "max_λ [L(λ) − ((1−λ)L_A + λL_B)] (Garipov et al. 2018, Entezari et al. 2022, Theus et al. 2025). "
              "Accuracy barriers are the drop (positive is worse), in percentage points. AUC: trapezoid of the test "
              "loss over λ ∈ [0, 1]. Wall seconds and data passes are the method's cost (data passes: epochs over "
              "the training data for the learned methods and PAM's curve epochs, one pass over the alignment data "
              "for correlation and l2, none for weight matching and the identity).", ""]  # fmt: skip
    lines += ["## Protocol", "", f"- λ grid: {protocol['num_points']} evenly spaced points in [0, 1]",
              f"- batch norm: {protocol['bn']}"
              + (f" ({protocol['max_bn_batches']} training batches per estimate)" if protocol['max_bn_batches'] else
                 " (full passes)"),
              f"- splits: {', '.join(protocol['splits'])}",
              f"- alignment data: {protocol['alignment_data']} ({protocol['alignment_size']} examples)",
              ""]  # fmt: skip
    if figure is not None:
        lines += [f"![loss and accuracy along λ]({figure.relative_to(path.parent).as_posix()})", ""]
    lines += ["## Agreement", "", "Share of hidden units two methods map alike (mean over pairs).", "",
              "| | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]  # fmt: skip
    for m, row in zip(methods, results["agreement"]):
        lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    lines.append("")
    atomic_write_text(path, "\n".join(lines))
    return path


def plot_comparison(results: Mapping[str, Any], path: Path) -> Path:
    """Loss (log scale, so that small barriers stay visible beside large ones) and accuracy against λ, one band
    (mean ± std over pairs) per method, per split; saved atomically."""
    from neuralign.study.plots import _figure, _save_figure

    splits = results["protocol"]["splits"]
    fig = _figure(5.0 * len(splits), 6.5)
    axes = fig.subplots(2, len(splits), squeeze=False)
    for j, split in enumerate(splits):
        for i, (field, label, scale) in enumerate((("loss", "loss", 1.0), ("accuracy", "accuracy (%)", 100.0))):
            ax = axes[i][j]
            for m in results["methods"]:
                stack = np.array([q["methods"][m]["evaluation"]["splits"][split][field] for q in results["pairs"]])
                t = np.array(results["pairs"][0]["methods"][m]["evaluation"]["t"])
                mean = scale * stack.mean(axis=0)
                (line,) = ax.plot(t, mean, label=m)
                if stack.shape[0] > 1:
                    std = scale * stack.std(axis=0, ddof=1)
                    low, high = mean - std, mean + std
                    if field == "accuracy":  # the band of a bounded quantity stays within its bounds
                        low, high = np.clip(low, 0.0, scale), np.clip(high, 0.0, scale)
                    ax.fill_between(t, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
            ax.set_xlabel("λ")
            ax.set_ylabel(f"{split} {label}")
            if field == "loss":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    pairs = len(results["pairs"])
    fig.suptitle(f"mean over {pairs} pairs" + ("; bands: ± 1 standard deviation over the pairs" if pairs > 1 else ""),
                 fontsize=9)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save_figure(fig, path, "png")


# ------------------------------------------------------------------------------------------------- entry point
def run_compare(
    config: CompareConfig,
    out: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    progress: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a comparison and write ``results.json``, ``report.md`` and ``figures/compare.png`` in ``out``.

    Every stage of :func:`compare_stages` that is not done runs in this process, in order; then the report is
    written from the stages' files.

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
    """
    if not isinstance(config, CompareConfig):
        raise TypeError(f"`config` must be a CompareConfig, got {type(config).__name__}")
    out = Path(out)
    folder = RunFolder(out, key="config", normalize=lambda c: CompareConfig.from_dict(c).to_dict())
    manifest = folder.manifest()
    if manifest is not None:
        changes = folder.changes(config.to_dict())
        if changes:
            raise CheckpointError(f"{out} holds a comparison with other settings ({', '.join(changes)}); use another "
                                  "--out folder")  # fmt: skip
    else:
        manifest = {"kind": "compare_manifest", "config": config.to_dict(), "versions": environment_versions(),
                    "device": str(device), "threads": torch.get_num_threads(),
                    "command": ["neuralign", *sys.argv[1:]], "runs": []}  # fmt: skip
    fresh = not manifest["runs"]
    manifest["runs"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    out.mkdir(parents=True, exist_ok=True)
    folder.save(manifest)
    stages = compare_stages(config)
    try:
        run = _Compare(config, out, torch.device(device), progress)
        for stage in stages:
            if stage.kind != "report" and not stage_done(out, stage):
                run.run(stage)
        results = run.report()
    except BaseException:
        # a first run that failed before finishing any stage (a missing dataset, a typo in --arch) leaves no
        # manifest: it would lock the folder to the settings of a run that never ran
        if fresh and not any(stage_done(out, s) for s in stages if s.kind != "report"):
            folder.path.unlink(missing_ok=True)
        raise
    seconds = {}
    for stage in stages:
        record = out / "stages" / f"{stage.slug}.json"
        if record.exists():
            seconds[stage.name] = _json.loads(record.read_text())["seconds"]
    manifest["stage_seconds"] = seconds
    manifest["runs"][-1]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    manifest["report"] = "report.md"
    folder.save(manifest)
    return results


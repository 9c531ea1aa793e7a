"""The paper's Table 1 protocol end to end: endpoints, alignment, four kinds of curves, evaluation, verification.

:func:`run_study` trains (or loads) ``2 x pairs`` end points, aligns every pair by activation correlation, fits the
four curves of Tatro et al. (2020, Table 1) — Unaligned, PAM Unaligned, PAM Aligned, Aligned — evaluates each at
``num_points`` values of ``t`` with batch norm re-estimated, verifies the alignment, and aggregates mean ± std over
pairs into ``results.json``, a markdown report and figures. Every stage writes its result atomically into the
output folder and is skipped when the result is already there; long stages checkpoint every epoch, so an
interrupted study resumes without losing finished work.
"""

from __future__ import annotations

import dataclasses
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
from neuralign.curves import (
    Bezier,
    CurveEvaluation,
    Line,
    evaluate_curve,
    evaluate_model,
    evaluate_plane,
    fit_curve,
    fit_curve_pam,
    midpoint_alignment,
    project_to_plane,
)
from neuralign.errors import CheckpointError, ConvergenceWarning
from neuralign.experiments.checkpoints import load_endpoint
from neuralign.experiments.data import DataBundle, load_data
from neuralign.experiments.models import build_model
from neuralign.experiments.training import train_model
from neuralign.verification import verify_alignment

__all__ = ["SETTINGS", "PRESETS", "StudyConfig", "run_study"]

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
    ``curve_weight_decay``. PAM: ``pam_iters`` outer iterations, ``pam_lam``, ``pam_method``,
    ``pam_local_search``, ``pam_gradient_batches``. Evaluation: ``num_points``, ``bn_batches`` (``None``: a full
    training pass per point, as in the paper), ``plane_grid`` (0: no plane). Verification: ``verify`` and the
    budgets ``verify_iters`` (PAM iterations), ``verify_swaps`` (best-ranked swaps scored per group),
    ``verify_batches`` and ``verify_ts`` (held-out batches and times scoring every move), ``verify_local_search``
    (swaps PAM tries per group), ``verify_random_starts``. ``settings``: which of :data:`SETTINGS` to fit.
    ``max_batches``: cut every epoch short (smoke tests only).
    ``endpoints``: given end points instead of training them, ``2 * pairs`` files paired in order (any format
    :func:`~neuralign.experiments.load_endpoint` reads: end points, plain or wrapped state dicts, safetensors;
    plain files are read as ``arch`` with the dataset's number of classes); ``None`` trains them.
    ``num_classes``: classes of the models' heads (default: the dataset's), ``model_args``: extra builder arguments
    (e.g. for ``torchvision:<name>``), ``mean`` / ``std``: normalisation statistics (default: computed or known).
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
    pam_lam: float = 1000.0
    pam_method: str = "linearized"
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

    def __post_init__(self) -> None:
        for name in ("pairs", "epochs", "curve_epochs", "pam_iters", "num_points", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
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
    # TinyTen on CIFAR-10 scaled to about an hour on 2 CPU cores (benchmarked in the README).
    "cpu": StudyConfig(
        pairs=2, train_size=10000, test_size=5000, align_size=5000, epochs=20, curve_epochs=10, num_points=17,
        bn_batches=10, plane_grid=9, pam_gradient_batches=8, verify_iters=1, verify_swaps=16, verify_batches=4,
        verify_ts=(0.5,), verify_local_search=8, verify_random_starts=1,
    ),
    # The offline demo on the shipped UCI digits (8x8, resized to 16x16 for TinyTen): a few minutes on a CPU.
    "demo": StudyConfig(
        dataset="digits", pairs=1, resize=16, batch_size=64, epochs=15, curve_epochs=6, num_points=11,
        bn_batches=4, plane_grid=7, align_size=None, pam_gradient_batches=4, verify_iters=1, verify_swaps=8,
        verify_batches=4, verify_ts=(0.5,), verify_local_search=4, verify_random_starts=0,
    ),
}


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
    def __init__(self, config: StudyConfig, out: Path, device: torch.device, progress: Progress | None) -> None:
        self.config = config
        self.out = out
        self.device = device
        self.progress = progress
        self.mark = time.perf_counter()  # end of the previous stage (stages run one after another)

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
            if manifest.get("config") != config:
                diff = sorted(k for k in config if manifest.get("config", {}).get(k) != config[k])
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
                "command": sys.argv,
                "runs": [{"started": time.strftime("%Y-%m-%dT%H:%M:%S")}],
                "completed": [],
            }
        self.manifest = manifest
        self.save_manifest()
        return manifest

    def save_manifest(self) -> None:
        atomic_write_text(self.out / "manifest.json", json.dumps(self.manifest, indent=1))

    def done(self, stage: str) -> None:
        """Mark ``stage`` completed and record its wall-clock seconds (since the previous stage ended)."""
        now = time.perf_counter()
        seconds, self.mark = now - self.mark, now
        if stage not in self.manifest["completed"]:
            self.manifest["completed"].append(stage)
            self.manifest["runs"][-1]["last"] = stage
            self.manifest.setdefault("stage_seconds", {})[stage] = round(seconds, 2)
            self.save_manifest()

    # ------------------------------------------------------------------ stages
    def endpoint(self, seed: int) -> tuple[nn.Module, dict]:
        c = self.config
        if c.endpoints is not None:
            model, meta = load_endpoint(c.endpoints[seed - 1], arch=c.arch,
                                        num_classes=c.num_classes or self.data.num_classes,
                                        model_kwargs=_model_kwargs(c, self.data))  # fmt: skip
            model = model.to(self.device)
            if "test" not in meta:
                test_loss, test_acc = evaluate_model(model, self.data.test)
                meta["test"] = {"test_loss": test_loss, "test_acc": test_acc}
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
        )  # fmt: skip
        model.load_state_dict(res.state_dict)
        model.eval()
        test_loss, test_acc = evaluate_model(model, self.data.test)
        meta = {
            "kind": "endpoint", "arch": c.arch, "num_classes": c.num_classes or self.data.num_classes,
            "model_kwargs": kwargs,
            "seed": seed, "history": res.history, "test": {"test_loss": test_loss, "test_acc": test_acc},
            "dataset": self.data.describe(),
        }  # fmt: skip
        atomic_save({**meta, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}, path)
        path.with_suffix(".ckpt").unlink(missing_ok=True)
        self.done(f"endpoint {seed}")
        return model, meta

    def source(self, seed: int) -> str:
        if self.config.endpoints is not None:
            return self.config.endpoints[seed - 1]
        return f"endpoints/seed{seed}.pt"

    def alignment(self, k: int, a: nn.Module, b: nn.Module) -> dict[str, Any]:
        path = self.out / f"pair{k}" / "alignment.pt"
        if not path.exists():
            self.emit(stage="align", label=f"pair {k}", step=0, total=1)
            res = align(a, b, self.data.align)
            record = PermutationFile(
                perms={g: p.cpu() for g, p in res.perms.items()}, spec=res.spec, method=res.method,
                settings={"data": self.config.dataset, "align_images": len(self.data.align.dataset)},
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
        if setting.startswith("pam"):
            self.emit(stage="pam", label=label, step=0, total=c.curve_epochs * c.pam_iters, start=True)
        else:
            self.emit(stage="curve", label=label, step=0, total=c.curve_epochs, start=True)
        if setting in ("unaligned", "aligned"):
            end_b = sd_b if setting == "unaligned" else apply_permutation(sd_b, spec.restrict(sd_b), perms)
            res = fit_curve(
                a, _params(a, sd_a), _params(a, end_b), self.data.train, epochs=c.curve_epochs, optimizer=optimizer,
                weight_decay=c.curve_weight_decay, generator=seed, callback=on_epoch,
                checkpoint=folder / f"curve_{setting}.ckpt", max_batches_per_epoch=c.max_batches,
            )  # fmt: skip
            curve = res.curve
            meta["history"] = res.history
            (folder / f"curve_{setting}.ckpt").unlink(missing_ok=True)
        else:
            total = c.curve_epochs * c.pam_iters

            def on_event(record: dict[str, Any]) -> None:
                if record["stage"] == "x-epoch":
                    step = (record["iteration"] - 1) * c.curve_epochs + record.get("epoch", 0) + 1
                    self.emit(stage="pam", label=label, step=step, total=total, record=record)

            with warnings.catch_warnings():
                # the paper's protocol is a fixed number of outer iterations; the status is recorded in the meta
                warnings.simplefilter("ignore", ConvergenceWarning)
                res = fit_curve_pam(
                a, sd_a, sd_b, self.data.train, init="identity" if setting == "pam_unaligned" else perms, spec=spec,
                method=c.pam_method, lam=c.pam_lam, max_iter=c.pam_iters, x_epochs=c.curve_epochs,
                optimizer=optimizer, weight_decay=c.curve_weight_decay, gradient_batches=c.pam_gradient_batches,
                value_loader=self.data.train_eval, local_search=c.pam_local_search, generator=seed,
                callback=on_event, checkpoint=folder / f"curve_{setting}.ckpt", max_batches_per_epoch=c.max_batches,
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
                            max_bn_batches=c.bn_batches, callback=on_point)  # fmt: skip
        atomic_write_text(path, json.dumps(ev.to_dict(), indent=1))
        self.done(f"pair {k} eval {setting}")
        return ev

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
    """
    from neuralign.experiments.plots import plot_study
    from neuralign.experiments.report import write_report, write_results_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    started = time.perf_counter()
    study = _Study(config, out, device, progress)
    study.check_manifest()
    c = config
    study.data = load_data(
        c.dataset, root=c.data_root, download=c.download, batch_size=c.batch_size, train_size=c.train_size,
        test_size=c.test_size, align_size=c.align_size, resize=c.resize, generator=c.seed, mean=c.mean, std=c.std,
    )  # fmt: skip
    study.manifest["data"] = study.data.describe()
    study.save_manifest()
    study.mark = time.perf_counter()  # the first stage's time starts after the data is loaded
    pairs_out = []
    for k in range(1, c.pairs + 1):
        (out / f"pair{k}").mkdir(exist_ok=True)
        a, meta_a = study.endpoint(2 * k - 1)
        b, meta_b = study.endpoint(2 * k)
        sd_a = {key: v.to(device) for key, v in a.state_dict().items()}
        sd_b = {key: v.to(device) for key, v in b.state_dict().items()}
        al = study.alignment(k, a, b)
        perms = {g: p.cpu() for g, p in al["perms"].items()}
        spec = trace_spec(a, next(iter(study.data.train))[0][:2].to(device))
        curves, evals, pam, histories = {}, {}, {}, {}
        for setting in c.settings:
            curve, meta = study.curve(k, setting, a, sd_a, sd_b, perms, spec)
            curves[setting] = curve
            histories[setting] = _train_history(meta.get("history", []))
            evals[setting] = study.evaluate(k, setting, a, curve).to_dict()
            if setting.startswith("pam"):
                pam[setting] = {"history": meta["objective"], "changed": meta["changed"]}
        aligned = curves.get("aligned")
        verification = plane = midpoint = None
        if aligned is not None:
            midpoint = study.midpoint(k, a, sd_a, sd_b, perms, spec, curves)
        if c.verify and aligned is not None:
            verification = study.verification(k, a, sd_a, sd_b, perms, spec, aligned)
        if c.plane_grid and aligned is not None and k == 1:
            plane = study.plane(k, a, sd_a, sd_b, perms, spec, aligned)
        pairs_out.append({
            "pair": k,
            "seeds": [2 * k - 1, 2 * k],
            "endpoints": {"a": meta_a["test"], "b": meta_b["test"]},
            "alignment": {key: al[key] for key in ("groups", "sizes", "correlation_before", "correlation_after")},
            "curves": evals,
            "pam": pam,
            "verification": verification,
            "plane": plane,
            "midpoint_alignment": midpoint,
            "train_history": histories,
        })  # fmt: skip
    results = {"kind": "study_results", "config": c.to_dict(), "settings": list(c.settings), "pairs": pairs_out,
               "test_images": len(study.data.test.dataset),
               "bn_batches": {"count": len(study.bn_loader()) if c.bn_batches is not None else None,
                              "shared": True}}  # fmt: skip
    write_results_json(results, out)
    figures = plot_study(results, out / "figures")
    report = write_report(results, out, figures=figures, paper_row=paper_row, notes=notes)
    study.manifest["runs"][-1]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    study.manifest["runs"][-1]["seconds"] = round(time.perf_counter() - started, 2)
    study.manifest["report"] = str(report)
    study.save_manifest()
    results["report"] = str(report)
    return results


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
all in order in this process, and :mod:`neuralign.study.executors` runs them as concurrent local jobs or Slurm
jobs through the same :func:`run_stage`. The stage files are the single source of truth: a stage is done when all
its outputs exist, and each stage writes only its own outputs and its record ``stages/<stage>.json`` (seconds,
job, process group), which the manifest's ``completed`` and ``stage_seconds`` are merged from. Each stage starts
from seeds of its own (torch's global RNG and the training loader's generator), so its result does not depend on
which stages ran before it in the same process.

"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuralign import _distributed, _json
from neuralign._utils import atomic_save, atomic_write_text, environment_versions, stable_seed
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
from neuralign.errors import ConvergenceWarning
from neuralign.experiments.checkpoints import load_endpoint
from neuralign.experiments.data import DataBundle, load_data
from neuralign.experiments.models import build_model, builder_kwargs
from neuralign.experiments.runfolder import RunFolder
from neuralign.experiments.training import train_model
from neuralign.study.config import StudyConfig
from neuralign.study.jobs import refuse_live_jobs
from neuralign.study.results import (
    AlignmentSummary,
    BNBatches,
    Endpoints,
    MidpointResults,
    PairResults,
    PAMRun,
    PlaneResults,
    StudyResults,
    TrainEpoch,
)
from neuralign.study.stages import Stage, first_run, stage_done, stage_to_run, study_stages
from neuralign.verification import CHECKS, VerificationReport, verify_alignment

__all__ = ["check_study_folder", "model_kwargs", "prepare_study", "run_stage", "run_study"]

logger = logging.getLogger(__name__)


Progress = Callable[[dict[str, Any]], Any]


# ----------------------------------------------------------------------------------------------------- helpers
def model_kwargs(config: StudyConfig, data: DataBundle) -> dict[str, Any]:
    """Builder arguments of the study's architecture: the zoo's from the data, then ``model.args``."""
    m = config.model
    return {**builder_kwargs(m.arch, data.in_channels, data.image_size, width=m.width, hidden=m.hidden),
            **(m.args or {})}  # fmt: skip


def _portable_paths(described: Mapping[str, Any]) -> dict[str, Any]:
    """The data description with its file path relative to the working directory, so that a manifest published
    with the results names no folder of the machine that ran it."""
    out = dict(described)
    if isinstance(out.get("path"), str):
        out["path"] = os.path.relpath(out["path"])
    return out


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
        self.started = time.time()  # the same instant, as a date (stage records: which stages ran side by side)
        self._pairs: dict[int, dict[str, Any]] = {}

    @functools.cached_property
    def data(self) -> DataBundle:
        c = self.config
        d = c.data
        return load_data(
            d.dataset, root=d.root, download=d.download, batch_size=d.batch_size, train_size=d.train_size,
            test_size=d.test_size, align_size=d.align_size, resize=d.resize, generator=c.seed, mean=d.mean,
            std=d.std, normalize=c.robust is None,
        )  # fmt: skip

    def emit(self, **event: Any) -> Any:
        if self.progress is not None:
            return self.progress(event)
        return None

    # ------------------------------------------------------------------ manifest
    def check_manifest(self) -> dict[str, Any]:
        """Open the study's run folder under the one run-folder policy
        (:class:`~neuralign.experiments.runfolder.RunFolder`, the study's settings as its options): a folder that
        holds a study with other settings is refused; this run is recorded in the manifest."""
        config = self.config.to_dict()
        manifest = _recorded_study(self.config, self.out)  # refuses other settings
        if manifest is not None:
            manifest["config"] = config
            manifest.setdefault("runs", []).append({"started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        else:
            manifest = {
                "kind": "study_manifest",
                "config": config,
                "seeds": list(range(1, 2 * self.config.pairs + 1)),
                "versions": environment_versions(),
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
        atomic_write_text(self.out / "manifest.json", _json.dumps(self.manifest))

    def done(self, stage: str) -> None:
        """Record that ``stage`` has written its outputs: ``stages/<stage>.json`` with its wall-clock seconds (since
        it started), where it ran (job id, process group) and when it finished. Only this stage writes that file."""
        record = {
            "stage": stage, "seconds": round(time.perf_counter() - self.mark, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "job_id": _job_id(),
            "distributed": _distributed.describe(), "device": str(self.device),
            "started_unix": round(self.started, 3), "finished_unix": round(time.time(), 3),
            "threads": torch.get_num_threads(),
        }  # fmt: skip
        atomic_write_text(self.out / "stages" / f"{stage.replace(' ', '_')}.json", _json.dumps(record))

    def merge_stage_records(self) -> None:
        """Merge the stage records into the manifest (``completed`` in graph order, ``stage_seconds``) and save it.
        Called by the one process that owns the manifest at that moment (a sequential run, or the report stage)."""
        records = {}
        for stage in study_stages(self.config):
            path = self.out / "stages" / f"{stage.slug}.json"
            if path.exists():
                records[stage.name] = _json.loads(path.read_text())
        self.manifest["completed"] = list(records)
        self.manifest["stage_seconds"] = {name: r["seconds"] for name, r in records.items()}
        self.manifest["stage_jobs"] = {name: r["job_id"] for name, r in records.items() if r.get("job_id")}
        self.save_manifest()

    # ------------------------------------------------------------------ stages
    def endpoint(self, seed: int) -> tuple[nn.Module, dict]:
        c = self.config
        if c.endpoints is not None:
            model, meta = load_endpoint(c.endpoints[seed - 1], arch=c.model.arch,
                                        num_classes=c.model.num_classes or self.data.num_classes,
                                        model_kwargs=model_kwargs(c, self.data))  # fmt: skip
            described = meta.get("dataset") if isinstance(meta.get("dataset"), dict) else {}
            if c.robust is not None and (described.get("mean") is not None or described.get("std") is not None):
                raise ValueError(
                    f"end point {c.endpoints[seed - 1]!r} was trained on normalised inputs (mean "
                    f"{described.get('mean')}, std {described.get('std')}), but a robust study attacks and evaluates "
                    "[0, 1] inputs: give end points trained without normalisation (or with it inside the model)"
                )
            model = model.to(self.device)
            if "test" not in meta:
                test_loss, test_acc = evaluate_model(model, self.data.test)
                meta["test"] = {"test_loss": test_loss, "test_acc": test_acc}
            if c.robust is not None and "robust_test_acc" not in meta["test"]:
                meta["test"].update(self.robust_test(model, seed))
            return model, meta
        path = self.out / "endpoints" / f"seed{seed}.pt"
        if path.exists():
            model, meta = load_endpoint(path)
            return model.to(self.device), meta
        kwargs = model_kwargs(c, self.data)
        model = build_model(c.model.arch, c.model.num_classes or self.data.num_classes,
                            generator=stable_seed(c.seed, "init", seed), **kwargs)  # fmt: skip
        model = model.to(self.device)
        self.data.train.generator.manual_seed(stable_seed(c.seed, "data", seed))
        tr = c.train
        self.emit(stage="train", label=f"end point {seed}", step=0, total=tr.epochs, start=True)

        def on_epoch(record: dict[str, Any]) -> None:
            self.emit(stage="train", label=f"end point {seed}", step=record["epoch"], total=tr.epochs, record=record)

        res = train_model(
            model, self.data.train, epochs=tr.epochs, lr=tr.lr, weight_decay=tr.weight_decay, test_loader=None,
            checkpoint=path.with_suffix(".ckpt"), callback=on_epoch, max_batches=c.max_batches,
            lr_lambda=tr.lr_lambda(), adversarial=c.attack(), generator=stable_seed(c.seed, "attack", seed),
            optimizer=tr.optimizer,
        )  # fmt: skip
        model.load_state_dict(res.state_dict)
        model.eval()
        test_loss, test_acc = evaluate_model(model, self.data.test)
        test = {"test_loss": test_loss, "test_acc": test_acc}
        if c.robust is not None:
            test.update(self.robust_test(model, seed))
        meta = {
            "kind": "endpoint", "arch": c.model.arch, "num_classes": c.model.num_classes or self.data.num_classes,
            "model_kwargs": kwargs,
            "seed": seed, "history": res.history, "test": test,
            "dataset": self.data.describe(),
        }  # fmt: skip
        if c.robust is not None:
            meta["adversarial"] = c.robust.attack.to_dict()
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
            attack = c.attack() if c.robust is not None and c.robust.align_inputs == "adversarial" else None
            extra = {"inputs": "adversarial", "adversarial": attack, "generator": stable_seed(c.seed, "align", k)}
            res = align(a, b, self.data.align, **(extra if attack is not None else {}))
            record = PermutationFile(
                perms={g: p.cpu() for g, p in res.perms.items()}, spec=res.spec, method=res.method,
                settings={"data": c.data.dataset, "align_images": len(self.data.align.dataset),
                          **({"inputs": "adversarial", "adversarial": attack.to_dict()} if attack else {})},
                model_a={"hash": state_dict_hash(a.state_dict()), "source": self.source(2 * k - 1),
                         "layout": state_dict_layout(a.state_dict())},
                model_b={"hash": state_dict_hash(b.state_dict()), "source": self.source(2 * k),
                         "layout": state_dict_layout(b.state_dict())},
                arch=c.model.arch,
                results={"correlation_before": res.correlation_before, "correlation_after": res.correlation_after},
            )  # fmt: skip
            save_permutation_file(path, record)
            self.emit(stage="align", label=f"pair {k}", step=1, total=1)
            self.done(f"pair {k} alignment")
        record = load_permutation_file(path)
        record.check_pair(arch=c.model.arch, hash_a=state_dict_hash(a.state_dict()),
                          hash_b=state_dict_hash(b.state_dict()))  # fmt: skip
        return {"perms": record.perms, "groups": record.spec.groups, "sizes": record.spec.sizes, **record.results}

    def curve(self, k: int, setting: str, a: nn.Module, sd_a: dict, sd_b: dict, perms: dict, spec) -> tuple:
        c = self.config
        folder = self.out / f"pair{k}"
        path = folder / f"curve_{setting}.pt"
        meta_path = folder / f"curve_{setting}.json"
        if path.exists() and meta_path.exists():
            return Bezier.load(path), _json.loads(meta_path.read_text())
        seed = stable_seed(c.seed, "curve", k, setting)
        self.data.train.generator.manual_seed(stable_seed(c.seed, "curve-data", k, setting))
        label = f"pair {k} {setting.replace('_', ' ')}"

        cv = c.curve
        optimizer = cv.curve_optimizer()

        def on_epoch(record: dict[str, Any]) -> None:
            self.emit(stage="curve", label=label, step=record.get("epoch", 0) + 1, total=cv.epochs, record=record)

        meta: dict[str, Any] = {"setting": setting}
        pam = c.pam
        if setting.startswith("pam"):
            self.emit(stage="pam", label=label, step=0, total=pam.x_epochs * pam.max_iter, start=True)
        else:
            self.emit(stage="curve", label=label, step=0, total=cv.epochs, start=True)
        if setting in ("unaligned", "aligned"):
            end_b = sd_b if setting == "unaligned" else apply_permutation(sd_b, spec.restrict(sd_b), perms)
            res = fit_curve(
                a, _params(a, sd_a), _params(a, end_b), self.data.train, epochs=cv.epochs, optimizer=optimizer,
                weight_decay=cv.weight_decay, generator=seed, callback=on_epoch,
                checkpoint=folder / f"curve_{setting}.ckpt", max_batches=c.max_batches, lr_lambda=cv.lr_lambda(),
                adversarial=c.attack(),
            )  # fmt: skip
            curve = res.curve
            meta["history"] = res.history
            (folder / f"curve_{setting}.ckpt").unlink(missing_ok=True)
        else:
            total = pam.x_epochs * pam.max_iter

            def on_event(record: dict[str, Any]) -> None:
                if record["stage"] == "x-epoch":
                    step = (record["iteration"] - 1) * pam.x_epochs + record.get("epoch", 0) + 1
                    self.emit(stage="pam", label=label, step=step, total=total, record=record)
                elif record["iteration"] < pam.max_iter:  # an earlier iteration's curve, evaluated like the last
                    record["curve"].save(folder / f"curve_{setting}_iter{record['iteration']}.pt")

            with warnings.catch_warnings():
                # the paper's protocol is a fixed number of outer iterations; the status is recorded in the meta
                warnings.simplefilter("ignore", ConvergenceWarning)
                res = fit_curve_pam(
                    a, sd_a, sd_b, self.data.train, init="identity" if setting == "pam_unaligned" else perms,
                    spec=spec, heldout_loader=self.data.train_eval, options=pam, optimizer=optimizer,
                    weight_decay=cv.weight_decay, lr_lambda=cv.lr_lambda(), generator=seed, callback=on_event,
                    checkpoint=folder / f"curve_{setting}.ckpt", max_batches=c.max_batches,
                )  # fmt: skip
            curve = res.curve
            meta.update(history=res.curve_history, objective=res.history, changed=res.changed,
                        backtracks=res.backtracks, status=int(res.status), message=res.message,
                        perms={g: p.tolist() for g, p in res.perms.items()})  # fmt: skip
            (folder / f"curve_{setting}.ckpt").unlink(missing_ok=True)
        curve.save(path)
        atomic_write_text(meta_path, _json.dumps(meta))
        self.done(f"pair {k} curve {setting}")
        return curve, meta

    def bn_loader(self) -> Any:
        """The batches batch norm is re-estimated on: with ``bn_batches``, the same ``bn_batches`` training batches
        (drawn once, with the training augmentation) at every t, on every curve and the plane, so that differences
        between points and curves are not differences of batches; without, a full pass of the training images
        without augmentation, in a fixed order."""
        c = self.config
        limit = c.evaluation.max_bn_batches
        if limit is None:
            return self.data.train_eval
        if getattr(self, "_bn_batches", None) is None:
            self.data.train.generator.manual_seed(stable_seed(c.seed, "bn"))
            batches = []
            for batch in self.data.train:
                if len(batches) == limit:
                    break
                batches.append(batch)
            self._bn_batches = batches
        return self._bn_batches

    def evaluate(self, k: int, setting: str, a: nn.Module, curve) -> CurveEvaluation:
        c = self.config
        path = self.out / f"pair{k}" / f"eval_{setting}.json"
        if path.exists():
            return CurveEvaluation.from_dict(_json.loads(path.read_text()))
        label = f"pair {k} {setting.replace('_', ' ')}"

        def on_point(record: dict[str, Any]) -> None:
            self.emit(stage="evaluate", label=label, step=record.get("index", 0) + 1, total=ev_opts.num_points,
                      record=record)  # fmt: skip

        ev_opts = c.evaluation
        self.emit(stage="evaluate", label=label, step=0, total=ev_opts.num_points, start=True)
        ev = evaluate_curve(a, curve, self.bn_loader(), self.data.test, num_points=ev_opts.num_points,
                            max_bn_batches=ev_opts.max_bn_batches, callback=on_point, adversarial=c.attack(),
                            bn_inputs="adversarial" if c.robust is None else c.robust.bn_inputs,
                            generator=stable_seed(c.seed, "eval-attack"))  # fmt: skip
        atomic_write_text(path, _json.dumps(ev.to_dict()))
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
            ev = _json.loads((self.out / f"pair{k}" / name).read_text())
            rows.append({"iteration": j, "objective": objective[j],
                         "moved": sum(int(v[j - 1]) for v in meta["changed"].values()),
                         "avg_accuracy": ev["avg_accuracy"], "min_accuracy": ev["min_accuracy"]})  # fmt: skip
        return rows

    def verification(self, k: int, a: nn.Module, sd_a, sd_b, perms, spec, curve, *,
                     method: str | None = None) -> dict[str, Any]:  # fmt: skip
        """Verify pair ``k``'s permutation ``perms`` on ``curve`` (fitted between A and the permuted B); a
        comparison's ``method`` names its files (``pair<k>/verify_<method>.json`` and ``.md``), its stage and its
        seeds."""
        c = self.config
        stem, salt = ("verification", ()) if method is None else (f"verify_{method}", (method,))
        path = self.out / f"pair{k}" / f"{stem}.json"
        if path.exists():
            return _json.loads(path.read_text())
        started: list[str] = []  # the checks in the order they run

        def on_progress(record: dict[str, Any]) -> None:
            name = record["check"]
            if record["start"] and name not in started:
                started.append(name)
            label = f"pair {k} {name} ({started.index(name) + 1}/{len(CHECKS)})"
            expected = {"expected_seconds": record["expected_seconds"]} if "expected_seconds" in record else {}
            self.emit(stage="verify", label=label, step=record["step"], total=record["total"], start=record["start"],
                      **expected)

        self.data.train.generator.manual_seed(stable_seed(c.seed, "verify-data", k, *salt))
        report = verify_alignment(
            a, sd_a, sd_b, perms, self.data.train, curve=curve, spec=spec, heldout_loader=self.data.train_eval,
            align_loader=self.data.align, options=c.verification, max_batches=c.max_batches,
            generator=stable_seed(c.seed, "verify", k, *salt), callback=on_progress,
        )  # fmt: skip
        report.save(self.out / f"pair{k}", stem=stem)
        self.done(f"pair {k} verification" if method is None else f"pair {k} verify {method}")
        return _json.loads(report.to_json())

    def midpoint(self, k: int, a: nn.Module, sd_a, sd_b, perms, spec, curves: Mapping[str, Any]) -> dict[str, Any]:
        """Alignment along the curve (Tatro et al. §4; PAPER_NOTES §2.6): the network at t = 0.5 of each case,
        batch norm re-estimated on the study's batch-norm batches, aligned to each end point by correlation.

        Cases and their end points: ``aligned``, the fitted Aligned curve between A and P·B (P the alignment);
        ``unaligned``, the fitted Unaligned curve between A and B; ``linear``, the straight line between A and
        P·B, i.e. the Aligned curve at epoch 0 (its control point starts at that midpoint), the paper's "Linear
        Midpoint". Written atomically to ``pair<k>/midpoint_alignment.json``; skipped when there."""
        path = self.out / f"pair{k}" / "midpoint_alignment.json"
        if path.exists():
            return _json.loads(path.read_text())
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
                                     max_bn_batches=self.config.evaluation.max_bn_batches, spec=spec)  # fmt: skip
            out["cases"][case] = res.to_dict()
        self.emit(stage="midpoint alignment", label=f"pair {k}", step=len(cases), total=len(cases))
        atomic_write_text(path, _json.dumps(out))
        self.done(f"pair {k} midpoint alignment")
        return out

    def plane(self, k: int, a: nn.Module, sd_a, sd_b, perms, spec, curve) -> dict[str, Any]:
        c = self.config
        path = self.out / f"pair{k}" / "plane.json"
        if path.exists():
            return _json.loads(path.read_text())
        pa, pb = _params(a, sd_a), _params(a, apply_permutation(sd_b, spec.restrict(sd_b), perms))
        theta = curve.points[1]

        def on_point(record: dict[str, Any]) -> None:
            step = record["i"] * grid + record["j"] + 1
            self.emit(stage="plane", label=f"pair {k}", step=step, total=grid**2)

        grid = c.evaluation.plane_grid
        self.emit(stage="plane", label=f"pair {k}", step=0, total=grid**2, start=True)
        plane = evaluate_plane(a, pa, pb, theta, self.bn_loader(), self.data.test, grid=grid,
                               max_bn_batches=c.evaluation.max_bn_batches, callback=on_point)  # fmt: skip
        xy = project_to_plane(curve, pa, pb, theta, t=[i / 40 for i in range(41)])
        out = {**plane.to_dict(), "curve_xy": xy.tolist(), "labels": ["w_A", "P w_B", "theta"]}
        atomic_write_text(path, _json.dumps(out))
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
        self.mark, self.started = time.perf_counter(), time.time()
        k = stage.index
        if stage.kind == "endpoint":
            self.endpoint(k)
        elif stage.kind == "report":
            self.report(**report_options)
        elif stage.kind == "alignment":
            self.pair(k)
        elif stage.kind == "curve":
            self.pair_curve(k, stage.setting)
        elif stage.kind == "eval":
            curve, meta = self.pair_curve(k, stage.setting)
            a = self.pair(k)["a"]
            if stage.setting.startswith("pam"):  # earlier outer iterations first: the stage is done when the last is
                for j in range(1, len(meta["objective"]) - 1):
                    self.evaluate(k, f"{stage.setting}_iter{j}", a,
                                  Bezier.load(self.out / f"pair{k}" / f"curve_{stage.setting}_iter{j}.pt"))
            self.evaluate(k, stage.setting, a, curve)
        elif stage.kind == "midpoint":
            p = self.pair(k)
            curves = {s: self.pair_curve(k, s)[0] for s in ("aligned", "unaligned") if s in self.config.settings}
            self.midpoint(k, p["a"], p["sd_a"], p["sd_b"], p["perms"], p["spec"], curves)
        else:  # verification, plane: on the aligned curve
            p = self.pair(k)
            body = self.verification if stage.kind == "verification" else self.plane
            body(k, p["a"], p["sd_a"], p["sd_b"], p["perms"], p["spec"], self.pair_curve(k, "aligned")[0])

    def report(self, paper_row: Mapping[str, Any] | None = None, notes: str | None = None) -> dict[str, Any]:
        """Gather every stage's results from its files into a :class:`~neuralign.study.results.StudyResults`, write
        it (``results.json``), the figures and the report; return its JSON form with ``"report"``, the report's
        path."""
        from neuralign.study.plots import plot_study
        from neuralign.study.report import write_report

        def record(cls: type, data: Any, where: str) -> Any:  # a stage's output as plain JSON data, validated
            return cls.from_dict(_json.decode(_json.encode(data, where)), where=where)

        c = self.config
        pairs = []
        for k in range(1, c.pairs + 1):
            p = self.pair(k)
            where = f"results['pairs'][{k - 1}]"
            curves, evals, pam, histories = {}, {}, {}, {}
            for setting in c.settings:
                curve, meta = self.pair_curve(k, setting)
                curves[setting] = curve
                histories[setting] = tuple(TrainEpoch(**row) for row in _train_history(meta.get("history", [])))
                evals[setting] = self.evaluate(k, setting, p["a"], curve)
                if setting.startswith("pam"):
                    run = {"history": meta["objective"], "changed": meta["changed"],
                           "iterations": self.pam_iterations(k, setting, meta)}  # fmt: skip
                    pam[setting] = record(PAMRun, run, f"{where}['pam'][{setting!r}]")
            aligned = curves.get("aligned")
            verification = plane = midpoint = None
            args = (k, p["a"], p["sd_a"], p["sd_b"], p["perms"], p["spec"], aligned)
            if aligned is not None:
                midpoint = record(MidpointResults, self.midpoint(*args[:-1], curves), f"{where}['midpoint_alignment']")
            if c.verification is not None and aligned is not None:
                verification = VerificationReport.from_dict(_json.decode(self.verification(*args)))
            if c.evaluation.plane_grid and aligned is not None and k == 1:
                plane = record(PlaneResults, self.plane(*args), f"{where}['plane']")
            al = {key: p["al"][key] for key in ("groups", "sizes", "correlation_before", "correlation_after")}
            ends = {"a": p["meta_a"]["test"], "b": p["meta_b"]["test"]}
            pairs.append(PairResults(
                pair=k, seeds=(2 * k - 1, 2 * k), endpoints=record(Endpoints, ends, f"{where}['endpoints']"),
                alignment=record(AlignmentSummary, al, f"{where}['alignment']"), curves=evals, pam=pam,
                verification=verification, plane=plane, midpoint_alignment=midpoint, train_history=histories,
            ))  # fmt: skip
        bn_count = len(self.bn_loader()) if c.evaluation.max_bn_batches is not None else None
        results = StudyResults(config=c, settings=c.settings, pairs=pairs, test_images=len(self.data.test.dataset),
                               bn_batches=BNBatches(count=bn_count, shared=True))  # fmt: skip
        results.write(self.out)
        figures = plot_study(results, self.out / "figures")
        report = write_report(results, self.out, figures=figures, paper_row=paper_row, notes=notes)
        return {**results.to_dict(), "report": str(report)}


def _job_id() -> str | None:
    """The scheduler's id of the job running this process (Slurm or submitit's local executor), if any."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")


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

    The entry point of a study's jobs (:mod:`neuralign.study.executors`). Its inputs are read from the files of
    the stages it needs; it writes only its own outputs and its record ``stages/<stage>.json``. The ``report``
    stage always runs (it is cheap and reflects the files present) and then merges the stage records into the
    manifest, which :func:`prepare_study` wrote before any job started. Under a process group (a Slurm job with
    several tasks, ``--gpus-per-job`` or ``--tasks-per-job`` above 1, or ``torchrun``) the stage runs data-parallel
    and rank 0 writes.

    Raises
    ------
    ValueError
        For a stage this study does not have.
    RuntimeError
        If a stage it needs is not done (names it).
    """
    out = Path(out)
    stage = stage_to_run(out, study_stages(config), name)
    if stage is None:
        return False
    study = _Study(config, out, torch.device(device), progress)
    study.run(stage, {"paper_row": paper_row, "notes": notes})
    if stage.name == "report":
        study.manifest = _json.loads((out / "manifest.json").read_text())
        _finish_manifest(study, stage)
    return True


def _finish_manifest(study: _Study, report: Stage) -> None:
    run = study.manifest["runs"][-1]
    run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    run["seconds"] = round(time.time() - run.get("started_unix", time.time()), 2)
    study.manifest["report"] = report.outputs[1]  # relative to the study folder
    study.merge_stage_records()


def prepare_study(
    config: StudyConfig,
    out: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    run: Mapping[str, Any] | None = None,
) -> None:
    """Check or start the manifest of a study in ``out`` (refusing a folder that holds other settings, or one with
    a job still queued or running: :func:`neuralign.study.jobs.refuse_live_jobs`) and record this run in it, with
    the entries of ``run`` (e.g. the executor and the jobs' resources); done once by the process that runs or
    submits the stages, before any of them."""
    _prepare(config, Path(out), torch.device(device), None, run=run)


def check_study_folder(config: StudyConfig, out: str | os.PathLike) -> None:
    """Refuse, writing nothing, a folder ``out`` that holds a study with other settings than ``config`` (the check
    :func:`prepare_study` makes before it records a run).

    Raises
    ------
    CheckpointError
        Naming the settings that differ.
    """
    if Path(out).is_dir():
        _recorded_study(config, Path(out))


def _recorded_study(config: StudyConfig, out: Path) -> dict[str, Any] | None:
    """The manifest of the study in ``out`` under the one run-folder policy
    (:class:`~neuralign.experiments.runfolder.RunFolder`, the study's settings as its options), or None for a
    folder to start afresh; a study with other settings is refused (:class:`CheckpointError`)."""
    folder = RunFolder(out, key="config", normalize=lambda c: StudyConfig.from_dict(c).to_dict())
    manifest = folder.manifest()
    if manifest is not None and not manifest.get("completed") and not any(p != folder.path for p in out.iterdir()):
        return None  # a study that stopped before any stage (e.g. on a setting error) starts afresh
    # settings added after the folder was written take their defaults (which reproduce the older behaviour); a flat
    # configuration of before 0.2 is read as such
    return folder.refuse_other_settings(config.to_dict(), "a study")


def _prepare(
    config: StudyConfig,
    out: Path,
    device: torch.device,
    progress: Progress | None,
    *,
    run: Mapping[str, Any] | None = None,
    live_jobs: bool = False,
) -> _Study:
    if out.is_dir() and not live_jobs:  # no run in this process while a job of this folder is queued or running
        refuse_live_jobs(out, study_stages(config))
    out.mkdir(parents=True, exist_ok=True)
    study = _Study(config, out, device, progress)
    study.check_manifest()
    study.manifest["runs"][-1].update(run or {})
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
    :func:`run_stage` work as the jobs of :mod:`neuralign.study.executors`); then the report is written.

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
        The paper's Table 1 numbers to print beside the result (see :mod:`neuralign.study.report`).
    notes : str, optional
        Free markdown added to the report.

    Returns
    -------
    dict
        The ``results`` written to ``results.json`` (format documented in :mod:`neuralign.study.report`).

    Raises
    ------
    JobError
        While a job of ``out`` (``--executor local|slurm``, listed in ``jobs.json``) is queued or running.
    """
    out = Path(out)
    results: dict[str, Any] = {}
    stages = study_stages(config)
    with first_run(out, stages):  # a first run that fails before any stage leaves no manifest
        study = _prepare(config, out, torch.device(device), progress)
        for stage in stages:
            if stage.name == "report":
                results = study.report(paper_row=paper_row, notes=notes)
                _finish_manifest(study, stage)
            elif not stage_done(out, stage):
                study.run(stage, {})
                study.merge_stage_records()
    return results

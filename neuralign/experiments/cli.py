"""The ``neuralign`` command line: demo, train, align, apply, curve, pam, verify, evaluate, study.

Every command writes its results into ``--out`` (atomically; long loops checkpoint every epoch and a rerun of the
same command resumes), shows progress bars on standard error, and ends by printing the paths it wrote. Launched
with ``torchrun --nproc_per_node=N -m neuralign <command>`` it joins the process group (NCCL for a CUDA
``--device``, gloo for the CPU) and runs data-parallel; rank 0 alone writes files, shows progress and prints. Errors,
including I/O failures such as a full disk (which leave the previous checkpoint in place), are one line on standard
error and exit status 2.

Why one module: every command shares one argparse tree, its option groups, the checkpoint and manifest
helpers, the skip/resume policy and the one-line error translation; split by command, each file would
repeat them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from neuralign import _distributed
from neuralign._utils import atomic_save, atomic_write_text, load_checkpoint
from neuralign.errors import CheckpointError, NeuralignError

__all__ = ["main", "build_parser"]

# ------------------------------------------------------------------------------------------------ progress
class _Bars:
    """tqdm progress bars keyed by stage and label, fed by the library's progress events.

    An event ``{"stage", "label", "step", "total", "record"}`` moves the bar ``"<stage>: <label>"`` to ``step``
    (steps done) and shows the record's loss or accuracy; a bar closes when it reaches ``total``. A bar's clock
    starts at its first event with ``"start": True`` (sent before the work begins, with ``step`` the steps already
    done by a resumed run), or else at the previous event, so that its rate and ETA count the first step's time.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict[str, Any] = {}
        self.mark = time.time()

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        key = f"{event.get('stage', '')}: {event.get('label', '')}"
        total = event.get("total")
        step = event.get("step", 0)
        bar = self.bars.get(key)
        if bar is None:
            initial = step if event.get("start") else 0
            bar = self.bars[key] = tqdm(total=total, desc=key, unit="step", leave=True, file=sys.stderr,
                                        dynamic_ncols=True, smoothing=0, initial=initial)  # fmt: skip
            if not event.get("start"):  # the work began before its first event: count from the previous one
                bar.start_t = bar.last_print_t = self.mark
        if total is not None and bar.total != total:  # a bar opened before its work knew its size
            bar.total = total
        record = event.get("record") or {}
        shown = {k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "train_loss", "accuracy", "test_accuracy")
                 and isinstance(v, float)}  # fmt: skip
        if shown:  # before the update, so that the line drawn for this step shows this step's numbers
            bar.set_postfix(shown, refresh=False)
        if step > bar.n:
            bar.update(step - bar.n)
        if total is not None and step >= total:
            bar.close()
            del self.bars[key]
        self.mark = time.time()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


# ------------------------------------------------------------------------------------------------ helpers
def _usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or Slurm's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _version() -> str:
    import neuralign

    return neuralign.__version__


def _info(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (under torchrun every rank runs the command; one report is enough)."""
    if _distributed.rank() == 0:
        print(*args, **kwargs)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name}: {_one_line(exc)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "," in text:
        return tuple(_parse_value(t) for t in text.split(",") if t)
    return text


def _overrides(pairs: Sequence[str], *, option: str = "--set") -> dict[str, Any]:
    out = {}
    for item in pairs or ():
        if "=" not in item:
            raise ValueError(f"{option} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return out


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{option} expects comma-separated numbers, got {text!r}") from None


def _data(args: argparse.Namespace):
    from neuralign.experiments.data import load_data

    data = load_data(
        args.data, root=args.data_root, download=args.download, batch_size=args.batch_size,
        train_size=args.train_size, test_size=args.test_size, align_size=args.align_size, resize=args.resize,
        generator=args.seed, mean=_floats(args.mean, "--mean"), std=_floats(args.std, "--std"),
    )  # fmt: skip
    _write_manifest(args, data=data.describe())
    return data


def _model_args(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = _overrides(getattr(args, "model_arg", None) or (), option="--model-arg")
    reserved = {"num_classes": "--num-classes", "seed": "--seed", "weights": None, "pretrained": None}
    for key in kwargs.keys() & reserved.keys():
        instead = reserved[key]
        raise ValueError(f"--model-arg {key}=... is not a builder argument here: " + (
            f"use {instead}" if instead else "neuralign builds models without downloaded weights; load a checkpoint "
            "with --model-a/--model-b instead"))  # fmt: skip
    return kwargs


def _load_model(path: str, args: argparse.Namespace, num_classes: int | None) -> tuple[torch.nn.Module, dict]:
    from neuralign.experiments.checkpoints import load_endpoint

    model, meta = load_endpoint(path, arch=args.arch, num_classes=args.num_classes or num_classes,
                                model_kwargs=_model_args(args))  # fmt: skip
    if meta["note"]:
        _info(f"neuralign: {meta['note']}", file=sys.stderr)
    return model, meta


def _endpoints(args: argparse.Namespace, device: torch.device, data=None):
    num_classes = data.num_classes if data is not None else None
    a, meta_a = _load_model(args.model_a, args, num_classes)
    b, meta_b = _load_model(args.model_b, args, num_classes)
    if meta_a["arch"].lower() != meta_b["arch"].lower():
        raise ValueError(f"--model-a is a {meta_a['arch']} but --model-b is a {meta_b['arch']}")
    return a.to(device), b.to(device), meta_a, meta_b


def _load_alignment(path: str, meta_a: dict, meta_b: dict, sd_b: dict[str, torch.Tensor]):
    """The permutation file at ``path``, refused if it was made for another architecture or pair."""
    from neuralign.alignment import load_permutation_file

    record = load_permutation_file(path)
    record.check_pair(arch=meta_a["arch"], model_b=sd_b, hash_a=meta_a["hash"], hash_b=meta_b["hash"])
    return record


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def _params(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = {k for k, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k in names}


def _finished(what: str, path: Path, args: argparse.Namespace, options: dict[str, Any],
              recorded: dict[str, Any] | None, leftovers: Sequence[Path] = ()) -> bool:
    """Whether ``path`` (the final output of ``what``) is already there and is kept: then one line says so.

    With ``--force`` the output and its ``leftovers`` (checkpoints) are removed so that the command starts over. An
    output made with other options than ``options`` (those it ``recorded``) is refused in one line.
    """
    if args.force:
        for stale in (path, *leftovers):
            stale.unlink(missing_ok=True)
            stale.with_name(stale.name + ".options.json").unlink(missing_ok=True)
        return False
    if not path.exists():
        return False
    changes = _describe_changes(recorded, options) if recorded is not None else None
    if changes:
        raise ValueError(f"{path} was made with other options: {changes}; --force redoes it, or choose another --out")
    _info(f"{what} already done: {path}; --force redoes it", file=sys.stderr)
    return True


def _check_image_size(model: torch.nn.Module, data, args: argparse.Namespace) -> None:
    """Refuse, in one line, data whose images the architecture cannot take (e.g. 8x8 digits for TinyTen)."""
    from neuralign.experiments.models import smallest_input_size

    h, w = data.image_size
    need = smallest_input_size(model, data.in_channels, (h, w))
    if need is None:
        return
    if need == 0:
        first = next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
        if first is not None and first.in_channels != data.in_channels:
            raise ValueError(f"--arch {args.arch} takes {first.in_channels}-channel images but --data {args.data} has "
                             f"{data.in_channels} channel(s); choose a dataset or architecture that match")  # fmt: skip
        raise ValueError(f"--arch {args.arch} cannot take the {h}x{w} images of --data {args.data} at any size up "
                         "to 256; choose another --arch")  # fmt: skip
    raise ValueError(f"--arch {args.arch} needs images of at least {need}x{need} but --data {args.data} has {h}x{w}; "
                     f"add --resize {need} (or larger) to resize them")  # fmt: skip


def _announce_resume(what: str, checkpoint: Path, key: str, total: int, unit: str = "epoch") -> int:
    """One line when ``what`` resumes from ``checkpoint`` (whose ``key`` counts the finished epochs); returns the
    number of finished epochs (0 without a checkpoint)."""
    if not checkpoint.exists():
        return 0
    done = load_checkpoint(checkpoint).get(key)
    if key == "pam":
        done = done.get("n_iter") if isinstance(done, dict) else None
    done = int(done or 0)
    _info(f"resuming {what} from {unit} {done} of {total} ({checkpoint})", file=sys.stderr)
    return done


_DATA_OPTIONS = ("data", "resize", "train_size", "test_size", "align_size", "batch_size", "mean", "std")


def _options(args: argparse.Namespace, *names: str, files: Sequence[str] = ()) -> dict[str, Any]:
    """The options that make a result (those of the data included), and for each option in ``files`` that names an
    input file, a fingerprint of its content (so that a result of other inputs at the same paths is not taken for
    this one)."""
    options = {name: getattr(args, name, None) for name in (*names, *_DATA_OPTIONS)}
    for name in files:
        path = getattr(args, name, None)
        if path is not None and Path(path).is_file():
            options[f"{name}#content"] = _file_digest(Path(path))
    return options


def _file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _describe_changes(recorded: dict[str, Any], options: dict[str, Any]) -> str | None:
    """The options whose value differs from the ``recorded`` ones, in command-line words (None if none)."""
    differ = [k for k, v in options.items() if k in recorded and recorded[k] != v]
    if not differ:
        return None
    return ", ".join(
        f"the content of --{k[: -len('#content')].replace('_', '-')}" if k.endswith("#content")
        else f"--{k.replace('_', '-')} {recorded[k]!r} (now {options[k]!r})"
        for k in differ
    )  # fmt: skip


def _resume_guard(what: str, checkpoint: Path, options: dict[str, Any]) -> Path:
    """Refuse to resume ``checkpoint`` when it was started with other options (one line), then record ``options``
    beside it for the next resume; returns that record's path (removed once the result is written)."""
    record = checkpoint.with_name(checkpoint.name + ".options.json")
    if checkpoint.exists() and record.exists():
        changes = _describe_changes(json.loads(record.read_text()), options)
        if changes:
            raise ValueError(f"{checkpoint} holds an interrupted {what} started with other options: {changes}; "
                             "--force starts over, or rerun with the same options to resume it")  # fmt: skip
    return atomic_write_text(record, json.dumps(options, default=str))


# ------------------------------------------------------------------------------------------------ commands
def _cmd_study(args: argparse.Namespace, bars: _Bars, *, demo: bool = False) -> list[Path]:
    from neuralign.experiments.report import dataset_label, paper_row
    from neuralign.experiments.study import PRESETS, run_study

    if not demo and args.status is not None:
        _print_status(args.status)
        return []

    config = PRESETS["demo" if demo else args.preset]
    overrides: dict[str, Any] = {}
    if not demo:
        if args.endpoints:
            overrides["endpoints"] = tuple(args.endpoints)
            overrides.setdefault("pairs", len(args.endpoints) // 2)
        for key in ("arch", "pairs", "epochs", "curve_epochs", "num_points", "train_size", "test_size", "align_size",
                    "resize", "bn_batches", "width", "batch_size"):  # fmt: skip
            value = getattr(args, key, None)
            if value is not None:
                overrides[key] = value
        if args.data is not None:
            overrides["dataset"] = args.data
        if args.data_root is not None:
            overrides["data_root"] = args.data_root
        if args.download:
            overrides["download"] = True
        if args.num_classes is not None:
            overrides["num_classes"] = args.num_classes
        if args.model_arg:
            overrides["model_args"] = _model_args(args)
        for key in ("mean", "std"):
            if getattr(args, key) is not None:
                overrides[key] = _floats(getattr(args, key), f"--{key}")
    overrides["seed"] = args.seed
    overrides.update(_overrides(args.set))
    config = config.replace(**overrides)
    # Table 1 is about standard curves: no reference row beside a robust study
    row = None if config.robust else paper_row(config.arch, dataset_label(config.dataset))
    executor = "sequential" if demo else args.executor
    out = Path(args.out)
    if executor == "sequential":
        results = run_study(config, args.out, device=_device(args.device), progress=bars, paper_row=row)
    elif executor == "local":
        from neuralign.experiments.cluster import run_study_local

        def on_event(stage: str, event: str, job_id: str) -> None:
            if not args.quiet:
                print(f"{stage}: {event} (job {job_id})", file=sys.stderr)

        results = run_study_local(config, out, jobs=args.jobs, device=_device(args.device), paper_row=row,
                                  on_event=on_event)  # fmt: skip
    else:
        from neuralign.experiments.cluster import submit_study_slurm

        if args.device == "auto":
            raise ValueError("--executor slurm needs --device cuda or --device cpu: auto would be resolved on this "
                             "machine, not on the compute nodes")  # fmt: skip
        jobs = submit_study_slurm(config, out, device=args.device, partition=args.slurm_partition,
                                  time_minutes=args.slurm_time, gpus_per_job=args.gpus_per_job, paper_row=row)
        for stage, job_id in jobs.items():
            print(f"{stage}: Slurm job {job_id}", file=sys.stderr)
        print(f"submitted {len(jobs)} jobs; follow them with: neuralign study --status {out}", file=sys.stderr)
        return [out / "jobs.json"]
    bars.close()
    if (out / "manifest.json").exists() and _distributed.rank() == 0:
        print(_stage_times(out / "manifest.json"), file=sys.stderr)
    return [Path(results["report"]), out / "results.json"]


def _print_status(out: str) -> None:
    from neuralign.experiments.cluster import study_status

    status = study_status(out)
    hints = {
        "blocked": "these Slurm jobs wait on a failed job and can never start: cancel them (scancel {ids}), or rerun "
                   "the study, which cancels them and resubmits",
        "failed": "these stages' jobs ended without their outputs (see the logs under {out}/jobs/); rerun the study "
                  "to run them again",
        "unknown": "squeue is not on PATH: whether these Slurm jobs are alive cannot be told from this machine",
    }  # fmt: skip
    for state in ("done", "running", "pending", "blocked", "failed", "unknown"):
        entries = status[state]
        if not entries and state in hints:
            continue
        print(f"{state} ({len(entries)}):")
        for stage, job in entries:
            print(f"  {stage}" + (f"  [job {job}]" if job else ""))
        if state in hints:
            print("  -> " + hints[state].format(ids=" ".join(job for _, job in entries if job), out=out))


def _stage_times(manifest_path: Path) -> str:
    """The seconds of every stage of the study (recorded in its manifest), as a table with the total."""
    seconds = json.loads(manifest_path.read_text()).get("stage_seconds", {})
    rows = [(stage, f"{s:.1f}") for stage, s in seconds.items()]
    return "time per stage (s):\n" + _table(["stage", "seconds"], [*rows, ("total", f"{sum(seconds.values()):.1f}")])


def _cmd_train(args: argparse.Namespace, bars: _Bars) -> list[Path]:
    from neuralign.curves import evaluate_model
    from neuralign.experiments.models import build_model
    from neuralign.experiments.study import StudyConfig, _model_kwargs
    from neuralign.experiments.training import train_model

    device = _device(args.device)
    out = Path(args.out)
    path = out / f"{args.arch}_seed{args.seed}.pt"
    options = _options(args, "arch", "width", "seed", "epochs", "lr", "weight_decay", "model_arg", "num_classes")
    recorded = load_checkpoint(path, kind="endpoint").get("options") if path.exists() and not args.force else None
    if _finished("train", path, args, options, recorded, leftovers=[path.with_suffix(".ckpt")]):
        return [path]
    data = _data(args)
    config = StudyConfig(arch=args.arch, width=args.width)
    kwargs = {**_model_kwargs(config, data), **_model_args(args)}
    model = build_model(args.arch, data.num_classes, seed=args.seed, **kwargs).to(device)
    _check_image_size(model, data, args)
    guard = _resume_guard("train", path.with_suffix(".ckpt"), options)
    done = _announce_resume("train", path.with_suffix(".ckpt"), "epoch", args.epochs)
    bars({"stage": "train", "label": path.stem, "step": done, "total": args.epochs, "start": True})

    def on_epoch(record):
        bars({"stage": "train", "label": path.stem, "step": record["epoch"], "total": args.epochs, "record": record})

    res = train_model(model, data.train, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                      checkpoint=path.with_suffix(".ckpt"), callback=on_epoch)  # fmt: skip
    model.load_state_dict(res.state_dict)
    test_loss, test_acc = evaluate_model(model.eval(), data.test)
    atomic_save({
        "kind": "endpoint", "arch": args.arch, "num_classes": data.num_classes, "model_kwargs": kwargs,
        "seed": args.seed, "history": res.history, "test": {"test_loss": test_loss, "test_acc": test_acc},
        "dataset": data.describe(), "options": options,
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
    }, path)  # fmt: skip
    path.with_suffix(".ckpt").unlink(missing_ok=True)
    guard.unlink(missing_ok=True)
    _info(f"test accuracy {test_acc:.4f}, loss {test_loss:.4f}", file=sys.stderr)
    return [path]


def _alignment_record(res, meta_a: dict, meta_b: dict, *, method: str, settings: dict[str, Any]):
    from neuralign.alignment import PermutationFile

    return PermutationFile(
        perms={g: p.cpu() for g, p in res.perms.items()}, spec=res.spec, method=method, settings=settings,
        model_a={"hash": meta_a["hash"], "source": meta_a["path"], "layout": meta_a["layout"]},
        model_b={"hash": meta_b["hash"], "source": meta_b["path"], "layout": meta_b["layout"]}, arch=meta_a["arch"],
        results={"correlation_before": getattr(res, "correlation_before", {}),
                 "correlation_after": getattr(res, "correlation_after", {})},
    )  # fmt: skip


def _export_aligned(model_b: str, record, out: str) -> Path:
    """Write the weights of the file ``model_b`` permuted by ``record`` to ``out``, in the input's layout."""
    from neuralign.alignment import apply_permutation, state_dict_hash
    from neuralign.experiments.checkpoints import read_weights, write_weights

    if Path(out).resolve() == Path(model_b).resolve():
        raise ValueError(f"the aligned weights would overwrite the input {model_b}; write them to another file")
    weights = read_weights(model_b)
    if weights.note:
        _info(f"neuralign: {weights.note}", file=sys.stderr)
    record.check_pair(model_b=weights.state_dict, hash_b=state_dict_hash(weights.state_dict))
    aligned = apply_permutation(weights.state_dict, record.spec, record.perms)
    metadata = {"neuralign_aligned_to": str(record.model_a.get("hash")), "neuralign_permutation": record.path,
                "neuralign_method": record.method}  # fmt: skip
    return write_weights(out, aligned, like=weights, metadata=metadata)


def _cmd_align(args: argparse.Namespace, bars: _Bars) -> list[Path]:
    from neuralign.alignment import align, save_permutation_file
    from neuralign.experiments.checkpoints import WEIGHT_SUFFIXES

    if args.export is not None and Path(args.export).suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"--export must end in one of {list(WEIGHT_SUFFIXES)}, got {args.export!r}")
    device = _device(args.device)
    data = _data(args)
    a, b, meta_a, meta_b = _endpoints(args, device, data)
    total = len(data.align)

    def on_batch(n: int) -> None:
        bars({"stage": "align", "label": args.method, "step": n, "total": total})

    bars({"stage": "align", "label": args.method, "step": 0, "total": total, "start": True})
    loader = data.align if args.method != "weight" else None
    example = next(iter(data.train))[0][:2].to(device)
    res = align(a, b, loader, method=args.method, example_input=example, callback=on_batch)
    out = Path(args.out)
    settings = {"data": data.describe()["name"], "align_images": len(data.align.dataset), "seed": args.seed}
    record = _alignment_record(res, meta_a, meta_b, method=res.method, settings=settings)
    p1 = save_permutation_file(out / "alignment.pt", record)
    record = dataclasses.replace(record, path=str(p1))
    summary = {k: v for k, v in record.header().items() if k not in ("spec", "results")}
    summary.update(record.results, sizes=res.spec.sizes, objective_before=res.objective_before,
                   objective_after=res.objective_after, message=res.message)  # fmt: skip
    p2 = atomic_write_text(out / "alignment.json", json.dumps(summary, indent=1))
    print(_alignment_table(res), file=sys.stderr)
    paths = [p1, p2]
    if args.export:
        paths.append(_export_aligned(args.model_b, record, args.export))
    return paths


def _cmd_apply(args: argparse.Namespace, bars: _Bars) -> list[Path]:
    from neuralign.alignment import load_permutation_file

    record = load_permutation_file(args.perms)
    if args.arch is not None:
        record.check_pair(arch=args.arch)
    return [_export_aligned(args.model, record, args.out)]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, columns right-aligned except the first."""
    cells = [list(header), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    fmt = [(str.ljust if i == 0 else str.rjust) for i in range(len(header))]
    return "\n".join("  ".join(f(c, w) for f, c, w in zip(fmt, row, widths)) for row in cells)


def _alignment_table(res) -> str:
    """Per group: units, mean correlation of matched units before and after alignment (or the weight objective)."""
    if res.correlation_before:
        header = ["group", "units", "corr before", "corr after"]
        values = [(res.correlation_before.get(g, float("nan")), res.correlation_after.get(g, float("nan")))
                  for g in res.spec.groups]  # fmt: skip
    else:
        header = ["group", "units", "objective before", "objective after"]
        values = [(res.objective_before.get(g, float("nan")), res.objective_after.get(g, float("nan")))
                  for g in res.spec.groups]  # fmt: skip
    rows = [[g, str(res.spec.sizes[g]), f"{before:.4f}", f"{after:.4f}"]
            for g, (before, after) in zip(res.spec.groups, values)]  # fmt: skip
    return _table(header, rows)


def _pam_table(res) -> str:
    """Per outer iteration: the monitored objective and the units reassigned (in all groups)."""
    rows = [["0 (start)", f"{res.history[0]:.6g}", "", ""]]
    total = sum(res.spec.sizes.values())
    for k, fun in enumerate(res.history[1:], start=1):
        moved = sum(c[k - 1] for c in res.changed.values() if len(c) >= k)
        back = str(res.backtracks[k - 1]) if len(res.backtracks) >= k else ""
        rows.append([str(k), f"{fun:.6g}", f"{moved}/{total}", back])
    return _table(["iteration", "objective", "units changed", "backtracks"], rows) + f"\n{res.message}"


def _optimizer(lr: float):
    def make(params):
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)

    return make


def _cmd_curve(args: argparse.Namespace, bars: _Bars) -> list[Path]:
    from neuralign.alignment import apply_permutation
    from neuralign.curves import fit_curve
    from neuralign.experiments.checkpoints import WEIGHT_SUFFIXES

    device = _device(args.device)
    out = Path(args.out)
    if args.export_point is not None:
        if out.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"with --export-point, --out is the weight file to write and must end in one of "
                             f"{list(WEIGHT_SUFFIXES)}, got {args.out!r}")  # fmt: skip
        if not 0.0 <= args.export_point <= 1.0:
            raise ValueError(f"--export-point must be in [0, 1], got {args.export_point}")
        folder = out.parent
    else:
        if args.source is not None:
            raise ValueError("--from needs --export-point (a curve read from a file is only exported)")
        folder = out
    options = _options(args, "model_a", "model_b", "perms", "curve", "epochs", "lr", "weight_decay", "seed",
                       files=("model_a", "model_b", "perms"))  # fmt: skip
    fitted = False
    if args.source is None:
        recorded = None
        if (folder / "curve.json").exists() and (folder / "curve.pt").exists() and not args.force:
            recorded = json.loads((folder / "curve.json").read_text()).get("options")
        fitted = _finished("curve", folder / "curve.pt", args, options, recorded, leftovers=[folder / "curve.ckpt"])
        if fitted and args.export_point is None:
            return [folder / "curve.pt", folder / "curve.json"]
    data = _data(args)
    a, b, meta_a, meta_b = _endpoints(args, device, data)
    sd_b = _state(b)
    if args.perms:
        record = _load_alignment(args.perms, meta_a, meta_b, sd_b)
        sd_b = apply_permutation(sd_b, record.spec.restrict(sd_b), record.perms)
    if args.source is not None or fitted:
        source = args.source if args.source is not None else folder / "curve.pt"
        curve = _read_curve(source).to(device)
        _check_curve_ends(curve, _params(a, _state(a)), _params(a, sd_b), source, bool(args.perms))
        paths: list[Path] = [] if args.source is not None else [folder / "curve.pt", folder / "curve.json"]
    else:
        guard = _resume_guard("curve", folder / "curve.ckpt", options)
        done = _announce_resume("curve", folder / "curve.ckpt", "epoch", args.epochs)
        bars({"stage": "curve", "label": args.curve, "step": done, "total": args.epochs, "start": True})

        def on_epoch(record):
            bars({"stage": "curve", "label": args.curve, "step": record["epoch"] + 1, "total": args.epochs,
                  "record": record})  # fmt: skip

        res = fit_curve(a, _params(a, _state(a)), _params(a, sd_b), data.train, curve=args.curve,
                        epochs=args.epochs, optimizer=_optimizer(args.lr), weight_decay=args.weight_decay,
                        generator=args.seed, callback=on_epoch, checkpoint=folder / "curve.ckpt")  # fmt: skip
        curve = res.curve
        history = json.dumps({"history": res.history, "message": res.message, "options": options}, indent=1)
        p2 = atomic_write_text(folder / "curve.json", history)
        curve.save(folder / "curve.pt")  # last: its presence marks the command as done
        (folder / "curve.ckpt").unlink(missing_ok=True)
        guard.unlink(missing_ok=True)
        paths = [folder / "curve.pt", p2]
    if args.export_point is not None:
        paths.append(_export_point(a, curve, args.export_point, data, args.bn_batches, out))
    return paths


def _check_curve_ends(curve, point_a: dict, point_b: dict, source, aligned: bool) -> None:
    """Refuse, in one line, a curve whose ends are not the given end points (exactly: fitting keeps them fixed)."""
    for t, point, what in ((0.0, point_a, "--model-a"), (1.0, point_b, "--model-b" + (" aligned by --perms" if
                                                                                      aligned else ""))):  # fmt: skip
        ends = curve(t)
        if set(ends) != set(point) or any(not torch.equal(ends[k].detach().cpu(), point[k].detach().cpu())
                                          for k in point):  # fmt: skip
            raise ValueError(f"{source} was fitted between other end points: its t={t:g} is not {what}")


def _read_curve(path: str):
    from neuralign.curves.families import CURVE_FAMILIES

    state = load_checkpoint(path, kind="curve", required=("family",))
    family = CURVE_FAMILIES.get(state["family"])
    if family is None:
        raise CheckpointError(f"{path}: unknown curve family {state['family']!r}")
    return family.load(path)


def _export_point(model: torch.nn.Module, curve, t: float, data, bn_batches: int | None, out: Path) -> Path:
    """Write the network at ``t`` of ``curve`` (batch-norm statistics re-estimated on ``data.train``) to ``out``."""
    from neuralign.curves import reestimate_bn
    from neuralign.experiments.checkpoints import write_weights

    params = {k: v.detach() for k, v in curve(t).items()}
    buffers = reestimate_bn(model, params, data.train, max_batches=bn_batches)
    order = list(model.state_dict())
    state = {**params, **buffers}
    missing = [k for k in order if k not in state]
    if missing:
        raise CheckpointError(f"the curve lacks the entries {missing[:3]} of the model")
    return write_weights(out, {k: state[k] for k in order}, metadata={"neuralign_curve_t": repr(t)})


# fit_curve_pam's defaults of the options `neuralign pam` gained later (None: PAM's own)
_PAM_STEP_DEFAULTS = {"max_moved": None, "p_steps": 1, "birkhoff_steps": 20, "birkhoff_lr": None,
                      "birkhoff_samples": 32, "gradient_batches": None, "value_batches": 8}  # fmt: skip


def _cmd_pam(args: argparse.Namespace, bars: _Bars) -> list[Path]:
    from neuralign.alignment import save_permutation_file
    from neuralign.curves import fit_curve_pam

    device = _device(args.device)
    out = Path(args.out)
    # the P-step schedule's options, each only with its method (given at all with the other one: refused)
    own = {"linearized": ("max_moved", "p_steps"), "birkhoff": ("birkhoff_steps", "birkhoff_lr", "birkhoff_samples")}
    for method, names in own.items():
        given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]
        if method != args.method and given:
            raise ValueError(f"{', '.join(given)} apply to --method {method}, not {args.method}")
    for name, default in _PAM_STEP_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    step = {n: getattr(args, n) for n in own[args.method]}
    options = _options(args, "model_a", "model_b", "init", "method", "lam", "iters", "epochs", "local_search", "lr",
                       "weight_decay", "seed", "max_moved", "p_steps", "birkhoff_steps", "birkhoff_lr",
                       "birkhoff_samples", "gradient_batches", "value_batches",
                       files=("model_a", "model_b", "init"))  # fmt: skip
    recorded = None
    if (out / "pam.json").exists() and not args.force:
        # a record from before an option existed ran with its default
        recorded = {**_PAM_STEP_DEFAULTS, **json.loads((out / "pam.json").read_text()).get("options", {})}
    ckpt = out / "pam.ckpt"
    leftovers = [out / "curve.pt", out / "perms.pt", ckpt, ckpt.with_name(ckpt.name + ".xstep")]
    if _finished("pam", out / "pam.json", args, options, recorded, leftovers=leftovers):
        return [out / "curve.pt", out / "perms.pt", out / "pam.json"]
    data = _data(args)
    a, b, meta_a, meta_b = _endpoints(args, device, data)
    init: Any = args.init
    if init not in ("identity", "alignment"):
        init = _load_alignment(init, meta_a, meta_b, _state(b)).perms
    total = args.iters * args.epochs
    guard = _resume_guard("pam", ckpt, options)
    done = _announce_resume("pam", ckpt, "pam", args.iters, unit="iteration")
    bars({"stage": "pam", "label": str(args.init), "step": done * args.epochs, "total": total, "start": True})

    def on_event(record):
        if record["stage"] == "x-epoch":
            step = (record["iteration"] - 1) * args.epochs + record["epoch"] + 1
            bars({"stage": "pam", "label": str(args.init), "step": step, "total": total, "record": record})

    res = fit_curve_pam(
        a, _state(a), _state(b), data.train, init=init, align_loader=data.align, method=args.method, lam=args.lam,
        max_iter=args.iters, x_epochs=args.epochs, optimizer=_optimizer(args.lr), weight_decay=args.weight_decay,
        value_loader=data.train_eval, local_search=args.local_search, generator=args.seed, callback=on_event,
        checkpoint=out / "pam.ckpt", gradient_batches=args.gradient_batches, value_batches=args.value_batches,
        **step,
    )  # fmt: skip
    res.curve.save(out / "curve.pt")
    settings = {"lam": args.lam, "iters": args.iters, "epochs": args.epochs, "init": str(args.init),
                "local_search": args.local_search, "seed": args.seed, "gradient_batches": args.gradient_batches,
                "value_batches": args.value_batches, **step}  # fmt: skip
    record = _alignment_record(res, meta_a, meta_b, method=f"pam-{args.method}", settings=settings)
    p2 = save_permutation_file(out / "perms.pt", record)
    summary = {"objective": res.history, "changed": res.changed, "backtracks": res.backtracks,
               "status": res.status, "message": res.message, "curve_history": res.curve_history,
               "options": options}  # fmt: skip
    p3 = atomic_write_text(out / "pam.json", json.dumps(summary, indent=1, default=str))  # last: marks it done
    ckpt.unlink(missing_ok=True)
    guard.unlink(missing_ok=True)
    print(_pam_table(res), file=sys.stderr)
    return [out / "curve.pt", p2, p3]


def _seconds_per_pass(model: torch.nn.Module, data, device: torch.device) -> tuple[float, int]:
    """Seconds of one forward pass of a training batch through ``model`` (eval mode, no gradients; the best of 3
    after one warm-up) and the batch size. The model is not changed."""
    x = next(iter(data.train))[0].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError as exc:
        model.train(was_training)
        raise ValueError(f"the model cannot run on the images of --data (shape {tuple(x.shape)}): "
                         f"{_one_line(exc)}") from None  # fmt: skip
    times = []
    with torch.no_grad():
        for _ in range(4):
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    model.train(was_training)
    return min(times[1:]), int(x.shape[0])


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _announce_cost(what: str, passes: int, detail: str, model: torch.nn.Module, data, device) -> None:
    """One line before a long command starts: its forward passes (a backward pass counted as two) and the time
    they take at one measured pass."""
    per, batch = _seconds_per_pass(model, data, device)
    _info(f"{what}: about {passes:,} forward passes of batch {batch} ({detail}) at {1000 * per:.0f} ms each "
          f"(measured): expect about {_duration(passes * per)}; see --help for cheaper settings", file=sys.stderr)


def _cmd_evaluate(args: argparse.Namespace, bars: _Bars) -> list[Path]:
    from neuralign.curves import evaluate_curve

    device = _device(args.device)
    data = _data(args)
    model, _ = _load_model(args.model_a, args, data.num_classes)
    model = model.to(device)
    curve = _read_curve(args.curve).to(device)

    def on_point(record):
        bars({"stage": "evaluate", "label": Path(args.curve).stem, "step": record["index"] + 1,
              "total": args.num_points})  # fmt: skip

    bn = len(data.train) if args.bn_batches is None else min(args.bn_batches, len(data.train))
    _announce_cost("evaluate", args.num_points * (bn + len(data.test)),
                   f"{args.num_points} points x ({bn} batch-norm + {len(data.test)} test batches)", model, data,
                   device)  # fmt: skip
    bars({"stage": "evaluate", "label": Path(args.curve).stem, "step": 0, "total": args.num_points, "start": True})
    ev = evaluate_curve(model, curve, data.train, data.test, num_points=args.num_points,
                        max_bn_batches=args.bn_batches, callback=on_point)  # fmt: skip
    out = Path(args.out)
    p1 = atomic_write_text(out / "evaluation.json", json.dumps(ev.to_dict(), indent=1))
    _info(f"Avg accuracy {100 * ev.avg_accuracy:.2f}%, Min {100 * ev.min_accuracy:.2f}%, "
          f"loss barrier {ev.loss_barrier:.4f}", file=sys.stderr)  # fmt: skip
    return [p1]


def _verify_passes(args: argparse.Namespace, checks: Sequence[str], data, spec, fit: bool) -> tuple[int, str]:
    """The forward passes ``verify`` makes with its defaults of :func:`verify_alignment` (8 held-out batches at 3
    times per scored move, 8 certificate steps, 4 gradient batches, 3 PAM starts, 8 control swaps per group, every
    transposition screened on the 4 gradient batches at 3 times, 26 Taylor steps); a backward pass counts as two."""
    train, groups = len(data.train), len(spec.sizes)
    screened = sum(min(n * (n - 1) // 2, 128) for n in spec.sizes.values() if n * (n - 1) // 2 > args.swaps + 8)
    score = 8 * 3  # value_batches x len(value_ts): one scored move
    epoch = 3 * train  # a training epoch: forward and backward
    parts = {
        "curve fit": fit * args.fit_epochs * epoch,
        "stability": "stability" in checks and 3 * args.iters * (epoch + 3 * 4 * 3 + score * (1 + args.local_search
                                                                                             * groups)),
        "certificate": "certificate" in checks and 3 * 4 * 3 + groups * 8 * score,
        "neighbourhood": "neighbourhood" in checks and 3 * 4 * 3 + groups * (args.swaps + 8) * score + screened * 4 * 3,
        "gradient": "gradient" in checks and 3 * 4 * 3 + 26,
        "alignment": "alignment" in checks and 2 * len(data.align),
    }  # fmt: skip
    parts = {k: int(v) for k, v in parts.items() if v}
    return sum(parts.values()), ", ".join(f"{k} {v:,}" for k, v in parts.items())


def _check_label(name: str, checks: Sequence[str], prefix: str = "") -> str:
    """``"certificate (2/5)"``: the check and its place among the checks that run."""
    return f"{prefix}{name} ({list(checks).index(name) + 1}/{len(checks)})"


def _cmd_verify(args: argparse.Namespace, bars: _Bars) -> list[Path]:
    from neuralign.curves import Bezier
    from neuralign.experiments.plots import plot_reassignment
    from neuralign.verification import CHECKS, verify_alignment

    device = _device(args.device)
    data = _data(args)
    a, b, meta_a, meta_b = _endpoints(args, device, data)
    record = _load_alignment(args.perms, meta_a, meta_b, _state(b))
    perms = record.perms
    curve = Bezier.load(args.curve).to(device) if args.curve else None
    checks = tuple(args.checks) if args.checks else CHECKS

    passes, detail = _verify_passes(args, checks, data, record.spec, curve is None)
    _announce_cost("verify", passes, detail, a, data, device)

    def on_check(name):
        bars({"stage": "verify", "label": _check_label(name, checks), "step": 0, "total": None, "start": True})

    def on_progress(name, done, total):
        bars({"stage": "verify", "label": _check_label(name, checks), "step": done, "total": total})

    report = verify_alignment(
        a, _state(a), _state(b), perms, data.train, curve=curve, checks=checks, heldout_loader=data.train_eval,
        align_loader=data.align, fit_epochs=args.fit_epochs, lam=args.lam, stability_iters=args.iters,
        n_swaps=args.swaps, local_search=args.local_search, generator=args.seed, callback=on_check,
        progress=on_progress,
    )  # fmt: skip
    out = Path(args.out)
    paths = list(report.save(out))
    if "stability" in report.checks:
        paths.append(plot_reassignment(report.to_dict(), out / "reassignment.png"))
    _info(f"verdict: {report.verdict}", file=sys.stderr)
    return paths


# ------------------------------------------------------------------------------------------------ parser
def _add_common(p: argparse.ArgumentParser, *, out: str, out_help: str | None = None) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--out", default=out,
                   help=out_help or f"output folder (default: {out}); rerunning resumes from it")  # fmt: skip
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default: cpu)")
    g.add_argument("--seed", type=int, default=0, help="base seed of every random choice (default: 0)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, capped at the cores this process may use); on a "
                        "machine shared with other work, --threads 1 keeps idle threads from spinning")  # fmt: skip
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="log the library's progress messages")


def _add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="start over even if --out holds the finished result (without it, a rerun prints one line "
                        "and skips a finished result, and resumes an interrupted one from its checkpoint)")  # fmt: skip


def _add_data(p: argparse.ArgumentParser, *, required: bool = True, stats: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required, default=None,
                   help="dataset: cifar10, cifar100, mnist, tinyimagenet, digits (shipped), an .npz file with "
                        "x_train, y_train, x_test, y_test (uint8 images), or imagefolder:PATH (PATH/train/<class>/ "
                        "and PATH/val/<class>/ or PATH/test/<class>/ image files)")  # fmt: skip
    g.add_argument("--data-root", default=None, help="folder holding the torchvision dataset (or <name>.npz)")
    g.add_argument("--download", action="store_true", help="let torchvision download the dataset (needs network)")
    g.add_argument("--batch-size", type=int, default=128, help="training batch size (default: 128)")
    g.add_argument("--train-size", type=_parse_value, default=None,
                   help="use a subset of the training set: a count or a fraction (default: all)")  # fmt: skip
    g.add_argument("--test-size", type=_parse_value, default=None, help="subset of the test set (default: all)")
    g.add_argument("--align-size", type=_parse_value, default=None,
                   help="alignment images: the first N training images with test transforms (default: the first "
                        "10000, or all if fewer)")  # fmt: skip
    g.add_argument("--resize", type=int, default=None, help="resize images to this side length (imagefolder: "
                   "to this square size; default the most common size of a sample)")
    if stats:
        g.add_argument("--mean", default=None, help="normalisation means, comma-separated, one per channel "
                       "(default: the dataset's, or computed on the training images)")
        g.add_argument("--std", default=None, help="normalisation standard deviations, with --mean")


def _add_arch(p: argparse.ArgumentParser, *, checkpoints: bool) -> None:
    g = p.add_argument_group("architecture" + (" of plain checkpoints" if checkpoints else ""))
    g.add_argument("--arch", required=not checkpoints, default=None,
                   help="tinyten, resnet20, resnet32, vgg11, vgg16, googlenet, mlp, torchvision:<name> (any "
                        "torchvision.models builder, e.g. torchvision:resnet18) or timm:<name> (needs the extra "
                        "neuralign[timm])" + ("; needed for plain state dicts and .safetensors files, which do not "
                        "record it (end points of `neuralign train` do)" if checkpoints else ""))  # fmt: skip
    if checkpoints:
        g.add_argument("--num-classes", type=int, default=None,
                       help="classifier outputs of a plain checkpoint (default: the dataset's classes)")  # fmt: skip
    g.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="keyword argument of the model builder, repeatable (e.g. --model-arg width_per_group=32)")


def _add_pair(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-a", required=True,
                   help="end point A: a file of `neuralign train`, a plain state dict (.pt/.pth, also wrapped in "
                        "{'state_dict': ...} or {'model': ...} or with DDP's 'module.' prefix) or .safetensors")
    p.add_argument("--model-b", required=True, help="end point B, of the same architecture and in any such format")
    _add_arch(p, checkpoints=True)


def _study_settings() -> str:
    """The names of every study setting, read from :class:`StudyConfig` so that the help cannot drift from it."""
    import dataclasses

    from neuralign.experiments.study import StudyConfig

    return ", ".join(f.name for f in dataclasses.fields(StudyConfig))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``neuralign`` (also ``python -m neuralign``)."""
    parser = argparse.ArgumentParser(
        prog="neuralign",
        description="Neuron alignment and mode connectivity (Tatro et al., NeurIPS 2020): train networks, align "
        "them, fit curves between them (plain, aligned, PAM), verify the alignment and report.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the version of neuralign and exit")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="offline end-to-end study on the shipped digits (a few minutes on a CPU)",
                       description="Train two TinyTen networks on the shipped UCI digits (resized to 16x16), align "
                       "them, fit unaligned / PAM / aligned curves, verify the alignment and write a report with "
                       "figures. Ends with the path of the report.")  # fmt: skip
    _add_common(p, out="neuralign-demo")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a study setting, e.g. --set epochs=2 (see `neuralign study --help`)")  # fmt: skip

    p = sub.add_parser("study", help="the paper's Table 1 protocol at any scale",
                       description="Train or load 2 x pairs end points, align each pair, fit the four curves of "
                       "Table 1 (Unaligned, PAM Unaligned, PAM Aligned, Aligned), evaluate them along t with batch "
                       "norm re-estimated, verify the alignment, and write results.json, report.md and figures. "
                       "Presets: paper (the paper's settings, for GPUs), cpu (TinyTen on CIFAR-10 in about an hour "
                       "on 2 cores), demo; robust (adversarially trained end points, robust Unaligned and Aligned "
                       "curves, clean and robust accuracy along t; the paper's §4 settings, for GPUs) and "
                       "robust-cpu (MLPs on MNIST on 2 cores). Any setting can be overridden with --set KEY=VALUE "
                       "(settings: "
                       f"{_study_settings()}).")  # fmt: skip
    _add_common(p, out="neuralign-study")
    p.add_argument("--preset", choices=["paper", "cpu", "demo", "robust", "robust-cpu"], default="cpu",
                   help="starting settings (default: cpu)")
    p.add_argument("--arch", default=None, help="tinyten, resnet20, resnet32, vgg11, vgg16, googlenet, mlp, "
                   "torchvision:<name>, timm:<name>")
    p.add_argument("--pairs", type=int, default=None, help="number of end-point pairs")
    p.add_argument("--endpoints", nargs="+", default=None, metavar="FILE",
                   help="given end points instead of training: A1 B1 [A2 B2 ...] in any format `align` reads "
                        "(plain state dicts and .safetensors are read as --arch with the dataset's classes)")
    p.add_argument("--epochs", type=int, default=None, help="end-point training epochs")
    p.add_argument("--curve-epochs", type=int, default=None, help="curve (and PAM x-step) epochs")
    p.add_argument("--num-points", type=int, default=None, help="points along t for evaluation")
    p.add_argument("--bn-batches", type=int, default=None, help="batches per batch-norm re-estimation")
    p.add_argument("--width", type=float, default=None, help="width multiplier (ResNet, VGG)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any study setting")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the models' heads (default: the dataset's), e.g. for given end points")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="builder argument of --arch (repeatable), e.g. width_mult=0.5 for torchvision:mobilenet_v2")
    _add_data(p, required=False)
    for action in p._actions:  # the study's own defaults apply unless given
        if action.dest == "batch_size":
            action.default = None
    g = p.add_argument_group("running the stages as jobs (needs the cluster extra: pip install 'neuralign[cluster]')")
    g.add_argument("--executor", choices=["sequential", "local", "slurm"], default="sequential",
                   help="sequential: every stage in this process (default); local: up to --jobs stages at once as "
                        "local processes (one GPU each when there are several); slurm: every stage as a Slurm job, "
                        "with job dependencies between stages (returns once they are queued)")  # fmt: skip
    g.add_argument("--jobs", type=int, default=2, help="concurrent local jobs (default: 2)")
    g.add_argument("--slurm-partition", default=None, help="Slurm partition of the jobs")
    g.add_argument("--slurm-time", type=int, default=24 * 60, help="wall time of each Slurm job in minutes "
                   "(default: 1440)")  # fmt: skip
    g.add_argument("--gpus-per-job", type=int, default=1,
                   help="GPUs per Slurm job (default: 1); above 1 each stage runs data-parallel over them")
    g.add_argument("--status", metavar="OUT", default=None,
                   help="print which stages of the study in OUT are done, running (with job ids) or pending, "
                        "and exit")  # fmt: skip

    p = sub.add_parser("train", help="train one end point with the paper's recipe",
                       description="Train a network with Nesterov SGD (lr 0.1, momentum 0.9, wd 5e-4, lr halved "
                       "every 20 epochs), checkpointing every epoch; writes <out>/<arch>_seed<seed>.pt.")  # fmt: skip
    _add_common(p, out="neuralign-endpoints")
    _add_data(p)
    _add_arch(p, checkpoints=False)
    p.add_argument("--width", type=float, default=None, help="width multiplier (ResNet, VGG)")
    p.add_argument("--epochs", type=int, default=250, help="epochs (default: 250)")
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate (default: 0.1)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default: 5e-4)")
    _add_force(p)

    p = sub.add_parser("align", help="align end point B to A",
                       description="Find the permutation of B's hidden units that matches A's: correlation of "
                       "post-activations (the paper), l2 (uncentred cross moments) or weight matching. Writes "
                       "alignment.pt (the permutation) and alignment.json (per-layer correlations).")  # fmt: skip
    _add_common(p, out="neuralign-align")
    _add_pair(p)
    _add_data(p)
    p.add_argument("--method", choices=["correlation", "l2", "weight"], default="correlation",
                   help="matching method (default: correlation)")  # fmt: skip
    p.add_argument("--export", default=None, metavar="FILE",
                   help="also write B permuted into A's frame to FILE (.safetensors, .pt or .pth; see `apply`)")

    p = sub.add_parser("apply", help="write end point B permuted into A's frame",
                       description="Apply a permutation file (alignment.pt of `align`, perms.pt of `pam`) to the "
                       "checkpoint it was computed for and write the aligned weights to --out: .safetensors, or "
                       ".pt/.pth in the input's own layout (same wrapper and key prefix), loadable by the model's "
                       "own class with load_state_dict(strict=True). A file computed for another architecture or "
                       "another pair is refused.")  # fmt: skip
    _add_common(p, out="b_aligned.safetensors", out_help="the aligned weights to write: .safetensors, .pt or .pth "
                "(default: b_aligned.safetensors)")  # fmt: skip
    p.add_argument("--model", required=True, help="end point B (any format `align` reads)")
    p.add_argument("--perms", required=True, help="permutation file (alignment.pt, perms.pt or .safetensors)")
    p.add_argument("--arch", default=None, help="architecture of --model, checked against the permutation file's")

    p = sub.add_parser("curve", help="fit a curve between two end points",
                       description="Fit a quadratic Bezier (or polygonal chain) between A and B, or B aligned by "
                       "--perms; writes curve.pt and curve.json.")  # fmt: skip
    _add_common(p, out="neuralign-curve")
    _add_pair(p)
    _add_data(p)
    p.add_argument("--perms", default=None, help="alignment.pt to apply to B first (an aligned curve)")
    p.add_argument("--curve", choices=["bezier", "polychain"], default="bezier", help="family (default: bezier)")
    p.add_argument("--export-point", type=float, default=None, metavar="T",
                   help="write the network at t=T of the curve, with batch-norm statistics re-estimated on the "
                        "training data, to --out, which is then a file (.safetensors, .pt or .pth); the fitted "
                        "curve's files go next to it")  # fmt: skip
    p.add_argument("--from", dest="source", default=None, metavar="CURVE",
                   help="with --export-point: export from this curve.pt instead of fitting one")
    p.add_argument("--bn-batches", type=int, default=None,
                   help="batches of the batch-norm re-estimation of --export-point (default: all)")  # fmt: skip
    _add_force(p)
    p.add_argument("--epochs", type=int, default=250, help="epochs (default: 250)")
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate (default: 0.1)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 on w(t) (default: 5e-4)")

    p = sub.add_parser("pam", help="fit a curve jointly with the permutation (PAM)",
                       description="Proximal alternating minimisation over the Bezier control point and the "
                       "permutation of B; writes curve.pt, perms.pt and pam.json.")  # fmt: skip
    _add_common(p, out="neuralign-pam")
    _add_pair(p)
    _add_data(p)
    p.add_argument("--init", default="identity", help="identity, alignment, or an alignment.pt to start from")
    p.add_argument("--method", choices=["linearized", "birkhoff"], default="linearized", help="P-step")
    p.add_argument("--lam", type=float, default=1000.0, help="P proximal step (default: 1000)")
    p.add_argument("--iters", type=int, default=1, help="outer iterations (default: 1)")
    p.add_argument("--epochs", type=int, default=250, help="curve epochs per x-step (default: 250)")
    p.add_argument("--local-search", type=int, default=0, help="swaps tried per group after each P-step")
    p.add_argument("--max-moved", type=float, default=None,
                   help="linearized: the largest fraction of a group's units one P-step may reassign (a bounded "
                        "step, lambda found by bisection; default: unbounded)")  # fmt: skip
    p.add_argument("--p-steps", type=int, default=None, help="linearized: P-steps per outer iteration (default: 1)")
    p.add_argument("--birkhoff-steps", type=int, default=None,
                   help="birkhoff: projected gradient steps on the Birkhoff polytope per P-step (default: 20)")
    p.add_argument("--birkhoff-lr", type=float, default=None, help="birkhoff: their step size (default: PAM's)")
    p.add_argument("--birkhoff-samples", type=int, default=None,
                   help="birkhoff: Birkhoff-von Neumann draws among the rounding candidates (default: 32)")
    p.add_argument("--gradient-batches", type=int, default=None,
                   help="training batches per P-gradient estimate (default: PAM's)")
    p.add_argument("--value-batches", type=int, default=8,
                   help="training batches (at t = 0.25, 0.5, 0.75) scoring each P-step candidate (default: 8)")
    _add_force(p)
    p.add_argument("--lr", type=float, default=0.1, help="curve learning rate (default: 0.1)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 on w(t) (default: 5e-4)")

    p = sub.add_parser("evaluate", help="evaluate a curve along t",
                       description="Loss and accuracy at --num-points values of t with batch norm re-estimated; "
                       "writes evaluation.json (Avg, Min, barriers, values at t = 0.5). It prints the expected time "
                       "before it starts: the cost is num-points x (bn-batches + test batches) forward passes, so the "
                       "defaults (a full training pass at each of 65 points) take long on a CPU; --num-points 17 "
                       "--bn-batches 10 is a cheap first look.")  # fmt: skip
    _add_common(p, out="neuralign-eval")
    p.add_argument("--model-a", required=True, help="an end point of the curve (gives the architecture)")
    _add_arch(p, checkpoints=True)
    p.add_argument("--curve", required=True, help="curve.pt")
    _add_data(p)
    p.add_argument("--num-points", type=int, default=65,
                   help="points along t (default: 65, the paper's); 17 gives the same picture at a quarter of the "
                        "cost")  # fmt: skip
    p.add_argument("--bn-batches", type=int, default=None,
                   help="batches per BN re-estimation (default: all, a full training pass per point); 10 moves "
                        "accuracies along a fitted curve by about 0.1 points (benchmarks/bn_subset.py) at a small "
                        "fraction of the cost")  # fmt: skip

    p = sub.add_parser("verify", help="check whether an alignment is locally optimal",
                       description="Run the checks of neuralign.verification.verify_alignment (PAM stability, "
                       "first-order certificate, neighbourhood swaps, gradient Taylor test, correlation "
                       "optimality); writes verification.json, verification.md and reassignment.png. It prints the "
                       "expected time before it starts. Cheaper settings: --checks certificate gradient alignment "
                       "(minutes: no PAM runs, no swap scoring), --iters 1, --swaps 8, --local-search 4, or a "
                       "--curve already fitted instead of --fit-epochs.")  # fmt: skip
    _add_common(p, out="neuralign-verify")
    _add_pair(p)
    _add_data(p)
    p.add_argument("--perms", required=True, help="alignment.pt to verify")
    p.add_argument("--curve", default=None, help="a curve fitted for the aligned pair (fitted briefly if absent)")
    p.add_argument("--checks", nargs="*", default=None, help="subset of: stability certificate neighbourhood "
                   "gradient alignment")  # fmt: skip
    p.add_argument("--fit-epochs", type=int, default=2, help="epochs of the curve fitted when --curve is absent")
    p.add_argument("--lam", type=float, default=1000.0, help="PAM step and certificate threshold (default: 1000)")
    p.add_argument("--iters", type=int, default=2, help="PAM iterations of the stability check (default: 2)")
    p.add_argument("--swaps", type=int, default=32,
                   help="best-ranked transpositions scored per group, besides 8 random ones as a control (default: 32)")
    p.add_argument("--local-search", type=int, default=16, help="swaps PAM tries per group (default: 16)")
    return parser


_COMMANDS = {
    "demo": lambda a, b: _cmd_study(a, b, demo=True),
    "study": _cmd_study,
    "train": _cmd_train,
    "align": _cmd_align,
    "apply": _cmd_apply,
    "curve": _cmd_curve,
    "pam": _cmd_pam,
    "evaluate": _cmd_evaluate,
    "verify": _cmd_verify,
}


def _manifest_path(args: argparse.Namespace) -> Path:
    """``<out>/manifest_<cmd>.json``, or beside ``--out`` when it names a weight file (``apply``,
    ``--export-point``); ``train`` writes one per end point (several seeds may share a folder)."""
    out = Path(args.out)
    folder = out.parent if out.suffix in (".safetensors", ".pt", ".pth") else out
    if args.command == "train":
        return folder / f"manifest_train_{args.arch}_seed{args.seed}.json"
    return folder / f"manifest_{args.command}.json"


def _write_manifest(args: argparse.Namespace, **extra: Any) -> Path:
    """Record the command, its options, the seed, package versions and the device (and, once loaded, the data's
    description: sizes, image size, normalisation statistics) in the command's manifest."""
    from neuralign.experiments.study import _versions

    record = {
        "kind": "command_manifest",
        "command": args.command,
        "argv": sys.argv,
        "options": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list)) or v is None},
        "versions": _versions(),
        "device": str(_device(args.device)),
        "threads": torch.get_num_threads(),
        "distributed": _distributed.describe(),
        "started": getattr(args, "started", None) or time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
    }
    args.started = record["started"]
    return atomic_write_text(_manifest_path(args), json.dumps(record, indent=1))


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (its lines joined with "; "), or its type when it has none."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def _in_option_words(text: str, parser: argparse.ArgumentParser, command: str) -> str:
    """``text`` (a library message) with the Python argument names it mentions replaced by the command's options:
    "pass download=True" -> "pass --download", "`resize`" -> "--resize"."""
    import re

    options = {}
    for action in parser._subparsers._group_actions[0].choices[command]._actions:  # type: ignore[union-attr]
        long = [o for o in action.option_strings if o.startswith("--")]
        if long:
            options[action.dest] = long[0]
    options.setdefault("root", options.get("data_root", "--data-root"))
    # library argument names that the commands pass from differently named options
    aliases = {"max_iter": "iters", "x_epochs": "epochs", "point_a": "model_a", "point_b": "model_b",
               "train_loader": "data", "example_input": "data", "lam": "lam", "time_minutes": "slurm_time"}  # fmt: skip
    for name, dest in aliases.items():
        if dest in options:
            options.setdefault(name, options[dest])
    text = re.sub(r"\b(\w+)=True\b", lambda m: options.get(m.group(1), m.group(0)), text)
    text = text.replace("root (--data-root)", "--data-root")
    return re.sub(r"`(\w+)`", lambda m: options.get(m.group(1), m.group(0)), text)


def _warning_printer(parser: argparse.ArgumentParser, command: str):
    """``warnings.showwarning`` for the command: a library warning on one line, in the command's option words,
    without Python's source line."""
    from tqdm import tqdm

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
        tqdm.write(f"neuralign: warning: {_in_option_words(_one_line(message), parser, command)}", file=sys.stderr)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``neuralign`` and ``python -m neuralign``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            print(f"neuralign: error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    else:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), _usable_cores())))
    distributed = False
    if args.command == "study" and getattr(args, "executor", "sequential") != "sequential" and (
        int(os.environ.get("WORLD_SIZE", "1")) > 1
    ):  # every rank would submit every stage: refused once, by rank 0
        if os.environ.get("RANK", "0") == "0":
            print(f"neuralign: error: --executor {args.executor} submits the stages as jobs itself: run it as one "
                  "process, not under torchrun (--gpus-per-job runs each Slurm job data-parallel)",
                  file=sys.stderr)  # fmt: skip
        return 2
    if "WORLD_SIZE" in os.environ:
        # under torchrun: the default process group, backend from --device; every data-driven function then runs
        # data-parallel and only rank 0 writes files or shows progress
        try:
            device = _device(args.device)
        except ValueError as exc:
            print(f"neuralign: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        try:
            distributed = _distributed.init_from_env(device)
        except (ValueError, RuntimeError) as exc:
            print(f"neuralign: error: could not join the torchrun process group: {_one_line(exc)}", file=sys.stderr)
            return 2
    bars = _Bars(enabled=not args.quiet and _distributed.rank() == 0)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(parser, args.command)
            if args.command not in ("demo", "study"):  # a study keeps its own, richer manifest
                _write_manifest(args)
            paths = _COMMANDS[args.command](args, bars)
    except KeyboardInterrupt:
        bars.close()
        resumable = args.command in ("train", "curve", "pam", "study", "demo")
        print("neuralign: interrupted" + ("; run the same command again to resume from the checkpoints" if resumable
                                          else ""), file=sys.stderr)  # fmt: skip
        return 130
    except (NeuralignError, ValueError, TypeError, OSError) as exc:  # OSError: a full disk, a missing permission
        bars.close()
        print(f"neuralign: error: {_in_option_words(_one_line(exc), parser, args.command)}", file=sys.stderr)
        return 2
    bars.close()
    if _distributed.rank() == 0:
        for path in paths:
            print(path)
    if distributed:
        torch.distributed.destroy_process_group()
    return 0

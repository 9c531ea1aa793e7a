"""``neuralign study`` and ``neuralign demo``: the paper's protocol, sequentially or as jobs; ``--status``."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from neuralign import _distributed
from neuralign.cli.common import model_args, parse_device, parse_floats, parse_overrides, table
from neuralign.cli.parser import add_common, add_data, list_settings_in_help
from neuralign.cli.progress import ProgressBars

__all__ = ["cmd_study", "parse_extra", "print_cancel", "print_status", "slurm_options", "stage_times", "COMMANDS",
           "SLURM_OPTIONS"]

# the options of `neuralign study` that set a study setting directly -> its path
_OPTION_PATHS = {
    "pairs": "pairs", "arch": "model.arch", "epochs": "train.epochs", "curve_epochs": "curve.epochs",
    "num_points": "evaluation.num_points", "train_size": "data.train_size", "test_size": "data.test_size",
    "align_size": "data.align_size", "resize": "data.resize", "bn_batches": "evaluation.max_bn_batches",
    "width": "model.width", "batch_size": "data.batch_size", "data": "data.dataset", "data_root": "data.root",
    "download": "data.download", "num_classes": "model.num_classes",
}  # fmt: skip


def cmd_study(args: argparse.Namespace, bars: ProgressBars, *, demo: bool = False) -> list[Path]:
    from neuralign.study import PRESETS, run_study
    from neuralign.study.report import dataset_label, paper_row

    if not demo and args.status is not None:
        print_status(args.status)
        return []
    if not demo and args.cancel is not None:
        print_cancel(args.cancel)
        return []

    config = PRESETS["demo" if demo else args.preset]
    settings: dict[str, Any] = {}
    if not demo:
        if args.endpoints:
            settings["endpoints"] = tuple(args.endpoints)
            if args.pairs is None:
                settings["pairs"] = len(args.endpoints) // 2
        for option, path in _OPTION_PATHS.items():
            value = getattr(args, option, None)
            if value is not None and value is not False:
                settings[path] = value
        if args.curve_epochs is not None and config.pam.x_epochs == config.curve.epochs:
            settings["pam.x_epochs"] = args.curve_epochs  # the presets whose PAM x-steps follow the curves' epochs
        if args.model_arg:
            settings["model.args"] = model_args(args)
        for key in ("mean", "std"):
            if getattr(args, key) is not None:
                settings[f"data.{key}"] = parse_floats(getattr(args, key), f"--{key}")
    settings["seed"] = args.seed
    if "endpoints" in settings and "pairs" in settings:  # pairs first: the end points are checked against it
        settings = {"pairs": settings.pop("pairs"), **settings}
    with warnings.catch_warnings():  # the flat names of 0.1 say what they are now, on the command line too
        warnings.simplefilter("always", DeprecationWarning)
        config = config.apply({**settings, **parse_overrides(args.set)})
    # Table 1 is about standard curves: no reference row beside a robust study
    row = None if config.robust is not None else paper_row(config.model.arch, dataset_label(config.data.dataset))
    executor = "sequential" if demo else args.executor
    if executor != "slurm":
        given = [flag for flag, field, _, _ in SLURM_OPTIONS if getattr(args, field, None) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} set{'s' if len(given) == 1 else ''} the resources of Slurm jobs: "
                             f"use {'it' if len(given) == 1 else 'them'} with --executor slurm")  # fmt: skip
    out = Path(args.out)
    if executor == "sequential":
        results = run_study(config, args.out, device=parse_device(args.device), progress=bars, paper_row=row)
    elif executor == "local":
        from neuralign.study.executors import run_study_local

        def on_event(stage: str, event: str, job_id: str) -> None:
            if not args.quiet:
                print(f"{stage}: {event} (job {job_id})", file=sys.stderr)

        results = run_study_local(config, out, jobs=args.jobs, device=parse_device(args.device), paper_row=row,
                                  on_event=on_event)  # fmt: skip
    else:
        from neuralign.study.executors import submit_study_slurm

        if args.device == "auto":
            raise ValueError("--executor slurm needs --device cuda or --device cpu: auto would be resolved on this "
                             "machine, not on the compute nodes")  # fmt: skip
        sent = submit_study_slurm(config, out, device=args.device, options=slurm_options(args), paper_row=row)
        for stage, job_id in sent.replaced.items():
            print(f"{stage}: cancelled Slurm job {job_id} (queued behind a failed job, it could never start)",
                  file=sys.stderr)  # fmt: skip
        for stage, job_id in sent.kept.items():
            print(f"{stage}: Slurm job {job_id} is queued or running, kept", file=sys.stderr)
        for stage, job_id in sent.submitted.items():
            print(f"{stage}: Slurm job {job_id}", file=sys.stderr)
        if sent.submitted:
            print(f"submitted {len(sent.submitted)} jobs; follow them with: neuralign study --status {out}",
                  file=sys.stderr)  # fmt: skip
        else:
            print(f"nothing to submit: {len(sent.done)} stages done, {len(sent.kept)} jobs queued or running; "
                  f"follow them with: neuralign study --status {out}", file=sys.stderr)  # fmt: skip
        return [out / "jobs.json"] if (out / "jobs.json").exists() else []
    bars.close()
    if (out / "manifest.json").exists() and _distributed.rank() == 0:
        print(stage_times(out / "manifest.json"), file=sys.stderr)
    return [Path(results["report"]), out / "results.json"]


def print_status(out: str) -> None:
    from neuralign.study.executors import STATES, study_status

    status = study_status(out)
    hints = {
        "blocked": "these Slurm jobs wait on a job that failed or was cancelled and can never start: rerun the study "
                   "with --executor slurm, which cancels and resubmits them (or cancel them: scancel {ids})",
        "failed": "these stages' jobs ended without their outputs (see the logs under {out}/jobs/); rerun the study "
                  "to run them again",
        "cancelled": "these stages' jobs were cancelled (by neuralign study --cancel, or by a run that replaced jobs "
                     "waiting on a failed one); rerun the study to submit them again",
        "unknown": "squeue is not on PATH: whether these Slurm jobs are alive cannot be told from this machine",
    }  # fmt: skip
    for state in STATES:
        entries = status[state]
        if not entries and state in hints:
            continue
        print(f"{state} ({len(entries)}):")
        for stage, job in entries:
            print(f"  {stage}" + (f"  [job {job}]" if job else ""))
        if state in hints:
            print("  -> " + hints[state].format(ids=" ".join(job for _, job in entries if job), out=out))


def print_cancel(out: str) -> None:
    from neuralign.study.executors import cancel_study

    cancelled = cancel_study(out)
    for stage, job in cancelled.items():
        print(f"{stage}: cancelled Slurm job {job}")
    print(f"cancelled {len(cancelled)} jobs of {out}" + ("; rerun the study to submit them again" if cancelled else
                                                         " (none was queued or running)"))  # fmt: skip


def slurm_options(args: argparse.Namespace) -> Any:
    """The :class:`~neuralign.study.executors.SlurmOptions` of the command line's Slurm options (validated there)."""
    from neuralign.study.executors import SlurmOptions

    given = {field: getattr(args, field) for _, field, _, _ in SLURM_OPTIONS if getattr(args, field) is not None}
    if given.get("extra") is not None:
        given["extra"] = parse_extra(given["extra"])
    return SlurmOptions(**given)


def parse_extra(items: list[str]) -> dict[str, str]:
    """``--slurm-extra KEY=VALUE`` options as ``{KEY: VALUE}`` (the values kept as text; ``KEY=`` is a flag)."""
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--slurm-extra expects KEY=VALUE (an sbatch option and its value), got {item!r}")
        extra[key.strip()] = value.strip()
    return extra


def stage_times(manifest_path: Path) -> str:
    """The seconds of every stage of the study (recorded in its manifest), as a table with the total."""
    seconds = json.loads(manifest_path.read_text()).get("stage_seconds", {})
    rows = [(stage, f"{s:.1f}") for stage, s in seconds.items()]
    return "time per stage (s):\n" + table(["stage", "seconds"], [*rows, ("total", f"{sum(seconds.values()):.1f}")])


def add_demo_parser(sub: Any) -> None:
    """The sub-parser of ``neuralign demo``."""
    p = sub.add_parser("demo", help="offline end-to-end study on the shipped digits (a few minutes on a CPU)",
                       description="Train two TinyTen networks on the shipped UCI digits (resized to 16x16), align "
                       "them, fit unaligned / PAM / aligned curves, verify the alignment and write a report with "
                       "figures. Ends with the path of the report.")  # fmt: skip
    add_common(p, out="neuralign-demo")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a study setting, e.g. --set train.epochs=2 (see `neuralign study --help`)")


def add_study_parser(sub: Any) -> None:
    """The sub-parser of ``neuralign study``."""
    p = sub.add_parser("study", help="the paper's Table 1 protocol at any scale",
                       description="Train or load 2 x pairs end points, align each pair, fit the four curves of "
                       "Table 1 (Unaligned, PAM Unaligned, PAM Aligned, Aligned), evaluate them along t with batch "
                       "norm re-estimated, verify the alignment, and write results.json, report.md and figures. "
                       "Presets: paper (the paper's settings, for GPUs), cpu (TinyTen on CIFAR-10 in about an hour "
                       "on 2 cores), demo; robust (adversarially trained end points, robust Unaligned and Aligned "
                       "curves, clean and robust accuracy along t; the paper's §4 settings, for GPUs) and "
                       "robust-cpu (MLPs on MNIST on 2 cores). Any setting can be overridden with --set PATH=VALUE, "
                       "the settings listed at the end (e.g. --set pam.lam=10 --set verification=false).")  # fmt: skip
    list_settings_in_help(p)
    add_common(p, out="neuralign-study")
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
    add_data(p, required=False)
    for action in p._actions:  # the study's own defaults apply unless given
        if action.dest == "batch_size":
            action.default = None
    g = p.add_argument_group("running the stages as jobs (needs the cluster extra: pip install 'neuralign[cluster]')")
    g.add_argument("--executor", choices=["sequential", "local", "slurm"], default="sequential",
                   help="sequential: every stage in this process (default); local: up to --jobs stages at once as "
                        "local processes (one GPU each when there are several); slurm: every stage as a Slurm job, "
                        "with job dependencies between stages (returns once they are queued)")  # fmt: skip
    g.add_argument("--jobs", type=int, default=2, help="concurrent local jobs (default: 2)")
    for flag, field, kind, text in SLURM_OPTIONS:
        g.add_argument(flag, dest=field, type=kind, default=None, help=text,
                       **({"action": "append", "metavar": "KEY=VALUE"} if field == "extra" else {}))  # fmt: skip
    g.add_argument("--status", metavar="OUT", default=None,
                   help="print which stages of the study in OUT are done, running or pending (with job ids), "
                        "blocked, failed or cancelled, and exit")  # fmt: skip
    g.add_argument("--cancel", metavar="OUT", default=None,
                   help="cancel every queued or running Slurm job of the study in OUT (recorded: --status then says "
                        "cancelled) and exit; rerunning the study submits those stages again")  # fmt: skip


# The Slurm resources of `neuralign study --executor slurm`: (option, SlurmOptions field, type, help). The fields are
# validated and documented by neuralign.study.executors.SlurmOptions; the options' dests are the fields' names, so
# that its messages ("`memory` must be ...") read in option words (--slurm-mem).
SLURM_OPTIONS = (
    ("--slurm-partition", "partition", str, "Slurm partition of the jobs (default: the cluster's default)"),
    ("--slurm-time", "time_minutes", int, "wall time of each Slurm job in minutes (default: 1440)"),
    ("--gpus-per-job", "gpus_per_job", int, "GPUs per Slurm job (default: 1 with --device cuda, 0 with --device "
     "cpu); above 1 each stage runs data-parallel over them, one task per GPU"),
    ("--tasks-per-job", "tasks_per_job", int, "processes per Slurm job, running each stage data-parallel (gloo on "
     "the CPU; default: one per GPU, or 1)"),
    ("--cpus-per-task", "cpus_per_task", int, "CPUs per process of a Slurm job; torch uses as many threads "
     "(default: the cluster's, usually 1)"),
    ("--slurm-mem", "memory", str, "memory per Slurm job, e.g. 4G or 500M (default: the cluster's, often the whole "
     "node, so that jobs do not share a node)"),
    ("--slurm-account", "account", str, "Slurm account to charge"),
    ("--slurm-qos", "qos", str, "Slurm quality of service"),
    ("--slurm-extra", "extra", str, "any other sbatch option, repeatable: --slurm-extra constraint=a100 "
     "(KEY= for a flag: --slurm-extra exclusive=)"),
)  # fmt: skip


# the commands of this module: name -> (add its sub-parser, run it)
COMMANDS = {
    "demo": (add_demo_parser, functools.partial(cmd_study, demo=True)),
    "study": (add_study_parser, cmd_study),
}

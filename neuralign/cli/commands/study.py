"""``neuralign study`` and ``neuralign demo``: the paper's protocol, sequentially or as jobs (the executor options
of :mod:`neuralign.cli.executors`); ``--status``, ``--cancel``."""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from pathlib import Path
from typing import Any

from neuralign import _distributed
from neuralign.cli.common import data_settings, model_args, parse_device, parse_overrides
from neuralign.cli.executors import add_executor_options, print_cancel, print_status, run_stages, stage_times
from neuralign.cli.parser import ARCH_HELP, add_common, add_data, add_optimizer, list_settings_in_help
from neuralign.cli.progress import ProgressBars

__all__ = ["cmd_study", "COMMANDS"]

# the options of `neuralign study` that set a study setting directly -> its path (the data options: data_settings)
_OPTION_PATHS = {
    "pairs": "pairs", "arch": "model.arch", "epochs": "train.epochs", "curve_epochs": "curve.epochs",
    "num_points": "evaluation.num_points", "bn_batches": "evaluation.max_bn_batches", "width": "model.width",
    "num_classes": "model.num_classes", "optimizer": "train.optimizer",
}  # fmt: skip


def cmd_study(args: argparse.Namespace, bars: ProgressBars, *, demo: bool = False) -> list[Path]:
    from neuralign.study import PRESETS, run_study
    from neuralign.study.report import dataset_label, paper_row

    if not demo and args.status is not None:
        print_status(args.status, "study")
        return []
    if not demo and args.cancel is not None:
        print_cancel(args.cancel, "study")
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
        settings.update(data_settings(args))
    settings["seed"] = args.seed
    if "endpoints" in settings and "pairs" in settings:  # pairs first: the end points are checked against it
        settings = {"pairs": settings.pop("pairs"), **settings}
    with warnings.catch_warnings():  # the flat names of 0.1 say what they are now, on the command line too
        warnings.simplefilter("always", DeprecationWarning)
        config = config.apply({**settings, **parse_overrides(args.set)})
    # Table 1 is about standard curves: no reference row beside a robust study
    row = None if config.robust is not None else paper_row(config.model.arch, dataset_label(config.data.dataset))
    out = Path(args.out)
    results = run_stages(args, config, lambda: run_study(config, out, device=parse_device(args.device), progress=bars,
                                                         paper_row=row), paper_row=row)  # fmt: skip
    if results is None:  # submitted to Slurm
        return [out / "jobs.json"] if (out / "jobs.json").exists() else []
    bars.close()
    if (out / "manifest.json").exists() and _distributed.rank() == 0:
        print(stage_times(out / "manifest.json"), file=sys.stderr)
    return [Path(results["report"]), out / "results.json"]


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
    p.add_argument("--arch", default=None, help=ARCH_HELP)
    p.add_argument("--pairs", type=int, default=None, help="number of end-point pairs")
    p.add_argument("--endpoints", nargs="+", default=None, metavar="FILE",
                   help="given end points instead of training: A1 B1 [A2 B2 ...] in any format `align` reads "
                        "(plain state dicts and .safetensors are read as --arch with the dataset's classes)")
    p.add_argument("--epochs", type=int, default=None, help="end-point training epochs")
    add_optimizer(p, settings=True)
    p.add_argument("--curve-epochs", type=int, default=None, help="curve (and PAM x-step) epochs")
    p.add_argument("--num-points", type=int, default=None, help="points along t for evaluation")
    p.add_argument("--bn-batches", type=int, default=None, help="batches per batch-norm re-estimation")
    p.add_argument("--width", type=float, default=None, help="width multiplier (ResNet, VGG)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any study setting")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the models' heads (default: the dataset's), e.g. for given end points")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="builder argument of --arch (repeatable), e.g. width_mult=0.5 for torchvision:mobilenet_v2")
    add_data(p, required=False, settings=True)
    add_executor_options(p, command="study")


# the commands of this module: name -> (add its sub-parser, run it)
COMMANDS = {
    "demo": (add_demo_parser, functools.partial(cmd_study, demo=True)),
    "study": (add_study_parser, cmd_study),
}

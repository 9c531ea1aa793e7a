"""``neuralign compare``: alignment methods compared under one protocol on N pairs of end points."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any

from neuralign import _distributed
from neuralign.cli.common import data_settings, model_args, parse_device, parse_overrides
from neuralign.cli.executors import add_executor_options, print_cancel, print_status, run_stages, stage_times
from neuralign.cli.parser import ARCH_HELP, add_common, add_data, add_optimizer
from neuralign.cli.progress import ProgressBars

__all__ = ["COMMANDS", "PRESET_NAMES", "cmd_compare"]


def cmd_compare(args: argparse.Namespace, bars: ProgressBars) -> list[Path]:
    from neuralign.study.compare import COMPARE_PRESETS, run_compare

    if args.status is not None:
        print_status(args.status, "compare")
        return []
    if args.cancel is not None:
        print_cancel(args.cancel, "compare")
        return []
    config = COMPARE_PRESETS[args.preset]
    settings: dict[str, Any] = {"seed": args.seed}
    if args.endpoints:
        if args.pairs is None and len(args.endpoints) % 2:
            raise ValueError(f"--endpoints takes A and B of each pair (an even number of files), got "
                             f"{len(args.endpoints)}")  # fmt: skip
        settings["pairs"] = args.pairs if args.pairs is not None else len(args.endpoints) // 2
        settings["endpoints"] = tuple(args.endpoints)
    elif args.pairs is not None:
        settings["pairs"] = args.pairs
    for option, path in (("methods", "methods"), ("num_points", "protocol.num_points"), ("bn", "protocol.bn"),
                         ("arch", "model.arch"), ("optimizer", "train.optimizer")):  # fmt: skip
        value = getattr(args, option)
        if value is not None:
            settings[path] = tuple(value) if isinstance(value, list) else value
    if args.model_arg:  # a dict, which --set cannot spell: `--model-arg depth=2` for `vit`
        settings["model.args"] = model_args(args)
    settings.update(data_settings(args))
    if args.verify:  # the Bezier curves first: the verification checks each method's permutation on its curve
        settings.update({"fit_curves": True, "verification": True})
    overrides = parse_overrides(args.set)
    unused = [p for p in overrides if p.startswith("verification.")]
    if unused and not args.verify and config.verification is None and overrides.get("verification") is not True:
        raise ValueError(f"--set {unused[0]} is a setting of the verification, which runs with --verify: add it")
    for path, value in {**settings, **overrides}.items():
        config = config.set(path, value)
    out = Path(args.out)
    results = run_stages(args, config, lambda: run_compare(config, out, device=parse_device(args.device),
                                                           progress=bars))  # fmt: skip
    if results is None:  # submitted to Slurm
        return [out / "jobs.json"] if (out / "jobs.json").exists() else []
    bars.close()
    if (out / "manifest.json").exists() and _distributed.rank() == 0:
        print(stage_times(out / "manifest.json"), file=sys.stderr)
    return [Path(results["report"]), out / "results.json"]


def add_compare_parser(sub: Any) -> None:
    """The sub-parser of ``neuralign compare``."""
    p = sub.add_parser("compare", help="alignment methods compared under one protocol on N pairs of end points",
                       description="Train (or load) 2 x pairs end points, find each pair's permutation with every "
                       "chosen method (recording its wall seconds and data passes), evaluate the interpolation "
                       "between A and the permuted B under one protocol (lambda grid, both barrier definitions for "
                       "loss and accuracy on train and test, AUC, batch norm re-estimated, interpolated or REPAIR), "
                       "and write results.json, report.md (a table per method, the method x method agreement) and "
                       "figures/compare.png. Rerunning resumes; the stages can run as local or Slurm jobs "
                       "(--executor), as the study's do. Presets: demo (shipped digits, offline), mnist-mlp "
                       "(MLP 3x512 on MNIST), cpu (TinyTen on CIFAR-10, the study's cpu end points, with Bezier "
                       "curves per method).")  # fmt: skip
    add_common(p, out="neuralign-compare")
    p.add_argument("--preset", choices=PRESET_NAMES, default="demo", help="starting settings (default: "
                   "demo)")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="methods in the order of the report (default: identity correlation l2 weight)")
    p.add_argument("--pairs", type=int, default=None, help="number of end-point pairs")
    p.add_argument("--endpoints", nargs="+", default=None, metavar="FILE",
                   help="given end points instead of training: A1 B1 [A2 B2 ...] in any format `align` reads")
    p.add_argument("--arch", default=None, help="architecture of trained or plain end points: " + ARCH_HELP)
    add_optimizer(p, settings=True)
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="builder argument of --arch (repeatable), e.g. depth=2 heads=4 mlp_dim=128 for vit")
    p.add_argument("--num-points", type=int, default=None, help="lambda grid size (default 25; 11 and 61 common)")
    p.add_argument("--bn", choices=["reestimate", "interpolate", "repair"], default=None,
                   help="batch norm along the interpolation (default: reestimate)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any setting (listed below)")
    p.add_argument("--verify", action="store_true",
                   help="also fit each method's Bezier curve and check its permutation's local optimality on it "
                        "(neuralign.verification, as the study's verification stage; a verdict per method and pair "
                        "in the report; its options: --set verification.PATH=VALUE)")  # fmt: skip
    add_data(p, required=False, settings=True)
    add_executor_options(p, command="compare")
    shown = p.format_help

    def format_help() -> str:  # read when shown: listing them imports the study, which parsing does not need
        from neuralign._options import setting_paths
        from neuralign.study.compare import COMPARE_METHODS, CompareConfig

        listed = textwrap.fill(", ".join(setting_paths(CompareConfig)), width=100, initial_indent="  ",
                               subsequent_indent="  ", break_on_hyphens=False)  # fmt: skip
        return f"{shown()}\nmethods: {', '.join(COMPARE_METHODS)}\n\nsettings (--set PATH=VALUE):\n{listed}\n"

    p.format_help = format_help  # type: ignore[method-assign]


#: The names of neuralign.study.compare.COMPARE_PRESETS (kept here so that parsing imports no study).
PRESET_NAMES = ("cpu", "demo", "mnist-mlp")


# the commands of this module: name -> (add its sub-parser, run it)
COMMANDS = {"compare": (add_compare_parser, cmd_compare)}

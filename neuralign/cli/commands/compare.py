"""``neuralign compare``: alignment methods compared under one protocol on N pairs of end points."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from neuralign.cli.common import parse_device, parse_overrides, table
from neuralign.cli.parser import add_common
from neuralign.cli.progress import ProgressBars

__all__ = ["COMMANDS", "PRESET_NAMES", "cmd_compare"]


def cmd_compare(args: argparse.Namespace, bars: ProgressBars) -> list[Path]:
    from neuralign.study.compare import COMPARE_PRESETS, run_compare

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
                         ("arch", "model.arch"), ("data", "data.dataset")):  # fmt: skip
        value = getattr(args, option)
        if value is not None:
            settings[path] = tuple(value) if isinstance(value, list) else value
    for path, value in {**settings, **parse_overrides(args.set)}.items():
        config = config.set(path, value)
    out = Path(args.out)
    results = run_compare(config, out, device=parse_device(args.device), progress=bars)
    bars.close()
    seconds = json.loads((out / "manifest.json").read_text()).get("stage_seconds", {})
    rows = [(stage, f"{s:.1f}") for stage, s in seconds.items()]
    print("time per stage (s):\n" + table(["stage", "seconds"], [*rows, ("total", f"{sum(seconds.values()):.1f}")]),
          file=sys.stderr)  # fmt: skip
    return [Path(results["report"]), out / "results.json"]


def add_compare_parser(sub: Any) -> None:
    """The sub-parser of ``neuralign compare``."""
    p = sub.add_parser("compare", help="alignment methods compared under one protocol on N pairs of end points",
                       description="Train (or load) 2 x pairs end points, find each pair's permutation with every "
                       "chosen method (recording its wall seconds and data passes), evaluate the interpolation "
                       "between A and the permuted B under one protocol (lambda grid, both barrier definitions for "
                       "loss and accuracy on train and test, AUC, batch norm re-estimated, interpolated or REPAIR), "
                       "and write results.json, report.md (a table per method, the method x method agreement) and "
                       "figures/compare.png. Rerunning resumes. Presets: demo (shipped digits, offline), mnist-mlp "
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
    p.add_argument("--arch", default=None, help="architecture of trained or plain end points")
    p.add_argument("--data", default=None, help="dataset (digits, mnist, cifar10, an .npz file, imagefolder:PATH)")
    p.add_argument("--num-points", type=int, default=None, help="lambda grid size (default 25; 11 and 61 common)")
    p.add_argument("--bn", choices=["reestimate", "interpolate", "repair"], default=None,
                   help="batch norm along the interpolation (default: reestimate)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any setting (listed below)")
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

"""``neuralign evaluate``: loss and accuracy along a curve."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from neuralign import _json
from neuralign._utils import atomic_write_text
from neuralign.cli.common import announce_cost, info, load_command_data, load_model, parse_device, read_curve
from neuralign.cli.parser import add_arch, add_common, add_data, add_force
from neuralign.cli.progress import ProgressBars
from neuralign.cli.runfolder import check_run, command_options

__all__ = ["cmd_evaluate", "COMMANDS"]


def cmd_evaluate(args: argparse.Namespace, bars: ProgressBars) -> list[Path]:
    from neuralign.curves import evaluate_curve

    device = parse_device(args.device)
    out = Path(args.out)
    options = command_options(args, "model_a", "curve", "num_points", "bn_batches", "arch", "model_arg",
                              "num_classes", files=("model_a", "curve"))  # fmt: skip
    if check_run(args, "evaluate", options, outputs=[out / "evaluation.json"]) == "done":
        return [out / "evaluation.json"]
    data = load_command_data(args)
    model, _ = load_model(args.model_a, args, data.num_classes)
    model = model.to(device)
    curve = read_curve(args.curve).to(device)

    def on_point(record):
        bars({"stage": "evaluate", "label": Path(args.curve).stem, "step": record["index"] + 1,
              "total": args.num_points})  # fmt: skip

    bn = len(data.train) if args.bn_batches is None else min(args.bn_batches, len(data.train))
    announce_cost("evaluate", args.num_points * (bn + len(data.test)),
                   f"{args.num_points} points x ({bn} batch-norm + {len(data.test)} test batches)", model, data,
                   device)  # fmt: skip
    bars({"stage": "evaluate", "label": Path(args.curve).stem, "step": 0, "total": args.num_points, "start": True})
    ev = evaluate_curve(model, curve, data.train, data.test, num_points=args.num_points,
                        max_bn_batches=args.bn_batches, callback=on_point)  # fmt: skip
    p1 = atomic_write_text(out / "evaluation.json", _json.dumps(ev.to_dict()))
    info(f"Avg accuracy {100 * ev.avg_accuracy:.2f}%, Min {100 * ev.min_accuracy:.2f}%, "
          f"loss barrier {ev.loss_barrier:.4f}", file=sys.stderr)  # fmt: skip
    return [p1]


def add_evaluate_parser(sub: Any) -> None:
    """The sub-parser of ``neuralign evaluate``."""
    p = sub.add_parser("evaluate", help="evaluate a curve along t",
                       description="Loss and accuracy at --num-points values of t with batch norm re-estimated; "
                       "writes evaluation.json (Avg, Min, barriers, values at t = 0.5). It prints the expected time "
                       "before it starts: the cost is num-points x (bn-batches + test batches) forward passes, so the "
                       "defaults (a full training pass at each of 65 points) take long on a CPU; --num-points 17 "
                       "--bn-batches 10 is a cheap first look.")  # fmt: skip
    add_common(p, out="neuralign-eval")
    p.add_argument("--model-a", required=True, help="an end point of the curve (gives the architecture)")
    add_arch(p, checkpoints=True)
    p.add_argument("--curve", required=True, help="curve.pt")
    add_data(p)
    p.add_argument("--num-points", type=int, default=65,
                   help="points along t (default: 65, the paper's); 17 gives the same picture at a quarter of the "
                        "cost")  # fmt: skip
    p.add_argument("--bn-batches", type=int, default=None,
                   help="batches per BN re-estimation (default: all, a full training pass per point); 10 moves "
                        "accuracies along a fitted curve by about 0.1 points (benchmarks/bn_subset.py) at a small "
                        "fraction of the cost")  # fmt: skip
    add_force(p)


# the commands of this module: name -> (add its sub-parser, run it)
COMMANDS = {
    "evaluate": (add_evaluate_parser, cmd_evaluate),
}

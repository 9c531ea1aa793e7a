"""``neuralign evaluate``: loss and accuracy along a curve."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from neuralign._utils import atomic_write_text
from neuralign.cli.common import announce_cost, info, load_command_data, load_model, parse_device, read_curve
from neuralign.cli.progress import ProgressBars

__all__ = ["cmd_evaluate"]


def cmd_evaluate(args: argparse.Namespace, bars: ProgressBars) -> list[Path]:
    from neuralign.curves import evaluate_curve

    device = parse_device(args.device)
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
    out = Path(args.out)
    p1 = atomic_write_text(out / "evaluation.json", json.dumps(ev.to_dict(), indent=1))
    info(f"Avg accuracy {100 * ev.avg_accuracy:.2f}%, Min {100 * ev.min_accuracy:.2f}%, "
          f"loss barrier {ev.loss_barrier:.4f}", file=sys.stderr)  # fmt: skip
    return [p1]

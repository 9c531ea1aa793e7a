"""``neuralign curve``: fit a curve between two end points, or export the network at one of its points."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from neuralign import _json
from neuralign._utils import atomic_write_text
from neuralign.cli.common import (
    load_alignment,
    load_command_data,
    load_endpoints,
    params_of,
    parse_device,
    read_curve,
    sgd_optimizer,
    state_of,
)
from neuralign.cli.parser import add_common, add_data, add_force, add_pair
from neuralign.cli.progress import ProgressBars
from neuralign.cli.runfolder import announce_resume, check_run, command_options
from neuralign.errors import CheckpointError

__all__ = ["cmd_curve", "check_curve_ends", "export_point", "COMMANDS"]


def cmd_curve(args: argparse.Namespace, bars: ProgressBars) -> list[Path]:
    from neuralign.experiments.checkpoints import WEIGHT_SUFFIXES

    device = parse_device(args.device)
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
    options = command_options(args, "model_a", "model_b", "perms", "curve", "epochs", "lr", "weight_decay", "seed",
                       files=("model_a", "model_b", "perms"))  # fmt: skip
    fitted = False
    if args.source is None:
        fitted = check_run(args, "curve", options, outputs=[folder / "curve.pt", folder / "curve.json"],
                           checkpoints=[folder / "curve.ckpt"]) == "done"  # fmt: skip
        if fitted and args.export_point is None:
            return [folder / "curve.pt", folder / "curve.json"]
    from neuralign.alignment import apply_permutation  # past the skip: a finished result costs only the start-up
    from neuralign.curves import fit_curve

    data = load_command_data(args)
    a, b, meta_a, meta_b = load_endpoints(args, device, data)
    sd_b = state_of(b)
    if args.perms:
        record = load_alignment(args.perms, meta_a, meta_b, sd_b)
        sd_b = apply_permutation(sd_b, record.spec.restrict(sd_b), record.perms)
    if args.source is not None or fitted:
        source = args.source if args.source is not None else folder / "curve.pt"
        curve = read_curve(source).to(device)
        check_curve_ends(curve, params_of(a, state_of(a)), params_of(a, sd_b), source, bool(args.perms))
        paths: list[Path] = [] if args.source is not None else [folder / "curve.pt", folder / "curve.json"]
    else:
        done = announce_resume("curve", folder / "curve.ckpt", args.epochs)
        bars({"stage": "curve", "label": args.curve, "step": done, "total": args.epochs, "start": True})

        def on_epoch(record):
            bars({"stage": "curve", "label": args.curve, "step": record["epoch"] + 1, "total": args.epochs,
                  "record": record})  # fmt: skip

        res = fit_curve(a, params_of(a, state_of(a)), params_of(a, sd_b), data.train, curve=args.curve,
                        epochs=args.epochs, optimizer=sgd_optimizer(args.lr), weight_decay=args.weight_decay,
                        generator=args.seed, callback=on_epoch, checkpoint=folder / "curve.ckpt")  # fmt: skip
        curve = res.curve
        history = _json.dumps({"history": res.history, "message": res.message, "options": options})
        p2 = atomic_write_text(folder / "curve.json", history)
        curve.save(folder / "curve.pt")  # last: its presence marks the command as done
        (folder / "curve.ckpt").unlink(missing_ok=True)
        paths = [folder / "curve.pt", p2]
    if args.export_point is not None:
        paths.append(export_point(a, curve, args.export_point, data, args.bn_batches, out))
    return paths


def check_curve_ends(curve, point_a: dict, point_b: dict, source, aligned: bool) -> None:
    """Refuse, in one line, a curve whose ends are not the given end points (exactly: fitting keeps them fixed)."""
    for t, point, what in ((0.0, point_a, "--model-a"), (1.0, point_b, "--model-b" + (" aligned by --perms" if
                                                                                      aligned else ""))):  # fmt: skip
        ends = curve(t)
        if set(ends) != set(point) or any(not torch.equal(ends[k].detach().cpu(), point[k].detach().cpu())
                                          for k in point):  # fmt: skip
            raise ValueError(f"{source} was fitted between other end points: its t={t:g} is not {what}")


def export_point(model: torch.nn.Module, curve, t: float, data, bn_batches: int | None, out: Path) -> Path:
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


def add_curve_parser(sub: Any) -> None:
    """The sub-parser of ``neuralign curve``."""
    p = sub.add_parser("curve", help="fit a curve between two end points",
                       description="Fit a quadratic Bezier (or polygonal chain) between A and B, or B aligned by "
                       "--perms; writes curve.pt and curve.json.")  # fmt: skip
    add_common(p, out="neuralign-curve")
    add_pair(p)
    add_data(p)
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
    add_force(p)
    p.add_argument("--epochs", type=int, default=250, help="epochs (default: 250)")
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate (default: 0.1)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 on w(t) (default: 5e-4)")


# the commands of this module: name -> (add its sub-parser, run it)
COMMANDS = {
    "curve": (add_curve_parser, cmd_curve),
}

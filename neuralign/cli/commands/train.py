"""``neuralign train``: one end point with the paper's recipe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from neuralign._utils import atomic_save
from neuralign.cli.common import check_image_size, info, load_command_data, model_args, parse_device
from neuralign.cli.parser import add_arch, add_common, add_data, add_force, add_optimizer
from neuralign.cli.progress import ProgressBars
from neuralign.cli.runfolder import announce_resume, check_run, command_options

__all__ = ["cmd_train", "COMMANDS"]


def cmd_train(args: argparse.Namespace, bars: ProgressBars) -> list[Path]:
    device = parse_device(args.device)
    out = Path(args.out)
    path = out / f"{args.arch}_seed{args.seed}.pt"
    options = command_options(args, "arch", "width", "seed", "epochs", "lr", "weight_decay", "model_arg", "num_classes",
                              "optimizer")  # fmt: skip
    # end points of before --optimizer were trained with SGD
    if check_run(args, "train", options, outputs=[path], checkpoints=[path.with_suffix(".ckpt")],
                 normalize=lambda recorded: {"optimizer": "sgd", **recorded}) == "done":  # fmt: skip
        return [path]
    from neuralign.curves import evaluate_model  # past the skip: a finished result costs only the start-up
    from neuralign.experiments.models import build_model, builder_kwargs
    from neuralign.experiments.training import train_model

    data = load_command_data(args)
    kwargs = {**builder_kwargs(args.arch, data.in_channels, data.image_size, width=args.width), **model_args(args)}
    model = build_model(args.arch, data.num_classes, generator=args.seed, **kwargs).to(device)
    check_image_size(model, data, args)
    done = announce_resume("train", path.with_suffix(".ckpt"), args.epochs)
    bars({"stage": "train", "label": path.stem, "step": done, "total": args.epochs, "start": True})

    def on_epoch(record):
        bars({"stage": "train", "label": path.stem, "step": record["epoch"], "total": args.epochs, "record": record})

    res = train_model(model, data.train, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                      checkpoint=path.with_suffix(".ckpt"), callback=on_epoch, optimizer=args.optimizer)  # fmt: skip
    model.load_state_dict(res.state_dict)
    test_loss, test_acc = evaluate_model(model.eval(), data.test)
    atomic_save({
        "kind": "endpoint", "arch": args.arch, "num_classes": data.num_classes, "model_kwargs": kwargs,
        "seed": args.seed, "history": res.history, "test": {"test_loss": test_loss, "test_acc": test_acc},
        "dataset": data.describe(), "options": options,
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
    }, path)  # fmt: skip
    path.with_suffix(".ckpt").unlink(missing_ok=True)
    info(f"test accuracy {test_acc:.4f}, loss {test_loss:.4f}", file=sys.stderr)
    return [path]


def add_train_parser(sub: Any) -> None:
    """The sub-parser of ``neuralign train``."""
    p = sub.add_parser("train", help="train one end point with the paper's recipe",
                       description="Train a network with Nesterov SGD (lr 0.1, momentum 0.9, wd 5e-4, lr halved "
                       "every 20 epochs), or AdamW with --optimizer adamw (transformers such as tinylm), "
                       "checkpointing every epoch; writes <out>/<arch>_seed<seed>.pt.")  # fmt: skip
    add_common(p, out="neuralign-endpoints")
    add_data(p)
    add_arch(p, checkpoints=False)
    p.add_argument("--width", type=float, default=None, help="width multiplier (ResNet, VGG)")
    p.add_argument("--epochs", type=int, default=250, help="epochs (default: 250)")
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate (default: 0.1)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default: 5e-4)")
    add_optimizer(p)
    add_force(p)


# the commands of this module: name -> (add its sub-parser, run it)
COMMANDS = {
    "train": (add_train_parser, cmd_train),
}

"""``neuralign pam``: fit a curve jointly with the permutation (PAM)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from neuralign._utils import atomic_write_text
from neuralign.cli.common import (
    alignment_record,
    load_alignment,
    load_command_data,
    load_endpoints,
    parse_device,
    sgd_optimizer,
    state_of,
    table,
)
from neuralign.cli.progress import ProgressBars
from neuralign.cli.runfolder import announce_resume, check_run, command_options

__all__ = ["cmd_pam", "pam_options", "pam_table"]


# the P-step options of `neuralign pam`, each only with its method -> the field of its step object
_STEP_OPTIONS = {
    "linearized": {"max_moved": "max_moved", "p_steps": "p_steps"},
    "birkhoff": {"birkhoff_steps": "steps", "birkhoff_lr": "lr", "birkhoff_samples": "samples"},
}


# the options of CurvePAMOptions that the command sets -> its option words
_WORDS = {"pam.step.method": "--method", "pam.step.max_moved": "--max-moved", "pam.step.p_steps": "--p-steps",
          "pam.step.steps": "--birkhoff-steps", "pam.step.lr": "--birkhoff-lr",
          "pam.step.samples": "--birkhoff-samples", "pam.lam": "--lam", "pam.max_iter": "--iters",
          "pam.x_epochs": "--epochs", "pam.swap_trials": "--local-search",
          "pam.gradient_batches": "--gradient-batches", "pam.value_batches": "--value-batches"}  # fmt: skip


def pam_options(args: argparse.Namespace) -> Any:
    """The :class:`~neuralign.curves.CurvePAMOptions` of the command's options (the library's defaults for those
    not given); the P-step options of the other method are refused."""
    from neuralign.curves import CurvePAMOptions

    for method, names in _STEP_OPTIONS.items():
        given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]
        if method != args.method and given:
            raise ValueError(f"{', '.join(given)} apply to --method {method}, not {args.method}")
    step = CurvePAMOptions().replace(step=args.method).step
    step = step.replace(**{field: getattr(args, name) for name, field in _STEP_OPTIONS[args.method].items()
                           if getattr(args, name) is not None})  # fmt: skip
    given = {name: getattr(args, name) for name in ("gradient_batches", "value_batches")
             if getattr(args, name) is not None}  # fmt: skip
    return CurvePAMOptions(step=step, lam=args.lam, max_iter=args.iters, x_epochs=args.epochs,
                           swap_trials=args.local_search, **given)  # fmt: skip


def cmd_pam(args: argparse.Namespace, bars: ProgressBars) -> list[Path]:
    device = parse_device(args.device)
    out = Path(args.out)
    opts = pam_options(args)
    options = command_options(args, "model_a", "model_b", "init", "lr", "weight_decay", "seed",
                              files=("model_a", "model_b", "init"))  # fmt: skip
    options["pam"] = opts.to_dict()
    ckpt = out / "pam.ckpt"
    outputs = [out / "pam.json", out / "curve.pt", out / "perms.pt"]  # pam.json is written last
    state = check_run(args, "pam", options, outputs=outputs, checkpoints=[ckpt, ckpt.with_name(ckpt.name + ".xstep")],
                      words=_WORDS)  # fmt: skip
    if state == "done":
        return [out / "curve.pt", out / "perms.pt", out / "pam.json"]
    from neuralign.alignment import save_permutation_file  # past the skip: a finished result costs only the start-up
    from neuralign.curves import fit_curve_pam

    data = load_command_data(args)
    a, b, meta_a, meta_b = load_endpoints(args, device, data)
    init: Any = args.init
    if init not in ("identity", "alignment"):
        init = load_alignment(init, meta_a, meta_b, state_of(b)).perms
    total = args.iters * args.epochs
    done = announce_resume("pam", ckpt, args.iters, unit="iteration")
    bars({"stage": "pam", "label": str(args.init), "step": done * args.epochs, "total": total, "start": True})

    def on_event(record):
        if record["stage"] == "x-epoch":
            step = (record["iteration"] - 1) * args.epochs + record["epoch"] + 1
            bars({"stage": "pam", "label": str(args.init), "step": step, "total": total, "record": record})

    res = fit_curve_pam(
        a, state_of(a), state_of(b), data.train, init=init, align_loader=data.align, heldout_loader=data.train_eval,
        options=opts, optimizer=sgd_optimizer(args.lr), weight_decay=args.weight_decay, generator=args.seed,
        callback=on_event, checkpoint=out / "pam.ckpt",
    )  # fmt: skip
    res.curve.save(out / "curve.pt")
    settings = {"init": str(args.init), "seed": args.seed, **opts.to_dict()}
    record = alignment_record(res, meta_a, meta_b, method=f"pam-{args.method}", settings=settings)
    p2 = save_permutation_file(out / "perms.pt", record)
    summary = {"objective": res.history, "changed": res.changed, "backtracks": res.backtracks,
               "status": int(res.status), "message": res.message, "curve_history": res.curve_history,
               "options": options}  # fmt: skip
    p3 = atomic_write_text(out / "pam.json", json.dumps(summary, indent=1, default=str))  # last: marks it done
    ckpt.unlink(missing_ok=True)
    print(pam_table(res), file=sys.stderr)
    return [out / "curve.pt", p2, p3]


def pam_table(res) -> str:
    """Per outer iteration: the monitored objective and the units reassigned (in all groups)."""
    rows = [["0 (start)", f"{res.history[0]:.6g}", "", ""]]
    total = sum(res.spec.sizes.values())
    for k, fun in enumerate(res.history[1:], start=1):
        moved = sum(c[k - 1] for c in res.changed.values() if len(c) >= k)
        back = str(res.backtracks[k - 1]) if len(res.backtracks) >= k else ""
        rows.append([str(k), f"{fun:.6g}", f"{moved}/{total}", back])
    return table(["iteration", "objective", "units changed", "backtracks"], rows) + f"\n{res.message}"

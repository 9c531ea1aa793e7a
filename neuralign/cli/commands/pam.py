"""``neuralign pam``: fit a curve jointly with the permutation (PAM)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from neuralign import _json
from neuralign._options import set_path
from neuralign._utils import atomic_write_text
from neuralign.cli.common import (
    alignment_record,
    load_alignment,
    load_command_data,
    load_endpoints,
    parse_device,
    parse_overrides,
    sgd_optimizer,
    state_of,
    table,
)
from neuralign.cli.parser import add_common, add_data, add_force, add_pair
from neuralign.cli.progress import ProgressBars
from neuralign.cli.runfolder import announce_resume, check_run, command_options

__all__ = ["cmd_pam", "pam_options", "pam_table", "COMMANDS"]


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
    options = CurvePAMOptions(step=step, lam=args.lam, max_iter=args.iters, x_epochs=args.epochs,
                              swap_trials=args.local_search, **given)  # fmt: skip
    for path, value in parse_overrides(getattr(args, "set", None) or ()).items():  # any other option, by its path
        options = set_path(options, path, value)
    return options


# the command's options before 0.2 (recorded raw, without "pam") and their defaults then
_OPTIONS_01 = {"method": "linearized", "lam": 1000.0, "iters": 1, "epochs": 250, "local_search": 0, "max_moved": None,
               "p_steps": None, "birkhoff_steps": None, "birkhoff_lr": None, "birkhoff_samples": None,
               "gradient_batches": None, "value_batches": None, "set": None}  # fmt: skip


def _read_01(recorded: dict[str, Any]) -> dict[str, Any]:
    """Options recorded before 0.2 (the command's raw options, no "pam"): the PAM options they made."""
    if "pam" in recorded or "method" not in recorded:
        return recorded
    given = argparse.Namespace(**{k: d if recorded.get(k) is None else recorded[k] for k, d in _OPTIONS_01.items()})
    return {**recorded, "pam": pam_options(given).to_dict()}


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
                      words=_WORDS, normalize=_read_01)  # fmt: skip
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
    p3 = atomic_write_text(out / "pam.json", _json.dumps(summary))  # last: marks it done
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


def add_pam_parser(sub: Any) -> None:
    """The sub-parser of ``neuralign pam``."""
    p = sub.add_parser("pam", help="fit a curve jointly with the permutation (PAM)",
                       description="Proximal alternating minimisation over the Bezier control point and the "
                       "permutation of B; writes curve.pt, perms.pt and pam.json.")  # fmt: skip
    add_common(p, out="neuralign-pam")
    add_pair(p)
    add_data(p)
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
    p.add_argument("--value-batches", type=int, default=None,
                   help="training batches (at t = 0.25, 0.5, 0.75) scoring each P-step candidate (default: 8)")
    add_force(p)
    p.add_argument("--lr", type=float, default=0.1, help="curve learning rate (default: 0.1)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 on w(t) (default: 5e-4)")
    p.add_argument("--set", action="append", metavar="PATH=VALUE",
                   help="any other option of PAM on a curve (neuralign.curves.CurvePAMOptions), by its path, e.g. "
                        "--set swap_alpha=0.01 --set step.prox=1000 --set value_ts=0.5")  # fmt: skip


# the commands of this module: name -> (add its sub-parser, run it)
COMMANDS = {
    "pam": (add_pam_parser, cmd_pam),
}

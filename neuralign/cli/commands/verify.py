"""``neuralign verify``: check whether an alignment is locally optimal."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neuralign.cli.common import (
    announce_cost,
    info,
    load_alignment,
    load_command_data,
    load_endpoints,
    parse_device,
    state_of,
)
from neuralign.cli.parser import add_common, add_data, add_force, add_pair
from neuralign.cli.progress import ProgressBars
from neuralign.cli.runfolder import check_run, command_options

__all__ = ["verify_passes", "check_label", "cmd_verify", "COMMANDS"]


def verify_passes(options, checks: Sequence[str], data, spec, fit: bool) -> tuple[int, str]:
    """The forward passes :func:`~neuralign.verification.verify_alignment` makes with ``options`` (a
    :class:`~neuralign.verification.VerificationOptions`), by check; a backward pass counts as two. A scored move
    costs ``value_batches * len(value_ts)`` passes, a gradient estimate ``3 * gradient_batches * len(value_ts)``, a
    screened transposition the slices of the screening set it is raced on, as fractions of a batch, per time (every
    candidate the first slice of 32 examples, at most ``screen_pairs`` of them the rest: an upper bound, which the
    race meets where the changes are within noise of each other; a transposition screened through its group's
    chain of layers costs less than a pass, see :class:`~neuralign.verification.local._Screen`). A scored move
    stopped early by the sequential test costs less than counted."""
    o = options
    train, groups, ts = len(data.train), len(spec.sizes), len(o.value_ts)
    score, grad, epoch = o.value_batches * ts, 3 * o.gradient_batches * ts, 3 * train
    batch = max(1, data.train.batch_size)
    first = min(32, o.screen_examples)
    counts = [n * (n - 1) // 2 for n in spec.sizes.values()]
    counts = [min(c, 16 * o.screen_pairs) for c in counts if c > o.n_swaps + o.n_control_swaps]
    screened = sum(c * first + min(c, o.screen_pairs) * (o.screen_examples - first) for c in counts) / batch
    starts = 1 + o.identity_start + o.random_starts
    per_iteration = o.stability_x_epochs * epoch + grad + score * (1 + o.swap_trials * groups)
    parts = {
        "curve fit": fit * o.fit_epochs * epoch,
        "stability": "stability" in checks and starts * o.stability_iters * per_iteration,
        "certificate": "certificate" in checks and grad + groups * o.certificate_steps * score,
        "neighbourhood": "neighbourhood" in checks and grad + groups * (o.n_swaps + o.n_control_swaps) * score
        + screened * ts,
        "gradient": "gradient" in checks and grad + 26,
        "alignment": "alignment" in checks and 2 * len(data.align),
    }  # fmt: skip
    parts = {k: int(v) for k, v in parts.items() if v}
    return sum(parts.values()), ", ".join(f"{k} {v:,}" for k, v in parts.items())


def check_label(name: str, checks: Sequence[str], prefix: str = "") -> str:
    """``"certificate (2/5)"``: the check and its place among the checks that run."""
    return f"{prefix}{name} ({list(checks).index(name) + 1}/{len(checks)})"


def cmd_verify(args: argparse.Namespace, bars: ProgressBars) -> list[Path]:
    from neuralign.curves import Bezier
    from neuralign.study.plots import plot_reassignment
    from neuralign.verification import CHECKS, VerificationOptions, verify_alignment

    device = parse_device(args.device)
    out = Path(args.out)
    options = command_options(args, "model_a", "model_b", "perms", "curve", "checks", "fit_epochs", "lam", "iters",
                              "swaps", "local_search", "seed", "arch", "model_arg", "num_classes",
                              files=("model_a", "model_b", "perms", "curve"))  # fmt: skip
    outputs = [out / "verification.json", out / "verification.md"]
    if check_run(args, "verify", options, outputs=outputs) == "done":
        return outputs
    data = load_command_data(args)
    a, b, meta_a, meta_b = load_endpoints(args, device, data)
    record = load_alignment(args.perms, meta_a, meta_b, state_of(b))
    perms = record.perms
    curve = Bezier.load(args.curve).to(device) if args.curve else None
    checks = tuple(args.checks) if args.checks else CHECKS

    given = {"fit_epochs": args.fit_epochs, "lam": args.lam, "stability_iters": args.iters, "n_swaps": args.swaps,
             "swap_trials": args.local_search}  # fmt: skip
    options = VerificationOptions(**{k: v for k, v in given.items() if v is not None})
    passes, detail = verify_passes(options, checks, data, record.spec, curve is None)
    announce_cost("verify", passes, detail, a, data, device)

    def on_progress(event):
        # a check's first record carries its expected time (from a measured first step): the bars print it
        expected = {"expected_seconds": event["expected_seconds"]} if "expected_seconds" in event else {}
        bars({"stage": "verify", "label": check_label(event["check"], checks), "step": event["step"],
              "total": event["total"], "start": event["start"], **expected})  # fmt: skip

    report = verify_alignment(
        a, state_of(a), state_of(b), perms, data.train, curve=curve, checks=checks, heldout_loader=data.train_eval,
        align_loader=data.align, options=options, generator=args.seed, callback=on_progress,
    )  # fmt: skip
    paths = list(report.save(out))
    if "stability" in report.checks:
        paths.append(plot_reassignment(report.to_dict(), out / "reassignment.png"))
    info(f"verdict: {report.verdict}", file=sys.stderr)
    return paths


def add_verify_parser(sub: Any) -> None:
    """The sub-parser of ``neuralign verify``."""
    p = sub.add_parser("verify", help="check whether an alignment is locally optimal",
                       description="Run the checks of neuralign.verification.verify_alignment (PAM stability, "
                       "first-order certificate, neighbourhood swaps, gradient Taylor test, correlation "
                       "optimality); writes verification.json, verification.md and reassignment.png. It prints the "
                       "expected time before it starts. Cheaper settings: --checks certificate gradient alignment "
                       "(minutes: no PAM runs, no swap scoring), --iters 1, --swaps 8, --local-search 4, or a "
                       "--curve already fitted instead of --fit-epochs.")  # fmt: skip
    add_common(p, out="neuralign-verify")
    add_pair(p)
    add_data(p)
    p.add_argument("--perms", required=True, help="alignment.pt to verify")
    p.add_argument("--curve", default=None, help="a curve fitted for the aligned pair (fitted briefly if absent)")
    p.add_argument("--checks", nargs="*", default=None, help="subset of: stability certificate neighbourhood "
                   "gradient alignment")  # fmt: skip
    p.add_argument("--fit-epochs", type=int, default=None,
                   help="epochs of the curve fitted when --curve is absent (default: VerificationOptions', 2)")
    p.add_argument("--lam", type=float, default=None,
                   help="PAM step and certificate threshold (default: VerificationOptions', 1000)")
    p.add_argument("--iters", type=int, default=None,
                   help="PAM iterations of the stability check (default: VerificationOptions', 2)")
    p.add_argument("--swaps", type=int, default=32,
                   help="best-ranked transpositions scored per group, besides 4 random ones as a control (default: 32, "
                        "more than the library's 8: a command is run once, by hand)")
    p.add_argument("--local-search", type=int, default=None,
                   help="swaps PAM tries per group (default: VerificationOptions', 16)")
    add_force(p)


# the commands of this module: name -> (add its sub-parser, run it)
COMMANDS = {
    "verify": (add_verify_parser, cmd_verify),
}

"""``neuralign align`` and ``neuralign apply``: find and apply the permutation of B onto A."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from neuralign import _json
from neuralign._utils import atomic_write_text
from neuralign.cli.common import (
    alignment_record,
    export_aligned,
    load_command_data,
    load_endpoints,
    parse_device,
    table,
)
from neuralign.cli.parser import add_common, add_data, add_force, add_pair
from neuralign.cli.progress import ProgressBars
from neuralign.cli.runfolder import check_run, command_options

__all__ = ["cmd_align", "cmd_apply", "alignment_table", "COMMANDS"]


def cmd_align(args: argparse.Namespace, bars: ProgressBars) -> list[Path]:
    from neuralign.alignment import align, save_permutation_file
    from neuralign.experiments.checkpoints import WEIGHT_SUFFIXES

    if args.export is not None and Path(args.export).suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"--export must end in one of {list(WEIGHT_SUFFIXES)}, got {args.export!r}")
    device = parse_device(args.device)
    out = Path(args.out)
    options = command_options(args, "model_a", "model_b", "method", "seed", "arch", "model_arg", "num_classes",
                              files=("model_a", "model_b"))  # fmt: skip
    if check_run(args, "align", options, outputs=[out / "alignment.pt", out / "alignment.json"]) == "done":
        paths = [out / "alignment.pt", out / "alignment.json"]
        if args.export:
            from neuralign.alignment import load_permutation_file

            paths.append(export_aligned(args.model_b, load_permutation_file(out / "alignment.pt"), args.export))
        return paths
    data = load_command_data(args)
    a, b, meta_a, meta_b = load_endpoints(args, device, data)
    total = len(data.align)

    def on_batch(record: dict) -> None:
        bars({"stage": "align", "label": args.method, "step": record["step"], "total": total})

    bars({"stage": "align", "label": args.method, "step": 0, "total": total, "start": True})
    loader = data.align if args.method != "weight" else None
    example = next(iter(data.train))[0][:2].to(device)
    res = align(a, b, loader, method=args.method, example_input=example, generator=args.seed, callback=on_batch)
    settings = {"data": data.describe()["name"], "align_images": len(data.align.dataset), "seed": args.seed}
    record = alignment_record(res, meta_a, meta_b, method=res.method, settings=settings)
    p1 = save_permutation_file(out / "alignment.pt", record)
    record = dataclasses.replace(record, path=str(p1))
    summary = {k: v for k, v in record.header().items() if k not in ("spec", "results")}
    summary.update(record.results, sizes=res.spec.sizes, objective_before=res.objective_before,
                   objective_after=res.objective_after, message=res.message)  # fmt: skip
    p2 = atomic_write_text(out / "alignment.json", _json.dumps(summary))
    print(alignment_table(res), file=sys.stderr)
    paths = [p1, p2]
    if args.export:
        paths.append(export_aligned(args.model_b, record, args.export))
    return paths


def cmd_apply(args: argparse.Namespace, bars: ProgressBars) -> list[Path]:
    from neuralign.alignment import load_permutation_file

    record = load_permutation_file(args.perms)
    if args.arch is not None:
        record.check_pair(arch=args.arch)
    return [export_aligned(args.model, record, args.out)]


def alignment_table(res) -> str:
    """Per group: units, mean correlation of matched units before and after alignment (or the weight objective)."""
    if res.correlation_before:
        header = ["group", "units", "corr before", "corr after"]
        values = [(res.correlation_before.get(g, float("nan")), res.correlation_after.get(g, float("nan")))
                  for g in res.spec.groups]  # fmt: skip
    else:
        header = ["group", "units", "objective before", "objective after"]
        values = [(res.objective_before.get(g, float("nan")), res.objective_after.get(g, float("nan")))
                  for g in res.spec.groups]  # fmt: skip
    rows = [[g, str(res.spec.sizes[g]), f"{before:.4f}", f"{after:.4f}"]
            for g, (before, after) in zip(res.spec.groups, values)]  # fmt: skip
    return table(header, rows)


def add_align_parser(sub: Any) -> None:
    """The sub-parser of ``neuralign align``."""
    p = sub.add_parser("align", help="align end point B to A",
                       description="Find the permutation of B's hidden units that matches A's: correlation of "
                       "post-activations (the paper), l2 (uncentred cross moments) or weight matching. Writes "
                       "alignment.pt (the permutation) and alignment.json (per-layer correlations).")  # fmt: skip
    add_common(p, out="neuralign-align")
    add_pair(p)
    add_data(p)
    from neuralign.alignment import ALIGNMENT_METHODS  # the library's registry: a new method needs no change here

    p.add_argument("--method", choices=ALIGNMENT_METHODS, default="correlation",
                   help="matching method (default: correlation)")  # fmt: skip
    p.add_argument("--export", default=None, metavar="FILE",
                   help="also write B permuted into A's frame to FILE (.safetensors, .pt or .pth; see `apply`)")
    add_force(p)


def add_apply_parser(sub: Any) -> None:
    """The sub-parser of ``neuralign apply``."""
    p = sub.add_parser("apply", help="write end point B permuted into A's frame",
                       description="Apply a permutation file (alignment.pt of `align`, perms.pt of `pam`) to the "
                       "checkpoint it was computed for and write the aligned weights to --out: .safetensors, or "
                       ".pt/.pth in the input's own layout (same wrapper and key prefix), loadable by the model's "
                       "own class with load_state_dict(strict=True). A file computed for another architecture or "
                       "another pair is refused.")  # fmt: skip
    add_common(p, out="b_aligned.safetensors", out_help="the aligned weights to write: .safetensors, .pt or .pth "
                "(default: b_aligned.safetensors)")  # fmt: skip
    p.add_argument("--model", required=True, help="end point B (any format `align` reads)")
    p.add_argument("--perms", required=True, help="permutation file (alignment.pt, perms.pt or .safetensors)")
    p.add_argument("--arch", default=None, help="architecture of --model, checked against the permutation file's")


# the commands of this module: name -> (add its sub-parser, run it)
COMMANDS = {
    "align": (add_align_parser, cmd_align),
    "apply": (add_apply_parser, cmd_apply),
}

"""``neuralign align`` and ``neuralign apply``: find and apply the permutation of B onto A."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from neuralign._utils import atomic_write_text
from neuralign.cli.common import (
    alignment_record,
    export_aligned,
    load_command_data,
    load_endpoints,
    parse_device,
    table,
)
from neuralign.cli.progress import ProgressBars

__all__ = ["cmd_align", "cmd_apply", "alignment_table"]


def cmd_align(args: argparse.Namespace, bars: ProgressBars) -> list[Path]:
    from neuralign.alignment import align, save_permutation_file
    from neuralign.experiments.checkpoints import WEIGHT_SUFFIXES

    if args.export is not None and Path(args.export).suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"--export must end in one of {list(WEIGHT_SUFFIXES)}, got {args.export!r}")
    device = parse_device(args.device)
    data = load_command_data(args)
    a, b, meta_a, meta_b = load_endpoints(args, device, data)
    total = len(data.align)

    def on_batch(n: int) -> None:
        bars({"stage": "align", "label": args.method, "step": n, "total": total})

    bars({"stage": "align", "label": args.method, "step": 0, "total": total, "start": True})
    loader = data.align if args.method != "weight" else None
    example = next(iter(data.train))[0][:2].to(device)
    res = align(a, b, loader, method=args.method, example_input=example, callback=on_batch)
    out = Path(args.out)
    settings = {"data": data.describe()["name"], "align_images": len(data.align.dataset), "seed": args.seed}
    record = alignment_record(res, meta_a, meta_b, method=res.method, settings=settings)
    p1 = save_permutation_file(out / "alignment.pt", record)
    record = dataclasses.replace(record, path=str(p1))
    summary = {k: v for k, v in record.header().items() if k not in ("spec", "results")}
    summary.update(record.results, sizes=res.spec.sizes, objective_before=res.objective_before,
                   objective_after=res.objective_after, message=res.message)  # fmt: skip
    p2 = atomic_write_text(out / "alignment.json", json.dumps(summary, indent=1))
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

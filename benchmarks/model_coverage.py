"""Coverage of the tracer on torchvision classification models: which ones ``trace_spec`` handles, and whether the
spec it returns keeps the function unchanged.

For each model (random weights, seeded, 10 classes) the script traces a permutation spec and reports: traced or
refused (with the fx node named by the ``SpecError``), the number of permutation groups and units, the share of
units read from data by correlation alignment (groups with an activation tap), the float64 equivalence
difference of one random permutation (the larger of eval and train mode, relative to each output entry;
``check_equivalence`` with ``trials=1``), the random operations found, and the trace time. A model that raises
anything other than ``SpecError`` is reported as an error row: that is a bug.

Constant tensors cannot reveal a misplaced permutation (a zero-initialised head makes the output constant, a
batch norm with running mean 0 and variance 1 looks the same under any relabelling), so every floating parameter
or buffer whose entries are all equal (value ``c``) is re-drawn before the check as ``c + 0.1 * N(0, 1)`` from a
seeded generator (running variances as ``U(0.5, 1.5)``).

    python benchmarks/model_coverage.py [--models resnet18,vit_b_16] [--out docs/model_coverage.md] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from neuralign.alignment import trace_spec
from neuralign.errors import SpecError
from neuralign.verification import check_equivalence

# Model -> (constructor keyword arguments, input side). The side is the smallest convenient one each model accepts:
# 64 for most; vit_b_16 is built for 32x32 images (2x2 patches of 16); inception_v3 runs from 75 in eval mode, but
# its auxiliary head (train mode, kept so that the trace covers it) needs the 17x17 map of a 299 input.
MODELS: dict[str, tuple[dict, int]] = {
    "resnet18": ({}, 64),
    "resnet50": ({}, 64),
    "wide_resnet50_2": ({}, 64),
    "resnext50_32x4d": ({}, 64),
    "vgg11_bn": ({}, 64),
    "mobilenet_v2": ({}, 64),
    "mobilenet_v3_small": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "densenet121": ({}, 64),
    "squeezenet1_1": ({}, 64),
    "shufflenet_v2_x0_5": ({}, 64),
    "regnet_x_400mf": ({}, 64),
    "convnext_tiny": ({}, 64),
    "googlenet": ({"aux_logits": True, "init_weights": True}, 64),
    "inception_v3": ({"aux_logits": True, "init_weights": True}, 299),
    "vit_b_16": ({"image_size": 32}, 32),
    "swin_t": ({}, 64),
}
BATCH = 2
TOL = 1e-9  # check_equivalence's float64 default
_NODE = re.compile(r"fx node `([^`]+)` \(([^)]+)\)")


@dataclass(frozen=True)
class CoverageRow:
    """One model's outcome.

    ``status`` is ``"traced"``, ``"refused"`` (``trace_spec`` raised ``SpecError``; ``node`` and ``op`` are the fx
    node and op it names, if any) or ``"error"`` (any other exception, from tracing or from the check: a bug).
    ``max_diff`` is the larger of ``max_diff_eval`` and ``max_diff_train``, ``passed`` whether it is within ``TOL``.
    """

    model: str
    input_shape: tuple[int, ...]
    n_params: int
    status: str
    message: str = ""
    node: str = ""
    op: str = ""
    groups: int = 0
    units: int = 0
    tapped_fraction: float = 0.0
    max_diff: float = float("nan")
    passed: bool = False
    stochastic: tuple[str, ...] = field(default=())
    trace_seconds: float = float("nan")
    check_seconds: float = float("nan")


def randomize_constants(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw every floating parameter and buffer whose entries are all equal (in place; returns ``model``)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    with torch.no_grad():
        for name, t in tensors:
            if not t.is_floating_point() or t.numel() == 0 or not bool((t == t.flatten()[0]).all()):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.add_(0.1 * torch.randn(t.shape, generator=gen))
    return model


def build(name: str, *, seed: int = 0, num_classes: int = 10) -> nn.Module:
    """``torchvision.models.<name>(weights=None, num_classes=...)``, initialised from ``seed``, constants re-drawn."""
    kwargs, _ = MODELS.get(name, ({}, 64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kwargs)
    return randomize_constants(model, seed + 1)


def tapped_fraction(spec) -> float:
    """Units of groups that have an activation tap (aligned from data by correlation) over all units; the others
    (groups split or coarsened by the tracer, train-only branches) are matched by their weights."""
    units = sum(spec.sizes.values())
    return sum(n for g, n in spec.sizes.items() if spec.taps.get(g)) / units if units else 0.0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def coverage_row(name: str, *, side: int | None = None, seed: int = 0) -> CoverageRow:
    """Build ``name``, trace it on a ``BATCH x 3 x side x side`` input and check the spec; never raises."""
    side = side if side is not None else MODELS.get(name, ({}, 64))[1]
    shape = (BATCH, 3, side, side)
    try:
        model = build(name, seed=seed)
    except Exception as exc:  # noqa: BLE001 - reported as an error row
        return CoverageRow(name, shape, 0, "error", _first_line(exc))
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    try:
        t0 = time.perf_counter()
        spec = trace_spec(model, x)
        trace_seconds = time.perf_counter() - t0
    except SpecError as exc:
        found = _NODE.search(str(exc))
        node, op = found.groups() if found else ("", "")
        return CoverageRow(name, shape, n_params, "refused", _first_line(exc), node, op)
    except Exception as exc:  # noqa: BLE001
        return CoverageRow(name, shape, n_params, "error", _first_line(exc))
    fraction = tapped_fraction(spec)
    try:
        t0 = time.perf_counter()
        res = check_equivalence(model, spec, x, trials=1, generator=seed, tol=TOL)
        check_seconds = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - SpecError here means the traced spec does not fit: a bug too
        message = "check_equivalence: " + _first_line(exc)
        return CoverageRow(
            name,
            shape,
            n_params,
            "error",
            message,
            groups=len(spec.sizes),
            units=sum(spec.sizes.values()),
            tapped_fraction=fraction,
            trace_seconds=trace_seconds,
        )
    diff = max(res.max_diff_eval, res.max_diff_train)
    return CoverageRow(
        name, shape, n_params, "traced", res.message, groups=len(spec.sizes), units=sum(spec.sizes.values()),
        tapped_fraction=fraction, max_diff=diff, passed=diff <= TOL, stochastic=tuple(res.stochastic),
        trace_seconds=trace_seconds, check_seconds=check_seconds,
    )  # fmt: skip


def format_table(rows: list[CoverageRow]) -> str:
    """The markdown table, then the full message of every refused or failed model."""
    lines = [
        "| model | input | params (M) | status | groups | units | units with a tap | float64 diff (eval/train max) "
        "| random ops | trace (s) | check (s) |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        shape = "x".join(map(str, r.input_shape))
        if r.status == "traced":
            status = "traced" if r.passed else "traced, **CHECK FAILS**"
            cells = [str(r.groups), str(r.units), f"{r.tapped_fraction:.0%}", f"{r.max_diff:.1e}",
                     ", ".join(r.stochastic) or "-", f"{r.trace_seconds:.2f}", f"{r.check_seconds:.2f}"]  # fmt: skip
        else:
            if r.status == "error":
                status = "ERROR"
            else:
                status = f"refused at `{r.node}` ({r.op})" if r.node else "refused"
            traced_in = f"{r.trace_seconds:.2f}" if r.trace_seconds == r.trace_seconds else "-"
            cells = [str(r.groups) if r.groups else "-", str(r.units) if r.groups else "-"]
            cells += [f"{r.tapped_fraction:.0%}" if r.groups else "-"]
            cells += ["-", "-", traced_in, "-"]
        lines.append(f"| {r.model} | {shape} | {r.n_params / 1e6:.1f} | {status} | " + " | ".join(cells) + " |")
    notes = [f"- **{r.model}** ({r.status}): {r.message}" for r in rows if r.status != "traced" or not r.passed]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision model names")
    parser.add_argument("--out", type=Path, default=Path("docs/model_coverage.md"), help="markdown file to write")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if not callable(getattr(torchvision.models, n, None))]
    if unknown:
        parser.error(f"unknown torchvision model(s) {unknown}")

    start = time.perf_counter()
    rows = []
    for name in names:
        t0 = time.perf_counter()
        row = coverage_row(name, seed=args.seed)
        rows.append(row)
        print(f"[{time.perf_counter() - t0:6.1f}s] {name}: {row.status} {row.message}", file=sys.stderr, flush=True)
    total = time.perf_counter() - start

    table = format_table(rows)
    print(table)
    print(f"\ntotal run time {total:.0f} s")
    if args.out:
        command = " ".join(["python benchmarks/model_coverage.py", *(sys.argv[1:] if argv is None else argv)])
        _write_atomic(args.out, render_doc(table, command=command, total=total, threads=args.threads, seed=args.seed))


def _revision() -> str:
    """The commit of the working tree, marked ``+ uncommitted changes in neuralign/`` when the library differs."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "neuralign"], cwd=root, capture_output=True,
                               text=True)  # fmt: skip
    except OSError:
        return "unknown"
    rev = head.stdout.strip() or "unknown"
    return rev + (" + uncommitted changes in neuralign/" if dirty.stdout.strip() else "")


def render_doc(table: str, *, command: str, total: float, threads: int, seed: int) -> str:
    """``docs/model_coverage.md``: how the table was made, what its columns mean, the table."""
    paragraphs = [
        "# Tracer coverage on torchvision models",
        "Generated by `benchmarks/model_coverage.py`; do not edit by hand.",
        f"- command: `{command}`\n"
        f"- date: {datetime.date.today().isoformat()}; total run time {total:.0f} s\n"
        f"- neuralign revision: {_revision()}\n"
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, Python {platform.python_version()}, "
        f"{threads} thread(s), CPU",
        f"Models: `torchvision.models.<name>(weights=None, num_classes=10)` initialised from seed {seed}; googlenet "
        "and inception_v3 with `aux_logits=True` (inception_v3 then needs a 299x299 input: its auxiliary head, run in "
        "train mode, needs a 17x17 map; 75x75 suffices in eval mode), vit_b_16 with `image_size=32` (2x2 patches). "
        f"Input: a batch of {BATCH} standard-normal images of the size shown. Constant tensors cannot reveal a "
        "misplaced permutation (torchvision zero-initialises some heads, e.g. ViT's, which makes the output "
        "constant; biases start at 0, batch norms at mean 0 and variance 1), so every floating parameter or buffer "
        "whose entries are all equal (value c) is re-drawn from a seeded generator as c + 0.1 N(0, 1), running "
        "variances as U(0.5, 1.5).",
        "Columns: *status* is `traced`, `refused at <fx node> (<op>)` (the node named by the `SpecError`) or "
        "`ERROR` (any other exception, from tracing or from the check: a bug). *groups* is the number of "
        "permutation groups and *units* the sum of their sizes. *units with a tap* is the share of units whose group "
        "has an activation tap, so that correlation alignment reads it from data; the rest (groups the tracer "
        "split or coarsened, e.g. around grouped convolutions, and train-only branches) are matched by their "
        "weights. *float64 diff* is "
        "`check_equivalence(..., trials=1)`: one random permutation of every group, the larger of the eval-mode "
        "and train-mode output differences relative to each output entry (at least 1e-3 of its tensor's largest), "
        f"tolerance {TOL:g}. *random ops* are the "
        "random operations found (replaced by their expectation during the check). *trace* is the time of "
        "`trace_spec`, *check* that of `check_equivalence`.",
        table,
    ]
    return "\n\n".join(paragraphs) + "\n"


if __name__ == "__main__":
    main()

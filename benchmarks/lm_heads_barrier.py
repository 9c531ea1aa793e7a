"""Evidence (issue 21): the linear-interpolation loss barrier of the zoo's language model ``tinylm`` on the byte-level
``pydoc`` corpus, naive, aligned with the attention-head structure, and aligned ignoring it.

For each of ``--pairs`` pairs of TinyLMs (width 64, 2 blocks, 4 query heads, 2 key/value heads, SwiGLU 128, RMSNorm,
RoPE, tied embeddings; about 90k parameters) trained from seeds 2i and 2i+1 with the same recipe (AdamW through
:func:`neuralign.experiments.training.train_model`), every method finds a permutation of B and the segment from A to
the permuted B is evaluated on the test windows with :func:`neuralign.curves.evaluate_interpolation` (both barrier
definitions):

- ``naive``: the identity;
- ``correlation``: head-structured activation matching (``align(method="correlation")``: per pair of heads the best
  inside assignment, an outer assignment of heads; Verma & Elbayad 2024, arXiv:2403.00986, Sec. 3);
- ``weight``: head-structured weight matching (``align(method="weight")``, the structured coordinate ascent);
- ``correlation_flat``: activation matching ignoring the heads (``align(..., heads=False)``: one flat assignment
  per group, Verma & Elbayad's "ignore heads" ablation). Not function-preserving: the permuted B is another model,
  so its loss at the end of the segment is reported too (``loss_b_permuted`` against ``loss_b``), and the barrier
  also against the original end points (``loss_barrier_vs_original``: max over the segment minus ½(L_A + L_B)),
  and per group with heads how many units the flat assignment puts in a head block with another source head than
  the block's most common one (``units_off_head``; 0 for a structured permutation).

    OMP_NUM_THREADS=1 python benchmarks/lm_heads_barrier.py [--pairs 3] [--epochs 8] [--cache runs/lm_heads]
        [--out docs/evidence/tinylm_pydoc]

End points are cached under ``--cache`` (one ``.pt`` per seed), so a rerun only aligns and evaluates.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from neuralign._utils import environment_versions
from neuralign.alignment import align, apply_permutation, identity_permutation, trace_spec
from neuralign.curves import InterpolationProtocol, evaluate_interpolation, evaluate_model
from neuralign.experiments.data import load_data
from neuralign.experiments.models import build_model
from neuralign.experiments.training import train_model

METHODS = ("naive", "correlation", "weight", "correlation_flat")


def cosine(epochs: int):
    return lambda e: 0.5 * (1.0 + math.cos(math.pi * e / epochs))


def endpoint(seed: int, args: argparse.Namespace, data) -> tuple[torch.nn.Module, dict]:
    path = Path(args.cache) / f"tinylm_seed{seed}_e{args.epochs}.pt"
    model = build_model("tinylm", data.num_classes, generator=seed)
    if path.exists():
        saved = torch.load(path, weights_only=False)
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved["record"]
    t0 = time.perf_counter()
    res = train_model(model, data.train, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                      optimizer="adamw", lr_lambda=cosine(args.epochs))  # fmt: skip
    seconds = time.perf_counter() - t0
    model.load_state_dict(res.state_dict)
    loss, acc = evaluate_model(model.eval(), data.test)
    record = {"seed": seed, "test_loss": loss, "test_acc": acc, "train_seconds": seconds,
              "final_train_loss": res.history[-1]["train_loss"]}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": res.state_dict, "record": record}, path)
    print(f"seed {seed}: test loss {loss:.4f}, acc {acc:.4f} ({seconds:.0f} s)", flush=True)
    return model.eval(), record


def units_off_head(spec, perms) -> dict[str, str]:
    """Per group with heads: units whose source head is not the most common one of their destination head block."""
    out = {}
    for g, h in spec.items():
        source = (perms[g] // (h.size * h.tie)).view(-1, h.size * h.tie)
        stray = sum(int((row != torch.mode(row).values).sum()) for row in source)
        out[g] = f"{stray}/{perms[g].numel()}"
    return out


def run_pair(index: int, args: argparse.Namespace, data, spec) -> dict:
    a, rec_a = endpoint(2 * index, args, data)
    b, rec_b = endpoint(2 * index + 1, args, data)
    protocol = InterpolationProtocol(num_points=args.points, splits=("test",))
    sd_a, sd_b = a.state_dict(), b.state_dict()
    out = {"pair": index, "seeds": [2 * index, 2 * index + 1], "endpoints": [rec_a, rec_b], "methods": {}}
    for method in METHODS:
        t0 = time.perf_counter()
        if method == "naive":
            used, perms = spec, identity_permutation(spec)
        elif method == "weight":
            res = align(a, b, method="weight", spec=spec, generator=index)
            used, perms = res.spec, res.perms
        else:
            res = align(a, b, data.align, method="correlation", heads=method == "correlation", generator=index)
            used, perms = res.spec, res.perms
        seconds = time.perf_counter() - t0
        sd_p = apply_permutation(sd_b, used, perms)
        curve = evaluate_interpolation(a, sd_a, sd_p, data.train_eval, data.test, protocol=protocol)
        s = curve.splits["test"]
        la, lb = rec_a["test_loss"], rec_b["test_loss"]
        out["methods"][method] = {
            "loss": list(s.loss), "accuracy": list(s.accuracy),
            "loss_barrier": s.loss_barrier_average, "loss_barrier_linear": s.loss_barrier_linear,
            "accuracy_barrier": s.accuracy_barrier_average, "midpoint_loss": s.midpoint_loss,
            "loss_b": lb, "loss_b_permuted": s.endpoint_loss[1],
            "loss_barrier_vs_original": max(s.loss) - 0.5 * (la + lb),
            "align_seconds": seconds,
            "units_off_head": units_off_head(spec.heads, perms),
        }  # fmt: skip
        print(f"pair {index} {method:17s} barrier {s.loss_barrier_average:.4f} (vs original end points "
              f"{max(s.loss) - 0.5 * (la + lb):.4f}), L(B') - L(B) {s.endpoint_loss[1] - lb:+.2e}", flush=True)
    return out


def summary(pairs: list[dict]) -> dict:
    keys = ("loss_barrier", "loss_barrier_linear", "loss_barrier_vs_original", "midpoint_loss", "accuracy_barrier",
            "align_seconds")  # fmt: skip
    table = {}
    for method in METHODS:
        row = {}
        for key in keys:
            values = [p["methods"][method][key] for p in pairs]
            row[key] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        changes = [p["methods"][method]["loss_b_permuted"] - p["methods"][method]["loss_b"] for p in pairs]
        row["endpoint_change"] = {"mean": statistics.mean(changes), "max_abs": max(abs(c) for c in changes)}
        table[method] = row
    return table


def markdown(table: dict) -> str:
    lines = ["| method | loss barrier | loss barrier (linear) | barrier vs original end points | midpoint loss | "
             "accuracy barrier | L(B') − L(B) | align seconds |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for method, row in table.items():
        cells = [f"{row[k]['mean']:.4f} ± {row[k]['std']:.4f}" for k in
                 ("loss_barrier", "loss_barrier_linear", "loss_barrier_vs_original", "midpoint_loss",
                  "accuracy_barrier")]  # fmt: skip
        change = row["endpoint_change"]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {change['mean']:+.2e} (max {change['max_abs']:.1e}) "
                     f"| {row['align_seconds']['mean']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--align-size", type=int, default=2000, help="training windows for the correlations")
    p.add_argument("--points", type=int, default=11)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default="runs/lm_heads")
    p.add_argument("--out", default="docs/evidence/tinylm_pydoc")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data(f"pydoc:{args.context}", batch_size=args.batch_size, align_size=args.align_size, generator=0)
    spec = trace_spec(build_model("tinylm", data.num_classes, generator=0), torch.zeros(2, 8, dtype=torch.long))
    pairs = [run_pair(i, args, data, spec) for i in range(args.pairs)]
    table = summary(pairs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"kind": "lm_heads_barrier", "config": vars(args), "data": data.describe() | {"class_names": None},
              "environment": environment_versions(), "pairs": pairs, "summary": table}  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "results.md").write_text(markdown(table))
    print(markdown(table))


if __name__ == "__main__":
    main()

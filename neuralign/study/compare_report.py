"""The report of ``neuralign compare`` (:mod:`neuralign.study.compare`): per method and quantity the mean and
sample standard deviation over the pairs (:func:`summary_table`), the markdown report with the table, the protocol
and the method x method agreement (:func:`write_comparison_report`), and the figure of loss and accuracy against λ
with one band per method (:func:`plot_comparison`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from neuralign._utils import atomic_write_text
from neuralign.experiments.data.text import parse_text_dataset
from neuralign.study.report import _fmt_number, _mean_std

__all__ = ["plot_comparison", "summary_table", "write_comparison_report"]


# ------------------------------------------------------------------------------------------------- summary
_ROWS = (  # (results key path, column title, percent?)
    ("test.loss_barrier_average", "test loss barrier", False),
    ("test.accuracy_barrier_average", "test acc. barrier (pts)", True),
    ("train.loss_barrier_average", "train loss barrier", False),
    ("train.accuracy_barrier_average", "train acc. barrier (pts)", True),
    ("test.loss_barrier_linear", "test loss barrier (linear)", False),
    ("test.accuracy_barrier_linear", "test acc. barrier (linear, pts)", True),
    ("test.midpoint_accuracy", "midpoint test acc. (%)", True),
    ("test.loss_auc", "test loss AUC", False),
)


def _value(entry: Mapping[str, Any], key: str) -> float | None:
    if key in ("seconds", "data_passes"):
        v = entry["cost"].get(key)
        return None if v is None else float(v)
    if key in ("curve_avg", "curve_min"):  # the paper's Avg (arc-length weighted) and Min along the Bezier curve
        field = "avg_accuracy" if key == "curve_avg" else "min_accuracy"
        return None if entry.get("curve") is None else float(entry["curve"][field])
    split, field = key.split(".")
    splits = entry["evaluation"]["splits"]
    return float(splits[split][field]) if split in splits else None


def summary_table(pairs: list[Mapping[str, Any]], methods: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Per method and quantity, mean and sample std over pairs (``{"mean", "std", "n"}``; std None for one pair)."""
    keys = [k for k, _, _ in _ROWS] + ["curve_avg", "curve_min", "seconds", "data_passes"]
    out: dict[str, Any] = {}
    for m in methods:
        out[m] = {}
        for key in keys:
            values = [_value(p["methods"][m], key) for p in pairs]
            if any(v is None for v in values):
                continue
            mean, std = _mean_std(values)
            out[m][key] = {"mean": mean, "std": std, "n": len(values)}
    return out


def _fmt(stat: Mapping[str, Any] | None, scale: float, decimals: int) -> str:
    if not stat:
        return "—"
    text = _fmt_number(scale * stat["mean"], decimals)
    if stat.get("std") is not None:
        text += " ± " + _fmt_number(scale * stat["std"], decimals)
    return text


def _test_set(results: Mapping[str, Any]) -> str:
    """The test set's size in the report's words, and what one prediction is worth in accuracy points: images, or a
    text dataset's windows, whose every token is one prediction (:func:`~neuralign.curves.evaluate_model`)."""
    n = int(results["test_images"])
    text = parse_text_dataset(results["config"]["data"]["dataset"])
    if text is None:
        return f"Test set: {n} images (one image is {100 / n:.2g} points)."
    tokens = n * text[1]
    return (f"Test set: {n} windows of {text[1]} tokens, {tokens} next-token predictions (one prediction is "
            f"{100 / tokens:.2g} points).")  # fmt: skip


def write_comparison_report(results: Mapping[str, Any], path: Path, *, figure: Path | None = None) -> Path:
    """Write the comparison's markdown report (the table, the agreement matrix, the protocol) atomically."""
    methods = results["methods"]
    summary = results["summary"]
    protocol = results["protocol"]
    config = results["config"]
    n = len(results["pairs"])
    lines = [f"# Alignment methods compared: {config['model']['arch']} on {config['data']['dataset']}", "",
             f"{n} pair{'s' if n != 1 else ''} of end points"
             + (", mean ± sample std over pairs." if n > 1 else "."), ""]  # fmt: skip
    ends = [(q["endpoints"]["a"]["test_acc"] + q["endpoints"]["b"]["test_acc"]) / 2 for q in results["pairs"]]
    lines += [f"End points' test accuracy (mean of A and B): "
              f"{', '.join(_fmt_number(100 * e, 2) for e in ends)} % (pairs 1..{n}), as trained (their stored "
              f"batch-norm statistics, if any; λ = 0 and 1 below follow the protocol's batch norm). "
              f"{_test_set(results)}",
              ""]  # fmt: skip
    columns = [(k, title, pct) for k, title, pct in _ROWS]
    if config.get("fit_curves"):
        columns += [("curve_avg", "Bezier curve Avg test acc. (%)", True),
                    ("curve_min", "Bezier curve Min test acc. (%)", True)]
    columns += [("seconds", "wall seconds", False), ("data_passes", "data passes", False)]
    verified = config.get("verification") is not None
    header = ["method", *(title for _, title, _ in columns)] + (["verification (pairs)"] if verified else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        cells = [m]
        for key, _, pct in columns:
            decimals = 1 if key == "seconds" else 2 if pct or key == "data_passes" else 3
            cells.append(_fmt(summary[m].get(key), 100.0 if pct else 1.0, decimals))
        if verified:
            cells.append(_verdict_counts([q["methods"][m]["verification"]["verdict"] for q in results["pairs"]]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Barriers: *average* is max_λ L(λ) − ½(L_A + L_B) (Ainsworth et al. 2023); *linear* is "
              "max_λ [L(λ) − ((1−λ)L_A + λL_B)] (Garipov et al. 2018, Entezari et al. 2022, Theus et al. 2025). "
              "Accuracy barriers are the drop (positive is worse), in percentage points. AUC: trapezoid of the test "
              "loss over λ ∈ [0, 1]. Wall seconds and data passes are the method's cost (data passes: epochs over "
              "the training data for the learned methods and PAM's curve epochs, one pass over the alignment data "
              "for correlation and l2, none for weight matching and the identity)."
              + (" Bezier curve Avg and Min: the arc-length-weighted average and the minimum of the test accuracy "
                 "along each method's fitted quadratic Bezier curve, end points included (Tatro et al. 2020, "
                 "Table 1)." if config.get("fit_curves") else ""), ""]  # fmt: skip
    lines += ["## Protocol", "", f"- λ grid: {protocol['num_points']} evenly spaced points in [0, 1]",
              f"- batch norm: {protocol['bn']}"
              + (f" ({protocol['max_bn_batches']} training batches per estimate)" if protocol['max_bn_batches'] else
                 " (full passes)"),
              f"- splits: {', '.join(protocol['splits'])}",
              f"- alignment data: {protocol['alignment_data']} ({protocol['alignment_size']} examples)",
              ""]  # fmt: skip
    if figure is not None:
        lines += [f"![loss and accuracy along λ]({figure.relative_to(path.parent).as_posix()})", ""]
    if verified:
        lines += _verification_lines(results)
    lines += ["## Agreement", "", "Share of hidden units two methods map alike (mean over pairs).", "",
              "| | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]  # fmt: skip
    for m, row in zip(methods, results["agreement"]):
        lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    lines.append("")
    atomic_write_text(path, "\n".join(lines))
    return path


def _verdict_counts(verdicts: list[str]) -> str:
    """``"2 pass, 1 fail"``: how many pairs have each verdict, in the order pass, fail, inconclusive."""
    return ", ".join(f"{verdicts.count(v)} {v}" for v in ("pass", "fail", "inconclusive") if verdicts.count(v))


def _verification_lines(results: Mapping[str, Any]) -> list[str]:
    """The report's verification section: per method and pair, each check's verdict and what a failing check
    found."""
    from neuralign.verification import CHECKS

    pairs = results["pairs"]
    checks = [c for c in CHECKS if any(c in q["methods"][m]["verification"]["checks"] for q in pairs
                                       for m in results["methods"])]  # fmt: skip
    lines = ["## Verification", "", "Each method's permutation checked for local optimality on its Bezier curve "
             "(`neuralign.verification.verify_alignment`: a check fails when it finds a move that improves the "
             "curve objective significantly). Per pair, each check's verdict; the full reports are linked.", "",
             "| method | pair | " + " | ".join(checks) + " | verdict |", "|" + "---|" * (len(checks) + 3)]  # fmt: skip
    failing = []
    for m in results["methods"]:
        for q in pairs:
            v = q["methods"][m]["verification"]
            cells = [v["checks"].get(c, "—") for c in checks]
            lines.append(f"| {m} | {q['pair']} | " + " | ".join(cells) + f" | [{v['verdict']}]({v['report']}) |")
            failing += [f"- {m}, pair {q['pair']}, {c}: {text}" for c, text in v["failing"].items()]
    lines.append("")
    if failing:
        lines += ["Failing checks:", "", *failing, ""]
    return lines


def plot_comparison(results: Mapping[str, Any], path: Path) -> Path:
    """Loss (log scale, so that small barriers stay visible beside large ones) and accuracy against λ, one band
    (mean ± std over pairs) per method, per split; saved atomically."""
    from neuralign.study.plots import _figure, _save_figure

    splits = results["protocol"]["splits"]
    fig = _figure(5.0 * len(splits), 6.5)
    axes = fig.subplots(2, len(splits), squeeze=False)
    for j, split in enumerate(splits):
        for i, (field, label, scale) in enumerate((("loss", "loss", 1.0), ("accuracy", "accuracy (%)", 100.0))):
            ax = axes[i][j]
            for m in results["methods"]:
                stack = np.array([q["methods"][m]["evaluation"]["splits"][split][field] for q in results["pairs"]])
                t = np.array(results["pairs"][0]["methods"][m]["evaluation"]["t"])
                mean = scale * stack.mean(axis=0)
                (line,) = ax.plot(t, mean, label=m)
                if stack.shape[0] > 1:
                    std = scale * stack.std(axis=0, ddof=1)
                    low, high = mean - std, mean + std
                    if field == "accuracy":  # the band of a bounded quantity stays within its bounds
                        low, high = np.clip(low, 0.0, scale), np.clip(high, 0.0, scale)
                    ax.fill_between(t, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
            ax.set_xlabel("λ")
            ax.set_ylabel(f"{split} {label}")
            if field == "loss":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    pairs = len(results["pairs"])
    fig.suptitle(f"mean over {pairs} pairs" + ("; bands: ± 1 standard deviation over the pairs" if pairs > 1 else ""),
                 fontsize=9)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save_figure(fig, path, "png")

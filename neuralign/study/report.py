"""The markdown report of a study (Tatro et al. 2020, Table 1 layout) and the tables it prints.

A study's results are a :class:`~neuralign.study.results.StudyResults`; ``results.json`` holds its JSON form
(documented in :mod:`neuralign.study.results`), and every function here takes either (a dict is read with
:meth:`StudyResults.from_dict <neuralign.study.results.StudyResults.from_dict>`, which validates it).
:func:`summary_table` reduces the results to mean and sample standard deviation over the pairs (:func:`robust_table`
the robust values of a robust study, whose curve evaluations carry ``robust_test_accuracy``), :func:`format_table`
lays the numbers out as the paper's Table 1 and :func:`write_report` writes ``report.md``. The JSON file's
:func:`write_results_json` and :func:`read_results_json` and :func:`validate_results` (defined in
:mod:`neuralign.study.results`), and the paper's :data:`PAPER_TABLE1` and :func:`paper_row` (defined in
:mod:`neuralign.study.reference`), are importable from here too.

Why one module: ``report.md`` is one document; its sections share the statistics over pairs and their formatting
(mean ± sample std, the paper's ± for end points), and the tables it prints are the ones :func:`summary_table`,
:func:`robust_table`, :func:`midpoint_summary` and :func:`learning_speed` return, computed and laid out in one place
so that the numbers of a table and of its text cannot drift apart.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from neuralign import _json
from neuralign._utils import atomic_write_text
from neuralign.study.config import SETTINGS
from neuralign.study.reference import PAPER_MODEL_SIZES, PAPER_SCALE, PAPER_TABLE1, paper_row
from neuralign.study.results import (
    PAMIteration,
    StudyResults,
    as_study_results,
    read_results_json,
    validate_results,
    write_results_json,
)

__all__ = [
    "SETTINGS",
    "SETTING_LABELS",
    "PAPER_TABLE1",
    "FIGURE_FILES",
    "MIDPOINT_CASES",
    "MIDPOINT_ALIGNED_GAIN",
    "dataset_label",
    "midpoint_summary",
    "learning_speed",
    "paper_row",
    "validate_results",
    "summary_table",
    "format_table",
    "write_report",
    "write_results_json",
    "read_results_json",
    "robust_table",
]

Results = StudyResults | Mapping[str, Any]

#: Display names of the settings (and of the end-point row).
SETTING_LABELS: dict[str, str] = {
    "endpoints": "Endpoints",
    "unaligned": "Unaligned",
    "pam_unaligned": "PAM Unaligned",
    "pam_aligned": "PAM Aligned",
    "aligned": "Aligned",
}

#: File names of the figures drawn by :func:`neuralign.study.plots.plot_study`, with their captions.
FIGURE_FILES: dict[str, tuple[str, str]] = {
    "curve_metrics": ("curve_metrics.png", "Test accuracy and loss along the curves (mean ± std over pairs)"),
    "layer_correlation": ("layer_correlation.png", "Layerwise mean correlation of matched units (signature)"),
    "reassignment": ("reassignment.png", "PAM stability: units reassigned per iteration, distance to the alignment"),
    "plane": ("plane.png", "Test loss and accuracy over the plane containing the aligned curve"),
    "verification": ("verification.png", "Verdicts of the verification checks"),
    "robust_metrics": ("robust_metrics.png", "Clean and robust test accuracy and robust loss along the curves"),
    "midpoint_alignment": ("midpoint_alignment.png",
                           "Alignment along the curve: correlation of the midpoint with each end point, per layer"),
    "learning_speed": ("learning_speed.png", "Train loss and accuracy per curve epoch (mean ± std over pairs)"),
}

#: Cases of the alignment along the curve (the study's ``midpoint`` stage), with their display names.
MIDPOINT_CASES: dict[str, str] = {
    "aligned": "Aligned curve (A, P·B)",
    "unaligned": "Unaligned curve (A, B)",
    "linear": "Linear midpoint (A, P·B; epoch 0)",
}

#: Largest mean correlation gain (over groups) from aligning the midpoint that still counts as "already aligned".
MIDPOINT_ALIGNED_GAIN = 0.05

_CURVE_METRICS = {  # summary field -> scale (100: a fraction shown in %)
    "avg_accuracy": 100.0,
    "min_accuracy": 100.0,
    "mid_accuracy": 100.0,
    "accuracy_barrier": 100.0,
    "loss_barrier": 1.0,
    "avg_loss": 1.0,
}

_paper_row_of = paper_row  # write_report's keyword `paper_row` shadows the function


# ----------------------------------------------------------------------------------------------------------------
# numbers
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for one value)."""
    vals = [float(v) for v in values]
    n = len(vals)
    mean = math.fsum(vals) / n
    if n < 2:
        return mean, None
    if not all(math.isfinite(v) for v in vals):
        return mean, math.nan
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))


def _stat(values: Sequence[float], scale: float = 1.0) -> dict[str, Any]:
    mean, std = _mean_std([scale * float(v) for v in values])
    return {"mean": mean, "std": std, "n": len(values)}


def _endpoint_stat(acc_a: Sequence[float], acc_b: Sequence[float]) -> dict[str, Any]:
    """Mean of (a + b) / 2 over pairs with the paper's ± (1/2) sqrt(s_a^2 + s_b^2)."""
    _, std_a = _mean_std(acc_a)
    _, std_b = _mean_std(acc_b)
    std = None if std_a is None or std_b is None else 0.5 * math.sqrt(std_a**2 + std_b**2)
    return {"mean": _mean_std([(a + b) / 2.0 for a, b in zip(acc_a, acc_b)])[0], "std": std, "n": len(acc_a)}


def summary_table(results: Results) -> dict[str, Any]:
    """Mean and sample standard deviation over the pairs of each setting's curve summary (Tatro et al., Table 1).

    For a curve row, each metric :math:`m` has :math:`\\bar m = \\frac1n \\sum_k m_k` and
    :math:`s = (\\frac{1}{n-1} \\sum_k (m_k - \\bar m)^2)^{1/2}` over the :math:`n` pairs (None for :math:`n = 1`).
    The end-point row's accuracy is the mean of :math:`(a_k + b_k)/2` with
    :math:`\\pm\\, \\tfrac12 (s_a^2 + s_b^2)^{1/2}`, :math:`s_a, s_b` the standard deviations over pairs of the
    accuracies of the end points A (:math:`t = 0`) and B (:math:`t = 1`), as in the paper's code. As in the
    paper, :math:`a_k, b_k` are the curves' own values at :math:`t = 0` and :math:`t = 1` (batch norm
    re-estimated like at every curve point; the mean over the settings, which share their end points); the end
    points' accuracies as trained (``pair.endpoints``, their own batch-norm statistics) are given beside
    them, and stand in when there is no setting.

    Parameters
    ----------
    results : StudyResults or dict
        A study's results (a dict is read with :meth:`~neuralign.study.results.StudyResults.from_dict`).

    Returns
    -------
    dict
        ``{"n_pairs": n, "rows": {row: {metric: {"mean", "std", "n"}}}}`` with rows ``"endpoints"`` and each of
        ``results.settings`` in order. Curve rows hold ``avg_accuracy`` (arc-length-weighted average, "Avg"),
        ``min_accuracy`` ("Min"), ``mid_accuracy`` (at the evaluated ``t`` nearest 0.5) and ``accuracy_barrier``
        in %, and ``loss_barrier`` and ``avg_loss`` in loss units. The end-point row holds ``avg_accuracy`` (the
        mean end-point accuracy with the ± above), ``a_accuracy``, ``b_accuracy``, ``trained_accuracy`` (from
        ``pair.endpoints``, same ±) in % and ``loss`` (trained, loss units). ``"endpoint_source"`` says
        where ``avg_accuracy`` comes from: ``"curves"`` or ``"endpoints"``.

    Raises
    ------
    TypeError, ValueError
        For malformed ``results`` (see :func:`validate_results`).

    References
    ----------
    .. [1] N. J. Tatro et al., "Optimizing Mode Connectivity via Neuron Alignment", NeurIPS 2020,
       arXiv:2009.02439.

    Examples
    --------
    >>> from neuralign.curves import CurveEvaluation
    >>> ev = CurveEvaluation.from_values([0, 0.5, 1], [0.3, 0.9, 0.3], [0.9, 0.6, 0.8], [0, 1, 2]).to_dict()
    >>> ends = {"a": {"test_loss": 0.3, "test_acc": 0.9}, "b": {"test_loss": 0.3, "test_acc": 0.8}}
    >>> res = {"settings": ["aligned"], "pairs": [{"endpoints": ends, "curves": {"aligned": ev}}]}
    >>> table = summary_table(res)
    >>> round(table["rows"]["endpoints"]["avg_accuracy"]["mean"], 6), table["rows"]["aligned"]["min_accuracy"]
    (85.0, {'mean': 60.0, 'std': None, 'n': 1})
    """
    res = as_study_results(results)
    pairs = res.pairs
    trained_a = [100.0 * float(p.endpoints.a.test_acc) for p in pairs]
    trained_b = [100.0 * float(p.endpoints.b.test_acc) for p in pairs]
    settings = list(res.settings)
    if settings:  # the curves' own t = 0 and t = 1 values (batch norm re-estimated as at every curve point)
        acc_a = [100.0 * math.fsum(p.curves[s].test_accuracy[0] for s in settings) / len(settings) for p in pairs]
        acc_b = [100.0 * math.fsum(p.curves[s].test_accuracy[-1] for s in settings) / len(settings) for p in pairs]
    else:
        acc_a, acc_b = trained_a, trained_b
    endpoints: dict[str, Any] = {
        "avg_accuracy": _endpoint_stat(acc_a, acc_b),
        "a_accuracy": _stat(acc_a),
        "b_accuracy": _stat(acc_b),
        "trained_accuracy": _endpoint_stat(trained_a, trained_b),
    }
    losses = [(p.endpoints.a.test_loss, p.endpoints.b.test_loss) for p in pairs]
    if all(_is_number(a) and _is_number(b) for a, b in losses):
        endpoints["loss"] = _stat([(a + b) / 2.0 for a, b in losses])
    rows: dict[str, Any] = {"endpoints": endpoints}
    for s in settings:
        curves = [p.curves[s] for p in pairs]
        rows[s] = {
            metric: _stat([getattr(c, metric) for c in curves], scale)
            for metric, scale in _CURVE_METRICS.items()
            if all(_is_number(getattr(c, metric)) for c in curves)
        }
    return {"n_pairs": len(pairs), "endpoint_source": "curves" if settings else "endpoints", "rows": rows}


# ----------------------------------------------------------------------------------------------------------------
# formatting
def _fmt_number(value: float, decimals: int) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{decimals}f}"


def _fmt_stat(stat: Mapping[str, Any] | None, decimals: int = 1) -> str:
    if not stat:
        return ""
    text = _fmt_number(stat["mean"], decimals)
    if stat.get("std") is not None:
        text += " ± " + _fmt_number(stat["std"], decimals)
    return text


def dataset_label(dataset: Any) -> str:
    """A short name for a data set given by name or by ``.npz`` path (``/data/cifar10.npz`` -> ``cifar10``)."""
    text = str(dataset)
    return Path(text).stem if text.lower().endswith(".npz") else text


def _arch_dataset(res: StudyResults) -> tuple[str, str]:
    arch, dataset = res.arch, res.dataset
    return arch or "unknown architecture", "unknown data set" if dataset is None else dataset_label(dataset)


def _num_points(res: StudyResults) -> int | None:
    for s in res.settings:
        return len(res.pairs[0].curves[s].t)
    return None


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _precision_note(res: StudyResults) -> str:
    """The test-set size and its noise floor (one image in percentage points), and which batches batch norm was
    re-estimated on, when the results record them."""
    note = ""
    n = res.test_images
    if n is not None and n > 0:
        note += (f" Test set: {n:,} images, so one image is {100 / n:.2g} points; differences of that size are "
                 "noise.")  # fmt: skip
    bn = res.bn_batches
    if bn is not None and bn.shared:
        count = bn.count
        where = f"the same {count} training batches" if count else "one full pass of the training images"
        note += f" Batch norm re-estimated on {where} at every t and on every curve."
    return note


def format_table(results: Results, *, decimals: int = 1) -> str:
    """A markdown table laid out like Tatro et al. (2020), Table 1: Avg and Min test accuracy (%) per setting.

    Rows: Endpoints (mean end-point accuracy, its ± from :func:`summary_table`), then each setting of
    ``results.settings``; cells read ``"88.5 ± 0.1"`` (mean ± sample std over pairs; no ± for one pair). With
    two or more curve rows, the best Avg and the best Min among them (ties at the shown precision included) are
    bold, as in the paper. A caption line above names the architecture, the data set and the number of pairs.

    Parameters
    ----------
    results : StudyResults or dict
        A study's results.
    decimals : int
        Decimals shown (the paper uses 1).

    Returns
    -------
    str
        The caption, a blank line and the table (no trailing newline).

    Raises
    ------
    TypeError, ValueError
        For malformed ``results``.

    References
    ----------
    .. [1] N. J. Tatro et al., "Optimizing Mode Connectivity via Neuron Alignment", NeurIPS 2020,
       arXiv:2009.02439.

    Examples
    --------
    >>> from neuralign.curves import CurveEvaluation
    >>> ev = CurveEvaluation.from_values([0, 0.5, 1], [0.3, 0.9, 0.3], [0.9, 0.6, 0.8], [0, 1, 2]).to_dict()
    >>> ends = {"a": {"test_loss": 0.3, "test_acc": 0.9}, "b": {"test_loss": 0.3, "test_acc": 0.8}}
    >>> res = {"config": {"arch": "mlp", "dataset": "digits"}, "settings": ["aligned"],
    ...        "pairs": [{"endpoints": ends, "curves": {"aligned": ev}}]}
    >>> print(format_table(res).splitlines()[-1])
    | Aligned | 72.5 | 60.0 |
    """
    if isinstance(decimals, bool) or not isinstance(decimals, int) or decimals < 0:
        raise ValueError(f"`decimals` must be an int >= 0, got {decimals!r}")
    res = as_study_results(results)
    table = summary_table(res)
    rows = table["rows"]
    n = table["n_pairs"]
    arch, dataset = _arch_dataset(res)
    points = _num_points(res)
    spread = "mean ± std (ddof=1) over" if n > 1 else "a single pair; no spread over"
    caption = (
        f"Test accuracy (%) along the curves: {arch} on {dataset}, {spread} {n} pair{'s' if n != 1 else ''}. "
        "Avg: arc-length-weighted average"
        + (f"; Min: minimum over {points} points" if points else "")
        + "; Endpoints: mean accuracy at t = 0 and t = 1"
        + (" (batch norm re-estimated as along the curves)." if table["endpoint_source"] == "curves" else ".")
        + _precision_note(res)
    )
    curve_rows = [s for s in res.settings if "avg_accuracy" in rows[s] and "min_accuracy" in rows[s]]
    best: dict[str, set[str]] = {}
    if len(curve_rows) >= 2:
        for metric in ("avg_accuracy", "min_accuracy"):
            shown = {s: round(rows[s][metric]["mean"], decimals) for s in curve_rows}
            finite = [v for v in shown.values() if math.isfinite(v)]
            if finite:
                top = max(finite)
                best[metric] = {s for s, v in shown.items() if v == top}
    lines = [f"**Table.** {caption}", "", "| Setting | Avg | Min |", "| --- | ---: | ---: |"]
    lines.append(f"| {SETTING_LABELS['endpoints']} | {_fmt_stat(rows['endpoints']['avg_accuracy'], decimals)} | |")
    for s in res.settings:
        cells = []
        for metric in ("avg_accuracy", "min_accuracy"):
            text = _fmt_stat(rows[s].get(metric), decimals)
            cells.append(f"**{text}**" if s in best.get(metric, ()) else text)
        lines.append(f"| {SETTING_LABELS[s]} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _format_extra_table(res: StudyResults, decimals: int = 2) -> str:
    rows = summary_table(res)["rows"]
    head = "| Setting | Acc. at t≈0.5 (%) | Accuracy barrier (%) | Loss barrier | Avg loss |"
    lines = [head, "| --- | ---: | ---: | ---: | ---: |"]
    for s in res.settings:
        r = rows[s]
        cells = [_fmt_stat(r.get(m), decimals) for m in ("mid_accuracy", "accuracy_barrier")]
        cells += [_fmt_stat(r.get(m), 4) for m in ("loss_barrier", "avg_loss")]
        lines.append(f"| {SETTING_LABELS[s]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _check_paper_row(paper: Any) -> list[tuple[str, str, str]]:
    if not isinstance(paper, Mapping):
        raise TypeError(f"`paper_row` must be a dict of row label -> value, got {type(paper).__name__}")
    out = []
    for label, value in paper.items():
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            out.append((str(label), str(value), ""))
        elif isinstance(value, Sequence) and len(value) == 2:
            out.append((str(label), str(value[0]), str(value[1])))
        else:
            raise ValueError(
                f"`paper_row[{label!r}]` must be a string (end points) or an (avg, min) pair of strings, got {value!r}"
            )
    return out


def _flat(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """The settings of a configuration with their dotted paths (a nested configuration's groups expanded)."""
    for k, v in config.items():
        if isinstance(v, Mapping):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _scale_note(res: StudyResults) -> str:
    keys = ("epoch", "pair", "preset", "subset", "points", "batch", "width", "iter", "samples", "size")
    ours = [
        f"{k}={v}"
        for k, v in _flat(res.config)
        if any(w in k.lower() for w in keys) and isinstance(v, (str, int, float, bool))
    ]
    n = len(res.pairs)
    ours_text = ", ".join(ours) if ours else "see the configuration above"
    return (
        f"**Scale difference.** {PAPER_SCALE}. This study used {n} pair{'s' if n != 1 else ''} ({ours_text}). "
        "Compare the ordering of the settings and the gaps between them, not absolute accuracies."
    )


def _config_lines(res: StudyResults) -> list[str]:
    config = res.config
    if not config:
        return ["(no configuration recorded)"]
    lines = []

    def add(items: Mapping[str, Any], prefix: str) -> None:  # nested settings by their dotted paths
        for k, v in items.items():
            if isinstance(v, Mapping) and v:
                add(v, f"{prefix}{k}.")
                continue
            text = v if isinstance(v, str) else json.dumps(_json.encode(v, "config"), ensure_ascii=False)
            lines.append(f"- **{prefix}{k}**: `{text}`")

    add(config, "")
    return lines


def _figure_lines(figures: Mapping[str, Any], folder: Path) -> list[str]:
    lines = []
    for key, path in figures.items():
        caption = FIGURE_FILES[key][1] if key in FIGURE_FILES else str(key)
        rel = Path(os.path.relpath(Path(path).resolve(), folder.resolve())).as_posix()
        lines += [f"![{caption}]({rel})", "", f"*{caption}.*", ""]
    return lines


def _alignment_lines(res: StudyResults) -> list[str]:
    rows, untapped = [], 0
    for pair in res.pairs:
        al = pair.alignment
        if al is None:
            continue
        groups, before, after = list(al.groups), al.correlation_before, al.correlation_after
        # a group without an activation tap (matched by weights, e.g. attention's query/key heads) has no correlation
        measured = [g for g in groups if g in before and g in after
                    and math.isfinite(float(before[g])) and math.isfinite(float(after[g]))]  # fmt: skip
        untapped = max(untapped, len(groups) - len(measured))
        b = [float(before[g]) for g in measured]
        a = [float(after[g]) for g in measured]
        improved = sum(1 for g in measured if after[g] > before[g])
        mb = math.fsum(b) / len(b) if b else math.nan
        ma = math.fsum(a) / len(a) if a else math.nan
        seeds = ", ".join(str(s) for s in pair.seeds)
        rows.append(
            f"| {pair.pair} | {seeds} | {len(groups)} | {mb:.3f} | {ma:.3f} | {ma - mb:+.3f} | "
            f"{improved}/{len(measured)} |"
        )
    if not rows:
        return []
    return [
        "## Alignment",
        "",
        "Mean over groups (unweighted) of the correlation of matched units, before and after alignment."
        + (f" Groups without an activation tap (matched by weights; up to {untapped} per pair) have no correlation "
           "and are left out of the means and the count of groups improved." if untapped else ""),
        "",
        "| Pair | Seeds | Groups | Corr. before | Corr. after | Gain | Groups improved |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
    ]


def midpoint_summary(results: Results) -> dict[str, Any]:
    """Alignment along the curve, summarised: per case and end point, the mean over groups of the correlation of
    matched units between the midpoint and the end point, before and after aligning the midpoint (lists over the
    pairs that have the case), the largest gain of a single group, and whether the Aligned curve's midpoint is
    already aligned with both end points: every pair's mean gain below :data:`MIDPOINT_ALIGNED_GAIN` for both.
    Empty when no pair has ``midpoint_alignment``."""
    cases: dict[str, dict[str, Any]] = {}
    for pair in as_study_results(results).pairs:
        if pair.midpoint_alignment is None:
            continue
        for case, mid in pair.midpoint_alignment.cases.items():
            row = cases.setdefault(case, {e: {"before": [], "after": [], "gain": [], "max_group_gain": []}
                                          for e in ("a", "b")})  # fmt: skip
            for end in ("a", "b"):
                values = [(float(mid.before[end][g]), float(mid.after[end][g])) for g in mid.groups]
                values = [(b, a) for b, a in values if math.isfinite(b) and math.isfinite(a)]
                if not values:
                    continue
                before = math.fsum(b for b, _ in values) / len(values)
                after = math.fsum(a for _, a in values) / len(values)
                gains = {"before": before, "after": after, "gain": after - before,
                         "max_group_gain": max(a - b for b, a in values)}  # fmt: skip
                for key, value in gains.items():
                    row[end][key].append(value)
    out: dict[str, Any] = {"cases": cases, "threshold": MIDPOINT_ALIGNED_GAIN}
    aligned = cases.get("aligned")
    if aligned and aligned["a"]["gain"] and aligned["b"]["gain"]:
        out["aligned_midpoint_already_aligned"] = all(
            g < MIDPOINT_ALIGNED_GAIN for end in ("a", "b") for g in aligned[end]["gain"]
        )
    return out


def learning_speed(results: Results) -> dict[str, Any]:
    """Per setting and pair, the final train loss and accuracy of the curve fit and the first curve epoch (1-based)
    at which its train loss is at most the Unaligned curve's final train loss of the same pair (None: not reached;
    ``"n/a"``: the pair has no Unaligned curve to compare with; ``"-"``: the pair has no history of the setting, so
    that the entries line up with the pairs). Reads ``pair.train_history``; empty when no pair has it."""
    res = as_study_results(results)
    out: dict[str, Any] = {}
    for s in res.settings:
        if not any(pair.train_history.get(s) for pair in res.pairs):
            continue
        final_loss: list[float] = []
        final_accuracy: list[float] = []
        epochs: list[int] = []
        first_epoch: list[int | str | None] = []  # one entry per pair ("-": no history of this setting), in order
        for pair in res.pairs:
            h = pair.train_history.get(s)
            if not h:
                first_epoch.append("-")
                continue
            ref = pair.train_history.get("unaligned")
            target = float(ref[-1].loss) if ref else None
            final_loss.append(float(h[-1].loss))
            final_accuracy.append(float(h[-1].accuracy))
            epochs.append(len(h))
            first_epoch.append(
                "n/a" if target is None else next((int(r.epoch) for r in h if float(r.loss) <= target), None)
            )
        out[s] = {"final_loss": final_loss, "final_accuracy": final_accuracy, "epochs": epochs,
                  "first_epoch": first_epoch}  # fmt: skip
    return out


def _midpoint_lines(res: StudyResults) -> list[str]:
    summary = midpoint_summary(res)
    if not summary["cases"]:
        return []
    rows = []
    for case, row in summary["cases"].items():
        cells = []
        for end in ("a", "b"):
            cells += [_fmt_stat(_stat(row[end][k]), 3) if row[end][k] else "" for k in ("before", "after", "gain")]
            cells.append(f"{max(row[end]['max_group_gain']):+.3f}" if row[end]["max_group_gain"] else "")
        rows.append(f"| {MIDPOINT_CASES.get(case, case)} | " + " | ".join(cells) + " |")
    lines = [
        "## Alignment along the curve",
        "",
        "The network at t = 0.5 of each curve (batch norm re-estimated) aligned to each end point by correlation "
        "(Tatro et al. §4): the mean over layers of the correlation of matched units before and after aligning the "
        "midpoint, the gain, and the largest gain of one layer (mean ± std over pairs). End points in brackets; P is "
        "the alignment; the linear midpoint is the Aligned curve at epoch 0.",
        "",
        "| Case | vs A before | vs A after | gain | max layer gain | vs B before | vs B after | gain | "
        "max layer gain |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
    ]
    verdict = summary.get("aligned_midpoint_already_aligned")
    if verdict is not None:
        a, b = summary["cases"]["aligned"]["a"]["gain"], summary["cases"]["aligned"]["b"]["gain"]
        worst = max(a + b)
        lines += [
            f"Criterion: the midpoint counts as already aligned with an end point when aligning it raises the mean "
            f"layer correlation by less than {summary['threshold']:g}. "
            + (f"**The Aligned curve's midpoint is already aligned with both end points** (largest mean gain "
               f"{worst:+.3f}), as the paper claims." if verdict else
               f"**The Aligned curve's midpoint is not already aligned with both end points** (largest mean gain "
               f"{worst:+.3f}), contrary to the paper's claim."),
            "",
        ]  # fmt: skip
    return lines


def _learning_speed_lines(res: StudyResults) -> list[str]:
    speed = learning_speed(res)
    if not speed:
        return []
    rows = []
    for s, row in speed.items():
        first = ", ".join("not reached" if e is None else str(e) for e in row["first_epoch"])  # "n/a" stays
        rows.append(f"| {SETTING_LABELS.get(s, s)} | {_fmt_stat(_stat(row['final_loss']), 3)} | "
                    f"{_fmt_stat(_stat(row['final_accuracy'], 100.0), 1)} | {first} |")  # fmt: skip
    n = len(res.pairs)
    return [
        "## Learning speed",
        "",
        "Training loss and accuracy of the curve fits (mean over the epoch's batches, each at a random t; for PAM the "
        "epochs of all outer iterations in order). Last column: per pair, the first curve epoch at which the "
        "setting's train loss is at most the Unaligned curve's final train loss of the same pair.",
        "",
        "| Setting | Final train loss | Final train accuracy (%) | First epoch at Unaligned's final loss "
        f"({'per pair' if n > 1 else 'pair 1'}) |",
        "| --- | ---: | ---: | --- |",
        *rows,
        "",
    ]


def _pam_lines(res: StudyResults) -> list[str]:
    rows = []
    for pair in res.pairs:
        for s in SETTINGS:
            run = pair.pam.get(s)
            if run is None:
                continue
            hist = [float(v) for v in run.history]
            total = sum(int(c) for v in run.changed.values() for c in v)
            last = sum(int(v[-1]) for v in run.changed.values() if v)
            start = f"{hist[0]:.4g}" if hist else ""
            end = f"{hist[-1]:.4g}" if hist else ""
            rows.append(
                f"| {pair.pair} | {SETTING_LABELS.get(s, s)} | {run.n_iter} | {start} | {end} | {total} | {last} |"
            )
    if not rows:
        return []
    return [
        "## PAM",
        "",
        "| Pair | Setting | Outer iterations | Objective (start) | Objective (end) | Units changed (total) | "
        "Changed in last iteration |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        *_pam_iteration_lines(res),
    ]


def _pam_iteration_lines(res: StudyResults) -> list[str]:
    """Per PAM setting and outer iteration: objective, units moved and Min / Avg accuracy, mean ± std over pairs."""
    table: dict[tuple[str, int], list[PAMIteration]] = {}
    for pair in res.pairs:
        for s, run in pair.pam.items():
            for row in run.iterations or ():
                table.setdefault((s, int(row.iteration)), []).append(row)
    if not table:
        return []
    lines = [
        "Per outer iteration (each iteration's curve evaluated like the final one; mean ± std over pairs):",
        "",
        "| Setting | Iteration | Objective | Units moved | Avg accuracy (%) | Min accuracy (%) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    order = {s: i for i, s in enumerate(SETTINGS)}
    for (s, j), rows in sorted(table.items(), key=lambda item: (order.get(item[0][0], 99), item[0][1])):
        lines.append(
            f"| {SETTING_LABELS.get(s, s)} | {j} | {_fmt_stat(_stat([r.objective for r in rows]), 4)} | "
            f"{_fmt_stat(_stat([r.moved for r in rows]), 1)} | "
            f"{_fmt_stat(_stat([r.avg_accuracy for r in rows], 100.0))} | "
            f"{_fmt_stat(_stat([r.min_accuracy for r in rows], 100.0))} |"
        )
    return [*lines, ""]


def _verification_lines(res: StudyResults) -> list[str]:
    reports = [(pair.pair, pair.verification) for pair in res.pairs if pair.verification is not None]
    if not reports:
        return []
    names: list[str] = []
    for _, report in reports:
        names += [c for c in report.checks if c not in names]
    lines = [
        "## Verification",
        "",
        "Is the alignment a local optimum of the joint curve objective? Verdict of each check per pair.",
        "",
        "| Check | " + " | ".join(f"Pair {p}" for p, _ in reports) + " |",
        "| --- |" + " --- |" * len(reports),
    ]
    for name in names:
        cells = [report.checks[name].verdict if name in report.checks else "—" for _, report in reports]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **overall** | " + " | ".join(f"**{report.verdict}**" for _, report in reports) + " |")
    lines.append("")
    for p, report in reports:
        lines.append(f"Pair {p}:")
        lines.append("")
        for name, check in report.checks.items():
            lines.append(f"- {name} ({check.verdict}): {_cell(check.summary)}")
        lines.append("")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# robust mode connectivity (Tatro et al. 2020, §4)
_ROBUST_COLUMNS = (  # (curve summary field, header, scale)
    ("avg_accuracy", "Avg clean", 100.0),
    ("min_accuracy", "Min clean", 100.0),
    ("robust_avg_accuracy", "Avg robust", 100.0),
    ("robust_min_accuracy", "Min robust", 100.0),
    ("robust_max_accuracy", "Max robust", 100.0),
    ("clean_accuracy_at_robust_max", "Clean at max robust", 100.0),
    ("robust_loss_barrier", "Robust loss barrier", 1.0),
    ("robust_avg_loss", "Avg robust loss", 1.0),
)


def robust_table(results: Results) -> dict[str, Any]:
    """Mean and sample std over pairs of the robust summary of each setting's curves, and of the end points.

    End points: clean and robust accuracy at :math:`t = 0` and :math:`t = 1` of the curves (batch norm
    re-estimated as along the curves), averaged over the settings, with the paper's
    :math:`\\pm \\tfrac12 (s_a^2 + s_b^2)^{1/2}`. Curves: the columns of ``_ROBUST_COLUMNS`` (accuracies in %).

    Raises
    ------
    ValueError
        If the study has no robust evaluation.
    """
    res = as_study_results(results)
    if not res.robust:
        raise ValueError("the results hold no robust evaluation (a study with robust=True)")
    pairs, settings = res.pairs, res.settings

    def ends(key: str, index: int) -> list[float]:
        return [100.0 * math.fsum(getattr(p.curves[s], key)[index] for s in settings) / len(settings) for p in pairs]

    rows: dict[str, Any] = {
        "endpoints": {
            "clean": _endpoint_stat(ends("test_accuracy", 0), ends("test_accuracy", -1)),
            "robust": _endpoint_stat(ends("robust_test_accuracy", 0), ends("robust_test_accuracy", -1)),
        }
    }
    for s in settings:
        rows[s] = {key: _stat([getattr(p.curves[s], key) for p in pairs], scale) for key, _, scale in _ROBUST_COLUMNS}
    return {"rows": rows, "n_pairs": len(pairs)}


def _robust_lines(res: StudyResults) -> list[str]:
    if not res.robust:
        return []
    table = robust_table(res)["rows"]
    first = res.pairs[0].curves[res.settings[0]]
    attack, bn = first.adversarial or {}, first.bn_inputs
    header = "| Setting | " + " | ".join(h for _, h, _ in _ROBUST_COLUMNS) + " |"
    lines = [
        "## Robust mode connectivity",
        "",
        f"L-infinity PGD, eps {attack.get('eps', float('nan')):.4g}, step {attack.get('alpha', float('nan')):.4g}, "
        f"{attack.get('steps', '?')} steps, random start; batch norm re-estimated on {bn} training inputs at every "
        "t. Accuracies in % (mean ± std over pairs, except: \"Curves at t = 0, 1\" gives the mean of (a + b) / 2 "
        "± ½·√(s_a² + s_b²), s_a and s_b the stds over pairs at t = 0 and t = 1, the paper's convention for end "
        "points; \"As trained\" gives mean ± std over all end points); Avg: arc-length-weighted average along the "
        "curve; robust loss barrier: largest rise of the robust test loss above the straight line between its end "
        "values.",
        "",
        "| End points | Clean | Robust |",
        "| --- | ---: | ---: |",
        f"| Curves at t = 0, 1 | {_fmt_stat(table['endpoints']['clean'])} | "
        f"{_fmt_stat(table['endpoints']['robust'])} |",
    ]
    trained = [(m.test_acc, m.robust_test_acc) for p in res.pairs for m in (p.endpoints.a, p.endpoints.b)]
    if all(r is not None for _, r in trained):
        clean = _stat([c for c, _ in trained], 100.0)
        robust = _stat([r for _, r in trained], 100.0)
        lines.append(f"| As trained (own statistics), all end points | {_fmt_stat(clean)} | {_fmt_stat(robust)} |")
    lines += ["", header, "| --- |" + " ---: |" * len(_ROBUST_COLUMNS)]
    for s in res.settings:
        cells = [_fmt_stat(table[s][key], 1 if scale == 100.0 else 3) for key, _, scale in _ROBUST_COLUMNS]
        lines.append(f"| {SETTING_LABELS[s]} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_report(
    results: Results,
    folder: str | os.PathLike,
    *,
    figures: Mapping[str, str | os.PathLike] | None = None,
    paper_row: Mapping[str, Any] | None = None,
    notes: str | None = None,
) -> Path:
    """Write ``report.md`` (atomically) into ``folder``: the study's tables, figures and verdicts.

    Sections: a title naming the architecture and data set; the configuration; the Table 1 layout of
    :func:`format_table` and a table of further metrics (accuracy at :math:`t \\approx 0.5`, accuracy and loss
    barriers, average loss); optionally the paper's numbers with a note on the difference in scale; the figures
    (relative links); the per-pair alignment correlation; the PAM runs; the verification verdicts (check x pair)
    with each check's summary; and ``notes``.

    Parameters
    ----------
    results : StudyResults or dict
        A study's results.
    folder : path-like
        Where ``report.md`` goes (created if needed).
    figures : dict str -> path, optional
        Figures to link, e.g. the output of :func:`neuralign.study.plots.plot_study`; keys of
        :data:`FIGURE_FILES` get their caption, other keys are used as captions. Default: the files of
        :data:`FIGURE_FILES` that already exist in ``folder``.
    paper_row : dict, optional
        The paper's reference rows, row label -> end-point string or ``(avg, min)`` strings, e.g.
        ``PAPER_TABLE1["tinyten"]["cifar10"]`` (see :func:`paper_row`).
    notes : str, optional
        Free markdown appended under "Notes".

    Returns
    -------
    pathlib.Path
        The path of ``report.md``.

    Raises
    ------
    TypeError, ValueError
        For malformed ``results`` or ``paper_row``.

    Examples
    --------
    >>> import tempfile
    >>> from neuralign.curves import CurveEvaluation
    >>> ev = CurveEvaluation.from_values([0, 0.5, 1], [0.3, 0.9, 0.3], [0.9, 0.6, 0.8], [0, 1, 2]).to_dict()
    >>> ends = {"a": {"test_loss": 0.3, "test_acc": 0.9}, "b": {"test_loss": 0.3, "test_acc": 0.8}}
    >>> res = {"settings": ["aligned"], "pairs": [{"endpoints": ends, "curves": {"aligned": ev}}]}
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     text = write_report(res, tmp, notes="A smoke run.").read_text(encoding="utf-8")
    >>> "| Aligned | 72.5 | 60.0 |" in text, text.splitlines()[0]
    (True, '# Mode connectivity study: unknown architecture on unknown data set')
    """
    res = as_study_results(results)
    if notes is not None and not isinstance(notes, str):
        raise TypeError(f"`notes` must be a string of markdown, got {type(notes).__name__}")
    paper = _check_paper_row(paper_row) if paper_row is not None else None
    folder = Path(folder)
    if figures is None:
        figures = {k: folder / name for k, (name, _) in FIGURE_FILES.items() if (folder / name).is_file()}
    elif not isinstance(figures, Mapping):
        raise TypeError(f"`figures` must be a dict of name -> path, got {type(figures).__name__}")
    arch, dataset = _arch_dataset(res)
    n = len(res.pairs)
    lines = [
        f"# Mode connectivity study: {arch} on {dataset}",
        "",
        f"{n} pair{'s' if n != 1 else ''} of independently trained networks; curve settings: "
        + ", ".join(SETTING_LABELS[s] for s in res.settings)
        + ". Accuracies are on the test set.",
        "",
        "## Configuration",
        "",
        *_config_lines(res),
        "",
        "## Results",
        "",
        format_table(res),
        "",
    ]
    if res.settings:
        trained = summary_table(res)["rows"]["endpoints"]["trained_accuracy"]
        lines += [
            f"End points evaluated as trained (their own batch-norm statistics): {_fmt_stat(trained, 1)} %.",
            "",
            "Further metrics (mean ± std over pairs):",
            "",
            _format_extra_table(res),
            "",
        ]
    if paper is not None:
        size = PAPER_MODEL_SIZES.get(arch.lower())
        same = _paper_row_of(arch, dataset) == dict(paper_row)
        matching = f"{arch}{f' ({size})' if size else ''} on {dataset}" if same else "the reference rows given"
        lines += [
            "### Paper reference",
            "",
            f"Tatro et al. (2020, arXiv:2009.02439), Table 1, {matching}:",
            "",
            "| Setting | Avg | Min |",
            "| --- | ---: | ---: |",
            *(f"| {_cell(label)} | {_cell(avg)} | {_cell(mn)} |" for label, avg, mn in paper),
            "",
            _scale_note(res),
            "",
        ]
    lines += _robust_lines(res)
    if figures:
        lines += ["## Figures", "", *_figure_lines(figures, folder)]
    for section in (_alignment_lines, _midpoint_lines, _learning_speed_lines, _pam_lines, _verification_lines):
        lines += section(res)
    if notes:
        lines += ["## Notes", "", notes.strip(), ""]
    return atomic_write_text(folder / "report.md", "\n".join(lines).rstrip() + "\n")



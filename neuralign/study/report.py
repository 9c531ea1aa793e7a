"""The markdown report and the JSON file of a study (Tatro et al. 2020, Table 1 layout).

A study (``neuralign.study``) returns a JSON-able dict ``results``:

.. code-block:: text

    {"kind": "study_results", "config": {...}, "settings": [subset of SETTINGS, in that order],
     "pairs": [{"pair": 1, "seeds": [1, 2],
                "endpoints": {"a": {"test_loss", "test_acc"[, "robust_test_loss", "robust_test_acc"]},
                              "b": {...}},                                          # accuracies in [0, 1]
                "alignment": {"groups", "sizes", "correlation_before", "correlation_after"} or None,
                "curves": {setting: CurveEvaluation.to_dict()},
                "pam": {pam setting: {"history": [...], "changed": {group: [...]},
                                      "iterations": [{"iteration", "objective", "moved", "avg_accuracy",
                                                      "min_accuracy"}, ...]}},
                "verification": VerificationReport.to_dict() or None,
                "plane": PlaneEvaluation.to_dict() + {"curve_xy", "labels"} or None}, ...]}

:func:`summary_table` reduces it to mean and sample standard deviation over the pairs (:func:`robust_table` the
robust values of a robust study, whose curve evaluations carry ``robust_test_accuracy``), :func:`format_table` lays
the numbers out as the paper's Table 1, :func:`write_report` writes ``report.md`` and :func:`write_results_json`
writes ``results.json`` (strict JSON: infinities and NaN become the strings ``"inf"``, ``"-inf"``, ``"nan"``, as in
:meth:`~neuralign.verification.VerificationReport.to_json`; :func:`read_results_json` turns them back into floats).

Why one module: ``results.json``, the Table 1 rows and ``report.md`` are one schema; writing and reading
it in one place keeps them from drifting apart.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from neuralign import _json
from neuralign._utils import atomic_write_text

__all__ = [
    "SETTINGS",
    "SETTING_LABELS",
    "PAPER_TABLE1",
    "FIGURE_FILES",
    "MIDPOINT_CASES",
    "MIDPOINT_ALIGNED_GAIN",
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

#: The curve settings of Tatro et al. (2020, Table 1), in the order of the table.
SETTINGS: tuple[str, ...] = ("unaligned", "pam_unaligned", "pam_aligned", "aligned")

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

_RESULT_KEYS = ["kind", "config", "settings", "pairs"]
_CURVE_KEYS = ("t", "test_loss", "test_accuracy", "avg_accuracy", "min_accuracy", "loss_barrier", "mid_accuracy")
_CURVE_METRICS = {  # summary field -> scale (100: a fraction shown in %)
    "avg_accuracy": 100.0,
    "min_accuracy": 100.0,
    "mid_accuracy": 100.0,
    "accuracy_barrier": 100.0,
    "loss_barrier": 1.0,
    "avg_loss": 1.0,
}


#: Tatro et al. (2020), Table 1 (test accuracy in %, mean ± std over 3 pairs, quadratic Bezier curves, 65 points):
#: ``PAPER_TABLE1[arch][dataset]`` maps a row label of :data:`SETTING_LABELS` to the end-point accuracy (a string)
#: or to ``(avg, min)`` strings; GoogLeNet has no PAM rows. Usable as ``paper_row`` of :func:`write_report`.
PAPER_TABLE1: dict[str, dict[str, dict[str, str | tuple[str, str]]]] = {
    "tinyten": {
        "cifar10": {
            "Endpoints": "89.0 ± 0.1",
            "Unaligned": ("87.4 ± 0.1", "82.8 ± 0.5"),
            "PAM Unaligned": ("87.6 ± 0.1", "84.0 ± 0.3"),
            "PAM Aligned": ("88.4 ± 0.1", "87.6 ± 0.2"),
            "Aligned": ("88.5 ± 0.1", "87.8 ± 0.1"),
        },
        "cifar100": {
            "Endpoints": "58.1 ± 0.5",
            "Unaligned": ("56.0 ± 0.2", "53.2 ± 1.1"),
            "PAM Unaligned": ("57.3 ± 0.2", "55.9 ± 0.9"),
            "PAM Aligned": ("58.8 ± 0.1", "57.7 ± 0.3"),
            "Aligned": ("58.7 ± 0.2", "57.7 ± 0.4"),
        },
        "tinyimagenet": {
            "Endpoints": "34.2 ± 0.2",
            "Unaligned": ("32.5 ± 0.1", "30.0 ± 0.3"),
            "PAM Unaligned": ("33.6 ± 0.1", "32.5 ± 0.1"),
            "PAM Aligned": ("34.2 ± 0.1", "33.4 ± 0.2"),
            "Aligned": ("34.4 ± 0.1", "33.7 ± 0.1"),
        },
    },
    "resnet32": {
        "cifar10": {
            "Endpoints": "92.9 ± 0.1",
            "Unaligned": ("92.2 ± 0.1", "89.1 ± 0.2"),
            "PAM Unaligned": ("92.4 ± 0.1", "89.9 ± 0.2"),
            "PAM Aligned": ("92.7 ± 0.0", "92.1 ± 0.1"),
            "Aligned": ("92.7 ± 0.1", "92.2 ± 0.0"),
        },
        "cifar100": {
            "Endpoints": "67.1 ± 0.5",
            "Unaligned": ("66.5 ± 0.2", "64.7 ± 0.4"),
            "PAM Unaligned": ("67.0 ± 0.1", "66.1 ± 0.1"),
            "PAM Aligned": ("67.6 ± 0.4", "66.8 ± 0.1"),
            "Aligned": ("67.7 ± 0.1", "66.6 ± 0.1"),
        },
        "tinyimagenet": {
            "Endpoints": "50.2 ± 0.0",
            "Unaligned": ("48.2 ± 0.1", "45.2 ± 0.1"),
            "PAM Unaligned": ("48.5 ± 0.1", "46.6 ± 0.1"),
            "PAM Aligned": ("49.2 ± 0.4", "47.9 ± 0.6"),
            "Aligned": ("49.5 ± 0.3", "48.8 ± 0.4"),
        },
    },
    "googlenet": {
        "cifar10": {
            "Endpoints": "93.4 ± 0.0",
            "Unaligned": ("93.3 ± 0.0", "92.1 ± 0.1"),
            "Aligned": ("93.4 ± 0.0", "93.1 ± 0.0"),
        },
        "cifar100": {
            "Endpoints": "73.2 ± 0.4",
            "Unaligned": ("73.1 ± 0.4", "69.8 ± 0.3"),
            "Aligned": ("73.4 ± 0.3", "72.9 ± 0.3"),
        },
        "tinyimagenet": {
            "Endpoints": "51.6 ± 0.2",
            "Unaligned": ("51.9 ± 0.1", "48.7 ± 0.4"),
            "Aligned": ("52.4 ± 0.2", "51.4 ± 0.3"),
        },
    },
}

_PAPER_MODEL_SIZES = {"tinyten": "0.09M", "resnet32": "0.47M", "googlenet": "10.24M"}
_DATASET_ALIASES = {
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
    "tin": "tinyimagenet",
    "tiny-imagenet": "tinyimagenet",
    "tiny_imagenet": "tinyimagenet",
    "tinyimagenet200": "tinyimagenet",
}
_PAPER_SCALE = (
    "The paper trains each end point and each curve for 250 epochs on the full training set (PAM: per outer "
    "iteration 20 permutation epochs and 250 curve epochs), re-estimates batch norm on the full training set at "
    "each of 65 points and reports mean ± std over 3 pairs"
)


def paper_row(arch: str, dataset: str) -> dict[str, str | tuple[str, str]] | None:
    """The rows of :data:`PAPER_TABLE1` for an architecture and a data set, or None if the paper has none.

    Names are matched case-insensitively, with the usual spellings of the data sets (``"CIFAR-10"``,
    ``"tiny_imagenet"``, ``"tin"``).

    Examples
    --------
    >>> paper_row("TinyTen", "CIFAR-10")["Aligned"]
    ('88.5 ± 0.1', '87.8 ± 0.1')
    >>> paper_row("resnet20", "cifar10") is None
    True
    """
    arch_key = str(arch).strip().lower()
    data_key = str(dataset).strip().lower()
    data_key = _DATASET_ALIASES.get(data_key, data_key)
    row = PAPER_TABLE1.get(arch_key, {}).get(data_key)
    return None if row is None else dict(row)


_paper_row_of = paper_row  # write_report's keyword `paper_row` shadows the function


# ----------------------------------------------------------------------------------------------------------------
# validation
def _require(mapping: Any, key: str, where: str) -> Any:
    if not isinstance(mapping, Mapping):
        raise TypeError(f"`{where}` must be a dict, got {type(mapping).__name__}")
    if key not in mapping:
        raise ValueError(f"`{where}` lacks the key {key!r}")
    return mapping[key]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_results(results: Mapping[str, Any]) -> None:
    """Check that ``results`` has the structure of a study's results (the parts every table and figure needs).

    Required: ``settings`` (a subset of :data:`SETTINGS` in that order), ``pairs`` (non-empty), and per pair
    ``endpoints`` (``a`` and ``b`` with ``test_acc``) and ``curves`` with one evaluation per setting holding
    ``t``, ``test_loss``, ``test_accuracy`` of one length and the summary fields. ``kind``, when present, must be
    ``"study_results"``. ``alignment``, ``pam``, ``verification`` and ``plane`` are optional (missing or None).

    Parameters
    ----------
    results : dict
        The study's results.

    Raises
    ------
    TypeError
        If ``results`` or one of its parts is not of the expected kind.
    ValueError
        Naming the first missing key or wrong value, e.g. "`results` lacks the key 'pairs'".

    Examples
    --------
    >>> validate_results({"kind": "study_results", "settings": []})
    Traceback (most recent call last):
    ...
    ValueError: `results` lacks the key 'pairs'; expected a study results dict with keys ['kind', 'config', \
'settings', 'pairs']
    """
    if not isinstance(results, Mapping):
        raise TypeError(f"`results` must be a dict of study results, got {type(results).__name__}")
    for key in ("settings", "pairs"):
        if key not in results:
            raise ValueError(f"`results` lacks the key {key!r}; expected a study results dict with keys {_RESULT_KEYS}")
    if "kind" in results and results["kind"] != "study_results":
        raise ValueError(f"`results['kind']` is {results['kind']!r}, expected 'study_results'")
    config = results.get("config", {})
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"`results['config']` must be a dict, got {type(config).__name__}")
    settings = results["settings"]
    if isinstance(settings, str) or not isinstance(settings, Sequence):
        raise TypeError(f"`results['settings']` must be a list of setting names, got {type(settings).__name__}")
    for s in settings:
        if s not in SETTINGS:
            raise ValueError(f"unknown setting {s!r} in `results['settings']`; expected a subset of {list(SETTINGS)}")
    order = [SETTINGS.index(s) for s in settings]
    if order != sorted(set(order)):
        raise ValueError(
            f"`results['settings']` must list distinct settings in the order {list(SETTINGS)}, got {list(settings)}"
        )
    pairs = results["pairs"]
    if isinstance(pairs, (str, Mapping)) or not isinstance(pairs, Sequence):
        raise TypeError(f"`results['pairs']` must be a list of pairs, got {type(pairs).__name__}")
    if not pairs:
        raise ValueError("`results['pairs']` is empty; expected at least one pair")
    for i, pair in enumerate(pairs):
        where = f"results['pairs'][{i}]"
        endpoints = _require(pair, "endpoints", where)
        for end in ("a", "b"):
            acc = _require(
                _require(endpoints, end, f"{where}['endpoints']"), "test_acc", f"{where}['endpoints'][{end!r}]"
            )
            if not _is_number(acc):
                raise TypeError(f"`{where}['endpoints'][{end!r}]['test_acc']` must be a number, got {acc!r}")
        curves = _require(pair, "curves", where)
        for s in settings:
            if s not in curves:
                raise ValueError(f"`{where}['curves']` lacks the setting {s!r} listed in `results['settings']`")
            curve = curves[s]
            cw = f"{where}['curves'][{s!r}]"
            for key in _CURVE_KEYS:
                _require(curve, key, cw)
            n = len(curve["t"])
            if n < 2 or len(curve["test_loss"]) != n or len(curve["test_accuracy"]) != n:
                raise ValueError(
                    f"`{cw}` must have 't', 'test_loss' and 'test_accuracy' of one length >= 2, got "
                    f"{n}, {len(curve['test_loss'])} and {len(curve['test_accuracy'])}"
                )


# ----------------------------------------------------------------------------------------------------------------
# numbers
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


def summary_table(results: Mapping[str, Any]) -> dict[str, Any]:
    """Mean and sample standard deviation over the pairs of each setting's curve summary (Tatro et al., Table 1).

    For a curve row, each metric :math:`m` has :math:`\\bar m = \\frac1n \\sum_k m_k` and
    :math:`s = (\\frac{1}{n-1} \\sum_k (m_k - \\bar m)^2)^{1/2}` over the :math:`n` pairs (None for :math:`n = 1`).
    The end-point row's accuracy is the mean of :math:`(a_k + b_k)/2` with
    :math:`\\pm\\, \\tfrac12 (s_a^2 + s_b^2)^{1/2}`, :math:`s_a, s_b` the standard deviations over pairs of the
    accuracies of the end points A (:math:`t = 0`) and B (:math:`t = 1`), as in the paper's code. As in the
    paper, :math:`a_k, b_k` are the curves' own values at :math:`t = 0` and :math:`t = 1` (batch norm
    re-estimated like at every curve point; the mean over the settings, which share their end points); the end
    points' accuracies as trained (``pair["endpoints"]``, their own batch-norm statistics) are given beside
    them, and stand in when there is no setting.

    Parameters
    ----------
    results : dict
        A study's results (see :func:`validate_results`).

    Returns
    -------
    dict
        ``{"n_pairs": n, "rows": {row: {metric: {"mean", "std", "n"}}}}`` with rows ``"endpoints"`` and each of
        ``results["settings"]`` in order. Curve rows hold ``avg_accuracy`` (arc-length-weighted average, "Avg"),
        ``min_accuracy`` ("Min"), ``mid_accuracy`` (at the evaluated ``t`` nearest 0.5) and ``accuracy_barrier``
        in %, and ``loss_barrier`` and ``avg_loss`` in loss units. The end-point row holds ``avg_accuracy`` (the
        mean end-point accuracy with the ± above), ``a_accuracy``, ``b_accuracy``, ``trained_accuracy`` (from
        ``pair["endpoints"]``, same ±) in % and ``loss`` (trained, loss units). ``"endpoint_source"`` says
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
    validate_results(results)
    pairs = results["pairs"]
    trained_a = [100.0 * float(p["endpoints"]["a"]["test_acc"]) for p in pairs]
    trained_b = [100.0 * float(p["endpoints"]["b"]["test_acc"]) for p in pairs]
    settings = list(results["settings"])
    if settings:  # the curves' own t = 0 and t = 1 values (batch norm re-estimated as at every curve point)
        acc_a = [100.0 * math.fsum(p["curves"][s]["test_accuracy"][0] for s in settings) / len(settings) for p in pairs]
        acc_b = [
            100.0 * math.fsum(p["curves"][s]["test_accuracy"][-1] for s in settings) / len(settings) for p in pairs
        ]
    else:
        acc_a, acc_b = trained_a, trained_b
    endpoints: dict[str, Any] = {
        "avg_accuracy": _endpoint_stat(acc_a, acc_b),
        "a_accuracy": _stat(acc_a),
        "b_accuracy": _stat(acc_b),
        "trained_accuracy": _endpoint_stat(trained_a, trained_b),
    }
    losses = [(p["endpoints"]["a"].get("test_loss"), p["endpoints"]["b"].get("test_loss")) for p in pairs]
    if all(_is_number(a) and _is_number(b) for a, b in losses):
        endpoints["loss"] = _stat([(a + b) / 2.0 for a, b in losses])
    rows: dict[str, Any] = {"endpoints": endpoints}
    for s in results["settings"]:
        curves = [p["curves"][s] for p in pairs]
        rows[s] = {
            metric: _stat([c[metric] for c in curves], scale)
            for metric, scale in _CURVE_METRICS.items()
            if all(_is_number(c.get(metric)) for c in curves)
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


def _config(results: Mapping[str, Any]) -> Mapping[str, Any]:
    config = results.get("config") or {}
    return config if isinstance(config, Mapping) else {}


def dataset_label(dataset: Any) -> str:
    """A short name for a data set given by name or by ``.npz`` path (``/data/cifar10.npz`` -> ``cifar10``)."""
    text = str(dataset)
    return Path(text).stem if text.lower().endswith(".npz") else text


def _arch_dataset(results: Mapping[str, Any]) -> tuple[str, str]:
    config = _config(results)
    arch = config.get("arch", config.get("model", "unknown architecture"))
    dataset = config.get("dataset", "unknown data set")
    return str(arch), dataset_label(dataset)


def _num_points(results: Mapping[str, Any]) -> int | None:
    for s in results["settings"]:
        return len(results["pairs"][0]["curves"][s]["t"])
    return None


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _precision_note(results: Mapping[str, Any]) -> str:
    """The test-set size and its noise floor (one image in percentage points), and which batches batch norm was
    re-estimated on, when the results record them."""
    note = ""
    n = results.get("test_images")
    if isinstance(n, int) and n > 0:
        note += (f" Test set: {n:,} images, so one image is {100 / n:.2g} points; differences of that size are "
                 "noise.")  # fmt: skip
    bn = results.get("bn_batches")
    if isinstance(bn, Mapping) and bn.get("shared"):
        count = bn.get("count")
        where = f"the same {count} training batches" if count else "one full pass of the training images"
        note += f" Batch norm re-estimated on {where} at every t and on every curve."
    return note


def format_table(results: Mapping[str, Any], *, decimals: int = 1) -> str:
    """A markdown table laid out like Tatro et al. (2020), Table 1: Avg and Min test accuracy (%) per setting.

    Rows: Endpoints (mean end-point accuracy, its ± from :func:`summary_table`), then each setting of
    ``results["settings"]``; cells read ``"88.5 ± 0.1"`` (mean ± sample std over pairs; no ± for one pair). With
    two or more curve rows, the best Avg and the best Min among them (ties at the shown precision included) are
    bold, as in the paper. A caption line above names the architecture, the data set and the number of pairs.

    Parameters
    ----------
    results : dict
        A study's results (see :func:`validate_results`).
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
    table = summary_table(results)
    rows = table["rows"]
    n = table["n_pairs"]
    arch, dataset = _arch_dataset(results)
    points = _num_points(results)
    spread = "mean ± std (ddof=1) over" if n > 1 else "a single pair; no spread over"
    caption = (
        f"Test accuracy (%) along the curves: {arch} on {dataset}, {spread} {n} pair{'s' if n != 1 else ''}. "
        "Avg: arc-length-weighted average"
        + (f"; Min: minimum over {points} points" if points else "")
        + "; Endpoints: mean accuracy at t = 0 and t = 1"
        + (" (batch norm re-estimated as along the curves)." if table["endpoint_source"] == "curves" else ".")
        + _precision_note(results)
    )
    curve_rows = [s for s in results["settings"] if "avg_accuracy" in rows[s] and "min_accuracy" in rows[s]]
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
    for s in results["settings"]:
        cells = []
        for metric in ("avg_accuracy", "min_accuracy"):
            text = _fmt_stat(rows[s].get(metric), decimals)
            cells.append(f"**{text}**" if s in best.get(metric, ()) else text)
        lines.append(f"| {SETTING_LABELS[s]} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _format_extra_table(results: Mapping[str, Any], decimals: int = 2) -> str:
    rows = summary_table(results)["rows"]
    head = "| Setting | Acc. at t≈0.5 (%) | Accuracy barrier (%) | Loss barrier | Avg loss |"
    lines = [head, "| --- | ---: | ---: | ---: | ---: |"]
    for s in results["settings"]:
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


def _scale_note(results: Mapping[str, Any]) -> str:
    config = _config(results)
    keys = ("epoch", "pair", "preset", "subset", "points", "batch", "width", "iter", "samples", "size")
    ours = [
        f"{k}={v}"
        for k, v in config.items()
        if any(w in str(k).lower() for w in keys) and isinstance(v, (str, int, float, bool))
    ]
    n = len(results["pairs"])
    ours_text = ", ".join(ours) if ours else "see the configuration above"
    return (
        f"**Scale difference.** {_PAPER_SCALE}. This study used {n} pair{'s' if n != 1 else ''} ({ours_text}). "
        "Compare the ordering of the settings and the gaps between them, not absolute accuracies."
    )


def _config_lines(results: Mapping[str, Any]) -> list[str]:
    config = _config(results)
    if not config:
        return ["(no configuration recorded)"]
    lines = []
    for k, v in config.items():
        text = v if isinstance(v, str) else json.dumps(_json.encode(v, "config"), ensure_ascii=False)
        lines.append(f"- **{k}**: `{text}`")
    return lines


def _figure_lines(figures: Mapping[str, Any], folder: Path) -> list[str]:
    lines = []
    for key, path in figures.items():
        caption = FIGURE_FILES[key][1] if key in FIGURE_FILES else str(key)
        rel = Path(os.path.relpath(Path(path).resolve(), folder.resolve())).as_posix()
        lines += [f"![{caption}]({rel})", "", f"*{caption}.*", ""]
    return lines


def _alignment_lines(results: Mapping[str, Any]) -> list[str]:
    rows = []
    for i, pair in enumerate(results["pairs"]):
        al = pair.get("alignment")
        if not al:
            continue
        where = f"results['pairs'][{i}]['alignment']"
        groups = list(_require(al, "groups", where))
        before = _require(al, "correlation_before", where)
        after = _require(al, "correlation_after", where)
        b = [float(before[g]) for g in groups if g in before]
        a = [float(after[g]) for g in groups if g in after]
        improved = sum(1 for g in groups if g in before and g in after and after[g] > before[g])
        mb = math.fsum(b) / len(b) if b else math.nan
        ma = math.fsum(a) / len(a) if a else math.nan
        seeds = ", ".join(str(s) for s in pair.get("seeds", []))
        rows.append(
            f"| {pair.get('pair', i + 1)} | {seeds} | {len(groups)} | {mb:.3f} | {ma:.3f} | {ma - mb:+.3f} | "
            f"{improved}/{len(groups)} |"
        )
    if not rows:
        return []
    return [
        "## Alignment",
        "",
        "Mean over groups (unweighted) of the correlation of matched units, before and after alignment.",
        "",
        "| Pair | Seeds | Groups | Corr. before | Corr. after | Gain | Groups improved |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
    ]


def midpoint_summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """Alignment along the curve, summarised: per case and end point, the mean over groups of the correlation of
    matched units between the midpoint and the end point, before and after aligning the midpoint (lists over the
    pairs that have the case), the largest gain of a single group, and whether the Aligned curve's midpoint is
    already aligned with both end points: every pair's mean gain below :data:`MIDPOINT_ALIGNED_GAIN` for both.
    Empty when no pair has ``midpoint_alignment``."""
    cases: dict[str, dict[str, Any]] = {}
    for pair in results["pairs"]:
        mid = pair.get("midpoint_alignment")
        if not mid:
            continue
        for case, res in (mid.get("cases") or {}).items():
            row = cases.setdefault(case, {e: {"before": [], "after": [], "gain": [], "max_group_gain": []}
                                          for e in ("a", "b")})  # fmt: skip
            for end in ("a", "b"):
                pairs = [(float(res["before"][end][g]), float(res["after"][end][g])) for g in res["groups"]]
                pairs = [(b, a) for b, a in pairs if math.isfinite(b) and math.isfinite(a)]
                if not pairs:
                    continue
                before = math.fsum(b for b, _ in pairs) / len(pairs)
                after = math.fsum(a for _, a in pairs) / len(pairs)
                row[end]["before"].append(before)
                row[end]["after"].append(after)
                row[end]["gain"].append(after - before)
                row[end]["max_group_gain"].append(max(a - b for b, a in pairs))
    out: dict[str, Any] = {"cases": cases, "threshold": MIDPOINT_ALIGNED_GAIN}
    aligned = cases.get("aligned")
    if aligned and aligned["a"]["gain"] and aligned["b"]["gain"]:
        out["aligned_midpoint_already_aligned"] = all(
            g < MIDPOINT_ALIGNED_GAIN for end in ("a", "b") for g in aligned[end]["gain"]
        )
    return out


def learning_speed(results: Mapping[str, Any]) -> dict[str, Any]:
    """Per setting and pair, the final train loss and accuracy of the curve fit and the first curve epoch (1-based)
    at which its train loss is at most the Unaligned curve's final train loss of the same pair (None: not reached;
    ``"n/a"``: the pair has no Unaligned curve to compare with; ``"-"``: the pair has no history of the setting, so
    that the entries line up with the pairs). Reads ``pair["train_history"]``; empty when no pair
    has it."""
    out: dict[str, Any] = {}
    pairs = results["pairs"]
    for s in results["settings"]:
        if not any((pair.get("train_history") or {}).get(s) for pair in pairs):
            continue
        row = out[s] = {"final_loss": [], "final_accuracy": [], "epochs": [], "first_epoch": []}
        for pair in pairs:  # first_epoch has one entry per pair ("-": no history of this setting), in pair order
            hist = pair.get("train_history") or {}
            h = hist.get(s)
            if not h:
                row["first_epoch"].append("-")
                continue
            ref = hist.get("unaligned")
            target = float(ref[-1]["loss"]) if ref else None
            row["final_loss"].append(float(h[-1]["loss"]))
            row["final_accuracy"].append(float(h[-1]["accuracy"]))
            row["epochs"].append(len(h))
            row["first_epoch"].append(
                "n/a" if target is None else next((int(r["epoch"]) for r in h if float(r["loss"]) <= target), None)
            )
    return out


def _midpoint_lines(results: Mapping[str, Any]) -> list[str]:
    summary = midpoint_summary(results)
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


def _learning_speed_lines(results: Mapping[str, Any]) -> list[str]:
    speed = learning_speed(results)
    if not speed:
        return []
    rows = []
    for s, row in speed.items():
        first = ", ".join("not reached" if e is None else str(e) for e in row["first_epoch"])  # "n/a" stays
        rows.append(f"| {SETTING_LABELS.get(s, s)} | {_fmt_stat(_stat(row['final_loss']), 3)} | "
                    f"{_fmt_stat(_stat(row['final_accuracy'], 100.0), 1)} | {first} |")  # fmt: skip
    n = len(results["pairs"])
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


def _pam_lines(results: Mapping[str, Any]) -> list[str]:
    rows = []
    for i, pair in enumerate(results["pairs"]):
        pam = pair.get("pam") or {}
        for s in SETTINGS:
            run = pam.get(s)
            if not run:
                continue
            hist = [float(v) for v in run.get("history", [])]
            changed = run.get("changed", {}) or {}
            iters = max((len(v) for v in changed.values()), default=0)
            total = sum(int(c) for v in changed.values() for c in v)
            last = sum(int(v[-1]) for v in changed.values() if v)
            start = f"{hist[0]:.4g}" if hist else ""
            end = f"{hist[-1]:.4g}" if hist else ""
            rows.append(
                f"| {pair.get('pair', i + 1)} | {SETTING_LABELS.get(s, s)} | {iters} | {start} | {end} | {total} | "
                f"{last} |"
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
        *_pam_iteration_lines(results),
    ]


def _pam_iteration_lines(results: Mapping[str, Any]) -> list[str]:
    """Per PAM setting and outer iteration: objective, units moved and Min / Avg accuracy, mean ± std over pairs."""
    table: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for pair in results["pairs"]:
        for s, run in (pair.get("pam") or {}).items():
            for row in (run or {}).get("iterations") or []:
                table.setdefault((s, int(row["iteration"])), []).append(row)
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
            f"| {SETTING_LABELS.get(s, s)} | {j} | {_fmt_stat(_stat([r['objective'] for r in rows]), 4)} | "
            f"{_fmt_stat(_stat([r['moved'] for r in rows]), 1)} | "
            f"{_fmt_stat(_stat([r['avg_accuracy'] for r in rows], 100.0))} | "
            f"{_fmt_stat(_stat([r['min_accuracy'] for r in rows], 100.0))} |"
        )
    return [*lines, ""]


def _verification_lines(results: Mapping[str, Any]) -> list[str]:
    reports = []
    for i, pair in enumerate(results["pairs"]):
        ver = pair.get("verification")
        if ver:
            checks = _require(ver, "checks", f"results['pairs'][{i}]['verification']")
            reports.append((pair.get("pair", i + 1), ver, checks))
    if not reports:
        return []
    names: list[str] = []
    for _, _, checks in reports:
        names += [c for c in checks if c not in names]
    lines = [
        "## Verification",
        "",
        "Is the alignment a local optimum of the joint curve objective? Verdict of each check per pair.",
        "",
        "| Check | " + " | ".join(f"Pair {p}" for p, _, _ in reports) + " |",
        "| --- |" + " --- |" * len(reports),
    ]
    for name in names:
        cells = [str(checks[name].get("verdict", "?")) if name in checks else "—" for _, _, checks in reports]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **overall** | " + " | ".join(f"**{ver.get('verdict', '?')}**" for _, ver, _ in reports) + " |")
    lines.append("")
    for p, _, checks in reports:
        lines.append(f"Pair {p}:")
        lines.append("")
        for name, check in checks.items():
            lines.append(f"- {name} ({check.get('verdict', '?')}): {_cell(check.get('summary', ''))}")
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


def _is_robust(results: Mapping[str, Any]) -> bool:
    return bool(results["settings"]) and all(
        p["curves"][s].get("robust_test_accuracy") is not None for p in results["pairs"] for s in results["settings"]
    )


def robust_table(results: Mapping[str, Any]) -> dict[str, Any]:
    """Mean and sample std over pairs of the robust summary of each setting's curves, and of the end points.

    End points: clean and robust accuracy at :math:`t = 0` and :math:`t = 1` of the curves (batch norm
    re-estimated as along the curves), averaged over the settings, with the paper's
    :math:`\\pm \\tfrac12 (s_a^2 + s_b^2)^{1/2}`. Curves: the columns of ``_ROBUST_COLUMNS`` (accuracies in %).

    Raises
    ------
    ValueError
        If the study has no robust evaluation.
    """
    validate_results(results)
    if not _is_robust(results):
        raise ValueError("the results hold no robust evaluation (a study with robust=True)")
    pairs, settings = results["pairs"], results["settings"]

    def ends(key: str, index: int) -> list[float]:
        return [100.0 * math.fsum(p["curves"][s][key][index] for s in settings) / len(settings) for p in pairs]

    rows: dict[str, Any] = {
        "endpoints": {
            "clean": _endpoint_stat(ends("test_accuracy", 0), ends("test_accuracy", -1)),
            "robust": _endpoint_stat(ends("robust_test_accuracy", 0), ends("robust_test_accuracy", -1)),
        }
    }
    for s in settings:
        rows[s] = {key: _stat([p["curves"][s][key] for p in pairs], scale) for key, _, scale in _ROBUST_COLUMNS}
    return {"rows": rows, "n_pairs": len(pairs)}


def _robust_lines(results: Mapping[str, Any]) -> list[str]:
    if not _is_robust(results):
        return []
    table = robust_table(results)["rows"]
    attack = results["pairs"][0]["curves"][results["settings"][0]].get("adversarial") or {}
    bn = results["pairs"][0]["curves"][results["settings"][0]].get("bn_inputs")
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
    trained = [(p["endpoints"][e].get("test_acc"), p["endpoints"][e].get("robust_test_acc"))
               for p in results["pairs"] for e in ("a", "b")]  # fmt: skip
    if all(r is not None for _, r in trained):
        clean = _stat([c for c, _ in trained], 100.0)
        robust = _stat([r for _, r in trained], 100.0)
        lines.append(f"| As trained (own statistics), all end points | {_fmt_stat(clean)} | {_fmt_stat(robust)} |")
    lines += ["", header, "| --- |" + " ---: |" * len(_ROBUST_COLUMNS)]
    for s in results["settings"]:
        cells = [_fmt_stat(table[s][key], 1 if scale == 100.0 else 3) for key, _, scale in _ROBUST_COLUMNS]
        lines.append(f"| {SETTING_LABELS[s]} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_report(
    results: Mapping[str, Any],
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
    results : dict
        A study's results (see :func:`validate_results`).
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
    validate_results(results)
    if notes is not None and not isinstance(notes, str):
        raise TypeError(f"`notes` must be a string of markdown, got {type(notes).__name__}")
    paper = _check_paper_row(paper_row) if paper_row is not None else None
    folder = Path(folder)
    if figures is None:
        figures = {k: folder / name for k, (name, _) in FIGURE_FILES.items() if (folder / name).is_file()}
    elif not isinstance(figures, Mapping):
        raise TypeError(f"`figures` must be a dict of name -> path, got {type(figures).__name__}")
    arch, dataset = _arch_dataset(results)
    n = len(results["pairs"])
    lines = [
        f"# Mode connectivity study: {arch} on {dataset}",
        "",
        f"{n} pair{'s' if n != 1 else ''} of independently trained networks; curve settings: "
        + ", ".join(SETTING_LABELS[s] for s in results["settings"])
        + ". Accuracies are on the test set.",
        "",
        "## Configuration",
        "",
        *_config_lines(results),
        "",
        "## Results",
        "",
        format_table(results),
        "",
    ]
    if results["settings"]:
        trained = summary_table(results)["rows"]["endpoints"]["trained_accuracy"]
        lines += [
            f"End points evaluated as trained (their own batch-norm statistics): {_fmt_stat(trained, 1)} %.",
            "",
            "Further metrics (mean ± std over pairs):",
            "",
            _format_extra_table(results),
            "",
        ]
    if paper is not None:
        size = _PAPER_MODEL_SIZES.get(arch.lower())
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
            _scale_note(results),
            "",
        ]
    lines += _robust_lines(results)
    if figures:
        lines += ["## Figures", "", *_figure_lines(figures, folder)]
    lines += _alignment_lines(results)
    lines += _midpoint_lines(results)
    lines += _learning_speed_lines(results)
    lines += _pam_lines(results)
    lines += _verification_lines(results)
    if notes:
        lines += ["## Notes", "", notes.strip(), ""]
    return atomic_write_text(folder / "report.md", "\n".join(lines).rstrip() + "\n")


# ----------------------------------------------------------------------------------------------------------------
# JSON
def write_results_json(results: Mapping[str, Any], folder: str | os.PathLike) -> Path:
    """Write ``results.json`` (strict JSON, atomically) into ``folder``.

    Non-finite floats become the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (the convention of
    :meth:`~neuralign.verification.VerificationReport.to_json`); tuples become lists, numpy and torch values
    plain numbers or lists. :func:`read_results_json` reads it back.

    Parameters
    ----------
    results : dict
        A study's results (validated with :func:`validate_results`).
    folder : path-like
        Where ``results.json`` goes (created if needed).

    Returns
    -------
    pathlib.Path
        The path of ``results.json``.

    Raises
    ------
    TypeError
        If a value cannot be written as JSON (names where it is).
    ValueError
        For malformed ``results``.

    Examples
    --------
    >>> import tempfile
    >>> from neuralign.curves import CurveEvaluation
    >>> ev = CurveEvaluation.from_values([0, 0.5, 1], [0.3, 0.9, 0.3], [0.9, 0.6, 0.8], [0, 1, 2]).to_dict()
    >>> ends = {"a": {"test_loss": 0.3, "test_acc": 0.9}, "b": {"test_loss": 0.3, "test_acc": 0.8}}
    >>> res = {"settings": ["aligned"], "pairs": [{"endpoints": ends, "curves": {"aligned": ev}}]}
    >>> ev["loss_barrier"] = float("inf")
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     back = read_results_json(write_results_json(res, tmp))
    >>> back["pairs"][0]["curves"]["aligned"]["loss_barrier"]
    inf
    """
    validate_results(results)
    text = _json.dumps(results, where="results")
    return atomic_write_text(Path(folder) / "results.json", text + "\n")


def read_results_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by :func:`write_results_json`, turning ``"inf"``, ``"-inf"``, ``"nan"`` into floats.

    Any string value equal to one of these three is decoded, wherever it is.

    Parameters
    ----------
    path : path-like
        ``results.json`` or a folder holding it.

    Returns
    -------
    dict

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If the file is not JSON or not a dict of study results.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {str(path)!r}")
    try:
        data = _json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("kind", "study_results") != "study_results":
        raise ValueError(f"{str(path)!r} does not hold study results (a dict with kind 'study_results')")
    return data

"""Figures of a study (Tatro et al. 2020): curves, correlation signature, PAM stability, loss planes, verdicts.

Every function draws on a :class:`matplotlib.figure.Figure` created directly (no pyplot, no global state, no open
figure left behind), saves it atomically (temporary file in the same folder, then :func:`os.replace`) and returns
the written path. The format follows the suffix of ``path``: ``.png`` (150 dpi), ``.pdf`` or ``.svg``.
The input ``results`` is a study's :class:`~neuralign.study.results.StudyResults` or its JSON form (a dict, read with
:meth:`StudyResults.from_dict <neuralign.study.results.StudyResults.from_dict>`), described in
:mod:`neuralign.study.results`.

Why one module: every figure reads the same :class:`~neuralign.study.results.StudyResults` and shares one style
(setting colours, bands over pairs, atomic saving); :func:`plot_study` picks the figures from it in one place.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colors as mcolors
from matplotlib import patheffects
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, MaxNLocator

from neuralign._utils import atomic_write
from neuralign._validate import require_key
from neuralign.study.report import FIGURE_FILES, MIDPOINT_CASES, SETTING_LABELS, dataset_label
from neuralign.study.results import PlaneResults, StudyResults, as_study_results
from neuralign.verification.local import CHECKS

__all__ = [
    "SETTING_STYLES",
    "plot_curve_metrics",
    "plot_robust_metrics",
    "plot_layer_correlation",
    "plot_reassignment",
    "plot_plane",
    "plot_verification_summary",
    "plot_midpoint_alignment",
    "plot_learning_speed",
    "plot_study",
]

DPI = 150
_FORMATS = ("png", "pdf", "svg")

#: Colour and line style of each setting, the same in every figure.
SETTING_STYLES: dict[str, dict[str, Any]] = {
    "unaligned": {"color": "#d62728", "linestyle": "--"},
    "pam_unaligned": {"color": "#ff7f0e", "linestyle": "-."},
    "pam_aligned": {"color": "#2ca02c", "linestyle": ":"},
    "aligned": {"color": "#1f77b4", "linestyle": "-"},
}
_VERDICT_COLOURS = {"pass": "#4caf50", "fail": "#e53935", "inconclusive": "#ffb300", None: "#e0e0e0"}
_POINT_LABELS = {"w_A": r"$w_A$", "w_B": r"$w_B$", "P w_B": r"$P\,w_B$", "theta": r"$\theta$"}


Results = StudyResults | Mapping[str, Any]


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _check_path(path: str | os.PathLike) -> tuple[Path, str]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or path-like, got {type(path).__name__}")
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in _FORMATS:
        raise ValueError(f"`path` must end in one of {['.' + f for f in _FORMATS]}, got {str(path)!r}")
    return path, fmt


def _save_figure(fig: Figure, path: Path, fmt: str) -> Path:
    """Save atomically (a reader never sees half an image)."""
    return atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=DPI))


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _finite(values: Any) -> np.ndarray:
    """float64 array with infinities replaced by NaN (matplotlib skips NaN)."""
    arr = np.array(values, dtype=np.float64)
    arr[~np.isfinite(arr)] = np.nan
    return arr


def _mean_std(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean over axis 0 and sample std (ddof=1), None for a single row."""
    mean = np.nanmean(stack, axis=0) if np.isfinite(stack).any() else stack[0]
    if stack.shape[0] < 2:
        return mean, None
    return mean, np.nanstd(stack, axis=0, ddof=1)


def _title_prefix(res: StudyResults) -> str:
    dataset = res.dataset
    parts = [p for p in (res.arch, None if dataset is None else dataset_label(dataset)) if p is not None]
    return " on ".join(parts) + ": " if parts else ""


def _n_pairs_text(n: int) -> str:
    return "1 pair" if n == 1 else f"{n} pairs, mean ± std"


def _shorten_pattern(groups: Sequence[str], max_len: int = 18) -> tuple[list[str], str | None]:
    """Tick labels (the dotted components shared by all names dropped, long words abbreviated) and the dropped
    context as a pattern (``"features.*.conv"``; None if nothing dropped)."""
    parts = [str(g).split(".") for g in groups]
    head: list[str] = []
    tail: list[str] = []
    if len(parts) > 1:
        while all(len(p) > 1 for p in parts) and len({p[0] for p in parts}) == 1:
            head.append(parts[0][0])
            parts = [p[1:] for p in parts]
        while all(len(p) > 1 for p in parts) and len({p[-1] for p in parts}) == 1:
            tail.insert(0, parts[0][-1])
            parts = [p[:-1] for p in parts]
    out = []
    for p in parts:
        label = ".".join(p)
        if len(label) > max_len:
            label = ".".join(_abbreviate(c) for c in p)
        if len(label) > max_len:
            label = "…" + label[-(max_len - 1) :]
        out.append(label)
    pattern = ".".join([*head, "*", *tail]) if head or tail else None
    return out, pattern


def _abbreviate(component: str) -> str:
    match = re.match(r"([A-Za-z]+)(.*)", component)
    if match and len(match.group(1)) > 4:
        return match.group(1)[:3] + match.group(2)
    return component


def _pretty_label(label: str) -> str:
    return _POINT_LABELS.get(str(label), str(label))


# ----------------------------------------------------------------------------------------------------------------
def _curve_stack(res: StudyResults, setting: str, key: str, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The values of the field ``key`` along each pair's curve, on the first pair's ``t`` (others interpolated)."""
    curves = [p.curves[setting] for p in res.pairs]
    t = np.array(curves[0].t, dtype=np.float64)
    rows = []
    for c in curves:
        tc = np.array(c.t, dtype=np.float64)
        v = scale * _finite(getattr(c, key))
        rows.append(v if tc.shape == t.shape and np.allclose(tc, t) else np.interp(t, tc, v))
    return t, np.stack(rows)


def plot_curve_metrics(results: Results, path: str | os.PathLike) -> Path:
    """Test accuracy (%) and test loss against :math:`t` along each setting's curve (the paper's Figure 1).

    One line per setting of ``results.settings`` (mean over pairs, a shaded band of ± one sample standard
    deviation when there is more than one pair), with the end points marked at :math:`t = 0` (A) and
    :math:`t = 1` (B): the curves' own values there, averaged over the settings, as in the report's table (the
    accuracies as trained, ``pair.endpoints``, can differ through batch-norm statistics). Colours and line
    styles follow :data:`SETTING_STYLES`.

    Parameters
    ----------
    results : StudyResults or dict
        A study's results.
    path : path-like
        Output file (``.png``, ``.pdf`` or ``.svg``).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    TypeError, ValueError
        For malformed ``results``, no settings, or an unsupported file suffix.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from neuralign.curves import CurveEvaluation
    >>> ev = CurveEvaluation.from_values([0, 0.5, 1], [0.3, 0.9, 0.3], [0.9, 0.6, 0.8], [0, 1, 2]).to_dict()
    >>> ends = {"a": {"test_loss": 0.3, "test_acc": 0.9}, "b": {"test_loss": 0.3, "test_acc": 0.8}}
    >>> res = {"settings": ["aligned"], "pairs": [{"endpoints": ends, "curves": {"aligned": ev}}]}
    >>> tmp = tempfile.TemporaryDirectory()
    >>> plot_curve_metrics(res, pathlib.Path(tmp.name) / "curves.png").name
    'curves.png'
    >>> tmp.cleanup()
    """
    path, fmt = _check_path(path)
    res = as_study_results(results)
    if not res.settings:
        raise ValueError("`results['settings']` is empty: there is no curve to plot")
    fig = _figure(11.0, 4.6)
    ax_acc, ax_loss = fig.subplots(1, 2)
    for s in res.settings:
        style = SETTING_STYLES[s]
        for ax, key, scale in ((ax_acc, "test_accuracy", 100.0), (ax_loss, "test_loss", 1.0)):
            t, stack = _curve_stack(res, s, key, scale)
            mean, std = _mean_std(stack)
            ax.plot(t, mean, label=SETTING_LABELS[s], linewidth=2, **style)
            if std is not None:
                ax.fill_between(t, mean - std, mean + std, color=style["color"], alpha=0.18, linewidth=0)
    for ax, key, scale in ((ax_acc, "test_accuracy", 100.0), (ax_loss, "test_loss", 1.0)):
        # the curves' own t = 0 and t = 1 values, averaged over the settings (they share their end points): the
        # end-point values of the table (neuralign.study.report.summary_table)
        ends = np.mean([_curve_stack(res, s, key, scale)[1][:, [0, -1]] for s in res.settings], axis=0)
        mean, std = _mean_std(ends)  # ends: (pairs, 2)
        ax.errorbar(
            [0.0, 1.0], mean, yerr=std, fmt="o", color="black", markersize=7, capsize=4, zorder=5,
            label="End points (A at t=0, B at t=1)",
        )  # fmt: skip
    losses = np.concatenate([_curve_stack(res, s, "test_loss", 1.0)[1].ravel() for s in res.settings])
    losses = losses[np.isfinite(losses) & (losses > 0)]
    if losses.size and losses.max() / losses.min() > 30:
        ax_loss.set_yscale("log")
    ax_acc.set_ylabel("Test accuracy (%)")
    ax_loss.set_ylabel("Test loss (cross-entropy)")
    for ax, name in ((ax_acc, "Test accuracy"), (ax_loss, "Test loss")):
        ax.set_xlabel("t (position along the curve)")
        ax.set_xlim(-0.03, 1.03)
        ax.set_title(name)
        ax.grid(alpha=0.3)
    handles, labels = ax_acc.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(f"{_title_prefix(res)}test metrics along the curves ({_n_pairs_text(len(res.pairs))})")
    return _save_figure(fig, path, fmt)


def plot_robust_metrics(results: Results, path: str | os.PathLike) -> Path:
    """Clean and robust test accuracy (%) and robust test loss against :math:`t` (Tatro et al. 2020, §4).

    One line per setting (mean over pairs, a band of ± one sample standard deviation with more than one pair);
    needs curves evaluated with an attack (``robust_test_accuracy``). Styles follow :data:`SETTING_STYLES`.

    Raises
    ------
    ValueError
        If a curve has no robust evaluation, or for an unsupported file suffix.
    """
    path, fmt = _check_path(path)
    res = as_study_results(results)
    settings = res.settings
    if not res.robust:
        raise ValueError("every curve needs a robust evaluation (`robust_test_accuracy`) to plot robust metrics")
    fig = _figure(15.0, 4.6)
    axes = fig.subplots(1, 3)
    panels = (
        ("test_accuracy", 100.0, "Clean test accuracy (%)"),
        ("robust_test_accuracy", 100.0, "Robust test accuracy (%)"),
        ("robust_test_loss", 1.0, "Robust test loss (cross-entropy)"),
    )
    for ax, (key, scale, name) in zip(axes, panels):
        for s in settings:
            style = SETTING_STYLES[s]
            t, stack = _curve_stack(res, s, key, scale)
            mean, std = _mean_std(stack)
            ax.plot(t, mean, label=SETTING_LABELS[s], linewidth=2, **style)
            if std is not None:
                ax.fill_between(t, mean - std, mean + std, color=style["color"], alpha=0.18, linewidth=0)
        ax.set_xlabel("t (position along the curve)")
        ax.set_xlim(-0.03, 1.03)
        ax.set_title(name)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(f"{_title_prefix(res)}robust curves ({_n_pairs_text(len(res.pairs))})")
    return _save_figure(fig, path, fmt)


# ----------------------------------------------------------------------------------------------------------------
def plot_layer_correlation(results: Results, path: str | os.PathLike) -> Path:
    """Layerwise mean correlation of matched units before and after alignment (the "correlation signature").

    For each permutation group (x axis, in the order of ``alignment.groups``), the mean over pairs of
    ``correlation_before`` and ``correlation_after`` with error bars of one sample standard deviation (more than
    one pair); the gap between them is shaded. Pairs whose ``alignment`` is missing or None are left out.

    Parameters
    ----------
    results : StudyResults or dict
        A study's results.
    path : path-like
        Output file.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        If no pair has alignment data, or for malformed ``results``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from neuralign.curves import CurveEvaluation
    >>> ev = CurveEvaluation.from_values([0, 0.5, 1], [0.3, 0.9, 0.3], [0.9, 0.6, 0.8], [0, 1, 2]).to_dict()
    >>> ends = {"a": {"test_loss": 0.3, "test_acc": 0.9}, "b": {"test_loss": 0.3, "test_acc": 0.8}}
    >>> res = {"settings": ["aligned"], "pairs": [{"endpoints": ends, "curves": {"aligned": ev}}]}
    >>> tmp = tempfile.TemporaryDirectory()
    >>> res["pairs"][0]["alignment"] = {"groups": ["fc1", "fc2"], "correlation_before": {"fc1": 0.2, "fc2": 0.4},
    ...                                 "correlation_after": {"fc1": 0.6, "fc2": 0.7}}
    >>> plot_layer_correlation(res, pathlib.Path(tmp.name) / "signature.png").name
    'signature.png'
    >>> tmp.cleanup()
    """
    path, fmt = _check_path(path)
    res = as_study_results(results)
    aligned = [p.alignment for p in res.pairs if p.alignment is not None]
    if not aligned:
        raise ValueError("no pair of `results` has alignment data ('alignment' is missing or None in every pair)")
    groups: list[str] = []
    for al in aligned:
        groups += [g for g in al.groups if g not in groups]
    x = np.arange(len(groups))
    n = len(aligned)
    width = min(max(6.5, 0.28 * len(groups) + 2.5), 22.0)
    fig = _figure(width, 4.4)
    ax = fig.subplots()
    means = []
    for key, label, colour, marker in (
        ("correlation_before", "Before alignment", "#7f7f7f", "o"),
        ("correlation_after", "After alignment", "#1f77b4", "s"),
    ):
        by_group = [getattr(al, key) for al in aligned]
        mean, std = _mean_std(_finite([[float(c[g]) if g in c else math.nan for g in groups] for c in by_group]))
        means.append(mean)
        ax.errorbar(
            x, mean, yerr=std, fmt=f"-{marker}", color=colour, label=label, capsize=3, markersize=5, linewidth=1.5
        )
    ax.fill_between(x, *means, color="#1f77b4", alpha=0.12)
    ax.set_xticks(x)
    many = len(groups) > 8
    ticks, pattern = _shorten_pattern(groups)
    ax.set_xticklabels(ticks, rotation=60 if many else 0, ha="right" if many else "center", fontsize=7 if many else 9)
    ax.set_xlabel("Permutation group (layer" + (f" {pattern}" if pattern else "") + "), input to output")
    ax.set_ylabel("Mean correlation of matched units")
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    spread = "1 pair" if n == 1 else f"{n} pairs, mean ± std"
    ax.set_title(f"{_title_prefix(res)}correlation signature ({spread})")
    return _save_figure(fig, path, fmt)


# ----------------------------------------------------------------------------------------------------------------
def _stability_runs(obj: Any) -> tuple[dict[str, Any], float | None]:
    """The stability runs (label -> run) and the reassignment threshold, from any accepted input."""
    if hasattr(obj, "to_dict") and hasattr(obj, "checks"):
        obj = obj.to_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"`verification_or_runs` must be a verification report (dict) or a dict of stability runs, got "
            f"{type(obj).__name__}"
        )
    threshold = None
    if obj.get("kind") == "verification_report":
        checks = require_key(obj, "checks", "verification_or_runs")
        if "stability" not in checks:
            raise ValueError(
                "the verification report has no 'stability' check; run the verification with the 'stability' check"
            )
        obj = checks["stability"]
    if "details" in obj and isinstance(obj.get("details"), Mapping):
        threshold = (obj.get("thresholds") or {}).get("max_reassigned_fraction")
        obj = require_key(obj["details"], "runs", "verification_or_runs['details']")
    if not obj or not all(isinstance(r, Mapping) and "reassigned_fraction" in r for r in obj.values()):
        raise ValueError(
            "`verification_or_runs` must be a verification report, its 'stability' check, or a dict of runs "
            "label -> {'objective', 'reassigned_fraction', 'distance_to_perms'}"
        )
    if "alignment" not in obj:
        raise ValueError(f"the stability runs lack the run 'alignment' (PAM started at the alignment); got {list(obj)}")
    return dict(obj), threshold


def plot_reassignment(
    verification_or_runs: Mapping[str, Any] | Any, path: str | os.PathLike, *, title: str | None = None
) -> Path:
    """PAM stability of an alignment: units reassigned per group and iteration, and distances to the alignment.

    Left: for the PAM run started at the alignment, the percentage of each group's units whose assignment changed
    at each outer iteration (one line per group, coloured from the first group to the last), with the check's
    threshold. Right (when there are other runs): the Hamming distance to the alignment, as a percentage of the
    units, over the iterations of the runs started at the identity and at random permutations (mean over groups,
    band from the smallest to the largest group); iteration 0 is the start.

    Parameters
    ----------
    verification_or_runs : dict or VerificationReport
        One of: a :class:`~neuralign.verification.VerificationReport` or its ``to_dict()`` (as ``neuralign
        verify`` writes it) with a ``stability`` check; that check's dict (``{"name", "verdict", ..., "details":
        {"runs": ...}}``); or the runs themselves, ``{label: {"objective": [...], "reassigned_fraction": {group:
        [fraction per iteration]}, "distance_to_perms": {group: [fraction, start first]}}}`` with a run labelled
        ``"alignment"`` (others: ``"identity"``, ``"random1"``, ...).
    path : path-like
        Output file.
    title : str, optional
        Figure title (default: a description).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    TypeError, ValueError
        If the input is none of the above, has no stability check, or lacks the ``alignment`` run.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> runs = {"alignment": {"objective": [1.0, 0.9], "reassigned_fraction": {"fc1": [0.0, 0.0]}}}
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     plot_reassignment(runs, pathlib.Path(tmp) / "stability.png").name
    'stability.png'
    """
    path, fmt = _check_path(path)
    runs, threshold = _stability_runs(verification_or_runs)
    others = [label for label in runs if label != "alignment"]
    fig = _figure(11.0 if others else 6.0, max(4.3, 1.6 + 0.12 * len(runs["alignment"]["reassigned_fraction"])))
    axes = fig.subplots(1, 2 if others else 1, squeeze=False)[0]
    frac = runs["alignment"]["reassigned_fraction"]
    groups = list(frac)
    n_iter = max((len(v) for v in frac.values()), default=0)
    grid = np.full((len(groups), max(n_iter, 1)), np.nan)
    for k, g in enumerate(groups):
        grid[k, : len(frac[g])] = 100.0 * _finite(frac[g])
    worst = float(np.nanmax(grid)) if np.isfinite(grid).any() else 0.0
    limit = 100.0 * float(threshold) if threshold is not None and math.isfinite(float(threshold)) else None
    ax = axes[0]
    vmax = max(1.0, worst, 2.0 * limit if limit else 0.0)
    image = ax.imshow(grid, aspect="auto", cmap="YlOrRd", vmin=0.0, vmax=vmax, interpolation="nearest",
                      extent=(0.5, grid.shape[1] + 0.5, len(groups) - 0.5, -0.5))  # fmt: skip
    if len(groups) <= 24 and grid.shape[1] <= 16:
        for k in range(len(groups)):
            for j in range(grid.shape[1]):
                v = grid[k, j]
                if np.isfinite(v):
                    weight = "bold" if limit is not None and v > limit else "normal"
                    colour = "white" if v > 0.6 * vmax else "black"
                    ax.text(j + 1, k, f"{v:.1f}", ha="center", va="center", fontsize=7, color=colour, fontweight=weight)
    ax.set_yticks(range(len(groups)))
    ticks, pattern = _shorten_pattern(groups)
    ax.set_yticklabels(ticks, fontsize=8 if len(groups) <= 24 else 5)
    if grid.shape[1] <= 20:
        ax.set_xticks(range(1, grid.shape[1] + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("PAM outer iteration")
    ax.set_ylabel("Permutation group (layer" + (f" {pattern}" if pattern else "") + ")")
    bar = fig.colorbar(image, ax=ax, shrink=0.9)
    bar.set_label("Units reassigned (% of the group)")
    if limit is not None:
        bar.ax.axhline(limit, color="black", linewidth=1.5)
    threshold_text = f"; threshold {limit:.1f}%" if limit is not None else ""
    ax.set_title(f"PAM from the alignment: at most {worst:.1f}% reassigned{threshold_text}", fontsize=10)
    if others:
        ax = axes[1]
        start_colours = {"identity": "#ff7f0e"}
        randoms = [label for label in others if label not in start_colours]
        purple = mcolors.LinearSegmentedColormap.from_list("starts", ["#9467bd", "#2b0a4d"])
        for k, label in enumerate(randoms):
            start_colours[label] = purple(k / max(len(randoms) - 1, 1))
        for label in others:
            dist = runs[label].get("distance_to_perms") or {}
            if not dist:
                continue
            length = max(len(v) for v in dist.values())
            stack = np.full((len(dist), length), np.nan)
            for r, v in enumerate(dist.values()):
                stack[r, : len(v)] = 100.0 * _finite(v)
            it = np.arange(length)
            colour = start_colours[label]
            ax.plot(it, np.nanmean(stack, axis=0), "-o", color=colour, markersize=3, label=f"start: {label}")
            ax.fill_between(it, np.nanmin(stack, axis=0), np.nanmax(stack, axis=0), color=colour, alpha=0.15)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("PAM outer iteration (0 = start)")
        ax.set_ylabel("Hamming distance to the alignment (% of units)")
        ax.set_title("Other starts: distance to the alignment")
        ax.set_ylim(bottom=-2.0, top=102.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "PAM stability of the alignment")
    return _save_figure(fig, path, fmt)


# ----------------------------------------------------------------------------------------------------------------
def _plane_dict(plane: Any) -> Mapping[str, Any]:
    if isinstance(plane, PlaneResults) or (hasattr(plane, "to_dict") and hasattr(plane, "point_coordinates")):
        plane = plane.to_dict()
    if not isinstance(plane, Mapping):
        raise TypeError(f"`plane` must be a PlaneEvaluation or its dict, got {type(plane).__name__}")
    for key in ("x", "y", "test_loss", "point_coordinates"):
        require_key(plane, key, "plane")
    nx, ny = len(plane["x"]), len(plane["y"])
    grid = plane["test_loss"]
    if nx < 2 or ny < 2 or len(grid) != nx or any(len(row) != ny for row in grid):
        raise ValueError(
            f"`plane['test_loss']` must be a {nx} x {ny} grid (len(x) x len(y), both >= 2), got "
            f"{len(grid)} rows of lengths {sorted({len(row) for row in grid})}"
        )
    return plane


def _plane_panel(fig: Figure, ax: Any, x: np.ndarray, y: np.ndarray, z: np.ndarray, *, log: bool, label: str) -> None:
    finite = z[np.isfinite(z)]
    cmap = "RdYlBu_r" if log else "RdYlBu"
    if finite.size == 0:
        ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center")
        return
    if log:
        finite = finite[finite > 0]
        lo = float(finite.min()) if finite.size else 1e-12
        hi = float(finite.max()) if finite.size else 1.0
        z = np.where(np.isfinite(z), np.clip(z, lo, hi), hi)  # diverged points: drawn at the top level
        if hi <= lo * (1 + 1e-9):
            hi = lo * 1.01
        levels = np.geomspace(lo, hi, 24)
        norm: mcolors.Normalize = mcolors.LogNorm(vmin=lo, vmax=hi)
    else:
        lo, hi = float(finite.min()), float(finite.max())
        z = np.where(np.isfinite(z), z, lo)
        if hi <= lo:
            hi = lo + 1e-6
        levels = np.linspace(lo, hi, 24)
        norm = mcolors.Normalize(vmin=lo, vmax=hi)
    filled = ax.contourf(x, y, z, levels=levels, norm=norm, cmap=cmap, extend="neither")
    ax.contour(x, y, z, levels=levels[::3], norm=norm, colors="black", linewidths=0.4, alpha=0.35)
    bar = fig.colorbar(filled, ax=ax, shrink=0.9)
    bar.set_label(label)
    if log:
        ticks = np.geomspace(lo, hi, 6)
        bar.set_ticks(ticks, labels=[f"{v:.3g}" for v in ticks])
        bar.ax.minorticks_off()
    else:
        bar.set_ticks(MaxNLocator(7).tick_values(lo, hi)[1:-1] if hi - lo > 0 else [lo])
        bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f" if hi - lo < 5 else "%.0f"))


def plot_plane(plane: Mapping[str, Any] | Any, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Test loss (log colour scale) and accuracy over a plane through three networks, with a curve drawn in it.

    As the paper's plane figures (Garipov et al. 2018, Fig. 1; Tatro et al. 2020): filled contours of
    ``test_loss[i][j]`` at :math:`(x_i, y_j)`, the three points marked and labelled, and ``curve_xy`` (the curve
    projected into the plane) drawn as a line; a second panel shows the test accuracy when present. Points whose
    loss is not finite (diverged) are drawn at the highest level.

    Parameters
    ----------
    plane : dict, PlaneEvaluation or PlaneResults
        A study's :class:`~neuralign.study.results.PlaneResults`, or
        :meth:`~neuralign.curves.PlaneEvaluation.to_dict` (keys ``x``, ``y``, ``test_loss``, ``test_accuracy``,
        ``point_coordinates``), optionally with ``curve_xy`` (``[[x, y], ...]``) and ``labels`` (names of the
        three points, default ``["w_A", "w_B", "w_C"]``; ``w_A``, ``P w_B``, ``theta`` are typeset).
    path : path-like
        Output file.
    title : str, optional
        Figure title.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    TypeError, ValueError
        For a plane without a grid of ``len(x) x len(y)`` values or without point coordinates.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> plane = {"x": [0.0, 1.0], "y": [0.0, 1.0], "test_loss": [[0.5, 2.0], [0.6, 3.0]],
    ...          "point_coordinates": [[0.0, 0.0], [1.0, 0.0], [0.5, 1.0]], "labels": ["w_A", "P w_B", "theta"]}
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     plot_plane(plane, pathlib.Path(tmp) / "plane.png").name
    'plane.png'
    """
    path, fmt = _check_path(path)
    plane = _plane_dict(plane)
    x = np.array(plane["x"], dtype=np.float64)
    y = np.array(plane["y"], dtype=np.float64)
    loss = np.array(plane["test_loss"], dtype=np.float64).T  # (ny, nx) for contourf
    acc = plane.get("test_accuracy")
    panels = [("test_loss", loss, True, "Test loss (log scale)")]
    if acc is not None and np.shape(acc) == (len(x), len(y)):
        panels.append(("test_accuracy", 100.0 * np.array(acc, dtype=np.float64).T, False, "Test accuracy (%)"))
    points = np.array(plane["point_coordinates"], dtype=np.float64).reshape(-1, 2)
    labels = list(plane.get("labels") or [f"w_{c}" for c in "ABC"][: len(points)])
    curve = plane.get("curve_xy")
    aspect = (y.max() - y.min()) / max(x.max() - x.min(), 1e-12)
    to_scale = 0.2 <= aspect <= 5.0  # equal axes unless the plane is very thin (then each axis fills its panel)
    height = float(np.clip(4.2 * aspect, 3.0, 6.5)) + 0.8 if to_scale else 4.6
    fig = _figure(5.6 * len(panels), height)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (_, z, log, label) in zip(axes, panels):
        _plane_panel(fig, ax, x, y, z, log=log, label=label)
        if curve is not None and len(curve):
            xy = np.array(curve, dtype=np.float64).reshape(-1, 2)
            outline = [patheffects.withStroke(linewidth=3.8, foreground="black")]
            ax.plot(xy[:, 0], xy[:, 1], color="white", linewidth=2.0, path_effects=outline, label="curve")
        ax.scatter(points[:, 0], points[:, 1], s=60, c="white", edgecolors="black", linewidths=1.5, zorder=6)
        for (px, py), name in zip(points, labels):
            ax.annotate(
                _pretty_label(name), (px, py), xytext=(7, 7), textcoords="offset points", fontsize=12, color="black",
                zorder=7, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.7, "lw": 0},
            )  # fmt: skip
        if to_scale:
            ax.set_aspect("equal")
        ax.set_xlim(x.min(), x.max())
        ax.set_ylim(y.min(), y.max())
        ax.set_xlabel("x (weight-space distance)")
        ax.set_ylabel("y (weight-space distance)" + ("" if to_scale else ", not to scale"))
    if curve is not None and len(curve):
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", fontsize=9, frameon=False)
    fig.suptitle(title or "Plane through " + ", ".join(_pretty_label(n) for n in labels))
    return _save_figure(fig, path, fmt)


# ----------------------------------------------------------------------------------------------------------------
def _reports(verification: Any) -> dict[str, Mapping[str, Any] | None]:
    def as_dict(rep: Any, where: str) -> Mapping[str, Any] | None:
        if rep is None:
            return None
        if hasattr(rep, "to_dict") and hasattr(rep, "checks"):
            rep = rep.to_dict()
        if not isinstance(rep, Mapping) or rep.get("kind") != "verification_report":
            raise ValueError(f"`{where}` is not a verification report (its 'kind' is not 'verification_report')")
        require_key(rep, "checks", where)
        return rep

    if hasattr(verification, "to_dict") and hasattr(verification, "checks"):
        return {"verdict": as_dict(verification, "verification")}
    if isinstance(verification, Mapping):
        if "kind" in verification:
            return {"verdict": as_dict(verification, "verification")}
        out = {str(k): as_dict(v, f"verification[{k!r}]") for k, v in verification.items()}
    elif isinstance(verification, Sequence) and not isinstance(verification, str):
        out = {f"#{i + 1}": as_dict(v, f"verification[{i}]") for i, v in enumerate(verification)}
    else:
        raise TypeError(
            f"`verification` must be a verification report, a dict label -> report or a list of reports, got "
            f"{type(verification).__name__}"
        )
    if not out:
        raise ValueError("`verification` holds no report")
    return out


def plot_verification_summary(verification: Any, path: str | os.PathLike) -> Path:
    """A grid of the verification verdicts: checks (rows, then the overall verdict) x reports (columns).

    Cells are green for ``pass``, red for ``fail``, amber for ``inconclusive`` and grey where a check did not
    run (or a report is None), with the verdict written in.

    Parameters
    ----------
    verification : dict, VerificationReport, dict str -> report, or list of reports
        One report (:meth:`~neuralign.verification.VerificationReport.to_dict` or the object) gives one column;
        a dict ``label -> report`` (e.g. ``{"pair 1": ..., "pair 2": ...}``) or a list gives one column each.
    path : path-like
        Output file.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    TypeError, ValueError
        If an entry is not a verification report.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from neuralign.verification import CheckResult, VerificationReport
    >>> report = VerificationReport({"stability": CheckResult("stability", "pass", "stayed")})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     plot_verification_summary({"pair 1": report.to_dict()}, pathlib.Path(tmp) / "v.png").name
    'v.png'
    """
    path, fmt = _check_path(path)
    reports = _reports(verification)
    names = [c for c in CHECKS if any(r and c in r["checks"] for r in reports.values())]
    for r in reports.values():
        names += [c for c in (r["checks"] if r else ()) if c not in names]
    rows = [*names, "overall"]
    cols = list(reports)
    verdicts = [
        [
            (r.get("verdict") if name == "overall" else (r["checks"].get(name) or {}).get("verdict")) if r else None
            for r in reports.values()
        ]
        for name in rows
    ]
    image = np.array([[mcolors.to_rgb(_VERDICT_COLOURS.get(v, "#e0e0e0")) for v in row] for row in verdicts])
    fig = _figure(2.2 + 1.25 * len(cols), 0.9 + 0.42 * len(rows))
    ax = fig.subplots()
    ax.imshow(image, aspect="auto")
    for i, row in enumerate(verdicts):
        for j, v in enumerate(row):
            weight = "bold" if rows[i] == "overall" else "normal"
            ax.text(j, i, v or "—", ha="center", va="center", fontsize=9, fontweight=weight, color="black")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, fontsize=9)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=9)
    ax.set_xticks(np.arange(-0.5, len(cols)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows)), minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="both", length=0)
    ax.axhline(len(rows) - 1.5, color="black", linewidth=1.2)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title("Verification verdicts", fontsize=10)
    return _save_figure(fig, path, fmt)


# ----------------------------------------------------------------------------------------------------------------
def plot_study(results: Results, folder: str | os.PathLike) -> dict[str, Path]:
    """Draw every figure of a study whose data is present into ``folder``, with stable names.

    ``curve_metrics.png`` (:func:`plot_curve_metrics`, needs a setting), ``robust_metrics.png``
    (:func:`plot_robust_metrics`, curves evaluated with an attack), ``layer_correlation.png``
    (:func:`plot_layer_correlation`, a pair with ``alignment``), ``reassignment.png`` (:func:`plot_reassignment`,
    the first pair whose verification has a stability check), ``plane.png`` (:func:`plot_plane`, the first pair
    with a ``plane``), ``verification.png`` (:func:`plot_verification_summary`, one column per pair with a
    verification), ``midpoint_alignment.png`` (:func:`plot_midpoint_alignment`, pairs with ``midpoint_alignment``),
    ``learning_speed.png`` (:func:`plot_learning_speed`, pairs with ``train_history``). Figures whose data is
    missing are skipped.

    Parameters
    ----------
    results : StudyResults or dict
        A study's results.
    folder : path-like
        Output folder (created if needed).

    Returns
    -------
    dict str -> pathlib.Path
        Figure name (the keys of :data:`neuralign.study.report.FIGURE_FILES`) -> written path, for the
        figures drawn, in that order.

    Raises
    ------
    TypeError, ValueError
        For malformed ``results``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from neuralign.curves import CurveEvaluation
    >>> ev = CurveEvaluation.from_values([0, 0.5, 1], [0.3, 0.9, 0.3], [0.9, 0.6, 0.8], [0, 1, 2]).to_dict()
    >>> ends = {"a": {"test_loss": 0.3, "test_acc": 0.9}, "b": {"test_loss": 0.3, "test_acc": 0.8}}
    >>> res = {"settings": ["aligned"], "pairs": [{"endpoints": ends, "curves": {"aligned": ev}}]}
    >>> tmp = tempfile.TemporaryDirectory()
    >>> list(plot_study(res, tmp.name))
    ['curve_metrics']
    >>> tmp.cleanup()
    """
    res = as_study_results(results)
    folder = Path(folder)
    pairs = res.pairs
    out: dict[str, Path] = {}
    target = {k: folder / name for k, (name, _) in FIGURE_FILES.items()}
    if res.settings:
        out["curve_metrics"] = plot_curve_metrics(res, target["curve_metrics"])
        if res.robust:
            out["robust_metrics"] = plot_robust_metrics(res, target["robust_metrics"])
    if any(p.alignment is not None for p in pairs):
        out["layer_correlation"] = plot_layer_correlation(res, target["layer_correlation"])
    for p in pairs:
        if p.verification is not None and "stability" in p.verification.checks:
            title = f"{_title_prefix(res)}PAM stability of the alignment (pair {p.pair})"
            out["reassignment"] = plot_reassignment(p.verification, target["reassignment"], title=title)
            break
    for p in pairs:
        if p.plane is not None:
            labels = [_pretty_label(n) for n in p.plane.labels or ()]
            through = f" through {', '.join(labels)}" if labels else ""
            title = f"{_title_prefix(res)}plane{through} (pair {p.pair})"
            out["plane"] = plot_plane(p.plane, target["plane"], title=title)
            break
    reports = {f"pair {p.pair}": p.verification for p in pairs if p.verification is not None}
    if reports:
        out["verification"] = plot_verification_summary(reports, target["verification"])
    if any(p.midpoint_alignment is not None for p in pairs):
        out["midpoint_alignment"] = plot_midpoint_alignment(res, target["midpoint_alignment"])
    if any(p.train_history for p in pairs):
        out["learning_speed"] = plot_learning_speed(res, target["learning_speed"])
    return out


# ----------------------------------------------------------------------------------------------------------------
_MIDPOINT_STYLES = {
    "aligned": {"color": SETTING_STYLES["aligned"]["color"], "marker": "s"},
    "unaligned": {"color": SETTING_STYLES["unaligned"]["color"], "marker": "o"},
    "linear": {"color": "#555555", "marker": "^"},
}


def plot_midpoint_alignment(results: Results, path: str | os.PathLike) -> Path:
    """Alignment along the curve (Tatro et al. §4): per layer, the mean correlation of matched units between the
    midpoint of each case and end point A (left) or B (right), before (solid) and after (dashed) aligning the
    midpoint to that end point; mean over pairs with error bars of one sample standard deviation.

    The cases are those of ``pair.midpoint_alignment.cases`` (:data:`neuralign.study.report.MIDPOINT_CASES`).

    Parameters
    ----------
    results : StudyResults or dict
        A study's results.
    path : path-like
        Output file.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        If no pair has ``midpoint_alignment``, or for malformed ``results``.
    """
    path, fmt = _check_path(path)
    res = as_study_results(results)
    mids = [p.midpoint_alignment.cases for p in res.pairs if p.midpoint_alignment is not None]
    if not mids:
        raise ValueError("no pair of `results` has 'midpoint_alignment' data")
    cases = [c for c in MIDPOINT_CASES if any(c in m for m in mids)]
    groups: list[str] = []
    for m in mids:
        for mid in m.values():
            groups += [g for g in mid.groups if g not in groups]
    x = np.arange(len(groups))
    width = min(max(11.0, 0.5 * len(groups) + 5.0), 24.0)
    fig = _figure(width, 4.8)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, end, name in zip(axes, ("a", "b"), ("A", "B")):
        for case in cases:
            runs = [m[case] for m in mids if case in m]
            for key, linestyle, what in (("before", "-", "before"), ("after", "--", "after aligning")):
                vals = [[float(getattr(r, key)[end].get(g, math.nan)) for g in groups] for r in runs]
                mean, std = _mean_std(_finite(vals))
                ax.errorbar(x, mean, yerr=std, linestyle=linestyle, capsize=2, markersize=4, linewidth=1.5,
                            label=f"{MIDPOINT_CASES[case]}, {what}", **_MIDPOINT_STYLES[case])  # fmt: skip
        ax.set_title(f"Midpoint vs end point {name}")
        ax.set_xticks(x)
        many = len(groups) > 8
        ticks, pattern = _shorten_pattern(groups)
        ax.set_xticklabels(ticks, rotation=60 if many else 0, ha="right" if many else "center",
                           fontsize=7 if many else 9)  # fmt: skip
        ax.set_xlabel("Permutation group (layer" + (f" {pattern}" if pattern else "") + "), input to output")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Mean correlation of matched units")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"{_title_prefix(res)}alignment along the curve, t = 0.5 ({_n_pairs_text(len(mids))})")
    return _save_figure(fig, path, fmt)


def plot_learning_speed(results: Results, path: str | os.PathLike) -> Path:
    """Train loss and train accuracy (%) of each setting's curve fit against the curve epoch (mean over pairs, a
    band of ± one sample standard deviation), from ``pair.train_history``; the Unaligned curve's final train loss
    is drawn as a horizontal line. Pairs with histories of different lengths are cut to the shortest.

    Parameters
    ----------
    results : StudyResults or dict
        A study's results.
    path : path-like
        Output file.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        If no pair has a train history, or for malformed ``results``.
    """
    path, fmt = _check_path(path)
    res = as_study_results(results)
    hists = [p.train_history for p in res.pairs if p.train_history]
    if not hists:
        raise ValueError("no pair of `results` has a 'train_history'")
    fig = _figure(11.0, 4.6)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for s in res.settings:
        runs = [h[s] for h in hists if h.get(s)]
        if not runs:
            continue
        n = min(len(r) for r in runs)
        epochs = np.arange(1, n + 1)
        style = SETTING_STYLES[s]
        for ax, key, scale in ((ax_loss, "loss", 1.0), (ax_acc, "accuracy", 100.0)):
            mean, std = _mean_std(_finite([[scale * float(getattr(e, key)) for e in r[:n]] for r in runs]))
            ax.plot(epochs, mean, label=SETTING_LABELS[s], linewidth=2, **style)
            if std is not None:
                ax.fill_between(epochs, mean - std, mean + std, color=style["color"], alpha=0.18, linewidth=0)
    finals = [float(h["unaligned"][-1].loss) for h in hists if h.get("unaligned")]
    if finals:
        ax_loss.axhline(float(np.mean(finals)), color="black", linewidth=1, linestyle=":",
                        label="Unaligned final train loss")  # fmt: skip
    for ax, name in ((ax_loss, "Train loss (cross-entropy)"), (ax_acc, "Train accuracy (%)")):
        ax.set_xlabel("Curve epoch (PAM: all outer iterations in order)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = ax_loss.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(f"{_title_prefix(res)}learning speed of the curves ({_n_pairs_text(len(hists))})")
    return _save_figure(fig, path, fmt)

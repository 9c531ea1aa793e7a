"""Report sections and figures of the alignment along the curve and of the learning speed (issue #12 items 2, 3)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from neuralign.study.plots import plot_learning_speed, plot_midpoint_alignment, plot_study  # noqa: E402
from neuralign.study.report import (  # noqa: E402
    MIDPOINT_ALIGNED_GAIN,
    learning_speed,
    midpoint_summary,
    read_results_json,
    write_report,
    write_results_json,
)
from tests.study.test_report import GROUPS, make_results  # noqa: E402


def _case(before_a: float, gain_a: float, before_b: float, gain_b: float) -> dict:
    return {
        "t": 0.5,
        "groups": list(GROUPS),
        "before": {"a": {g: before_a for g in GROUPS}, "b": {g: before_b for g in GROUPS}},
        "after": {"a": {g: before_a + gain_a for g in GROUPS}, "b": {g: before_b + gain_b for g in GROUPS}},
        "moved": {"a": {g: 0 for g in GROUPS}, "b": {g: 1 for g in GROUPS}},
    }


def _with_extras(aligned_gain: float = 0.01) -> dict:
    res = make_results(2, ("unaligned", "pam_unaligned", "aligned"))
    for k, pair in enumerate(res["pairs"]):
        pair["midpoint_alignment"] = {"t": 0.5, "cases": {
            "aligned": _case(0.8, aligned_gain, 0.78, 0.0), "unaligned": _case(0.3, 0.4, 0.35, 0.3),
            "linear": _case(0.6, 0.1, 0.6, 0.12)}}  # fmt: skip
        # unaligned: loss 1.0 -> 0.5 in 5 epochs; aligned reaches 0.5 at epoch 2; PAM (two outer iterations of
        # 3 epochs) never does
        pair["train_history"] = {
            "unaligned": [{"epoch": e + 1, "loss": 1.0 - 0.1 * (e + 1) - 0.01 * k, "accuracy": 0.5 + 0.05 * e}
                          for e in range(5)],
            "aligned": [{"epoch": e + 1, "loss": 0.6 - 0.1 * (e + 1), "accuracy": 0.7} for e in range(5)],
            "pam_unaligned": [{"epoch": e + 1, "loss": 0.9, "accuracy": 0.6} for e in range(6)],
        }  # fmt: skip
    return res


def test_midpoint_summary_and_report_state_the_criterion(tmp_path):
    res = _with_extras(0.01)
    summary = midpoint_summary(res)
    assert summary["aligned_midpoint_already_aligned"] is True
    assert summary["cases"]["unaligned"]["a"]["gain"] == pytest.approx([0.4, 0.4])
    assert summary["cases"]["linear"]["b"]["before"] == pytest.approx([0.6, 0.6])
    text = write_report(res, tmp_path).read_text()
    assert "## Alignment along the curve" in text
    assert "**The Aligned curve's midpoint is already aligned with both end points**" in text
    assert f"by less than {MIDPOINT_ALIGNED_GAIN:g}" in text
    assert "| Aligned curve (A, P·B) | 0.800 ± 0.000 | 0.810 ± 0.000 | 0.010 ± 0.000 | +0.010 |" in text
    res = _with_extras(0.2)
    assert midpoint_summary(res)["aligned_midpoint_already_aligned"] is False
    assert "is not already aligned with both end points** (largest mean gain +0.200)" in write_report(
        res, tmp_path).read_text()  # fmt: skip
    assert midpoint_summary(make_results(1)) == {"cases": {}, "threshold": MIDPOINT_ALIGNED_GAIN}


def test_learning_speed_first_epoch_at_the_unaligned_final_loss(tmp_path):
    res = _with_extras()
    speed = learning_speed(res)
    # pair 1: target 0.5 (aligned 0.5 at epoch 1 -> 0.6 - 0.1 = 0.5); pair 2: target 0.49 -> aligned 0.4 at epoch 2
    assert speed["aligned"]["first_epoch"] == [1, 2]
    assert speed["unaligned"]["first_epoch"] == [5, 5]
    assert speed["pam_unaligned"]["first_epoch"] == [None, None]
    assert speed["pam_unaligned"]["epochs"] == [6, 6]
    text = write_report(res, tmp_path).read_text()
    assert "## Learning speed" in text
    assert "| PAM Unaligned | 0.900 ± 0.000 | 60.0 ± 0.0 | not reached, not reached |" in text
    assert "| Aligned | 0.100 ± 0.000 | 70.0 ± 0.0 | 1, 2 |" in text
    back = read_results_json(write_results_json(res, tmp_path))
    assert learning_speed(back) == speed and midpoint_summary(back) == midpoint_summary(res)
    # without an Unaligned curve there is nothing to reach: n/a, not "not reached" (a reviewer's finding)
    res["pairs"] = [{**p, "train_history": {k: v for k, v in p["train_history"].items() if k != "unaligned"}}
                    for p in res["pairs"]]  # fmt: skip
    assert learning_speed(res)["aligned"]["first_epoch"] == ["n/a", "n/a"]
    assert "| Aligned | 0.100 ± 0.000 | 70.0 ± 0.0 | n/a, n/a |" in write_report(res, tmp_path).read_text()
    # a pair without a setting's history keeps its place in the per-pair column
    res["pairs"][0]["train_history"].pop("aligned")
    assert learning_speed(res)["aligned"]["first_epoch"] == ["-", "n/a"]


def test_figures_of_the_extras(tmp_path):
    res = _with_extras()
    for fn, name in ((plot_midpoint_alignment, "m.png"), (plot_learning_speed, "s.png")):
        path = fn(res, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    out = plot_study(res, tmp_path / "all")
    assert list(out)[-2:] == ["midpoint_alignment", "learning_speed"]
    assert not [p for p in os.listdir(tmp_path / "all") if p.endswith(".tmp")]
    assert plt.get_fignums() == []
    with pytest.raises(ValueError, match="no pair of `results` has 'midpoint_alignment' data"):
        plot_midpoint_alignment(make_results(1), tmp_path / "x.png")
    with pytest.raises(ValueError, match="no pair of `results` has a 'train_history'"):
        plot_learning_speed(make_results(1), tmp_path / "x.png")

"""Tests of neuralign.study.plots: every figure is written (a PNG), atomically, with no figure left open."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # the tests import pyplot only to count open figures; the module never uses it

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from neuralign.study.plots import (  # noqa: E402
    _shorten_pattern,
    plot_curve_metrics,
    plot_layer_correlation,
    plot_plane,
    plot_reassignment,
    plot_study,
    plot_verification_summary,
)
from neuralign.verification import VerificationReport  # noqa: E402
from tests.study.test_report import make_results  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, expected):
    assert path == expected
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]
    assert plt.get_fignums() == []


@pytest.mark.parametrize("n_pairs", [1, 3])
def test_every_plot_writes_a_png(tmp_path, n_pairs):
    res = make_results(n_pairs)
    pair = res["pairs"][0]
    _assert_png(plot_curve_metrics(res, tmp_path / "c.png"), tmp_path / "c.png")
    _assert_png(plot_layer_correlation(res, tmp_path / "l.png"), tmp_path / "l.png")
    _assert_png(plot_reassignment(pair["verification"], tmp_path / "r.png"), tmp_path / "r.png")
    _assert_png(plot_plane(pair["plane"], tmp_path / "sub" / "p.png"), tmp_path / "sub" / "p.png")
    _assert_png(plot_verification_summary(pair["verification"], tmp_path / "v.png"), tmp_path / "v.png")


def test_plot_inputs_in_other_forms(tmp_path):
    res = make_results(2, ("unaligned", "aligned"))
    ver = res["pairs"][0]["verification"]
    report = VerificationReport.from_dict(ver)
    runs = ver["checks"]["stability"]["details"]["runs"]
    for k, arg in enumerate([report, ver["checks"]["stability"], runs, {"alignment": runs["alignment"]}]):
        _assert_png(plot_reassignment(arg, tmp_path / f"r{k}.png", title="t"), tmp_path / f"r{k}.png")
    grid = {"pair 1": ver, "pair 2": None, "pair 3": res["pairs"][1]["verification"]}
    _assert_png(plot_verification_summary(grid, tmp_path / "v1.png"), tmp_path / "v1.png")
    _assert_png(plot_verification_summary([report, ver], tmp_path / "v2.png"), tmp_path / "v2.png")
    plane = dict(res["pairs"][0]["plane"])
    for key in ("curve_xy", "labels", "test_accuracy"):
        plane.pop(key)
    _assert_png(plot_plane(plane, tmp_path / "p.png"), tmp_path / "p.png")
    # a different number of points along one pair's curve is interpolated onto the first pair's grid
    short = make_results(1, ("unaligned", "aligned"), num_points=5)["pairs"][0]
    res["pairs"][1]["curves"] = short["curves"]
    _assert_png(plot_curve_metrics(res, tmp_path / "c.png"), tmp_path / "c.png")
    # vector formats follow the suffix
    assert plot_curve_metrics(res, tmp_path / "c.svg").read_bytes().lstrip().startswith(b"<?xml")
    assert plot_curve_metrics(res, tmp_path / "c.pdf").read_bytes()[:5] == b"%PDF-"


def test_plot_study_draws_what_is_there(tmp_path):
    out = plot_study(make_results(3), tmp_path / "full")
    names = {k: p.name for k, p in out.items()}
    assert names == {
        "curve_metrics": "curve_metrics.png",
        "layer_correlation": "layer_correlation.png",
        "reassignment": "reassignment.png",
        "plane": "plane.png",
        "verification": "verification.png",
    }
    for p in out.values():
        _assert_png(p, tmp_path / "full" / p.name)

    bare = make_results(1, ("aligned",), alignment=False, verification=False, plane=False)
    out = plot_study(bare, tmp_path / "bare")
    assert list(out) == ["curve_metrics"] and sorted(os.listdir(tmp_path / "bare")) == ["curve_metrics.png"]

    # verification without a stability check: verdicts drawn, reassignment skipped; a later pair's plane is used
    res = make_results(2, ())
    for pair in res["pairs"]:
        pair["verification"]["checks"].pop("stability")
    res["pairs"][0]["plane"] = None
    out = plot_study(res, tmp_path / "partial")
    assert list(out) == ["layer_correlation", "plane", "verification"]
    assert plt.get_fignums() == []


def test_shorten_group_names():
    assert _shorten_pattern(["features.0.conv", "features.1.conv"])[0] == ["0", "1"]
    assert _shorten_pattern(["features.0.conv", "features.1.conv"]) == (["0", "1"], "features.*.conv")
    assert _shorten_pattern(["conv1", "fc"]) == (["conv1", "fc"], None)
    assert _shorten_pattern(["conv1", "layer1.0.conv1"])[0] == ["conv1", "layer1.0.conv1"]
    assert _shorten_pattern(["inception4a.branch2.0.conv", "aux1.fc1"])[0] == ["inc4a.bra2.0.conv", "aux1.fc1"]
    long = ".".join(["ab"] * 12)  # 35 characters of short components: cut at the front
    assert _shorten_pattern([long])[0] == ["…" + long[-17:]]


def test_plot_errors(tmp_path):
    res = make_results(1)
    with pytest.raises(ValueError, match=r"`path` must end in one of \['.png', '.pdf', '.svg'\], got '.*c.jpg'"):
        plot_curve_metrics(res, tmp_path / "c.jpg")
    with pytest.raises(TypeError, match="`path` must be a str or path-like, got int"):
        plot_curve_metrics(res, 3)
    with pytest.raises(ValueError, match="`results` lacks the key 'pairs'"):
        plot_curve_metrics({"settings": []}, tmp_path / "c.png")
    with pytest.raises(ValueError, match="`results` lacks the key 'pairs'"):
        plot_study({"kind": "study_results", "settings": []}, tmp_path)
    with pytest.raises(ValueError, match=r"`results\['settings'\]` is empty: there is no curve to plot"):
        plot_curve_metrics(make_results(1, ()), tmp_path / "c.png")
    with pytest.raises(ValueError, match="no pair of `results` has alignment data"):
        plot_layer_correlation(make_results(2, alignment=False), tmp_path / "l.png")
    broken = make_results(1)
    broken["pairs"][0]["alignment"].pop("correlation_after")
    with pytest.raises(ValueError, match=r"`results\['pairs'\]\[0\]\['alignment'\]` lacks the key 'correlation_after'"):
        plot_layer_correlation(broken, tmp_path / "l.png")
    ver = res["pairs"][0]["verification"]
    no_stability = {**ver, "checks": {k: v for k, v in ver["checks"].items() if k != "stability"}}
    with pytest.raises(ValueError, match="the verification report has no 'stability' check"):
        plot_reassignment(no_stability, tmp_path / "r.png")
    runs = ver["checks"]["stability"]["details"]["runs"]
    with pytest.raises(ValueError, match=r"lack the run 'alignment' .*; got \['identity', 'random1'\]"):
        plot_reassignment({k: v for k, v in runs.items() if k != "alignment"}, tmp_path / "r.png")
    with pytest.raises(ValueError, match="must be a verification report, its 'stability' check, or a dict of runs"):
        plot_reassignment({"alignment": [0.1]}, tmp_path / "r.png")
    with pytest.raises(TypeError, match="`verification_or_runs` must be a verification report .*, got list"):
        plot_reassignment([runs], tmp_path / "r.png")
    plane = dict(res["pairs"][0]["plane"])
    plane["test_loss"] = plane["test_loss"][:-1]
    with pytest.raises(
        ValueError, match=r"`plane\['test_loss'\]` must be a 9 x 7 grid .*, got 8 rows of lengths \[7\]"
    ):
        plot_plane(plane, tmp_path / "p.png")
    with pytest.raises(ValueError, match=r"`plane` lacks the key 'point_coordinates'"):
        plot_plane({"x": [0, 1], "y": [0, 1], "test_loss": [[1, 1], [1, 1]]}, tmp_path / "p.png")
    with pytest.raises(TypeError, match="`plane` must be a PlaneEvaluation or its dict, got list"):
        plot_plane([], tmp_path / "p.png")
    with pytest.raises(ValueError, match=r"`verification\['p'\]` is not a verification report"):
        plot_verification_summary({"p": {"checks": {}}}, tmp_path / "v.png")
    with pytest.raises(ValueError, match="`verification` holds no report"):
        plot_verification_summary([], tmp_path / "v.png")
    assert not list(tmp_path.iterdir())
    assert plt.get_fignums() == []

"""Tests of neuralign.study.report: summary numbers checked by hand, Table 1 layout, report.md, JSON."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest

from neuralign.curves import CurveEvaluation, PlaneEvaluation
from neuralign.study.report import (
    PAPER_TABLE1,
    SETTINGS,
    format_table,
    paper_row,
    read_results_json,
    summary_table,
    validate_results,
    write_report,
    write_results_json,
)
from neuralign.verification import CheckResult, VerificationReport

GROUPS = ["features.0.conv", "features.1.conv", "features.2.conv", "classifier.fc1"]
_DIP = {"unaligned": 0.12, "pam_unaligned": 0.08, "pam_aligned": 0.02, "aligned": 0.015}


def _verification(k: int, *, verdicts: dict[str, str] | None = None) -> dict:
    """A VerificationReport dict with a stability check holding alignment / identity / random1 runs."""
    sizes = {g: 8 * (i + 1) for i, g in enumerate(GROUPS)}
    iters = 3
    runs = {
        "alignment": {
            "objective": [1.0, 0.98, 0.97, 0.97],
            "reassigned_fraction": {g: [0.0, 1 / n if i == 1 else 0.0, 0.0] for i, (g, n) in enumerate(sizes.items())},
            "distance_to_perms": {g: [0.0] * (iters + 1) for g in sizes},
        },
        "identity": {
            "objective": [1.5, 1.3, 1.25, 1.2],
            "reassigned_fraction": {g: [0.4, 0.2, 0.1] for g in sizes},
            "distance_to_perms": {g: [0.9, 0.7 - 0.05 * i, 0.6, 0.55] for i, g in enumerate(sizes)},
        },
        "random1": {
            "objective": [1.6, 1.4, 1.3, 1.3],
            "reassigned_fraction": {g: [0.5, 0.3, 0.1] for g in sizes},
            "distance_to_perms": {g: [0.95, 0.8, 0.75, 0.7 + 0.02 * i] for i, g in enumerate(sizes)},
        },
    }
    verdicts = verdicts or {"stability": "pass", "certificate": "pass", "neighbourhood": "fail", "gradient": "pass"}
    checks = {}
    for name, v in verdicts.items():
        details = {"runs": runs} if name == "stability" else {"per_group": {g: {"x": 1.0} for g in GROUPS}}
        thresholds = {"max_reassigned_fraction": 0.05} if name == "stability" else {"alpha": 0.05}
        checks[name] = CheckResult(name, v, f"{name} summary of pair {k} | with a pipe", thresholds, details)
    return VerificationReport(checks, {"groups": sizes}).to_dict()


def _plane(k: int) -> dict:
    alpha = [-0.05 + 1.1 * i / 8 for i in range(9)]
    beta = [-0.1 + 1.6 * j / 6 for j in range(7)]
    dx, dy = 10.0, 6.0
    loss = [[0.3 + (a - 0.5) ** 2 * 4 + (b - 0.4) ** 2 * 3 + 0.01 * k for b in beta] for a in alpha]
    loss[0][0] = math.inf  # a diverged grid point
    acc = [[max(0.1, 0.9 - 0.2 * v) for v in row] for row in loss]
    plane = PlaneEvaluation(
        alpha=tuple(alpha), beta=tuple(beta), x=tuple(a * dx for a in alpha), y=tuple(b * dy for b in beta),
        test_loss=tuple(tuple(r) for r in loss), test_accuracy=tuple(tuple(r) for r in acc),
        point_coordinates=((0.0, 0.0), (dx, 0.0), (4.0, dy)), max_bn_batches=None,
    ).to_dict()  # fmt: skip
    plane["curve_xy"] = [
        [2 * t * (1 - t) * 4.0 + t * t * dx, 2 * t * (1 - t) * dy] for t in (i / 16 for i in range(17))
    ]
    plane["labels"] = ["w_A", "P w_B", "theta"]
    return plane


def make_results(
    n_pairs: int = 3,
    settings: tuple[str, ...] = SETTINGS,
    *,
    alignment: bool = True,
    verification: bool = True,
    plane: bool = True,
    pam: bool = True,
    num_points: int = 17,
) -> dict:
    """Synthetic study results with the exact structure of ``neuralign.study``."""
    ts = [i / (num_points - 1) for i in range(num_points)]
    pairs = []
    for k in range(n_pairs):
        acc_a, acc_b = 0.90 + 0.005 * k, 0.88 + 0.004 * k
        loss_a, loss_b = 0.35 - 0.01 * k, 0.40 - 0.01 * k
        curves = {}
        for s in settings:
            dip = _DIP[s] * (1 + 0.1 * k)
            acc = [(1 - t) * acc_a + t * acc_b - 4 * dip * t * (1 - t) for t in ts]
            loss = [(1 - t) * loss_a + t * loss_b + 10 * dip * t * (1 - t) for t in ts]
            arc = [t * 20.0 for t in ts]
            curves[s] = CurveEvaluation.from_values(ts, loss, acc, arc, geometry="planar").to_dict()
        before = {g: 0.2 + 0.1 * i + 0.01 * k for i, g in enumerate(GROUPS)}
        after = {g: v + 0.3 - 0.05 * i for i, (g, v) in enumerate(before.items())}
        pairs.append(
            {
                "pair": k + 1,
                "seeds": [2 * k + 1, 2 * k + 2],
                "endpoints": {
                    "a": {"test_loss": loss_a, "test_acc": acc_a},
                    "b": {"test_loss": loss_b, "test_acc": acc_b},
                },
                "alignment": {
                    "groups": list(GROUPS),
                    "sizes": {g: 8 * (i + 1) for i, g in enumerate(GROUPS)},
                    "correlation_before": before,
                    "correlation_after": after,
                }
                if alignment
                else None,
                "curves": curves,
                "pam": {
                    s: {"history": [1.2, 1.1, 1.05], "changed": {g: [3, 1] for g in GROUPS}}
                    for s in settings
                    if s.startswith("pam_") and pam
                },
                "verification": _verification(k) if verification else None,
                "plane": _plane(k) if plane else None,
            }
        )
    config = {"arch": "tinyten", "dataset": "cifar10", "pairs": n_pairs, "preset": "smoke", "epochs": 2,
              "curve_epochs": 3, "schedule": {"lr": 0.1, "drop": 20}}  # fmt: skip
    return {"kind": "study_results", "config": config, "settings": list(settings), "pairs": pairs}


def _with_values(results: dict, setting: str, metric: str, values: list[float]) -> dict:
    out = copy.deepcopy(results)
    for pair, v in zip(out["pairs"], values):
        pair["curves"][setting][metric] = v
    return out


def _set_endpoints(res: dict, acc_a: list[float], acc_b: list[float]) -> None:
    """Put ``acc_a`` / ``acc_b`` at t = 0 / t = 1 of each pair's curves, with offsets that cancel over settings."""
    settings = res["settings"]
    offsets = [0.01, -0.01, 0.02, -0.02][: len(settings)] if len(settings) % 2 == 0 else [0.0] * len(settings)
    for pair, a, b in zip(res["pairs"], acc_a, acc_b):
        for s, off in zip(settings, offsets):
            pair["curves"][s]["test_accuracy"][0] = a + off
            pair["curves"][s]["test_accuracy"][-1] = b - off


# ----------------------------------------------------------------------------------------------------------------
def test_summary_table_by_hand():
    res = make_results(3)
    res = _with_values(res, "aligned", "avg_accuracy", [0.80, 0.82, 0.84])
    res = _with_values(res, "aligned", "min_accuracy", [0.70, 0.70, 0.76])
    res = _with_values(res, "aligned", "loss_barrier", [0.1, 0.2, 0.6])
    res = _with_values(res, "aligned", "mid_accuracy", [0.5, 0.6, 0.7])
    _set_endpoints(res, [0.90, 0.91, 0.92], [0.88, 0.88, 0.91])
    for pair, a, b in zip(res["pairs"], [0.80, 0.80, 0.80], [0.70, 0.72, 0.74]):
        pair["endpoints"]["a"]["test_acc"], pair["endpoints"]["b"]["test_acc"] = a, b
    table = summary_table(res)
    assert table["n_pairs"] == 3
    assert list(table["rows"]) == ["endpoints", *SETTINGS]
    row = table["rows"]["aligned"]
    tol = {"rel_tol": 0, "abs_tol": 1e-9}
    # mean 82, deviations (-2, 0, 2): var = 8 / 2 = 4
    assert math.isclose(row["avg_accuracy"]["mean"], 82.0, **tol) and math.isclose(
        row["avg_accuracy"]["std"], 2.0, **tol
    )
    # mean 72, deviations (-2, -2, 4): var = 24 / 2 = 12
    assert math.isclose(row["min_accuracy"]["mean"], 72.0, **tol)
    assert math.isclose(row["min_accuracy"]["std"], math.sqrt(12.0), **tol)
    # loss barrier in loss units: mean 0.3, deviations (-0.2, -0.1, 0.3): var = 0.14 / 2
    assert math.isclose(row["loss_barrier"]["mean"], 0.3, **tol)
    assert math.isclose(row["loss_barrier"]["std"], math.sqrt(0.07), **tol)
    assert math.isclose(row["mid_accuracy"]["mean"], 60.0, **tol) and math.isclose(
        row["mid_accuracy"]["std"], 10.0, **tol
    )
    ends = table["rows"]["endpoints"]
    # per-pair means 89, 89.5, 91.5 -> 90; s_a = 1 (90, 91, 92), s_b = sqrt(3) (88, 88, 91): ± = sqrt(1 + 3) / 2 = 1
    assert math.isclose(ends["avg_accuracy"]["mean"], 90.0, **tol)
    assert math.isclose(ends["avg_accuracy"]["std"], 1.0, **tol)
    assert math.isclose(ends["a_accuracy"]["std"], 1.0, **tol) and math.isclose(
        ends["b_accuracy"]["std"], math.sqrt(3), **tol
    )


def test_summary_table_single_pair_has_no_spread():
    table = summary_table(make_results(1))
    assert table["rows"]["endpoints"]["avg_accuracy"]["std"] is None
    assert all(stat["std"] is None for stat in table["rows"]["unaligned"].values())
    ev = make_results(1)["pairs"][0]["curves"]["unaligned"]
    assert math.isclose(table["rows"]["unaligned"]["avg_accuracy"]["mean"], 100 * ev["avg_accuracy"], abs_tol=1e-9)


def test_format_table_rows_and_bold():
    res = make_results(3)
    res = _with_values(res, "aligned", "avg_accuracy", [0.80, 0.82, 0.84])
    res = _with_values(res, "aligned", "min_accuracy", [0.70, 0.70, 0.76])
    res = _with_values(res, "pam_aligned", "min_accuracy", [0.72, 0.72, 0.72])  # 72.0 ± 0.0, ties aligned's 72.0
    res = _with_values(res, "unaligned", "avg_accuracy", [0.5, 0.5, 0.5])
    for s in ("unaligned", "pam_unaligned"):
        res = _with_values(res, s, "min_accuracy", [0.4, 0.4, 0.4])
    for s in ("pam_unaligned", "pam_aligned"):
        res = _with_values(res, s, "avg_accuracy", [0.6, 0.6, 0.6])
    _set_endpoints(res, [0.90, 0.91, 0.92], [0.88, 0.88, 0.91])
    text = format_table(res)
    lines = text.splitlines()
    assert lines[0].startswith("**Table.**") and "tinyten on cifar10" in lines[0] and "3 pairs" in lines[0]
    assert "| Setting | Avg | Min |" in lines
    assert "| Endpoints | 90.0 ± 1.0 | |" in lines
    assert "| Aligned | **82.0 ± 2.0** | **72.0 ± 3.5** |" in lines
    assert "| PAM Aligned | 60.0 ± 0.0 | **72.0 ± 0.0** |" in lines
    assert "| Unaligned | 50.0 ± 0.0 | 40.0 ± 0.0 |" in lines
    assert [line.split(" |")[0] for line in lines[4:]] == [
        "| Endpoints", "| Unaligned", "| PAM Unaligned", "| PAM Aligned", "| Aligned",
    ]  # fmt: skip
    assert "82.00 ± 2.00" in format_table(res, decimals=2)


def test_format_table_single_pair_and_single_setting():
    res = make_results(1, ("aligned",))
    text = format_table(res)
    assert "±" not in text.split("\n", 1)[1] and "1 pair." in text and "**" not in text.split("\n", 1)[1]
    ev = res["pairs"][0]["curves"]["aligned"]
    assert f"| Aligned | {100 * ev['avg_accuracy']:.1f} | {100 * ev['min_accuracy']:.1f} |" in text


def test_write_report_contents(tmp_path):
    res = make_results(3)
    figures = {"curve_metrics": tmp_path / "figs" / "curve_metrics.png", "extra": tmp_path / "x y.png"}
    path = write_report(
        res, tmp_path, figures=figures, paper_row=PAPER_TABLE1["tinyten"]["cifar10"], notes="Hello *notes*."
    )
    assert path == tmp_path / "report.md"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Mode connectivity study: tinyten on cifar10\n")
    assert format_table(res) in text
    assert (
        "End points evaluated as trained (their own batch-norm statistics): 89.5 ± 0.3 %."
    )  # 89.45 ± sqrt(.5² + .4²) / 2 in text
    assert "- **arch**: `tinyten`" in text and "- **schedule.lr**: `0.1`" in text
    assert "- **schedule.drop**: `20`" in text
    assert "![Test accuracy and loss along the curves (mean ± std over pairs)](figs/curve_metrics.png)" in text
    assert "![extra](x y.png)" in text
    assert "| Aligned | 88.5 ± 0.1 | 87.8 ± 0.1 |" in text and "| Endpoints | 89.0 ± 0.1 |  |" in text
    assert "**Scale difference.**" in text and "epochs=2" in text and "curve_epochs=3" in text
    assert "Table 1, tinyten (0.09M) on cifar10:" in text
    other = write_report(res, tmp_path, paper_row=PAPER_TABLE1["resnet32"]["cifar10"]).read_text(encoding="utf-8")
    assert "Table 1, the reference rows given:" in other and "| Aligned | 92.7 ± 0.1 | 92.2 ± 0.0 |" in other
    # verification table: check x pair, overall row
    assert "| Check | Pair 1 | Pair 2 | Pair 3 |" in text
    assert "| neighbourhood | fail | fail | fail |" in text
    assert "| **overall** | **fail** | **fail** | **fail** |" in text
    assert "- stability (pass): stability summary of pair 0 \\| with a pipe" in text
    # alignment: before mean over GROUPS of 0.2 + 0.1 i (+0.01 k); after adds 0.3 - 0.05 i: gain 0.225
    assert "| 1 | 1, 2 | 4 | 0.350 | 0.575 | +0.225 | 4/4 |" in text
    assert "| 2 | PAM Aligned | 2 | 1.2 | 1.05 | 16 | 4 |" in text
    assert text.rstrip().endswith("Hello *notes*.")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_write_report_finds_existing_figures_and_skips_missing_sections(tmp_path):
    res = make_results(1, ("unaligned", "aligned"), alignment=False, verification=False, plane=False)
    (tmp_path / "curve_metrics.png").write_bytes(b"\x89PNG")
    text = write_report(res, tmp_path).read_text(encoding="utf-8")
    assert "](curve_metrics.png)" in text and "plane.png" not in text
    for heading in ("## Alignment", "## Verification", "## PAM", "### Paper reference", "## Notes"):
        assert heading not in text
    text = write_report(res, tmp_path, figures={}).read_text(encoding="utf-8")
    assert "## Figures" not in text


def test_paper_table_and_lookup():
    assert set(PAPER_TABLE1) == {"tinyten", "resnet32", "googlenet"}
    for arch, by_data in PAPER_TABLE1.items():
        assert set(by_data) == {"cifar10", "cifar100", "tinyimagenet"}
        for rows in by_data.values():
            expected = ["Endpoints", "Unaligned", "Aligned"] if arch == "googlenet" else [
                "Endpoints", "Unaligned", "PAM Unaligned", "PAM Aligned", "Aligned"]  # fmt: skip
            assert list(rows) == expected
    assert PAPER_TABLE1["resnet32"]["cifar100"]["PAM Aligned"] == ("67.6 ± 0.4", "66.8 ± 0.1")
    assert PAPER_TABLE1["googlenet"]["tinyimagenet"]["Endpoints"] == "51.6 ± 0.2"
    assert paper_row("GoogLeNet", "tin") == PAPER_TABLE1["googlenet"]["tinyimagenet"]
    assert paper_row("tinyten", "Tiny-ImageNet")["Unaligned"] == ("32.5 ± 0.1", "30.0 ± 0.3")
    assert paper_row("mlp", "digits") is None


def test_json_round_trip_with_non_finite(tmp_path):
    res = make_results(2)
    res["pairs"][0]["curves"]["unaligned"]["loss_barrier"] = math.inf
    res["pairs"][0]["curves"]["unaligned"]["test_loss"][3] = math.nan
    res["pairs"][1]["endpoints"]["a"]["test_loss"] = -math.inf
    res["config"]["tuple"] = (1, 2)
    path = write_results_json(res, tmp_path / "out")
    assert path == tmp_path / "out" / "results.json"
    raw = path.read_text(encoding="utf-8")
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    back = read_results_json(path.parent)
    assert back["pairs"][0]["curves"]["unaligned"]["loss_barrier"] == math.inf
    assert math.isnan(back["pairs"][0]["curves"]["unaligned"]["test_loss"][3])
    assert back["pairs"][1]["endpoints"]["a"]["test_loss"] == -math.inf
    assert back["config"]["tuple"] == [1, 2]
    # everything else equal (nan compared as a string)
    back["pairs"][0]["curves"]["unaligned"]["test_loss"][3] = "nan"
    res["pairs"][0]["curves"]["unaligned"]["test_loss"][3] = "nan"
    res["config"]["tuple"] = [1, 2]
    assert back == json.loads(json.dumps(res))
    # the plane's diverged point survives too, and the read-back results still make a table
    assert back["pairs"][0]["plane"]["test_loss"][0][0] == math.inf
    assert summary_table(back)["rows"]["unaligned"]["loss_barrier"]["mean"] == math.inf


def test_json_rejects_unserialisable(tmp_path):
    res = make_results(1)
    res["config"]["model"] = object()
    with pytest.raises(TypeError, match=r"`results\['config'\]\['model'\]` is a object, which cannot be written"):
        write_results_json(res, tmp_path)
    assert not list(tmp_path.iterdir())
    (tmp_path / "results.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_results_json(tmp_path)
    with pytest.raises(FileNotFoundError, match="no results file"):
        read_results_json(tmp_path / "nowhere.json")


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda r: r.pop("pairs"), ValueError, r"`results` lacks the key 'pairs'; expected a study results dict"),
        (lambda r: r.pop("settings"), ValueError, r"`results` lacks the key 'settings'"),
        (lambda r: r.update(kind="verification_report"), ValueError, r"`results\['kind'\]` is 'verification_report'"),
        (lambda r: r.update(pairs=[]), ValueError, r"`results\['pairs'\]` is empty"),
        (lambda r: r.update(pairs={}), TypeError, r"`results\['pairs'\]` must be a list of pairs, got dict"),
        (lambda r: r.update(settings=["aligned", "bogus"]), ValueError, r"unknown setting 'bogus'"),
        (
            lambda r: r.update(settings=["aligned", "unaligned"]),
            ValueError,
            r"must list distinct settings in the order",
        ),
        (lambda r: r["pairs"][1].pop("endpoints"), ValueError, r"`results\['pairs'\]\[1\]` lacks the key 'endpoints'"),
        (
            lambda r: r["pairs"][0]["endpoints"]["b"].pop("test_acc"),
            ValueError,
            r"`results\['pairs'\]\[0\]\['endpoints'\]\['b'\]` lacks the key 'test_acc'",
        ),
        (
            lambda r: r["pairs"][0]["curves"].pop("aligned"),
            ValueError,
            r"`results\['pairs'\]\[0\]\['curves'\]` lacks the setting 'aligned'",
        ),
        (
            lambda r: r["pairs"][0]["curves"]["aligned"].pop("avg_accuracy"),
            ValueError,
            r"`results\['pairs'\]\[0\]\['curves'\]\['aligned'\]` lacks the key 'avg_accuracy'",
        ),
        (
            lambda r: r["pairs"][0]["curves"]["aligned"]["t"].pop(),
            ValueError,
            r"must have 't', 'test_loss' and 'test_accuracy' of one length >= 2, got 16, 17 and 17",
        ),
        (lambda r: r["pairs"].__setitem__(0, [1]), TypeError, r"`results\['pairs'\]\[0\]` must be a dict, got list"),
    ],
)
def test_malformed_results(mutate, error, message, tmp_path):
    res = make_results(2)
    mutate(res)
    for call in (validate_results, summary_table, format_table, lambda r: write_report(r, tmp_path)):
        with pytest.raises(error, match=message):
            call(res)
    assert not (tmp_path / "report.md").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="`results` must be a dict of study results, got list"):
        summary_table([])
    with pytest.raises(ValueError, match=r"`decimals` must be an int >= 0, got -1"):
        format_table(make_results(1), decimals=-1)
    with pytest.raises(TypeError, match="`paper_row` must be a dict of row label -> value, got str"):
        write_report(make_results(1), tmp_path, paper_row="89.0")
    with pytest.raises(
        ValueError, match=r"`paper_row\['Aligned'\]` must be a string \(end points\) or an \(avg, min\)"
    ):
        write_report(make_results(1), tmp_path, paper_row={"Aligned": ("1", "2", "3")})
    with pytest.raises(TypeError, match="`notes` must be a string of markdown, got int"):
        write_report(make_results(1), tmp_path, notes=3)


def _robust_results() -> dict:
    pairs = []
    for k, (r0, r1, mid) in enumerate(((0.40, 0.50, 0.20), (0.44, 0.46, 0.30)), start=1):
        curves = {}
        for s, lift in (("unaligned", 0.0), ("aligned", 0.25)):
            curves[s] = CurveEvaluation.from_values(
                [0, 0.5, 1], [0.2, 0.3, 0.2], [0.9, 0.8, 0.9], [0, 1, 2],
                robust_test_loss=[1.0, 2.0 - 2 * lift, 1.2], robust_test_accuracy=[r0, mid + lift, r1],
                adversarial={"eps": 0.1, "alpha": 0.025, "steps": 5, "random_start": True}, bn_inputs="adversarial",
            ).to_dict()  # fmt: skip
        ends = {e: {"test_loss": 0.2, "test_acc": 0.9, "robust_test_acc": r} for e, r in (("a", r0), ("b", r1))}
        pairs.append({"pair": k, "seeds": [2 * k - 1, 2 * k], "endpoints": ends, "curves": curves})
    config = {"arch": "mlp", "dataset": "mnist"}
    return {"kind": "study_results", "config": config, "settings": ["unaligned", "aligned"], "pairs": pairs}


def test_robust_table_by_hand(tmp_path):
    from neuralign.study.report import robust_table

    rows = robust_table(_robust_results())["rows"]
    # end points: robust (a + b) / 2 per pair = 45 and 45; +- (1/2) sqrt(s_a^2 + s_b^2) with s_a = s_b = 2.828 (%)
    assert rows["endpoints"]["robust"]["mean"] == pytest.approx(45.0)
    assert rows["endpoints"]["robust"]["std"] == pytest.approx(0.5 * math.sqrt(2 * 8.0))
    assert rows["unaligned"]["robust_min_accuracy"]["mean"] == pytest.approx(25.0)  # 20 and 30
    assert rows["aligned"]["robust_max_accuracy"]["mean"] == pytest.approx(52.5)  # max(40, 45, 50), max(44, 55, 46)
    # robust loss barrier: 2.0 - 1.1 unaligned, (2.0 - 0.5) - 1.1 aligned, in both pairs
    assert rows["unaligned"]["robust_loss_barrier"]["mean"] == pytest.approx(0.9)
    assert rows["aligned"]["robust_loss_barrier"]["mean"] == pytest.approx(0.4)
    text = write_report(_robust_results(), tmp_path).read_text(encoding="utf-8")
    assert "## Robust mode connectivity" in text and "eps 0.1, step 0.025, 5 steps" in text
    # the end-point row's spread is not a std over pairs, and the caption says so
    assert '"Curves at t = 0, 1" gives the mean of (a + b) / 2 ± ½·√(s_a² + s_b²)' in text
    assert "| Curves at t = 0, 1 | 90.0 ± 0.0 | 45.0 ± 2.0 |" in text
    assert "| Unaligned | 85.0 ± 0.0 | 80.0 ± 0.0 |" in text  # Avg: (0.45 + 0.8 + 0.45) / 2
    clean = CurveEvaluation.from_values([0, 1], [0, 0], [1, 1], [0, 1]).to_dict()
    standard = {"settings": ["aligned"], "pairs": [{"endpoints": p["endpoints"], "curves": {"aligned": clean}}
                                                   for p in _robust_results()["pairs"]]}  # fmt: skip
    with pytest.raises(ValueError, match="no robust evaluation"):
        robust_table(standard)


def test_alignment_means_leave_out_groups_without_a_correlation(tmp_path):
    """A group matched by weights (no activation tap: attention's query/key heads) has a NaN correlation: the means and
    the count of groups improved are over the others, and the report says so (it printed nan)."""
    res = make_results(1)
    al = res["pairs"][0]["alignment"]
    al["correlation_before"][GROUPS[0]] = al["correlation_after"][GROUPS[0]] = math.nan
    text = write_report(res, tmp_path).read_text(encoding="utf-8")
    # the other three groups: before 0.3, 0.4, 0.5 (mean 0.4), after +0.25, +0.2, +0.15 (gain 0.2)
    assert "| 1 | 1, 2 | 4 | 0.400 | 0.600 | +0.200 | 3/3 |" in text
    assert "have no correlation and are left out" in text and "nan" not in text.split("## Alignment")[1][:600]

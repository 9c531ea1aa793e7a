"""Tests of neuralign.study.results: the typed results, their JSON form, the published evidence files."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from neuralign import _json
from neuralign.study import PRESETS, SETTINGS
from neuralign.study import config as config_module
from neuralign.study import report as report_module
from neuralign.study.reference import PAPER_TABLE1, paper_row
from neuralign.study.report import dataset_label, summary_table, write_report
from neuralign.study.results import (
    AlignmentSummary,
    BNBatches,
    EndpointMetrics,
    PairResults,
    PAMIteration,
    PAMRun,
    PlaneResults,
    StudyResults,
    TrainEpoch,
    read_results_json,
    validate_results,
    write_results_json,
)
from neuralign.verification import VerificationReport
from tests.study.test_curve_extras import _with_extras
from tests.study.test_report import _robust_results, make_results

GROUP = "features.0.conv"
# the documented studies' results (docs/evidence also holds a `neuralign compare` result, of another kind)
EVIDENCE = sorted(p for p in (Path(__file__).parents[2] / "docs" / "evidence").glob("*/results.json")
                  if json.loads(p.read_text(encoding="utf-8")).get("kind", "study_results") == "study_results")
# the order in which neuralign.study.plots.plot_study draws the figures (the runner links them in that order)
PLOT_ORDER = ("curve_metrics", "robust_metrics", "layer_correlation", "reassignment", "plane", "verification",
              "midpoint_alignment", "learning_speed")  # fmt: skip


def _plain(data: dict) -> dict:
    """``data`` as written and read back as JSON (tuples become lists)."""
    return _json.loads(_json.dumps(data, where="results"))


# ----------------------------------------------------------------------------------------------------------------
# the published evidence
def test_the_evidence_is_there():
    assert {p.parent.name for p in EVIDENCE} >= {"cpu_tinyten_cifar10", "robust_mlp_mnist"}


@pytest.mark.parametrize("path", EVIDENCE, ids=lambda p: p.parent.name)
def test_evidence_round_trips_to_the_identical_file(path):
    text = path.read_text(encoding="utf-8")
    data = read_results_json(path)
    results = StudyResults.from_dict(data)
    assert results.to_dict() == data
    assert _json.dumps(results.to_dict(), where="results") + "\n" == text  # byte for byte, key order included
    assert StudyResults.read(path.parent) == results
    # typed access to what the report reads
    pair = results.pairs[0]
    assert pair.endpoints.a.test_acc == data["pairs"][0]["endpoints"]["a"]["test_acc"]
    assert pair.curves[results.settings[-1]].t[-1] == 1.0
    assert results.study_config is not None and results.study_config.model.arch == results.arch
    assert results.test_images == data["test_images"] and results.bn_batches == BNBatches(count=10, shared=True)


@pytest.mark.parametrize("path", EVIDENCE, ids=lambda p: p.parent.name)
def test_evidence_renders_the_committed_report(path, tmp_path):
    folder = path.parent
    results = StudyResults.read(folder)
    row = None if results.robust else paper_row(results.arch, dataset_label(results.dataset))  # as the command line
    (tmp_path / "figures").mkdir()
    figures = {}
    for key in PLOT_ORDER:
        name = report_module.FIGURE_FILES[key][0]
        if (folder / "figures" / name).is_file():
            figures[key] = tmp_path / "figures" / name
            figures[key].write_bytes(b"")
    text = write_report(results, tmp_path, figures=figures, paper_row=row).read_text(encoding="utf-8")
    assert write_report(read_results_json(folder), tmp_path, figures=figures, paper_row=row).read_text() == text
    committed = (folder / "report.md").read_text(encoding="utf-8")
    if folder.name != "robust_mlp_mnist":
        assert text == committed
        return
    # robust_mlp_mnist/report.md was written before the robust section's caption explained its end-point ±
    # (an older version of the report, not this change): every other line is the same
    ours, theirs = text.splitlines(), committed.splitlines()
    assert len(ours) == len(theirs)
    differ = [(a, b) for a, b in zip(ours, theirs) if a != b]
    assert len(differ) == 1 and differ[0][0].startswith("L-infinity PGD") and differ[0][1].startswith("L-infinity")
    assert '"Curves at t = 0, 1" gives the mean of (a + b) / 2' in differ[0][0]


# ----------------------------------------------------------------------------------------------------------------
# the JSON form
@pytest.mark.parametrize(
    "data",
    [
        make_results(3),
        make_results(1, ("aligned",), alignment=False, verification=False, plane=False, pam=False),
        make_results(2, ()),
        _robust_results(),
        _with_extras(),
    ],
    ids=["full", "bare", "no-settings", "robust", "midpoint-and-history"],
)
def test_to_dict_inverts_from_dict(data):
    plain = _plain(data)
    results = StudyResults.from_dict(data)
    assert _plain(results.to_dict()) == plain
    assert StudyResults.from_dict(results.to_dict()) == results
    # absent keys stay absent, present None stays None
    assert set(results.to_dict()["pairs"][0]) == set(data["pairs"][0])


def test_minimal_results_fill_in_what_they_lack_and_write_back_as_given():
    ends = {"a": {"test_acc": 0.9}, "b": {"test_acc": 0.8, "test_loss": 0.4, "checkpoint": "b.pt"}}
    ev = make_results(1, ("aligned",))["pairs"][0]["curves"]["aligned"]
    data = {"settings": ["aligned"], "pairs": [{"endpoints": ends, "curves": {"aligned": ev}}], "note": [1, 2]}
    results = StudyResults.from_dict(data)
    pair = results.pairs[0]
    assert (pair.pair, pair.seeds, pair.alignment, pair.pam, pair.train_history) == (1, (), None, {}, {})
    assert pair.endpoints.a == EndpointMetrics(test_acc=0.9) and pair.endpoints.b.extra == {"checkpoint": "b.pt"}
    assert results.config == {} and results.study_config is None and results.arch is None
    assert results.extra == {"note": [1, 2]}
    assert results.to_dict() == data  # no key added: not "kind", not the pair's number


def test_built_results_write_every_key(tmp_path):
    ev = StudyResults.from_dict(make_results(1, ("aligned",))).pairs[0].curves
    pair = PairResults(pair=1, seeds=(1, 2), endpoints=StudyResults.from_dict(make_results(1)).pairs[0].endpoints,
                       curves=ev, train_history={"aligned": (TrainEpoch(1, 0.5, 0.8),)})  # fmt: skip
    config = PRESETS["demo"]
    results = StudyResults(config=config, settings=["aligned"], pairs=[pair], test_images=100,
                           bn_batches=BNBatches(count=None, shared=True))  # fmt: skip
    assert results.config == config.to_dict() and results.study_config == config
    assert results.settings == ("aligned",) and isinstance(results.pairs, tuple)
    data = results.to_dict()
    assert list(data) == ["kind", "config", "settings", "pairs", "test_images", "bn_batches"]
    assert list(data["pairs"][0]) == ["pair", "seeds", "endpoints", "alignment", "curves", "pam", "verification",
                                      "plane", "midpoint_alignment", "train_history"]  # fmt: skip
    assert data["pairs"][0]["train_history"] == {"aligned": [{"epoch": 1, "loss": 0.5, "accuracy": 0.8}]}
    path = results.write(tmp_path)
    assert StudyResults.read(path) == results and read_results_json(path) == _plain(data)
    # a study's nested configuration names its architecture and data set (the report's title and figures)
    assert (results.arch, results.dataset) == ("tinyten", "digits")
    text = write_report(results, tmp_path, figures={}).read_text(encoding="utf-8")
    assert text.startswith("# Mode connectivity study: tinyten on digits\n")
    assert "Test set: 100 images" in text and "one full pass of the training images" in text


def test_the_typed_results_and_their_dict_give_one_report(tmp_path):
    data = _with_extras()
    data["pairs"][0]["pam"]["pam_unaligned"]["iterations"] = [
        {"iteration": 1, "objective": 1.1, "moved": 4, "avg_accuracy": 0.8, "min_accuracy": 0.7}]  # fmt: skip
    results = StudyResults.from_dict(data)
    assert results.pairs[0].pam["pam_unaligned"].iterations == (PAMIteration(1, 1.1, 4, 0.8, 0.7),)
    assert results.pairs[0].pam["pam_unaligned"].n_iter == 2
    assert isinstance(results.pairs[0].verification, VerificationReport)
    assert isinstance(results.pairs[0].plane, PlaneResults) and results.pairs[0].plane.labels[1] == "P w_B"
    typed = write_report(results, tmp_path / "typed", figures={}).read_text(encoding="utf-8")
    assert write_report(data, tmp_path / "dict", figures={}).read_text(encoding="utf-8") == typed
    assert "| PAM Unaligned | 1 | 1.1000 | 4.0 | 80.0 | 70.0 |" in typed
    assert summary_table(results) == summary_table(data)


def test_robust_and_settings_are_shared():
    assert StudyResults.from_dict(_robust_results()).robust
    assert not StudyResults.from_dict(make_results(1)).robust
    assert report_module.SETTINGS is config_module.SETTINGS is SETTINGS  # defined once
    assert paper_row("tinyten", "tiny-imagenet-200") == PAPER_TABLE1["tinyten"]["tinyimagenet"]
    assert paper_row("TinyTen", "CIFAR_10") == PAPER_TABLE1["tinyten"]["cifar10"]


def test_non_finite_values_survive_the_file(tmp_path):
    results = StudyResults.from_dict(make_results(1))
    data = results.to_dict()
    data["pairs"][0]["alignment"]["correlation_after"][GROUP] = math.nan
    data["pairs"][0]["pam"]["pam_aligned"]["history"][-1] = math.inf
    back = StudyResults.read(write_results_json(data, tmp_path))
    assert math.isnan(back.pairs[0].alignment.correlation_after[GROUP])
    assert back.pairs[0].pam["pam_aligned"].history[-1] == math.inf
    raw = (tmp_path / "results.json").read_text(encoding="utf-8")
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


# ----------------------------------------------------------------------------------------------------------------
# validation
def _mutated(mutate) -> dict:
    data = _with_extras()
    data["pairs"][0]["pam"]["pam_unaligned"]["iterations"] = [
        {"iteration": 1, "objective": 1.1, "moved": 4, "avg_accuracy": 0.8, "min_accuracy": 0.7}]  # fmt: skip
    data["test_images"] = 100
    data["bn_batches"] = {"count": 2, "shared": True}
    mutate(data)
    return data


P0 = r"`results\['pairs'\]\[0\]"


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda r: r["pairs"][0]["alignment"].pop("groups"), ValueError,
         P0 + r"\['alignment'\]` lacks the key 'groups'"),
        (lambda r: r["pairs"][0]["alignment"]["correlation_before"].update({GROUP: "high"}), TypeError,
         P0 + r"\['alignment'\]\['correlation_before'\]\['features.0.conv'\]` must be a number, got 'high'"),
        (lambda r: r["pairs"][0]["alignment"].update(perms=[]), ValueError,
         P0 + r"\['alignment'\]` has unknown keys \['perms'\]; expected some of \['groups', 'sizes'"),
        (lambda r: r["pairs"][0]["endpoints"]["a"].update(test_acc="0.9"), TypeError,
         P0 + r"\['endpoints'\]\['a'\]\['test_acc'\]` must be a number, got '0.9'"),
        (lambda r: r["pairs"][0]["pam"]["pam_unaligned"].pop("changed"), ValueError,
         P0 + r"\['pam'\]\['pam_unaligned'\]` lacks the key 'changed'"),
        (lambda r: r["pairs"][0]["pam"]["pam_unaligned"]["iterations"][0].update(moved=1.5), TypeError,
         P0 + r"\['pam'\]\['pam_unaligned'\]\['iterations'\]\[0\]\['moved'\]` must be an int, got 1.5"),
        (lambda r: r["pairs"][0]["verification"].update(kind="report"), ValueError,
         P0 + r"\['verification'\]` is not a VerificationReport: not a verification report"),
        (lambda r: r["pairs"][0]["verification"]["checks"]["gradient"].pop("summary"), ValueError,
         P0 + r"\['verification'\]\['checks'\]\['gradient'\]` lacks the key 'summary'"),
        (lambda r: r["pairs"][0]["plane"].pop("point_coordinates"), ValueError,
         P0 + r"\['plane'\]` lacks the key 'point_coordinates'"),
        (lambda r: r["pairs"][0]["plane"].update(z=[1]), ValueError,
         P0 + r"\['plane'\]` is not a PlaneEvaluation: unknown PlaneEvaluation fields \['z'\]"),
        (lambda r: r["pairs"][0]["midpoint_alignment"]["cases"]["linear"].pop("moved"), ValueError,
         P0 + r"\['midpoint_alignment'\]\['cases'\]\['linear'\]` lacks the key 'moved'"),
        (lambda r: r["pairs"][1]["train_history"]["aligned"][2].pop("loss"), ValueError,
         r"`results\['pairs'\]\[1\]\['train_history'\]\['aligned'\]\[2\]` lacks the key 'loss'"),
        (lambda r: r["pairs"][0]["curves"]["aligned"].pop("max_loss"), ValueError,
         P0 + r"\['curves'\]\['aligned'\]` lacks the key 'max_loss'"),
        (lambda r: r["pairs"][0]["curves"]["aligned"].update(colour="red"), ValueError,
         P0 + r"\['curves'\]\['aligned'\]` is not a CurveEvaluation: unknown CurveEvaluation fields \['colour'\]"),
        (lambda r: r["pairs"][0].update(seeds="1, 2"), TypeError, P0 + r"\['seeds'\]` must be a list, got str"),
        (lambda r: r.update(test_images=1e4), TypeError, r"`results\['test_images'\]` must be an int, got 10000.0"),
        (lambda r: r["bn_batches"].pop("shared"), ValueError, r"`results\['bn_batches'\]` lacks the key 'shared'"),
        (lambda r: r.update(config=[]), TypeError, r"`results\['config'\]` must be a dict, got list"),
    ],
)
def test_malformed_parts_are_named(mutate, error, message):
    data = _mutated(mutate)
    with pytest.raises(error, match=message):
        StudyResults.from_dict(data)
    with pytest.raises(error, match=message):
        validate_results(data)


def test_a_valid_mutation_base():
    StudyResults.from_dict(_mutated(lambda r: None))


def test_built_results_are_checked():
    pair = StudyResults.from_dict(make_results(1, ("aligned",))).pairs[0]
    with pytest.raises(ValueError, match=r"must list distinct settings in the order"):
        StudyResults(settings=("aligned", "unaligned"), pairs=(pair,))
    with pytest.raises(ValueError, match=r"`results\['pairs'\]` is empty"):
        StudyResults(settings=("aligned",), pairs=())
    with pytest.raises(ValueError, match=r"`results\['pairs'\]\[0\]\['curves'\]` lacks the setting 'unaligned'"):
        StudyResults(settings=("unaligned", "aligned"), pairs=(pair,))
    with pytest.raises(TypeError, match=r"`results\['pairs'\]\[0\]` must be a PairResults, got dict"):
        StudyResults(settings=("aligned",), pairs=(make_results(1)["pairs"][0],))
    with pytest.raises(TypeError, match=r"`results\['config'\]` must be a dict, got str"):
        StudyResults(config="tinyten", settings=("aligned",), pairs=(pair,))
    with pytest.raises(TypeError, match=r"`curves\['aligned'\]` must be a CurveEvaluation, got dict"):
        PairResults(pair=1, seeds=[1, 2], endpoints=pair.endpoints, curves={"aligned": {"t": [0.0, 1.0]}})
    assert PairResults(pair=1, seeds=[1, 2], endpoints=pair.endpoints, curves=pair.curves).seeds == (1, 2)


def test_read_results_json_checks_the_file(tmp_path):
    data = make_results(1)
    data["pairs"][0].pop("curves")
    (tmp_path / "results.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=r"`results\['pairs'\]\[0\]` lacks the key 'curves'"):
        read_results_json(tmp_path)
    with pytest.raises(ValueError, match=r"`results\['pairs'\]\[0\]` lacks the key 'curves'"):
        StudyResults.read(tmp_path / "results.json")
    (tmp_path / "results.json").write_text(json.dumps({"kind": "verification_report"}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"does not hold study results \(a dict with kind 'study_results'\)"):
        StudyResults.read(tmp_path)


def test_records_are_frozen_and_copied():
    data = make_results(1)
    results = StudyResults.from_dict(data)
    with pytest.raises(AttributeError):
        results.settings = ()  # type: ignore[misc]
    out = results.to_dict()
    out["config"]["schedule"]["lr"] = 99.0
    out["pairs"][0]["alignment"]["correlation_after"][GROUP] = 99.0
    data["config"]["schedule"]["lr"] = 98.0
    assert results.config["schedule"]["lr"] == 0.1
    assert results.pairs[0].alignment.correlation_after[GROUP] != 99.0
    assert AlignmentSummary.from_dict(out["pairs"][0]["alignment"]).sizes[GROUP] == 8
    assert PAMRun.from_dict({"history": [1.0], "changed": {}}).to_dict() == {"history": [1.0], "changed": {}}
    assert copy.deepcopy(results) == results

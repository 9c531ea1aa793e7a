"""The method comparison: settings, stage graph, agreement matrix, and a planted pair on which every matching
recovers B's permutation and the aligned interpolation has no barrier."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from neuralign.alignment import apply_permutation, random_permutation, trace_spec
from neuralign.cli.commands.compare import PRESET_NAMES
from neuralign.errors import CheckpointError
from neuralign.experiments import build_model
from neuralign.study.compare import COMPARE_PRESETS, CompareConfig, agreement_matrix, compare_stages, run_compare
from neuralign.verification import CHECKS, VerificationOptions, VerificationReport


def test_presets_round_trip_and_are_the_command_line_choices() -> None:
    assert tuple(sorted(COMPARE_PRESETS)) == PRESET_NAMES
    for config in COMPARE_PRESETS.values():
        assert CompareConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert COMPARE_PRESETS["demo"].protocol.num_points == 11
    assert CompareConfig().protocol.num_points == 25


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown methods \\['hungarian'\\]"):
        CompareConfig(methods=("weight", "hungarian"))
    with pytest.raises(ValueError, match="must name distinct methods"):
        CompareConfig(methods=("weight", "weight"))
    with pytest.raises(ValueError, match="`endpoints` must name 2 \\* pairs = 2 files, got 3"):
        CompareConfig(pairs=1, endpoints=("a", "b", "c"))
    with pytest.raises(ValueError, match="unknown learned_init 'l2'; expected one of \\['weight', 'identity'\\]"):
        CompareConfig(methods=("weight",), learned_init="l2")
    stages = {s.name: s for s in compare_stages(CompareConfig(methods=("l2", "sinkhorn"), learned_init="l2"))}
    assert stages["pair 1 align sinkhorn"].needs == ("endpoint 1", "endpoint 2", "pair 1 align l2")
    assert CompareConfig().set("protocol.bn", "repair").protocol.bn == "repair"


def test_stage_graph() -> None:
    config = CompareConfig(pairs=2, methods=("identity", "weight"), fit_curves=True)
    names = [s.name for s in compare_stages(config)]
    assert names[:4] == ["endpoint 1", "endpoint 2", "endpoint 3", "endpoint 4"]
    assert names[4:7] == ["pair 1 align identity", "pair 1 eval identity", "pair 1 curve identity"]
    assert names[-1] == "report" and len(names) == 4 + 2 * 2 * 3 + 1
    stages = {s.name: s for s in compare_stages(config)}
    assert stages["pair 2 align weight"].needs == ("endpoint 3", "endpoint 4")
    assert stages["pair 2 eval weight"].outputs == ("pair2/eval_weight.json",)


def test_agreement_matrix() -> None:
    perms = {"a": {"g": torch.tensor([0, 1, 2]), "h": torch.tensor([1, 0])},
             "b": {"g": torch.tensor([0, 2, 1]), "h": torch.tensor([1, 0])},
             "c": {"g": torch.tensor([2, 1, 0]), "h": torch.tensor([0, 1])}}  # fmt: skip
    m = agreement_matrix(perms)
    # a-b: g agrees on 1 of 3, h on 2 of 2 -> 3/5; a-c: 1 + 0 -> 1/5; b-c: 0 + 0 -> 0
    np.testing.assert_allclose(m, [[1, 0.6, 0.2], [0.6, 1, 0.0], [0.2, 0.0, 1]], rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="permute different groups"):
        agreement_matrix({"a": {"g": torch.arange(2)}, "b": {"h": torch.arange(2)}})


def test_planted_pair_every_matching_recovers_it(tmp_path) -> None:
    # B is A with its hidden units permuted: correlation, l2 and weight matching must find the inverse, the
    # interpolation between A and the aligned B is then A all along (no barrier at all), the identity is not
    model = build_model("mlp", 10, in_features=64, hidden=(24, 16), batch_norm=True, generator=1)
    sd_a = model.state_dict()
    spec = trace_spec(model, torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)))
    sd_b = apply_permutation(sd_a, spec, random_permutation(spec, generator=3))
    torch.save(sd_a, tmp_path / "a.pt")
    torch.save(sd_b, tmp_path / "b.pt")
    config = COMPARE_PRESETS["demo"]
    for path, value in {"pairs": 1, "endpoints": (str(tmp_path / "a.pt"), str(tmp_path / "b.pt")),
                        "model.arch": "mlp", "model.hidden": (24, 16), "data.resize": None,
                        "data.train_size": 128, "data.test_size": 96, "protocol.num_points": 5,
                        "protocol.max_bn_batches": 1, "learned.epochs": 1, "learned.max_batches": 2,
                        "methods": ("identity", "correlation", "l2", "weight", "straight_through",
                                    "learned")}.items():  # fmt: skip
        config = config.set(path, value)
    res = run_compare(config, tmp_path / "out")
    methods = res["pairs"][0]["methods"]
    for m in ("correlation", "l2", "weight"):
        for split in ("test", "train"):
            s = methods[m]["evaluation"]["splits"][split]
            assert s["loss_barrier_average"] <= 1e-6 and s["loss_barrier_linear"] <= 1e-6
            assert s["accuracy_barrier_average"] == 0.0
            assert max(s["loss"]) - min(s["loss"]) <= 1e-6
    naive = methods["identity"]["evaluation"]["splits"]["test"]["loss"]
    assert max(naive) - min(naive) > 1e-3  # the test can fail: unaligned, the path is not constant
    agree = np.array(res["agreement"])
    np.testing.assert_allclose(agree[1:4, 1:4], np.ones((3, 3)), rtol=0, atol=0)  # all three found the same perms
    assert agree[0, 1] < 0.5
    assert methods["correlation"]["cost"]["data_passes"] == 1.0 and methods["weight"]["cost"]["data_passes"] == 0.0
    for m in ("straight_through", "learned"):  # the learned methods report their own cost (2 of 2 batches: 1 pass)
        cost = methods[m]["cost"]
        assert cost["data_passes"] == 1.0 and cost["assignments"] > 0 and cost["seconds"] > 0, cost
        assert len(cost["history"]) == 1 and cost["init"] == "weight"
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| weight | 0.000" in text and "## Agreement" in text and "figures/compare.png" in text
    assert (tmp_path / "out" / "figures" / "compare.png").stat().st_size > 1000
    # a rerun recomputes nothing; other settings are refused
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("pair1/*")}
    run_compare(config, tmp_path / "out")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("pair1/*")} == stamps
    with pytest.raises(CheckpointError, match=r"other settings: protocol.num_points 5 \(now 7\)"):
        run_compare(config.set("protocol.num_points", 7), tmp_path / "out")


def test_verification_settings() -> None:
    with pytest.raises(ValueError, match="`verification` checks each method's permutation on its Bezier curve: it "
                       "needs fit_curves=True"):  # fmt: skip
        CompareConfig(verification=VerificationOptions())
    config = CompareConfig(fit_curves=True).set("verification", True)
    assert config.verification == VerificationOptions() and config.set("verification", False).verification is None
    with pytest.raises(TypeError, match="`verification` must be a VerificationOptions or None, got dict"):
        CompareConfig(fit_curves=True, verification={"n_swaps": 2})
    # the folders of before this setting (no "verification" in their config) read as without verification
    old = CompareConfig(fit_curves=True).to_dict()
    del old["verification"]
    assert CompareConfig.from_dict(old) == CompareConfig(fit_curves=True)
    stages = {s.name: s for s in compare_stages(config.set("methods", ("weight",)).set("pairs", 1))}
    assert stages["pair 1 verify weight"].needs == ("pair 1 curve weight",)
    assert stages["pair 1 verify weight"].outputs == ("pair1/verify_weight.json", "pair1/verify_weight.md")
    assert "pair 1 verify weight" in stages["report"].needs
    assert not any("verify" in s.name for s in compare_stages(CompareConfig(fit_curves=True)))


def test_a_verdict_per_method_and_pair(tmp_path) -> None:
    # tiny MLPs on the shipped digits, budgets of seconds: what is checked is the plumbing (the study's verification
    # on each method's own curve and permutation, recorded and reported), and one verdict that must come out: the
    # identity between two independently trained networks is not the correlation alignment's optimum
    config = COMPARE_PRESETS["demo"]
    for path, value in {"pairs": 1, "methods": ("identity", "weight"), "model.arch": "mlp", "model.hidden": (16, 16),
                        "data.resize": None, "data.train_size": 512, "data.test_size": 128, "train.epochs": 1,
                        "max_batches": 2, "protocol.max_bn_batches": 2, "protocol.num_points": 3, "curve.epochs": 1,
                        "fit_curves": True, "verification": True, "verification.n_swaps": 1,
                        "verification.swap_trials": 1, "verification.screen_pairs": 4,
                        "verification.screen_examples": 16, "verification.n_control_swaps": 1,
                        "verification.certificate_steps": 1, "verification.value_batches": 2,
                        "verification.gradient_batches": 1, "verification.stability_iters": 1,
                        "verification.random_starts": 0, "verification.value_ts": (0.5,),
                        "verification.gradient_check_examples": 2}.items():  # fmt: skip
        config = config.set(path, value)
    out = tmp_path / "out"
    res = run_compare(config, out)
    for m in config.methods:
        v = res["pairs"][0]["methods"][m]["verification"]
        report = VerificationReport.from_json((out / "pair1" / f"verify_{m}.json").read_text())
        assert v["verdict"] == report.verdict and v["report"] == f"pair1/verify_{m}.md"
        assert v["checks"] == {name: c.verdict for name, c in report.checks.items()} and set(v["checks"]) == set(CHECKS)
        assert v["failing"] == {name: c.summary for name, c in report.checks.items() if c.verdict == "fail"}
    identity = res["pairs"][0]["methods"]["identity"]["verification"]
    assert identity["checks"]["alignment"] == "fail" and identity["verdict"] == "fail"
    text = (out / "report.md").read_text()
    assert "| verification (pairs) |" in text and " | 1 fail |" in text and "## Verification" in text
    assert "| identity | 1 | " in text and "[fail](pair1/verify_identity.md)" in text
    assert f"- identity, pair 1, alignment: {identity['failing']['alignment']}" in text
    # a rerun verifies nothing again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "pair1").glob("verify_*")}
    run_compare(config, out)
    assert {p: p.stat().st_mtime_ns for p in (out / "pair1").glob("verify_*")} == stamps and len(stamps) == 4


def test_a_comparison_folder_written_before_the_optimizer_setting_still_resumes(tmp_path) -> None:
    from pathlib import Path

    from neuralign.study.compare import check_compare_folder

    evidence = Path(__file__).resolve().parents[2] / "docs" / "evidence" / "compare_mlp_mnist" / "manifest.json"
    manifest = json.loads(evidence.read_text())
    assert "optimizer" not in manifest["config"]["train"]  # written before TrainingOptions.optimizer
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    config = CompareConfig.from_dict(manifest["config"])
    assert config.train.optimizer == config.curve.optimizer == "sgd"
    assert check_compare_folder(config, tmp_path) == manifest
    with pytest.raises(CheckpointError, match=r"other settings: curve.optimizer 'sgd' \(now 'adamw'\)"):
        check_compare_folder(config.set("curve.optimizer", "adamw"), tmp_path)


def test_summary_has_the_papers_avg_and_min_along_each_bezier_curve() -> None:
    """Tatro et al. (2020, Table 1) compare curves by the arc-length-weighted average (Avg) and the minimum (Min)
    of the test accuracy along them: the summary has both per method with a curve, the mean and std over pairs."""
    from neuralign.study.compare_report import _ROWS, summary_table

    fields = {k.split(".")[1]: 0.0 for k, _, _ in _ROWS}

    def entry(avg, low):
        curve = None if avg is None else {"avg_accuracy": avg, "min_accuracy": low}
        return {"evaluation": {"splits": {"test": fields, "train": fields}}, "cost": {"seconds": 1.0},
                "curve": curve}  # fmt: skip

    pairs = [{"methods": {"weight": entry(0.70, 0.60), "identity": entry(None, None)}},
             {"methods": {"weight": entry(0.74, 0.62), "identity": entry(None, None)}}]  # fmt: skip
    table = summary_table(pairs, ("weight", "identity"))
    assert table["weight"]["curve_avg"]["mean"] == pytest.approx(0.72, abs=1e-15)
    assert table["weight"]["curve_min"]["mean"] == pytest.approx(0.61, abs=1e-15)
    assert table["weight"]["curve_avg"]["std"] == pytest.approx(0.04 / 2**0.5, rel=1e-12)
    assert "curve_avg" not in table["identity"] and "curve_min" not in table["identity"]

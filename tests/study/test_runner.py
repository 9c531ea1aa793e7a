import json

import pytest

from neuralign.attacks import PGD
from neuralign.study import PRESETS, StudyConfig


def _tiny_robust() -> StudyConfig:
    return PRESETS["robust-cpu"].apply({
        "data.dataset": "digits", "model.hidden": (16,), "pairs": 1, "data.batch_size": 64, "data.train_size": None,
        "data.test_size": None, "data.align_size": 128, "train.epochs": 2, "curve.epochs": 2,
        "evaluation.num_points": 3, "evaluation.max_bn_batches": 2, "max_batches": 2,
        "robust.attack": PGD(eps=0.1, alpha=0.05, steps=2),
    })  # fmt: skip


def test_tiny_robust_study_runs_resumes_and_reports(tmp_path):
    from neuralign.study import run_study

    config = _tiny_robust()
    full = run_study(config, tmp_path / "full")

    def interrupt(event):
        if event["stage"] == "curve" and event["label"] == "pair 1 aligned" and event["step"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(config, tmp_path / "cut", progress=interrupt)
    assert (tmp_path / "cut" / "pair1" / "curve_aligned.ckpt").exists()
    trained = (tmp_path / "cut" / "endpoints" / "seed1.pt").stat().st_mtime_ns
    stages = []
    resumed = run_study(config, tmp_path / "cut", progress=lambda e: stages.append((e["stage"], e["label"])))
    assert (tmp_path / "cut" / "endpoints" / "seed1.pt").stat().st_mtime_ns == trained  # finished stages skipped
    assert {s for s, _ in stages} == {"curve", "evaluate", "midpoint alignment"}
    assert ("curve", "pair 1 unaligned") not in stages
    assert resumed["pairs"][0]["curves"] == full["pairs"][0]["curves"]  # bit for bit, robust values included
    assert resumed["pairs"][0]["endpoints"] == full["pairs"][0]["endpoints"]
    ev = full["pairs"][0]["curves"]["aligned"]
    assert len(ev["robust_test_accuracy"]) == 3 and ev["bn_inputs"] == "adversarial"
    assert "robust_test_acc" in full["pairs"][0]["endpoints"]["a"]
    report = (tmp_path / "full" / "report.md").read_text()
    assert "## Robust mode connectivity" in report and "| Aligned |" in report
    assert (tmp_path / "full" / "figures" / "robust_metrics.png").exists()
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["config"]["robust"]["attack"]["eps"] == 0.1 and "pair 1 eval aligned" in manifest["completed"]


def _endpoint_file(path, seed: int, dataset: dict | None) -> str:
    # an end point as `neuralign train` writes it, for the tiny robust study's MLP on 8x8 digits
    import torch

    from neuralign._utils import atomic_save
    from neuralign.experiments.models import build_model

    kwargs = {"in_features": 64, "batch_norm": True, "hidden": (16,)}
    model = build_model("mlp", 10, generator=seed, **kwargs)
    record = {"kind": "endpoint", "arch": "mlp", "num_classes": 10, "model_kwargs": kwargs,
              "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}  # fmt: skip
    if dataset is not None:
        record["dataset"] = dataset
    atomic_save(record, path)
    assert torch.load(path, weights_only=False)["kind"] == "endpoint"
    return str(path)


def test_robust_study_refuses_end_points_trained_on_normalised_inputs(tmp_path):
    from neuralign.study import run_study

    normalised = {"name": "digits", "mean": [0.3], "std": [0.35]}
    given = (_endpoint_file(tmp_path / "a.pt", 1, normalised), _endpoint_file(tmp_path / "b.pt", 2, normalised))
    config = _tiny_robust().set("endpoints", given)
    with pytest.raises(ValueError, match=r"a.pt' was trained on normalised inputs \(mean \[0.3\], std \[0.35\]\), "
                                         r"but a robust study attacks and evaluates \[0, 1\] inputs"):  # fmt: skip
        run_study(config, tmp_path / "study")
    # raw [0, 1] inputs recorded (mean/std None), or nothing recorded: accepted, the study goes on to the curves
    raw = {"name": "digits", "mean": None, "std": None}
    for name, dataset in (("raw", raw), ("plain", None)):
        given = (_endpoint_file(tmp_path / f"{name}a.pt", 1, dataset),
                 _endpoint_file(tmp_path / f"{name}b.pt", 2, dataset))  # fmt: skip
        stages = []

        def stop_at_the_curves(event, stages=stages):
            stages.append(event["stage"])
            if event["stage"] == "curve":
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            run_study(config.set("endpoints", given), tmp_path / f"study_{name}", progress=stop_at_the_curves)
        assert "curve" in stages and "train" not in stages, name

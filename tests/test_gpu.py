"""The GPU paths, against the CPU: alignment, curve fitting and a study on CUDA (``@pytest.mark.gpu``: skipped, with
the reason, where torch sees no CUDA device; ``benchmarks/gpu_check.sh`` runs them on the first GPU machine)."""

from __future__ import annotations

import json

import pytest
import torch

from neuralign.alignment import align
from neuralign.curves import fit_curve
from neuralign.study import PRESETS, run_study
from tests.planted import planted_copy, small_mlp

pytestmark = pytest.mark.gpu


def _batches(device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(32, 6, generator=g).to(device), torch.randint(0, 3, (32,), generator=g).to(device))
            for _ in range(4)]  # fmt: skip


def test_align_on_cuda_gives_the_cpu_permutations():
    a = small_mlp(1)
    b = planted_copy(a)
    cpu = align(a, b, [x for x, _ in _batches("cpu")])
    gpu = align(a.cuda(), b.cuda(), [x for x, _ in _batches("cuda")])
    for group, perm in cpu.perms.items():
        assert torch.equal(gpu.perms[group].cpu(), perm), group
    for group, value in cpu.correlation_after.items():
        assert abs(gpu.correlation_after[group] - value) < 1e-5, group


def test_fit_curve_on_cuda_stays_there_and_follows_the_cpu_fit():
    a, b = small_mlp(1), small_mlp(2)
    fits = {}
    for device in ("cpu", "cuda"):
        model = small_mlp(1).to(device)
        sd_a = {k: v.to(device) for k, v in a.state_dict().items()}
        sd_b = {k: v.to(device) for k, v in b.state_dict().items()}
        fits[device] = fit_curve(model, sd_a, sd_b, _batches(device), epochs=1, generator=0)
    control = fits["cuda"].curve.points[1]
    assert all(v.device.type == "cuda" for v in control.values())
    # float32 matmuls (no TF32 by default) in another order: the one-epoch control points agree to float rounding
    for key, value in fits["cpu"].curve.points[1].items():
        torch.testing.assert_close(control[key].cpu(), value, rtol=0, atol=1e-5)


def test_a_small_study_runs_on_cuda_and_records_it(tmp_path):
    config = PRESETS["demo"].apply({"train.epochs": 1, "curve.epochs": 1, "pam.x_epochs": 1, "max_batches": 3,
                                    "evaluation.num_points": 3, "evaluation.plane_grid": 3,
                                    "evaluation.max_bn_batches": 2, "verification.n_swaps": 2,
                                    "verification.swap_trials": 2, "verification.screen_pairs": 8,
                                    "verification.value_batches": 2})  # fmt: skip
    results = run_study(config, tmp_path, device="cuda")
    assert json.loads((tmp_path / "manifest.json").read_text())["device"].startswith("cuda")
    for record in (tmp_path / "stages").glob("*.json"):
        assert json.loads(record.read_text())["device"].startswith("cuda"), record.name
    accuracies = results["pairs"][0]["curves"]["aligned"]["test_accuracy"]
    assert len(accuracies) == 3 and all(0.0 <= a <= 1.0 for a in accuracies)

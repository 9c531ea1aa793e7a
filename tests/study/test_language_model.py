"""The study's stages on the language model (issue 21): ``train.optimizer`` and ``curve.optimizer`` reach the end
points' training and the curve's fit (``tinylm`` on ``pydoc``, which SGD does not train)."""

from __future__ import annotations

import math

import torch

import neuralign.study.runner as runner
from neuralign.study import PRESETS


def test_the_study_trains_tinylm_and_fits_its_curve_with_adamw(tmp_path, monkeypatch):
    fitted = []

    def fit_curve(*args, optimizer, **kwargs):  # the optimizer the curve is given
        fitted.append(type(optimizer([torch.zeros(1, requires_grad=True)])).__name__)
        return real(*args, optimizer=optimizer, **kwargs)

    real = runner.fit_curve
    monkeypatch.setattr(runner, "fit_curve", fit_curve)
    config = PRESETS["demo"].apply({
        "model.arch": "tinylm", "data.dataset": "pydoc:16", "data.train_size": 256, "data.test_size": 64,
        "settings": "aligned", "verification": False, "max_batches": 8,
        "train.optimizer": "adamw", "train.lr": 5e-3, "train.epochs": 1,
        "curve.optimizer": "adamw", "curve.lr": 5e-3, "curve.epochs": 1,
    })  # fmt: skip
    assert config.data.resize is None  # the demo's resize=16 does not follow the text dataset
    runner.prepare_study(config, tmp_path)
    for stage in ("endpoint 1", "endpoint 2", "pair 1 alignment", "pair 1 curve aligned"):
        assert runner.run_stage(config, tmp_path, stage)
    assert fitted == ["AdamW"]
    # measured through neuralign compare (the same end points): 4.18 and 4.14 nats after 8 AdamW batches at
    # lr 5e-3, 5.40 with SGD at that lr; a uniform guess is log 256 = 5.55
    for seed in (1, 2):
        end = torch.load(tmp_path / "endpoints" / f"seed{seed}.pt", weights_only=False)
        assert end["test"]["test_loss"] < math.log(256) - 0.75

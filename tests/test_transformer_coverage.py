"""benchmarks/transformer_coverage.py: a traced transformer's row says exact with its head groups; a refusal names
the fx node."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from neuralign.experiments.models import build_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "transformer_coverage.py"


@pytest.fixture(scope="module")
def coverage():
    spec = importlib.util.spec_from_file_location("transformer_coverage", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        sys.modules.pop("model_coverage", None)


def test_a_small_vit_row_is_exact_with_its_heads(coverage):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    line = coverage.row("zoo:vit", lambda: build_model("vit", 10, width=32, depth=1, heads=2, mlp_dim=32), x)
    assert "| zoo:vit | 2x3x32x32 | traced, exact:" in line
    assert "1 head groups; 2 groups with inside permutations (2x16)" in line


def test_a_refusal_names_the_node(coverage):
    class Unknown(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 8)
            self.out = torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.out(torch.fft.fft(self.fc(x)).real)

    line = coverage.row("unknown", Unknown, torch.randn(2, 4, generator=torch.Generator().manual_seed(1)))
    assert "refused: cannot prove that fx node `fft_fft`" in line

"""benchmarks/model_coverage.py: one model's row is right (resnet18 traced, spec checked), and failures become rows."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from neuralign.errors import SpecError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "model_coverage.py"


@pytest.fixture(scope="module")
def coverage():
    spec = importlib.util.spec_from_file_location("model_coverage", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's string annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_resnet18_row_is_traced_and_equivalent(coverage):
    row = coverage.coverage_row("resnet18", side=32)
    assert row.status == "traced", row.message
    assert row.input_shape == (2, 3, 32, 32)
    assert row.groups > 0
    assert row.tapped_fraction == 1.0  # every resnet18 group is read from data
    assert row.max_diff < 1e-9 and row.passed
    assert "| resnet18 | 2x3x32x32 |" in coverage.format_table([row])


def test_spec_error_is_a_refusal_and_anything_else_an_error(coverage, monkeypatch):
    def refuse(model, x):
        raise SpecError("cannot prove that fx node `getitem_3` (call_function getitem) is safe\nsecond line")

    monkeypatch.setattr(coverage, "trace_spec", refuse)
    row = coverage.coverage_row("squeezenet1_1", side=32)
    assert (row.status, row.node, row.op) == ("refused", "getitem_3", "call_function getitem")
    assert "second line" not in row.message
    assert "refused at `getitem_3` (call_function getitem)" in coverage.format_table([row])

    def crash(model, x):
        raise RuntimeError("boom")

    monkeypatch.setattr(coverage, "trace_spec", crash)
    row = coverage.coverage_row("squeezenet1_1", side=32)
    assert (row.status, row.message) == ("error", "RuntimeError: boom")
    assert "ERROR" in coverage.format_table([row])

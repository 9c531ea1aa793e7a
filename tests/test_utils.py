"""Tests of ``neuralign._utils`` (seeds, atomic files, checkpoints) and of the per-test seeding in ``conftest``."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from neuralign._utils import stable_seed
from tests.conftest import node_seed

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ seeding
def test_stable_seed_is_a_fixed_function_of_its_parts():
    # pinned values: a change of the hash would silently change every derived seed
    assert stable_seed("pair", 1) == stable_seed("pair", 1) != stable_seed("pair", 2)
    assert stable_seed("neuralign-tests", "a::b") == 3816419472323804608
    assert 0 <= stable_seed(object.__name__) < 2**63


def test_each_test_starts_from_the_seed_of_its_node_id(request):
    seed = node_seed(request.node.nodeid)
    assert torch.initial_seed() == seed
    drawn = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    torch.testing.assert_close(drawn[0], torch.rand(3), rtol=0, atol=0)
    np.testing.assert_array_equal(drawn[1], np.random.rand(3))
    assert drawn[2] == random.random()


PROBE = """
import json, os, random

import numpy as np
import pytest
import torch

def _draw():
    return [torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random()]


@pytest.fixture(scope="module")
def shared():
    return _draw()


def _record(name, values):
    with open(os.path.join(os.environ["PROBE_OUT"], name + ".json"), "w") as fh:
        json.dump(values, fh)


def test_a():
    _record("test_a", _draw() + _draw())


def test_b(shared):
    _record("test_b", shared + _draw())
"""


def _run_probe(folder: Path, out: Path, order: list[str]) -> dict[str, list]:
    out.mkdir()
    env = {**os.environ, "PROBE_OUT": str(out), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "--rootdir",
           str(folder), *[f"{folder / 'test_probe.py'}::{name}" for name in order]]  # fmt: skip
    done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return {name: json.loads((out / f"{name}.json").read_text()) for name in order}


def test_tests_draw_the_same_numbers_in_any_order(tmp_path):
    """Two tests and a module-scoped fixture, run in both orders in fresh sessions, draw the same numbers."""
    folder = tmp_path / "probe"
    folder.mkdir()
    (folder / "test_probe.py").write_text(textwrap.dedent(PROBE))
    (folder / "conftest.py").write_text('pytest_plugins = ["tests.conftest"]  # the fixture and hook under test\n')
    forward = _run_probe(folder, tmp_path / "forward", ["test_a", "test_b"])
    backward = _run_probe(folder, tmp_path / "backward", ["test_b", "test_a"])
    assert forward == backward
    # and the seeds differ between tests and between a test and the fixture it uses
    a, b = forward["test_a"], forward["test_b"]
    assert a[3:] != b[3:] and b[:3] != b[3:]

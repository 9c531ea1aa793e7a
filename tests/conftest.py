"""Shared test fixtures: real data from ``../shared/data`` (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run (CI must not fail by chance); set NEURALIGN_HYPOTHESIS=explore
# to search new examples locally.
settings.register_profile("deterministic", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile("explore" if os.environ.get("NEURALIGN_HYPOTHESIS") == "explore" else "deterministic")

SHARED_DATA = Path(os.environ.get("NEURALIGN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_data(name: str) -> Path:
    """Path of ``name`` under the shared data folder, or skip the test with a reason saying where it looked."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data {name!r} not found at {path} (set NEURALIGN_SHARED_DATA to the folder holding it)")
    return path


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Keep tests single-threaded per process so timing noise and nondeterminism stay low on 2 cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)

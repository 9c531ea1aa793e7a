"""Shared test fixtures: every test and every shared fixture starts from a seed of its own; real data from
``../shared/data`` (skipped with a reason when absent)."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

from neuralign._utils import stable_seed

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


class FullDisk:
    """A binary file whose disk fills up after ``room`` more bytes: the write that overflows stores what fits, then
    raises ``OSError(ENOSPC)`` as a real full disk does (so does every later write)."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.file.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


# ------------------------------------------------------------------------------------------------ seeding
def node_seed(*parts: object) -> int:
    """The seed of a test or shared fixture: a SHA-256 hash of its pytest node id (and fixture name).

    It depends on nothing else, so a test draws the same numbers whatever ran before it, in any order or selection.
    """
    return stable_seed("neuralign-tests", *parts)


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch (every device), numpy's and Python's global generators with ``seed``; restore them afterwards."""
    saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])


@pytest.fixture(autouse=True)
def _seed_rngs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test draws from generators seeded by its own node id (autouse fixtures set up before the others)."""
    with seeded_rngs(node_seed(request.node.nodeid)):
        yield


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """Module-, class- and session-scoped fixtures are set up before a test's own seed, during whichever test first
    needs them: seed each from its own scope node and name so that what it draws does not depend on that test."""
    if fixturedef.scope == "function":
        return (yield)
    with seeded_rngs(node_seed(request.node.nodeid, fixturedef.argname)):
        return (yield)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Keep tests single-threaded per process so timing noise and nondeterminism stay low on 2 cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: without one they are skipped, saying so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

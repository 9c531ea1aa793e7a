"""Tests of ``neuralign._utils`` (seeds, atomic files, checkpoints) and of the per-test seeding in ``conftest``."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from neuralign._utils import atomic_save, atomic_write, atomic_write_text, load_checkpoint, stable_seed
from neuralign.errors import CheckpointError, WriteError
from tests.conftest import FullDisk, node_seed

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


# ------------------------------------------------------------------------------------------------ atomic files
def _no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_is_a_one_line_write_error_and_the_previous_file_survives(tmp_path):
    path = atomic_write_text(tmp_path / "result.json", "previous")

    def fill(fh):
        FullDisk(fh, room=10).write(b"x" * 100)

    with pytest.raises(WriteError, match=r"^could not write '.*result\.json': No space left on device$") as info:
        atomic_write(path, fill)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert path.read_text() == "previous" and _no_temporaries(tmp_path)


def test_torch_save_on_a_full_disk_is_a_write_error_naming_the_cause(tmp_path, monkeypatch):
    path = atomic_save({"w": torch.zeros(3)}, tmp_path / "model.pt")
    real_save = torch.save

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        return real_save(obj, FullDisk(f, room=300), *args, **kwargs)

    # torch itself reports "RuntimeError: [enforce fail at inline_container.cc] . unexpected pos ..." here
    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    with pytest.raises(RuntimeError, match="unexpected pos|PytorchStreamWriter"):
        torch.save({"w": torch.zeros(1000)}, io.BytesIO())
    with pytest.raises(WriteError, match=r"^could not write '.*model\.pt': No space left on device$") as info:
        atomic_save({"w": torch.zeros(1000)}, path)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    torch.testing.assert_close(load_checkpoint(path)["w"], torch.zeros(3), rtol=0, atol=0)
    assert _no_temporaries(tmp_path)


def test_a_write_under_a_file_names_the_file_in_the_way(tmp_path):
    blocker = atomic_write_text(tmp_path / "out", "a file, not a folder")
    with pytest.raises(WriteError, match=r"could not write '.*out/x\.pt': (File exists|Not a directory): '.*out'$"):
        atomic_save({}, blocker / "x.pt")


def test_other_errors_of_the_writer_pass_through_unchanged(tmp_path):
    def broken(fh):
        raise KeyError("not an I/O error")

    with pytest.raises(KeyError, match="not an I/O error"):
        atomic_write(tmp_path / "x", broken)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 64 KiB file system (tmpfs), for root on Linux; skipped elsewhere."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root on Linux): {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_really_full_disk_is_a_write_error_and_the_previous_checkpoint_survives(tiny_tmpfs):
    path = atomic_save({"w": torch.arange(10.0)}, tiny_tmpfs / "ckpt.pt")
    with pytest.raises(WriteError, match=r"^could not write '.*ckpt\.pt': No space left on device$"):
        atomic_save({"w": torch.zeros(100_000)}, path)  # 400 kB on a 64 KiB disk
    with pytest.raises(WriteError, match="No space left on device"):
        atomic_write_text(tiny_tmpfs / "big.txt", "x" * 100_000)
    torch.testing.assert_close(load_checkpoint(path)["w"], torch.arange(10.0), rtol=0, atol=0)
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["ckpt.pt"]


# ------------------------------------------------------------------------------------------------ checkpoints
class Payload:
    """A custom class: ``torch.save`` pickles it, ``torch.load(weights_only=True)`` must refuse it."""

    def __init__(self) -> None:
        self.value = 1


PLAIN = r"it is not a plain tensor checkpoint \({}\); neuralign only loads tensor data$"


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: torch.save({"state": Payload()}, p),
         PLAIN.format(r"it holds the Python object tests\.test_utils\.Payload")),
        (lambda p: torch.save(Payload(), p, _use_new_zipfile_serialization=False),
         PLAIN.format(r"it holds the Python object tests\.test_utils\.Payload")),
        (lambda p: torch.save({"x": np.zeros(2)}, p), PLAIN.format(r"it holds the Python object numpy\..*")),
        (lambda p: p.write_bytes(b"not a checkpoint"),
         PLAIN.format(r"it is corrupt or holds other data than tensors: pickle opcode 110")),
        pytest.param(lambda p: p.write_bytes(pickle.dumps({"a": 1}, protocol=4)),
                     PLAIN.format(r"it is corrupt or holds other data than tensors: pickle opcode 149"),
                     marks=pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")),
        (lambda p: p.write_bytes(pickle.dumps({"a": 1}, protocol=2)),
         r"the file is corrupt or truncated \(Invalid magic number; corrupt file\?\)$"),
        (lambda p: p.write_bytes(b""), r"the file is empty or truncated$"),
        (lambda p: (torch.save({"w": torch.zeros(100)}, p), p.write_bytes(p.read_bytes()[:300])),
         r"the file is corrupt or truncated \(PytorchStreamReader failed reading zip archive: failed finding "
         r"central directory\)$"),
    ],
    ids=["custom-object", "legacy-pickle", "numpy-array", "bytes", "plain-pickle", "old-pickle", "empty",
         "truncated"],
)  # fmt: skip
def test_unreadable_checkpoints_are_refused_in_one_line_without_advice_to_unpickle(tmp_path, make, message):
    path = tmp_path / "file.pt"
    make(path)
    with pytest.raises(CheckpointError, match=r"^checkpoint '.*file\.pt' could not be read as data: " + message) as err:
        load_checkpoint(path)
    text = str(err.value)
    assert "\n" not in text and "weights_only" not in text and "add_safe_globals" not in text


def test_a_folder_or_a_missing_file_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=r"^checkpoint '.*' is not a file$"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"^checkpoint '.*missing\.pt' does not exist$"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_errors_are_one_line_whatever_they_are_given():
    assert str(CheckpointError("end point 'a.pt' does not fit:\n\tMissing key(s): 'w'.\n\n")) == (
        "end point 'a.pt' does not fit:; Missing key(s): 'w'."
    )


@pytest.mark.parametrize("keep", [10_000, 50_000])
def test_a_checkpoint_cut_short_is_called_corrupt_or_truncated(tmp_path, keep):
    from neuralign._utils import load_checkpoint

    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.arange(40_000, dtype=torch.float32)}, path)  # 160 kB of tensor data
    path.write_bytes(path.read_bytes()[:keep])  # cut inside the zip archive ("Invalid argument" before)
    with pytest.raises(CheckpointError, match=r"the file is (corrupt or truncated|empty or truncated)") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)

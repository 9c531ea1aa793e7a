"""Start-up: what ``import neuralign``, ``neuralign --version`` and a skipped rerun import, checked in fresh
processes by module name, never by time (``benchmarks/bench_startup.py`` times them)."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import neuralign
from neuralign.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
# slow to import, and needed by none of these start-ups (torch.hub imports tqdm, so tqdm goes with torch)
HEAVY = ("torchvision", "scipy", "cvxpy", "matplotlib", "tqdm", "torchdata", "safetensors")
LIBRARY = ("neuralign.alignment", "neuralign.curves", "neuralign.optim", "neuralign.verification", "neuralign.attacks")


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    code += "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def _packages(modules: set[str], names) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in names)


def test_import_neuralign_imports_neither_torch_nor_anything_heavy():
    modules = _modules_after("import neuralign\nassert neuralign.__version__")
    assert _packages(modules, ("torch", *HEAVY)) == []


def test_the_library_imports_torch_but_nothing_heavy():
    modules = _modules_after(f"import {', '.join(LIBRARY)}")
    assert "torch" in modules
    assert _packages(modules, [name for name in HEAVY if name != "tqdm"]) == []


def test_python_m_neuralign_version_answers_without_importing_torch():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "neuralign", "--version"], cwd=ROOT,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0 and done.stdout == f"neuralign {neuralign.__version__}\n"
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "neuralign.cli" in imported  # the listing is the real one
    assert _packages(imported, ("torch", *HEAVY)) == []


def test_version_answered_early_is_the_full_parsers_answer(capsys):
    for answer in (main, build_parser().parse_args):
        with pytest.raises(SystemExit) as info:
            answer(["--version", "train", "--bogus"])  # a leading --version wins over whatever follows
        assert info.value.code == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second == f"neuralign {neuralign.__version__}"


def test_command_modules_are_imported_only_when_their_command_runs():
    modules = _modules_after("import neuralign.cli.app")
    assert [m for m in modules if m.startswith("neuralign.cli.commands.")] == []


def test_every_public_name_resolves_lazily_to_its_home():
    checks = """
import importlib, neuralign
assert not any(m.startswith("neuralign.") for m in __import__("sys").modules if m != "neuralign._version")
from neuralign import align, fit_curve_pam, PAM, Status
from neuralign.alignment import align as home_align
from neuralign.curves import fit_curve_pam as home_fit
from neuralign.optim import PAM as home_pam
from neuralign.status import Status as home_status
assert (align, fit_curve_pam, PAM, Status) == (home_align, home_fit, home_pam, home_status)
star = {}
exec("from neuralign import *", star)
assert set(neuralign.__all__) <= set(star), set(neuralign.__all__) - set(star)
assert set(neuralign.__all__) <= set(dir(neuralign)), set(neuralign.__all__) - set(dir(neuralign))
import neuralign.curves
assert neuralign.curves.fit_curve is neuralign.fit_curve
assert neuralign.errors is importlib.import_module("neuralign.errors")
assert neuralign.optim.solve_qap is neuralign.solve_qap
"""
    _modules_after(checks)


def test_every_public_name_comes_from_its_home_module():
    for module, names in neuralign._EXPORTS.items():
        for name in names:
            assert getattr(neuralign, name) is getattr(importlib.import_module(module), name), name
    assert neuralign.__all__ == ["__version__", "errors", *(n for names in neuralign._EXPORTS.values() for n in names)]


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="module 'neuralign' has no attribute 'solve_everything'"):
        neuralign.solve_everything  # noqa: B018
    assert not hasattr(neuralign, "experiments_of_tomorrow")


def test_a_skipped_rerun_imports_nothing_heavy_that_parsing_does_not(tmp_path, capsys):
    argv = ["train", "--arch", "mlp", "--data", "digits", "--epochs", "1", "--out", str(tmp_path), "--quiet",
            "--train-size", "64", "--test-size", "64"]  # fmt: skip
    assert main(argv) == 0  # the finished result, made in this process
    capsys.readouterr()
    rerun = f"""
import contextlib, io, json, sys
import neuralign.cli.app as app
app.build_parser().parse_args({argv!r})
parsed = set(sys.modules)
err = io.StringIO()
with contextlib.redirect_stderr(err):
    assert app.main({argv!r}) == 0
assert "train already done" in err.getvalue(), err.getvalue()
print(json.dumps(sorted(set(sys.modules) - parsed)))
"""
    done = subprocess.run([sys.executable, "-c", rerun], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    after_parsing = set(json.loads(done.stdout.splitlines()[-1]))  # what the command imported before it skipped
    assert _packages(after_parsing, (*HEAVY, "networkx", "PIL", "sympy")) == []
    assert "torch._dynamo" not in after_parsing

"""The architecture contracts of `.importlinter` (run by `lint-imports` in CI) hold for neuralign, and the custom ones
(private names across packages, module size) catch what they exist to catch on a small package made to break them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e '.[dev]')")


def _lint(config: Path, *paths: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *map(str, paths)])}
    return subprocess.run([LINT, "--config", str(config)], cwd=ROOT, env=env, capture_output=True, text=True)


def test_the_contracts_of_neuralign_are_kept():
    run = _lint(ROOT / ".importlinter")
    assert run.returncode == 0, run.stdout[-3000:]
    assert "Contracts: 5 kept, 0 broken." in run.stdout


def _package(tmp_path: Path) -> Path:
    pkg = tmp_path / "toypkg"
    for sub in ("low", "high"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "impl.py").write_text("def _helper():\n    return 1\n\n\ndef public():\n    return 2\n")
    (pkg / "low" / "user.py").write_text("from toypkg.low.impl import _helper\n")  # same package: allowed
    (pkg / "high" / "cross.py").write_text("from toypkg.low.impl import _helper, public\n")  # across: refused
    (pkg / "high" / "big.py").write_text('"""A long module."""\n' + "x = 1\n" * 30)
    (pkg / "high" / "big_ok.py").write_text('"""A long module.\n\nWhy one module: a reason.\n"""\n' + "x = 1\n" * 30)
    return tmp_path


def test_the_custom_contracts_fail_where_they_should(tmp_path):
    path = _package(tmp_path)
    config = tmp_path / "contracts.ini"
    config.write_text("""[importlinter]
root_package = toypkg
contract_types =
    private_names: tools.contracts.PrivateNamesContract
    module_size: tools.contracts.ModuleSizeContract

[importlinter:contract:names]
name = names
type = private_names
root = toypkg

[importlinter:contract:size]
name = size
type = module_size
root = toypkg
max_lines = 20
reason_marker = Why one module
""")
    run = _lint(config, path)
    assert run.returncode == 1, run.stdout
    assert "toypkg.high.cross:1 imports _helper from toypkg.low.impl" in run.stdout
    assert "toypkg.low.user" not in run.stdout and "imports public" not in run.stdout
    assert "toypkg.high.big has 32 lines and no 'Why one module' paragraph" in run.stdout
    assert "big_ok" not in run.stdout
    assert "Contracts: 0 kept, 2 broken." in run.stdout

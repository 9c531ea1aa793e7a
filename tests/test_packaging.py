"""Packaging metadata: the licence file, SPDX licence string, project URLs; .gitignore covers the CLI's outputs."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_license_file_is_the_apache_2_text_and_pyproject_declares_it():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    meta = project["project"]
    assert meta["license"] == "Apache-2.0"  # SPDX expression (PEP 639), not the deprecated table
    assert "LICENSE" in meta["license-files"]
    for pattern in meta["license-files"]:
        assert (ROOT / pattern).is_file(), pattern
    assert any(r.startswith("setuptools>=77") for r in project["build-system"]["requires"])  # PEP 639 support
    assert meta["authors"] and meta["keywords"] and meta["classifiers"]
    assert meta["urls"]["Homepage"].startswith("https://")


def test_gitignore_covers_the_command_line_output_folders():
    lines = (ROOT / ".gitignore").read_text().splitlines()
    assert "neuralign-demo/" in lines and "runs/" in lines

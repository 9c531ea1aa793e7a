"""The README's code runs as written (the tour, on the shipped digits, and the solver snippet on QAPLIB)."""

import re
from pathlib import Path

from tests.conftest import shared_data

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_tour_runs(capsys):
    tour = _python_blocks()[0]
    exec(compile(tour, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Verification of an alignment" in out


def test_readme_solver_snippet_runs(monkeypatch, capsys):
    folder = shared_data("qaplib")
    monkeypatch.chdir(folder)
    exec(compile(_python_blocks()[1], "README.md", "exec"), {})
    assert float(capsys.readouterr().out.strip()) == 11156.0  # chr12c's known optimum

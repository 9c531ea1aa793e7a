"""The README's code runs as written (the tour, on the shipped digits, and the solver snippet on QAPLIB)."""

import re
from pathlib import Path

from tests.conftest import shared_data

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_tour_runs_and_shows_what_alignment_does(capsys):
    tour = _python_blocks()[0]
    exec(compile(tour, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Verification of an alignment" in out
    ends = [float(v) for v in re.findall(r"end point: ([\d.]+)% test accuracy", out)]
    assert len(ends) == 2 and min(ends) > 90  # trained end points, not the 10% of untrained ones
    corr = [(float(u), float(v)) for u, v in re.findall(r"matched units (-?[\d.]+) -> (-?[\d.]+)", out)]
    assert corr and all(after >= before for before, after in corr)  # the assignment maximises the correlation
    lines = dict(re.findall(r"(unaligned|aligned): straight line Min ([\d.]+)%", out))
    # the effect the toolkit exists for: the straight line between the aligned end points keeps far more accuracy
    assert float(lines["aligned"]) > float(lines["unaligned"]) + 10, lines


def test_readme_solver_snippet_runs_on_the_shipped_instance(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)  # nothing from the working folder or ../shared/data is needed
    exec(compile(_python_blocks()[1], "README.md", "exec"), {})
    assert float(capsys.readouterr().out.strip()) == 11156.0  # chr12c's known optimum


def test_shipped_qaplib_instances_are_the_shared_copies_byte_for_byte():
    from neuralign.optim import qaplib_path

    folder = shared_data("qaplib")
    for name in ("chr12c", "nug12"):
        for solution in (False, True):
            shipped = qaplib_path(name, solution=solution)
            assert shipped.read_bytes() == (folder / shipped.name).read_bytes()
    assert "Burkard" in (qaplib_path("chr12c").parent / "QAPLIB.md").read_text()


def test_readme_links_work_on_a_package_index_page():
    """PyPI renders the README without the repository: every link and image must be absolute."""
    targets = re.findall(r"\]\(([^)]+)\)", README.read_text())
    assert targets, "the README has no links to check"
    relative = [t for t in targets if not t.startswith(("https://", "http://", "#"))]
    assert relative == []

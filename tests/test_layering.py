"""The package's layering (STYLE.md): the library never imports `experiments`; `optim` knows nothing of neural
networks; only `_numpy.py` hands tensors to scipy / cvxpy."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "neuralign"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


LIBRARY = [p for sub in ("alignment", "optim", "curves", "verification") for p in (PACKAGE / sub).rglob("*.py")]


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_never_imports_experiments(path):
    assert not any(name.startswith("neuralign.experiments") for name in _imports(path))


@pytest.mark.parametrize("path", sorted((PACKAGE / "optim").rglob("*.py")), ids=lambda p: p.name)
def test_optim_knows_nothing_of_neural_networks(path):
    imports = _imports(path)
    assert not any(n.startswith(("neuralign.alignment", "neuralign.curves", "neuralign.verification")) for n in imports)
    assert "torch.nn" not in imports and "torch.func" not in imports


def test_only_one_module_calls_scipy_or_cvxpy():
    callers = sorted(
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if any(n.split(".")[0] in ("scipy", "cvxpy") for n in _imports(p))
    )
    assert callers == ["_numpy.py"]

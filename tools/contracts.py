"""Custom import-linter contracts of neuralign (registered in ``.importlinter``; run by ``lint-imports``).

- ``private_names``: no name starting with ``_`` is imported from a module of another package of ``neuralign``.
  The packages are the top-level subpackages (``optim``, ``alignment``, ``curves``, ``verification``,
  ``experiments``, ``study``, ``cli``) and the root modules (``neuralign._utils``, ``neuralign.attacks``, ...),
  which form one package of their own. Inside a package, modules may share private names.
- ``module_size``: a module longer than ``max_lines`` says at the top of its docstring why it is one module
  (a paragraph starting with ``reason_marker``, "Why one module").

Both read the source with :mod:`ast` (import-linter's graph knows modules, not the names imported from them).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from importlinter import Contract, ContractCheck, fields, output


def _package_root(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{name!r} is not an importable package")
    return Path(next(iter(spec.submodule_search_locations)))


def _modules(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _package_of(module: str, root_package: str, subpackages: set[str]) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in subpackages:
        return parts[1]
    return root_package


class PrivateNamesContract(Contract):
    """No private name (``_x``) imported across the packages of ``root`` (see the module documentation)."""

    type_name = "private_names"

    root = fields.StringField()

    def check(self, graph, verbose: bool) -> ContractCheck:  # noqa: ARG002 - the graph holds no names
        package = str(self.root)
        base = _package_root(package)
        modules = _modules(base, package)
        subpackages = {p.name for p in base.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
        violations = []
        for module, path in modules.items():
            importer = _package_of(module, package, subpackages)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.ImportFrom) or node.module is None or node.level:
                    continue
                if not (node.module == package or node.module.startswith(package + ".")):
                    continue
                imported = _package_of(node.module, package, subpackages)
                if imported == importer:
                    continue
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in modules:  # a module (private_modules checks those)
                        continue
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        violations.append(f"{module}:{node.lineno} imports {alias.name} from {node.module}")
        return ContractCheck(kept=not violations, metadata={"violations": violations})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["violations"]:
            output.print_error(f"- {line}", bold=False)
        output.new_line()


class ModuleSizeContract(Contract):
    """Every module of ``root`` over ``max_lines`` lines says why it is one module at the top of its docstring."""

    type_name = "module_size"

    root = fields.StringField()
    max_lines = fields.IntegerField(minimum=1)
    reason_marker = fields.StringField()

    def check(self, graph, verbose: bool) -> ContractCheck:  # noqa: ARG002
        package = str(self.root)
        violations = []
        for module, path in _modules(_package_root(package), package).items():
            text = path.read_text()
            lines = text.count("\n") + 1
            if lines <= int(self.max_lines):  # type: ignore[arg-type]
                continue
            doc = ast.get_docstring(ast.parse(text)) or ""
            if str(self.reason_marker) not in doc:
                violations.append(f"{module} has {lines} lines and no {self.reason_marker!r} paragraph")
        return ContractCheck(kept=not violations, metadata={"violations": violations})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["violations"]:
            output.print_error(f"- {line}", bold=False)
        output.new_line()

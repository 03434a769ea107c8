"""The package's layout: each method is one package over the shared core, and no module is too long to read."""
import ast
import pathlib

import pytest

import pydistill
from pydistill.trainers import TRAINERS

PACKAGE = pathlib.Path(pydistill.__file__).parent
# kernels/ ships as pydistill.kernels (setup.py), so it is held to the same cap
SOURCES = (PACKAGE, PACKAGE.parent / "kernels")
MAX_LINES = 400


def modules_over(limit: int, roots) -> dict:
    """Every .py file under ``roots`` with more than ``limit`` lines, with its line count."""
    found = {}
    for root in roots:
        for path in sorted(pathlib.Path(root).rglob("*.py")):
            count = len(path.read_text(encoding="utf-8").splitlines())
            if count > limit:
                found[str(path)] = count
    return found


def test_no_module_is_over_the_line_cap():
    scanned = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")]
    assert "trainers/core.py" in scanned and len(scanned) > 50  # the scan does see the package
    assert modules_over(MAX_LINES, SOURCES) == {}


def test_the_line_cap_reports_a_long_module(tmp_path):
    (tmp_path / "short.py").write_text("x = 1\n" * MAX_LINES)
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert modules_over(MAX_LINES, [tmp_path]) == {str(tmp_path / "nested" / "long.py"): MAX_LINES + 1}


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_each_method_is_one_package(name):
    config, trainer = TRAINERS[name]
    assert config.__module__ == f"pydistill.trainers.{name}.config"
    assert trainer.__module__ == f"pydistill.trainers.{name}.trainer"
    assert trainer.method == name


def _imported_modules(path: pathlib.Path) -> set:
    """Modules ``path`` imports, relative ones resolved against the pydistill.trainers package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ["pydistill", "trainers"][:3 - node.level] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_shared_core_imports_no_method():
    core = [p for p in (PACKAGE / "trainers").glob("*.py") if p.name != "__init__.py"]
    assert any(p.name == "core.py" for p in core)
    methods = tuple(f"pydistill.trainers.{name}" for name in TRAINERS)
    for path in core:
        reaching = sorted(m for m in _imported_modules(path) if m.startswith(methods))
        assert not reaching, f"{path.name} (shared core) imports a method package: {reaching}"

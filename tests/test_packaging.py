"""Packaging: the top-level kernels/ folder never shadows Hugging Face's `kernels`, the version is single-sourced,
the license file matches the declared license, and the extras declare every third-party import of their paths."""
import ast
import importlib.metadata
import pathlib
import subprocess
import sys
import tomllib

import pytest

import pydistill

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
DISTRIBUTION = PYPROJECT["project"]["name"]

IMPORTS = """
import kernels, transformers.integrations.hub_kernels, pydistill.kernels.folds, pydistill.integrations.trl
print(kernels.__file__)
print(pydistill.kernels.folds.__file__)
"""


@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_hugging_face_kernels_is_not_shadowed(where, tmp_path):
    pytest.importorskip("kernels")
    cwd = ROOT if where == "checkout" else tmp_path
    # -c puts the working directory first on sys.path, as `python -m` and pytest do from the checkout's root
    done = subprocess.run([sys.executable, "-c", IMPORTS], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    hf_kernels, folds = done.stdout.split()
    assert pathlib.Path(hf_kernels).resolve() == pathlib.Path(
        importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    assert pathlib.Path(folds).resolve() == ROOT / "kernels" / "folds.py"


def test_top_level_kernels_without_hugging_face_looks_like_a_plain_folder():
    """Where no other `kernels` is importable, `import kernels` from the checkout gives what a plain folder would:
    an empty module with no __file__ or __version__, which transformers' availability check (5.17 imports the
    module when the distribution has no metadata) reads as not installed."""
    code = (f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport kernels\n"
            "print(getattr(kernels, '__file__', None), getattr(kernels, '__version__', None), "
            "[n for n in dir(kernels) if not n.startswith('_')])\n")
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["None", "None", "[]"]


def test_version_is_single_sourced():
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pydistill.__version__"}
    assert importlib.metadata.version(DISTRIBUTION) == pydistill.__version__
    assert f"## {pydistill.__version__}" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")


def test_license_file_matches_the_declared_license():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert (ROOT / "pydistill" / "py.typed").exists()


def _requirement_names(requirements) -> set:
    from packaging.requirements import Requirement
    return {Requirement(r).name.lower().replace("_", "-") for r in requirements}


def _third_party_imports(paths) -> set:
    """Distributions that provide the top-level modules imported anywhere in ``paths`` (lazy imports included)."""
    providers = importlib.metadata.packages_distributions()
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in ("pydistill", "kernels"):
                    continue
                assert top in providers, f"{path}: no installed distribution provides {top!r}"
                found.update(name.lower().replace("_", "-") for name in providers[top])
    return found


@pytest.mark.parametrize("extra, folders", [
    (None, ["token_stats", "losses"]),
    ("trl", ["integrations"]),
    ("train", ["trainers", "tasks", "teachers", "cli.py", "models.py", "evaluation.py", "export.py", "plotting.py"]),
])
def test_extras_install_what_their_paths_import(extra, folders):
    package = ROOT / "pydistill"
    paths = [p for f in folders for p in ([package / f] if f.endswith(".py") else (package / f).rglob("*.py"))]
    if extra is None:
        paths += list((ROOT / "kernels").glob("*.py"))
    declared = _requirement_names(PYPROJECT["project"]["dependencies"])
    if extra:
        declared |= _requirement_names(PYPROJECT["project"]["optional-dependencies"][extra])
    missing = _third_party_imports(paths) - declared
    # transformers' own dependencies a path imports through it are declared by transformers (e.g. tokenizers)
    assert not missing, f"extra {extra!r} misses {sorted(missing)}"

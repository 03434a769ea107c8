"""pydistill's Triton kernels, installed and imported as ``pydistill.kernels`` (this folder never ships as ``kernels``).

From a checkout's root (``python -m ...``, pytest, an editable install) this folder sits first on ``sys.path``
and would shadow Hugging Face's ``kernels`` package, which transformers imports. Imported under that top-level
name, this module hands the import over to the installed ``kernels`` and never runs as itself; with none
installed it leaves what Python would have found for a plain folder: an empty namespace-like module (no
``__file__``, no ``__version__``), which transformers' availability check reads as "not installed".
"""
from __future__ import annotations

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _resolve(entry: str) -> str:
        return os.path.realpath(os.path.abspath(entry or os.getcwd()))

    _checkout = _resolve(os.path.dirname(os.path.dirname(__file__)))
    _elsewhere = [entry for entry in sys.path if isinstance(entry, str) and _resolve(entry) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    # The import system returns whatever sys.modules holds for the name once this file has run.
    if _spec is None or _spec.loader is None:
        _module = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("kernels", None, is_package=True))
        _module.__path__ = []
        sys.modules["kernels"] = _module
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)

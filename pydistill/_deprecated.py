"""Old names kept working for a release: each warns once, naming its replacement."""
from __future__ import annotations

import functools
import warnings

_warned: set = set()


def warn_once(old: str, new: str, stacklevel: int = 3) -> None:
    """A FutureWarning, the first time only, that ``old`` is renamed ``new``."""
    if old not in _warned:
        _warned.add(old)
        warnings.warn(f"{old} is renamed {new}; the old name will be removed in a later release", FutureWarning,
                      stacklevel=stacklevel + 1)


def renamed_keyword(old: str, new: str):
    """A decorator: a call that still passes the keyword ``old`` means ``new`` (warning once per function); both
    at once is a TypeError."""
    def decorate(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(f"{fn.__qualname__}() got both {new}= and its former name {old}=")
                warn_once(f"{fn.__qualname__}({old}=...)", f"{new}=...", stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return call
    return decorate


def renamed(module: str, name: str, renames: dict, namespace: dict):
    """The object behind the old ``module.name`` (``renames``: old name -> new name in ``namespace``), warning
    once; AttributeError for any other name (a module's ``__getattr__``)."""
    if name not in renames:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warn_once(f"{module}.{name}", renames[name], stacklevel=4)
    return namespace[renames[name]]

"""Typed config fields: help text in the field's metadata, parsing of YAML/flag values by the field's type, and
a type check of a built config. Every failure is one line naming the field, the value and what is expected.

Types understood: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]`` and ``Optional[...]`` of those (the
types :class:`transformers.HfArgumentParser` turns into flags).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal, Union  # noqa: F401  (Literal: re-exported for the config modules)

TRUE, FALSE = ("true", "yes", "y", "1", "on"), ("false", "no", "n", "0", "off")
NONE = ("none", "null", "~")


def option(default, help: str, **metadata):
    """A dataclass field with ``help`` for ``--help`` (read by HfArgumentParser)."""
    return dataclasses.field(default=default, metadata=dict(help=help, **metadata))


def _optional(annotation):
    if typing.get_origin(annotation) is Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0]
    return None


def describe(annotation) -> str:
    """What a field of this type expects, in words."""
    inner = _optional(annotation)
    if inner is not None:
        return f"{describe(inner)} or null"
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(annotation))
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
        annotation, str(annotation))


class FieldError(ValueError):
    def __init__(self, name, value, annotation):
        super().__init__(f"{name} must be {describe(annotation)}, got {value!r}")


def coerce(name: str, value, annotation, *, parse_text: bool = True):
    """``value`` as the field's type. With ``parse_text`` (YAML and flags) text is parsed ("1e-4", "false",
    "null"); without it (a config built in Python) only exact types pass (an int where a float is expected
    too)."""
    inner = _optional(annotation)
    if inner is not None:
        if value is None or (parse_text and isinstance(value, str) and value.strip().lower() in NONE):
            return None
        return coerce(name, value, inner, parse_text=parse_text)
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        if value in choices and not isinstance(value, bool):
            return value
        raise FieldError(name, value, annotation)
    text = value.strip() if parse_text and isinstance(value, str) else None
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text is not None:
            try:
                return int(text)
            except ValueError:
                try:
                    number = float(text)  # "1e3" (YAML reads it as text)
                except ValueError:
                    number = None
                if number is not None and number.is_integer():
                    return int(number)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
        elif text is not None:
            try:
                number = float(text)
            except ValueError:
                number = None
            if number is not None and math.isfinite(number):
                return number
    elif annotation is str:
        if isinstance(value, str):
            return value
        if parse_text and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `reward_weights: 1` in YAML
    else:
        return value
    raise FieldError(name, value, annotation)


def coerce_fields(cls, values: dict) -> dict:
    hints = typing.get_type_hints(cls)
    return {name: coerce(name, value, hints[name]) for name, value in values.items()}


def check_fields(config):
    """Every field of a built config holds a value of its type (no text for a bool, no nan for a float)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        coerce(f.name, getattr(config, f.name), hints[f.name], parse_text=False)

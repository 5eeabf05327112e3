"""Typed config sections: one TOML table → one dataclass, or a one-line :class:`CollapseError`.

:func:`from_table` builds a dataclass from a table (a ``dict`` as ``tomllib`` reads it) and
refuses, before anything runs or is written:

- an unknown key, naming the nearest valid one (``difflib.get_close_matches``):
  ``unknown key [eval] n_sample; did you mean n_samples?``;
- a value of the wrong type, read from the field's annotation: ``bool`` is not an ``int``, a
  string is not a list, ``Literal[...]`` lists the allowed words, ``X | None`` allows ``None``;
- NaN and ±inf for every float;
- a number outside the field's :class:`Range` (class attribute ``LIMITS``; for a list every item
  is checked), or an empty list where ``NON_EMPTY`` names the field.

A dataclass opts in with two optional class attributes, ``LIMITS: ClassVar[dict[str, Range]]``
and ``NON_EMPTY: ClassVar[tuple[str, ...]]``; ``CONFIG_KEYS`` restricts the keys a file may set
(the rest keep their defaults).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import CollapseError

T = TypeVar("T")

MAX_LIST_ITEMS = 10_000
MAX_TEXT_CHARS = 4_096


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval ``lo ≤ x ≤ hi`` (``lo_open``/``hi_open`` make it strict)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def __str__(self) -> str:
        if self.hi is None:
            return f"> {self.lo}" if self.lo_open else f">= {self.lo}"
        if self.lo is None:
            return f"< {self.hi}" if self.hi_open else f"<= {self.hi}"
        return f"{'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


def unknown_key_message(
    section: str, key: str, valid: Iterable[str], elsewhere: dict[str, Iterable[str]] | None = None
) -> str:
    """``unknown key [section] key; did you mean X?`` (the nearest valid name), else the nearest
    key of another section (``did you mean [probe] n_samples?``), else the valid list."""
    valid = sorted(valid)
    near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    if near:
        return f"unknown key [{section}] {key}; did you mean {near[0]}?"
    other = {f"[{name}] {k}": k for name, keys in (elsewhere or {}).items() for k in keys}
    near = difflib.get_close_matches(str(key), list(other.values()), n=1, cutoff=0.6)
    if near:
        where = next(label for label, k in other.items() if k == near[0])
        return f"unknown key [{section}] {key}; did you mean {where}?"
    return f"unknown key [{section}] {key}; valid keys: {', '.join(valid)}"


def suggest(word: str, valid: Iterable[str]) -> str:
    """``; did you mean X?`` for the nearest of ``valid``, or an empty string."""
    near = difflib.get_close_matches(str(word), list(valid), n=1, cutoff=0.6)
    return f"; did you mean {near[0]}?" if near else ""


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        plural = {int: "whole numbers", float: "numbers", str: "strings", bool: "true/false"}
        item = plural.get(args[0], _type_name(args[0])) if args else "values"
        return f"a list of {item}"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _coerce(value: Any, hint: Any, label: str) -> Any:
    """``value`` checked against the annotation ``hint``; ``label`` names it in the error."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        real = [o for o in options if o is not type(None)]
        if len(real) == 1:
            return _coerce(value, real[0], label)
        for option in real:
            try:
                return _coerce(value, option, label)
            except CollapseError:
                continue
        raise CollapseError(f"{label} = {value!r} must be {' or '.join(map(_type_name, real))}")
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed or isinstance(value, bool):
            raise CollapseError(
                f"{label} = {value!r} must be one of {', '.join(map(repr, allowed))}"
                + suggest(str(value), [str(a) for a in allowed])
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise CollapseError(f"{label} = {value!r} must be {_type_name(hint)}, e.g. [...]")
        if len(value) > MAX_LIST_ITEMS:
            raise CollapseError(f"{label} has {len(value)} items; at most {MAX_LIST_ITEMS}")
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        items = [_coerce(v, args[0], f"{label}[{i}]") for i, v in enumerate(value)] if args else []
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if not isinstance(value, bool):
            raise CollapseError(f"{label} = {value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CollapseError(f"{label} = {value!r} must be a whole number")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CollapseError(f"{label} = {value!r} must be a number")
        if not math.isfinite(value):
            raise CollapseError(f"{label} = {value!r} must be a finite number (not NaN or inf)")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise CollapseError(f"{label} = {value!r} must be a string")
        if len(value) > MAX_TEXT_CHARS:
            raise CollapseError(f"{label} is {len(value)} characters; at most {MAX_TEXT_CHARS}")
        return value
    raise TypeError(f"{label}: unsupported annotation {hint!r}")  # a programming error


def _check_range(value: Any, bounds: Range, label: str) -> None:
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_range(item, bounds, f"{label}[{i}]")
    elif isinstance(value, int | float) and not isinstance(value, bool) and value not in bounds:
        raise CollapseError(f"{label} = {value!r} must be in {bounds}")


def check_fields(obj: Any, label: str) -> None:
    """The checks :func:`from_table` makes on a table, made on the fields of a constructed
    dataclass ``obj`` (for its ``__post_init__``, so a config built in code, a job spec or a
    page is held to the same types and ``LIMITS``); errors read ``{label} {field} = ...``."""
    hints = typing.get_type_hints(type(obj))
    limits: dict[str, Range] = getattr(obj, "LIMITS", {})
    for f in dataclasses.fields(obj):
        value = _coerce(getattr(obj, f.name), hints[f.name], f"{label} {f.name}")
        if f.name in limits and value is not None:
            _check_range(value, limits[f.name], f"{label} {f.name}")


def config_keys(cls: type) -> tuple[str, ...]:
    """The keys a file may set for ``cls``: ``CONFIG_KEYS``, else every init field."""
    keys = getattr(cls, "CONFIG_KEYS", None)
    return tuple(keys) if keys else tuple(f.name for f in dataclasses.fields(cls) if f.init)


def from_table(
    cls: type[T],
    table: Any,
    section: str,
    where: str = "config",
    elsewhere: dict[str, Iterable[str]] | None = None,
) -> T:
    """``cls(**table)`` after the checks in the module docstring; errors start with ``where``.
    ``elsewhere`` (section → keys) lets a key typed in the wrong section point to the right one."""
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise CollapseError(f"{where}: [{section}] must be a table of key = value lines")
    keys = config_keys(cls)
    for key in table:
        if key not in keys:
            message = unknown_key_message(section, key, keys, elsewhere)
            raise CollapseError(f"{where}: {message}")
    hints = typing.get_type_hints(cls)
    limits: dict[str, Range] = getattr(cls, "LIMITS", {})
    non_empty: tuple[str, ...] = getattr(cls, "NON_EMPTY", ())
    values = {}
    for key, raw in table.items():
        label = f"[{section}] {key}"
        try:
            value = _coerce(raw, hints[key], label)
            if key in limits and value is not None:
                _check_range(value, limits[key], label)
            if key in non_empty and not value:
                raise CollapseError(f"{label} must not be empty")
        except CollapseError as err:
            raise CollapseError(f"{where}: {err}") from None
        values[key] = value
    return cls(**values)

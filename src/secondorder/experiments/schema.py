"""A small declarative schema for TOML tables: field types, defaults, choices and bounds.

Each key of a table is an :class:`F`; :func:`check_table` validates a table against a dict of
them, fills in defaults and reports every problem with its key path and, for a misspelt key or
choice, the closest valid one. :func:`kind_table` handles tables whose keys depend on their
``kind``. Nothing here knows what a spec contains (that is :mod:`.spec_tables`).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any

from secondorder._format import format_spec_value
from secondorder._validation import closest
from secondorder.errors import InvalidValueError

__all__ = [
    "MISSING",
    "TYPE_NAMES",
    "F",
    "RunDirError",
    "SpecError",
    "SpecNotFoundError",
    "SpecWarning",
    "MAX_DEPTH",
    "check_depth",
    "check_table",
    "check_value",
    "describe",
    "did_you_mean",
    "fmt_path",
    "kind_table",
    "slugify",
]


class SpecError(InvalidValueError):
    """A spec is invalid; ``errors`` lists every problem found (each names its key path)."""

    #: how the message starts; the subclasses below are about files, not the spec's content
    prefix = "invalid spec "

    def __init__(self, errors: list[str] | str, source: str = "") -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.errors) == 1:
            text = f"{self.prefix}{where}{self.errors[0]}"
        else:
            text = f"{self.prefix}{where}{len(self.errors)} problems:\n  " + "\n  ".join(
                self.errors
            )
        super().__init__(text)


class SpecNotFoundError(SpecError):
    """The spec named is neither a file nor a bundled spec."""

    prefix = ""


class RunDirError(SpecError):
    """A run directory cannot be used: it holds a run already, is not a directory, or is not
    writable."""

    prefix = ""


class SpecWarning(UserWarning):
    """A spec that is valid but probably not what was meant (a sweep whose points define the
    same problem, ``--quick`` on a spec without ``[quick]``)."""


MISSING = object()


@dataclass
class F:
    """One key of a table: its type, default and constraints."""

    type: str  # str int float bool list[str] list[int] list[float] list[any] table any
    default: Any = MISSING
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    exclusive_min: bool = False
    doc: str = ""
    required: bool = False


TYPE_NAMES = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "list[str]": "a list of strings",
    "list[int]": "a list of integers",
    "list[float]": "a list of numbers",
    "list[any]": "a list",
    "table": "a table",
    "any": "a value",
}


def fmt_path(path: str, key: str) -> str:
    k = key if re.fullmatch(r"[A-Za-z0-9_\-]+", key) else f'"{key}"'
    return f"{path}.{k}" if path else k


#: how deeply a spec may nest tables and lists (the bundled specs need 5)
MAX_DEPTH = 32


def check_depth(value: Any, where: str = "", limit: int = MAX_DEPTH) -> None:
    """Refuse a value that nests tables and lists more than ``limit`` deep, naming the key
    path where it does; the walk is iterative, so no depth makes it fail otherwise."""
    stack: list[tuple[Any, str, int]] = [(value, where, 1)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, dict):
            children = [(fmt_path(path, str(k)), x) for k, x in v.items()]
        elif isinstance(v, (list, tuple)):
            children = [(f"{path}[{i}]", x) for i, x in enumerate(v)]
        else:
            continue
        if depth > limit:
            shown = path if len(path) <= 60 else path[:60] + "…"
            raise SpecError(
                f"{shown or 'spec'}: nested deeper than {limit} levels of tables and lists "
                "(a spec needs a few); flatten it"
            )
        stack.extend((x, p, depth + 1) for p, x in children)


def type_ok(value: Any, t: str) -> bool:
    if t == "any":
        return True
    if t == "str":
        return isinstance(value, str)
    if t == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "bool":
        return isinstance(value, bool)
    if t == "table":
        return isinstance(value, dict)
    if t.startswith("list["):
        if not isinstance(value, list):
            return False
        return all(type_ok(v, t[5:-1]) for v in value)
    raise AssertionError(t)


def describe(value: Any) -> str:
    """What a TOML value is: ``'ten'`` → ``"str ('ten')"``, a list or a table in words."""
    if isinstance(value, dict):
        return "a table"
    kind = "a list" if isinstance(value, list) else type(value).__name__
    return f"{kind} ({value!r})"


def _type_error(value: Any, f: F) -> str:
    """Why ``value`` is not of type ``f.type`` (for a list, which item is wrong)."""
    if f.type.startswith("list[") and isinstance(value, list):
        i, bad = next((i, v) for i, v in enumerate(value) if not type_ok(v, f.type[5:-1]))
        return f"expected {TYPE_NAMES[f.type]}, but item {i} is {describe(bad)}"
    return f"expected {TYPE_NAMES[f.type]}, got {describe(value)}"


def check_value(value: Any, f: F, where: str, errors: list[str]) -> Any:
    """``value`` checked against ``f`` (problems appended to ``errors``, each starting with
    ``where``); :data:`MISSING` when its type is wrong, so that no later check sees it."""
    if not type_ok(value, f.type):
        errors.append(f"{where}: {_type_error(value, f)}")
        return MISSING
    if f.type == "float":
        value = float(value)
        if not math.isfinite(value):
            errors.append(f"{where}: expected a finite number, got {value!r}")
    if f.type == "list[float]":
        value = [float(v) for v in value]
    if f.choices is not None:
        items = value if f.type.startswith("list[") else [value]
        for v in items:
            if v not in f.choices:
                errors.append(
                    f"{where}: {v!r} is not one of {list(f.choices)}{closest(str(v), f.choices)}"
                )
    if f.minimum is not None:
        items = value if f.type.startswith("list[") else [value]
        for v in items:
            if isinstance(v, (int, float)) and (
                v < f.minimum or (f.exclusive_min and v == f.minimum)
            ):
                op = ">" if f.exclusive_min else ">="
                errors.append(f"{where}: must be {op} {format_spec_value(f.minimum)}, got {v!r}")
    return value


def check_table(
    table: Any,
    schema: dict[str, F],
    path: str,
    errors: list[str],
    *,
    other_keys: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Validate ``table`` against ``schema``; fill defaults; report unknown keys with hints.

    ``other_keys`` maps keys valid elsewhere (e.g. for another ``kind``) to a note."""
    if not isinstance(table, dict):
        errors.append(f"{path or 'spec'}: expected a table, got {describe(table)}")
        return {}
    out: dict[str, Any] = {}
    for key, value in table.items():
        where = fmt_path(path, key)
        if key not in schema:
            if other_keys and key in other_keys:
                errors.append(f"{where}: {other_keys[key]}")
            else:
                errors.append(f"{where}: unknown key{did_you_mean(key, schema)}")
            continue
        checked = check_value(value, schema[key], where, errors)
        if checked is not MISSING:
            out[key] = checked
    for key, f in schema.items():
        if key in out:
            continue
        if key in table and f.default is MISSING:
            continue  # given with a wrong type: reported above, not missing
        if f.required:
            errors.append(f"{fmt_path(path, key)}: missing (required)")
        elif f.default is not MISSING:
            out[key] = copy.deepcopy(f.default)
    return out


def did_you_mean(key: str, choices) -> str:
    hint = closest(key, list(choices))
    return f"; did you mean {hint[len(' (did you mean ') : -2]}?" if hint else ""


def kind_table(
    value: Any,
    common: dict[str, F],
    by_kind: dict[str, dict[str, F]],
    path: str,
    errors: list[str],
    default_kind: str | None = None,
) -> dict[str, Any]:
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a table, got {describe(value)}")
        return {}
    kind = value.get("kind", default_kind)
    if kind is None:
        errors.append(f"{path}.kind: missing (required): one of {list(by_kind)}")
        return {}
    if not isinstance(kind, str) or kind not in by_kind:
        checked = check_value(kind, common["kind"], f"{path}.kind", errors)
        return {} if checked is MISSING else {"kind": kind}
    schema = {**common, **by_kind[kind]}
    others = {}
    for other, sch in by_kind.items():
        for k in sch:
            if k not in schema and k not in others:
                others[k] = f"not used by kind {kind!r} (it belongs to kind {other!r})"
    return check_table(value, schema, path, errors, other_keys=others)


def slugify(text: str) -> str:
    """A file-name-safe version of a label: ``"Newton (LS)"`` → ``"newton-ls"``."""
    s = re.sub(r"[^A-Za-z0-9.=+_-]+", "-", str(text)).strip("-").lower()
    return s or "x"

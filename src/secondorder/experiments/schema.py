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

from secondorder._validation import closest

__all__ = [
    "MISSING",
    "TYPE_NAMES",
    "F",
    "SpecError",
    "check_table",
    "check_value",
    "did_you_mean",
    "fmt_path",
    "kind_table",
    "slugify",
]


class SpecError(ValueError):
    """A spec is invalid; ``errors`` lists every problem found (each names its key path)."""

    def __init__(self, errors: list[str] | str, source: str = "") -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.errors) == 1:
            text = f"invalid spec {where}{self.errors[0]}"
        else:
            text = f"invalid spec {where}{len(self.errors)} problems:\n  " + "\n  ".join(
                self.errors
            )
        super().__init__(text)


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


def check_value(value: Any, f: F, where: str, errors: list[str]) -> Any:
    if not type_ok(value, f.type):
        got = type(value).__name__
        if isinstance(value, dict):
            got = "a table"
        elif isinstance(value, list):
            got = "a list" if not f.type.startswith("list[") else "a list with other items"
        errors.append(f"{where}: expected {TYPE_NAMES[f.type]}, got {got} ({value!r})")
        return value
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
                errors.append(f"{where}: must be {op} {f.minimum:g}, got {v!r}")
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
        errors.append(f"{path or 'spec'}: expected a table, got {type(table).__name__}")
        return {}
    out: dict[str, Any] = {}
    wrong_type: set[str] = set()
    for key, value in table.items():
        where = fmt_path(path, key)
        if key not in schema:
            if other_keys and key in other_keys:
                errors.append(f"{where}: {other_keys[key]}")
            else:
                errors.append(f"{where}: unknown key{did_you_mean(key, schema)}")
            continue
        checked = check_value(value, schema[key], where, errors)
        if type_ok(value, schema[key].type):
            out[key] = checked
        else:  # reported; later checks see the default (or nothing), never the bad value
            wrong_type.add(key)
    for key, f in schema.items():
        if key in out or (key in wrong_type and f.default is MISSING):
            continue
        if f.required and key not in wrong_type:
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
        errors.append(f"{path}: expected a table, got {type(value).__name__}")
        return {}
    kind = value.get("kind", default_kind)
    if kind is None:
        errors.append(f"{path}.kind: missing (required): one of {list(by_kind)}")
        return {}
    if not isinstance(kind, str) or kind not in by_kind:  # a list or table is unhashable
        check_value(kind, common["kind"], f"{path}.kind", errors)
        return {"kind": kind} if isinstance(kind, str) else {}
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

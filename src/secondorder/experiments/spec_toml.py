"""Spec files as TOML: reading them (:func:`read_toml`) and writing the resolved spec that a
run directory keeps (:func:`to_toml`, read back by ``secondorder resume``)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from secondorder.experiments.schema import MAX_DEPTH, SpecError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = ["TOO_DEEP", "read_toml", "to_toml", "tomllib"]


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; :class:`SpecError` when it is not valid TOML."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"not valid TOML: {err}", str(path)) from None
    except UnicodeDecodeError as err:  # TOML is UTF-8 text: a binary or mis-encoded file
        raise SpecError(
            f"not a UTF-8 text file, so not TOML (byte {err.start}: {err.reason})", str(path)
        ) from None
    except RecursionError:  # the parser recurses once per level of arrays and tables
        raise SpecError(TOO_DEEP, str(path)) from None


#: why a TOML text too deeply nested to parse is refused
TOO_DEEP = (
    "arrays or tables nested too deeply to read (a spec needs a few levels; at most "
    f"{MAX_DEPTH} are accepted)"
)


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_\-]+", k) else _toml_str(k)


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items())
        return "{" + inner + "}" if inner else "{}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def to_toml(data: dict[str, Any], _prefix: str = "") -> str:
    """Serialise a spec dict (scalars, lists, tables, arrays of tables) as TOML."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for k, v in data.items():
        if v is None:
            continue
        if isinstance(v, dict) and not v:
            lines.append(f"{_toml_key(k)} = {{}}")
        elif isinstance(v, dict) or _is_table_array(v):
            tables.append((k, v))
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    out = "\n".join(lines)
    for k, v in tables:
        name = f"{_prefix}.{_toml_key(k)}" if _prefix else _toml_key(k)
        if isinstance(v, dict):
            out += f"\n\n[{name}]\n{to_toml(v, name)}"
        else:
            for item in v:
                out += f"\n\n[[{name}]]\n{to_toml(item, name)}"
    return out.strip("\n") + ("\n" if not _prefix else "")

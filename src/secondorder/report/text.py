"""Text of a report: one formatter for every value shown, and Markdown tables.

Numbers go through :func:`secondorder._format.format_number` (``digits`` significant digits,
scientific below 10⁻³ and from 10⁶, ``inf`` / ``nan`` as such), the formatter the run log and
the solvers' messages use too, so a value reads the same wherever it is printed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from secondorder._format import format_number, format_pm, format_spec_value

__all__ = [
    "drop_empty_columns",
    "format_number",
    "format_pm",
    "md_table",
    "published",
    "show",
    "value_label",
]


def show(v: Any, digits: int = 4) -> str:
    """A table cell: None as "—", numbers with ``digits`` significant digits (scientific
    when tiny or huge), booleans as yes / no; ``|`` escaped."""
    if v is None:
        return "—"
    if isinstance(v, (bool, int, float)):
        return format_number(v, digits)
    return str(v).replace("|", "\\|")


def published(v: float | int | None) -> str:
    """A published number as the study prints it (``0.83``, ``411.9``), "—" when absent."""
    return "—" if v is None else format_spec_value(v)


def value_label(v: Any) -> str:
    """A spec value as a reader writes it: ``0.01``, ``[300, 100]``, ``per-sample``."""
    if isinstance(v, list):
        return "[" + ", ".join(value_label(x) for x in v) + "]"
    if isinstance(v, float):
        return format_spec_value(v)
    return str(v)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    if not rows:
        return "_(no rows)_\n"
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines) + "\n"


def drop_empty_columns(header: list[str], rows: list[list[str]], keep: int = 3):
    cols = [i for i in range(len(header)) if i < keep or any(r[i] not in ("—", "") for r in rows)]
    return [header[i] for i in cols], [[r[i] for i in cols] for r in rows]

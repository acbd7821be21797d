"""Text of a report: one formatter for every value shown, and Markdown tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["drop_empty_columns", "md_table", "show", "value_label"]


def show(v: Any, digits: int = 4) -> str:
    """A table cell: None as "—", floats with ``digits`` decimals (scientific when tiny or
    huge), booleans as yes / no; ``|`` escaped."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 10 ** (-digits) or abs(v) >= 1e6):
            return f"{v:.{max(1, digits - 1)}e}"
        return f"{v:.{digits}f}"
    return str(v).replace("|", "\\|")


def value_label(v: Any) -> str:
    """A spec value as a reader writes it: ``0.01``, ``[300, 100]``, ``per-sample``."""
    if isinstance(v, list):
        return "[" + ", ".join(value_label(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
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

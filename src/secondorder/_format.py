"""The one number formatter of every user-facing text: reports, run logs, messages.

It lives at the low level so that the core's messages and the run log can use it;
:mod:`secondorder.report.text` is its face for the report's tables (``show``).

``format_number(v, digits)`` writes a float with ``digits`` significant digits, in fixed
notation between 10⁻³ and 10⁶ and in scientific notation outside (so 4.97e-06 never prints as
0.0000, and a diverged 1e112 never as a 113-digit integer); ``inf``, ``-inf`` and ``nan`` as
such. Integers print in full below 10¹⁵ and scientifically above.
"""

from __future__ import annotations

import math

__all__ = ["format_number", "format_pm", "format_spec_value"]

#: below this magnitude (and above :data:`_LARGE`) numbers are written scientifically
_SMALL = 1e-3
_LARGE = 1e6
_LARGE_INT = 10**15


def format_number(v: float | int, digits: int = 4) -> str:
    """``v`` with ``digits`` significant digits: fixed notation for 10⁻³ ≤ |v| < 10⁶,
    scientific outside, ``0`` for zero, ``inf`` / ``-inf`` / ``nan`` for non-finite values."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    digits = max(1, int(digits))
    if isinstance(v, int):
        return str(v) if abs(v) < _LARGE_INT else f"{v:.{max(0, digits - 1)}e}"
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    if v == 0:
        return "0"
    mag = abs(v)
    if mag < _SMALL or mag >= _LARGE:
        return f"{v:.{max(0, digits - 1)}e}"
    decimals = max(0, digits - 1 - math.floor(math.log10(mag)))
    text = f"{v:.{decimals}f}"
    if abs(float(text)) >= _LARGE:  # 999999.6 rounds up to 1000000
        return f"{v:.{max(0, digits - 1)}e}"
    return text


def format_pm(mean: float, sd: float, digits: int = 4) -> str:
    """``mean ± sd``, the deviation with two significant digits (scientific where tiny)."""
    return f"{format_number(mean, digits)} ± {format_number(sd, 2)}"


def format_spec_value(v: float | int) -> str:
    """A value a user wrote (a spec entry, an option): the shortest text that reads back as
    the same float (``0.01``, ``1e-10``, ``60000``), scientific where it is long."""
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    if v.is_integer() and abs(v) < _LARGE_INT:
        text = str(int(v))
        return text if len(text) <= 7 else f"{v:g}" if float(f"{v:g}") == v else repr(v)
    return f"{v:g}" if float(f"{v:g}") == v else repr(v)

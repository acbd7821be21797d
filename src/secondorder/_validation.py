"""Argument checks shared by every module: errors name the argument and what was expected."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any


def closest(name: str, choices: Iterable[str]) -> str:
    """Return a ' (did you mean 'x'?)' hint for a misspelt ``name``, or ''."""
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_choice(arg: str, value: Any, choices: Iterable[str]) -> str:
    """Check that ``value`` is one of ``choices``; the error suggests the closest name."""
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"{arg}={value!r} is not one of {sorted(choices)}{closest(str(value), choices)}"
        )
    return value


def check_positive(arg: str, value: Any, *, allow_zero: bool = False) -> float:
    """Check that ``value`` is a finite real number > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{arg} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{arg} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_positive_int(arg: str, value: Any, *, allow_zero: bool = False) -> int:
    """Check that ``value`` is an integer > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(f"{arg} must be an integer, got {type(value).__name__}") from None
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{arg} must be an integer {bound}, got {value}")
    return value

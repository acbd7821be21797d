"""How the report's figures tell series apart: the palette, a style per series index that
does not repeat for 80 series, and :class:`Distinct` for series whose data coincide."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Distinct", "colour", "series_style"]

_PALETTE = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
]
_LINESTYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<"]


def colour(i: int) -> str:
    """The i-th colour of the report palette (solvers keep their colour across figures)."""
    return _PALETTE[i % len(_PALETTE)]


def series_style(i: int) -> dict[str, str]:
    """Colour, line style and marker of the i-th series: the colour cycles every ten, the line
    style and marker change with each cycle, so no two of the first 80 series look alike."""
    cycle = i // len(_PALETTE)
    return {
        "color": colour(i),
        "ls": _LINESTYLES[cycle % len(_LINESTYLES)],
        "marker": _MARKERS[cycle % len(_MARKERS)],
    }


class Distinct:
    """Keeps series with identical data distinguishable on one axes: the first is drawn as
    asked; each later one with the same (x, y) values gets a dashed or dotted line, a hollow
    marker of another shape placed between the earlier one's markers, and is drawn on top, so
    both lines and both legend entries stay visible."""

    _STYLES = ("--", ":", "-.")
    _MARKS = ("s", "^", "D", "v")

    def __init__(self) -> None:
        self._seen: list[tuple[np.ndarray, np.ndarray]] = []

    def style(self, xs: Sequence[float], ys: Sequence[float]) -> dict[str, Any]:
        """Extra keyword arguments of ``Axes.plot`` for this series ({} for a new one)."""
        x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        n = sum(
            1
            for a, b in self._seen
            if a.shape == x.shape and np.allclose(a, x, rtol=1e-6) and np.allclose(b, y, rtol=1e-6)
        )
        self._seen.append((x, y))
        if n == 0:
            return {}
        every = max(1, len(x) // 12)
        return {
            "ls": self._STYLES[(n - 1) % len(self._STYLES)],
            "marker": self._MARKS[(n - 1) % len(self._MARKS)],
            "markevery": (min(len(x) - 1, (every * n) // 2), every) if len(x) > 1 else None,
            "mfc": "none",
            "ms": 6,
            "lw": 1.2,
            "zorder": 3 + n,
        }

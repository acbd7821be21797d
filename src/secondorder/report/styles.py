"""How the report's figures tell series apart: the palette, a style per series index that
does not repeat for 80 series, :class:`Distinct` for series whose data coincide, and
:func:`series_styles` for many series named by two labels (a solver and a setting: colour by
one, line style by the other, one legend entry per colour and per line style)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DASHES", "Distinct", "SeriesStyles", "colour", "series_style", "series_styles"]

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


#: line styles told apart at a glance, for the groups of series a legend names
DASHES: list[Any] = [
    "-",
    "--",
    ":",
    "-.",
    (0, (8, 3)),
    (0, (6, 2, 1, 2, 1, 2)),
    (0, (1, 4)),
    (0, (4, 1, 1, 1)),
]


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


@dataclass(frozen=True)
class SeriesStyles:
    """The colour, line style and marker of every series of a figure (``styles``), and, when
    they are grouped, each series' two labels (``keys``: the label its colour stands for and
    the one its line style stands for) with the titles of the two legend groups."""

    styles: list[dict[str, Any]]
    keys: list[tuple[str, str]] | None = None
    titles: tuple[str, str] = ("", "")

    @property
    def grouped(self) -> bool:
        return self.keys is not None

    def legend_groups(self, drawn: Sequence[int]) -> list[tuple[str, list[tuple[str, dict]]]]:
        """(title, [(label, plot keyword arguments of its legend line)]) of the colours and of
        the line styles the series ``drawn`` (indices) use, in order of first use; [] when the
        styles are not grouped (each series then has a legend entry of its own)."""
        if self.keys is None:
            return []
        colours: dict[str, dict] = {}
        dashes: dict[str, dict] = {}
        for i in drawn:
            c_label, d_label = self.keys[i]
            sty = self.styles[i]
            colours.setdefault(c_label, {"color": sty["color"], "ls": "-", "lw": 2})
            dashes.setdefault(
                d_label, {"color": "0.25", "ls": sty["ls"], "marker": sty["marker"], "lw": 1.5}
            )
        groups = [(self.titles[0], list(colours.items()))]
        if len(dashes) > 1 or self.titles[1]:
            groups.append((self.titles[1], list(dashes.items())))
        return groups


def series_styles(
    labels: Sequence[tuple[str, str]], titles: tuple[str, str] = ("", "")
) -> SeriesStyles:
    """Styles of series each named by two labels, ``(a, b)`` (a solver and a setting).

    When the first labels fit the palette and the second the line styles (:data:`DASHES`), a
    series' colour stands for its first label and its line style (and marker) for its second
    — or the other way round when only that fits — so that 7 solvers × 7 settings need 14
    legend entries, not 49. Otherwise every series gets its own colour and line style: the
    colour cycles every ten series and the line style changes with each cycle, so the first
    80 series never repeat a combination."""
    firsts = list(dict.fromkeys(a for a, _ in labels))
    seconds = list(dict.fromkeys(b for _, b in labels))

    def fit(for_colour: list[str], for_dash: list[str]) -> bool:
        return len(for_colour) <= len(_PALETTE) and len(for_dash) <= len(DASHES)

    unique = len(set(labels)) == len(labels)
    two = len(firsts) > 1 and len(seconds) > 1
    if unique and two and (fit(firsts, seconds) or fit(seconds, firsts)):
        c, d = (0, 1) if fit(firsts, seconds) else (1, 0)
        order = (firsts, seconds)
        keys = [(pair[c], pair[d]) for pair in labels]
        styles = [
            {
                "color": colour(order[c].index(ck)),
                "ls": DASHES[order[d].index(dk)],
                "marker": _MARKERS[order[d].index(dk) % len(_MARKERS)],
            }
            for ck, dk in keys
        ]
        return SeriesStyles(styles, keys, (titles[c], titles[d]))
    styles = [
        {
            "color": colour(i),
            "ls": DASHES[(i // len(_PALETTE)) % len(DASHES)],
            "marker": _MARKERS[(i // len(_PALETTE)) % len(_MARKERS)],
        }
        for i in range(len(labels))
    ]
    return SeriesStyles(styles)


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

"""Figures of runs, drawn with Matplotlib's Agg canvas (no display, no pyplot state).

Each function takes *series* — ``(label, SolverRun, colour)`` triples read from run
directories — and writes one figure file (PNG or SVG, by the path's suffix):

- :func:`loss_figure`: loss (or f − f*) against iteration and against solver time, and ‖∇f‖∞
  against iteration (log-y by default);
- :func:`accuracy_figure`: train / dev / test accuracy (eq. 30) against iteration (one panel per
  split when the caller sets the series' styles, :class:`~secondorder.report.styles.SeriesStyles`);
- :func:`paths_figure`: iterates in the (x, y) plane over log-spaced contours of a 2-D function
  (Rosenbrock, eq. 6);
- :func:`sweep_figure`: final train loss and test accuracy against a swept spec value, one curve
  per solver.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from secondorder.experiments.io import atomic_write
from secondorder.report.rundata import SolverRun
from secondorder.report.styles import (
    _MARKERS,
    _PALETTE,
    Distinct,
    SeriesStyles,
    colour,
    series_style,
)
from secondorder.report.text import value_label

__all__ = [
    "CLIP",
    "Distinct",
    "accuracy_figure",
    "colour",
    "legend",
    "loss_figure",
    "paths_figure",
    "save",
    "series_style",
    "sweep_figure",
]

Series = tuple[str, SolverRun, Any]
#: values at or below this are drawn at it on a log axis of f − f*
CLIP = 1e-16


def _figure(ncols: int, nrows: int = 1, width: float = 5.2, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _cope_with_empty_axes(fig: Figure) -> None:
    """Panels of empty or one-point traces (``max_iter = 0``, a solver that failed at once):
    a log axis with no positive value becomes linear, and a panel with nothing drawn says
    so, instead of failing to draw."""
    for ax in fig.axes:
        limits = {"x": ax.dataLim.intervalx, "y": ax.dataLim.intervaly}
        for name, (_, hi) in limits.items():
            scale = ax.get_xscale() if name == "x" else ax.get_yscale()
            if scale == "log" and not (math.isfinite(hi) and hi > 0):
                with warnings.catch_warnings():  # the log axis's own note on leaving it
                    warnings.simplefilter("ignore", UserWarning)
                    (ax.set_xscale if name == "x" else ax.set_yscale)("linear")
        drawn = any(len(line.get_xdata()) for line in ax.lines) or bool(
            ax.collections or ax.patches or ax.images
        )
        if not drawn and ax.get_visible() and ax.axison:
            ax.text(
                0.5,
                0.5,
                "nothing to show\n(no iterations recorded)",
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="0.4",
                fontsize=9,
            )


def legend(ax, **kwargs: Any) -> None:
    """The panel's legend, when something labelled was drawn on it (an empty trace draws
    nothing, and Matplotlib warns about a legend of nothing)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def save(fig: Figure, path: str | Path) -> Path:
    """Write the figure (format from the suffix) atomically and return the path; panels
    without data are drawn empty and labelled so (see :func:`_cope_with_empty_axes`)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    _cope_with_empty_axes(fig)
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=110), binary=True)
    return path


#: more series than this share one legend below the panels instead of one inside each
_INLINE_LEGEND_MAX = 8


def _legend_rows(n_series: int, ncol: int) -> int:
    return 0 if n_series <= _INLINE_LEGEND_MAX else -(-n_series // ncol)


def _legend_width(series: Sequence[Series], ncol: int) -> float:
    """Inches a shared legend of these labels needs at font size 8 (about 0.06 in a char)."""
    longest = max((len(label) for label, _, _ in series), default=0)
    return ncol * (0.06 * longest + 0.6)


def _shared_legend(fig: Figure, ax, ncol: int) -> None:
    """One legend under the panels, for figures with many series (a comparison of runs)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=8)


def _marker(n: int) -> str | None:
    return "o" if n <= 25 else None


def _time_key(s: SolverRun) -> str:
    for key in ("solver_time", "time"):
        if any(key in r for r in s.rows):
            return key
    return "time"


def _loss_key(s: SolverRun) -> str:
    return "train_loss" if any("train_loss" in r for r in s.rows) else "f"


def _positive(values: Sequence[float], floor: float) -> list[float]:
    return [max(v, floor) for v in values]


def _iteration_axis(axes, series: Sequence[Series]) -> str:
    """A symmetric-log iteration axis (linear to 10, logarithmic beyond) when one solver stops
    within the first twentieth of another's iterations, so that a solver done in 18 of 2000
    iterations is not a vertical line; returns the axis label."""
    lasts = [max((r.get("k", 0) for r in s.rows), default=0) for _, s, _ in series if s.rows]
    if not lasts or max(lasts) < 200 or min(lasts) * 20 > max(lasts):
        for ax in axes:  # iterations are whole numbers: no 2.5, 7.5 ticks on short runs
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return "iteration k"
    for ax in axes:
        ax.set_xscale("symlog", linthresh=10, linscale=0.6)
        ax.set_xlim(left=0)
    return "iteration k (linear to 10, logarithmic beyond)"


def _gradient_axes(ax, xlabel: str) -> None:
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("‖∇f‖∞ of the solver's objective")
    ax.set_title("gradient norm vs iteration")
    ax.grid(True, which="both", alpha=0.3)


def _excess(values: Sequence[float], f_star: float | None, log_y: bool) -> tuple[list[float], bool]:
    """What the loss panels draw (f − f* floored at :data:`CLIP`, or the loss) and whether
    any value was floored."""
    if f_star is None:
        return (_positive(values, 1e-300) if log_y else list(values)), False
    d = [v - f_star for v in values]
    return _positive(d, CLIP), any(v <= CLIP for v in d)


def loss_figure(
    series: Sequence[Series],
    path: str | Path,
    *,
    title: str = "",
    f_star: float | None = None,
    log_y: bool = True,
    show_objective: bool = False,
    styles: SeriesStyles | None = None,
) -> Path:
    """Loss vs iteration, loss vs solver time, ‖∇f‖∞ vs iteration.

    The loss is the full training loss when recorded (else the objective f); with ``f_star``
    the panels show f − f*, floored at :data:`CLIP` for the log scale (a dotted line and the
    legend say so when a value was). Every time axis starts at the first recorded iterate.
    ``show_objective`` adds the sampled objective f as a faint dotted line where it differs
    from the training loss. Series with identical data stay distinguishable (:class:`Distinct`).
    ``styles`` sets each series' colour, line style and marker (the colours of ``series`` are
    then ignored) and puts the legend under the panels, grouped when the styles are.
    """
    if styles is not None:
        rows, width = _outside_legend_size(series, styles, 3)
    else:
        rows = _legend_rows(len(series), 3)
        width = 5.2 if not rows else max(5.2, _legend_width(series, 3) / 3)
    fig = _figure(3, width=width, height=4.0 + 0.2 * rows)
    ax_it, ax_t, ax_g = fig.subplots(1, 3)
    any_time = clipped = False
    apart = {ax: Distinct() for ax in (ax_it, ax_t, ax_g)}
    drawn: list[int] = []
    for i, (label, s, c) in enumerate(series):
        sty = styles.styles[i] if styles is not None else series_style(i)
        if styles is not None:
            c = sty["color"]
            label = "_nolegend_" if styles.grouped else label
        base = {"color": c, "ls": sty["ls"], "label": label, "ms": 3, "lw": 1.5}
        key = _loss_key(s)
        ks, vs = s.column(key)
        if not ks:
            continue
        drawn.append(i)
        vs, cl = _excess(vs, f_star, log_y)
        clipped |= cl
        mk = _marker(len(ks)) and sty["marker"]
        ax_it.plot(ks, vs, **{**base, "marker": mk, **apart[ax_it].style(ks, vs)})
        ts, tv = s.xy(_time_key(s), key)
        if ts:
            any_time = True
            ts = [t - ts[0] for t in ts]
            tv, _ = _excess(tv, f_star, log_y)
            mk = _marker(len(ts)) and sty["marker"]
            ax_t.plot(ts, tv, **{**base, "marker": mk, **apart[ax_t].style(ts, tv)})
        if show_objective and key != "f":
            fk, fv = s.column("f")
            if fk:
                fv, _ = _excess(fv, f_star, log_y)
                ax_it.plot(fk, fv, color=c, ls=":", lw=0.7, alpha=0.35)
        gk, gv = s.column("grad_norm")
        if gk:
            gv = _positive(gv, 1e-300)
            ax_g.plot(gk, gv, **{**base, "lw": 1.2, **apart[ax_g].style(gk, gv)})
    what = "f − f*" if f_star is not None else "training loss"
    for ax in (ax_it, ax_t):
        if log_y:
            ax.set_yscale("log")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    if clipped:
        for ax in (ax_it, ax_t):
            ax.axhline(CLIP, color="0.4", ls=(0, (1, 3)), lw=0.9)
        ax_it.plot([], [], color="0.4", ls=(0, (1, 3)), label=f"f − f* ≤ {CLIP:.0e}: drawn at it")
    xlabel = _iteration_axis((ax_it, ax_g), series)
    ax_it.set_xlabel(xlabel)
    ax_it.set_title(f"{what} vs iteration")
    ax_t.set_xlabel("solver seconds since iterate 0 (wall clock, metrics excluded)")
    ax_t.set_title(f"{what} vs time" + ("" if any_time else " (no times recorded)"))
    _gradient_axes(ax_g, xlabel)
    if show_objective:
        ax_it.plot([], [], color="grey", ls=":", lw=0.9, alpha=0.6, label="sampled objective f")
    if styles is not None:
        names = [label for label, _, _ in series]
        extra = [
            (h, lab)
            for h, lab in zip(*ax_it.get_legend_handles_labels())
            if lab not in names and lab != "_nolegend_"
        ]
        _outside_legend(fig, styles, drawn, names, 3, extra)
    else:
        _legends(fig, (ax_it, ax_t, ax_g), rows, 3)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def _outside_legend_size(
    series: Sequence[Series], styles: SeriesStyles, ncol: int
) -> tuple[int, float]:
    """(rows, width of a panel in inches) of a figure whose legend sits under its panels:
    grouped styles need a column per group, as tall as the longest group and its title;
    otherwise the series' labels fill ``ncol`` columns."""
    groups = styles.legend_groups(range(len(series)))
    if groups:
        rows = max(len(entries) for _, entries in groups) + 1
        longest = max(len(label) for _, entries in groups for label, _ in entries)
        need = len(groups) * (0.06 * longest + 0.9)
    else:
        rows = -(-len(series) // ncol)
        need = _legend_width(series, ncol)
    return rows, max(5.2, need / ncol)


def _outside_legend(
    fig: Figure,
    styles: SeriesStyles,
    drawn: Sequence[int],
    labels: Sequence[str],
    ncol: int,
    extra: Sequence[tuple[Any, str]] = (),
) -> None:
    """The legend under the panels, where it covers no curve: with grouped styles one column
    per group (its title in bold, then a line per colour or per line style), else one entry
    per drawn series (``labels[i]``) in ``ncol`` columns; ``extra`` (handle, label) entries
    (the sampled objective, a floor) follow."""
    from matplotlib.lines import Line2D

    groups = styles.legend_groups(drawn)
    if not groups:
        entries = [
            (Line2D([], [], color=styles.styles[i]["color"], ls=styles.styles[i]["ls"]), labels[i])
            for i in drawn
        ] + list(extra)
        if entries:
            fig.legend(
                [h for h, _ in entries],
                [lab for _, lab in entries],
                loc="outside lower center",
                ncol=ncol,
                fontsize=8,
                handlelength=3.5,
            )
        return
    columns = [
        (title, [(Line2D([], [], **kw), lab) for lab, kw in entries]) for title, entries in groups
    ]
    if extra:
        columns.append(("", list(extra)))
    rows = max(len(entries) for _, entries in columns) + 1
    hs: list[Any] = []
    ls: list[str] = []
    titles = []
    for title, entries in columns:
        col = [(Line2D([], [], ls="none"), title), *entries]
        col += [(Line2D([], [], ls="none"), "")] * (rows - len(col))
        titles.append(len(hs))
        hs += [h for h, _ in col]
        ls += [lab for _, lab in col]
    leg = fig.legend(
        hs, ls, loc="outside lower center", ncol=len(columns), fontsize=8, handlelength=3.5
    )
    texts = leg.get_texts()
    for i in titles:
        texts[i].set_fontweight("bold")


def _legends(fig: Figure, axes, shared_rows: int, ncol: int) -> None:
    """One legend under the panels when ``shared_rows``, else one in each labelled panel."""
    if shared_rows:
        _shared_legend(fig, axes[0], ncol)
        return
    for ax in axes:
        if any(not ln.get_label().startswith("_") for ln in ax.lines):
            ax.legend(fontsize=8)


#: (colour, split key, iteration, value, label): a published value drawn on an accuracy figure
Published = tuple[Any, str, int, float, str]


def accuracy_figure(
    series: Sequence[Series],
    path: str | Path,
    *,
    title: str = "",
    published: Sequence[Published] = (),
    styles: SeriesStyles | None = None,
) -> Path:
    """Train (solid), dev (dashed) and test (dotted) accuracy against iteration; each entry of
    ``published`` is a mark at the iteration the study's value is after, in the solver's
    colour: a star for train, a diamond for dev accuracy. With ``styles`` (many series: a
    comparison of runs) each split has a panel of its own, the line style is free to tell
    series apart, and the legend sits under the panels."""
    if styles is not None:
        return _accuracy_panels(series, path, title, styles)
    rows = _legend_rows(len(series), 2)
    width = 6.4 if not rows else max(6.4, _legend_width(series, 2))
    fig = _figure(1, width=width, height=4.4 + 0.2 * rows)
    ax = fig.subplots()
    styles = {"train_accuracy": "-", "dev_accuracy": "--", "test_accuracy": ":"}
    used = set()
    apart = Distinct()
    for i, (label, s, c) in enumerate(series):
        mk = series_style(i)["marker"]
        for key, ls in styles.items():
            ks, vs = s.column(key)
            if not ks:
                continue
            used.add(key)
            extra = apart.style(ks, vs)
            if extra:  # the line style says train / dev / test here: keep it, draw thinner
                extra.update(ls=ls, lw=0.8)
            ax.plot(
                ks,
                vs,
                **{
                    "color": c,
                    "ls": ls,
                    "marker": _marker(len(ks)) and mk,
                    "ms": 3,
                    "lw": 1.5,
                    **extra,
                },
            )
        ax.plot([], [], color=c, lw=2, marker=mk if i >= len(_PALETTE) else None, label=label)
    for key, ls in styles.items():
        if key in used:
            ax.plot([], [], color="black", ls=ls, lw=1.2, label=key.replace("_", " "))
    _draw_published(ax, published)
    ax.set_xlabel("iteration k")
    ax.set_ylabel("accuracy (eq. 30)")
    ax.set_title(title or "accuracy vs iteration", fontsize=10)
    ax.grid(True, alpha=0.3)
    if rows:
        _shared_legend(fig, ax, 2)
    else:
        ax.legend(fontsize=8, ncol=2)
    return save(fig, path)


#: the accuracy splits, as columns of a trace, in the order panels show them
_SPLITS = ("train_accuracy", "dev_accuracy", "test_accuracy")


def _accuracy_panels(
    series: Sequence[Series], path: str | Path, title: str, styles: SeriesStyles
) -> Path:
    """One panel per split that some series recorded, every series in its own style."""
    splits = [k for k in _SPLITS if any(s.column(k)[0] for _, s, _ in series)] or ["accuracy"]
    rows, width = _outside_legend_size(series, styles, len(splits))
    fig = _figure(len(splits), width=width, height=4.2 + 0.2 * rows)
    axes = fig.subplots(1, len(splits), sharey=True, squeeze=False)[0]
    drawn: list[int] = []
    for ax, key in zip(axes, splits):
        apart = Distinct()
        for i, (_label, s, _c) in enumerate(series):
            ks, vs = s.column(key)
            if not ks:
                continue
            if i not in drawn:
                drawn.append(i)
            sty = styles.styles[i]
            extra = apart.style(ks, vs)
            ax.plot(
                ks,
                vs,
                **{
                    "color": sty["color"],
                    "ls": sty["ls"],
                    "marker": _marker(len(ks)) and sty["marker"],
                    "ms": 3,
                    "lw": 1.5,
                    **extra,
                },
            )
        ax.set_title(key.replace("_", " "), fontsize=10)
        ax.set_xlabel("iteration k")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy (eq. 30)")
    names = [label for label, _, _ in series]
    _outside_legend(fig, styles, sorted(drawn), names, len(splits))
    if title:
        fig.suptitle(title)
    return save(fig, path)


def _draw_published(ax, published: Sequence[Published]) -> None:
    """The study's values as marks in the solvers' colours (star: train, diamond: dev), the
    solvers side by side about the published iteration so that close values stay apart."""
    cols = list(dict.fromkeys(c for c, *_ in published))
    for c, key, k, v, _lab in published:
        dx = 1.6 * (cols.index(c) - (len(cols) - 1) / 2)
        mk = "*" if key == "train_accuracy" else "D"
        ax.plot(
            [k + dx],
            [v],
            marker=mk,
            ms=12 if mk == "*" else 7,
            color=c,
            mec="black",
            mew=0.8,
            ls="none",
            zorder=6,
        )
    if published:
        what = "; ".join(sorted({lab for *_, lab in published}))
        ax.plot(
            [],
            [],
            marker="*",
            ms=11,
            color="0.6",
            mec="black",
            ls="none",
            label=f"study: train ({what})",
        )
        if any(key == "dev_accuracy" for _, key, *_ in published):
            ax.plot(
                [], [], marker="D", ms=6, color="0.6", mec="black", ls="none", label="study: dev"
            )


def _label_positions(cs, levels, paths: Sequence[np.ndarray], lo, hi) -> list[tuple[float, float]]:
    """For each labelled contour level, the point of its line farthest (in axes units) from
    every iterate; a level whose line comes nowhere 6 % of the axes away from the paths, or
    whose best point is within 8 % of a label already placed, is left unlabelled, so that no
    label sits on a path or on another label."""
    lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    span = hi - lo
    pts = np.concatenate(paths) if paths else np.zeros((0, 2))
    pts = ((pts - lo) / span)[:: max(1, len(pts) // 400)]
    placed: list[np.ndarray] = []
    out = []
    for level, segs in zip(cs.levels, cs.allsegs):
        if level not in levels:
            continue
        verts = [v for seg in segs for v in seg]
        if not verts:
            continue
        vn = (np.asarray(verts) - lo) / span
        vn = vn[np.all((vn > 0.04) & (vn < 0.96), axis=1)]
        if not len(vn):
            continue
        d = np.full(len(vn), np.inf)
        for other in ([pts] if len(pts) else []) + ([np.asarray(placed)] if placed else []):
            d = np.minimum(d, np.min(np.linalg.norm(vn[:, None, :] - other[None], axis=2), axis=1))
        best = int(np.argmax(d))
        if d[best] < 0.06:
            continue
        placed.append(vn[best])
        x, y = lo + vn[best] * span
        out.append((float(x), float(y)))
    return out


def _paths(series: Sequence[Series], max_points: int) -> list[tuple[str, np.ndarray, Any]]:
    """(label, iterates (n × 2), colour) of the series that recorded finite iterates x."""
    paths = []
    for label, s, c in series:
        xy = [r["x"][:2] for r in s.rows if isinstance(r.get("x"), list) and len(r["x"]) >= 2]
        xy = [p for p in xy if all(math.isfinite(v) for v in p)]
        if not xy:
            continue
        arr = np.asarray(xy, dtype=float)
        if len(arr) > max_points:  # keep the first points and thin the rest
            idx = np.unique(np.r_[np.arange(200), np.linspace(200, len(arr) - 1, max_points)])
            arr = arr[idx.astype(int)]
        paths.append((label, arr, c))
    return paths


def _contours(ax, fn, lo, hi, paths: Sequence[np.ndarray]) -> None:
    """Log-spaced filled contours of ``fn`` on [lo, hi], every third level labelled away from
    the paths."""
    X, Y = np.meshgrid(np.linspace(lo[0], hi[0], 300), np.linspace(lo[1], hi[1], 300))
    Z = fn(X, Y)
    shift = max(float(np.nanmin(Z)), 0.0)
    zpos = Z - shift + 1e-3
    lo_z = max(float(np.nanmin(zpos)), 1e-3)
    levels = np.logspace(math.log10(lo_z), math.log10(float(np.nanmax(zpos))), 20)
    norm = LogNorm(vmin=levels[0], vmax=levels[-1])
    ax.contourf(X, Y, zpos, levels=levels, norm=norm, cmap="Greys_r", alpha=0.25)
    cs = ax.contour(X, Y, zpos, levels=levels, norm=norm, cmap="viridis", linewidths=0.7)
    labelled = list(cs.levels[1::3])
    where = _label_positions(cs, labelled, paths, lo, hi)
    if where:
        ax.clabel(cs, labelled, manual=where, fmt=lambda v: f"{v + shift - 1e-3:.2g}", fontsize=7)


def paths_figure(
    series: Sequence[Series],
    path: str | Path,
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    title: str = "",
    minimum: Sequence[float] | None = None,
    max_points: int = 4000,
) -> Path:
    """Iterates ``x`` (first two coordinates) over log-spaced contours of ``fn(X, Y)``.

    Each solver starts at a hollow marker of its own shape and size (nested when they share a
    start) and ends at a filled star drawn above the minimum's cross; contour labels sit where
    the contour is farthest from every path; the legend explains the markers."""
    fig = _figure(1, width=8.4, height=5.4)
    ax = fig.subplots()
    paths = _paths(series, max_points)
    pts = [arr for _, arr, _ in paths]
    if minimum is not None:
        pts.append(np.asarray([minimum[:2]], dtype=float))
    allp = np.concatenate(pts) if pts else np.zeros((1, 2))
    lo, hi = allp.min(axis=0), allp.max(axis=0)
    span = np.maximum(hi - lo, 0.5)
    lo, hi = lo - 0.15 * span, hi + 0.15 * span
    _contours(ax, fn, lo, hi, [a for _, a, _ in paths])
    if minimum is not None:
        ax.plot(
            minimum[0],
            minimum[1],
            marker="+",
            color="black",
            ms=14,
            mew=1.5,
            zorder=4,
            ls="none",
            label="minimum",
        )
    n = len(paths)
    for i, (label, arr, c) in enumerate(paths):
        ax.plot(arr[:, 0], arr[:, 1], color=c, lw=1.3, marker="o", ms=2.5, label=label, zorder=3)
        ax.plot(
            arr[0, 0],
            arr[0, 1],
            marker=_MARKERS[i % len(_MARKERS)],
            mfc="none",
            mec=c,
            mew=1.8,
            ms=8 + 5 * (n - 1 - i),
            ls="none",
            zorder=5,
        )
        ax.plot(
            arr[-1, 0],
            arr[-1, 1],
            marker="*",
            color=c,
            mec="black",
            mew=0.6,
            ms=15 - 2 * i,
            ls="none",
            zorder=6 + i,
        )
    ax.plot(
        [],
        [],
        marker="s",
        mfc="none",
        mec="0.3",
        ls="none",
        ms=8,
        label="start (hollow, one shape per solver)",
    )
    ax.plot([], [], marker="*", color="0.6", mec="black", ls="none", ms=11, label="last iterate")
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title((title + ": " if title else "") + "iterates over log-spaced contours of f")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return save(fig, path)


def _axis_values(values: Sequence[Any]) -> tuple[list[float], list[str] | None, bool]:
    """x positions for swept values: numbers as they are (log axis when they span a decade),
    anything else as categories."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        xs = [float(v) for v in values]
        log = min(xs) > 0 and max(xs) / min(xs) >= 10
        return xs, None, log
    labels = [value_label(v) for v in values]
    return list(range(len(values))), labels, False


def _log_if_decades(ax, ys: Sequence[float]) -> None:
    """A log y axis for positive values spanning at least a decade (final losses 1e-8…1e-6)."""
    if ys and min(ys) > 0 and max(ys) / min(ys) >= 10:
        ax.set_yscale("log")


def sweep_figure(
    key: str,
    values: Sequence[Any],
    groups: Sequence[tuple[str, dict[str, list[tuple[Any, float | None, float | None]]]]],
    path: str | Path,
    *,
    test_label: str = "test accuracy",
    title: str = "",
    solver_colours: dict[str, str] | None = None,
) -> Path:
    """Final train loss and test accuracy against a swept value, one curve per solver.

    ``groups`` is a list of (group label, {solver: [(value, train loss, test accuracy)]}), one
    row of panels per combination of the other swept keys. Integer values get their own ticks;
    losses spanning decades a log axis; one legend sits outside the panels."""
    xs_all, labels, log = _axis_values(list(values))
    integer = labels is None and all(isinstance(v, int) for v in values)
    pos = {value_label(v): x for v, x in zip(values, xs_all)}
    fig = _figure(2, nrows=max(1, len(groups)), height=3.8)
    axes = np.atleast_2d(fig.subplots(max(1, len(groups)), 2, squeeze=False))
    handles: dict[str, Any] = {}
    for row, (glabel, by_solver) in enumerate(groups):
        ax_l, ax_a = axes[row]
        apart_l, apart_a = Distinct(), Distinct()
        losses: list[float] = []
        for i, (solver, points) in enumerate(by_solver.items()):
            c = (solver_colours or {}).get(solver, colour(i))
            mk = _MARKERS[i % len(_MARKERS)]
            pts = sorted((pos[value_label(v)], tl, ta) for v, tl, ta in points)
            xl = [p[0] for p in pts if p[1] is not None]
            yl = [p[1] for p in pts if p[1] is not None]
            xa = [p[0] for p in pts if p[2] is not None]
            ya = [p[2] for p in pts if p[2] is not None]
            losses += yl
            if xl:
                kw = {"color": c, "marker": mk, "label": solver, **apart_l.style(xl, yl)}
                (h,) = ax_l.plot(xl, yl, **kw)
                handles.setdefault(solver, h)
            if xa:
                kw = {"color": c, "marker": mk, "label": solver, **apart_a.style(xa, ya)}
                (h,) = ax_a.plot(xa, ya, **kw)
                handles.setdefault(solver, h)
        _log_if_decades(ax_l, losses)
        for ax, what in ((ax_l, "final training loss"), (ax_a, f"final {test_label}")):
            ax.set_xlabel(key)
            ax.set_ylabel(what)
            ax.set_title(f"{what} vs {key}" + (f"\n({glabel})" if glabel else ""), fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if log:
                ax.set_xscale("log")
            if labels is not None:
                ax.set_xticks(xs_all, labels)
            elif integer:
                ax.set_xticks(xs_all, [str(int(v)) for v in xs_all])
                if log:
                    ax.minorticks_off()
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8)
    if title:
        fig.suptitle(title)
    return save(fig, path)

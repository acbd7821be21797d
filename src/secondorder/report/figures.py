"""Figures of runs, drawn with Matplotlib's Agg canvas (no display, no pyplot state).

Each function takes *series* — ``(label, SolverRun, colour)`` triples read from run
directories — and writes one figure file (PNG or SVG, by the path's suffix):

- :func:`loss_figure`: loss (or f − f*) against iteration and against solver time, and ‖∇f‖∞
  against iteration (log-y by default);
- :func:`accuracy_figure`: train / dev / test accuracy (eq. 30) against iteration;
- :func:`paths_figure`: iterates in the (x, y) plane over log-spaced contours of a 2-D function
  (Rosenbrock, eq. 6);
- :func:`sweep_figure`: final train loss and test accuracy against a swept spec value, one curve
  per solver.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from secondorder.experiments.io import atomic_write
from secondorder.report.rundata import SolverRun
from secondorder.report.text import value_label

__all__ = [
    "accuracy_figure",
    "colour",
    "loss_figure",
    "paths_figure",
    "save",
    "sweep_figure",
]

Series = tuple[str, SolverRun, Any]
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


def colour(i: int) -> str:
    """The i-th colour of the report palette (solvers keep their colour across figures)."""
    return _PALETTE[i % len(_PALETTE)]


def _figure(ncols: int, nrows: int = 1, width: float = 5.2, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write the figure (format from the suffix) atomically and return the path."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
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


def loss_figure(
    series: Sequence[Series],
    path: str | Path,
    *,
    title: str = "",
    f_star: float | None = None,
    log_y: bool = True,
    show_objective: bool = False,
) -> Path:
    """Loss vs iteration, loss vs solver time, ‖∇f‖∞ vs iteration.

    The loss is the full training loss when recorded (else the objective f); with ``f_star``
    the panels show f − f* (clipped at 1e-16 for the log scale). ``show_objective`` adds the
    sampled objective f as a thin dotted line where it differs from the training loss.
    """
    rows = _legend_rows(len(series), 3)
    width = 5.2 if not rows else max(5.2, _legend_width(series, 3) / 3)
    fig = _figure(3, width=width, height=4.0 + 0.2 * rows)
    ax_it, ax_t, ax_g = fig.subplots(1, 3)
    any_time = False
    # past ten series the palette repeats: the line style then tells them apart
    styles = [_LINESTYLES[(i // len(_PALETTE)) % len(_LINESTYLES)] for i in range(len(series))]
    for (label, s, c), sty in zip(series, styles):
        key = _loss_key(s)
        ks, vs = s.column(key)
        if not ks:
            continue
        if f_star is not None:
            vs = _positive([v - f_star for v in vs], 1e-16)
        elif log_y:
            vs = _positive(vs, 1e-300)
        ax_it.plot(ks, vs, color=c, ls=sty, label=label, marker=_marker(len(ks)), ms=3, lw=1.5)
        tk = _time_key(s)
        ts, tv = s.xy(tk, key)
        if ts:
            any_time = True
            if f_star is not None:
                tv = _positive([v - f_star for v in tv], 1e-16)
            elif log_y:
                tv = _positive(tv, 1e-300)
            ax_t.plot(ts, tv, color=c, ls=sty, label=label, marker=_marker(len(ts)), ms=3, lw=1.5)
        if show_objective and key != "f":
            fk, fv = s.column("f")
            if fk:
                if f_star is not None:
                    fv = _positive([v - f_star for v in fv], 1e-16)
                ax_it.plot(fk, fv, color=c, ls=":", lw=0.9, alpha=0.8)
        gk, gv = s.column("grad_norm")
        if gk:
            ax_g.plot(gk, _positive(gv, 1e-300), color=c, ls=sty, label=label, lw=1.2)
    what = "f − f*" if f_star is not None else "training loss"
    for ax in (ax_it, ax_t):
        if log_y:
            ax.set_yscale("log")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    ax_it.set_xlabel("iteration k")
    ax_it.set_title(f"{what} vs iteration")
    ax_t.set_xlabel("seconds in the solver (wall clock, metrics excluded)")
    ax_t.set_title(f"{what} vs time" + ("" if any_time else " (no times recorded)"))
    ax_g.set_yscale("log")
    ax_g.set_xlabel("iteration k")
    ax_g.set_ylabel("‖∇f‖∞ of the solver's objective")
    ax_g.set_title("gradient norm vs iteration")
    ax_g.grid(True, which="both", alpha=0.3)
    if show_objective:
        ax_it.plot([], [], color="grey", ls=":", lw=0.9, label="sampled objective f")
    if rows:
        _shared_legend(fig, ax_it, 3)
    else:
        for ax in (ax_it, ax_t, ax_g):
            if ax.lines:
                ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def accuracy_figure(
    series: Sequence[Series],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Train (solid), dev (dashed) and test (dotted) accuracy against iteration."""
    rows = _legend_rows(len(series), 2)
    width = 6.4 if not rows else max(6.4, _legend_width(series, 2))
    fig = _figure(1, width=width, height=4.4 + 0.2 * rows)
    ax = fig.subplots()
    styles = {"train_accuracy": "-", "dev_accuracy": "--", "test_accuracy": ":"}
    used = set()
    for label, s, c in series:
        for key, ls in styles.items():
            ks, vs = s.column(key)
            if not ks:
                continue
            used.add(key)
            ax.plot(ks, vs, color=c, ls=ls, marker=_marker(len(ks)), ms=3, lw=1.5)
        ax.plot([], [], color=c, lw=2, label=label)
    for key, ls in styles.items():
        if key in used:
            ax.plot([], [], color="black", ls=ls, lw=1.2, label=key.replace("_", " "))
    ax.set_xlabel("iteration k")
    ax.set_ylabel("accuracy (eq. 30)")
    ax.set_title(title or "accuracy vs iteration")
    ax.grid(True, alpha=0.3)
    if rows:
        _shared_legend(fig, ax, 2)
    else:
        ax.legend(fontsize=8, ncol=2)
    return save(fig, path)


def paths_figure(
    series: Sequence[Series],
    path: str | Path,
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    title: str = "",
    minimum: Sequence[float] | None = None,
    max_points: int = 4000,
) -> Path:
    """Iterates ``x`` (first two coordinates) over log-spaced contours of ``fn(X, Y)``."""
    fig = _figure(1, width=6.6, height=5.4)
    ax = fig.subplots()
    pts = []
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
        pts.append(arr)
    if minimum is not None:
        pts.append(np.asarray([minimum[:2]], dtype=float))
    allp = np.concatenate(pts) if pts else np.zeros((1, 2))
    lo, hi = np.percentile(allp, 0, axis=0), np.percentile(allp, 100, axis=0)
    span = np.maximum(hi - lo, 0.5)
    lo, hi = lo - 0.15 * span, hi + 0.15 * span
    gx = np.linspace(lo[0], hi[0], 300)
    gy = np.linspace(lo[1], hi[1], 300)
    X, Y = np.meshgrid(gx, gy)
    Z = fn(X, Y)
    zmin = max(float(np.nanmin(Z)), 0.0)
    shift = zmin if zmin > 0 else 0.0
    zpos = Z - shift + 1e-3
    lo_z = max(float(np.nanmin(zpos)), 1e-3)
    levels = np.logspace(math.log10(lo_z), math.log10(float(np.nanmax(zpos))), 20)
    norm = LogNorm(vmin=levels[0], vmax=levels[-1])
    ax.contourf(X, Y, zpos, levels=levels, norm=norm, cmap="Greys_r", alpha=0.25)
    cs = ax.contour(X, Y, zpos, levels=levels, norm=norm, cmap="viridis", linewidths=0.8)
    ax.clabel(cs, cs.levels[::3], fmt=lambda v: f"{v + shift - 1e-3:.2g}", fontsize=7)
    for label, arr, c in paths:
        ax.plot(arr[:, 0], arr[:, 1], color=c, lw=1.3, marker="o", ms=2.5, label=f"{label}")
        ax.plot(arr[0, 0], arr[0, 1], marker="s", color=c, ms=6)
        ax.plot(arr[-1, 0], arr[-1, 1], marker="*", color=c, ms=10)
    if minimum is not None:
        ax.plot(minimum[0], minimum[1], marker="x", color="black", ms=9, mew=2, label="minimum")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title((title + ": " if title else "") + "iterates over log-spaced contours of f")
    ax.legend(fontsize=8, loc="best")
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
    row of panels per combination of the other swept keys."""
    xs_all, labels, log = _axis_values(list(values))
    pos = {value_label(v): x for v, x in zip(values, xs_all)}
    fig = _figure(2, nrows=max(1, len(groups)), height=3.8)
    axes = np.atleast_2d(fig.subplots(max(1, len(groups)), 2, squeeze=False))
    for row, (glabel, by_solver) in enumerate(groups):
        ax_l, ax_a = axes[row]
        for i, (solver, points) in enumerate(by_solver.items()):
            c = (solver_colours or {}).get(solver, colour(i))
            pts = sorted((pos[value_label(v)], tl, ta) for v, tl, ta in points)
            xl = [p[0] for p in pts if p[1] is not None]
            yl = [p[1] for p in pts if p[1] is not None]
            xa = [p[0] for p in pts if p[2] is not None]
            ya = [p[2] for p in pts if p[2] is not None]
            if xl:
                ax_l.plot(xl, yl, color=c, marker="o", label=solver)
            if xa:
                ax_a.plot(xa, ya, color=c, marker="o", label=solver)
        for ax, what in ((ax_l, "final training loss"), (ax_a, f"final {test_label}")):
            ax.set_xlabel(key)
            ax.set_ylabel(what)
            ax.set_title(f"{what} vs {key}" + (f"\n({glabel})" if glabel else ""), fontsize=10)
            ax.grid(True, alpha=0.3)
            if log:
                ax.set_xscale("log")
            if labels is not None:
                ax.set_xticks(xs_all, labels)
            if ax.lines:
                ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save(fig, path)

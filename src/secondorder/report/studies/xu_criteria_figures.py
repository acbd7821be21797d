"""The figures of study ``xu-criteria``: the fastest setting of every method against time, the
sweeps as a grid of times to the target, and the runs from the strict saddle."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.ticker import LogFormatterSciNotation, NullFormatter

from secondorder._format import format_number, format_spec_value
from secondorder.report.figures import _figure, save
from secondorder.report.studies import StudyContext
from secondorder.report.styles import Distinct, series_style

if TYPE_CHECKING:
    from secondorder.report.studies.xu_criteria import MethodSweep, SaddleOutcome

__all__ = ["F_BEST", "F_GRID", "F_SADDLE", "best_figure", "grid_figure", "saddle_figure"]

F_BEST = "Figure X1: test accuracy against solver time, each method's fastest setting"
F_GRID = "Figure X2: time to the target over each method's sweep"
F_SADDLE = "Figure X3: f − f* from the strict saddle"


def best_figure(sweeps: Sequence[MethodSweep], target: float, ctx: StudyContext) -> str:
    """Test accuracy against solver seconds of each method's fastest setting (its most
    accurate one when none reaches the target); solid first-order, dashed second-order."""
    fig = _figure(1, width=7.5, height=4.6)
    ax = fig.subplots()
    apart = Distinct()
    bottom = max(0.0, target - 0.35)
    x_min = math.inf
    for i, m in enumerate(sweeps):
        s = m.fastest or m.most_accurate
        if s is None or s.reach.run is None:
            continue
        xs, ys = s.reach.run.xy("solver_time", "test_accuracy")
        pts = [(x, y) for x, y in zip(xs, ys) if x > 0]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x_min = min([x_min] + [x for x, y in pts if y >= bottom])
        st = series_style(i)
        style = {"color": st["color"], "marker": st["marker"], "ms": 3, "lw": 1.4}
        style["ls"] = "-" if m.first_order else "--"
        mark = "" if m.fastest else ", never reaches T"
        ax.plot(xs, ys, label=f"{m.group} {s.setting}{mark}", **{**style, **apart.style(xs, ys)})
    ax.axhline(target, color="grey", lw=0.8, ls=":", label=f"T = {format_spec_value(target)}")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))
    ax.set_ylim(bottom=bottom)
    if math.isfinite(x_min):  # nothing to see left of the first point above the axis
        ax.set_xlim(left=x_min / 1.5)
    ax.set_xlabel("solver time (s, log scale)")
    ax.set_ylabel("test accuracy (eq. 30)")
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=7)
    ax.set_title("solid: first-order, dashed: second-order", fontsize=9)
    return ctx.link(save(fig, ctx.figure("xu-best")), F_BEST)


def grid_figure(sweeps: Sequence[MethodSweep], ctx: StudyContext) -> str:
    """One row per method, one column per setting (in sweep order): the colour is the solver
    time to the target (log scale), grey with × where the setting never reached it."""
    n_cols = max(len(m.settings) for m in sweeps)
    times = np.full((len(sweeps), n_cols), np.nan)
    for i, m in enumerate(sweeps):
        for j, s in enumerate(m.settings):
            if s.reach.time is not None and s.reach.time > 0:
                times[i, j] = s.reach.time
    fig = _figure(1, width=1.35 * n_cols + 3.2, height=0.42 * len(sweeps) + 1.6)
    ax = fig.subplots()
    ax.imshow(np.ones_like(times), cmap="Greys", vmin=0, vmax=5, aspect="auto")
    finite = times[np.isfinite(times)]
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        norm = LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 1.01)
        img = ax.imshow(np.ma.masked_invalid(times), cmap="viridis_r", norm=norm, aspect="auto")
        fig.colorbar(img, ax=ax, label="solver seconds to T (log scale)")
    for i, m in enumerate(sweeps):
        for j, s in enumerate(m.settings):
            t = times[i, j]
            text = (
                s.setting
                + "\n"
                + (f"{format_number(t, 2)} s" if math.isfinite(t) else f"× best {_acc(s)}")
            )
            # viridis_r is bright at the short times: dark text there, light on the long ones
            dark = math.isfinite(t) and finite.size and t > math.sqrt(finite.min() * finite.max())
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=6.5,
                color="white" if dark else "black",
            )
    ax.set_yticks(range(len(sweeps)), [m.group for m in sweeps], fontsize=8)
    ax.set_xticks(range(n_cols), [f"{j + 1}" for j in range(n_cols)], fontsize=8)
    ax.set_xlabel("the sweep's values in order (the method's default in the middle)")
    ax.set_title("each row: one hyper-parameter, five values a decade apart", fontsize=9)
    return ctx.link(save(fig, ctx.figure("xu-sweeps")), F_GRID)


def _acc(s) -> str:
    return "—" if s.reach.best is None else format_number(s.reach.best, 2)


def saddle_figure(outcomes: Sequence[SaddleOutcome], ctx: StudyContext) -> str:
    """f − f* (log scale) against iterations, one panel per start."""
    starts = sorted({o.start for o in outcomes})
    names = list(dict.fromkeys(o.solver for o in outcomes))
    fig = _figure(len(starts), width=4.4, height=4.0)
    axes = fig.subplots(1, len(starts), squeeze=False, sharex=True, sharey=True)[0]
    floor = max(abs(outcomes[0].f_star), 1e-300) * 1e-16
    k_max = max((o.ks[-1] for o in outcomes if o.ks), default=1)
    for ax, st in zip(axes, starts):
        apart = Distinct()
        for o in outcomes:
            if o.start != st or not o.ks:
                continue
            style = series_style(names.index(o.solver))
            ys = [max(g, floor) for g in o.gaps]
            # a run that stopped at once (g = 0 on the saddle) is one point: mark it
            line = {"color": style["color"], "ls": style["ls"], "lw": 1.3}
            if len(ys) == 1:
                line.update(marker="o", ms=5)
            ax.plot(o.ks, ys, **{**line, **apart.style(o.ks, ys)})
        ax.set_yscale("log")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(0, max(k_max, 10) * 1.1)
        ax.set_title(f"‖x₀‖ = {format_spec_value(st)}", fontsize=9)
        ax.set_xlabel("iteration k (symmetric log)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("f − f* (log scale; floor 1e-16·|f*|)")
    for i, n in enumerate(names):
        s = series_style(i)
        axes[0].plot([], [], color=s["color"], ls=s["ls"], label=n)
    fig.legend(loc="outside lower center", ncol=min(5, len(names)), fontsize=8)
    return ctx.link(save(fig, ctx.figure("xu-saddle")), F_SADDLE)

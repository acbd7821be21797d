"""The depth study (``studies/depth``): does depth break first-order training, and does
curvature help? The study's second open question and second hypothesis (section 5.1).

The run sweeps the number of hidden layers L and the activation; every solver starts each cell
from the same θ₀ and records, besides the training loss, the per-layer gradient norms
(``layer_grad_norms``), the fraction of negative Appendix-C terms σ″(Z)·∂L/∂X per hidden layer
(``negative_curvature_fraction``) and the extreme Hessian eigenvalues by Lanczos
(``lanczos_lambda_min``, ``lanczos_lambda_max``). The rules below turn them into conclusions:

- a method **fails** at depth L when its loss decrease f₀ − f is less than
  :data:`FAIL_FRACTION` of the best method's at that depth, or less than :data:`NO_PROGRESS`·f₀;
  it **begins to fail** at the smallest L from which it fails at every deeper depth; a method
  given fewer iterations than the others (SFN) is judged against every method's loss after
  that many iterations instead;
- gradients **vanish** (explode) with depth when the ratio ‖∂J/∂θ₁‖ / ‖∂J/∂θ_out‖ (first layer
  over output layer, at θ₀) at the deepest L is below 1/:data:`TREND` (above :data:`TREND`)
  times the ratio at the shallowest L;
- curvature **helps** at the deepest depths when the best method using curvature (quasi-Newton
  or Hessian) ends lower than the best first-order method by at least :data:`GAIN` of the
  larger of their two loss decreases (and **hurts** in the mirror case).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from secondorder._format import format_number, format_spec_value
from secondorder.report.figures import _figure, legend, save
from secondorder.report.rundata import CellRun, RunData, final_value
from secondorder.report.studies import Conclusion, StudyContext, conclusions_table
from secondorder.report.studies.depth_runs import (
    best_run,
    budget,
    by_name,
    f_at,
    final_list,
    final_loss,
    grid_of,
    k_equal,
    methods,
    plateau_loss,
    start_row,
)
from secondorder.report.styles import series_style
from secondorder.report.text import md_table, show

__all__ = [
    "FAIL_FRACTION",
    "FIRST_ORDER",
    "GAIN",
    "NO_PROGRESS",
    "TREND",
    "curvature_gain",
    "failing",
    "gradient_trend",
    "onset",
    "sections",
    "trend",
]

#: a method fails when it achieves less than this fraction of the best method's decrease
FAIL_FRACTION = 0.5
#: ... or a decrease below this fraction of f₀ ("no progress")
NO_PROGRESS = 0.05
#: a ratio that changes by more than this factor from the shallowest to the deepest L is a trend
TREND = 10.0
#: curvature helps when it adds at least this fraction of the larger decrease
GAIN = 0.1
#: methods that use only gradients (the rest use curvature: quasi-Newton or Hessian products)
FIRST_ORDER = frozenset({"gd", "sgd", "adam"})
#: a recorded λ_min below −NEGATIVE·λ_max counts as negative curvature
NEGATIVE = 1e-3

T_FINAL = "Table D1: final training loss by depth and method"
T_EQUAL = "Table D2: training loss after the same number of iterations"
T_TARGET = "Table D3: iterations to 90 % of the best decrease"
T_ONSET = "Table D4: where each method begins to fail"
T_START = "Table D5: gradients and curvature by depth, at θ₀ and at the end of the best run"
F_GRAD = "Figure D1: per-layer gradient norms by depth, at θ₀ and at the end of the best run"
F_LOSS = "Figure D2: final training loss against depth"
F_LAMBDA = "Figure D3: λ_min of the Hessian along the run"
F_SIGMA = "Figure D4: negative σ″·∂L/∂X terms per layer, at θ₀ and at the end of the best run"


# -- the rules (plain data in, plain data out: tested on hand-made inputs) ----------------------
def failing(f0: float, final: dict[str, float], plateau: float | None = None) -> set[str]:
    """The methods whose decrease f₀ − f is below FAIL_FRACTION of the best decrease or below
    NO_PROGRESS·|f₀| (every method fails when none makes progress), or, given the plateau of a
    constant predictor (log K for cross-entropy over K balanced classes), whose loss stays
    above (1 − NO_PROGRESS)·plateau: they learnt no more than the class frequencies."""
    drops = {m: f0 - f for m, f in final.items() if math.isfinite(f)}
    best = max(drops.values(), default=0.0)
    floor = NO_PROGRESS * abs(f0)
    out = {m for m, f in final.items() if not math.isfinite(f)}
    if plateau is not None:
        out |= {m for m, f in final.items() if f > (1 - NO_PROGRESS) * plateau}
    return out | {m for m, d in drops.items() if d < FAIL_FRACTION * best or d < floor}


def onset(fails: dict[int, bool]) -> int | None:
    """The smallest depth from which the method fails at every deeper depth (None: it does not
    fail at the deepest one)."""
    first = None
    for L in sorted(fails, reverse=True):
        if not fails[L]:
            break
        first = L
    return first


def trend(by_depth: dict[int, float], factor: float = TREND) -> str:
    """ "falls", "grows" or "flat": the deepest value over the shallowest against ``factor``."""
    vals = {L: v for L, v in by_depth.items() if v is not None and math.isfinite(v) and v > 0}
    if len(vals) < 2:
        return "flat"
    lo, hi = vals[min(vals)], vals[max(vals)]
    if hi < lo / factor:
        return "falls"
    if hi > lo * factor:
        return "grows"
    return "flat"


def gradient_trend(ratios: dict[int, float]) -> str:
    """ "vanish", "explode" or "neither" from the first-over-output gradient ratios by depth."""
    return {"falls": "vanish", "grows": "explode", "flat": "neither"}[trend(ratios)]


def curvature_gain(f0: float, f_first: float, f_curv: float) -> float:
    """(f_first − f_curv) / the larger decrease of the two: > 0 when curvature ends lower."""
    scale = f0 - min(f_first, f_curv)
    if not scale > 0:
        return 0.0
    return (f_first - f_curv) / scale


def _failures(cells: dict[int, CellRun]) -> dict[int, set[str]]:
    """The failing methods per depth. A method given fewer iterations than the others (SFN,
    whose dense Hessian is costly) is judged against every method's loss after that many
    iterations, not against their final losses."""
    out = {}
    for L, cell in cells.items():
        r0 = start_row(cell)
        f0 = r0.get("train_loss", r0.get("f"))
        f0 = math.nan if f0 is None else float(f0)  # no row recorded: nothing is judged
        plateau = plateau_loss(cell.spec)
        budgets = {s.name: budget(cell, s.name) for s in cell.solvers}
        longest = max(budgets.values(), default=0)
        final = {s.name: final_loss(s) for s in cell.solvers if budgets[s.name] >= longest}
        fails = failing(f0, final, plateau)
        for s in cell.solvers:
            k = budgets[s.name]
            if k < longest:
                at_k = {t.name: f_at(t, k) for t in cell.solvers}
                at_k = {n: (math.nan if v is None else v) for n, v in at_k.items()}
                if s.name in failing(f0, at_k, plateau):
                    fails.add(s.name)
        out[L] = fails
    return out


# -- tables ---------------------------------------------------------------------------------------
def _loss_table(title: str, cells: dict[int, CellRun], value, fails) -> str:
    names = [s.name for s in next(iter(cells.values())).solvers]
    rows = []
    for L in sorted(cells):
        by = {s.name: value(s) for s in cells[L].solvers}
        cols = []
        for n in names:
            v = by.get(n)
            mark = " †" if fails is not None and n in fails[L] else ""
            cols.append(("—" if v is None or not math.isfinite(v) else show(v)) + mark)
        finite = {n: v for n, v in by.items() if v is not None and math.isfinite(v)}
        rows.append([L, *cols, min(finite, key=finite.get) if finite else "—"])
    return f"**{title}**\n\n" + md_table(["L", *names, "best"], rows)


def _target_table(cells: dict[int, CellRun], act: str) -> str:
    names = [s.name for s in next(iter(cells.values())).solvers]
    rows = []
    for L in sorted(cells):
        f0 = float(start_row(cells[L]).get("f", math.nan))
        best = min(final_loss(s) for s in cells[L].solvers)
        target = f0 - 0.9 * (f0 - best)
        cols = []
        for s in cells[L].solvers:
            hit = [k for k, f in zip(*s.column("f")) if f <= target]
            cols.append(str(int(hit[0])) if hit else "—")
        rows.append([L, show(target), *cols])
    return f"**{T_TARGET} ({act})**\n\n" + md_table(["L", "target f", *names], rows)


def _onset_table(grid, fails_by_act) -> tuple[str, dict[str, dict[str, int | None]]]:
    acts = sorted(grid)
    onsets: dict[str, dict[str, int | None]] = {a: {} for a in acts}
    rows = []
    for s in methods(grid):
        row = [s.name]
        for a in acts:
            fails = {L: s.name in f for L, f in fails_by_act[a].items()}
            onsets[a][s.name] = onset(fails)
            where = [str(L) for L, f in sorted(fails.items()) if f]
            o = onsets[a][s.name]
            row.append(
                f"{'none' if o is None else f'L ≥ {o}'} (fails at: {', '.join(where) or '—'})"
            )
        rows.append(row)
    return f"**{T_ONSET}**\n\n" + md_table(["method", *acts], rows), onsets


def _ratio(norms: Any) -> float | None:
    if not isinstance(norms, list) or len(norms) < 2 or not norms[-1]:
        return None
    return float(norms[0]) / float(norms[-1])


def _start_table(grid) -> str:
    rows = []
    for a in sorted(grid):
        for L in sorted(grid[a]):
            r = start_row(grid[a][L])
            best = best_run(grid[a][L])
            neg = r.get("negative_curvature_fraction") or []
            neg_end = final_list(best, "negative_curvature_fraction") or []
            row = [a, L, show(_ratio(r.get("layer_grad_norms")))]
            row += [show(_ratio(final_list(best, "layer_grad_norms")))]
            row += [show(float(np.mean(v))) if v else "—" for v in (neg, neg_end)]
            row += [show(r.get("lanczos_lambda_min")), show(r.get("lanczos_lambda_max"))]
            row += [f"{best.name}: {show(final_value(best.rows, 'lanczos_lambda_min'))}"]
            rows.append(row)
    end = "… at the end (best run)"
    header = ["activation", "L", "‖g₁‖/‖g_out‖ at θ₀", end]
    header += ["negative σ″·∂L/∂X at θ₀ (mean over layers)", end, "λ_min at θ₀", "λ_max at θ₀"]
    header += ["λ_min at the end (best run)"]
    return f"**{T_START}**\n\n" + md_table(header, rows)


# -- figures --------------------------------------------------------------------------------------
def _per_layer_figure(grid, ctx, key: str, name: str, title: str, ylabel: str, end: bool = False):
    acts = sorted(grid)
    fig = _figure(len(acts), 1, width=5.0, height=3.8)
    axes = fig.subplots(1, len(acts), squeeze=False)[0]
    for ax, a in zip(axes, acts):
        for i, L in enumerate(sorted(grid[a])):
            vals = start_row(grid[a][L]).get(key)
            if not isinstance(vals, list) or not vals:
                continue
            st = series_style(i)
            ax.plot(range(1, len(vals) + 1), vals, label=f"L = {L}", **st, ms=4)
            if end:
                last = final_list(best_run(grid[a][L]), key)
                if last:
                    st = {**st, "ls": ":", "marker": "x"}
                    ax.plot(range(1, len(last) + 1), last, **st, ms=4)
        ax.set_title(a + ("  (solid: θ₀; dotted: end of the best run)" if end else ""))
        ax.set_xlabel("layer (1 = input side)")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key == "layer_grad_norms":
            ax.set_yscale("log")
        else:
            ax.set_ylim(0.0, 1.0)
        legend(ax, fontsize=7, ncol=2)
    fig.suptitle(title)
    return save(fig, ctx.figure(name))


def _loss_figure(grid, ctx: StudyContext):
    acts = sorted(grid)
    fig = _figure(len(acts), 1, width=5.0, height=3.8)
    axes = fig.subplots(1, len(acts), squeeze=False)[0]
    for ax, a in zip(axes, acts):
        depths = sorted(grid[a])
        for i, s in enumerate(methods(grid)):
            ys = [final_loss(by_name(grid[a][L], s.name)) for L in depths]
            ax.plot(depths, ys, label=s.name, **series_style(i), ms=4)
        ax.set_title(a)
        ax.set_xlabel("hidden layers L")
        ax.set_ylabel("final training loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(F_LOSS)
    return save(fig, ctx.figure("depth-final-loss"))


def _lambda_figure(grid, ctx: StudyContext):
    acts = sorted(grid)
    shown = sorted({min(grid[a]) for a in acts} | {max(grid[a]) for a in acts})
    fig = _figure(len(acts), len(shown), width=5.0, height=3.4)
    axes = fig.subplots(len(shown), len(acts), squeeze=False)
    for j, a in enumerate(acts):
        for i, L in enumerate(shown):
            ax = axes[i][j]
            cell = grid[a].get(L)
            for n, s in enumerate(cell.solvers if cell else []):
                ks, vs = s.column("lanczos_lambda_min")
                if ks:
                    ax.plot(ks, vs, label=s.name, **series_style(n), ms=4)
            ax.axhline(0.0, color="0.5", lw=0.8)
            ax.set_title(f"{a}, L = {L}")
            ax.set_xlabel("iteration")
            ax.set_ylabel("λ_min (Lanczos)")
            legend(ax, fontsize=7, ncol=2)
    fig.suptitle(F_LAMBDA)
    return save(fig, ctx.figure("depth-lambda-min"))


def _weak(grid, run: RunData) -> str:
    spec = run.spec
    data = spec.get("data") or {}
    seeds = spec.get("seeds") or [0]
    bits = [f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}"]
    if data.get("n_train"):
        bits.append(f"{data['n_train']} training images")
    bits.append(f"{spec.get('max_iter')} iterations")
    bits.append(f"depths {min(min(c) for c in grid.values())}–{max(max(c) for c in grid.values())}")
    return "weak: " + ", ".join(bits)


def _gradient_conclusions(grid, weak: str) -> list[Conclusion]:
    out = []
    for a in sorted(grid):
        ratios = {L: _ratio(start_row(c).get("layer_grad_norms")) for L, c in grid[a].items()}
        ratios = {L: r for L, r in ratios.items() if r is not None}
        if len(ratios) < 2:
            continue
        lo, hi = min(ratios), max(ratios)
        verdict = gradient_trend(ratios)
        out.append(
            Conclusion(
                f"Do gradients vanish or explode with depth ({a})?",
                f"{verdict}: ‖g₁‖/‖g_out‖ at θ₀ is {format_number(ratios[lo], 3)} at L = {lo} "
                f"and {format_number(ratios[hi], 3)} at L = {hi} (rule: a change by more than "
                f"{format_spec_value(TREND)}× is a trend)",
                f"{F_GRAD}; {T_START}",
                weak + "; at θ₀ only (one initialisation)",
            )
        )
    return out


def _onset_conclusions(grid, onsets, weak: str) -> list[Conclusion]:
    out = []
    for a in sorted(grid):
        deepest = max(grid[a])
        never = [m for m, o in onsets[a].items() if o is None]
        failing_ = sorted(((o, m) for m, o in onsets[a].items() if o is not None))
        text = "; ".join(f"{m} from L = {o}" for o, m in failing_) or "no method fails"
        short = _short_budgets(grid[a])
        if short:
            text += f" ({short}: judged against every method after as many; see {T_EQUAL})"
        out.append(
            Conclusion(
                f"Where does each method begin to fail ({a})?",
                f"{text}; still working at L = {deepest}: {', '.join(never) or 'none'} (rule: "
                f"fails when its decrease is below {format_spec_value(FAIL_FRACTION)} of the best "
                f"method's or below {format_spec_value(NO_PROGRESS)}·f₀, or when it ends above "
                f"{format_spec_value(1 - NO_PROGRESS)}·log K, the loss of predicting the class "
                "frequencies)",
                f"{T_FINAL}; {T_ONSET}; {F_LOSS}",
                weak,
            )
        )
    return out


def _short_budgets(cells: dict[int, CellRun]) -> str:
    """The solvers given fewer iterations than the longest-running one, with their budget."""
    cell = cells[max(cells)]
    budgets = {s.name: budget(cell, s.name) for s in cell.solvers}
    most = max(budgets.values(), default=0)
    return ", ".join(f"{n} ran {k} iterations" for n, k in budgets.items() if k < most)


def _group_best(cell: CellRun, value, curvature: bool) -> tuple[str | None, float]:
    """The best solver of one group (first-order, or using curvature) by ``value``."""
    best: tuple[str | None, float] = (None, math.inf)
    for s in cell.solvers:
        if (s.method not in FIRST_ORDER) != curvature:
            continue
        v = value(s)
        if v is not None and math.isfinite(v) and v < best[1]:
            best = (s.name, v)
    return best


def _curvature_conclusions(grid, k_eq: int, fails, weak: str) -> list[Conclusion]:
    out = []
    for a in sorted(grid):
        deep = sorted(grid[a])[-2:]
        parts, gains = [], []
        for label, value in (("final", final_loss), (f"after {k_eq} iterations", _at(k_eq))):
            for L in deep:
                cell = grid[a][L]
                f0 = float(start_row(cell).get("f", math.nan))
                m1, f1 = _group_best(cell, value, curvature=False)
                m2, f2 = _group_best(cell, value, curvature=True)
                if m1 is None or m2 is None:
                    continue
                g = curvature_gain(f0, f1, f2)
                gains.append(g)
                parts.append(
                    f"L = {L} {label}: {m2} {format_number(f2, 3)} vs {m1} "
                    f"{format_number(f1, 3)} (gain {format_number(g, 2)})"
                )
        if not gains:
            continue
        helps = sum(g >= GAIN for g in gains)
        hurts = sum(g <= -GAIN for g in gains)
        verdict = (
            "curvature helps"
            if helps > len(gains) / 2
            else "curvature hurts"
            if hurts > len(gains) / 2
            else "no clear difference"
        )
        stuck = all(len(fails[a][L]) == len(grid[a][L].solvers) for L in deep)
        if stuck:
            verdict += " (every method fails at these depths)"
        out.append(
            Conclusion(
                f"Does curvature help at the deepest depths ({a})?",
                f"{verdict}: gain ≥ {format_spec_value(GAIN)} in {helps}, ≤ "
                f"−{format_spec_value(GAIN)} in {hurts} of {len(gains)} comparisons — "
                + "; ".join(parts)
                + " (gain: the better group's lead over the larger decrease; best curvature "
                f"method vs best of {', '.join(sorted(FIRST_ORDER & _method_names(grid)))})",
                f"{T_FINAL}; {T_EQUAL}; {F_LOSS}",
                weak + "; first-order step sizes are single choices (Armijo for GD, lr for Adam)",
            )
        )
    return out


def _method_names(grid) -> set[str]:
    return {s.method for s in methods(grid)}


def _at(k: int):
    return lambda s: f_at(s, k)


def _negative_curvature_conclusion(grid, weak: str) -> Conclusion | None:
    records = negative = 0
    at_start: dict[int, list[float]] = {}
    sigma: dict[int, list[float]] = {}
    sigma_end: list[float] = []
    ends = [0, 0]  # cells whose best run ends with negative curvature, cells
    for cells in grid.values():
        for L, cell in cells.items():
            r0 = start_row(cell)
            if r0.get("lanczos_lambda_min") is not None and r0.get("lanczos_lambda_max"):
                at_start.setdefault(L, []).append(
                    -r0["lanczos_lambda_min"] / r0["lanczos_lambda_max"]
                )
            if r0.get("negative_curvature_fraction"):
                sigma.setdefault(L, []).append(float(np.mean(r0["negative_curvature_fraction"])))
            best = best_run(cell)
            last = final_list(best, "negative_curvature_fraction")
            if last:
                sigma_end.append(float(np.mean(last)))
            lo_end = final_value(best.rows, "lanczos_lambda_min")
            hi_end = final_value(best.rows, "lanczos_lambda_max")
            if lo_end is not None and hi_end is not None:
                ends[0] += lo_end < -NEGATIVE * abs(hi_end)
                ends[1] += 1
            for s in cell.solvers:
                for r in s.rows:
                    lo, hi = r.get("lanczos_lambda_min"), r.get("lanczos_lambda_max")
                    if lo is None or hi is None:
                        continue
                    records += 1
                    negative += lo < -NEGATIVE * abs(hi)
    if not records:
        return None
    rel = {L: float(np.mean(v)) for L, v in at_start.items()}
    sig = {L: float(np.mean(v)) for L, v in sigma.items()}
    lo, hi = min(rel), max(rel)
    sig_text = (
        f"; the negative σ″·∂L/∂X terms at θ₀ make up {format_number(100 * min(sig.values()), 3)}"
        f"–{format_number(100 * max(sig.values()), 3)} % of the (sample, unit) pairs"
        if sig
        else ""
    )
    if sigma_end:
        sig_text += (
            f", at the end of each cell's best run {format_number(100 * min(sigma_end), 3)}–"
            f"{format_number(100 * max(sigma_end), 3)} %"
        )
    return Conclusion(
        "Is the Hessian indefinite along the runs (the saddle remark of Appendix C)?",
        f"λ_min < −{format_spec_value(NEGATIVE)}·λ_max in {negative} of {records} records (at "
        f"the end of the best run in {ends[0]} of {ends[1]} cells); at θ₀ "
        f"|λ_min|/λ_max {trend(rel, 2.0).replace('flat', 'stays within 2×')} from "
        f"{format_number(rel[lo], 3)} (L = {lo}) to {format_number(rel[hi], 3)} (L = {hi})"
        + sig_text,
        f"{F_LAMBDA}; {T_START}; {F_SIGMA}",
        weak + "; λ_min from 30 Lanczos steps is an upper bound of the true λ_min",
    )


# -- the report -----------------------------------------------------------------------------------
def sections(run: RunData, ctx: StudyContext) -> list[str]:
    """The study's sections: conclusions first, then the tables and figures they cite."""
    h = ctx.h
    grid = grid_of(run)
    if not grid or not any(len(c) >= 2 for c in grid.values()):
        return [f"{h} Depth study\n\nThis run has no sweep over depth: nothing to conclude.\n"]
    weak = _weak(grid, run)
    k_eq = k_equal(grid)
    fails = {a: _failures(cells) for a, cells in grid.items()}
    onset_md, onsets = _onset_table(grid, fails)
    items = _gradient_conclusions(grid, weak)
    items += _onset_conclusions(grid, onsets, weak)
    items += _curvature_conclusions(grid, k_eq, fails, weak)
    neg = _negative_curvature_conclusion(grid, weak)
    if neg is not None:
        items.append(neg)
    figs = [
        (F_GRAD, _per_layer_figure(grid, ctx, "layer_grad_norms", "depth-layer-gradients",
                                   F_GRAD, "‖∂J/∂θ_l‖₂", end=True)),
        (F_LOSS, _loss_figure(grid, ctx)),
        (F_LAMBDA, _lambda_figure(grid, ctx)),
        (F_SIGMA, _per_layer_figure(grid, ctx, "negative_curvature_fraction",
                                    "depth-negative-terms", F_SIGMA, "fraction negative",
                                    end=True)),
    ]  # fmt: skip
    out = [f"{h} Depth study: does depth break it, and does curvature help?\n"]
    out.append(conclusions_table(items, h=h + "#"))
    out.append(f"{h}# Tables\n")
    out.append("† marks a method that fails at that depth (see the module's rule).\n")
    for a in sorted(grid):
        out.append(_loss_table(f"{T_FINAL} ({a})", grid[a], final_loss, fails[a]))
        out.append(_loss_table(f"{T_EQUAL} ({a}, k = {k_eq})", grid[a], _at(k_eq), None))
        out.append(_target_table(grid[a], a))
    out.append(onset_md)
    out.append(_start_table(grid))
    out.append(f"{h}# Figures\n")
    for title, path in figs:
        out.append(ctx.link(path, title))
    return out

"""``report.md``: tables of results, the seed's published numbers beside ours, and figures.

Everything comes from a :class:`~secondorder.report.RunData` (read from a run directory). For a
spec that reproduces part of the seed study (``report.paper = ["table1", ...]``), every
published cell is listed with our value and the absolute difference; notes say why the numbers
may differ where that is known.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from secondorder.experiments import paper
from secondorder.experiments.io import atomic_write_text
from secondorder.report import (
    CellRun,
    RunData,
    SolverRun,
    convergence_iteration,
    final_value,
)
from secondorder.report import figures as figs

__all__ = ["render_comparison", "render_report", "run_sections"]


# ----------------------------------------------------------------------------------------------
# Formatting helpers
# ----------------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 4) -> str:
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


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    if not rows:
        return "_(no rows)_\n"
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines) + "\n"


def _drop_empty_columns(header: list[str], rows: list[list[str]], keep: int = 3):
    cols = [i for i in range(len(header)) if i < keep or any(r[i] not in ("—", "") for r in rows)]
    return [header[i] for i in cols], [[r[i] for i in cols] for r in rows]


def _epsilon(run: RunData, epsilon: float | None) -> float:
    if epsilon is not None:
        return float(epsilon)
    return float((run.spec.get("report") or {}).get("epsilon", 1e-6))


def _f_star(cell: CellRun) -> float | None:
    rep = cell.spec.get("report") or {}
    if "f_star" in rep:
        return float(rep["f_star"])
    data = cell.spec.get("data") or {}
    if data.get("kind") == "rosenbrock":
        return 0.0
    return None


def _last_k(s: SolverRun) -> int:
    ks = [r.get("k") for r in s.rows if isinstance(r.get("k"), int)]
    return max(ks) if ks else 0


def _solver_time(s: SolverRun) -> float | None:
    for key in ("solver_time", "time"):
        v = final_value(s.rows, key)
        if v is not None:
            return v
    return None


def _time_at(s: SolverRun, k: int) -> float | None:
    for r in s.rows:
        if r.get("k") == k:
            for key in ("solver_time", "time"):
                if isinstance(r.get(key), (int, float)):
                    return float(r[key])
    return None


def _s_per_iter(s: SolverRun) -> float | None:
    t, k = _solver_time(s), _last_k(s)
    return t / k if t is not None and k > 0 else None


def _first_k(s: SolverRun, key: str, holds: Callable[[float], bool]) -> int | None:
    """The first recorded iteration whose finite ``key`` value satisfies ``holds``."""
    for r in s.rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and holds(v):
            return int(r.get("k", 0))
    return None


def _reached_line(tab: paper.PaperTable, entries) -> str:
    """When each of our solvers first matched the seed's final train accuracy (metrics are
    recorded every few iterations, so k is the first recorded one at or above it)."""
    col = next((c for c in tab.columns if c.ours == "train_accuracy"), None)
    if col is None:
        return ""
    bits = []
    for _, s, key in entries:
        target = tab.rows[key].get(col.key)
        if target is None:
            continue
        k = _first_k(s, "train_accuracy", lambda v, t=float(target): v >= t)
        bits.append(f"{s.name} ({key}) {'k = ' + str(k) if k is not None else 'not reached'}")
    if not bits:
        return ""
    return "First iteration at which ours matched the seed's final train accuracy: " + (
        "; ".join(bits) + ".\n"
    )


# ----------------------------------------------------------------------------------------------
# Our value of a published column
# ----------------------------------------------------------------------------------------------
def ours(s: SolverRun, col: paper.Column, epsilon: float) -> tuple[float | int | None, str]:
    """(our value, a footnote mark) for a published column."""
    if col.ours == "k_eps":
        return convergence_iteration(s.rows, epsilon), ""
    if col.ours == "runtime_50":
        t = _time_at(s, 50)
        if t is not None:
            return t, ""
        spi = _s_per_iter(s)
        return (None, "") if spi is None else (50 * spi, "†")
    if col.ours == "s_per_iter":
        return _s_per_iter(s), ""
    return final_value(s.rows, col.ours), ""


#: sweep keys that set the depth, which by-layer tables split into their "1L" / "2L" rows
_DEPTH_KEYS = ("model.hidden",)


def _group_key(cell: CellRun) -> tuple:
    return tuple(
        (k, repr(v)) for k, v in cell.point.items() if k not in _DEPTH_KEYS and k != "seed"
    )


def _group_label(cell: CellRun) -> str:
    bits = [f"{k} = {figs._label(v)}" for k, v in cell.point.items() if k not in _DEPTH_KEYS]
    return ", ".join(bits)


def paper_tables(
    run: RunData, epsilon: float
) -> tuple[str, dict[str, dict[str, list[tuple[str, float]]]]]:
    """Markdown for every published table the spec names, and the |Δ| per table and group,
    each with the depth ("1L", "2L"; "" for tables not split by depth) of its row."""
    out: list[str] = []
    diffs: dict[str, dict[str, list[tuple[str, float]]]] = {}
    ids = list((run.spec.get("report") or {}).get("paper") or [])
    for tid in ids:
        if tid not in paper.TABLES:
            out.append(f"_Unknown published table {tid!r}._\n")
            continue
        tab = paper.TABLES[tid]
        groups: dict[tuple, list[tuple[CellRun, SolverRun, str]]] = {}
        labels: dict[tuple, str] = {}
        for cell in run.cells:
            for s in cell.solvers:
                if not s.paper_row:
                    continue
                key = paper.paper_row_key(tab, s.paper_row, cell.n_hidden)
                if key is None:
                    continue
                g = _group_key(cell)
                groups.setdefault(g, []).append((cell, s, key))
                labels[g] = _group_label(cell)
        if not groups:
            continue
        out.append(f"### {tab.title}: {tab.caption}\n")
        for g, entries in groups.items():
            if labels[g]:
                out.append(f"**{labels[g]}**\n")
            header = ["Seed row", "Ours"]
            for col in tab.columns:
                header += [f"{col.label}: seed", "ours", "abs diff"]
                if col.ours == "test_accuracy":
                    header.append("our test error")
            rows = []
            marks = set()
            covered = set()
            for cell, s, key in sorted(entries, key=lambda e: list(tab.rows).index(e[2])):
                covered.add(key)
                name = s.name + (f" (seed {cell.seed})" if cell.seed else "")
                r: list[str] = [key, name]
                for col in tab.columns:
                    seed_v = tab.rows[key].get(col.key)
                    v, mark = ours(s, col, epsilon)
                    if mark:
                        marks.add(mark)
                    r.append(_fmt(seed_v, col.digits) if seed_v is not None else "—")
                    r.append(_fmt(v, col.digits) + mark if v is not None else _not_reached(col, s))
                    if v is not None and seed_v is not None:
                        d = abs(float(v) - float(seed_v))
                        depth = f"{cell.n_hidden}L" if tab.by_layers else ""
                        diffs.setdefault(tid, {}).setdefault(labels[g], []).append(
                            (depth, d if col.ours != "k_eps" else math.nan)
                        )
                        r.append(_fmt(d, col.digits))
                    else:
                        r.append("—")
                    if col.ours == "test_accuracy":
                        r.append(_fmt(1 - v, col.digits) if v is not None else "—")
                rows.append(r)
            for key, vals in tab.rows.items():
                if key in covered:
                    continue
                if tab.by_layers and not _same_depth(key, entries):
                    continue
                r = [key, "_(not run)_"]
                for col in tab.columns:
                    r += [_fmt(vals.get(col.key), col.digits), "—", "—"]
                    if col.ours == "test_accuracy":
                        r.append("—")
                rows.append(r)
            out.append(_table(header, rows))
            its = sorted({_last_k(s) for _, s, _ in entries})
            if tid in ("table3",) and its and its != [100]:
                out.append(
                    f"_Our runs stopped after {', '.join(map(str, its))} iterations; the seed's "
                    "Table 3 is after 100._\n"
                )
            reached = _reached_line(tab, entries)
            if reached:
                out.append(reached)
            if any(c.ours == "s_per_iter" for c in tab.columns):
                out.append(_relative_costs(tab, entries))
                out.append(_load_note(run, entries))
            if "†" in marks:
                out.append(
                    "† fewer than 50 iterations were run: 50 × (mean seconds per iteration).\n"
                )
        for note in tab.notes:
            out.append(f"- {note}")
        out.append("")
    return "\n".join(out), diffs


def _relative_costs(tab: paper.PaperTable, entries) -> str:
    """Seconds per iteration divided by gradient descent's, the seed's and ours: the ratios
    carry over between machines where the seconds do not."""
    by_depth: dict[str, dict[str, float]] = {}
    ours_by: dict[str, dict[str, tuple[str, float, float | None]]] = {}
    for _cell, s, key in entries:
        spi = _s_per_iter(s)
        depth = key.split()[-1] if tab.by_layers else ""
        nit, nfev = s.summary.get("nit"), s.summary.get("nfev")
        epi = (nfev - 1) / nit if nit and nfev else None  # less the evaluation at θ₀
        if spi is not None:
            ours_by.setdefault(depth, {})[s.name] = (key, spi, epi)
    for key, vals in tab.rows.items():
        depth = key.split()[-1] if tab.by_layers else ""
        by_depth.setdefault(depth, {})[key] = vals.get("s_per_iter")
    rows = []
    for depth, ours_d in ours_by.items():
        seed_d = by_depth.get(depth, {})
        seed_gd = next((v for k, v in seed_d.items() if k.startswith("Gradient")), None)
        gd = next((v for v in ours_d.values() if v[0].startswith("Gradient")), None)
        for name, (key, spi, epi) in ours_d.items():
            sv = seed_d.get(key)
            rows.append(
                [
                    key,
                    name,
                    _fmt(sv / seed_gd, 2) if sv and seed_gd else "—",
                    _fmt(spi / gd[1], 2) if gd else "—",
                    _fmt(epi, 2) if epi else "—",
                    _fmt(epi / gd[2], 2) if gd and gd[2] and epi else "—",
                ]
            )
    if not rows:
        return ""
    header = [
        "Seed row",
        "Ours",
        "seed: s/it ÷ GD's",
        "ours: s/it ÷ GD's",
        "our evaluations / it",
        "÷ GD's",
    ]
    return (
        "Cost per iteration relative to gradient descent (same depth). Function-and-gradient "
        "evaluations per iteration do not depend on the machine; the seed's time ratios are "
        "best compared with their ratio:\n\n" + _table(header, rows)
    )


def _load_note(run: RunData, entries) -> str:
    """Timings on a shared machine: say how busy it was."""
    loads = [s.summary.get("load_average") for _, s, _ in entries]
    loads = [ld[0] for ld in loads if isinstance(ld, list) and ld]
    cores = run.environment.get("cpu_count")
    start = run.environment.get("load_average")
    if start:
        loads.append(start[0])
    if not loads or not cores:
        return ""
    lo, hi = min(loads), max(loads)
    busy = hi > cores
    return f"_Load average (1 min) while these solvers ran: {lo:g}-{hi:g} on {cores} cores" + (
        "; other processes competed for the CPU, so seconds are inflated and uneven "
        "between solvers._\n"
        if busy
        else "._\n"
    )


def _same_depth(key: str, entries) -> bool:
    depths = {f"{cell.n_hidden}L" for cell, _, _ in entries}
    return key.split()[-1] in depths


def _not_reached(col: paper.Column, s: SolverRun) -> str:
    if col.ours == "k_eps":
        return f"not reached in {_last_k(s)}"
    return "—"


def _convention_paragraph(
    run: RunData, diffs: dict[str, dict[str, list[tuple[str, float]]]]
) -> str:
    """Which swept setting (L2 convention, initialisation, ...) lands closest to Table 3,
    overall and depth by depth."""
    per: dict[str, float] = {}
    by_depth: dict[str, dict[str, float]] = {}
    for label, ds in (diffs.get("table3") or {}).items():
        label = label or "main"
        vals = [d for _, d in ds if not math.isnan(d)]
        if vals:
            per[label] = statistics.fmean(vals)
        for depth in sorted({dp for dp, _ in ds}):
            dvals = [d for dp, d in ds if dp == depth and not math.isnan(d)]
            if depth and dvals:
                by_depth.setdefault(depth, {})[label] = statistics.fmean(dvals)
    if len(per) < 2:
        return ""

    def ranked(values: dict[str, float]) -> str:
        order = sorted(values.items(), key=lambda kv: kv[1])
        return "; ".join(f"{g}: {v:.4f}" for g, v in order) + f" (closest: **{order[0][0]}**)"

    swept = ", ".join(k for k in run.sweep if k not in _DEPTH_KEYS)
    lines = [f"### Which setting explains the seed's Table 3? ({swept})\n"]
    lines.append(
        "Mean absolute difference between our and the seed's Table 3 accuracies (train and dev, "
        f"every row present): {ranked(per)}."
    )
    if len(by_depth) > 1:
        for depth, values in sorted(by_depth.items()):
            if len(values) > 1:
                lines.append(f"- {depth} rows only: {ranked(values)}.")
        closest = {min(v, key=v.get) for v in by_depth.values() if len(v) > 1}
        if len(closest) > 1:
            lines.append(
                "\nThe depths point different ways, so no single setting swept here explains "
                "the whole table."
            )
    convention = {}
    for label, v in per.items():
        for c in ("per-sample", "plain"):
            if f"l2_convention = {c}" in label:
                convention.setdefault(c, []).append(v)
    if len(convention) == 2:
        best = min(convention, key=lambda c: min(convention[c]))
        lines.append(
            f"\nOn the L2 convention the **{best}** one is closer to the published numbers. "
            "The seed writes λ = 0.01 but not whether the penalty is λ/2·‖W‖² (plain) or "
            "λ/(2m)·‖W‖² with m = 60,000 (per-sample). What separates the two is where training "
            "can end: under the plain convention the penalty 0.005·‖W‖² is so strong that even "
            "the regularised optimum stays near 0.79 test accuracy (L-BFGS run to convergence, "
            "measured separately on this setup), so no solver can reach the seed's ≈0.83 for "
            "NLCG and L-BFGS-B; under the per-sample convention the data term dominates and 100 "
            "iterations of L-BFGS reach about 0.86-0.88. The seed's 0.83 after 100 iterations "
            "therefore fits the per-sample reading (or a penalty as weak)."
        )
    its = sorted({_last_k(s) for c in run.cells for s in c.solvers if s.rows})
    if its and max(its) < 100:
        lines.append(
            f"(Our runs stopped after {max(its)} iterations, before these settings separate "
            "fully; the seed's table is after 100.)"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Results of a cell
# ----------------------------------------------------------------------------------------------
def results_table(cell: CellRun, epsilon: float) -> str:
    f_star = _f_star(cell)
    header = [
        "Solver",
        "method",
        "status",
        "it.",
        "f (objective)",
        "train loss",
        "train acc",
        "dev acc",
        "test acc",
        "‖∇f‖∞",
        f"k_ε (ε={epsilon:g})",
        "k: f−f* ≤ 1e-8",
        "solver s",
        "s / it.",
        "nfev",
        "ngev",
        "nhev",
    ]
    rows = []
    for s in cell.solvers:
        sm = s.summary
        key = "train_loss" if any("train_loss" in r for r in s.rows) else "f"
        k8 = _first_k(s, key, lambda v: v - f_star <= 1e-8) if f_star is not None else None
        rows.append(
            [
                s.name,
                f"`{s.method}`",
                sm.get("status", "not run" if not s.rows else "running"),
                _fmt(sm.get("nit", _last_k(s) if s.rows else None)),
                _fmt(final_value(s.rows, "f"), 6),
                _fmt(final_value(s.rows, "train_loss"), 6),
                _fmt(final_value(s.rows, "train_accuracy")),
                _fmt(final_value(s.rows, "dev_accuracy")),
                _fmt(final_value(s.rows, "test_accuracy")),
                _fmt(final_value(s.rows, "grad_norm"), 3),
                _fmt(convergence_iteration(s.rows, epsilon)),
                _fmt(k8) if f_star is not None else "—",
                _fmt(_solver_time(s), 2),
                _fmt(_s_per_iter(s), 3),
                _fmt(sm.get("nfev")),
                _fmt(sm.get("ngev")),
                _fmt(sm.get("nhev")),
            ]
        )
    header, rows = _drop_empty_columns(header, rows)
    return _table(header, rows)


def _messages(cell: CellRun) -> str:
    lines = []
    for s in cell.solvers:
        msg = s.summary.get("message")
        if msg:
            lines.append(f"- **{s.name}**: {msg}")
    return "\n".join(lines) + ("\n" if lines else "")


def _series(cell: CellRun, prefix: str = "") -> list[figs.Series]:
    return [(prefix + s.name, s, figs.colour(s.index)) for s in cell.solvers if s.rows]


def _objective_differs(series: list[figs.Series]) -> bool:
    """Whether the sampled objective f differs from the full training loss anywhere."""
    for _, s, _ in series:
        for r in s.rows:
            f, t = r.get("f"), r.get("train_loss")
            if isinstance(f, float) and isinstance(t, float) and abs(f - t) > 1e-6 * max(1, abs(t)):
                return True
    return False


def _rosenbrock_fn(cell: CellRun):
    data = cell.spec.get("data") or {}
    if data.get("kind") != "rosenbrock" or len(data.get("x0", [])) != 2:
        return None
    a, b = float(data.get("a", 1.0)), float(data.get("b", 100.0))
    return (lambda X, Y: (a - X) ** 2 + b * (Y - X**2) ** 2), [a, a * a]


def cell_figures(
    cell: CellRun, figdir: Path, fmt: str, title: str, log_y: bool = True
) -> list[tuple[str, str, Path]]:
    """Draw a cell's figures; return (kind, caption, path) triples, kind being ``"loss"``,
    ``"accuracy"`` or ``"paths"``."""
    out = []
    series = _series(cell)
    if not series:
        return out
    stem = "" if cell.id == "main" else f"{cell.id}-"
    f_star = _f_star(cell)
    sampled = (cell.spec.get("sampler") or {}).get("kind", "full") != "full"
    p = figs.loss_figure(
        series,
        figdir / f"{stem}loss.{fmt}",
        title=title,
        f_star=f_star,
        log_y=log_y,
        show_objective=sampled and _objective_differs(series),
    )
    what = "f − f*" if f_star is not None else "full training loss"
    out.append(("loss", f"{what} against iteration and solver time; ‖∇f‖∞ against iteration", p))
    if any(
        any(k in r for k in ("train_accuracy", "test_accuracy"))
        for _, s, _ in series
        for r in s.rows
    ):
        p = figs.accuracy_figure(series, figdir / f"{stem}accuracy.{fmt}", title=title)
        out.append(("accuracy", "accuracy (eq. 30) against iteration", p))
    ros = _rosenbrock_fn(cell)
    if ros is not None:
        fn, minimum = ros
        p = figs.paths_figure(
            series, figdir / f"{stem}paths.{fmt}", fn, title=title or "paths", minimum=minimum
        )
        out.append(("paths", "iterates in the (x, y) plane over log-spaced contours", p))
    return out


def _sweep_section(run: RunData, figdir: Path, fmt: str, rel: str) -> str:
    sweep = run.sweep
    if not sweep or len(run.cells) < 2:
        return ""
    lines = ["## Sweep\n"]
    test_key = "test_accuracy"
    if not any(final_value(s.rows, test_key) is not None for c in run.cells for s in c.solvers):
        test_key = "dev_accuracy"
    for key, values in sweep.items():
        others = [k for k in sweep if k != key]
        groups: dict[tuple, dict[str, list]] = {}
        glabels: dict[tuple, str] = {}
        for cell in run.cells:
            g = tuple((k, repr(cell.point.get(k))) for k in others) + (("seed", cell.seed),)
            glabels[g] = ", ".join(
                [f"{k} = {figs._label(cell.point.get(k))}" for k in others]
                + ([f"seed {cell.seed}"] if cell.seed else [])
            )
            for s in cell.solvers:
                groups.setdefault(g, {}).setdefault(s.name, []).append(
                    (
                        cell.point.get(key),
                        final_value(s.rows, "train_loss") or final_value(s.rows, "f"),
                        final_value(s.rows, test_key),
                    )
                )
        colours = {s.name: figs.colour(s.index) for s in run.cells[0].solvers}
        name = "sweep-" + "".join(ch if ch.isalnum() else "_" for ch in key)
        p = figs.sweep_figure(
            key,
            values,
            [(glabels[g], groups[g]) for g in groups],
            figdir / f"{name}.{fmt}",
            test_label=test_key.replace("_", " "),
            title=f"{run.name}: final values against {key}",
            solver_colours=colours,
        )
        lines.append(f"![final train loss and {test_key} against {key}]({rel}{p.name})\n")
    return "\n".join(lines)


def _seed_figures(numbers: Sequence[int], drawn: list[tuple[CellRun, str, Path]], rel: str) -> str:
    """Which of the images above redraw each of the seed's figures."""
    lines = ["## The seed's figures\n"]
    for number in numbers:
        fig = paper.FIGURES[number]
        links = []
        for kind in fig.shows:
            for cell, k, p in drawn:
                if k == kind and (fig.n_hidden is None or cell.n_hidden == fig.n_hidden):
                    where = "" if cell.id == "main" else f", {cell.label}"
                    links.append(f"[{kind}{where}]({rel}{p.name})")
        found = "; ".join(links) if links else f"not in this run (the full `{fig.spec}` draws it)"
        lines.append(f"- **Figure {number}** ({fig.caption}) Ours: {found}.")
    return "\n".join(lines) + "\n"


def _seed_means(run: RunData) -> str:
    seeds = sorted({c.seed for c in run.cells})
    if len(seeds) < 2:
        return ""
    groups: dict[tuple, list[CellRun]] = {}
    for c in run.cells:
        groups.setdefault(tuple((k, repr(v)) for k, v in c.point.items()), []).append(c)
    header = ["Point", "Solver", "train loss", "train acc", "dev acc", "test acc"]
    rows = []
    for cells in groups.values():
        for i, s0 in enumerate(cells[0].solvers):
            r = [_group_label(cells[0]) or "main", s0.name]
            for key in ("train_loss", "train_accuracy", "dev_accuracy", "test_accuracy"):
                vals = [final_value(c.solvers[i].rows, key) for c in cells]
                vals = [v for v in vals if v is not None]
                if not vals:
                    r.append("—")
                elif len(vals) == 1:
                    r.append(_fmt(vals[0]))
                else:
                    r.append(f"{statistics.fmean(vals):.4f} ± {statistics.stdev(vals):.4f}")
            rows.append(r)
    return f"## Mean ± standard deviation over seeds {seeds}\n\n" + _table(header, rows)


def _environment_line(env: dict[str, Any]) -> str:
    if not env:
        return ""
    bits = [
        f"Python {env.get('python', '?')}",
        f"torch {env.get('torch', '?')}",
        f"NumPy {env.get('numpy', '?')}",
        f"SciPy {env.get('scipy', '?')}",
        f"{env.get('torch_threads', '?')} torch threads",
        f"CPU: {env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores)",
        f"device {env.get('device', 'cpu')}",
        f"host {env.get('hostname', '?')}",
    ]
    git = env.get("git")
    if git:
        bits.append(f"git {git['commit'][:10]}{' (modified)' if git.get('dirty') else ''}")
    if env.get("started"):
        bits.append(f"started {env['started']}")
    if env.get("load_average"):
        bits.append(f"load average at the start {env['load_average'][0]:g}")
    return "Environment: " + ", ".join(bits) + ".\n"


def _spec_line(spec: dict[str, Any]) -> str:
    bits = []
    data = spec.get("data") or {}
    if data:
        bits.append(
            "data " + ", ".join(f"{k}={figs._label(v)}" for k, v in data.items() if k != "root")
        )
    model = spec.get("model") or {}
    if model:
        bits.append("model " + ", ".join(f"{k}={figs._label(v)}" for k, v in model.items()))
    if "loss" in spec:
        bits.append(f"loss {spec['loss']}")
    if spec.get("l2"):
        conv = spec.get("l2_convention", "plain")
        m = spec.get("l2_m")
        bits.append(
            f"λ = {spec['l2']:g} ({conv}{f', m = {m}' if m and conv == 'per-sample' else ''})"
        )
    sampler = spec.get("sampler") or {}
    if sampler:
        bits.append("sampler " + ", ".join(f"{k}={figs._label(v)}" for k, v in sampler.items()))
    bits.append(f"max_iter {spec.get('max_iter')}")
    bits.append(f"dtype {spec.get('dtype')}")
    return "Spec: " + "; ".join(bits) + ".\n"


def run_sections(
    run: RunData,
    figdir: Path,
    rel: str,
    *,
    fmt: str,
    epsilon: float | None,
    level: int = 1,
    environment: bool = True,
) -> str:
    """The Markdown body of one run (headings start at ``level``); figures go to ``figdir``
    and are linked as ``rel + name``."""
    h = "#" * level
    eps = _epsilon(run, epsilon)
    rep = run.spec.get("report") or {}
    log_y = bool(rep.get("log_y", True))
    out = [f"{h} {rep.get('title') or run.name}\n"]
    if run.spec.get("description"):
        out.append(f"{run.spec['description']}\n")
    out.append(
        f"Run directory `{run.dir}` (spec `{run.source or run.name}`), status **{run.status}**.\n"
    )
    out.append(_spec_line(run.spec))
    if environment:
        out.append(_environment_line(run.environment))
    short = run.source.split("/", 1)[-1] if run.source.startswith("paper/") else run.name
    headline = paper.HEADLINES.get(short)
    if headline:
        out.append(f"> The seed's claim: {headline.claim}\n")
    figdir.mkdir(parents=True, exist_ok=True)
    drawn: list[tuple[CellRun, str, Path]] = []
    for cell in run.cells:
        if len(run.cells) > 1:
            out.append(f"{h}# {cell.label}\n")
        else:
            out.append(f"{h}# Results\n")
        out.append(results_table(cell, eps))
        msgs = _messages(cell)
        if msgs:
            out.append("<details><summary>solver messages</summary>\n\n" + msgs + "\n</details>\n")
        title = f"{run.name}" + ("" if cell.id == "main" else f" — {cell.label}")
        for kind, caption, p in cell_figures(cell, figdir, fmt, title, log_y):
            out.append(f"![{caption}]({rel}{p.name})\n")
            drawn.append((cell, kind, p))
    sweep = _sweep_section(run, figdir, fmt, rel)
    if sweep:
        out.append(sweep.replace("## ", f"{h}# ", 1))
    if headline and headline.figures:
        out.append(_seed_figures(headline.figures, drawn, rel).replace("## ", f"{h}# ", 1))
    means = _seed_means(run)
    if means:
        out.append(means.replace("## ", f"{h}# ", 1))
    tables, diffs = paper_tables(run, eps)
    if tables.strip():
        out.append(f"{h}# Beside the seed's published numbers\n")
        out.append(
            "Every published cell with our value and the absolute difference (abs diff). "
            f"k_ε is eq. 29 with ε = {eps:g}.\n"
        )
        out.append(tables.replace("### ", f"{h}## "))
        para = _convention_paragraph(run, diffs)
        if para:
            out.append(para.replace("### ", f"{h}## "))
    return "\n".join(out)


def render_report(
    run: RunData, target: Path, *, fmt: str = "png", epsilon: float | None = None
) -> Path:
    """Write ``target/report.md`` and ``target/figures/*``; return the report's path."""
    target = Path(target)
    figdir = target / "figures"
    if run.is_suite:
        body = [f"# {run.name}\n"]
        if run.spec.get("description"):
            body.append(f"{run.spec['description']}\n")
        body.append(_environment_line(run.environment))
        body.append("Contents: " + ", ".join(f"[{n}](#{n})" for n, _ in run.parts) + "\n")
        for name, part in run.parts:
            body.append(f'<a id="{name}"></a>\n')
            body.append(
                run_sections(
                    part,
                    figdir / name,
                    f"figures/{name}/",
                    fmt=fmt,
                    epsilon=epsilon,
                    level=2,
                    environment=False,
                )
            )
        text = "\n".join(body)
    else:
        text = run_sections(run, figdir, "figures/", fmt=fmt, epsilon=epsilon)
    path = target / "report.md"
    atomic_write_text(path, text.rstrip() + "\n")
    return path


def render_comparison(
    runs: list[RunData], target: Path, *, fmt: str = "png", epsilon: float | None = None
) -> Path:
    """One table and overlaid curves for several runs (suites contribute their parts)."""
    flat: list[tuple[str, RunData]] = []
    for run in runs:
        if run.is_suite:
            flat += [(f"{run.name}/{n}", p) for n, p in run.parts]
        else:
            flat.append((run.name, run))
    names = [n for n, _ in flat]
    if len(set(names)) != len(names):
        flat = [(f"{n} ({r.dir.name})", r) for n, r in flat]
    target = Path(target)
    figdir = target / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    eps = float(epsilon) if epsilon is not None else 1e-6
    header = [
        "Run",
        "Cell",
        "Solver",
        "status",
        "it.",
        "train loss",
        "train acc",
        "dev acc",
        "test acc",
        f"k_ε (ε={eps:g})",
        "solver s",
        "s / it.",
    ]
    rows = []
    series: list[figs.Series] = []
    i = 0
    for rname, run in flat:
        for cell in run.cells:
            for s in cell.solvers:
                rows.append(
                    [
                        rname,
                        cell.label,
                        s.name,
                        s.summary.get("status", "—"),
                        _fmt(s.summary.get("nit")),
                        _fmt(final_value(s.rows, "train_loss"), 6),
                        _fmt(final_value(s.rows, "train_accuracy")),
                        _fmt(final_value(s.rows, "dev_accuracy")),
                        _fmt(final_value(s.rows, "test_accuracy")),
                        _fmt(convergence_iteration(s.rows, eps)),
                        _fmt(_solver_time(s), 2),
                        _fmt(_s_per_iter(s), 3),
                    ]
                )
                if s.rows:
                    label = f"{rname}: {s.name}" + ("" if cell.id == "main" else f" [{cell.label}]")
                    series.append((label, s, figs.colour(i)))
                    i += 1
    header, rows = _drop_empty_columns(header, rows, keep=4)
    out = ["# Comparison\n", "Runs: " + ", ".join(f"`{r.dir}`" for _, r in flat) + ".\n"]
    out.append(_table(header, rows))
    if series:
        p = figs.loss_figure(series, figdir / f"loss.{fmt}", title="comparison")
        out.append(f"![training loss of every run](figures/{p.name})\n")
        if any("train_accuracy" in r or "test_accuracy" in r for _, s, _ in series for r in s.rows):
            p = figs.accuracy_figure(series, figdir / f"accuracy.{fmt}", title="comparison")
            out.append(f"![accuracy of every run](figures/{p.name})\n")
    path = target / "report.md"
    atomic_write_text(path, "\n".join(out).rstrip() + "\n")
    return path

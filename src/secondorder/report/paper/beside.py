"""The seed's published numbers beside ours: the tables, the figures and the headline claim.

For a spec that names published tables (``report.paper = ["table1", ...]``), every published
cell is listed with our value and the absolute difference, grouped by the swept settings other
than the depth; what differs from table to table (depth rows, an error column, the iterations
the published values are after, a ranking of swept settings) is read from the
:class:`~secondorder.report.paper.published.PaperTable` and its columns.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from secondorder.report.measures import (
    DEPTH_KEYS,
    first_k,
    group_key,
    group_label,
    last_k,
    s_per_iter,
    time_at,
)
from secondorder.report.paper.published import (
    FIGURES,
    HEADLINES,
    TABLES,
    Column,
    Headline,
    PaperTable,
    paper_row_key,
)
from secondorder.report.rundata import (
    CellRun,
    RunData,
    SolverRun,
    convergence_iteration,
    final_value,
)
from secondorder.report.text import md_table, show

__all__ = ["headline", "ours", "paper_sections", "paper_tables", "seed_figures"]

#: |Δ| per table id and group label: (depth "1L" / "2L" or "", |Δ|; NaN for iteration counts)
Diffs = dict[str, dict[str, list[tuple[str, float]]]]
Entry = tuple[CellRun, SolverRun, str]


def headline(run: RunData) -> Headline | None:
    """The seed's claim a bundled ``paper/...`` spec checks, if any."""
    short = run.source.split("/", 1)[-1] if run.source.startswith("paper/") else run.name
    return HEADLINES.get(short)


def ours(s: SolverRun, col: Column, epsilon: float) -> tuple[float | int | None, str]:
    """(our value, a footnote mark) for a published column (see ``Column.ours``)."""
    if col.ours == "k_eps":
        return convergence_iteration(s.rows, epsilon), ""
    if col.ours == "runtime_50":
        t = time_at(s, 50)
        if t is not None:
            return t, ""
        spi = s_per_iter(s)
        return (None, "") if spi is None else (50 * spi, "†")
    if col.ours == "s_per_iter":
        return s_per_iter(s), ""
    return final_value(s.rows, col.ours), ""


# ----------------------------------------------------------------------------------------------
# One published table
# ----------------------------------------------------------------------------------------------
def _groups(run: RunData, tab: PaperTable) -> tuple[dict[tuple, list[Entry]], dict[tuple, str]]:
    """Our solvers that have a row in ``tab``, by the swept settings other than the depth."""
    groups: dict[tuple, list[Entry]] = {}
    labels: dict[tuple, str] = {}
    for cell in run.cells:
        for s in cell.solvers:
            if not s.paper_row:
                continue
            key = paper_row_key(tab, s.paper_row, cell.n_hidden)
            if key is None:
                continue
            g = group_key(cell)
            groups.setdefault(g, []).append((cell, s, key))
            labels[g] = group_label(cell)
    return groups, labels


def _header(tab: PaperTable) -> list[str]:
    header = ["Seed row", "Ours"]
    for col in tab.columns:
        header += [f"{col.label}: seed", "ours", "abs diff"]
        if col.error_column:
            header.append("our test error")
    return header


def _our_row(tab, cell, s, key, epsilon, marks, diffs: list[tuple[str, float]]) -> list[str]:
    """Seed row, our solver, and per column: the seed's value, ours, |Δ| (and our error)."""
    name = s.name + (f" (seed {cell.seed})" if cell.seed else "")
    r: list[str] = [key, name]
    for col in tab.columns:
        seed_v = tab.rows[key].get(col.key)
        v, mark = ours(s, col, epsilon)
        if mark:
            marks.add(mark)
        r.append(show(seed_v, col.digits) if seed_v is not None else "—")
        r.append(show(v, col.digits) + mark if v is not None else _not_reached(col, s))
        if v is not None and seed_v is not None:
            d = abs(float(v) - float(seed_v))
            depth = f"{cell.n_hidden}L" if tab.by_layers else ""
            diffs.append((depth, d if col.ours != "k_eps" else math.nan))
            r.append(show(d, col.digits))
        else:
            r.append("—")
        if col.error_column:
            r.append(show(1 - v, col.digits) if v is not None else "—")
    return r


def _not_run_rows(tab: PaperTable, entries: list[Entry], covered: set[str]) -> list[list[str]]:
    rows = []
    for key, vals in tab.rows.items():
        if key in covered:
            continue
        if tab.by_layers and not _same_depth(key, entries):
            continue
        r = [key, "_(not run)_"]
        for col in tab.columns:
            r += [show(vals.get(col.key), col.digits), "—", "—"]
            if col.error_column:
                r.append("—")
        rows.append(r)
    return rows


def _group_section(run, tab, entries, epsilon, diffs) -> list[str]:
    """The table of one group, then what the table's kind calls for below it."""
    rows, marks, covered = [], set(), set()
    for cell, s, key in sorted(entries, key=lambda e: list(tab.rows).index(e[2])):
        covered.add(key)
        rows.append(_our_row(tab, cell, s, key, epsilon, marks, diffs))
    rows += _not_run_rows(tab, entries, covered)
    out = [md_table(_header(tab), rows)]
    its = sorted({last_k(s) for _, s, _ in entries})
    if tab.iterations is not None and its and its != [tab.iterations]:
        out.append(
            f"_Our runs stopped after {', '.join(map(str, its))} iterations; the seed's "
            f"{tab.title} is after {tab.iterations}._\n"
        )
    reached = _reached_line(tab, entries)
    if reached:
        out.append(reached)
    if any(c.ours == "s_per_iter" for c in tab.columns):
        out.append(_relative_costs(tab, entries))
        out.append(_load_note(run, entries))
    if "†" in marks:
        out.append("† fewer than 50 iterations were run: 50 × (mean seconds per iteration).\n")
    return out


def paper_tables(run: RunData, epsilon: float) -> tuple[str, Diffs]:
    """Markdown for every published table the spec names, and the |Δ| per table and group,
    each with the depth ("1L", "2L"; "" for tables not split by depth) of its row."""
    out: list[str] = []
    diffs: Diffs = {}
    for tid in list((run.spec.get("report") or {}).get("paper") or []):
        if tid not in TABLES:
            out.append(f"_Unknown published table {tid!r}._\n")
            continue
        tab = TABLES[tid]
        groups, labels = _groups(run, tab)
        if not groups:
            continue
        out.append(f"### {tab.title}: {tab.caption}\n")
        for g, entries in groups.items():
            if labels[g]:
                out.append(f"**{labels[g]}**\n")
            found: list[tuple[str, float]] = []
            out += _group_section(run, tab, entries, epsilon, found)
            if found:
                diffs.setdefault(tid, {}).setdefault(labels[g], []).extend(found)
        for note in tab.notes:
            out.append(f"- {note}")
        out.append("")
    return "\n".join(out), diffs


def _reached_line(tab: PaperTable, entries: list[Entry]) -> str:
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
        k = first_k(s, "train_accuracy", lambda v, t=float(target): v >= t)
        bits.append(f"{s.name} ({key}) {'k = ' + str(k) if k is not None else 'not reached'}")
    if not bits:
        return ""
    return "First iteration at which ours matched the seed's final train accuracy: " + (
        "; ".join(bits) + ".\n"
    )


def _relative_costs(tab: PaperTable, entries) -> str:
    """Seconds per iteration divided by gradient descent's, the seed's and ours: the ratios
    carry over between machines where the seconds do not."""
    by_depth: dict[str, dict[str, float]] = {}
    ours_by: dict[str, dict[str, tuple[str, float, float | None]]] = {}
    for _cell, s, key in entries:
        spi = s_per_iter(s)
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
                    show(sv / seed_gd, 2) if sv and seed_gd else "—",
                    show(spi / gd[1], 2) if gd else "—",
                    show(epi, 2) if epi else "—",
                    show(epi / gd[2], 2) if gd and gd[2] and epi else "—",
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
        "best compared with their ratio:\n\n" + md_table(header, rows)
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


def _same_depth(key: str, entries: list[Entry]) -> bool:
    depths = {f"{cell.n_hidden}L" for cell, _, _ in entries}
    return key.split()[-1] in depths


def _not_reached(col: Column, s: SolverRun) -> str:
    if col.ours == "k_eps":
        return f"not reached in {last_k(s)}"
    return "—"


# ----------------------------------------------------------------------------------------------
# Which swept setting lands closest
# ----------------------------------------------------------------------------------------------
def _mean_diffs(ds_by_label: dict[str, list[tuple[str, float]]]):
    """Mean |Δ| per group label, overall and per depth (iteration counts left out)."""
    per: dict[str, float] = {}
    by_depth: dict[str, dict[str, float]] = {}
    for glabel, ds in ds_by_label.items():
        glabel = glabel or "main"
        vals = [d for _, d in ds if not math.isnan(d)]
        if vals:
            per[glabel] = statistics.fmean(vals)
        for depth in sorted({dp for dp, _ in ds}):
            dvals = [d for dp, d in ds if dp == depth and not math.isnan(d)]
            if depth and dvals:
                by_depth.setdefault(depth, {})[glabel] = statistics.fmean(dvals)
    return per, by_depth


def _ranked(values: dict[str, float]) -> str:
    order = sorted(values.items(), key=lambda kv: kv[1])
    return "; ".join(f"{g}: {v:.4f}" for g, v in order) + f" (closest: **{order[0][0]}**)"


def _settings_paragraph(run: RunData, tab: PaperTable, diffs: Diffs) -> str:
    """Which swept setting (L2 convention, initialisation, ...) lands closest to ``tab``,
    overall and depth by depth, with the table's verdict on one swept key."""
    per, by_depth = _mean_diffs(diffs.get(tab.id) or {})
    if len(per) < 2:
        return ""
    swept = ", ".join(k for k in run.sweep if k not in DEPTH_KEYS)
    lines = [f"### Which setting explains the seed's {tab.title}? ({swept})\n"]
    lines.append(
        f"Mean absolute difference between our and the seed's {tab.rank_what}: {_ranked(per)}."
    )
    if len(by_depth) > 1:
        for depth, values in sorted(by_depth.items()):
            if len(values) > 1:
                lines.append(f"- {depth} rows only: {_ranked(values)}.")
        closest = {min(v, key=v.get) for v in by_depth.values() if len(v) > 1}
        if len(closest) > 1:
            lines.append(
                "\nThe depths point different ways, so no single setting swept here explains "
                "the whole table."
            )
    if tab.verdict is not None:
        key, values, text = tab.verdict
        found: dict[str, list[float]] = {}
        for glabel, v in per.items():
            for c in values:
                if f"{key} = {c}" in glabel:
                    found.setdefault(c, []).append(v)
        if len(found) == len(values):
            lines.append(text.format(best=min(found, key=lambda c: min(found[c]))))
    its = sorted({last_k(s) for c in run.cells for s in c.solvers if s.rows})
    if tab.iterations is not None and its and max(its) < tab.iterations:
        lines.append(
            f"(Our runs stopped after {max(its)} iterations, before these settings separate "
            f"fully; the seed's table is after {tab.iterations}.)"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Figures, and the section of a run's report
# ----------------------------------------------------------------------------------------------
def seed_figures(numbers: Sequence[int], drawn: list[tuple[CellRun, str, Path]], rel: str) -> str:
    """Which of the images above redraw each of the seed's figures."""
    lines = ["## The seed's figures\n"]
    for number in numbers:
        fig = FIGURES[number]
        links = []
        for kind in fig.shows:
            for cell, k, p in drawn:
                if k == kind and (fig.n_hidden is None or cell.n_hidden == fig.n_hidden):
                    where = "" if cell.id == "main" else f", {cell.label}"
                    links.append(f"[{kind}{where}]({rel}{p.name})")
        found = "; ".join(links) if links else f"not in this run (the full `{fig.spec}` draws it)"
        lines.append(f"- **Figure {number}** ({fig.caption}) Ours: {found}.")
    return "\n".join(lines) + "\n"


def paper_sections(run: RunData, eps: float, h: str) -> list[str]:
    """The "beside the seed's published numbers" part of a run's report (headings under
    ``h``), or nothing when the spec names no published table."""
    tables, diffs = paper_tables(run, eps)
    if not tables.strip():
        return []
    out = [f"{h}# Beside the seed's published numbers\n"]
    out.append(
        "Every published cell with our value and the absolute difference (abs diff). "
        f"k_ε is eq. 29 with ε = {eps:g}.\n"
    )
    out.append(tables.replace("### ", f"{h}## "))
    for tab in TABLES.values():
        if tab.rank_settings:
            para = _settings_paragraph(run, tab, diffs)
            if para:
                out.append(para.replace("### ", f"{h}## "))
    return out

"""The study's published numbers beside ours: the verdicts on its claims, the tables, the
figures and the headline claim.

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
    STUDY,
    TABLES,
    Column,
    Headline,
    Note,
    PaperTable,
    paper_row_key,
)
from secondorder.report.paper.verdicts import NOT_COMPARABLE, VERDICTS, value_at, verdicts
from secondorder.report.rundata import (
    CellRun,
    RunData,
    SolverRun,
    convergence_iteration,
    final_value,
)
from secondorder.report.text import format_number, md_table, published, show, value_label

__all__ = [
    "headline",
    "ours",
    "paper_sections",
    "paper_tables",
    "seed_figures",
    "suite_summary",
    "summary_section",
]

#: |Δ| per table id and group label: (depth "1L" / "2L" or "", |Δ|; NaN for iteration counts)
Diffs = dict[str, dict[str, list[tuple[str, float]]]]
Entry = tuple[CellRun, SolverRun, str]


def headline(run: RunData) -> Headline | None:
    """The study's claim a bundled ``paper/...`` spec checks, if any."""
    short = run.source.split("/", 1)[-1] if run.source.startswith("paper/") else run.name
    return HEADLINES.get(short)


def ours(
    s: SolverRun, col: Column, epsilon: float, at: int | None = None
) -> tuple[float | int | None, str]:
    """(our value, a footnote mark) for a published column (see ``Column.ours``); a final
    value is read at iteration ``at`` (the last recorded one at or before it) when given."""
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
    if at is not None:
        return value_at(s, col.ours, at)[0], ""
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


def _header(tab: PaperTable, ours_at: list[int]) -> list[str]:
    """The columns; where the study's values are after ``tab.iterations`` and ours after
    another count, both counts are in the header."""
    study, mine = "study", "ours"
    if tab.iterations is not None and ours_at and ours_at != [tab.iterations]:
        study = f"study (it. {tab.iterations})"
        mine = f"ours (it. {', '.join(map(str, ours_at))})"
    header = ["Study row", "Ours"]
    for col in tab.columns:
        header += [f"{col.label}: {study}", mine, "abs diff"]
        if col.error_column:
            header.append("our test error")
    return header


def _our_row(tab, cell, s, key, epsilon, marks, diffs: list[tuple[str, float]]) -> list[str]:
    """Study row, our solver, and per column: the study's value, ours, |Δ| (and our error)."""
    name = s.name + (f" (seed {cell.seed})" if cell.seed else "")
    r: list[str] = [key, name]
    for col in tab.columns:
        seed_v = tab.rows[key].get(col.key)
        v, mark = ours(s, col, epsilon, tab.iterations)
        if mark:
            marks.add(mark)
        r.append(published(seed_v))
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
            r += [published(vals.get(col.key)), "—", "—"]
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
    its = sorted({min(last_k(s), tab.iterations or last_k(s)) for _, s, _ in entries})
    out = [md_table(_header(tab, its), rows)]
    if tab.iterations is not None and its and its != [tab.iterations]:
        out.append(
            f"_Not like with like: our runs stopped after {', '.join(map(str, its))} "
            f"iterations; the study's {tab.title} is after {tab.iterations}._\n"
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
        for note in _notes(run, tab):
            out.append(f"- {note}")
        out.append("")
    return "\n".join(out), diffs


def _notes(run: RunData, tab: PaperTable) -> list[str]:
    """The table's notes that are true of this run (see :class:`Note`)."""
    kind = str((run.spec.get("sampler") or {}).get("kind", "full"))
    swept = set(run.sweep)
    out = []
    for note in tab.notes:
        if not isinstance(note, Note):
            out.append(note)
        elif note.applies(kind, swept, run.name):
            out.append(note.text)
    return out


def _reached_line(tab: PaperTable, entries: list[Entry]) -> str:
    """When each of our solvers first matched the study's final train accuracy (metrics are
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
    return "First iteration at which ours matched the study's final train accuracy: " + (
        "; ".join(bits) + ".\n"
    )


def _relative_costs(tab: PaperTable, entries) -> str:
    """Seconds per iteration divided by gradient descent's, the study's and ours: the ratios
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
        "Study row",
        "Ours",
        "study: s/it ÷ GD's",
        "ours: s/it ÷ GD's",
        "our evaluations / it",
        "÷ GD's",
    ]
    return (
        "Cost per iteration relative to gradient descent (same depth). Function-and-gradient "
        "evaluations per iteration do not depend on the machine; the study's time ratios are "
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
    span = f"{format_number(lo, 3)}-{format_number(hi, 3)}"
    return f"_Load average (1 min) while these solvers ran: {span} on {cores} cores" + (
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
    text = "; ".join(f"{g}: {format_number(v, 4)}" for g, v in order)
    return text + f" (closest: **{order[0][0]}**)"


def _settings_paragraph(run: RunData, tab: PaperTable, diffs: Diffs) -> str:
    """Which swept setting (L2 convention, initialisation, ...) lands closest to ``tab``,
    overall and depth by depth, with the table's verdict on one swept key."""
    per, by_depth = _mean_diffs(diffs.get(tab.id) or {})
    if len(per) < 2:
        return ""
    swept = ", ".join(k for k in run.sweep if k not in DEPTH_KEYS)
    lines = [f"### Which setting explains the study's {tab.title}? ({swept})\n"]
    lines.append(
        f"Mean absolute difference between our and the study's {tab.rank_what}: {_ranked(per)}."
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
            f"fully; the study's table is after {tab.iterations}.)"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Figures, and the section of a run's report
# ----------------------------------------------------------------------------------------------
def seed_figures(numbers: Sequence[int], drawn: list[tuple[CellRun, str, Path]], rel: str) -> str:
    """Which of the images above redraw each of the study's figures."""
    lines = ["## The study's figures\n"]
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
    """The "beside the study's published numbers" part of a run's report (headings under
    ``h``), or nothing when the spec names no published table."""
    tables, diffs = paper_tables(run, eps)
    if not tables.strip():
        return []
    out = [f"{h}# Beside the study's published numbers\n"]
    intro = "Every published cell with our value and the absolute difference (abs diff)."
    tids = [t for t in (run.spec.get("report") or {}).get("paper") or [] if t in TABLES]
    if any(c.ours == "k_eps" for t in tids for c in TABLES[t].columns):
        intro += f" k_ε is eq. 29 with ε = {value_label(eps)}."
    out.append(intro + "\n")
    out.append(tables.replace("### ", f"{h}## "))
    for tab in TABLES.values():
        if tab.rank_settings:
            para = _settings_paragraph(run, tab, diffs)
            if para:
                out.append(para.replace("### ", f"{h}## "))
    return out


def summary_section(run: RunData, eps: float, h: str) -> str:
    """The opening of a report of a bundled ``paper/...`` spec: which study it reproduces, and
    a table of the study's claims this run tests with our numbers and a verdict computed by
    each claim's rule (:mod:`secondorder.report.paper.verdicts`); "" for other runs."""
    claim = headline(run)
    found = verdicts(run, eps, claim.figures if claim else ())
    if claim is None and not found:
        return ""
    out = [f"{h}# Summary\n"]
    out.append(f"This run reproduces part of the study: {STUDY}.\n")
    if claim is not None:
        out.append(f"> The study's claim: {claim.claim}\n")
    if not found:
        out.append("_None of the study's claims can be checked on this run's data._\n")
        return "\n".join(out)
    counts = {v: sum(1 for _, _, f in found if f.verdict == v) for v in VERDICTS}
    said = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    out.append(
        f"Of the study's claims this run tests ({len(found)} checks): {said}. Each verdict "
        "follows from the rule beside it, applied to this run's traces"
        + (
            "; a claim made after more iterations than this run's budget is not comparable: "
            "our numbers are shown, not judged.\n"
            if counts[NOT_COMPARABLE]
            else ".\n"
        )
    )
    grouped = any(g for _, g, _ in found)
    header = ["Claim of the study", "where"] + (["setting"] if grouped else [])
    header += ["what we found", "verdict", "rule"]
    rows = []
    for c, g, f in found:
        setting = [g or "—"] if grouped else []
        verdict = f"**{f.verdict}**" + (f" ({f.reason})" if f.reason else "")
        rows.append([c.text, c.where, *setting, f.ours, verdict, f.rule])
    out.append(md_table(header, rows, align="l" * len(header)))
    return "\n".join(out)


def suite_summary(suite: RunData, epsilon: float | None) -> str:
    """The opening of a suite's report: the study its parts reproduce and, part by part, how
    many of the study's claims each confirms ("" when no part tests a claim)."""
    rows = []
    for name, part in suite.parts:
        eps = (
            float(epsilon)
            if epsilon is not None
            else float((part.spec.get("report") or {}).get("epsilon", 1e-6))
        )
        claim = headline(part)
        found = verdicts(part, eps, claim.figures if claim else ())
        if found:
            counts = [sum(1 for _, _, f in found if f.verdict == v) for v in VERDICTS]
            rows.append([f"[{name}](#{name})", len(found), *counts])
    if not rows:
        return ""
    head = f"This suite reproduces parts of the study: {STUDY}. The study's claims each part "
    head += "tests, with the verdicts of its summary below:\n\n"
    return head + md_table(["part", "checks", *VERDICTS], rows)

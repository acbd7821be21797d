"""``report.md``: a run's spec and environment, a results table per cell, figures, sweeps,
means over seeds, and the study's published numbers beside ours
(:mod:`secondorder.report.paper`).

Everything comes from a :class:`~secondorder.report.rundata.RunData` (read from a run
directory).
"""

from __future__ import annotations

import math
import statistics
import warnings
from pathlib import Path
from typing import Any

from secondorder.errors import DifferentProblems
from secondorder.experiments.io import atomic_write_text
from secondorder.report import figures as figs
from secondorder.report import paper
from secondorder.report.cell_figures import cell_figures, cell_title
from secondorder.report.comparison import (
    Curve,
    curve_labels,
    problem_differences,
    problem_note,
    problem_warning,
)
from secondorder.report.measures import (
    f_star,
    first_k,
    group_label,
    last_k,
    s_per_iter,
    solver_time,
)
from secondorder.report.rundata import (
    CellRun,
    RunData,
    convergence_iteration,
    final_value,
)
from secondorder.report.studies import StudyContext, study_sections
from secondorder.report.styles import series_styles
from secondorder.report.text import (
    drop_empty_columns,
    format_number,
    format_pm,
    md_table,
    show,
    value_label,
)

__all__ = ["render_comparison", "render_report", "run_sections"]


def _epsilon(run: RunData, epsilon: float | None) -> float:
    if epsilon is not None:
        return float(epsilon)
    return float((run.spec.get("report") or {}).get("epsilon", 1e-6))


# ----------------------------------------------------------------------------------------------
# Results of a cell
# ----------------------------------------------------------------------------------------------
def _sampled(cell: CellRun) -> bool:
    return (cell.spec.get("sampler") or {}).get("kind", "full") != "full"


def results_table(cell: CellRun, epsilon: float) -> str:
    fs = f_star(cell)
    header = [
        "Solver",
        "method",
        "status",
        "it.",
        "f (sampled objective, last row)" if _sampled(cell) else "f (objective)",
        "train loss",
        "train acc",
        "dev acc",
        "test acc",
        "‖∇f‖∞",
        f"k_ε (ε={value_label(epsilon)})",
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
        k8 = first_k(s, key, lambda v: v - fs <= 1e-8) if fs is not None else None
        rows.append(
            [
                s.name,
                f"`{s.method}`",
                sm.get("status", "not run" if not s.rows else "running"),
                show(sm.get("nit", last_k(s) if s.rows else None)),
                show(final_value(s.rows, "f"), 6),
                show(final_value(s.rows, "train_loss"), 6),
                show(final_value(s.rows, "train_accuracy")),
                show(final_value(s.rows, "dev_accuracy")),
                show(final_value(s.rows, "test_accuracy")),
                show(final_value(s.rows, "grad_norm"), 3),
                show(convergence_iteration(s.rows, epsilon)),
                show(k8) if fs is not None else "—",
                show(solver_time(s), 3),
                show(s_per_iter(s), 3),
                show(sm.get("nfev")),
                show(sm.get("ngev")),
                show(sm.get("nhev")),
            ]
        )
    header, rows = drop_empty_columns(header, rows)
    return md_table(header, rows)


def _messages(cell: CellRun) -> str:
    lines = []
    for s in cell.solvers:
        msg = s.summary.get("message")
        if msg:
            lines.append(f"- **{s.name}**: {msg}")
        note = _final_f_note(s)
        if note:
            lines.append(f"- **{s.name}**: {note}")
    return "\n".join(lines) + ("\n" if lines else "")


def _final_f_note(s) -> str:
    """Say why the solver's own final f differs from the last row's, when it does: a solver
    that stops at the start of an iteration whose batch changed has evaluated the same iterate
    on the new batch; the tables and the run log show the last row's value."""
    f_end, f_row = s.summary.get("f"), final_value(s.rows, "f")
    if not isinstance(f_end, float) or f_row is None or f_end == f_row:
        return ""
    if not math.isfinite(f_end) or abs(f_end - f_row) <= 1e-12 * max(1.0, abs(f_row)):
        return ""
    if not s.summary.get("objective_changes"):
        return (
            f"its final f = {format_number(f_end, 6)}; its last recorded iteration has "
            f"f = {format_number(f_row, 6)}, the value the tables show."
        )
    return (
        f"its final f = {format_number(f_end, 6)} is the last iterate's objective on the batch "
        f"drawn for the iteration it did not take; the tables show f of its last recorded "
        f"iteration, {format_number(f_row, 6)} (the same iterate on the batch it stepped on)."
    )


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
                [f"{k} = {value_label(cell.point.get(k))}" for k in others]
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
            r = [group_label(cells[0]) or "main", s0.name]
            for key in ("train_loss", "train_accuracy", "dev_accuracy", "test_accuracy"):
                vals = [final_value(c.solvers[i].rows, key) for c in cells]
                vals = [v for v in vals if v is not None]
                if not vals:
                    r.append("—")
                elif len(vals) == 1:
                    r.append(show(vals[0]))
                else:
                    r.append(format_pm(statistics.fmean(vals), statistics.stdev(vals)))
            rows.append(r)
    return f"## Mean ± standard deviation over seeds {seeds}\n\n" + md_table(header, rows)


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
        bits.append(f"load average at the start {format_number(env['load_average'][0], 2)}")
    return "Environment: " + ", ".join(bits) + ".\n"


def _spec_line(spec: dict[str, Any]) -> str:
    bits = []
    data = spec.get("data") or {}
    if data:
        bits.append(
            "data " + ", ".join(f"{k}={value_label(v)}" for k, v in data.items() if k != "root")
        )
    model = spec.get("model") or {}
    if model:
        bits.append("model " + ", ".join(f"{k}={value_label(v)}" for k, v in model.items()))
    if "loss" in spec:
        bits.append(f"loss {spec['loss']}")
    if spec.get("l2"):
        conv = spec.get("l2_convention", "plain")
        m = spec.get("l2_m")
        bits.append(
            f"λ = {value_label(spec['l2'])} "
            f"({conv}{f', m = {m}' if m and conv == 'per-sample' else ''})"
        )
    sampler = spec.get("sampler") or {}
    if sampler:
        bits.append("sampler " + ", ".join(f"{k}={value_label(v)}" for k, v in sampler.items()))
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
    if level == 1:  # a part of a suite leaves its conclusions to the suite's opening
        found = paper.conclusions_section(run, epsilon, fmt, h)
        if found:
            out.append(found)
    summary = paper.summary_section(run, eps, h)
    if summary:
        out.append(summary)
        out.append(f"{h}# The run\n")
    out.append(
        f"Run directory `{run.dir}` (spec `{run.source or run.name}`), status **{run.status}**.\n"
    )
    out.append(_spec_line(run.spec))
    if environment:
        out.append(_environment_line(run.environment))
    # a study's conclusions, tables and figures come first: they are what the run is for
    out += study_sections(run, StudyContext(figdir, fmt, rel, eps, level))
    claim = paper.headline(run)
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
        title = cell_title(run.name, cell)
        for kind, caption, p in cell_figures(cell, figdir, fmt, title, log_y):
            out.append(f"![{caption}]({rel}{p.name})\n")
            drawn.append((cell, kind, p))
    sweep = _sweep_section(run, figdir, fmt, rel)
    if sweep:
        out.append(sweep.replace("## ", f"{h}# ", 1))
    if claim and claim.figures:
        out.append(paper.seed_figures(claim.figures, drawn, rel).replace("## ", f"{h}# ", 1))
    means = _seed_means(run)
    if means:
        out.append(means.replace("## ", f"{h}# ", 1))
    out += paper.paper_sections(run, eps, h)
    return "\n".join(out)


def _remove_old_figures(figdir: Path) -> None:
    """Figures of an earlier report (in either format) go, so that a report in another
    format, or of a run with fewer solvers, leaves no stale image beside it."""
    if figdir.is_dir():
        for path in figdir.rglob("*"):
            if path.suffix in (".png", ".svg") and path.is_file():
                path.unlink()


def render_report(
    run: RunData, target: Path, *, fmt: str = "png", epsilon: float | None = None
) -> Path:
    """Write ``target/report.md`` and ``target/figures/*``; return the report's path."""
    target = Path(target)
    figdir = target / "figures"
    _remove_old_figures(figdir)
    if run.is_suite:
        body = [f"# {run.name}\n"]
        if run.spec.get("description"):
            body.append(f"{run.spec['description']}\n")
        found = paper.conclusions_section(run, epsilon, fmt)
        if found:  # the answers first, then where they come from
            body.append(found)
        body.append(_environment_line(run.environment))
        body.append(paper.suite_summary(run, epsilon))
        eps = epsilon if epsilon is not None else 1e-6
        body += study_sections(run, StudyContext(figdir, fmt, "figures/", eps, 1))
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
    """One table and overlaid curves for several runs (suites contribute their parts).

    Runs that solve different problems (:data:`~secondorder.experiments.spec_tables.PROBLEM_KEYS`
    differ) are still compared: a note at the top names the keys and their values per run, and
    a :class:`~secondorder.errors.DifferentProblems` warning says so. Curves are labelled by
    the spec keys that differ between them; with many, colour stands for the solver and line
    style for the setting (:func:`~secondorder.report.styles.series_styles`), and the legend
    sits under the panels."""
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        names = [f"{r.name} ({r.dir.name})" for r in runs]
    diffs = problem_differences(runs)
    if diffs:
        warnings.warn(problem_warning(names, diffs), DifferentProblems, stacklevel=2)
    flat: list[tuple[str, RunData]] = []
    for name, run in zip(names, runs):
        if run.is_suite:
            flat += [(f"{name}/{n}", p) for n, p in run.parts]
        else:
            flat.append((name, run))
    flat_names = [n for n, _ in flat]
    if len(set(flat_names)) != len(flat_names):
        flat = [(f"{n} ({r.dir.name})", r) for n, r in flat]
    target = Path(target)
    figdir = target / "figures"
    _remove_old_figures(figdir)
    figdir.mkdir(parents=True, exist_ok=True)
    # each run's k_ε with its own report.epsilon unless the caller sets one for all
    eps_of = {id(r): _epsilon(r, epsilon) for _, r in flat}
    curves = [
        Curve(rname, run.spec, cell, s)
        for rname, run in flat
        for cell in run.cells
        for s in cell.solvers
    ]
    pairs, settings, title = curve_labels(curves)
    header = [
        "Run",
        "Setting",
        "Solver",
        "status",
        "it.",
        "train loss",
        "train acc",
        "dev acc",
        "test acc",
        "ε",
        "k_ε",
        "solver s",
        "s / it.",
    ]
    rows = []
    drawn: list[int] = []
    for i, (c, setting) in enumerate(zip(curves, settings)):
        s, run = c.solver, next(r for n, r in flat if n == c.run)
        rows.append(
            [
                c.run,
                show(setting) if setting else "—",
                s.name,
                s.summary.get("status", "—"),
                show(s.summary.get("nit")),
                show(final_value(s.rows, "train_loss"), 6),
                show(final_value(s.rows, "train_accuracy")),
                show(final_value(s.rows, "dev_accuracy")),
                show(final_value(s.rows, "test_accuracy")),
                value_label(eps_of[id(run)]),
                show(convergence_iteration(s.rows, eps_of[id(run)])),
                show(solver_time(s), 3),
                show(s_per_iter(s), 3),
            ]
        )
        if s.rows:
            drawn.append(i)
    header, rows = drop_empty_columns(header, rows, keep=1)
    out = ["# Comparison\n"]
    note = problem_note(names, diffs)
    if note:
        out.append(note)
    out.append("Runs: " + ", ".join(f"`{r.dir}`" for _, r in flat) + ".\n")
    out.append(md_table(header, rows))
    if drawn:
        series: list[figs.Series] = []
        for i in drawn:
            solver, setting = pairs[i]
            label = f"{setting}: {solver}" if setting else solver
            series.append((label, curves[i].solver, None))
        styles = series_styles([(pairs[i][0], pairs[i][1]) for i in drawn], ("solver", title))
        p = figs.loss_figure(series, figdir / f"loss.{fmt}", title="comparison", styles=styles)
        out.append(f"![training loss of every run](figures/{p.name})\n")
        if any("train_accuracy" in r or "test_accuracy" in r for _, s, _ in series for r in s.rows):
            p = figs.accuracy_figure(
                series, figdir / f"accuracy.{fmt}", title="comparison", styles=styles
            )
            out.append(f"![accuracy of every run](figures/{p.name})\n")
    path = target / "report.md"
    atomic_write_text(path, "\n".join(out).rstrip() + "\n")
    return path

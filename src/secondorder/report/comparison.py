"""What the runs of ``secondorder compare`` differ in.

- :func:`problem_differences`: the keys that define the problem
  (:data:`~secondorder.experiments.spec_tables.PROBLEM_KEYS`: data, model, loss, the L2 term,
  the sampler) whose values differ between the runs, each with its values per run. Runs that
  differ there minimise different functions: the comparison says so at its top and warns
  (:class:`~secondorder.errors.DifferentProblems`), and still draws them.
- :func:`curve_labels`: short labels of many curves, built from the spec keys that differ
  between them (``sampler=fixed, sampler.batch_size=100``) instead of a cell's raw label, with
  each curve's solver apart so that a figure can colour by one and dash by the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from secondorder.experiments.spec import problem_of
from secondorder.report.rundata import CellRun, RunData, SolverRun
from secondorder.report.text import md_table, value_label

__all__ = [
    "MAX_KEYS",
    "Curve",
    "curve_labels",
    "problem_differences",
    "problem_note",
    "problem_warning",
    "settings",
]

#: a label lists at most this many differing keys; past it a curve is named by its run
MAX_KEYS = 4
#: the note on different problems shows this many keys; the others are folded away
_NOTE_ROWS = 10
#: spec keys that change no curve: names, what is recorded, where the data are found
_NOT_SETTINGS = (
    "name",
    "description",
    "solvers",
    "sweep",
    "quick",
    "report",
    "metrics",
    "metrics_every",
    "checkpoint_every",
    "threads",
    "seeds",
    "data.root",
    "data.download",
)


def _cells(run: RunData) -> list[CellRun]:
    return [c for _, part in run.parts for c in _cells(part)] if run.is_suite else run.cells


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_text(v)}" for k, v in value.items()) + "}"
    return value_label(value)


def problem_differences(runs: Sequence[RunData]) -> list[tuple[str, list[str]]]:
    """(problem key, its values per run) for every key of the problem that differs between
    the runs; a run's value lists each value its cells (sweep points, parts) take, "—" where
    it has no such key. [] when every run solves the same problems."""
    per_run = [[(problem_of(c.spec), c.spec) for c in _cells(r)] for r in runs]
    keys = list(dict.fromkeys(k for probs in per_run for p, _ in probs for k in p))
    out = []
    for key in keys:
        values, shown = [], []
        for probs in per_run:
            values.append({_text(p[key]) if key in p else "—" for p, _ in probs})
            shown.append(list(dict.fromkeys(_value(key, p, spec) for p, spec in probs)))
        if len({tuple(sorted(v)) for v in values}) > 1:
            out.append((key, [" | ".join(v) for v in shown]))
    return out


def _value(key: str, problem: dict[str, Any], spec: dict[str, Any]) -> str:
    """A problem key's value as compared, and as written where the two differ (fixed batches
    covering the data are the full objective: "full (as written: fixed)")."""
    written = problem_of(spec, normalised=False)
    value = _text(problem[key]) if key in problem else "—"
    if key in written and _text(written[key]) != value:
        return f"{value} (as written: {_text(written[key])})"
    return value


def problem_note(names: Sequence[str], diffs: list[tuple[str, list[str]]]) -> str:
    """The comparison's opening note on runs that solve different problems ("" for none)."""
    if not diffs:
        return ""
    head = (
        "**These runs solve different problems.** Their specs differ in "
        f"{len(diffs)} key{'s' if len(diffs) > 1 else ''} that define the problem (data, "
        "model, loss, L2 term, sampler), so their numbers and curves are of different "
        "functions: compare them knowing that.\n"
    )
    rows = [[k, *(v.replace("|", "\\|") for v in vs)] for k, vs in diffs]
    header, align = ["problem key", *names], "l" * (len(names) + 1)
    text = head + "\n" + md_table(header, rows[:_NOTE_ROWS], align=align)
    if len(rows) > _NOTE_ROWS:
        more = len(rows) - _NOTE_ROWS
        text += (
            f"\n<details><summary>{more} more key{'s' if more > 1 else ''} that differ"
            f"</summary>\n\n{md_table(header, rows[_NOTE_ROWS:], align=align)}\n</details>\n"
        )
    return text


def problem_warning(names: Sequence[str], diffs: list[tuple[str, list[str]]]) -> str:
    """The one-line warning of :func:`problem_note`: the first three keys, each value with the
    runs that have it, and how many more keys differ."""
    bits = []
    for key, values in diffs[:3]:
        runs: dict[str, list[str]] = {}
        for n, v in zip(names, values):
            runs.setdefault(v, []).append(n)
        shown = [
            f"{v} in {', '.join(ns[:3])}{f' and {len(ns) - 3} more' if len(ns) > 3 else ''}"
            for v, ns in runs.items()
        ]
        bits.append(f"{key} ({'; '.join(shown)})")
    more = (
        f", and {len(diffs) - 3} more key{'s' if len(diffs) > 4 else ''}" if len(diffs) > 3 else ""
    )
    return (
        "compare: the runs solve different problems: "
        + ", ".join(bits)
        + more
        + " differ (the comparison says so at its top)"
    )


# ----------------------------------------------------------------------------------------------
# Labels of curves
# ----------------------------------------------------------------------------------------------
@dataclass
class Curve:
    """One curve of a comparison: a solver in a cell of a run (named ``run`` there)."""

    run: str
    spec: dict[str, Any]
    cell: CellRun
    solver: SolverRun


def settings(spec: dict[str, Any]) -> dict[str, Any]:
    """A resolved spec as the dotted keys that may change a curve (tables flattened one level:
    ``sampler.batch_size``), without names, what is recorded and where the data are."""
    out: dict[str, Any] = {}
    for k, v in spec.items():
        if isinstance(v, dict) and k not in ("sweep", "quick", "report"):
            out.update((f"{k}.{kk}", vv) for kk, vv in v.items())
        else:
            out[k] = v
    return {k: v for k, v in out.items() if k not in _NOT_SETTINGS}


def _short(key: str) -> str:
    """``sampler.kind`` → ``sampler``: a table's kind names it."""
    return key[: -len(".kind")] if key.endswith(".kind") else key


def _pairs(values: dict[str, Any]) -> list[tuple[str, Any]]:
    """A sweep point's keys as written, a swept table's keys flattened (``sampler.kind``)."""
    out = []
    for k, v in values.items():
        if isinstance(v, dict):
            out += [(f"{k}.{kk}", vv) for kk, vv in v.items()]
        else:
            out.append((k, v))
    return out


def _text_pairs(pairs: Sequence[tuple[str, Any]]) -> str:
    return ", ".join(f"{_short(k)}={_text(v)}" for k, v in pairs)


def _run_parts(curves: Sequence[Curve]) -> tuple[dict[str, str], str]:
    """What tells the runs apart, per run name: ``key=value`` of the spec keys (not swept)
    that differ between the runs when there are at most :data:`MAX_KEYS` of them, else the
    run's name; and the title of that part ("" for a single run)."""
    specs = {c.run: c.spec for c in curves}
    if len(specs) < 2:
        return dict.fromkeys(specs, ""), ""
    swept = {k for s in specs.values() for k in (s.get("sweep") or {})}
    flat = {n: settings(s) for n, s in specs.items()}
    keys = list(dict.fromkeys(k for d in flat.values() for k in d))
    keys = [k for k in keys if not any(k == w or k.startswith(w + ".") for w in swept)]
    differ = [k for k in keys if len({repr(d.get(k, "—")) for d in flat.values()}) > 1]
    if not differ or len(differ) > MAX_KEYS:
        return {n: n for n in specs}, "run"
    parts = {n: _text_pairs([(k, d[k]) for k in differ if k in d]) for n, d in flat.items()}
    return parts, ", ".join(_short(k) for k in differ)


def curve_labels(curves: Sequence[Curve]) -> tuple[list[tuple[str, str]], list[str], str]:
    """Per curve its (solver, setting) labels; per curve the setting as a table shows it
    (beside the run's own column); and the title of the settings.

    A setting names what differs between the curves in short ``key=value`` text: the spec keys
    that differ between the runs (up to :data:`MAX_KEYS`; past that, or when none do, the
    run's name) and the cell's sweep point as written (``sampler=fixed,
    sampler.batch_size=10``), with its seed when the run has several. Where that leaves two
    curves alike, the run's name comes first."""
    run_part, run_title = _run_parts(curves)
    seeds: dict[str, set[int]] = {}
    for c in curves:
        seeds.setdefault(c.run, set()).add(c.cell.seed)
    points = []
    for c in curves:
        pairs = _pairs(c.cell.point)
        if len(seeds[c.run]) > 1:
            pairs.append(("seed", c.cell.seed))
        points.append(_text_pairs(pairs))
    point_keys = list(dict.fromkeys(_short(k) for c in curves for k, _ in _pairs(c.cell.point))) + (
        ["seed"] if any(len(v) > 1 for v in seeds.values()) else []
    )
    by_keys = run_title not in ("", "run")
    table = [
        ", ".join(x for x in ((run_part[c.run] if by_keys else ""), pt) if x)
        for c, pt in zip(curves, points)
    ]
    named = [", ".join(x for x in (run_part[c.run], pt) if x) for c, pt in zip(curves, points)]
    title = ", ".join(x for x in (run_title, ", ".join(point_keys)) if x)
    pairs = [(c.solver.name, n) for c, n in zip(curves, named)]
    if len(set(pairs)) < len(pairs) and run_title != "run":
        named = [", ".join(x for x in (c.run, n) if x) for c, n in zip(curves, named)]
        pairs = [(c.solver.name, n) for c, n in zip(curves, named)]
        title = ", ".join(x for x in ("run", title) if x)
    return pairs, table, title or "setting"

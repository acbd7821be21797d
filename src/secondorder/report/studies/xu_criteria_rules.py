"""The rules of study ``xu-criteria`` (see :mod:`.xu_criteria`): reading a run's sweeps, its
strict-saddle cells and its sub-sampling cells, and ranking the second-order methods."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from secondorder._format import format_number
from secondorder.experiments.functions import function_f_star
from secondorder.report.rundata import CellRun, RunData, SolverRun
from secondorder.report.studies.minibatch import FIRST_ORDER, Reach, choose_target, reach

__all__ = [
    "SADDLE_TOL",
    "SEP",
    "TARGET",
    "MethodSweep",
    "SaddleOutcome",
    "Setting",
    "Twin",
    "run_cells",
    "is_function",
    "method_sweeps",
    "rank_second_order",
    "saddle_outcomes",
    "study_target",
    "sub_speedups",
    "subsampling_reaches",
    "sweep_settings",
    "twin_runs",
]

#: separates a method's name from its setting in a sweep's solver names
SEP = " · "
#: the test accuracy every setting is timed to
TARGET = 0.80
#: f − f* at most this times |f*| counts as reaching the minimum
SADDLE_TOL = 1e-6


# -- reading the runs -------------------------------------------------------------------------
@dataclass
class Setting:
    """One setting of one method's sweep, timed to the target."""

    group: str
    setting: str
    part: str
    reach: Reach
    final_train: float | None
    status: str

    @property
    def first_order(self) -> bool:
        return self.reach.method in FIRST_ORDER


@dataclass
class MethodSweep:
    """A method's sweep: its settings, the fastest to the target and what the sweep shows."""

    group: str
    settings: list[Setting]

    @property
    def first_order(self) -> bool:
        return self.settings[0].first_order

    @property
    def reached(self) -> list[Setting]:
        return [s for s in self.settings if s.reach.time is not None]

    @property
    def fraction(self) -> float:
        return len(self.reached) / len(self.settings)

    @property
    def fastest(self) -> Setting | None:
        return min(self.reached, key=lambda s: s.reach.time) if self.reached else None

    @property
    def most_accurate(self) -> Setting | None:
        scored = [s for s in self.settings if s.reach.best is not None]
        return max(scored, key=lambda s: s.reach.best) if scored else None

    @property
    def gap(self) -> float | None:
        """train − test accuracy at the end of the most accurate setting."""
        s = self.most_accurate
        if s is None or s.final_train is None or s.reach.final is None:
            return None
        return s.final_train - s.reach.final


def _parts(run: RunData) -> list[tuple[str, RunData]]:
    return list(run.parts) if run.is_suite else [(run.name, run)]


def run_cells(run: RunData) -> list[tuple[str, CellRun]]:
    return [(name, c) for name, part in _parts(run) for c in part.cells]


def is_function(cell: CellRun) -> bool:
    return function_f_star(cell.spec.get("data") or {}) is not None


def _last(s: SolverRun, key: str) -> float | None:
    for r in reversed(s.rows):
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def sweep_settings(run: RunData, target: float) -> list[Setting]:
    """Every solver of a sweep (named ``"<method> · <setting>"``) on a model cell."""
    out = []
    for part, cell in run_cells(run):
        if is_function(cell):
            continue
        for s in cell.solvers:
            if SEP not in s.name:
                continue
            group, setting = s.name.split(SEP, 1)
            status = str(s.summary.get("status", "done"))
            r = reach(s, "", target)
            out.append(Setting(group, setting, part, r, _last(s, "train_accuracy"), status))
    return out


def method_sweeps(settings: Sequence[Setting]) -> list[MethodSweep]:
    """The settings grouped by method, in the order the run met them."""
    groups: dict[str, list[Setting]] = {}
    for s in settings:
        groups.setdefault(s.group, []).append(s)
    return [MethodSweep(g, ss) for g, ss in groups.items()]


def study_target(run: RunData) -> float:
    best = max((s.reach.best for s in sweep_settings(run, TARGET) if s.reach.best), default=None)
    if best is None:  # no sweep: the sub-sampling cells set it
        best = max((r.best for _, r in _sub_raw(run, TARGET) if r.best), default=None)
    return choose_target(best, TARGET)


# -- saddles ----------------------------------------------------------------------------------
@dataclass
class SaddleOutcome:
    """One method from one start near the strict saddle."""

    solver: str
    method: str
    start: float
    f_star: float
    ks: list[int] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    k_min: int | None = None
    word: str = "still at the saddle"
    status: str = ""

    @property
    def reached(self) -> bool:
        return self.k_min is not None


def saddle_outcomes(run: RunData) -> list[SaddleOutcome]:
    """Each solver from each start on the strict-saddle cells (see the module doc)."""
    out = []
    for _, cell in run_cells(run):
        data = cell.spec.get("data") or {}
        if data.get("kind") != "strict-saddle":
            continue
        fs = function_f_star(data)
        scale = abs(fs) if fs else 1.0
        for s in cell.solvers:
            ks, vals = s.column("f")
            o = SaddleOutcome(s.name, s.method, float(data.get("x0_scale", 0.0)), fs)
            o.status = str(s.summary.get("status", "done"))
            o.ks, o.gaps = ks, [v - fs for v in vals]
            o.k_min = next((k for k, g in zip(ks, o.gaps) if g <= SADDLE_TOL * scale), None)
            if o.k_min is not None:
                o.word = f"f* in {o.k_min} it."
            elif vals and vals[-1] < vals[0] - 0.01 * scale:
                o.word = f"left it, f − f* = {format_number(o.gaps[-1], 2)}"
            elif len(vals) > 1:
                o.word = f"still near it, f − f* = {format_number(o.gaps[-1], 2)}"
            out.append(o)
    return out


# -- sub-sampling -----------------------------------------------------------------------------
def _sample_label(table: dict | None) -> str:
    t = table or {"kind": "full"}
    kind = t.get("kind", "full")
    if kind == "full":
        return "all"
    size = t.get("size", t.get("batch_size"))
    return f"{kind} {size}" if size else str(kind)


def _sub_raw(run: RunData, target: float) -> list[tuple[tuple[str, str], Reach]]:
    out = []
    for _, cell in run_cells(run):
        if is_function(cell):
            continue
        g = _sample_label(cell.spec.get("sampler"))
        curv = cell.spec.get("curvature_sampler")  # none: the gradient's samples
        h = _sample_label(curv) if curv else f"{g} (the gradient's)"
        for s in cell.solvers:
            if SEP not in s.name:
                out.append(((g, h), reach(s, g, target)))
    return out


def subsampling_reaches(run: RunData, target: float) -> dict[str, dict[tuple[str, str], Reach]]:
    """Per solver not in a sweep: its reach to ``target`` in each (gradient, curvature) cell."""
    out: dict[str, dict[tuple[str, str], Reach]] = {}
    for key, r in _sub_raw(run, target):
        out.setdefault(r.solver, {})[key] = r
    return out


def sub_speedups(cells: dict[tuple[str, str], Reach]) -> tuple[Reach | None, Reach | None]:
    """(the full-gradient, full-curvature reach; the fastest reach of any sub-sampled cell)."""
    full = cells.get(("all", "all"))
    others = [r for k, r in cells.items() if k != ("all", "all") and r.time is not None]
    return full, (min(others, key=lambda r: r.time) if others else None)


# -- ranking ----------------------------------------------------------------------------------
def rank_second_order(sweeps: Sequence[MethodSweep]) -> list[MethodSweep]:
    """The second-order methods, fastest to the target first (never reaching it last), ties
    and misses ordered by the fraction of the sweep that reaches it, then by best accuracy."""

    def key(m: MethodSweep):
        t = m.fastest.reach.time if m.fastest else math.inf
        acc = m.most_accurate.reach.best if m.most_accurate else 0.0
        return (t, -m.fraction, -acc)

    return sorted((m for m in sweeps if not m.first_order), key=key)


# -- timing noise -----------------------------------------------------------------------------
@dataclass
class Twin:
    """One computation run twice (the same method and the same f at every iteration, once in
    a sweep and once in a sub-sampling cell): the spread of its two times to the target is the
    timing noise of the machine it ran on."""

    first: Reach
    second: Reach

    @property
    def ratio(self) -> float:
        a, b = sorted((self.first.time or 0.0, self.second.time or 0.0))
        return b / a if a > 0 else math.inf


def twin_runs(
    settings: Sequence[Setting], subs: dict[str, dict[tuple[str, str], Reach]]
) -> list[Twin]:
    """Every pair of a sweep setting and a sub-sampling run that computed the same iterates
    (identical f column) and both reached the target."""
    out = []
    for by_cell in subs.values():
        for r in by_cell.values():
            if r.run is None or r.time is None:
                continue
            f_r = r.run.column("f")
            for s in settings:
                q = s.reach
                same = q.method == r.method and q.run is not None and q.time is not None
                if same and q.run.column("f") == f_r:
                    out.append(Twin(q, r))
    return out

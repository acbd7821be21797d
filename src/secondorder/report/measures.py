"""What the report reads off a solver's trace: iterations, seconds, first iterations at which
a condition holds; and how cells are grouped (sweep values apart from the depth)."""

from __future__ import annotations

import math
from collections.abc import Callable

from secondorder.experiments.functions import function_f_star
from secondorder.report.rundata import CellRun, SolverRun, final_value, solver_entry
from secondorder.report.text import value_label

__all__ = [
    "DEPTH_KEYS",
    "budget",
    "f_star",
    "first_k",
    "group_key",
    "group_label",
    "last_k",
    "s_per_iter",
    "solver_time",
    "time_at",
]


def last_k(s: SolverRun) -> int:
    ks = [r.get("k") for r in s.rows if isinstance(r.get("k"), int)]
    return max(ks) if ks else 0


def budget(cell: CellRun, s: SolverRun) -> int | None:
    """The iterations ``s`` was allowed in ``cell``: its own ``max_iter``, else the spec's; a
    solver that has not finished (an interrupted run) counts only those it recorded."""
    cap = s.summary.get("max_iter")
    if cap is None:
        cap = solver_entry(cell.spec, s.name).get("max_iter", cell.spec.get("max_iter"))
    if not isinstance(cap, int) or isinstance(cap, bool):
        return None
    finished = s.summary.get("finished", bool(s.summary.get("status")))
    return cap if finished else min(cap, last_k(s))


def solver_time(s: SolverRun) -> float | None:
    for key in ("solver_time", "time"):
        v = final_value(s.rows, key)
        if v is not None:
            return v
    return None


def time_at(s: SolverRun, k: int) -> float | None:
    for r in s.rows:
        if r.get("k") == k:
            for key in ("solver_time", "time"):
                if isinstance(r.get(key), (int, float)):
                    return float(r[key])
    return None


def s_per_iter(s: SolverRun) -> float | None:
    t, k = solver_time(s), last_k(s)
    return t / k if t is not None and k > 0 else None


def f_star(cell: CellRun) -> float | None:
    """The optimal value f* a cell's f − f* is measured from: the spec's ``report.f_star``,
    that of a test function (0 for Rosenbrock), else None."""
    rep = cell.spec.get("report") or {}
    if "f_star" in rep:
        return float(rep["f_star"])
    return function_f_star(cell.spec.get("data") or {})


def first_k(s: SolverRun, key: str, holds: Callable[[float], bool]) -> int | None:
    """The first recorded iteration whose finite ``key`` value satisfies ``holds``."""
    for r in s.rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and holds(v):
            return int(r.get("k", 0))
    return None


#: sweep keys that set the depth, which by-layer tables split into their "1L" / "2L" rows
DEPTH_KEYS = ("model.hidden",)


def group_key(cell: CellRun) -> tuple:
    return tuple((k, repr(v)) for k, v in cell.point.items() if k not in DEPTH_KEYS and k != "seed")


def group_label(cell: CellRun) -> str:
    bits = [f"{k} = {value_label(v)}" for k, v in cell.point.items() if k not in DEPTH_KEYS]
    return ", ".join(bits)

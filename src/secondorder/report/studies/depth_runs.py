"""What the depth study reads of a run (:mod:`.depth`): its cells by activation and depth,
each solver's losses, per-layer metrics and iteration budget."""

from __future__ import annotations

import math
from typing import Any

from secondorder.report.rundata import CellRun, RunData, SolverRun, final_value, solver_entry

__all__ = [
    "best_run",
    "budget",
    "by_name",
    "f_at",
    "final_list",
    "final_loss",
    "grid_of",
    "k_equal",
    "methods",
    "plateau_loss",
    "start_row",
]


def grid_of(run: RunData) -> dict[str, dict[int, CellRun]]:
    """Cells by activation, then by depth L (the first seed of each)."""
    out: dict[str, dict[int, CellRun]] = {}
    for cell in run.cells:
        L = cell.n_hidden
        if L is None:
            continue
        act = str((cell.spec.get("model") or {}).get("activation", "?"))
        out.setdefault(act, {}).setdefault(L, cell)
    return out


def f_at(s: SolverRun, k: int | None = None) -> float | None:
    """The objective f at iteration k (the last one reached), or at the end when k is None."""
    ks, fs = s.column("f")
    if not fs:
        return None
    if k is None:
        return fs[-1]
    best = [f for kk, f in zip(ks, fs) if kk <= k]
    return best[-1] if best else None


def final_loss(s: SolverRun) -> float:
    v = final_value(s.rows, "train_loss")
    v = f_at(s) if v is None else v
    return math.nan if v is None else v


def start_row(cell: CellRun) -> dict[str, Any]:
    """The first row recorded with metrics (θ₀ is the same for every solver of a cell)."""
    for s in cell.solvers:
        if s.rows and "layer_grad_norms" in s.rows[0]:
            return s.rows[0]
    return cell.solvers[0].rows[0] if cell.solvers and cell.solvers[0].rows else {}


def methods(grid: dict[str, dict[int, CellRun]]) -> list[SolverRun]:
    """One SolverRun per solver name, in the spec's order (for names and methods)."""
    for cells in grid.values():
        for cell in cells.values():
            return list(cell.solvers)
    return []


def k_equal(grid: dict[str, dict[int, CellRun]]) -> int:
    """The fewest iterations any solver ran: the iteration where all are compared."""
    ks = [s.iterations for cells in grid.values() for c in cells.values() for s in c.solvers]
    return max(1, min(ks, default=1))


def plateau_loss(spec: dict[str, Any]) -> float | None:
    """log K, the loss of the best constant predictor of K balanced classes (cross-entropy)."""
    if spec.get("loss") != "cross_entropy":
        return None
    model, data = spec.get("model") or {}, spec.get("data") or {}
    if model.get("widths"):
        k = model["widths"][-1]
    else:
        k = {"fashion-mnist": 10, "random": data.get("n_classes", 3)}.get(data.get("kind"))
    return math.log(k) if k and k > 1 else None


def budget(cell: CellRun, name: str) -> int:
    """The iterations a solver was given: its own ``max_iter``, else the spec's."""
    own = solver_entry(cell.spec, name).get("max_iter")
    return int(cell.spec.get("max_iter", 0) if own is None else own)


def final_list(s: SolverRun, key: str) -> list[float] | None:
    """The last per-layer list recorded in column ``key``."""
    for r in reversed(s.rows):
        if isinstance(r.get(key), list) and r[key]:
            return [float(v) for v in r[key]]
    return None


def best_run(cell: CellRun) -> SolverRun:
    """The cell's solver with the lowest final training loss."""
    return min(cell.solvers, key=lambda s: (not math.isfinite(final_loss(s)), final_loss(s)))


def by_name(cell: CellRun, name: str) -> SolverRun:
    return next(s for s in cell.solvers if s.name == name)


# -- conclusions ----------------------------------------------------------------------------------

"""One solver's part of a run: its ``minimize`` arguments, the call, and its trace rows.

:class:`Recorder` appends one row per iteration (the solver's columns, the metrics every few
iterations, the clocks) to the solver's trace file; :func:`call_solver` makes one call of the
solver and shows each new warning once. The runner (:mod:`.runner`) drives them segment by
segment.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from secondorder.experiments import rundir
from secondorder.experiments.problems import Problem
from secondorder.experiments.progress import Progress, warning_line
from secondorder.experiments.spec import Cell

__all__ = ["Recorder", "SolverJob", "call_solver", "solver_kwargs"]


def solver_kwargs(spec: dict[str, Any], solver: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``minimize`` from a ``[[solvers]]`` table (max_iter apart)."""
    kw: dict[str, Any] = {}
    ls = solver.get("line_search")
    if ls is not None:
        kw["line_search"] = None if ls == "none" else ls
    for key in ("gtol", "ftol", "max_evals", "max_time"):
        if key in solver:
            kw[key] = solver[key]
    kw.update(solver.get("options") or {})
    return kw


@dataclass
class SolverJob:
    cell: Cell
    cell_dir: Path
    solver: dict[str, Any]
    slug: str
    run_dir: Path


@dataclass
class Recorder:
    """Appends one trace row per iteration: the solver's columns, the metrics every
    ``every`` iterations, and the clocks (solver time without the metrics, wall time)."""

    problem: Problem
    rows: list[dict[str, Any]]
    trace: rundir.TraceFile
    progress: Progress
    every: int
    metrics_time: float
    wall_start: float

    def record(self, row: dict[str, Any], theta_k: torch.Tensor | None, force: bool) -> None:
        k = int(row.get("k", len(self.rows)))
        # the solver's clock includes the metrics recorded so far: take them out
        if "time" in row and isinstance(row["time"], float):
            row["solver_time"] = max(0.0, row["time"] - self.metrics_time)
        if theta_k is not None and (force or k % self.every == 0):
            t0 = time.perf_counter()
            row.update(self.problem.metrics(theta_k.detach()))
            self.metrics_time += time.perf_counter() - t0
        row["metrics_time"] = self.metrics_time
        row["wall_time"] = time.perf_counter() - self.wall_start
        self.rows.append(row)
        self.trace.append(row)
        self.progress.update(row, k)

    def finish_rows(self, theta: torch.Tensor) -> None:
        """Make sure the last row carries metrics (recorded every few iterations otherwise)."""
        if not self.rows:
            return
        last = self.rows[-1]
        if any(k in last for k in ("train_loss", "train_accuracy", "x")):
            return
        t0 = time.perf_counter()
        last.update(self.problem.metrics(theta))
        self.metrics_time += time.perf_counter() - t0


def call_solver(minimize_fn, obj, theta, method, callback, call, seen, progress, name):
    """One call of the solver; each new warning is shown once and kept for the summary."""
    scipy = method.startswith("scipy:")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = minimize_fn(
            obj, theta, method=method[6:] if scipy else method, callback=callback, **call
        )
    for w in caught:
        text = str(w.message)
        if text not in seen:
            seen.append(text)
            progress.write(warning_line(name, w))
    return res

"""Reports of runs: figures and Markdown tables drawn from run directories only.

Nothing here touches a live solver or objective: :func:`load_run` (:mod:`.rundata`) reads what
the runner wrote, through :mod:`secondorder.experiments.rundir` (``run.json``, ``spec.toml``,
``environment.json``, ``summary.json`` and the traces ``trace/<solver>.jsonl``), so any past
run can be redrawn. :func:`write_report` makes ``report.md`` and its figures for one run (or a
suite of runs); :func:`write_comparison` puts several runs side by side.
"""

from __future__ import annotations

import os
from pathlib import Path

from secondorder.report.markdown import render_comparison, render_report
from secondorder.report.rundata import (
    TIME_COLUMNS,
    CellRun,
    RunData,
    SolverRun,
    convergence_iteration,
    final_value,
    load_run,
)

__all__ = [
    "TIME_COLUMNS",
    "CellRun",
    "RunData",
    "SolverRun",
    "convergence_iteration",
    "final_value",
    "load_run",
    "write_comparison",
    "write_report",
]


def write_report(
    run_dirs: list[str | os.PathLike[str]] | str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    fmt: str = "png",
    epsilon: float | None = None,
) -> list[Path]:
    """Write ``report.md`` and figures for each run; return the report paths.

    The report of a run goes to ``RUN/report/`` unless ``out`` is given (with several runs,
    ``out/<run name>/``)."""
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    paths = []
    for rd in run_dirs:
        run = load_run(rd)
        if out is None:
            target = run.dir / "report"
        elif len(run_dirs) == 1:
            target = Path(out)
        else:
            target = Path(out) / run.dir.name
        paths.append(render_report(run, target, fmt=fmt, epsilon=epsilon))
    return paths


def write_comparison(
    run_dirs: list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    fmt: str = "png",
    epsilon: float | None = None,
) -> Path:
    """One table and overlaid curves for several runs; returns the path of ``report.md``."""
    runs = [load_run(r) for r in run_dirs]
    return render_comparison(runs, Path(out), fmt=fmt, epsilon=epsilon)

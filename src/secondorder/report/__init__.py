"""Reports of runs: figures and Markdown tables drawn from run directories only.

Nothing here touches a live solver or objective: :func:`load_run` reads what
:mod:`secondorder.experiments.runner` wrote (``run.json``, ``spec.toml``, ``environment.json``,
``summary.json`` and the per-iteration traces ``trace/<solver>.jsonl``), so any past run can be
redrawn. :func:`write_report` makes ``report.md`` and its figures for one run (or a suite of
runs); :func:`write_comparison` puts several runs side by side.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

#: trace columns that measure wall-clock time (they differ between identical runs)
TIME_COLUMNS = ("time", "solver_time", "metrics_time", "wall_time")


@dataclass
class SolverRun:
    """One solver's trace and summary in one cell of a run."""

    name: str
    slug: str
    method: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    paper_row: str | None = None
    index: int = 0

    def column(self, key: str) -> tuple[list[float], list[float]]:
        """(iterations, values) of the rows that have a finite number in ``key``."""
        ks, vs = [], []
        for r in self.rows:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                ks.append(r.get("k", len(ks)))
                vs.append(float(v))
        return ks, vs

    def xy(self, x: str, y: str) -> tuple[list[float], list[float]]:
        """Paired values of columns x and y (rows having both)."""
        xs, ys = [], []
        for r in self.rows:
            a, b = r.get(x), r.get(y)
            if _num(a) and _num(b):
                xs.append(float(a))
                ys.append(float(b))
        return xs, ys

    @property
    def iterations(self) -> int:
        return int(self.summary.get("nit", self.rows[-1].get("k", 0) if self.rows else 0))


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class CellRun:
    """One grid point (sweep values and seed) of a run."""

    id: str
    dir: Path
    point: dict[str, Any]
    seed: int
    spec: dict[str, Any]
    solvers: list[SolverRun]

    @property
    def label(self) -> str:
        bits = [f"{k} = {_fmt_value(v)}" for k, v in self.point.items()]
        if self.seed:
            bits.append(f"seed {self.seed}")
        return ", ".join(bits) if bits else "main"

    @property
    def n_hidden(self) -> int | None:
        """The number of hidden layers of the cell's model (None for a plain function)."""
        model = self.spec.get("model") or {}
        if model.get("kind") == "logistic":
            return 0
        if "hidden" in model:
            return len(model["hidden"])
        if "widths" in model:
            return len(model["widths"]) - 2
        return None


def _fmt_value(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


@dataclass
class RunData:
    """Everything a report needs from one run directory."""

    dir: Path
    name: str
    source: str
    spec: dict[str, Any]
    environment: dict[str, Any]
    summary: dict[str, Any]
    meta: dict[str, Any]
    cells: list[CellRun] = field(default_factory=list)
    parts: list[tuple[str, RunData]] = field(default_factory=list)

    @property
    def is_suite(self) -> bool:
        return bool(self.parts)

    @property
    def sweep(self) -> dict[str, list]:
        return dict(self.spec.get("sweep") or {})

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "unknown"))


def _read_json(path: Path) -> Any:
    from secondorder.experiments.io import read_json

    return read_json(path)


def load_run(path: str | os.PathLike[str]) -> RunData:
    """Read a run directory (or a suite of runs) written by the runner."""
    from secondorder.experiments.io import read_jsonl

    root = Path(path).expanduser()
    meta_path = root / "run.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{root} is not a run directory (no run.json); make one with `secondorder run SPEC`"
        )
    meta = _read_json(meta_path)
    from secondorder.experiments.spec import tomllib

    with open(root / "spec.toml", "rb") as f:
        spec = tomllib.load(f)
    env_path = root / "environment.json"
    environment = _read_json(env_path) if env_path.is_file() else {}
    sum_path = root / "summary.json"
    summary = _read_json(sum_path) if sum_path.is_file() else {}
    run = RunData(
        dir=root,
        name=meta.get("name", root.name),
        source=meta.get("source", ""),
        spec=spec,
        environment=environment,
        summary=summary,
        meta=meta,
    )
    if meta.get("kind") == "suite":
        for part in meta.get("parts", []):
            run.parts.append((part["name"], load_run(root / part["dir"])))
        return run
    solvers_meta = meta.get("solvers", [])
    cells_summary = summary.get("cells", {})
    for c in meta.get("cells", []):
        cdir = root / c["dir"] if c["dir"] not in ("", ".") else root
        cell_spec = spec
        point_path = cdir / "point.json"
        if point_path.is_file():
            cell_spec = _read_json(point_path).get("spec", spec)
        solvers = []
        csum = cells_summary.get(c["id"], {}).get("solvers", {})
        for i, s in enumerate(solvers_meta):
            trace_path = cdir / "trace" / f"{s['slug']}.jsonl"
            rows = read_jsonl(trace_path) if trace_path.is_file() else []
            spec_solver = _solver_entry(cell_spec, s["name"])
            solvers.append(
                SolverRun(
                    name=s["name"],
                    slug=s["slug"],
                    method=s.get("method", ""),
                    rows=rows,
                    summary=csum.get(s["name"], {}),
                    options=spec_solver.get("options", {}),
                    paper_row=spec_solver.get("paper_row"),
                    index=i,
                )
            )
        run.cells.append(
            CellRun(
                id=c["id"],
                dir=cdir,
                point=c.get("point", {}),
                seed=int(c.get("seed", 0)),
                spec=cell_spec,
                solvers=solvers,
            )
        )
    return run


def _solver_entry(spec: dict[str, Any], name: str) -> dict[str, Any]:
    for s in spec.get("solvers", []):
        if s.get("name", s.get("method")) == name:
            return s
    return {}


def convergence_iteration(rows: list[dict[str, Any]], epsilon: float, key: str = "f") -> int | None:
    """k_ε of eq. 29: the first iteration k ≥ 1 with |f_k − f_{k−1}| ≤ ε (None if never).

    Rows whose step is 0 (a rejected trust-region step leaves f unchanged) are skipped, so a
    rejection does not count as convergence."""
    prev = None
    for r in rows:
        f = r.get(key)
        if not _num(f):
            continue
        k = r.get("k", 0)
        if prev is not None and k >= 1:
            step = r.get("step")
            if not (_num(step) and step == 0) and abs(f - prev) <= epsilon:
                return int(k)
        prev = f
    return None


def final_value(rows: list[dict[str, Any]], key: str) -> float | None:
    """The last finite value of a column (metrics are recorded every few iterations)."""
    for r in reversed(rows):
        v = r.get(key)
        if _num(v):
            return float(v)
    return None


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
    from secondorder.report.markdown import render_report

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
    from secondorder.report.markdown import render_comparison

    runs = [load_run(r) for r in run_dirs]
    return render_comparison(runs, Path(out), fmt=fmt, epsilon=epsilon)

"""What a report reads: a run directory as plain data (:class:`RunData`, :class:`CellRun`,
:class:`SolverRun`), read through :mod:`secondorder.experiments.rundir` (never live objects), and
the two measures of a trace every table uses (eq. 29's k_ε, the last recorded value)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secondorder.experiments import rundir
from secondorder.experiments.checkpoint import Checkpoint
from secondorder.experiments.rundir import TIME_COLUMNS
from secondorder.report.text import value_label

__all__ = [
    "TIME_COLUMNS",
    "CellRun",
    "RunData",
    "SolverRun",
    "convergence_iteration",
    "final_theta",
    "final_value",
    "load_run",
    "solver_entry",
]


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
        bits = [f"{k} = {value_label(v)}" for k, v in self.point.items()]
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


def load_run(path: str | os.PathLike[str]) -> RunData:
    """Read a run directory (or a suite of runs) written by the runner."""
    root = Path(path).expanduser()
    meta = rundir.read_meta(root, "; make one with `secondorder run SPEC`")
    spec = rundir.read_spec_toml(root)
    summary = rundir.read_summary(root)
    run = RunData(
        dir=root,
        name=meta.get("name", root.name),
        source=meta.get("source", ""),
        spec=spec,
        environment=rundir.read_environment(root),
        summary=summary,
        meta=meta,
    )
    if meta.get("kind") == "suite":
        for part in meta.get("parts", []):
            run.parts.append((part["name"], load_run(root / part["dir"])))
        return run
    cells_summary = summary.get("cells", {})
    for c in meta.get("cells", []):
        cdir = root / c["dir"] if c["dir"] not in ("", ".") else root
        cell_spec = rundir.read_point_spec(cdir) or spec
        csum = cells_summary.get(c["id"], {}).get("solvers", {})
        run.cells.append(
            CellRun(
                id=c["id"],
                dir=cdir,
                point=c.get("point", {}),
                seed=int(c.get("seed", 0)),
                spec=cell_spec,
                solvers=_solver_runs(meta.get("solvers", []), cdir, cell_spec, csum),
            )
        )
    return run


def _solver_runs(solvers_meta, cdir: Path, cell_spec, csum) -> list[SolverRun]:
    out = []
    for i, s in enumerate(solvers_meta):
        spec_solver = solver_entry(cell_spec, s["name"])
        out.append(
            SolverRun(
                name=s["name"],
                slug=s["slug"],
                method=s.get("method", ""),
                rows=rundir.read_trace(cdir, s["slug"]),
                summary=csum.get(s["name"], {}),
                options=spec_solver.get("options", {}),
                paper_row=spec_solver.get("paper_row"),
                index=i,
            )
        )
    return out


def solver_entry(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``[[solvers]]`` table of the solver called ``name`` in a resolved spec ({} if none)."""
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


def final_theta(cell: CellRun, s: SolverRun) -> list[float] | None:
    """The solver's last iterate θ, read from its checkpoint (None when there is none)."""
    ckpt = Checkpoint.load(rundir.checkpoint_path(cell.dir, s.slug))
    if ckpt is None or ckpt.theta is None:
        return None
    return [float(v) for v in ckpt.theta.reshape(-1)]

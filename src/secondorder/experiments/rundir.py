"""The run directory: its layout, and the one writer and reader of every file in it.

Layout::

    RUN/
      run.json             what was run: name, source, cells (grid points), solvers
      spec.toml            the resolved spec (defaults filled in; --quick and --set applied)
      environment.json     versions, threads, device, host, git commit, command line
      summary.json         per cell and solver: status, counts, final metrics; run status
      trace/<solver>.jsonl one JSON line per iteration, appended and flushed as it runs
      trace/<solver>.csv   the same rows as CSV, written when the solver finishes
      checkpoints/<solver>.pt  θ, solver state, iteration, rows so far, RNG states

A spec with a ``[sweep]`` or several ``seeds`` gives one subdirectory per grid point (each with
its own ``point.json``, ``trace/`` and ``checkpoints/``); a suite (``[[parts]]``) gives one run
directory per part, listed in the suite's ``run.json``.

The runner writes through this module; ``secondorder resume`` and the report read through it.
Every whole-file write is atomic (:mod:`secondorder.experiments.io`).
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from secondorder.experiments import io
from secondorder.experiments.schema import RunDirError, slugify
from secondorder.experiments.spec_toml import read_toml, to_toml

if TYPE_CHECKING:  # annotations only: spec.py re-exports check_run_dir from here
    from secondorder.experiments.spec import Cell, Spec

__all__ = [
    "FORMAT",
    "TIME_COLUMNS",
    "TraceFile",
    "cell_dir",
    "checkpoint_path",
    "check_run_dir",
    "default_run_dir",
    "read_environment",
    "read_meta",
    "read_point_spec",
    "read_spec_toml",
    "read_summary",
    "read_trace",
    "relative",
    "write_environment",
    "write_meta",
    "write_summary",
]

#: the version of the layout, in run.json and in every checkpoint
FORMAT = 1
#: trace columns that measure wall-clock time (they differ between identical runs)
TIME_COLUMNS = ("time", "solver_time", "metrics_time", "wall_time")

RUN_JSON = "run.json"
SPEC_TOML = "spec.toml"
ENVIRONMENT_JSON = "environment.json"
SUMMARY_JSON = "summary.json"
POINT_JSON = "point.json"
TRACE_DIR = "trace"
CHECKPOINT_DIR = "checkpoints"


# ----------------------------------------------------------------------------------------------
# The directory itself
# ----------------------------------------------------------------------------------------------
def check_run_dir(path: str | os.PathLike[str], *, must_be_new: bool = True) -> Path:
    """Create ``path`` (if needed) and prove it writable; refuse a directory holding a run."""
    path = Path(path).expanduser()
    if must_be_new and path.exists():
        if not path.is_dir():
            raise RunDirError(f"run directory {path} exists and is not a directory")
        if (path / RUN_JSON).exists() or (path / SPEC_TOML).exists():
            raise RunDirError(
                f"run directory {path} already holds a run; continue it with "
                f"`secondorder resume {path}` or choose another --run-dir"
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"run directory {path} is not writable: {err.strerror or err}") from None
    return path


def default_run_dir(spec: Spec, base: str | os.PathLike[str] = "runs") -> Path:
    """``runs/<spec name>-<UTC time>``."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(base) / f"{slugify(spec.name.replace('/', '-'))}-{stamp}"


def cell_dir(run_dir: Path, cell: Cell, n_cells: int) -> Path:
    """Where a cell's traces and checkpoints go: the run directory itself for a single cell."""
    return run_dir if n_cells == 1 else run_dir / cell.id


def relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (as written in summary.json), or as it is."""
    try:
        rel = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)
    return rel or "."


# ----------------------------------------------------------------------------------------------
# run.json, spec.toml, point.json
# ----------------------------------------------------------------------------------------------
def _run_meta(spec: Spec) -> dict[str, Any]:
    if spec.is_suite:
        return {
            "format": FORMAT,
            "kind": "suite",
            "name": spec.name,
            "source": spec.source,
            "parts": [{"name": n, "dir": n} for n, _ in spec.parts],
        }
    cells = spec.cells()
    return {
        "format": FORMAT,
        "kind": "run",
        "name": spec.name,
        "source": spec.source,
        "cells": [
            {
                "id": c.id,
                "dir": "." if len(cells) == 1 else c.id,
                "point": c.point,
                "seed": c.seed,
                "label": c.label,
            }
            for c in cells
        ],
        "solvers": [
            {"name": s["name"], "slug": slugify(s["name"]), "method": s["method"]}
            for s in spec.data["solvers"]
        ],
    }


def write_meta(spec: Spec, run_dir: Path) -> None:
    """run.json, spec.toml and (for a grid) every cell's point.json."""
    if not spec.is_suite:
        cells = spec.cells()
        if len(cells) > 1:
            for c in cells:
                io.write_json(
                    run_dir / c.id / POINT_JSON,
                    {"id": c.id, "point": c.point, "seed": c.seed, "spec": c.spec},
                )
    io.write_json(run_dir / RUN_JSON, _run_meta(spec))
    header = (
        f"# resolved spec of {spec.source or spec.name} (defaults filled in); "
        "`secondorder resume` reads this file\n"
    )
    io.atomic_write_text(run_dir / SPEC_TOML, header + to_toml(spec.data))


def _read_object(path: Path) -> dict[str, Any]:
    """A run file holding one JSON object; :class:`~.io.CheckpointError` naming the file when
    it holds anything else (a damaged file must not surface as a crash of its reader)."""
    try:
        value = io.read_json(path)
    except ValueError as err:  # not JSON, or not UTF-8
        raise io.CheckpointError(f"{path} is damaged: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise io.CheckpointError(
            f"{path} is damaged: expected a JSON object, got {type(value).__name__}"
        )
    return value


def read_meta(run_dir: Path, hint: str = "") -> dict[str, Any]:
    """run.json; :class:`FileNotFoundError` (followed by ``hint``) when there is none."""
    path = run_dir / RUN_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no run.json){hint}")
    return _read_object(path)


def read_spec_toml(run_dir: Path) -> dict[str, Any]:
    """The resolved spec saved in spec.toml, as a dict."""
    return read_toml(run_dir / SPEC_TOML)


def read_point_spec(cell_path: Path) -> dict[str, Any] | None:
    """The resolved spec of one grid point (None for a run with a single cell)."""
    path = cell_path / POINT_JSON
    return _read_object(path).get("spec") if path.is_file() else None


# ----------------------------------------------------------------------------------------------
# environment.json, summary.json
# ----------------------------------------------------------------------------------------------
def write_environment(run_dir: Path, env: dict[str, Any]) -> None:
    io.write_json(run_dir / ENVIRONMENT_JSON, env)


def read_environment(run_dir: Path) -> dict[str, Any]:
    path = run_dir / ENVIRONMENT_JSON
    return _read_object(path) if path.is_file() else {}


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json: ``{"status": ..., "cells": {id: {"solvers": {name: entry}}}}`` (a suite's
    has the status only)."""
    io.write_json(run_dir / SUMMARY_JSON, summary)


def read_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json, or ``{}`` before the first solver finished."""
    path = run_dir / SUMMARY_JSON
    return _read_object(path) if path.is_file() else {}


# ----------------------------------------------------------------------------------------------
# Traces and checkpoints
# ----------------------------------------------------------------------------------------------
def checkpoint_path(cell_path: Path, slug: str) -> Path:
    return cell_path / CHECKPOINT_DIR / f"{slug}.pt"


def _trace_path(cell_path: Path, slug: str, ext: str = "jsonl") -> Path:
    return cell_path / TRACE_DIR / f"{slug}.{ext}"


def read_trace(cell_path: Path, slug: str) -> list[dict[str, Any]]:
    """One solver's trace rows (``[]`` when it has not started)."""
    path = _trace_path(cell_path, slug)
    return io.read_jsonl(path) if path.is_file() else []


class TraceFile:
    """One solver's trace: rewritten from a checkpoint's rows, then appended row by row, and
    written whole (JSON Lines and CSV) when the solver finishes."""

    def __init__(self, cell_path: Path, slug: str, rows: list[dict[str, Any]]) -> None:
        self.cell_path = cell_path
        self.slug = slug
        self.path = _trace_path(cell_path, slug)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        io.write_jsonl(self.path, rows)  # drop rows written after the checkpoint
        self._handle: IO[str] | None = None

    def open(self) -> None:
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - close() closes

    def append(self, row: dict[str, Any]) -> None:
        assert self._handle is not None
        io.append_jsonl(self._handle, row)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def finish(self, rows: list[dict[str, Any]]) -> None:
        io.write_jsonl(self.path, rows)
        io.write_csv(_trace_path(self.cell_path, self.slug, "csv"), rows)

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
Every whole-file write is atomic (:mod:`secondorder.experiments.io`). ``run.json`` is written
last when a run directory is created: a directory without it was never started, and ``run``
may start over in it. ``run.json`` records the SHA-256 of the resolved spec and a copy of it,
so that a resume refuses an edited ``spec.toml`` and shows what changed. A run or resume holds
an exclusive lock on ``RUN/.lock`` (released by the kernel, even on ``SIGKILL``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from secondorder.experiments import io
from secondorder.experiments.schema import RunDirError, slugify
from secondorder.experiments.spec_toml import read_toml, to_toml

if TYPE_CHECKING:  # annotations only: spec.py re-exports check_run_dir from here
    from secondorder.experiments.spec import Cell, Spec

__all__ = [
    "FORMAT",
    "RunDirError",
    "clean_temporary_files",
    "lines_digest",
    "lock",
    "read_trace_lines",
    "spec_digest",
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
LOCK = ".lock"


# ----------------------------------------------------------------------------------------------
# The directory itself
# ----------------------------------------------------------------------------------------------
def check_run_dir(path: str | os.PathLike[str], *, must_be_new: bool = True) -> Path:
    """Create ``path`` (if needed) and prove it writable; refuse a directory holding a run."""
    path = Path(path).expanduser()
    if must_be_new and path.exists():
        if not path.is_dir():
            raise RunDirError(f"run directory {path} exists and is not a directory")
        if (path / RUN_JSON).exists():
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


@contextlib.contextmanager
def lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's exclusive lock; a second run or resume is refused at once."""
    path = run_dir / LOCK
    handle = open(path, "a")  # noqa: SIM115 - closed below; the lock lives as long as it
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunDirError(
                f"run directory {run_dir} is in use by another secondorder process "
                "(a run or resume holds its lock); wait for it to end"
            ) from None
        yield
    finally:
        handle.close()


def clean_temporary_files(run_dir: Path) -> list[Path]:
    """Remove what an interrupted atomic write left behind (``.<name>.*.part``, write
    probes); call it only while holding :func:`lock`. Returns the files removed."""
    removed = []
    for pattern in ("**/.*.part", "**/.write-test-*"):
        for path in run_dir.glob(pattern):
            if path.is_file():
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
    return removed


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
def _canonical(data: Any) -> str:
    return json.dumps(io.to_jsonable(data), sort_keys=True, allow_nan=True)


def spec_digest(data: dict[str, Any]) -> str:
    """SHA-256 of a resolved spec (as read back from spec.toml), independent of key order."""
    return hashlib.sha256(_canonical(data).encode("utf-8")).hexdigest()


def spec_difference(saved: Any, now: Any, key: str = "") -> list[str]:
    """The dotted keys at which two resolved specs differ, with both values."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(saved) | set(now), key=str):
            sub = f"{key}.{k}" if key else str(k)
            if k not in now:
                out.append(f"{sub}: {_canonical(saved[k])} was removed")
            elif k not in saved:
                out.append(f"{sub}: {_canonical(now[k])} was added")
            else:
                out.extend(spec_difference(saved[k], now[k], sub))
        return out
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        pairs = enumerate(zip(saved, now))
        return [d for i, (a, b) in pairs for d in spec_difference(a, b, f"{key}[{i}]")]
    if _canonical(saved) != _canonical(now):
        return [f"{key or 'spec'}: {_canonical(saved)} → {_canonical(now)}"]
    return []


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
    """Every cell's point.json (for a grid), spec.toml, then run.json: written last, it marks
    the directory as a run, with the digest and a copy of the spec as spec.toml reads back."""
    if not spec.is_suite:
        cells = spec.cells()
        if len(cells) > 1:
            for c in cells:
                io.write_json(
                    run_dir / c.id / POINT_JSON,
                    {"id": c.id, "point": c.point, "seed": c.seed, "spec": c.spec},
                )
    header = (
        f"# resolved spec of {spec.source or spec.name} (defaults filled in); "
        f"`secondorder resume` reads this file\n# source: {' '.join(spec.source.splitlines())}\n"
    )
    io.atomic_write_text(run_dir / SPEC_TOML, header + to_toml(spec.data))
    saved = read_spec_toml(run_dir)
    meta = _run_meta(spec)
    meta["spec_sha256"] = spec_digest(saved)
    meta["spec"] = saved
    io.write_json(run_dir / RUN_JSON, meta)


def check_spec_unchanged(run_dir: Path, meta: dict[str, Any], data: dict[str, Any]) -> None:
    """Refuse a spec.toml edited since the run started, naming every key that changed."""
    digest = meta.get("spec_sha256")
    if not isinstance(digest, str):
        raise RunDirError(
            f"{run_dir / RUN_JSON} records no spec_sha256, so nothing shows that {SPEC_TOML} is "
            "the spec the run started with; a resume needs it: start a new run"
        )
    if spec_digest(data) == digest:
        return
    changes = spec_difference(meta.get("spec", {}), data) if "spec" in meta else []
    shown = "; ".join(changes[:10]) + (f"; … ({len(changes)} in all)" if len(changes) > 10 else "")
    raise RunDirError(
        f"{run_dir / SPEC_TOML} was edited after the run started ({shown or 'content differs'}); "
        "a resume must run the spec its checkpoints were made with: undo the edit, or start a "
        "new run with the edited spec"
    )


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
        why = "does not exist" if not run_dir.exists() else "is not a run directory (no run.json)"
        raise FileNotFoundError(f"{run_dir} {why}{hint}")
    return _read_object(path)


def read_spec_toml(run_dir: Path) -> dict[str, Any]:
    """The resolved spec saved in spec.toml, as a dict."""
    return read_toml(run_dir / SPEC_TOML)


def spec_toml_source(run_dir: Path) -> str:
    """The spec's source as spec.toml's header names it (``""`` if it does not)."""
    with open(run_dir / SPEC_TOML, encoding="utf-8", errors="replace") as f:
        for line in (f.readline(), f.readline()):
            if line.startswith("# source: "):
                return line[len("# source: ") :].rstrip("\n")
    return ""


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


def lines_digest(lines: list[str]) -> str:
    """SHA-256 of trace lines as written (each with its newline)."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
    return h.hexdigest()


def read_trace_lines(cell_path: Path, slug: str) -> list[str]:
    """The complete lines of one solver's trace file (``[]`` when there is none)."""
    path = _trace_path(cell_path, slug)
    return io.read_lines(path) if path.is_file() else []


def read_trace(cell_path: Path, slug: str) -> list[dict[str, Any]]:
    """One solver's trace rows (``[]`` when it has not started)."""
    path = _trace_path(cell_path, slug)
    return io.read_jsonl(path) if path.is_file() else []


class TraceFile:
    """One solver's trace: rewritten from a checkpoint's rows, then appended row by row, and
    written whole (JSON Lines and CSV) when the solver finishes. It keeps the running SHA-256
    of its lines (:meth:`digest`), which checkpoints record instead of the rows."""

    def __init__(self, cell_path: Path, slug: str, rows: list[dict[str, Any]]) -> None:
        self.cell_path = cell_path
        self.slug = slug
        self.path = _trace_path(cell_path, slug)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rewrite(rows)  # drop rows written after the checkpoint
        self._handle: IO[str] | None = None

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        io.write_jsonl(self.path, rows)
        self._hash = hashlib.sha256()
        for row in rows:
            self._hash.update(io.jsonl_line(row).encode("utf-8"))

    def digest(self) -> str:
        """SHA-256 of every line written so far."""
        return self._hash.copy().hexdigest()

    def sync(self) -> None:
        """Make the rows appended so far durable (before a checkpoint refers to them)."""
        if self._handle is not None:
            os.fsync(self._handle.fileno())

    def open(self) -> None:
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - close() closes

    def append(self, row: dict[str, Any]) -> None:
        assert self._handle is not None
        self._hash.update(io.append_jsonl(self._handle, row).encode("utf-8"))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def finish(self, rows: list[dict[str, Any]]) -> None:
        """Write the final rows whole: JSON Lines (the last row gains its metrics) and CSV."""
        self._rewrite(rows)
        io.write_csv(_trace_path(self.cell_path, self.slug, "csv"), rows)

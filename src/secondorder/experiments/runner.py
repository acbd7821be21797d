"""Runs: a validated spec becomes a run directory with traces, checkpoints and a summary.

The layout of a run directory is :mod:`secondorder.experiments.rundir`'s. Each solver is driven
in segments of ``checkpoint_every`` iterations, ``minimize(..., max_iter=segment,
initial_state=state)``, with a checkpoint (:mod:`.checkpoint`) after each. SIGINT or SIGTERM
makes the current iteration finish, a checkpoint be written and the command exit non-zero with
``interrupted; resume with: secondorder resume RUN``. :func:`resume_run` continues from the
checkpoints (solvers already finished are skipped) and, in float64 on the CPU, gives the same
trace as an uninterrupted run apart from the wall-clock columns.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from secondorder.distributed import NullTrace, PeerLost, is_writer
from secondorder.experiments import rundir
from secondorder.experiments.checkpoint import (
    Checkpoint,
    counters,
    restore_counters,
    rng_state,
    set_rng_state,
)
from secondorder.experiments.environment import environment, load_average
from secondorder.experiments.problems import DataCache, Problem, build_problem
from secondorder.experiments.progress import Progress, StopFlag, threads
from secondorder.experiments.rows import (
    final_metrics,
    one_line,
    result_summary,
    row_from_info,
    theta_from_info,
)
from secondorder.experiments.rundir import TIME_COLUMNS, default_run_dir
from secondorder.experiments.spec import (
    Cell,
    Spec,
    SpecError,
    check_data_available,
    slugify,
    spec_from_dict,
)
from secondorder.scipy_bridge import scipy_minimize
from secondorder.solvers import minimize, validate_options

__all__ = [
    "TIME_COLUMNS",
    "Interrupted",
    "Problem",
    "RunErrors",
    "RunOptions",
    "build_problem",
    "default_run_dir",
    "environment",
    "resume_run",
    "start_run",
]


class RunErrors(RuntimeError):
    """Some solvers failed; the others finished. ``secondorder resume`` retries the failed."""

    def __init__(self, run_dir: Path, n: int) -> None:
        self.run_dir = run_dir
        self.n = n
        super().__init__(
            f"{n} solver(s) failed (see summary.json); retry them with: "
            f"secondorder resume {run_dir}"
        )


class Interrupted(RuntimeError):
    """The run stopped on SIGINT / SIGTERM after writing its checkpoints."""

    def __init__(self, run_dir: Path, signum: int) -> None:
        self.run_dir = run_dir
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted; resume with: secondorder resume {run_dir}")


@dataclass
class RunOptions:
    """How to run (not what): progress bars, and where to print messages."""

    progress: bool = True
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr))


# ----------------------------------------------------------------------------------------------
# One solver
# ----------------------------------------------------------------------------------------------
def _minimize_call(method: str):
    """The function that runs ``method``: ours, or scipy's through the bridge."""
    return scipy_minimize if method.startswith("scipy:") else minimize


def _solver_kwargs(spec: dict[str, Any], solver: dict[str, Any]) -> dict[str, Any]:
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
class _SolverJob:
    cell: Cell
    cell_dir: Path
    solver: dict[str, Any]
    slug: str
    run_dir: Path


@dataclass
class _Recorder:
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


def _call_solver(minimize_fn, obj, theta, method, callback, call, seen, progress, name):
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
            progress.write(f"warning ({name}): {text}")
    return res


class _Runner:
    def __init__(
        self, spec: Spec, run_dir: Path, options: RunOptions, cache: DataCache | None = None
    ) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.options = options
        self.cache = cache or DataCache()
        self.stop = StopFlag()
        self.summary: dict[str, Any] = {"status": "running", "cells": {}}
        self.errors = 0

    def _write_summary(self) -> None:
        if is_writer():  # data-parallel: rank 0 writes the run directory
            rundir.write_summary(self.run_dir, self.summary)

    def _cell_summary(self, cell: Cell, cell_dir: Path) -> dict[str, Any]:
        entry = self.summary["cells"].setdefault(
            cell.id,
            {
                "dir": rundir.relative(cell_dir, self.run_dir),
                "point": cell.point,
                "seed": cell.seed,
            },
        )
        entry.setdefault("solvers", {})
        return entry

    # -- the whole run -------------------------------------------------------------------------
    def run(self) -> None:
        spec = self.spec
        cells = spec.cells()
        with self.stop, threads(spec.data.get("threads", 0)):
            for cell in cells:
                cell_dir = rundir.cell_dir(self.run_dir, cell, len(cells))
                entry = self._cell_summary(cell, cell_dir)
                for solver in cell.spec["solvers"]:
                    if self.stop.set:
                        break
                    name = solver["name"]
                    if entry["solvers"].get(name, {}).get("finished"):
                        continue
                    job = _SolverJob(cell, cell_dir, solver, slugify(name), self.run_dir)
                    entry["solvers"][name] = self._run_guarded(job)
                    self._write_summary()
                if self.stop.set:
                    break
            if self.stop.set:
                self.summary["status"] = "interrupted"
                self._write_summary()
                raise Interrupted(self.run_dir, self.stop.signum)
        self.summary["status"] = "complete" if not self.errors else "errors"
        self._write_summary()

    def _run_guarded(self, job: _SolverJob) -> dict[str, Any]:
        """Run one solver; a failure is logged and recorded, and the run goes on."""
        try:
            return self._run_solver(job)
        except (KeyboardInterrupt, SystemExit, SpecError, PeerLost):
            raise
        except Exception as exc:  # one failing solver does not end a long run
            name = job.solver["name"]
            where = "" if job.cell.id == "main" else f"[{job.cell.id}] "
            self.options.log(
                f"{where}{name}: failed with {type(exc).__name__}: {exc} "
                "(the other solvers go on; `secondorder resume` retries it)"
            )
            self.errors += 1
            return {
                "method": job.solver["method"],
                "status": "error",
                "message": f"{type(exc).__name__}: {exc}",
                "finished": False,
                "traceback": traceback.format_exc(limit=8),
            }

    # -- one solver ----------------------------------------------------------------------------
    def _run_solver(self, job: _SolverJob) -> dict[str, Any]:
        spec, solver = job.cell.spec, job.solver
        scipy = solver["method"].startswith("scipy:")
        max_iter = solver.get("max_iter", spec["max_iter"])
        ckpt_path = rundir.checkpoint_path(job.cell_dir, job.slug)
        problem = build_problem(spec, self.cache)
        theta0 = problem.theta0
        start = Checkpoint(theta=theta0)
        saved = Checkpoint.load(ckpt_path)
        if saved is not None and not scipy:
            start = saved
            start.theta = saved.theta.to(dtype=theta0.dtype, device=theta0.device)
            restore_counters(problem.objective, saved.objective)
            set_rng_state(saved.rng, problem.noise)
            if saved.finished:
                return saved.result
        trace = rundir.TraceFile(job.cell_dir, job.slug, start.rows) if is_writer() else NullTrace()
        desc = solver["name"] if job.cell.id == "main" else f"{job.cell.id} | {solver['name']}"
        progress = Progress(self.options.progress, max_iter, start.iteration, desc)
        wall_start = time.perf_counter() - start.wall_time
        trace.open()
        every = spec["metrics_every"]
        rec = _Recorder(problem, start.rows, trace, progress, every, start.metrics_time, wall_start)
        try:
            finished, result_info = self._segments(job, rec, start, max_iter, ckpt_path)
        finally:
            trace.close()
            progress.close()
        if finished:
            trace.finish(rec.rows)
        return self._solver_summary(job, rec, result_info, finished, max_iter)

    def _callback(self, rec: _Recorder):
        def callback(info: Any):
            row = row_from_info(info)
            theta_k = theta_from_info(info)
            before = set(row)
            rec.record(row, theta_k, force=False)
            if self.stop.set:
                return True
            extra = {k: v for k, v in row.items() if k not in before and k != "x"}
            return extra or None

        return callback

    def _segments(self, job, rec, start, max_iter, ckpt_path) -> tuple[bool, dict[str, Any]]:
        """Call the solver segment by segment, checkpointing after each, until it finishes or
        a signal arrives; return (finished, the result's summary entry)."""
        spec, solver = job.cell.spec, job.solver
        method = solver["method"]
        scipy = method.startswith("scipy:")
        obj = rec.problem.objective
        minimize_fn = _minimize_call(method)
        kwargs = _solver_kwargs(spec, solver)
        every = spec["checkpoint_every"]
        theta, state, k_done = start.theta, start.state, start.iteration
        seen: list[str] = list(start.result.get("warnings", []))
        callback = self._callback(rec)
        while True:
            if max_iter == 0:  # nothing to run: record θ₀ only
                rec.record({"k": 0}, theta, force=True)
                return True, {"status": "max_iter", "nit": 0, "message": "max_iter = 0"}
            if scipy:  # one call: scipy cannot continue a run from a saved state
                call = {"maxiter": max_iter, **kwargs}
            else:
                seg = min(max_iter, (k_done // every + 1) * every) - k_done
                call = {"max_iter": seg, "initial_state": state, **kwargs}
            res = _call_solver(
                minimize_fn, obj, theta, method, callback, call, seen, rec.progress, solver["name"]
            )
            theta = res.theta.detach()
            state = getattr(res, "state", None)
            k_done = int(res.nit)
            status = res.status
            finished = scipy or status != "max_iter" or k_done >= max_iter
            if status == "callback" and self.stop.set and k_done < max_iter:
                finished = False  # stopped early by the signal; a stop after the last
                # iteration has nothing left to run, and resuming it must not call a 0-step run
            result_info = result_summary(res, method, max_iter)
            if seen:
                result_info["warnings"] = list(seen)
            if finished:
                rec.finish_rows(theta)
            if not scipy or finished:
                wall = time.perf_counter() - rec.wall_start
                ckpt = Checkpoint(theta, state, rec.rows, k_done, finished, rec.metrics_time, wall)
                ckpt.result = result_info
                ckpt.rng, ckpt.objective = rng_state(rec.problem.noise), counters(obj)
                if is_writer():
                    ckpt.save(ckpt_path)
            if finished or self.stop.set:
                return finished, result_info

    def _solver_summary(self, job, rec, result_info, finished, max_iter) -> dict[str, Any]:
        summary = dict(result_info)
        summary.update(
            {
                "method": job.solver["method"],
                "finished": finished,
                "max_iter": max_iter,
                "metrics_time": rec.metrics_time,
                "wall_time": time.perf_counter() - rec.wall_start,
                "load_average": load_average(),
            }
        )
        if rec.rows:
            last = rec.rows[-1]
            for key in ("solver_time", "time"):
                if key in last:
                    summary[key] = last[key]
            summary["final"] = final_metrics(rec.rows)
        if finished:
            self.options.log(one_line(job.solver["name"], job.cell.id, summary))
        return summary


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------
def _write_environment(spec: Spec, run_dir: Path) -> None:
    rundir.write_environment(run_dir, environment(_device_of(spec), _threads_of(spec)))


def _prepare(spec: Spec, run_dir: Path, cache: DataCache) -> None:
    """Everything that can fail before training: data, directory, solver options, files."""
    check_data_available(spec)
    if not is_writer():  # data-parallel: the other ranks check, rank 0 writes
        preflight(spec, cache)
        return
    created = not run_dir.exists()
    rundir.check_run_dir(run_dir, must_be_new=True)
    try:
        preflight(spec, cache)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # empty: nothing was written yet
        raise
    rundir.write_meta(spec, run_dir)
    _write_environment(spec, run_dir)
    for name, part in spec.parts:
        rundir.check_run_dir(run_dir / name, must_be_new=True)
        rundir.write_meta(part, run_dir / name)
        _write_environment(part, run_dir / name)


def preflight(spec: Spec, cache: DataCache | None = None) -> None:
    """Build every cell's problem and check every solver's options against it, so that a bad
    option of the last solver fails before the first one trains."""
    cache = cache or DataCache()
    if spec.is_suite:
        for _, part in spec.parts:
            preflight(part, cache)
        return
    seen: set[str] = set()
    for cell in spec.cells():
        problem = build_problem(cell.spec, cache)
        for i, solver in enumerate(cell.spec["solvers"]):
            kwargs = _solver_kwargs(cell.spec, solver)
            key = json.dumps([solver, cell.spec.get("dtype")], sort_keys=True, default=str)
            if key in seen:
                continue
            seen.add(key)
            method = solver["method"]
            if method.startswith("scipy:"):
                continue  # scipy checks its own options when it starts
            try:
                validate_options(problem.objective, method, **{"max_iter": 1, **kwargs})
            except (TypeError, ValueError) as err:
                where = f"solvers[{i}] ({solver['name']})"
                raise SpecError(f"{where}: {err}", spec.source) from None


def _threads_of(spec: Spec) -> int:
    return 0 if spec.is_suite else int(spec.data.get("threads", 0))


def _device_of(spec: Spec) -> str:
    if spec.is_suite:
        return ",".join(sorted({_device_of(p) for _, p in spec.parts}))
    return spec.data.get("device", "cpu")


def _execute(spec: Spec, run_dir: Path, options: RunOptions, cache: DataCache) -> None:
    if spec.is_suite:
        failed = 0
        for name, part in spec.parts:
            options.log(f"== {name} ({part.source})")
            try:
                _execute(part, run_dir / name, options, cache)
            except RunErrors as err:
                failed += err.n
        if is_writer():
            rundir.write_summary(run_dir, {"status": "errors" if failed else "complete"})
        if failed:
            raise RunErrors(run_dir, failed)
        return
    runner = _Runner(spec, run_dir, options, cache)
    previous = rundir.read_summary(run_dir)
    if previous:
        runner.summary = previous
        runner.summary["status"] = "running"
    try:
        runner.run()
        if runner.errors:
            raise RunErrors(run_dir, runner.errors)
    except Interrupted:
        parent = run_dir.parent
        if parent != run_dir and (parent / rundir.RUN_JSON).is_file() and is_writer():
            with contextlib.suppress(OSError, ValueError):
                if rundir.read_meta(parent).get("kind") == "suite":
                    rundir.write_summary(parent, {"status": "interrupted"})
        raise


def start_run(
    spec: Spec, run_dir: str | os.PathLike[str] | None = None, options: RunOptions | None = None
) -> Path:
    """Validate everything, create the run directory and run every cell and solver."""
    options = options or RunOptions()
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(spec)
    cache = DataCache()
    _prepare(spec, run_dir, cache)
    options.log(f"run directory: {run_dir}")
    return _execute_named(spec, run_dir, options, cache)


def _execute_named(spec: Spec, run_dir: Path, options: RunOptions, cache: DataCache) -> Path:
    """Run (or continue) every cell; an interruption or failure names the run directory."""
    try:
        _execute(spec, run_dir, options, cache)
    except Interrupted as err:
        raise Interrupted(run_dir, err.signum) from None
    except RunErrors as err:
        raise RunErrors(run_dir, err.n) from None
    return run_dir


def load_run_spec(run_dir: str | os.PathLike[str]) -> Spec:
    """The spec of an existing run directory (as resolved when it started)."""
    run_dir = Path(run_dir)
    meta = rundir.read_meta(run_dir)
    raw = rundir.read_spec_toml(run_dir)
    if meta.get("kind") == "suite":
        parts = [(p["name"], load_run_spec(run_dir / p["dir"])) for p in meta["parts"]]
        return Spec(raw, meta.get("source", ""), parts)
    spec = spec_from_dict(raw, meta.get("source", ""))
    ids = [c.id for c in spec.cells()]
    if ids != [c["id"] for c in meta.get("cells", [])]:
        raise SpecError(f"{run_dir}: spec.toml and run.json disagree about the grid")
    return spec


def resume_run(run_dir: str | os.PathLike[str], options: RunOptions | None = None) -> Path:
    """Finish an interrupted run: solvers already finished are skipped, the others continue
    from their last checkpoint."""
    options = options or RunOptions()
    run_dir = Path(run_dir)
    spec = load_run_spec(run_dir)
    check_data_available(spec)
    rundir.check_run_dir(run_dir, must_be_new=False)
    if rundir.read_summary(run_dir).get("status") == "complete":
        options.log(f"{run_dir}: already complete; nothing to resume")
        return run_dir
    options.log(f"resuming {run_dir}")
    return _execute_named(spec, run_dir, options, DataCache())

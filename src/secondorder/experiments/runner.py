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
import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secondorder import distributed
from secondorder.distributed import NullTrace, PeerLost, RanksDisagree, is_writer
from secondorder.experiments import rundir
from secondorder.experiments.checkpoint import (
    Checkpoint,
    counters,
    restore_counters,
    rng_state,
    seed_globals,
    set_rng_state,
)
from secondorder.experiments.environment import environment, load_average
from secondorder.experiments.io import CheckpointError
from secondorder.experiments.problems import DataCache, Problem, build_problem
from secondorder.experiments.progress import (
    Progress,
    RunProgress,
    StopFlag,
    threads,
)
from secondorder.experiments.recorder import Recorder, SolverJob, call_solver, solver_kwargs
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
        meta_path = run_dir / rundir.RUN_JSON
        meta = rundir.read_meta(run_dir) if meta_path.is_file() else {}
        self.spec_sha256 = meta.get("spec_sha256")

    def identity(self, job: SolverJob) -> dict[str, Any]:
        """What a checkpoint of ``job`` must record to be accepted as its own."""
        return {
            "solver": job.solver["name"],
            "method": job.solver["method"],
            "cell": job.cell.id,
            "spec_sha256": self.spec_sha256,
        }

    def load_checkpoint(self, job: SolverJob) -> Checkpoint | None:
        """The job's checkpoint, checked against its identity, digest and trace file."""
        return Checkpoint.load(
            rundir.checkpoint_path(job.cell_dir, job.slug),
            self.identity(job),
            rundir.read_trace_lines(job.cell_dir, job.slug),
        )

    def jobs(self):
        """Every (cell, solver) of the run, in order, with its summary entry."""
        cells = self.spec.cells()
        for ci, cell in enumerate(cells):
            cell_dir = rundir.cell_dir(self.run_dir, cell, len(cells))
            entry = self._cell_summary(cell, cell_dir)
            for solver in cell.spec["solvers"]:
                slug = slugify(solver["name"])
                yield ci, entry, SolverJob(cell, cell_dir, solver, slug, self.run_dir)

    def check_checkpoints(self) -> None:
        """Load every checkpoint once before any work, so that a foreign, altered or
        mismatched one is refused up front rather than after hours of other solvers."""
        for _, _, job in self.jobs():
            self.load_checkpoint(job)

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
        overall = RunProgress(self.spec.cells(), self.options.progress, self.options.log)
        with self.stop, threads(self.spec.data.get("threads", 0)):
            for ci, entry, job in self.jobs():
                if self.stop.set:
                    break
                name = job.solver["name"]
                repaired = self._repair(job)
                overall.solver(ci, name, skipped=repaired is not None)
                if repaired is not None:
                    if entry["solvers"].get(name) != repaired:
                        entry["solvers"][name] = repaired
                        self._write_summary()
                    continue
                entry["solvers"][name] = self._run_guarded(job)
                self._write_summary()
            if self.stop.set:
                self.summary["status"] = "interrupted"
                self._write_summary()
                raise Interrupted(self.run_dir, self.stop.signum)
        self.summary["status"] = "complete" if not self.errors else "errors"
        self._write_summary()

    def _run_guarded(self, job: SolverJob) -> dict[str, Any]:
        """Run one solver; a failure is logged and recorded, and the run goes on."""
        try:
            return self._run_solver(job)
        except (
            KeyboardInterrupt,
            SystemExit,
            SpecError,
            CheckpointError,
            PeerLost,
            RanksDisagree,
        ):
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
    def _run_solver(self, job: SolverJob) -> dict[str, Any]:
        spec, solver = job.cell.spec, job.solver
        scipy = solver["method"].startswith("scipy:")
        max_iter = solver.get("max_iter", spec["max_iter"])
        ckpt_path = rundir.checkpoint_path(job.cell_dir, job.slug)
        seed_globals(job.cell.seed, solver["name"])
        problem = build_problem(spec, self.cache)
        theta0 = problem.theta0
        start = Checkpoint(theta=theta0, identity=self.identity(job))
        saved = None if scipy else self.load_checkpoint(job)
        if saved is not None:
            start = saved
            start.theta = saved.theta.to(dtype=theta0.dtype, device=theta0.device)
            start.identity = self.identity(job)
            restore_counters(problem.objective, saved.objective)
            set_rng_state(saved.rng, problem.noise)
        writes = is_writer()  # data-parallel: rank 0 writes the run directory
        trace = rundir.TraceFile(job.cell_dir, job.slug, start.rows) if writes else NullTrace()
        desc = solver["name"] if job.cell.id == "main" else f"{job.cell.id} | {solver['name']}"
        progress = Progress(self.options.progress, max_iter, start.iteration, desc)
        wall_start = time.perf_counter() - start.wall_time
        trace.open()
        every = spec["metrics_every"]
        rec = Recorder(problem, start.rows, trace, progress, every, start.metrics_time, wall_start)
        try:
            return self._segments(job, rec, start, max_iter, ckpt_path)
        finally:
            trace.close()
            progress.close()

    def _repair(self, job: SolverJob) -> dict[str, Any] | None:
        """For a solver whose checkpoint says it finished: rewrite its derived files (trace
        JSON Lines and CSV) from the checkpoint and return its summary entry; else None.

        A kill after the final checkpoint and before these files were written, or a file
        deleted since, is thereby repaired by any resume, without rebuilding the problem."""
        saved = self.load_checkpoint(job)
        if saved is None or not saved.finished:
            return None
        if is_writer():
            rundir.TraceFile(job.cell_dir, job.slug, saved.rows).finish(saved.rows)
        # a checkpoint of the first format holds the result, not the whole entry
        return saved.summary or saved.result

    def _callback(self, rec: Recorder):
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

    def _segments(self, job, rec, start, max_iter, ckpt_path) -> dict[str, Any]:
        """Call the solver segment by segment, checkpointing after each, until it finishes or
        a signal arrives; return the solver's summary entry.

        The order of the writes is what makes a kill at any point recoverable: the trace rows
        are made durable (or, at the end, the trace files written whole) before the checkpoint
        that refers to them, and the final checkpoint holds the summary entry."""
        spec, solver = job.cell.spec, job.solver
        method = solver["method"]
        scipy = method.startswith("scipy:")
        obj = rec.problem.objective
        minimize_fn = _minimize_call(method)
        kwargs = solver_kwargs(spec, solver)
        every = spec["checkpoint_every"]
        theta, state, k_done = start.theta, start.state, start.iteration
        seen: list[str] = list(start.result.get("warnings", []))
        callback = self._callback(rec)
        while True:
            if max_iter == 0:  # nothing to run: record θ₀ only
                rec.record({"k": 0}, theta, force=True)
                info = {"status": "max_iter", "nit": 0, "message": "max_iter = 0"}
                return self._finish(job, rec, start, theta, state, 0, info, max_iter, ckpt_path)
            if scipy:  # one call: scipy cannot continue a run from a saved state
                call = {"maxiter": max_iter, **kwargs}
            else:
                seg = min(max_iter, (k_done // every + 1) * every) - k_done
                call = {"max_iter": seg, "initial_state": state, **kwargs}
            res = call_solver(
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
                return self._finish(
                    job, rec, start, theta, state, k_done, result_info, max_iter, ckpt_path
                )
            if not scipy:
                rec.trace.sync()
                self._checkpoint(rec, start, theta, state, k_done, result_info, ckpt_path)
            if self.stop.set:
                return self._solver_summary(job, rec, result_info, False, max_iter)

    def _checkpoint(self, rec, start, theta, state, k_done, result_info, path, summary=None):
        wall = time.perf_counter() - rec.wall_start
        ckpt = Checkpoint(
            theta, state, rec.rows, k_done, summary is not None, rec.metrics_time, wall
        )
        ckpt.result, ckpt.summary, ckpt.identity = result_info, summary or {}, start.identity
        ckpt.rng, ckpt.objective = rng_state(rec.problem.noise), counters(rec.problem.objective)
        ckpt.rows_sha256 = rec.trace.digest()
        if is_writer():
            ckpt.save(path)

    def _finish(self, job, rec, start, theta, state, k_done, info, max_iter, path):
        """The last row's metrics, the trace files whole, then the final checkpoint with the
        summary entry (in this order: see :meth:`_segments`)."""
        rec.finish_rows(theta)
        rec.trace.finish(rec.rows)
        summary = self._solver_summary(job, rec, info, True, max_iter)
        self._checkpoint(rec, start, theta, state, k_done, info, path, summary)
        return summary

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


def _first_device(spec: Spec) -> str:
    return _first_device(spec.parts[0][1]) if spec.is_suite else spec.data.get("device", "cpu")


def agree_across_ranks(spec: Spec) -> None:
    """With several processes (``WORLD_SIZE`` > 1): join the group and check that every
    process resolved the same spec and runs the same code, before any data or step (the data
    are compared when each objective is made data-parallel); a difference raises
    :class:`~secondorder.distributed.RanksDisagree` on every process."""
    if distributed.world_size() <= 1:
        return
    distributed.init(device=distributed.local_device(_first_device(spec)))
    resolved = spec.data
    if spec.is_suite:
        resolved = {"suite": spec.data, **{name: part.data for name, part in spec.parts}}
    distributed.agree(
        {"resolved spec": resolved, "code version": distributed.code_version()},
        explain={"resolved spec": lambda a, b: rundir.spec_difference(a, b)},
    )


def _prepare(spec: Spec, run_dir: Path, cache: DataCache) -> None:
    """Everything that can fail before training: data, directory, solver options, files."""
    distributed.check_environment()
    agree_across_ranks(spec)
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
    # run.json last, parts before the suite: a directory without it was never started
    for name, part in spec.parts:
        rundir.check_run_dir(run_dir / name, must_be_new=True)
        _write_environment(part, run_dir / name)
        rundir.write_meta(part, run_dir / name)
    _write_environment(spec, run_dir)
    rundir.write_meta(spec, run_dir)


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
            kwargs = solver_kwargs(cell.spec, solver)
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
    try:
        with rundir.lock(run_dir) if is_writer() else contextlib.nullcontext():
            if is_writer():  # the lock is rank 0's: the other ranks only read
                rundir.clean_temporary_files(run_dir)
            runner = _Runner(spec, run_dir, options, cache)
            runner.check_checkpoints()
            previous = rundir.read_summary(run_dir)
            if previous:
                runner.summary = previous
                runner.summary["status"] = "running"
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
    rundir.check_spec_unchanged(run_dir, meta, raw)
    if meta.get("kind") == "suite":
        parts = [(p["name"], load_run_spec(run_dir / p["dir"])) for p in meta["parts"]]
        return Spec(raw, meta.get("source", ""), parts)
    spec = spec_from_dict(raw, meta.get("source", ""))
    ids = [c.id for c in spec.cells()]
    if ids != [c["id"] for c in meta.get("cells", [])]:
        raise SpecError(f"{run_dir}: spec.toml and run.json disagree about the grid")
    return spec


def _complete_creation(run_dir: Path) -> None:
    """A run killed while its directory was being created has spec.toml (the resolved spec)
    but no run.json, and nothing ran yet: write the rest of the files from spec.toml."""
    if (run_dir / rundir.RUN_JSON).is_file() or not (run_dir / rundir.SPEC_TOML).is_file():
        return
    raw = rundir.read_spec_toml(run_dir)
    if "parts" in raw or not is_writer():
        raise rundir.RunDirError(
            f"{run_dir} was interrupted while it was being created, before anything ran; "
            "start it again with `secondorder run SPEC --run-dir` on the same directory"
        )
    spec = spec_from_dict(raw, rundir.spec_toml_source(run_dir))
    _write_environment(spec, run_dir)
    rundir.write_meta(spec, run_dir)


def resume_run(run_dir: str | os.PathLike[str], options: RunOptions | None = None) -> Path:
    """Finish an interrupted run: solvers already finished are skipped, the others continue
    from their last checkpoint."""
    options = options or RunOptions()
    distributed.check_environment()
    run_dir = Path(run_dir)
    _complete_creation(run_dir)
    spec = load_run_spec(run_dir)
    agree_across_ranks(spec)
    check_data_available(spec)
    if is_writer():
        rundir.check_run_dir(run_dir, must_be_new=False)
    complete = rundir.read_summary(run_dir).get("status") == "complete"
    if complete:  # nothing to train; the files derived from the checkpoints are still checked
        options = dataclasses.replace(options, progress=False)
        options.log(f"{run_dir}: already complete; nothing to resume")
    else:
        options.log(f"resuming {run_dir}")
    return _execute_named(spec, run_dir, options, DataCache())

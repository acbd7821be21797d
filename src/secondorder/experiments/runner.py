"""Runs: a validated spec becomes a run directory with traces, checkpoints and a summary.

Layout of a run directory::

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
directory per part.

Each solver is driven in segments of ``checkpoint_every`` iterations,
``minimize(..., max_iter=segment, initial_state=state)``, with a checkpoint after each. SIGINT
or SIGTERM makes the current iteration finish, a checkpoint be written and the command exit
non-zero with ``interrupted; resume with: secondorder resume RUN``. :func:`resume_run` continues
from the checkpoints (solvers already finished are skipped) and, in float64 on the CPU, gives
the same trace as an uninterrupted run apart from the wall-clock columns.

Every whole-file write is atomic (:mod:`secondorder.experiments.io`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secondorder.experiments import io
from secondorder.experiments.spec import (
    Cell,
    Spec,
    SpecError,
    check_data_available,
    check_run_dir,
    slugify,
    spec_from_dict,
    to_toml,
)

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

FORMAT = 1
#: trace columns that measure wall-clock time (excluded when comparing runs for equality)
TIME_COLUMNS = ("time", "solver_time", "metrics_time", "wall_time")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


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
# Problems: objective, θ₀, and what to measure
# ----------------------------------------------------------------------------------------------
class _NoisyFunction:
    """Adds N(0, σ²) noise to f and, independently per coordinate, to ∇f of a FunctionObjective;
    the generator is part of the checkpoint, so a resumed run draws the same noise."""

    def __init__(self, objective, sigma: float, seed: int) -> None:
        self.objective = objective
        self.sigma = float(sigma)
        self.generator = torch.Generator().manual_seed(int(seed))

    def install(self) -> None:
        obj = self.objective
        plain_value, plain_vg = obj.value, obj.value_and_grad

        def value(theta):
            f = plain_value(theta)
            return f + self.sigma * torch.randn((), generator=self.generator, dtype=f.dtype)

        def value_and_grad(theta):
            f, g = plain_vg(theta)
            nf = torch.randn((), generator=self.generator, dtype=f.dtype)
            ng = torch.randn(g.shape, generator=self.generator, dtype=g.dtype)
            return f + self.sigma * nf, g + self.sigma * ng

        obj.value = value
        obj.value_and_grad = value_and_grad


@dataclass
class Problem:
    """What one solver in one cell works on."""

    objective: Any
    theta0: torch.Tensor
    metrics: Callable[[torch.Tensor], dict[str, Any]]
    noise: _NoisyFunction | None = None
    kind: str = "model"


class _DataCache:
    def __init__(self) -> None:
        self._store: dict[str, Any] = {}

    def get(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._store:
            self._store[key] = make()
        return self._store[key]


def _load_data(spec: dict[str, Any], cache: _DataCache):
    data = spec["data"]
    dtype = _DTYPES[spec["dtype"]]
    key = json.dumps([data, spec["dtype"]], sort_keys=True)

    def make():
        from secondorder.data import from_arrays, load_fashion_mnist, stratified_split, two_class_2d
        from secondorder.data.dataset import Splits

        kind = data["kind"]
        if kind == "two-class-2d":
            return two_class_2d(
                n_train=data["n_train"], n_val=data["n_test"], seed=data["seed"], dtype=dtype
            )
        if kind == "random":
            g = torch.Generator().manual_seed(data["seed"])
            n = data["n_train"] + data["n_test"]
            X = torch.randn(n, data["n_features"], generator=g, dtype=torch.float64)
            teacher = torch.randn(data["n_features"], data["n_classes"], generator=g)
            logits = X @ teacher.double() + 0.5 * torch.randn(
                n, data["n_classes"], generator=g, dtype=torch.float64
            )
            y = logits.argmax(1)
            ds = from_arrays(X, y, n_classes=data["n_classes"], dtype=dtype, name="random")
            ntr = data["n_train"]
            return Splits(ds.subset(slice(0, ntr)), None, ds.subset(slice(ntr, n)))
        if kind == "fashion-mnist":
            splits = load_fashion_mnist(
                data.get("root"),
                dev_size=data["dev_size"],
                seed=data["split_seed"],
                download=data["download"],
                dtype=dtype,
            )
            train, dev, test = splits.train, splits.dev, splits.test
            if data.get("n_train") and data["n_train"] < len(train):
                _, train = stratified_split(train, data["n_train"], seed=data["subsample_seed"])
            if data.get("n_test") and data["n_test"] < len(test):
                _, test = stratified_split(test, data["n_test"], seed=data["subsample_seed"])
            return Splits(train, dev, test)
        raise AssertionError(kind)

    return cache.get(key, make)


def _model(spec: dict[str, Any], n_features: int, n_classes: int):
    from secondorder.models import logistic_regression, mlp

    m = spec["model"]
    dtype = _DTYPES[spec["dtype"]]
    if m["kind"] == "logistic":
        return logistic_regression(n_features, bias=m["bias"], seed=m.get("seed"), dtype=dtype)
    out = 1 if spec["loss"] == "logistic" else n_classes
    widths = m.get("widths") or [n_features, *m["hidden"], out]
    if widths[0] != n_features or widths[-1] != out:
        raise SpecError(
            f"model.widths: must start with the input width {n_features} and end with {out} "
            f"outputs, got {widths}"
        )
    return mlp(widths, m["activation"], init=m["init"], seed=m["seed"], dtype=dtype)


def _sampler(table: dict[str, Any] | None, m: int):
    from secondorder.sampling import make_sampler

    if not table:
        return None
    opts = {k: v for k, v in table.items() if k != "kind"}
    try:
        return make_sampler(table["kind"], m, **opts)
    except (ValueError, TypeError) as err:
        raise SpecError(f"sampler: {err}") from None


def build_problem(spec: dict[str, Any], cache: _DataCache | None = None) -> Problem:
    """The objective, θ₀ and the metric function of one cell's resolved spec."""
    cache = cache or _DataCache()
    dtype = _DTYPES[spec["dtype"]]
    device = torch.device(spec["device"])
    data = spec["data"]
    if data["kind"] == "rosenbrock":
        from secondorder.objective import FunctionObjective, rosenbrock

        fn = rosenbrock(data["a"], data["b"])
        obj = FunctionObjective(fn, len(data["x0"]), dtype=dtype, device=device)
        theta0 = torch.tensor(data["x0"], dtype=dtype, device=device)
        noise = None
        if data["noise"] > 0:
            noise = _NoisyFunction(obj, data["noise"], data["noise_seed"])
            noise.install()
        record_x = len(data["x0"]) <= 10

        def metrics(theta: torch.Tensor, wanted: tuple[str, ...] = tuple(spec["metrics"])):
            out: dict[str, Any] = {}
            if "train_loss" in wanted:
                with torch.no_grad():
                    out["train_loss"] = float(fn(theta))
            if record_x:
                out["x"] = [float(v) for v in theta.detach().cpu()]
            return out

        return Problem(obj, theta0, metrics, noise, kind="function")

    from secondorder.objective import ModelObjective
    from secondorder.sampling import FullBatch

    splits = _load_data(spec, cache)
    train = splits.train
    n_classes = train.n_classes or 2
    n_features = train.n_features
    model = _model(spec, n_features, n_classes)
    sampler = _sampler(spec.get("sampler"), len(train))
    curv = _sampler(spec.get("curvature_sampler"), len(train))
    common = dict(
        l2=spec["l2"],
        l2_convention=spec["l2_convention"],
        l2_m=spec.get("l2_m"),
        regularize_bias=spec["regularize_bias"],
        dtype=dtype,
        device=device,
    )
    obj = ModelObjective(
        model, spec["loss"], train, sampler=sampler, curvature_sampler=curv, **common
    )
    wanted = tuple(spec["metrics"])
    full_obj = None
    if "grad_norm" in wanted and not isinstance(obj.sampler, FullBatch):
        full_obj = ModelObjective(model, spec["loss"], train, **common)
    split_data = {
        "train": (train.X, train.y),
        "dev": None if splits.dev is None else (splits.dev.X, splits.dev.y),
        "test": None if splits.test is None else (splits.test.X, splits.test.y),
    }

    def reg(theta: torch.Tensor) -> float:
        c = obj.l2_coefficient
        return 0.5 * c * float((obj.l2_mask * theta * theta).sum()) if c else 0.0

    def metrics(theta: torch.Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "train_loss" in wanted:
            out["train_loss"] = obj.full_loss(theta)
        for split in ("train", "dev", "test"):
            d = split_data[split]
            if d is None:
                continue
            if f"{split}_accuracy" in wanted:
                out[f"{split}_accuracy"] = obj.accuracy(theta, *d)
            if split != "train" and f"{split}_loss" in wanted:
                out[f"{split}_loss"] = obj.full_loss(theta, *d) - reg(theta)
        if full_obj is not None:
            _, g = full_obj.value_and_grad(theta)
            out["train_grad_norm"] = float(g.abs().max())
        return out

    return Problem(obj, obj.initial_theta(), metrics, None, kind="model")


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------
def _git_commit() -> dict[str, Any] | None:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages: timings are inflated when they exceed the cores."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):  # pragma: no cover - not on every platform
        return None


def environment(device: str = "cpu", threads: int = 0) -> dict[str, Any]:
    """Versions, threads, device, host and git commit: what a timing depends on."""
    import scipy

    from secondorder import __version__

    env: dict[str, Any] = {
        "secondorder": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "load_average": _load_average(),
        "device": device,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
    }
    with contextlib.suppress(ImportError):
        import matplotlib

        env["matplotlib"] = matplotlib.__version__
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
    git = _git_commit()
    if git:
        env["git"] = git
    return env


# ----------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------
def _rng_state(noise: _NoisyFunction | None) -> dict[str, Any]:
    """RNG states as tensors, lists and numbers, so checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - legacy global
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [
            str(name),
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "python": [int(version), torch.tensor(internal, dtype=torch.int64), gauss],
    }
    if noise is not None:
        state["noise"] = noise.generator.get_state()
    return state


def _set_rng_state(state: dict[str, Any], noise: _NoisyFunction | None) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        keys = np.asarray(keys.numpy() if isinstance(keys, torch.Tensor) else keys, np.uint32)
        np.random.set_state((name, keys, pos, has_gauss, cached))  # noqa: NPY002
    if "python" in state:
        version, internal, gauss = state["python"]
        internal = internal.tolist() if isinstance(internal, torch.Tensor) else internal
        random.setstate((version, tuple(int(v) for v in internal), gauss))
    if noise is not None and "noise" in state:
        noise.generator.set_state(state["noise"])


# ----------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _threads(n: int):
    """Use n torch threads inside the block (0: leave as is), then restore."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


class _StopFlag:
    """SIGINT / SIGTERM set a flag the solvers' callback reads; a second signal acts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: stop now (the last checkpoint stays)
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: finishing the current iteration and writing a "
            "checkpoint (send again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> _StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    @property
    def set(self) -> bool:
        return self.signum is not None


# ----------------------------------------------------------------------------------------------
# Driving one solver
# ----------------------------------------------------------------------------------------------
def _num(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else None
    if isinstance(v, (np.generic,)):
        return v.item()
    return v


_ROW_KEYS = ("k", "f", "grad_norm", "step", "nfev", "ngev", "nhev", "time")
# Left out of trace rows: tensors and objects, and the solver's per-row "changed" flag, which
# minimize(..., initial_state=...) does not set on the first row after a resume (the number of
# changes is in the summary as objective_changes), so it would break trace equality.
_SKIP_INFO = frozenset(
    ("theta", "x", "g", "grad", "d", "direction", "state", "objective", "method", "changed")
)


def _row_from_info(info: Any) -> dict[str, Any]:
    """A JSON-friendly trace row from the solver's per-iteration information."""
    if not isinstance(info, dict):
        info = {k: getattr(info, k) for k in dir(info) if not k.startswith("_")}
    row: dict[str, Any] = {}
    for k, v in info.items():
        if k in _SKIP_INFO:
            continue
        v = _num(v)
        if isinstance(v, (bool, int, float, str)) or v is None:
            row[k] = v
    if "k" not in row:
        for alias in ("nit", "iteration"):
            if alias in row:
                row["k"] = row[alias]
                break
    ordered = {k: row[k] for k in _ROW_KEYS if k in row}
    ordered.update({k: v for k, v in row.items() if k not in ordered})
    return ordered


def _theta_from_info(info: Any) -> torch.Tensor | None:
    for key in ("theta", "x"):
        v = info.get(key) if isinstance(info, dict) else getattr(info, key, None)
        if isinstance(v, torch.Tensor):
            return v
    return None


class _Progress:
    def __init__(self, enabled: bool, total: int, initial: int, desc: str) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                file=sys.stderr,
                unit="it",
                dynamic_ncols=True,
                leave=True,
                # a terminal redraws in place; a log file gets a line every few seconds
                mininterval=0.2 if sys.stderr.isatty() else 5.0,
            )

    def update(self, row: dict[str, Any], k: int) -> None:
        if self.bar is None:
            return
        bits = []
        f = row.get("f")
        if isinstance(f, float):
            bits.append(f"f={f:.5g}")
        g = row.get("grad_norm")
        if isinstance(g, float):
            bits.append(f"|g|={g:.2e}")
        for key, short in (
            ("train_accuracy", "acc"),
            ("dev_accuracy", "dev"),
            ("test_accuracy", "test"),
        ):
            v = row.get(key)
            if isinstance(v, float):
                bits.append(f"{short}={v:.4f}")
        self.bar.set_postfix_str(" ".join(bits), refresh=False)
        self.bar.update(max(0, k - self.bar.n))  # redraws no more often than mininterval

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _minimize_call(method: str):
    if method.startswith("scipy:"):
        from secondorder.scipy_bridge import scipy_minimize

        return scipy_minimize
    from secondorder.solvers import minimize

    return minimize


@dataclass
class _SolverJob:
    cell: Cell
    cell_dir: Path
    solver: dict[str, Any]
    slug: str
    run_dir: Path


def _solver_kwargs(spec: dict[str, Any], solver: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    ls = solver.get("line_search")
    if ls is not None:
        kw["line_search"] = None if ls == "none" else ls
    for key in ("gtol", "ftol", "max_evals", "max_time"):
        if key in solver:
            kw[key] = solver[key]
    kw.update(solver.get("options") or {})
    return kw


class _Runner:
    def __init__(
        self, spec: Spec, run_dir: Path, options: RunOptions, cache: _DataCache | None = None
    ) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.options = options
        self.cache = cache or _DataCache()
        self.stop = _StopFlag()
        self.summary: dict[str, Any] = {"status": "running", "cells": {}}
        self.errors = 0

    # -- files ----------------------------------------------------------------------------------
    def _write_summary(self) -> None:
        io.write_json(self.run_dir / "summary.json", self.summary)

    def _cell_summary(self, cell: Cell, cell_dir: Path) -> dict[str, Any]:
        entry = self.summary["cells"].setdefault(
            cell.id,
            {"dir": _rel(cell_dir, self.run_dir), "point": cell.point, "seed": cell.seed},
        )
        entry.setdefault("solvers", {})
        return entry

    # -- the whole run -------------------------------------------------------------------------
    def run(self) -> None:
        spec = self.spec
        cells = spec.cells()
        with self.stop, _threads(spec.data.get("threads", 0)):
            for cell in cells:
                cell_dir = self.run_dir if len(cells) == 1 else self.run_dir / cell.id
                entry = self._cell_summary(cell, cell_dir)
                for solver in cell.spec["solvers"]:
                    if self.stop.set:
                        break
                    name = solver["name"]
                    done = entry["solvers"].get(name, {})
                    if done.get("finished"):
                        continue
                    job = _SolverJob(cell, cell_dir, solver, slugify(name), self.run_dir)
                    try:
                        entry["solvers"][name] = self._run_solver(job)
                    except (KeyboardInterrupt, SystemExit, SpecError):
                        raise
                    except Exception as exc:  # one failing solver does not end a long run
                        where = "" if cell.id == "main" else f"[{cell.id}] "
                        self.options.log(
                            f"{where}{name}: failed with {type(exc).__name__}: {exc} "
                            "(the other solvers go on; `secondorder resume` retries it)"
                        )
                        entry["solvers"][name] = {
                            "method": solver["method"],
                            "status": "error",
                            "message": f"{type(exc).__name__}: {exc}",
                            "finished": False,
                            "traceback": traceback.format_exc(limit=8),
                        }
                        self.errors += 1
                    self._write_summary()
                if self.stop.set:
                    break
            if self.stop.set:
                self.summary["status"] = "interrupted"
                self._write_summary()
                raise Interrupted(self.run_dir, self.stop.signum)
        self.summary["status"] = "complete" if not self.errors else "errors"
        self._write_summary()

    # -- one solver ----------------------------------------------------------------------------
    def _run_solver(self, job: _SolverJob) -> dict[str, Any]:
        spec = job.cell.spec
        solver = job.solver
        method = solver["method"]
        scipy = method.startswith("scipy:")
        max_iter = solver.get("max_iter", spec["max_iter"])
        every = spec["metrics_every"]
        ckpt_every = spec["checkpoint_every"]
        trace_dir = job.cell_dir / "trace"
        ckpt_path = job.cell_dir / "checkpoints" / f"{job.slug}.pt"
        trace_path = trace_dir / f"{job.slug}.jsonl"
        trace_dir.mkdir(parents=True, exist_ok=True)

        problem = build_problem(spec, self.cache)
        obj = problem.objective
        theta = problem.theta0
        state: dict[str, Any] | None = None
        rows: list[dict[str, Any]] = []
        k_done = 0
        metrics_time = 0.0
        wall_offset = 0.0
        result_info: dict[str, Any] = {}

        ckpt = io.torch_load(ckpt_path) if ckpt_path.is_file() else None
        if ckpt is not None and not scipy:
            theta = ckpt["theta"].to(dtype=theta.dtype, device=theta.device)
            state = ckpt["state"]
            rows = list(ckpt["rows"])
            k_done = int(ckpt["iteration"])
            metrics_time = float(ckpt.get("metrics_time", 0.0))
            wall_offset = float(ckpt.get("wall_time", 0.0))
            result_info = dict(ckpt.get("result", {}))
            _restore_counters(obj, ckpt.get("objective", {}))
            _set_rng_state(ckpt.get("rng", {}), problem.noise)
            if ckpt.get("finished"):
                return result_info
        io.write_jsonl(trace_path, rows)  # drop rows written after the checkpoint

        desc = solver["name"] if job.cell.id == "main" else f"{job.cell.id} | {solver['name']}"
        progress = _Progress(self.options.progress, max_iter, k_done, desc)
        wall_start = time.perf_counter() - wall_offset
        handle = open(trace_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in finally
        state_box = {"metrics_time": metrics_time}

        def record(row: dict[str, Any], theta_k: torch.Tensor | None, force: bool) -> None:
            k = int(row.get("k", len(rows)))
            # the solver's clock includes the metrics recorded so far: take them out
            if "time" in row and isinstance(row["time"], float):
                row["solver_time"] = max(0.0, row["time"] - state_box["metrics_time"])
            if theta_k is not None and (force or k % every == 0):
                t0 = time.perf_counter()
                row.update(problem.metrics(theta_k.detach()))
                state_box["metrics_time"] += time.perf_counter() - t0
            row["metrics_time"] = state_box["metrics_time"]
            row["wall_time"] = time.perf_counter() - wall_start
            rows.append(row)
            io.append_jsonl(handle, row)
            progress.update(row, k)

        def callback(info: Any):
            row = _row_from_info(info)
            theta_k = _theta_from_info(info)
            before = set(row)
            record(row, theta_k, force=False)
            if self.stop.set:
                return True
            extra = {k: v for k, v in row.items() if k not in before and k != "x"}
            return extra or None

        minimize = _minimize_call(method)
        kwargs = _solver_kwargs(spec, solver)
        status = result_info.get("status", "")
        finished = False
        seen_warnings: list[str] = list(result_info.get("warnings", []))
        try:
            while not finished:
                if max_iter == 0:  # nothing to run: record θ₀ only
                    record({"k": 0}, theta, force=True)
                    finished, status = True, "max_iter"
                    result_info = {"status": status, "nit": 0, "message": "max_iter = 0"}
                    break
                if scipy:
                    seg = max_iter
                else:
                    seg = min(max_iter, (k_done // ckpt_every + 1) * ckpt_every) - k_done
                if scipy:  # one call: scipy cannot continue a run from a saved state
                    call = {"maxiter": seg, **kwargs}
                else:
                    call = {"max_iter": seg, "initial_state": state, **kwargs}
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    res = minimize(
                        obj,
                        theta,
                        method=method[6:] if scipy else method,
                        callback=callback,
                        **call,
                    )
                for w in caught:
                    text = str(w.message)
                    if text not in seen_warnings:
                        seen_warnings.append(text)
                        progress.write(f"warning ({solver['name']}): {text}")
                theta = res.theta.detach()
                state = getattr(res, "state", None)
                k_done = int(res.nit)
                status = res.status
                finished = scipy or status != "max_iter" or k_done >= max_iter
                if status == "callback" and self.stop.set:
                    finished = False
                result_info = _result_summary(res, method, max_iter)
                if seen_warnings:
                    result_info["warnings"] = list(seen_warnings)
                if finished:
                    self._finish_rows(rows, problem, theta, state_box)
                if not scipy or finished:
                    self._checkpoint(
                        ckpt_path,
                        theta,
                        state,
                        rows,
                        k_done,
                        finished,
                        problem,
                        obj,
                        state_box["metrics_time"],
                        time.perf_counter() - wall_start,
                        result_info,
                    )
                if self.stop.set:
                    break
        finally:
            handle.close()
            progress.close()
        if finished:
            io.write_jsonl(trace_path, rows)
            io.write_csv(trace_dir / f"{job.slug}.csv", rows)
        summary = dict(result_info)
        summary.update(
            {
                "method": method,
                "finished": finished,
                "max_iter": max_iter,
                "metrics_time": state_box["metrics_time"],
                "wall_time": time.perf_counter() - wall_start,
                "load_average": _load_average(),
            }
        )
        if rows:
            last = rows[-1]
            for key in ("solver_time", "time"):
                if key in last:
                    summary[key] = last[key]
            summary["final"] = _final_metrics(rows)
        if finished:
            self.options.log(_one_line(job, summary))
        return summary

    def _finish_rows(self, rows, problem, theta, state_box) -> None:
        """Make sure the last row carries metrics (recorded every few iterations otherwise)."""
        if not rows:
            return
        last = rows[-1]
        if any(k in last for k in ("train_loss", "train_accuracy", "x")):
            return
        t0 = time.perf_counter()
        last.update(problem.metrics(theta))
        state_box["metrics_time"] += time.perf_counter() - t0

    def _checkpoint(
        self, path, theta, state, rows, k, finished, problem, obj, metrics_time, wall, result
    ) -> None:
        io.torch_save(
            path,
            {
                "format": FORMAT,
                "iteration": k,
                "theta": theta.detach().cpu(),
                "state": state,
                "rows": rows,
                "finished": finished,
                "rng": _rng_state(problem.noise),
                "objective": _counters(obj),
                "metrics_time": metrics_time,
                "wall_time": wall,
                "result": result,
            },
        )


def _counters(obj) -> dict[str, Any]:
    # the checkpoint keys keep their historical names so that older run directories resume
    state = obj.sampling_state()
    return {
        "counts": obj.counts.as_dict(),
        "_evaluations": state["evaluations"],
        "_iteration": state["iteration"],
    }


def _restore_counters(obj, saved: dict[str, Any]) -> None:
    for k, v in (saved.get("counts") or {}).items():
        if hasattr(obj.counts, k):
            setattr(obj.counts, k, v)
    obj.load_sampling_state(
        {key: saved[f"_{key}"] for key in ("evaluations", "iteration") if f"_{key}" in saved}
    )


def _result_summary(res, method: str, max_iter: int) -> dict[str, Any]:
    message = str(getattr(res, "message", ""))
    if getattr(res, "status", "") == "max_iter":  # the segment's budget → the run's
        message = re.sub(
            r"maximum number of iterations \(\d+\) reached",
            f"maximum number of iterations ({max_iter}) reached",
            message,
        )
    status = getattr(res, "status", "")
    if (
        method.startswith("scipy:")
        and status == "failed"
        and int(getattr(res, "nit", 0)) >= max_iter
    ):
        status = "max_iter"  # scipy's "maximum number of iterations" is not a failure here
    out = {
        "status": status,
        "message": message,
        "success": bool(getattr(res, "success", False)),
        "nit": int(getattr(res, "nit", 0)),
        "nfev": int(getattr(res, "nfev", 0)),
        "ngev": int(getattr(res, "ngev", 0)),
        "nhev": int(getattr(res, "nhev", 0)),
        "f": float(getattr(res, "f", math.nan)),
        "grad_norm": float(getattr(res, "grad_norm", math.nan)),
    }
    for flag in ("negative_curvature", "nonfinite", "objective_changes"):
        if hasattr(res, flag):
            v = getattr(res, flag)
            out[flag] = v if isinstance(v, (bool, int)) else bool(v)
    return out


def _final_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in reversed(rows):
        for k, v in r.items():
            if k not in out and k not in ("x",) and isinstance(v, (int, float)):
                out[k] = v
    return out


def _one_line(job: _SolverJob, s: dict[str, Any]) -> str:
    final = s.get("final", {})
    bits = [f"{job.solver['name']}: {s.get('status', '?')} after {s.get('nit', 0)} it."]
    if "f" in s:
        bits.append(f"f={s['f']:.6g}")
    for key in ("train_loss", "train_accuracy", "dev_accuracy", "test_accuracy"):
        if key in final:
            bits.append(f"{key}={final[key]:.4f}")
    if "solver_time" in s:
        bits.append(f"{s['solver_time']:.1f}s")
    prefix = "" if job.cell.id == "main" else f"[{job.cell.id}] "
    return prefix + ", ".join(bits)


def _rel(path: Path, root: Path) -> str:
    try:
        rel = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)
    return rel or "."


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------
def default_run_dir(spec: Spec, base: str | os.PathLike[str] = "runs") -> Path:
    """``runs/<spec name>-<UTC time>``."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(base) / f"{slugify(spec.name.replace('/', '-'))}-{stamp}"


def _write_meta(spec: Spec, run_dir: Path) -> None:
    if spec.is_suite:
        meta = {
            "format": FORMAT,
            "kind": "suite",
            "name": spec.name,
            "source": spec.source,
            "parts": [{"name": n, "dir": n} for n, _ in spec.parts],
        }
    else:
        cells = spec.cells()
        meta = {
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
        if len(cells) > 1:
            for c in cells:
                io.write_json(
                    run_dir / c.id / "point.json",
                    {"id": c.id, "point": c.point, "seed": c.seed, "spec": c.spec},
                )
    io.write_json(run_dir / "run.json", meta)
    io.atomic_write_text(run_dir / "spec.toml", _spec_header(spec) + to_toml(spec.data))


def _spec_header(spec: Spec) -> str:
    return (
        f"# resolved spec of {spec.source or spec.name} (defaults filled in); "
        "`secondorder resume` reads this file\n"
    )


def _prepare(spec: Spec, run_dir: Path, cache: _DataCache) -> None:
    """Everything that can fail before training: data, directory, solver options, files."""
    check_data_available(spec)
    created = not run_dir.exists()
    check_run_dir(run_dir, must_be_new=True)
    try:
        preflight(spec, cache)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # empty: nothing was written yet
        raise
    _write_meta(spec, run_dir)
    io.write_json(run_dir / "environment.json", environment(_device_of(spec), _threads_of(spec)))
    for name, part in spec.parts:
        check_run_dir(run_dir / name, must_be_new=True)
        _write_meta(part, run_dir / name)
        io.write_json(
            run_dir / name / "environment.json",
            environment(_device_of(part), _threads_of(part)),
        )


def preflight(spec: Spec, cache: _DataCache | None = None) -> None:
    """Build every cell's problem and check every solver's options against it, so that a bad
    option of the last solver fails before the first one trains."""
    import importlib

    cache = cache or _DataCache()
    if spec.is_suite:
        for _, part in spec.parts:
            preflight(part, cache)
        return
    from secondorder.solvers import validate_options

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
            where = f"solvers[{i}] ({solver['name']})"
            if method.startswith("scipy:"):
                try:
                    importlib.import_module("secondorder.scipy_bridge")
                except ImportError as err:
                    raise SpecError(f"{where}: the scipy bridge is not available ({err})") from None
                continue
            try:
                validate_options(problem.objective, method, **{"max_iter": 1, **kwargs})
            except (TypeError, ValueError) as err:
                raise SpecError(f"{where}: {err}", spec.source) from None


def _threads_of(spec: Spec) -> int:
    return 0 if spec.is_suite else int(spec.data.get("threads", 0))


def _device_of(spec: Spec) -> str:
    if spec.is_suite:
        return ",".join(sorted({_device_of(p) for _, p in spec.parts}))
    return spec.data.get("device", "cpu")


def _execute(spec: Spec, run_dir: Path, options: RunOptions, cache: _DataCache) -> None:
    if spec.is_suite:
        failed = 0
        for name, part in spec.parts:
            options.log(f"== {name} ({part.source})")
            try:
                _execute(part, run_dir / name, options, cache)
            except RunErrors as err:
                failed += err.n
        io.write_json(run_dir / "summary.json", {"status": "errors" if failed else "complete"})
        if failed:
            raise RunErrors(run_dir, failed)
        return
    runner = _Runner(spec, run_dir, options, cache)
    sum_path = run_dir / "summary.json"
    if sum_path.is_file():
        runner.summary = io.read_json(sum_path)
        runner.summary["status"] = "running"
    try:
        runner.run()
        if runner.errors:
            raise RunErrors(run_dir, runner.errors)
    except Interrupted:
        if run_dir.parent != run_dir and (run_dir.parent / "run.json").is_file():
            with contextlib.suppress(OSError, ValueError):
                meta = io.read_json(run_dir.parent / "run.json")
                if meta.get("kind") == "suite":
                    io.write_json(run_dir.parent / "summary.json", {"status": "interrupted"})
        raise


def start_run(
    spec: Spec, run_dir: str | os.PathLike[str] | None = None, options: RunOptions | None = None
) -> Path:
    """Validate everything, create the run directory and run every cell and solver."""
    options = options or RunOptions()
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(spec)
    cache = _DataCache()
    _prepare(spec, run_dir, cache)
    options.log(f"run directory: {run_dir}")
    return _execute_named(spec, run_dir, options, cache)


def _execute_named(spec: Spec, run_dir: Path, options: RunOptions, cache: _DataCache) -> Path:
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
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no run.json)")
    meta = io.read_json(meta_path)
    from secondorder.experiments.spec import tomllib

    with open(run_dir / "spec.toml", "rb") as f:
        raw = tomllib.load(f)
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
    check_run_dir(run_dir, must_be_new=False)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file() and io.read_json(summary_path).get("status") == "complete":
        options.log(f"{run_dir}: already complete; nothing to resume")
        return run_dir
    options.log(f"resuming {run_dir}")
    return _execute_named(spec, run_dir, options, _DataCache())

"""The loop of :func:`~secondorder.solvers.minimize`, on a validated configuration.

:func:`run` starts (or resumes) at θ₀, then repeats one iteration — ``begin_iteration(k)``
(re-evaluating f and g when the function changed), the method's step, a trace row, the
stopping rules — until a status is set; then it checks a stationary point for negative
curvature, writes the closing message and builds the :class:`~secondorder.solvers.Result`
with the state to resume from. :class:`_Loop` holds what changes along the way.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from secondorder._format import format_number, format_spec_value
from secondorder.errors import ModeNote
from secondorder.objective import Objective
from secondorder.solvers.escape import escape_step, lowest_eigenpair
from secondorder.solvers.linesearch import evaluator
from secondorder.solvers.protocol import Iterate
from secondorder.solvers.registry import MethodEntry, method_entry
from secondorder.solvers.result import STATUSES, Result, StopRules, Trace

__all__ = ["run"]

#: the counters a resumed run continues from, with their values at a fresh start
_CARRIED = {
    "nfev": 0,
    "ngev": 0,
    "nhev": 0,
    "time": 0.0,
    "changes": 0,
    "nonfinite": 0,
    "neg": [],
    "neg_first": None,
    "samples": 0,
    "escapes": 0,
}


def _gnorm(g: Tensor) -> float:
    return float(g.abs().max()) if g.numel() else 0.0


def _finite(f: float, g: Tensor) -> bool:
    # max |g_i| is NaN or inf exactly when some g_i is (max propagates NaN)
    return math.isfinite(f) and math.isfinite(_gnorm(g))


@dataclass
class _Loop:
    """Where a run stands: the point, the counters, the trace and (once set) the status."""

    objective: Objective
    cfg: dict
    entry: MethodEntry
    stop: StopRules
    base: dict  # what the counters continue from (a resumed state, or zeros)
    theta: Tensor
    f: float = math.nan
    g: Tensor | None = None
    k: int = 0
    carried: bool = False  # the function changed while the run was interrupted
    point: int = 0
    iterations: int = 0
    trace: Trace = field(default_factory=Trace)
    status: str | None = None
    message: str = ""

    def __post_init__(self) -> None:
        self.counts0 = self.objective.counts.copy()
        self.evaluate = evaluator(self.objective)
        self.solver = self.cfg["solver"]
        self.deferred = self.cfg["deferred"]  # the new point is evaluated on the next batch
        self.precond = self.cfg["precond"]
        self.neg_iters: list[int] = list(self.base["neg"])
        self.neg_first: str | None = self.base["neg_first"]
        self.nonfinite = int(self.base["nonfinite"])
        self.changes = int(self.base["changes"])
        self.samples = int(self.base["samples"])  # drawn by the sampler for the steps taken
        self.escapes = int(self.base["escapes"])  # steps along negative curvature at saddles

    def counts(self) -> tuple[int, int, int]:
        """Cumulative (nfev, ngev, nhev); nhev counts every curvature product."""
        c, c0, base = self.objective.counts, self.counts0, self.base
        return (
            base["nfev"] + c.f - c0.f,
            base["ngev"] + c.g - c0.g,
            base["nhev"] + (c.hv - c0.hv) + (c.ggnv - c0.ggnv) + (c.hessian - c0.hessian),
        )

    def evals_now(self) -> int:
        """Function evaluations of this call."""
        return self.objective.counts.f - self.counts0.f

    def elapsed(self) -> float:
        return self.base["time"] + self.stop.elapsed()

    def row(self, step: float, extra: dict) -> dict:
        """The trace row of the current point."""
        nfev, ngev, nhev = self.counts()
        row = {
            "k": self.k,
            "f": self.f,
            "grad_norm": _gnorm(self.g),
            "step": step,
            "nfev": nfev,
            "ngev": ngev,
            "nhev": nhev,
            "time": self.elapsed(),
        }
        m = self.objective.n_samples
        if m:  # a sum over samples: how much data the steps so far have seen
            row["samples"] = self.samples
            row["epochs"] = self.samples / m
        row.update(extra)
        if self.cfg["trace_theta"]:
            row["theta"] = self.theta.detach().clone()
        return row

    def report(self, row: dict) -> bool:
        """Callback, trace and verbose output; True when the callback asks to stop."""
        stop_now = False
        cb = self.cfg["callback"]
        if cb is not None:
            info = dict(row)
            info.update(
                theta=self.theta, objective=self.objective, method=self.entry.name, grad=self.g
            )
            out = cb(info)
            if isinstance(out, dict):
                row.update(out)
            elif out is True:
                stop_now = True
        self.trace.append(row)
        v = self.cfg["verbose"]
        if v and (v is True or row["k"] % int(v) == 0):
            print(
                f"[{self.entry.name}] k={row['k']:5d}  f={format_number(row['f'], 10)}  "
                f"|g|={format_number(row['grad_norm'], 4)}  "
                f"step={format_number(row['step'], 3)}  nfev={row['nfev']}"
            )
        return stop_now

    def end(self, status: str, message: str) -> None:
        self.status, self.message = status, message


def run(objective: Objective, theta0: Tensor, cfg: dict) -> Result:
    """Minimise from θ₀ (or from ``cfg["initial_state"]``) with the validated ``cfg``."""
    state = cfg["initial_state"]
    stop = StopRules(cfg["max_iter"], cfg["gtol"], cfg["ftol"], cfg["max_evals"], cfg["max_time"])
    base = dict(_CARRIED)
    if state is not None:
        base.update({key: state[key] for key in _CARRIED if key in state})
    loop = _Loop(objective, cfg, method_entry(cfg["method"]), stop, base, theta0)
    if state is not None:
        loop.solver.load_state_dict(state.get("solver", {}))
        if loop.precond is not None:
            loop.precond.load_state_dict(state.get("precond", {}))
    _warn_about_changing_functions(loop)
    _start(loop, state)
    while True:
        while loop.status is None:
            _iterate(loop)
        if loop.status != "gtol" or not cfg["check_saddle"] or not _check_saddle(loop):
            break
    return _result(loop, _message(loop))


def _warn_about_changing_functions(loop: _Loop) -> None:
    """A method with memory on sampled batches: say up front what that does to it."""
    entry, stochastic = loop.entry, loop.objective.stochastic
    if entry.memory is None or stochastic == "never":
        return
    if stochastic == "evaluation":
        warnings.warn(
            f"{entry.label} on an objective whose batches change at every evaluation: "
            "no two gradients come from the same function, so curvature information is "
            "noisy and line searches compare different functions; prefer fixed batches",
            RuntimeWarning,
            stacklevel=4,
        )
    elif not loop.cfg["robust"]:
        warnings.warn(
            f"{entry.label} on an objective whose batches change every iteration keeps "
            "its memory across changes (faithful mode): its curvature pairs or conjugate "
            "directions mix different functions and the method may stop early; pass "
            "robust=True or use fixed batches",
            ModeNote,
            stacklevel=4,
        )


def _start(loop: _Loop, state: dict | None) -> None:
    """f and g at the starting point (a resumed run reuses the saved ones when still valid),
    row 0 of a fresh run, and the checks that can end the run before its first step."""
    objective = loop.objective
    if state is not None:
        loop.k = int(state["k"])
        loop.theta = state["theta"].detach().clone().to(objective.dtype)
        # the function of iteration k is compared with the one the saved f and g belong to,
        # so the first iteration sees (and counts) a change exactly as an uninterrupted run
        # would, whether the objective is the one the run stopped with or a fresh copy
        if state.get("evaluations") is not None:  # samplers that draw per evaluation
            objective.load_sampling_state({"evaluations": int(state["evaluations"])})
        carried = objective.begin_iteration(loop.k)
        if state.get("version") is not None:
            carried = objective.version != state["version"]
        # a deferred evaluation may have started the new function before the interruption
        loop.carried = carried or bool(state.get("carried", False))
        if carried or state.get("g") is None:
            loop.f, loop.g = loop.evaluate(loop.theta)
            loop.changes += int(carried)
        else:
            loop.f, loop.g = float(state["f"]), state["g"].detach().clone()
    else:
        objective.begin_iteration(loop.k)
        loop.f, loop.g = loop.evaluate(loop.theta)
    if not _finite(loop.f, loop.g):
        loop.end(
            "nonfinite",
            f"the objective or its gradient is not finite at the starting point (f = {loop.f})",
        )
    elif state is None and loop.report(loop.row(0.0, {})):
        loop.end("callback", "the callback asked to stop")
    if loop.status is None and loop.stop.converged(_gnorm(loop.g)):
        loop.end(
            "gtol",
            f"gradient norm ‖g‖∞ = {format_number(_gnorm(loop.g), 3)} ≤ "
            f"gtol = {format_spec_value(loop.stop.gtol)} at the start",
        )


def _look_ahead(loop: _Loop) -> bool:
    """Start the function of the next iteration at the new point (a deferred evaluation, see
    ``solvers.options``); False when it is not finite there."""
    changed = loop.objective.begin_iteration(loop.k)
    loop.f, loop.g = loop.evaluate(loop.theta)
    if changed:
        loop.changes += 1
        loop.point += 1
        loop.carried = True  # the next iteration sees the change it starts on
    return _finite(loop.f, loop.g)


def _iterate(loop: _Loop) -> None:
    """One iteration: the function of iteration k, the method's step, its row, the stop rules."""
    cfg = loop.cfg
    changed = loop.objective.begin_iteration(loop.k)
    if changed:
        loop.f, loop.g = loop.evaluate(loop.theta)
        loop.changes += 1
        loop.point += 1
        if not _finite(loop.f, loop.g):
            loop.end(
                "nonfinite",
                f"the objective became non-finite at iteration {loop.k} after it changed",
            )
            return
    changed, loop.carried = changed or loop.carried, False
    batch = loop.objective.batch_size
    it = Iterate(
        objective=loop.objective,
        theta=loop.theta,
        f=loop.f,
        g=loop.g,
        k=loop.k,
        precond=loop.precond,
        lr=cfg["lr"],
        fixed_step=cfg.get("line_search") is None,
        changed=changed,
        point=loop.point,
    )
    if loop.precond is not None:
        loop.precond.update(loop.objective, loop.theta, loop.k)
    loop.solver.begin(it)
    out = loop.solver.step(it, loop.evaluate, loop.stop.evals_left(loop.evals_now()))
    if it.negative_curvature:
        loop.neg_iters.append(loop.k)
        if loop.neg_first is None:
            loop.neg_first = f"at iteration {loop.k} ({it.negative_curvature})"
    loop.nonfinite += out.nonfinite
    if out.status is not None:
        loop.end(out.status, out.message)
        return
    f_before = loop.f
    loop.theta, loop.f, loop.g = out.theta, out.f, out.g
    if out.moved:
        loop.point += 1
    loop.k += 1
    loop.iterations += 1
    loop.samples += batch or 0
    finite = not loop.deferred or _look_ahead(loop)
    extra = dict(it.info)
    extra.pop("ls_note", None)
    if changed:
        extra["changed"] = True
    if loop.report(loop.row(out.step, extra)):
        loop.end("callback", "the callback asked to stop")
        return
    if not finite:
        loop.end("nonfinite", f"the objective became non-finite at iteration {loop.k}")
        return
    _apply_stop_rules(loop, f_before, out.moved)


def _apply_stop_rules(loop: _Loop, f_before: float, moved: bool) -> None:
    """End the run when a stopping rule holds after a step from f_before."""
    rule = loop.stop.check(
        iterations=loop.iterations,
        f=loop.f,
        f_prev=f_before,
        grad_norm=_gnorm(loop.g),
        evals=loop.evals_now(),
        moved=moved,
    )
    if rule is not None:
        loop.end(*rule)


def _check_saddle(loop: _Loop) -> bool:
    """At a stationary point with a clearly negative Hessian eigenvalue (dense eigenvalues for
    a method on the dense Hessian, else 30 Lanczos steps): step along its eigenvector when the
    method escapes saddles and a trial lowers f (True: the run goes on), else end with status
    ``saddle``."""
    dense = loop.entry.dense_hessian
    lam, v, scale = lowest_eigenpair(loop.objective, loop.theta, dense)
    tol = math.sqrt(torch.finfo(loop.theta.dtype).eps) * max(1.0, scale)
    if lam >= -tol:
        return False
    if not loop.neg_iters or loop.neg_iters[-1] != loop.k:
        loop.neg_iters.append(loop.k)
    if loop.neg_first is None:
        loop.neg_first = (
            f"at iteration {loop.k} (Hessian eigenvalue {format_number(lam, 3)} at the point)"
        )
    if loop.entry.escapes_saddles and loop.iterations < loop.stop.max_iter:
        solver = getattr(loop.solver, "solver", loop.solver)
        out = escape_step(solver, loop.evaluate, loop.theta, loop.f, loop.g, lam, v)
        if out is not None:
            f_before = loop.f
            loop.theta, loop.f, loop.g, t = out
            loop.point += 1
            loop.k += 1
            loop.iterations += 1
            loop.escapes += 1
            loop.status, loop.message = None, ""
            if loop.report(loop.row(t, {"saddle_escape": lam})):
                loop.end("callback", "the callback asked to stop")
                return False
            _apply_stop_rules(loop, f_before, True)
            return True
    loop.end(
        "saddle",
        f"the gradient vanished (‖g‖∞ = {format_number(_gnorm(loop.g), 3)}) but the Hessian "
        "has a negative "
        f"eigenvalue ≈ {format_number(lam, 3)}: θ is a saddle point or a maximum, not a minimum",
    )
    return False


def _message(loop: _Loop) -> str:
    """The status message, followed by notes on what the run met along the way."""
    entry, notes = loop.entry, []
    if loop.neg_iters:
        shown = loop.neg_iters[:8]
        where = ", ".join(str(i) for i in shown) + (" …" if len(loop.neg_iters) > 8 else "")
        modified = "; the Hessian was modified to give a descent direction"
        notes.append(
            f"negative curvature detected {loop.neg_first}; at iteration(s) {where} in all"
            + (modified if entry.dense_hessian else "")
        )
    if loop.escapes:
        notes.append(
            f"left a saddle point along a Hessian eigenvector of negative eigenvalue "
            f"{loop.escapes} time(s)"
        )
    if loop.nonfinite:
        notes.append(
            f"non-finite values met at {loop.nonfinite} trial step(s); backtracked (shrank the "
            "step)"
        )
    if loop.changes:
        changed = f"the objective changed between iterations {loop.changes} time(s)"
        if entry.memory is not None and not loop.cfg["robust"]:
            if loop.status != "objective_changed":
                notes.append(
                    f"{changed} (reshuffled batches); faithful mode kept the {entry.label} "
                    "memory across changes, so it mixes different functions; pass robust=True "
                    "to avoid this"
                )
        elif entry.memory is not None:
            notes.append(f"{changed} (reshuffled batches); robust mode: {entry.robust_note}")
        else:
            notes.append(changed)
    restarts = getattr(loop.solver, "restarts", 0)
    if restarts and loop.status not in ("objective_changed",):
        notes.append(
            f"the search direction was reset to steepest descent {restarts} time(s) after a "
            "failed line search or a non-descent direction"
        )
    return loop.message + ("; " + "; ".join(notes) if notes else "")


def _result(loop: _Loop, message: str) -> Result:
    """The Result, with the state a later call resumes from."""
    nfev, ngev, nhev = loop.counts()
    total_time = loop.elapsed()
    theta, g, precond = loop.theta, loop.g, loop.precond
    info: dict[str, Any] = {
        **loop.solver.info(),
        "line_search": loop.cfg.get("line_search"),
        "precondition_updates": 0 if precond is None else precond.updates,
    }
    result = Result(
        theta=theta.detach().clone(),
        f=loop.f,
        grad_norm=_gnorm(g),
        nit=loop.k,
        nfev=nfev,
        ngev=ngev,
        nhev=nhev,
        status=loop.status,
        message=message,
        method=loop.entry.name,
        trace=loop.trace,
        success=STATUSES.get(loop.status, False),
        negative_curvature=bool(loop.neg_iters),
        negative_curvature_iterations=loop.neg_iters,
        nonfinite=loop.nonfinite > 0,
        objective_changes=loop.changes,
        grad=g.detach().clone(),
        info=info,
    )
    result.state = {
        "method": loop.entry.name,
        "k": loop.k,
        "theta": theta.detach().clone(),
        "f": loop.f,
        "g": g.detach().clone(),
        "nfev": nfev,
        "ngev": ngev,
        "nhev": nhev,
        "time": total_time,
        "changes": loop.changes,
        "nonfinite": loop.nonfinite,
        "neg": list(loop.neg_iters),
        "neg_first": loop.neg_first,
        "samples": loop.samples,
        "escapes": loop.escapes,
        "solver": loop.solver.state_dict(),
        "precond": {} if precond is None else precond.state_dict(),
        "version": loop.objective.version,  # the function that f and g belong to
        "carried": loop.carried,  # the next iteration starts on a function that changed
        "evaluations": loop.objective.sampling_state()["evaluations"],
    }
    return result

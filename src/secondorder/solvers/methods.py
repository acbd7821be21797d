"""The two kinds of method the loop of :func:`~secondorder.solvers.minimize` runs.

:class:`LineSearchMethod` joins a direction rule to a step rule, with the policies around
them (curvature pairs, restarts, failures after a change of the function);
:class:`TrustMethod` gives a trust-region solver the same interface. Both offer
``begin(it)``, ``step(it, evaluate, budget) -> Outcome``, ``state_dict``/``load_state_dict``
and ``info()`` (the method's entries of ``Result.info``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from secondorder._format import format_number
from secondorder.linalg import dot64
from secondorder.solvers.directions import NonlinearCG
from secondorder.solvers.line import LineSearchResult
from secondorder.solvers.linesearch import StepRule
from secondorder.solvers.protocol import Direction, Evaluate, Iterate, Outcome
from secondorder.solvers.registry import MethodEntry

__all__ = ["LineSearchMethod", "TrustMethod"]


class LineSearchMethod:
    """A direction rule with a step rule, and the policies around them:

    - the curvature pair (s, y) of step k is handed to the direction at the top of step k+1.
      ``robust=False`` (faithful): y = g_{k+1} − g_k with g_{k+1} re-evaluated on the function
      of iteration k+1 when it changed; ``robust=True``: g_{k+1} is the gradient the line
      search computed at θ_{k+1}, on the same function as g_k (and NLCG restarts on a change);
    - a direction that is not a descent direction is replaced by −M⁻¹g;
    - when the line search fails, a method with memory forgets it and tries −M⁻¹g once (in
      faithful mode after a change of the function it stops instead and says why).
    """

    def __init__(
        self, entry: MethodEntry, direction: Direction, rule: StepRule, *, robust: bool
    ) -> None:
        self.entry = entry
        self.name = entry.name
        self.has_memory = entry.memory is not None
        self.direction = direction
        self.rule = rule
        self.robust = robust
        self.pending: tuple[Tensor, Tensor, Tensor] | None = None
        self.changes_since_reset = 0
        self.restarts = 0
        self._spent = 0

    def begin(self, it: Iterate) -> None:
        if it.changed:
            self.changes_since_reset += 1
        if self.pending is not None:
            s, g_old, g_ls = self.pending
            y = (g_ls if self.robust else it.g) - g_old
            self.direction.update(s, y, it)
            self.pending = None
        if it.changed:
            self.direction.on_change(it, self.robust)

    def _broken_by_change(self) -> bool:
        return not self.robust and self.has_memory and self.changes_since_reset > 0

    def _changed_failure(self, it: Iterate, why: str) -> Outcome:
        return Outcome.stop(
            it,
            "objective_changed",
            f"objective changed between iterations (reshuffled batches) and the "
            f"{self.entry.memory} became inconsistent: {self.entry.label} stopped early ({why}); "
            "pass robust=True, or use fixed batches",
        )

    def _reset(self) -> None:
        self.direction.reset()
        self.changes_since_reset = 0
        self.restarts += 1

    def step(self, it: Iterate, evaluate: Evaluate, budget: int | None) -> Outcome:
        """Direction, step rule, and the fallbacks of the class doc."""
        dr = self.direction
        d = dr.compute(it)
        dphi0 = dot64(it.g, d)
        restarted = False
        # a momentum step (no descent required) is taken as it is with the fixed step α = lr
        momentum_step = not dr.requires_descent and it.fixed_step and math.isfinite(dphi0)
        if not momentum_step and not (math.isfinite(dphi0) and dphi0 < 0):
            if self._broken_by_change():
                return self._changed_failure(
                    it,
                    "the search direction is not a descent direction, "
                    f"∇fᵀd = {format_number(dphi0, 3)}",
                )
            if self.has_memory or dr.restart_on_non_descent:
                self._reset()
                d = -it.minv(it.g)
                dphi0 = dot64(it.g, d)
                restarted = True
            if not (math.isfinite(dphi0) and dphi0 < 0):
                return Outcome.stop(
                    it,
                    "stalled",
                    f"no descent direction at iteration {it.k}: ∇fᵀd = {format_number(dphi0, 3)}",
                )
        alpha0 = dr.initial_step(it, d, dphi0)
        ls = self.rule.search(evaluate, it.theta, d, it.f, it.g, dphi0, alpha0, budget)
        used = ls.nfev
        self._spent = used
        nonfinite = ls.nonfinite
        moved = ls.success and not torch.equal(ls.theta, it.theta)
        retried = False
        if not moved and not restarted and self.has_memory:
            if self._broken_by_change():
                out = self._changed_failure(it, ls.message or "no progress along the direction")
                out.nonfinite = nonfinite
                return out
            left = None if budget is None else budget - used
            if left is None or left > 0:
                retried = True
                self._reset()
                d = -it.minv(it.g)
                dphi0 = dot64(it.g, d)
                alpha0 = dr.initial_step(it, d, dphi0)
                ls = self.rule.search(evaluate, it.theta, d, it.f, it.g, dphi0, alpha0, left)
                self._spent += ls.nfev
                nonfinite += ls.nonfinite
                moved = ls.success and not torch.equal(ls.theta, it.theta)
        if not moved:
            return self._failed(it, ls, nonfinite, budget, retried)
        alpha = ls.alpha
        self.pending = (alpha * d, it.g, ls.g)
        dr.after_step(it, alpha, dphi0, ls.f)
        it.info["ls_evals"] = self._spent
        if not ls.wolfe and ls.message:
            it.info["ls_note"] = ls.message
        return Outcome(ls.theta, ls.f, ls.g, alpha, True, note=ls.message, nonfinite=nonfinite)

    def _failed(
        self, it: Iterate, ls: LineSearchResult, nonfinite: int, budget: int | None, retried: bool
    ) -> Outcome:
        """The run ends here: the step rule did not move θ (why, in the status)."""
        if ls.success:
            status = "stalled"
            msg = (
                f"no progress at iteration {it.k}: the accepted step "
                f"α = {format_number(ls.alpha, 3)} no "
                f"longer changes θ in {it.theta.dtype}"
            )
        elif nonfinite and nonfinite == ls.nfev:
            status, msg = "nonfinite", ls.message
        elif budget is not None and self._spent >= budget:
            status = "max_evals"
            msg = f"the function-evaluation budget ran out during the line search ({ls.message})"
        else:
            status, msg = "line_search", ls.message
        if retried:
            msg += " (also after restarting from steepest descent)"
        return Outcome.stop(it, status, msg, nonfinite=nonfinite)

    def state_dict(self) -> dict:
        return {
            "direction": self.direction.state_dict(),
            "pending": None if self.pending is None else tuple(t.clone() for t in self.pending),
            "changes_since_reset": self.changes_since_reset,
            "restarts": self.restarts,
        }

    def load_state_dict(self, state: dict) -> None:
        self.direction.load_state_dict(state.get("direction", {}))
        p = state.get("pending")
        self.pending = None if p is None else tuple(t.clone() for t in p)
        self.changes_since_reset = state.get("changes_since_reset", 0)
        self.restarts = state.get("restarts", 0)

    def info(self) -> dict:
        out: dict[str, Any] = {"line_search": self.rule.name, "restarts": self.restarts}
        d = self.direction
        for key in ("skipped", "updates", "cg_total", "damping"):
            if hasattr(d, key):
                out[{"skipped": "skipped_pairs", "cg_total": "cg_iterations"}.get(key, key)] = (
                    getattr(d, key)
                )
        if isinstance(d, NonlinearCG):
            out["nlcg_restarts"] = d.restarts
        return out


class TrustMethod:
    """Adapter giving trust-ncg and arc the loop's interface."""

    def __init__(self, entry: MethodEntry, solver: Any) -> None:
        self.entry = entry
        self.name = entry.name
        self.solver = solver
        self.rejected = 0

    def begin(self, it: Iterate) -> None:
        if it.changed:
            self.solver.on_change(it, True)

    def step(self, it: Iterate, evaluate: Evaluate, budget: int | None) -> Outcome:
        out = self.solver.step(it, evaluate)
        if not out.moved and out.status is None:
            self.rejected += 1
        return out

    def state_dict(self) -> dict:
        return {"solver": self.solver.state_dict(), "rejected": self.rejected}

    def load_state_dict(self, state: dict) -> None:
        self.solver.load_state_dict(state.get("solver", {}))
        self.rejected = state.get("rejected", 0)

    def info(self) -> dict:
        return {"rejected_steps": self.rejected, **self.solver.state_dict()}

"""What one iteration of :func:`~secondorder.solvers.minimize` passes around.

The loop hands every method an :class:`Iterate` (θ_k, f, g, the preconditioner and a place for
the method's trace columns) and gets back an :class:`Outcome` (the next point, or why the run
ends). A direction rule implements :class:`Direction`; the line-search adapter
(:class:`~secondorder.solvers.methods.LineSearchMethod`) calls it in this order at every
iteration: ``update(s, y)`` with the last step's curvature pair, ``on_change`` when the
function changed, ``compute`` (d_k), ``initial_step`` (α₀), and ``after_step`` once a step
is accepted. Trust-region solvers take an :class:`Iterate` and return the :class:`Outcome`
themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from secondorder.linalg import norm64

__all__ = ["Direction", "Evaluate", "Iterate", "Outcome"]

#: θ ↦ (f as a float, ∇f): every trial point is evaluated through one of these
Evaluate = Callable[[Tensor], tuple[float, Tensor]]


@dataclass
class Iterate:
    """What a rule sees at iteration k: θ, f, g, the preconditioner and a place for notes."""

    objective: Any
    theta: Tensor
    f: float
    g: Tensor
    k: int
    precond: Any = None
    lr: float = 1.0
    fixed_step: bool = False
    changed: bool = False
    point: int = 0  # changes whenever θ moves or the function changes
    info: dict = field(default_factory=dict)
    negative_curvature: str | None = None

    def minv(self, v: Tensor) -> Tensor:
        """M⁻¹ v (v itself without a preconditioner)."""
        return v if self.precond is None else self.precond.apply(v)


@dataclass
class Outcome:
    """One iteration's result, as the loop of :func:`minimize` consumes it."""

    theta: Tensor
    f: float
    g: Tensor
    step: float
    moved: bool
    status: str | None = None
    message: str = ""
    note: str = ""
    nonfinite: int = 0

    @classmethod
    def stop(cls, it: Iterate, status: str, message: str, nonfinite: int = 0) -> Outcome:
        """Stay at the current iterate and end the run with ``status``."""
        return cls(it.theta, it.f, it.g, 0.0, False, status, message, nonfinite=nonfinite)


class Direction:
    """Base of the direction rules."""

    name = ""
    #: on a direction that is not a descent direction, reset and step along −M⁻¹g instead
    restart_on_non_descent = False
    #: False for momentum methods, whose step may point uphill for the current batch
    requires_descent = True

    def __init__(self) -> None:
        self.fresh = True  # no step since the start or the last reset
        self.alpha_prev: float | None = None
        self.dphi_prev: float | None = None
        self.f_prev: float | None = None

    # the protocol -------------------------------------------------------------------------
    def compute(self, it: Iterate) -> Tensor:
        raise NotImplementedError

    def update(self, s: Tensor, y: Tensor, it: Iterate) -> None:
        """Take the curvature pair of the last step (called before ``compute``)."""

    def reset(self) -> None:
        """Forget what was learnt about curvature; the next direction is −M⁻¹g."""
        self.fresh = True

    def on_change(self, it: Iterate, robust: bool) -> None:
        """The function changed (a new batch); ``robust`` rules may restart here."""

    def initial_step(self, it: Iterate, d: Tensor, dphi0: float) -> float:
        """The first trial step α₀ (the fixed step itself without a line search)."""
        return it.lr

    def after_step(self, it: Iterate, alpha: float, dphi0: float, f_new: float) -> None:
        self.alpha_prev = alpha
        self.dphi_prev = dphi0
        self.f_prev = it.f
        self.fresh = False

    def state_dict(self) -> dict:
        return {
            "fresh": self.fresh,
            "alpha_prev": self.alpha_prev,
            "dphi_prev": self.dphi_prev,
            "f_prev": self.f_prev,
        }

    def load_state_dict(self, state: dict) -> None:
        self.fresh = state.get("fresh", True)
        self.alpha_prev = state.get("alpha_prev")
        self.dphi_prev = state.get("dphi_prev")
        self.f_prev = state.get("f_prev")

    # shared first-step heuristics -----------------------------------------------------------
    def _first_step(self, it: Iterate, d: Tensor) -> float:
        """lr·min(1, 1/‖d‖₂): the first step of a method with no curvature scale yet."""
        n = norm64(d)
        return it.lr * min(1.0, 1.0 / n) if n > 0 else it.lr

    def _scaled_step(self, it: Iterate, d: Tensor, dphi0: float) -> float:
        """α₀ = α_{k−1}·φ′_{k−1}(0)/φ′_k(0) (Nocedal & Wright eq. 3.60)."""
        if self.fresh or self.alpha_prev is None or not self.dphi_prev or dphi0 >= 0:
            return self._first_step(it, d)
        a = self.alpha_prev * self.dphi_prev / dphi0
        return a if math.isfinite(a) and a > 0 else self._first_step(it, d)

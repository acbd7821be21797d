"""Step rules along a search direction d: fixed step, Armijo backtracking, strong Wolfe.

All three search φ(α) = f(θ + αd) (:class:`~secondorder.solvers.line.LineFunction`) and share
these rules:

- scalars (f, φ′ = ∇fᵀd, the step α) are Python floats, i.e. float64, whatever θ's dtype;
- every trial evaluates f and ∇f together once (``value_and_grad``); the accepted point's f
  and g are handed back so the solver never evaluates them again;
- a trial with a non-finite f or g is never accepted: the step shrinks (backtracks) towards
  the best point seen, and the result counts such trials (``nonfinite``);
- a search that cannot meet its conditions returns the best point seen when it lowers f
  (``success=True, wolfe=False``) and otherwise reports failure with the starting point.

Strong Wolfe: bracketing and zoom (:mod:`secondorder.solvers.wolfe`). Armijo: backtracking
from α₀ with the minimiser of the cubic through (0, f, φ′(0)) and (α, f(α), φ′(α)), kept in
[0.1α, 0.5α] (or a plain factor ``shrink`` with ``interpolate=False``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from secondorder._format import format_number
from secondorder.linalg import dot64
from secondorder.objective import FunctionObjective, Objective
from secondorder.solvers.line import (
    Evaluate,
    LineFunction,
    LineSearchResult,
    approximate_wolfe,
    cubic_minimizer,
)
from secondorder.solvers.wolfe import strong_wolfe_search

__all__ = [
    "Armijo",
    "FixedStep",
    "LineFunction",
    "LineSearchResult",
    "StrongWolfe",
    "armijo",
    "cubic_minimizer",
    "evaluator",
    "fixed_step",
    "make_step_rule",
    "strong_wolfe",
]


# -- the searches on φ ------------------------------------------------------------------------
def _fixed(phi: LineFunction, alpha: float, max_ls: int, shrink: float = 0.5) -> LineSearchResult:
    for _ in range(max(1, max_ls)):
        f, _, _ = phi(alpha)
        if math.isfinite(f):
            msg = (
                ""
                if phi.nonfinite == 0
                else (
                    f"non-finite value met at trial step; backtracked {phi.nonfinite} time(s) to "
                    f"α = {format_number(alpha, 3)}"
                )
            )
            return phi.result(alpha, success=True, wolfe=False, message=msg)
        alpha *= shrink
    return phi.result(
        0.0,
        success=False,
        wolfe=False,
        message=f"non-finite values at every trial step ({phi.nfev} trials)",
    )


def _armijo(
    phi: LineFunction,
    alpha: float,
    *,
    c1: float,
    shrink: float,
    interpolate: bool,
    max_ls: int,
    min_step: float,
) -> LineSearchResult:
    f0, dphi0 = phi.f0, phi.dphi0
    noise = 32.0 * torch.finfo(phi.theta.dtype).eps * abs(f0)
    c2 = 0.9
    for _ in range(max(1, max_ls)):
        f, _, dphi = phi(alpha)
        finite = math.isfinite(f)
        resolvable = -c1 * alpha * dphi0 > noise
        sufficient = finite and f <= f0 + c1 * alpha * dphi0
        if sufficient and (resolvable or c2 * dphi0 <= dphi <= -dphi0):
            msg = (
                ""
                if phi.nonfinite == 0
                else (f"non-finite value met at trial step; backtracked ({phi.nonfinite} trial(s))")
            )
            return phi.result(alpha, success=True, wolfe=True, message=msg)
        if finite and not resolvable and f <= f0 + noise and dphi < c2 * dphi0:
            # f cannot resolve the decrease and the slope is still steep: the step is too short
            grow = alpha * 100.0
            if dphi > dphi0:  # secant on the slope towards φ′ = 0
                grow = min(grow, alpha * dphi0 / (dphi0 - dphi))
            alpha = max(grow, 2.0 * alpha)
            continue
        if not finite or not interpolate:
            new = alpha * shrink
        else:
            new = cubic_minimizer(0.0, f0, dphi0, alpha, f, dphi, bounds=(0.1 * alpha, 0.5 * alpha))
        alpha = new
        if alpha <= min_step:
            break
    out = phi.best_result("")
    if not out.success:
        approx = approximate_wolfe(phi, 0.9)
        if approx is not None:
            return approx
    what = "no decrease" if not out.success else "no sufficient decrease"
    tail = f"; {phi.nonfinite} non-finite value(s) met" if phi.nonfinite else ""
    out.message = f"line search failed: {what} along the direction after {phi.nfev} trials{tail}"
    if out.success:
        out.message = (
            f"Armijo condition not met after {phi.nfev} trials; took the best point seen{tail}"
        )
    return out


# -- step rules used by the solvers ---------------------------------------------------------
class StepRule:
    """A rule that turns a direction into an accepted step."""

    name = ""

    def search(
        self,
        evaluate: Evaluate,
        theta: Tensor,
        d: Tensor,
        f0: float,
        g0: Tensor,
        dphi0: float,
        alpha0: float,
        budget: int | None = None,
    ) -> LineSearchResult:
        raise NotImplementedError


class FixedStep(StepRule):
    """α = α₀ (the solver passes its ``lr``); halves α only when the value is not finite."""

    name = "fixed"

    def __init__(self, max_backtracks: int = 30) -> None:
        self.max_ls = max_backtracks

    def search(self, evaluate, theta, d, f0, g0, dphi0, alpha0, budget=None):
        phi = LineFunction(evaluate, theta, d, f0, g0, dphi0)
        return _fixed(phi, alpha0, _budget(self.max_ls, budget))


class UnevaluatedStep(StepRule):
    """α = α₀, θ + αd not evaluated here: for a fixed step on a function that changes at the
    next iteration, whose f and ∇f at θ + αd the loop evaluates on the next function anyway
    (one evaluation per mini-batch step instead of two)."""

    name = "fixed"

    def search(self, evaluate, theta, d, f0, g0, dphi0, alpha0, budget=None):
        x = torch.add(theta, d, alpha=float(alpha0))  # as LineFunction.point does
        return LineSearchResult(float(alpha0), x, math.nan, g0, True, False, 0)


class Armijo(StepRule):
    """Backtracking until f(θ + αd) ≤ f + c1 α ∇fᵀd."""

    name = "armijo"

    def __init__(
        self, c1: float = 1e-4, shrink: float = 0.5, interpolate: bool = True, max_ls: int = 30
    ) -> None:
        self.c1, self.shrink, self.interpolate, self.max_ls = c1, shrink, interpolate, max_ls

    def search(self, evaluate, theta, d, f0, g0, dphi0, alpha0, budget=None):
        phi = LineFunction(evaluate, theta, d, f0, g0, dphi0)
        min_step = _min_step(theta, d)
        return _armijo(
            phi,
            alpha0,
            c1=self.c1,
            shrink=self.shrink,
            interpolate=self.interpolate,
            max_ls=_budget(self.max_ls, budget),
            min_step=min_step,
        )


class StrongWolfe(StepRule):
    """Bracketing and zoom until both strong Wolfe conditions hold (see module doc).

    ``xtol`` (absolute, in units of ‖αd‖∞) stops the zoom when the bracket no longer moves θ;
    by default it is eps·max(1, ‖θ‖∞) in θ's dtype.
    """

    name = "wolfe"

    def __init__(
        self, c1: float = 1e-4, c2: float = 0.9, max_ls: int = 25, xtol: float | None = None
    ) -> None:
        if not 0.0 < c1 < c2 < 1.0:
            raise ValueError(f"strong Wolfe needs 0 < c1 < c2 < 1, got c1={c1}, c2={c2}")
        self.c1, self.c2, self.max_ls, self.xtol = c1, c2, max_ls, xtol

    def search(self, evaluate, theta, d, f0, g0, dphi0, alpha0, budget=None):
        phi = LineFunction(evaluate, theta, d, f0, g0, dphi0)
        d_norm = float(d.abs().max())
        xtol = self.xtol
        if xtol is None:
            xtol = torch.finfo(theta.dtype).eps * max(1.0, float(theta.abs().max()))
        out = strong_wolfe_search(
            phi,
            alpha0,
            c1=self.c1,
            c2=self.c2,
            max_ls=_budget(self.max_ls, budget) - 1,
            xtol=xtol,
            d_norm=d_norm,
        )
        if not out.success:
            best = phi.best_result("")
            if best.success:
                best.message = (
                    f"strong Wolfe conditions not met after {phi.nfev} trials; took the best "
                    "point seen"
                )
                return best
            out = approximate_wolfe(phi, self.c2) or out
        return out


def _budget(max_ls: int, budget: int | None) -> int:
    return max_ls if budget is None else max(1, min(max_ls, budget))


def _min_step(theta: Tensor, d: Tensor) -> float:
    """The step below which θ + αd no longer differs from θ."""
    eps = torch.finfo(theta.dtype).eps
    dn = float(d.abs().max())
    return 0.0 if dn == 0 else eps * max(1.0, float(theta.abs().max())) / dn * 0.1


def make_step_rule(name: str | None, **options) -> StepRule:
    """``None``/"fixed" → :class:`FixedStep`, "armijo" → :class:`Armijo`, "wolfe" →
    :class:`StrongWolfe`."""
    if name is None or name == "fixed":
        options.pop("c1", None)
        options.pop("c2", None)
        return FixedStep(**({"max_backtracks": options["max_ls"]} if "max_ls" in options else {}))
    if name == "armijo":
        options.pop("c2", None)
        return Armijo(**options)
    if name == "wolfe":
        return StrongWolfe(**options)
    raise ValueError(f"unknown line search {name!r}")


def evaluator(objective) -> Evaluate:
    """θ ↦ (float f, ∇f) from ``objective.value_and_grad``.

    A function that returns a non-finite constant (no autograd graph, e.g. ``torch.tensor(nan)``
    outside its domain) makes autograd raise; then f is evaluated alone and, when it is not
    finite, the trial comes back as (f, NaN gradient) so the step rules can backtrack."""

    def evaluate(x: Tensor) -> tuple[float, Tensor]:
        try:
            f, g = objective.value_and_grad(x)
        except RuntimeError:
            f = float(objective.value(x))
            if math.isfinite(f):
                raise
            return f, torch.full_like(x, float("nan"))
        return float(f), g

    return evaluate


# -- functional forms ------------------------------------------------------------------------
def _prepare(fun, theta: Tensor, d: Tensor, f0, g0):
    if isinstance(fun, Objective):
        obj = fun
    elif callable(fun):
        obj = FunctionObjective(fun, theta.numel(), dtype=theta.dtype, device=theta.device)
    else:
        raise TypeError(f"expected an Objective or a callable, got {type(fun).__name__}")

    evaluate = evaluator(obj)
    if f0 is None or g0 is None:
        f0, g0 = evaluate(theta)
    dphi0 = dot64(g0, d)
    if not dphi0 < 0:
        raise ValueError(
            f"the direction is not a descent direction: ∇fᵀd = {format_number(dphi0, 3)} ≥ 0"
        )
    return evaluate, float(f0), g0, dphi0


def strong_wolfe(
    fun,
    theta: Tensor,
    d: Tensor,
    *,
    f0: float | None = None,
    g0: Tensor | None = None,
    alpha0: float = 1.0,
    c1: float = 1e-4,
    c2: float = 0.9,
    max_ls: int = 25,
) -> LineSearchResult:
    """Strong-Wolfe line search from θ along the descent direction d on ``fun`` (an Objective
    or a callable θ ↦ scalar tensor). ``f0``, ``g0`` avoid re-evaluating the start."""
    evaluate, f0, g0, dphi0 = _prepare(fun, theta, d, f0, g0)
    return StrongWolfe(c1, c2, max_ls).search(evaluate, theta, d, f0, g0, dphi0, alpha0)


def armijo(
    fun,
    theta: Tensor,
    d: Tensor,
    *,
    f0: float | None = None,
    g0: Tensor | None = None,
    alpha0: float = 1.0,
    c1: float = 1e-4,
    max_ls: int = 30,
) -> LineSearchResult:
    """Armijo backtracking from θ along the descent direction d (see :func:`strong_wolfe`)."""
    evaluate, f0, g0, dphi0 = _prepare(fun, theta, d, f0, g0)
    return Armijo(c1=c1, max_ls=max_ls).search(evaluate, theta, d, f0, g0, dphi0, alpha0)


def fixed_step(
    fun,
    theta: Tensor,
    d: Tensor,
    *,
    f0: float | None = None,
    g0: Tensor | None = None,
    alpha0: float = 1.0,
) -> LineSearchResult:
    """The step α₀ (halved only while f or g is not finite)."""
    evaluate, f0, g0, dphi0 = _prepare(fun, theta, d, f0, g0)
    return FixedStep().search(evaluate, theta, d, f0, g0, dphi0, alpha0)

"""Step rules along a search direction d: fixed step, Armijo backtracking, strong Wolfe.

All three look at φ(α) = f(θ + α d) and share these rules:

- scalars (f, φ′ = ∇fᵀd, the step α) are Python floats, i.e. float64, whatever θ's dtype;
- every trial evaluates f and ∇f together once (``value_and_grad``); the accepted point's f
  and g are handed back so the solver never evaluates them again;
- a trial with a non-finite f or g is never accepted: the step shrinks (backtracks) towards
  the best point seen, and the result counts such trials (``nonfinite``);
- a search that cannot meet its conditions returns the best point seen when it lowers f
  (``success=True, wolfe=False``) and otherwise reports failure with the starting point.

Strong Wolfe (Nocedal & Wright, ch. 3; the bracketing/zoom variant of minFunc, which
``torch.optim.LBFGS`` also uses): phase 1 extrapolates with safeguarded cubic interpolation
until a bracket is found, phase 2 zooms with cubic interpolation, moving a trial that lands
too close to an end of the bracket to 10 % of its width inside. Conditions:

    f(θ + αd) ≤ f(θ) + c1 α ∇fᵀd,   |∇f(θ + αd)ᵀd| ≤ c2 |∇fᵀd|.

Armijo: backtracking from α₀ with the minimiser of the cubic through (0, f, φ′(0)) and
(α, f(α), φ′(α)), kept in [0.1α, 0.5α] (or a plain factor ``shrink`` with
``interpolate=False``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from secondorder.linalg import dot64

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

Evaluate = Callable[[Tensor], tuple[float, Tensor]]


@dataclass
class LineSearchResult:
    """The accepted step: α, the point θ + αd with its f and g, and how the search went."""

    alpha: float
    theta: Tensor
    f: float
    g: Tensor
    success: bool
    wolfe: bool
    nfev: int
    nonfinite: int = 0
    message: str = ""
    trials: list[tuple[float, float]] = field(default_factory=list)
    calls: int = 0  # trial steps requested (a repeated α is evaluated once but counted here)


class LineFunction:
    """φ(α) = f(θ + αd) with its slope φ′(α) = ∇f(θ + αd)ᵀd, memoised per α.

    Non-finite trials come back as (inf, None, nan). ``best`` is the lowest finite point seen
    (starting with α = 0).
    """

    def __init__(
        self,
        evaluate: Evaluate,
        theta: Tensor,
        d: Tensor,
        f0: float,
        g0: Tensor,
        dphi0: float | None = None,
        step_fn: Callable[[Tensor, Tensor, float], Tensor] | None = None,
    ) -> None:
        self.evaluate = evaluate
        self.step_fn = step_fn
        self.theta = theta
        self.d = d
        self.f0 = float(f0)
        self.g0 = g0
        self.dphi0 = dot64(g0, d) if dphi0 is None else float(dphi0)
        self.nfev = 0
        self.nonfinite = 0
        self.trials: list[tuple[float, float]] = []
        self._memo: dict[float, tuple[float, Tensor | None, float, Tensor]] = {}
        self.best = (0.0, self.f0, g0, self.dphi0, theta)

    def point(self, alpha: float) -> Tensor:
        """θ + αd (by ``step_fn`` when given, e.g. to add per parameter tensor)."""
        if self.step_fn is not None:
            return self.step_fn(self.theta, self.d, alpha)
        return torch.add(self.theta, self.d, alpha=alpha)

    def __call__(self, alpha: float) -> tuple[float, Tensor | None, float]:
        alpha = float(alpha)
        if alpha == 0.0:
            return self.f0, self.g0, self.dphi0
        if alpha in self._memo:
            f, g, dphi, _ = self._memo[alpha]
            return f, g, dphi
        x = self.point(alpha)
        f, g = self.evaluate(x)
        f = float(f)
        self.nfev += 1
        dphi = dot64(g, self.d) if math.isfinite(f) else float("nan")
        if not (math.isfinite(f) and math.isfinite(dphi)):
            self.nonfinite += 1
            f, g, dphi = math.inf, None, float("nan")
        elif f < self.best[1]:
            self.best = (alpha, f, g, dphi, x)
        self._memo[alpha] = (f, g, dphi, x)
        self.trials.append((alpha, f))
        return f, g, dphi

    def result(self, alpha: float, *, success: bool, wolfe: bool, message: str) -> LineSearchResult:
        """The result at a point already evaluated (α = 0 gives the start)."""
        if alpha == 0.0:
            f, g, x = self.f0, self.g0, self.theta
        else:
            f, g, _, x = self._memo[float(alpha)]
        return LineSearchResult(
            alpha=float(alpha),
            theta=x,
            f=f,
            g=g,
            success=success,
            wolfe=wolfe,
            nfev=self.nfev,
            nonfinite=self.nonfinite,
            message=message,
            trials=list(self.trials),
        )

    def best_result(self, message: str) -> LineSearchResult:
        """The best point seen: a success when it lowers f, else a failure at the start."""
        alpha = self.best[0]
        if alpha > 0.0 and self.best[1] < self.f0:
            return self.result(alpha, success=True, wolfe=False, message=message)
        return self.result(0.0, success=False, wolfe=False, message=message)


def cubic_minimizer(
    x1: float,
    f1: float,
    g1: float,
    x2: float,
    f2: float,
    g2: float,
    bounds: tuple[float, float] | None = None,
) -> float:
    """Minimiser of the cubic with values f1, f2 and slopes g1, g2 at x1, x2, kept in
    ``bounds`` (default: between x1 and x2); the middle of the bounds when the cubic has no
    real minimiser or the data are not finite."""
    lo, hi = bounds if bounds is not None else (min(x1, x2), max(x1, x2))
    if not all(math.isfinite(v) for v in (x1, f1, g1, x2, f2, g2)) or x1 == x2:
        return 0.5 * (lo + hi)
    d1 = g1 + g2 - 3.0 * (f1 - f2) / (x1 - x2)
    disc = d1 * d1 - g1 * g2
    if disc < 0.0:
        return 0.5 * (lo + hi)
    # torch's 0-d sqrt, which can differ from math.sqrt in the last bit: keeps the search
    # identical to torch.optim.LBFGS's
    d2 = float(torch.tensor(disc, dtype=torch.float64).sqrt())
    try:
        if x1 <= x2:
            t = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2.0 * d2))
        else:
            t = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2.0 * d2))
    except (ZeroDivisionError, OverflowError):
        return 0.5 * (lo + hi)
    if not math.isfinite(t):
        return 0.5 * (lo + hi)
    return min(max(t, lo), hi)


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
                    f"α = {alpha:.3g}"
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
        approx = _approximate_wolfe(phi, 0.9)
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


def _strong_wolfe(
    phi: LineFunction,
    alpha: float,
    *,
    c1: float,
    c2: float,
    max_ls: int,
    xtol: float,
    d_norm: float,
    strict: bool = True,
) -> LineSearchResult:
    """Bracketing and zoom. ``strict=True`` keeps the low end of the bracket on a point that
    satisfies the sufficient-decrease condition (Nocedal & Wright's zoom); ``strict=False``
    orders the ends by f alone, as torch.optim.LBFGS (minFunc) does, which can zoom between two
    points that both fail it."""
    f0, g0, dphi0 = phi.f0, phi.g0, phi.dphi0
    f_new, g_new, dphi_new = phi(alpha)
    a_prev, f_prev, g_prev, dphi_prev = 0.0, f0, g0, dphi0
    done = False
    it = 0
    bracket: list[list] = []  # entries [α, f, g, φ′]
    order = None  # (lo, hi) fixed by the phase that built the bracket (strict mode)
    while it < max_ls:
        if f_new > f0 + c1 * alpha * dphi0 or (it > 1 and f_new >= f_prev):
            bracket = [[a_prev, f_prev, g_prev, dphi_prev], [alpha, f_new, g_new, dphi_new]]
            order = (0, 1)
            break
        if abs(dphi_new) <= -c2 * dphi0:
            bracket = [[alpha, f_new, g_new, dphi_new]]
            done = True
            break
        if dphi_new >= 0:
            bracket = [[a_prev, f_prev, g_prev, dphi_prev], [alpha, f_new, g_new, dphi_new]]
            order = (1, 0)
            break
        lo_b, hi_b = alpha + 0.01 * (alpha - a_prev), alpha * 10.0
        nxt = cubic_minimizer(a_prev, f_prev, dphi_prev, alpha, f_new, dphi_new, (lo_b, hi_b))
        a_prev, f_prev, g_prev, dphi_prev = alpha, f_new, g_new, dphi_new
        alpha = nxt
        f_new, g_new, dphi_new = phi(alpha)
        it += 1
    if it == max_ls:
        bracket = [[0.0, f0, g0, dphi0], [alpha, f_new, g_new, dphi_new]]
        armijo_ok = math.isfinite(f_new) and f_new <= f0 + c1 * alpha * dphi0
        order = (1, 0) if armijo_ok and f_new < f0 else (0, 1)

    def reorder() -> tuple[int, int]:
        return (0, 1) if bracket[0][1] <= bracket[-1][1] else (1, 0)

    lo, hi = order if (strict and order is not None) else reorder()
    insufficient = False
    while not done and it < max_ls:
        a, b = bracket[0][0], bracket[1][0]
        if abs(b - a) * d_norm < xtol:
            break
        if math.isfinite(bracket[hi][1]):
            t = cubic_minimizer(a, bracket[0][1], bracket[0][3], b, bracket[1][1], bracket[1][3])
        else:  # non-finite end: backtrack half-way towards the best point
            t = 0.5 * (bracket[lo][0] + bracket[hi][0])
        top, bottom = max(a, b), min(a, b)
        eps = 0.1 * (top - bottom)
        if min(top - t, t - bottom) < eps:
            if insufficient or t >= top or t <= bottom:
                t = top - eps if abs(t - top) < abs(t - bottom) else bottom + eps
                insufficient = False
            else:
                insufficient = True
        else:
            insufficient = False
        f_new, g_new, dphi_new = phi(t)
        it += 1
        if f_new > f0 + c1 * t * dphi0 or f_new >= bracket[lo][1]:
            bracket[hi] = [t, f_new, g_new, dphi_new]
            if not strict:
                lo, hi = reorder()
        else:
            if abs(dphi_new) <= -c2 * dphi0:
                done = True
            elif dphi_new * (bracket[hi][0] - bracket[lo][0]) >= 0:
                bracket[hi] = list(bracket[lo])
            bracket[lo] = [t, f_new, g_new, dphi_new]

    a_lo, f_lo = bracket[lo][0], bracket[lo][1]
    tail = f"; {phi.nonfinite} non-finite value(s) met and backtracked" if phi.nonfinite else ""
    if done:
        out = phi.result(a_lo, success=True, wolfe=True, message=tail.lstrip("; "))
    elif a_lo != 0.0 and math.isfinite(f_lo) and f_lo < f0:
        out = phi.result(
            a_lo,
            success=True,
            wolfe=False,
            message=f"strong Wolfe conditions not met after {phi.nfev} trials; took the point "
            f"of lowest f{tail}",
        )
    else:
        out = phi.result(a_lo, success=False, wolfe=False, message="")
        if phi.nonfinite and phi.nonfinite == phi.nfev:
            out.message = (
                f"line search failed: non-finite values at every trial ({phi.nfev} trials)"
            )
        else:
            out.message = (
                f"line search failed: no decrease along the direction after {phi.nfev} trials{tail}"
            )
    out.calls = it + 1
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
        out = _strong_wolfe(
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
            out = _approximate_wolfe(phi, self.c2) or out
        return out


def _approximate_wolfe(phi: LineFunction, c2: float, extra: int = 3) -> LineSearchResult | None:
    """The search at the limit of f's precision (after Hager & Zhang 2005).

    When every trial's f lies within rounding noise (32·eps·|f(0)|) of f(0), f no longer
    resolves the decrease but the slope φ′ still does: a trial whose f is within the noise and
    whose slope meets the curvature condition |φ′(α)| ≤ c2|φ′(0)| is accepted; failing that,
    up to ``extra`` secant steps on φ′ look for one. This lets the gradient still be driven
    down (useful in float32)."""
    noise = 32.0 * torch.finfo(phi.theta.dtype).eps * abs(phi.f0)

    def ok(alpha: float) -> bool:
        f, _g, dphi, x = phi._memo[alpha]
        return (
            math.isfinite(f)
            and f <= phi.f0 + noise
            and abs(dphi) <= c2 * abs(phi.dphi0)
            and not torch.equal(x, phi.theta)
        )

    for n_secant in range(extra + 1):
        good = [a for a in phi._memo if a > 0 and ok(a)]
        if good:
            best = min(good, key=lambda a: abs(phi._memo[a][2]))
            return phi.result(
                best,
                success=True,
                wolfe=False,
                message="approximate Wolfe step: f is flat to rounding error along d, the slope "
                "meets the curvature condition",
            )
        if n_secant == extra:
            break
        flat = sorted(
            a
            for a, (f, _g, dphi, _x) in phi._memo.items()
            if a > 0 and math.isfinite(f) and abs(f - phi.f0) <= noise and math.isfinite(dphi)
        )
        if not flat:
            return None
        a2 = flat[-1]
        s2 = phi._memo[a2][2]
        a1, s1 = (flat[-2], phi._memo[flat[-2]][2]) if len(flat) > 1 else (0.0, phi.dphi0)
        if not s2 > s1:
            return None  # no positive curvature along d to aim the secant with
        alpha = a2 - s2 * (a2 - a1) / (s2 - s1)
        if not (math.isfinite(alpha) and alpha > 0) or alpha in phi._memo:
            return None
        phi(alpha)
    return None


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
    from secondorder.objective import FunctionObjective, Objective

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
        raise ValueError(f"the direction is not a descent direction: ∇fᵀd = {dphi0:.3g} ≥ 0")
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

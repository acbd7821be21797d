"""φ(α) = f(θ + αd) along a search direction: the memoised line function every step rule
searches, the result it hands back, cubic interpolation, and the approximate Wolfe fallback
at the limit of f's precision.

Scalars (f, φ′ = ∇fᵀd, α) are Python floats, i.e. float64, whatever θ's dtype; every trial
evaluates f and ∇f together once; a trial with a non-finite f or g comes back as
(inf, None, nan) and is never accepted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from secondorder.linalg import dot64
from secondorder.solvers.protocol import Evaluate

__all__ = [
    "Evaluate",
    "LineFunction",
    "LineSearchResult",
    "approximate_wolfe",
    "cubic_minimizer",
]


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


def approximate_wolfe(phi: LineFunction, c2: float, extra: int = 3) -> LineSearchResult | None:
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

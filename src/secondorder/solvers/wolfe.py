"""The strong-Wolfe search on φ(α) = f(θ + αd): bracketing, then zoom.

Nocedal & Wright, ch. 3, in the bracketing/zoom variant of minFunc that ``torch.optim.LBFGS``
also uses: phase 1 extrapolates with safeguarded cubic interpolation until a bracket is found,
phase 2 zooms with cubic interpolation, moving a trial that lands too close to an end of the
bracket to 10 % of its width inside. The conditions are

    f(θ + αd) ≤ f(θ) + c1 α ∇fᵀd,   |∇f(θ + αd)ᵀd| ≤ c2 |∇fᵀd|.

A bracket is a list of one or two entries [α, f, g, φ′]; ``lo``/``hi`` index its two ends.
"""

from __future__ import annotations

import math

from secondorder.solvers.line import LineFunction, LineSearchResult, cubic_minimizer

__all__ = ["strong_wolfe_search"]


def strong_wolfe_search(
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
    """Bracketing and zoom from the trial step α with at most ``max_ls`` further trials.

    ``strict=True`` keeps the low end of the bracket on a point that satisfies the
    sufficient-decrease condition (Nocedal & Wright's zoom); ``strict=False`` orders the ends
    by f alone, as torch.optim.LBFGS (minFunc) does, which can zoom between two points that
    both fail it. ``xtol`` stops the zoom once the bracket is narrower than xtol in ‖·d‖∞
    (``d_norm`` = ‖d‖∞)."""
    bracket, order, done, it = _bracket(phi, alpha, c1=c1, c2=c2, max_ls=max_ls)
    lo, done, it = _zoom(
        phi,
        bracket,
        order,
        done,
        it,
        c1=c1,
        c2=c2,
        max_ls=max_ls,
        xtol=xtol,
        d_norm=d_norm,
        strict=strict,
    )
    out = _result(phi, bracket[lo][0], bracket[lo][1], done)
    out.calls = it + 1
    return out


def _bracket(
    phi: LineFunction, alpha: float, *, c1: float, c2: float, max_ls: int
) -> tuple[list[list], tuple[int, int] | None, bool, int]:
    """Phase 1: extrapolate until a bracket is found or a trial satisfies both conditions.

    Returns the bracket, the (lo, hi) order the phase fixed (None when it found the step
    itself), whether the step is found, and the trials spent after the first."""
    f0, g0, dphi0 = phi.f0, phi.g0, phi.dphi0
    f_new, g_new, dphi_new = phi(alpha)
    a_prev, f_prev, g_prev, dphi_prev = 0.0, f0, g0, dphi0
    it = 0
    while it < max_ls:
        if f_new > f0 + c1 * alpha * dphi0 or (it > 1 and f_new >= f_prev):
            pair = [[a_prev, f_prev, g_prev, dphi_prev], [alpha, f_new, g_new, dphi_new]]
            return pair, (0, 1), False, it
        if abs(dphi_new) <= -c2 * dphi0:
            return [[alpha, f_new, g_new, dphi_new]], None, True, it
        if dphi_new >= 0:
            pair = [[a_prev, f_prev, g_prev, dphi_prev], [alpha, f_new, g_new, dphi_new]]
            return pair, (1, 0), False, it
        lo_b, hi_b = alpha + 0.01 * (alpha - a_prev), alpha * 10.0
        nxt = cubic_minimizer(a_prev, f_prev, dphi_prev, alpha, f_new, dphi_new, (lo_b, hi_b))
        a_prev, f_prev, g_prev, dphi_prev = alpha, f_new, g_new, dphi_new
        alpha = nxt
        f_new, g_new, dphi_new = phi(alpha)
        it += 1
    if it != max_ls:  # no trial allowed at all (a negative budget): nothing to zoom in
        return [], None, False, it
    bracket = [[0.0, f0, g0, dphi0], [alpha, f_new, g_new, dphi_new]]
    armijo_ok = math.isfinite(f_new) and f_new <= f0 + c1 * alpha * dphi0
    return bracket, ((1, 0) if armijo_ok and f_new < f0 else (0, 1)), False, it


def _by_f(bracket: list[list]) -> tuple[int, int]:
    """(lo, hi) with the lower f first."""
    return (0, 1) if bracket[0][1] <= bracket[-1][1] else (1, 0)


def _zoom(
    phi: LineFunction,
    bracket: list[list],
    order: tuple[int, int] | None,
    done: bool,
    it: int,
    *,
    c1: float,
    c2: float,
    max_ls: int,
    xtol: float,
    d_norm: float,
    strict: bool,
) -> tuple[int, bool, int]:
    """Phase 2: shrink the bracket (in place) by cubic interpolation; (lo, done, trials)."""
    f0, dphi0 = phi.f0, phi.dphi0
    lo, hi = order if (strict and order is not None) else _by_f(bracket)
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
                lo, hi = _by_f(bracket)
        else:
            if abs(dphi_new) <= -c2 * dphi0:
                done = True
            elif dphi_new * (bracket[hi][0] - bracket[lo][0]) >= 0:
                bracket[hi] = list(bracket[lo])
            bracket[lo] = [t, f_new, g_new, dphi_new]
    return lo, done, it


def _result(phi: LineFunction, a_lo: float, f_lo: float, done: bool) -> LineSearchResult:
    """The low end of the bracket, as a success (Wolfe or lower f) or a failure."""
    tail = f"; {phi.nonfinite} non-finite value(s) met and backtracked" if phi.nonfinite else ""
    if done:
        return phi.result(a_lo, success=True, wolfe=True, message=tail.lstrip("; "))
    if a_lo != 0.0 and math.isfinite(f_lo) and f_lo < phi.f0:
        return phi.result(
            a_lo,
            success=True,
            wolfe=False,
            message=f"strong Wolfe conditions not met after {phi.nfev} trials; took the point "
            f"of lowest f{tail}",
        )
    out = phi.result(a_lo, success=False, wolfe=False, message="")
    if phi.nonfinite and phi.nonfinite == phi.nfev:
        out.message = f"line search failed: non-finite values at every trial ({phi.nfev} trials)"
    else:
        out.message = (
            f"line search failed: no decrease along the direction after {phi.nfev} trials{tail}"
        )
    return out

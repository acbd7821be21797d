"""``minimize``: one loop for every method (a direction rule × a step rule, or a trust region).

See ``docs/solvers.md`` for the options of each method and the reasoning behind the defaults.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from secondorder._validation import check_choice, check_positive, check_positive_int, closest
from secondorder.linalg import check_dense_fits, dot64
from secondorder.objective import FunctionObjective, Objective
from secondorder.solvers.directions import (
    BFGS,
    CURVATURES,
    LBFGS,
    NEWTON_MODIFICATIONS,
    NLCG_VARIANTS,
    Direction,
    Iterate,
    Newton,
    NewtonCG,
    NonlinearCG,
    SteepestDescent,
)
from secondorder.solvers.linesearch import evaluator, make_step_rule
from secondorder.solvers.precondition import PRECONDITIONERS, Preconditioner, make_preconditioner
from secondorder.solvers.result import STATUSES, Result, StopRules, Trace, default_gtol
from secondorder.solvers.trust import ARC, Outcome, TrustNCG, lanczos_extreme

__all__ = ["DEFAULT_LINE_SEARCH", "METHODS", "OptionError", "minimize", "validate_options"]

METHODS = ("gd", "newton", "newton-cg", "nlcg", "bfgs", "lbfgs", "trust-ncg", "arc")
LINE_SEARCHES = ("armijo", "wolfe", "fixed")
#: the step rule each method uses unless ``line_search=`` says otherwise
DEFAULT_LINE_SEARCH: dict[str, str | None] = {
    "gd": "armijo",
    "newton": "armijo",
    "newton-cg": "armijo",
    "nlcg": "wolfe",
    "bfgs": "wolfe",
    "lbfgs": "wolfe",
    "trust-ncg": None,
    "arc": None,
}
TRUST_METHODS = ("trust-ncg", "arc")
SECOND_ORDER = ("newton", "newton-cg", "trust-ncg", "arc")
MEMORY_METHODS = ("nlcg", "bfgs", "lbfgs")
_NAMES = {
    "gd": "gradient descent",
    "newton": "Newton",
    "newton-cg": "Newton-CG",
    "nlcg": "NLCG",
    "bfgs": "BFGS",
    "lbfgs": "L-BFGS",
    "trust-ncg": "trust-region Newton-CG",
    "arc": "ARC",
}

COMMON_OPTIONS = {
    "max_iter",
    "gtol",
    "ftol",
    "max_evals",
    "max_time",
    "callback",
    "verbose",
    "initial_state",
    "check_saddle",
    "trace_theta",
}
PRECONDITIONER_OPTIONS = {"preconditioner", "precondition_every"}
LINE_SEARCH_OPTIONS = {"lr", "step_size", "c1", "c2", "max_ls"}
METHOD_OPTIONS: dict[str, set[str]] = {
    "gd": set(),
    "newton": {"modification"},
    "newton-cg": {"curvature", "damping", "cg_max_iter", "cg_tol", "warm_start"},
    "nlcg": {"variant", "robust", "restart_every"},
    "bfgs": {"robust"},
    "lbfgs": {"memory", "robust"},
    "trust-ncg": {"initial_radius", "max_radius", "eta", "cg_max_iter", "cg_tol", "curvature"},
    "arc": {"sigma0", "eta", "cg_max_iter", "cg_tol", "curvature"},
}
ALL_OPTIONS = (
    COMMON_OPTIONS
    | PRECONDITIONER_OPTIONS
    | LINE_SEARCH_OPTIONS
    | set().union(*METHOD_OPTIONS.values())
)


class OptionError(TypeError, ValueError):
    """An option that does not exist or does not apply to the chosen method."""


_DEFAULT = object()


# -- the line-search family ------------------------------------------------------------------
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

    def __init__(self, name: str, direction: Direction, rule, *, robust: bool) -> None:
        self.name = name
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
        return not self.robust and self.direction.has_memory and self.changes_since_reset > 0

    def _changed_failure(self, it: Iterate, why: str) -> Outcome:
        label = _NAMES[self.name]
        what = "curvature pairs" if self.name in ("lbfgs", "bfgs") else "conjugate directions"
        return Outcome.stop(
            it,
            "objective_changed",
            f"objective changed between iterations (reshuffled batches) and the {what} "
            f"became inconsistent: {label} stopped early ({why}); pass robust=True, or use "
            "fixed batches",
        )

    def _reset(self) -> None:
        self.direction.reset()
        self.changes_since_reset = 0
        self.restarts += 1

    def step(self, it: Iterate, evaluate, budget: int | None) -> Outcome:
        dr = self.direction
        d = dr.compute(it)
        dphi0 = dot64(it.g, d)
        restarted = False
        if not (math.isfinite(dphi0) and dphi0 < 0):
            if self._broken_by_change():
                return self._changed_failure(
                    it, f"the search direction is not a descent direction, ∇fᵀd = {dphi0:.3g}"
                )
            if dr.has_memory or isinstance(dr, NewtonCG):
                self._reset()
                d = -it.minv(it.g)
                dphi0 = dot64(it.g, d)
                restarted = True
            if not (math.isfinite(dphi0) and dphi0 < 0):
                return Outcome.stop(
                    it, "stalled", f"no descent direction at iteration {it.k}: ∇fᵀd = {dphi0:.3g}"
                )
        alpha0 = dr.initial_step(it, d, dphi0)
        ls = self.rule.search(evaluate, it.theta, d, it.f, it.g, dphi0, alpha0, budget)
        used = ls.nfev
        self._spent = used
        nonfinite = ls.nonfinite
        moved = ls.success and not torch.equal(ls.theta, it.theta)
        retried = False
        if not moved and not restarted and dr.has_memory:
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
            if ls.success:
                status, msg = (
                    "stalled",
                    (
                        f"no progress at iteration {it.k}: the accepted step α = {ls.alpha:.3g} no "
                        f"longer changes θ in {it.theta.dtype}"
                    ),
                )
            elif nonfinite and nonfinite == ls.nfev:
                status, msg = "nonfinite", ls.message
            elif budget is not None and self._spent >= budget:
                status, msg = (
                    "max_evals",
                    (
                        "the function-evaluation budget ran out during the line search "
                        f"({ls.message})"
                    ),
                )
            else:
                status, msg = "line_search", ls.message
            if retried:
                msg += " (also after restarting from steepest descent)"
            return Outcome.stop(it, status, msg, nonfinite=nonfinite)
        alpha = ls.alpha
        self.pending = (alpha * d, it.g, ls.g)
        dr.after_step(it, alpha, dphi0, ls.f)
        it.info["ls_evals"] = self._spent
        if not ls.wolfe and ls.message:
            it.info["ls_note"] = ls.message
        return Outcome(ls.theta, ls.f, ls.g, alpha, True, note=ls.message, nonfinite=nonfinite)

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

    def __init__(self, name: str, solver) -> None:
        self.name = name
        self.solver = solver
        self.rejected = 0

    def begin(self, it: Iterate) -> None:
        if it.changed:
            self.solver.on_change(it, True)

    def step(self, it: Iterate, evaluate, budget) -> Outcome:
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


# -- validation ------------------------------------------------------------------------------
def _as_objective(f_or_objective, theta0) -> Objective:
    if isinstance(f_or_objective, Objective):
        return f_or_objective
    if not callable(f_or_objective):
        raise TypeError(
            "minimize needs an Objective or a callable θ ↦ scalar tensor, got "
            f"{type(f_or_objective).__name__}"
        )
    t = _as_tensor(theta0)
    dtype = t.dtype if t.dtype.is_floating_point else torch.get_default_dtype()
    return FunctionObjective(
        f_or_objective, n_params=max(1, t.numel()), dtype=dtype, device=t.device
    )


def _as_tensor(theta0) -> Tensor:
    if isinstance(theta0, Tensor):
        return theta0
    try:
        return torch.as_tensor(theta0)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"theta0 must be a torch.Tensor (or array-like), got {type(theta0).__name__}"
        ) from None


def _check_theta0(objective: Objective, theta0) -> Tensor:
    t = _as_tensor(theta0)
    if not t.dtype.is_floating_point:
        t = t.to(objective.dtype)
    t = objective.check_theta(t, "theta0")
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise ValueError(
            f"theta0 contains NaN or inf values (first at index {bad}: {float(t[bad])})"
        )
    return t.detach().clone()


def _opt_tol(options: dict, name: str, default):
    v = options.get(name, default)
    if v is None:
        return None
    return check_positive(name, v)


class _SizeOnly:
    """What the option checks need of an objective known only by its number of parameters."""

    check_theta = Objective.check_theta

    def __init__(self, n_params: int) -> None:
        self.n_params = n_params
        self.dtype = torch.get_default_dtype()
        self.device = torch.device("cpu")


def _objective_for_options(objective_or_n_params) -> Objective | _SizeOnly:
    if isinstance(objective_or_n_params, Objective):
        return objective_or_n_params
    if isinstance(objective_or_n_params, bool) or not isinstance(objective_or_n_params, int):
        raise TypeError(
            "validate_options needs an Objective or the number of parameters (an int), got "
            f"{type(objective_or_n_params).__name__}"
        )
    return _SizeOnly(check_positive_int("n_params", objective_or_n_params))


def validate_options(
    objective_or_n_params: Objective | int,
    method: str,
    /,
    line_search: str | None = _DEFAULT,  # type: ignore[assignment]
    **options,
) -> dict[str, Any]:
    """Check the arguments of ``minimize(objective, θ₀, method, line_search=..., **options)``
    without evaluating anything, raising exactly the errors ``minimize`` would raise.

    Checks the method name (with a suggestion for a misspelt one), that every option exists
    and applies to the method (:class:`OptionError` otherwise), every value (``ValueError`` /
    ``TypeError``), the line search against trust-region methods, the preconditioner, the
    dense-matrix size of newton / bfgs and a resumed ``initial_state``. ``minimize`` runs these
    same checks before its first evaluation.

    ``objective_or_n_params`` is the :class:`~secondorder.objective.Objective` or just its
    number of parameters; with a number, the checks that need the objective itself (Gauss–
    Newton products for ``curvature="ggn"`` / ``"ggn-diag"``, a ModelObjective for ``"eq14"``)
    are skipped and the default dtype stands for the objective's.

    Returns the resolved configuration: ``method``, ``line_search`` (the step rule's name, or
    None for a fixed step), ``max_iter``, ``gtol``, ``ftol``, ``max_evals``, ``max_time``,
    ``lr``, ``robust``, ``check_saddle`` … with the defaults filled in, and the (unused) solver
    components ``minimize`` would run with.
    """
    objective = _objective_for_options(objective_or_n_params)
    return _validate(objective, method, line_search, options)


def _validate(objective, method, line_search, options: dict) -> dict:
    """The checks of :func:`validate_options` on an objective (or a :class:`_SizeOnly`)."""
    check_choice("method", method, METHODS)
    trust = method in TRUST_METHODS
    if line_search is _DEFAULT:
        ls = DEFAULT_LINE_SEARCH[method]
    else:
        if trust and line_search is not None:
            raise OptionError(
                f"method={method!r} takes no line search (it adapts its "
                f"{'trust-region radius' if method == 'trust-ncg' else 'cubic regulariser σ'} "
                f"instead); got line_search={line_search!r}"
            )
        if line_search is not None and (
            not isinstance(line_search, str) or line_search not in LINE_SEARCHES
        ):
            raise ValueError(
                f"line_search={line_search!r} is not one of None, 'armijo', 'wolfe'"
                f"{closest(str(line_search), LINE_SEARCHES)}"
            )
        ls = None if line_search == "fixed" else line_search
    for name in options:
        if name not in ALL_OPTIONS:
            raise OptionError(
                f"minimize() got an unexpected option {name!r}{closest(name, ALL_OPTIONS)}"
            )
        allowed = COMMON_OPTIONS | METHOD_OPTIONS[method]
        if method != "newton":
            allowed |= PRECONDITIONER_OPTIONS
        if not trust:
            allowed |= LINE_SEARCH_OPTIONS
        if name not in allowed:
            owners = [m for m in METHODS if name in METHOD_OPTIONS[m]]
            why = f" (it is an option of {', '.join(owners)})" if owners else ""
            if name in LINE_SEARCH_OPTIONS:
                why = " (it configures a line search, which this method does not use)"
            if name in PRECONDITIONER_OPTIONS:
                why = " (Newton's method uses the exact Hessian)"
            raise OptionError(f"option {name!r} does not apply to method={method!r}{why}")
    if ls is None and not trust:
        for name in ("c1", "c2", "max_ls"):
            if name in options:
                raise OptionError(
                    f"option {name!r} configures a line search, but line_search=None (fixed "
                    "step) was chosen"
                )
    if ls == "armijo" and "c2" in options:
        raise OptionError("option 'c2' (curvature condition) applies to line_search='wolfe' only")
    if "lr" in options and "step_size" in options:
        raise OptionError("give either lr or step_size, not both")

    cfg: dict[str, Any] = {"method": method, "line_search": ls}
    dtype = objective.dtype
    cfg["max_iter"] = check_positive_int("max_iter", options.get("max_iter", 1000))
    cfg["gtol"] = _opt_tol(options, "gtol", default_gtol(dtype))
    cfg["ftol"] = _opt_tol(options, "ftol", None)
    me = options.get("max_evals")
    cfg["max_evals"] = None if me is None else check_positive_int("max_evals", me)
    cfg["max_time"] = _opt_tol(options, "max_time", None)
    cb = options.get("callback")
    if cb is not None and not callable(cb):
        raise TypeError(f"callback must be callable, got {type(cb).__name__}")
    cfg["callback"] = cb
    cfg["verbose"] = options.get("verbose", False)
    cfg["trace_theta"] = bool(options.get("trace_theta", False))
    cfg["check_saddle"] = bool(options.get("check_saddle", method in SECOND_ORDER))
    lr = options.get("lr", options.get("step_size", 1.0))
    cfg["lr"] = check_positive("lr" if "lr" in options else "step_size", lr)
    c1 = check_positive("c1", options.get("c1", 1e-4))
    c2 = check_positive("c2", options.get("c2", 0.1 if method == "nlcg" else 0.9))
    if ls == "wolfe" and not 0 < c1 < c2 < 1:
        raise ValueError(f"the strong Wolfe conditions need 0 < c1 < c2 < 1, got c1={c1}, c2={c2}")
    if ls == "armijo" and not 0 < c1 < 1:
        raise ValueError(f"c1 must lie in (0, 1), got {c1}")
    max_ls = check_positive_int("max_ls", options.get("max_ls", 25 if ls == "wolfe" else 30))
    if not trust:
        rule_opts = {"max_ls": max_ls}
        if ls in ("armijo", "wolfe"):
            rule_opts["c1"] = c1
        if ls == "wolfe":
            rule_opts["c2"] = c2
        cfg["rule"] = make_step_rule(ls, **rule_opts)
    robust = options.get("robust", False)
    if not isinstance(robust, bool):
        raise TypeError(f"robust must be True or False, got {robust!r}")
    cfg["robust"] = robust

    if "precondition_every" in options:
        every = check_positive_int("precondition_every", options["precondition_every"])
    else:
        every = 1
    spec = options.get("preconditioner")
    if isinstance(objective, _SizeOnly) and isinstance(spec, str):
        check_choice("preconditioner", spec, PRECONDITIONERS)  # its needs are unknown here
        cfg["precond"] = Preconditioner(spec, every=every)
    else:
        cfg["precond"] = make_preconditioner(spec, objective, method=method, every=every)
    if trust and cfg["precond"] is not None and cfg["precond"].kind == "callable":
        raise ValueError(
            f"method={method!r} takes a diagonal preconditioner (a name or a tensor), not a "
            "callable"
        )

    curvature = options.get("curvature", "hessian")
    check_choice("curvature", curvature, CURVATURES)
    if (
        curvature == "ggn"
        and isinstance(objective, Objective)
        and type(objective).ggnvp_at is Objective.ggnvp_at
    ):
        raise ValueError(
            f"curvature='ggn' needs Gauss-Newton products, which {type(objective).__name__} "
            "does not offer (use a ModelObjective, or curvature='hessian')"
        )
    cg_max_iter = options.get("cg_max_iter")
    if cg_max_iter is not None:
        cg_max_iter = check_positive_int("cg_max_iter", cg_max_iter)
    cg_tol = _opt_tol(options, "cg_tol", None)

    if method in ("newton", "bfgs"):
        what = "the dense Hessian" if method == "newton" else "the dense BFGS matrix"
        check_dense_fits((objective.n_params, objective.n_params), dtype, what)
    if method == "gd":
        direction = SteepestDescent()
    elif method == "newton":
        mod = options.get("modification", "damping")
        check_choice("modification", mod, NEWTON_MODIFICATIONS)
        direction = Newton(mod)
    elif method == "newton-cg":
        damping = check_positive("damping", options.get("damping", 0.0), allow_zero=True)
        warm = options.get("warm_start", True)
        if not isinstance(warm, bool):
            raise TypeError(f"warm_start must be True or False, got {warm!r}")
        direction = NewtonCG(curvature, damping, cg_max_iter, cg_tol, warm)
    elif method == "nlcg":
        variant = options.get("variant", "pr+")
        check_choice("variant", variant, NLCG_VARIANTS)
        re = options.get("restart_every")
        re = None if re is None else check_positive_int("restart_every", re)
        direction = NonlinearCG(variant, re)
    elif method == "bfgs":
        direction = BFGS()
    elif method == "lbfgs":
        direction = LBFGS(check_positive_int("memory", options.get("memory", 10)))
    elif method == "trust-ncg":
        r0 = check_positive("initial_radius", options.get("initial_radius", 1.0))
        rmax = check_positive("max_radius", options.get("max_radius", 1000.0))
        eta = check_positive("eta", options.get("eta", 0.15), allow_zero=True)
        if eta >= 0.25:
            raise ValueError(f"eta must lie in [0, 0.25), got {eta}")
        direction = TrustNCG(r0, rmax, eta, curvature, cg_max_iter, cg_tol)
    else:
        sigma0 = check_positive("sigma0", options.get("sigma0", 1.0))
        eta = check_positive("eta", options.get("eta", 0.1), allow_zero=True)
        if eta >= 0.9:
            raise ValueError(f"eta must lie in [0, 0.9), got {eta}")
        direction = ARC(sigma0, eta, curvature, cg_max_iter, cg_tol)
    if trust:
        cfg["solver"] = TrustMethod(method, direction)
    else:
        cfg["solver"] = LineSearchMethod(method, direction, cfg["rule"], robust=robust)

    state = options.get("initial_state")
    if state is not None:
        if not isinstance(state, dict) or "theta" not in state:
            raise TypeError("initial_state must be the dict of a Result's .state")
        if state.get("method") != method:
            raise ValueError(
                f"initial_state was saved by method={state.get('method')!r}, not {method!r}"
            )
        objective.check_theta(state["theta"], "initial_state['theta']")
    cfg["initial_state"] = state
    return cfg


# -- the loop ------------------------------------------------------------------------------------
def minimize(
    f_or_objective: Objective | Callable[[Tensor], Tensor],
    theta0: Tensor,
    method: str = "lbfgs",
    line_search: str | None = _DEFAULT,  # type: ignore[assignment]
    **options,
) -> Result:
    """Minimise an :class:`~secondorder.objective.Objective` (or a callable θ ↦ scalar tensor)
    from ``theta0``.

    Methods: ``"gd"``, ``"newton"``, ``"newton-cg"``, ``"nlcg"``, ``"bfgs"``, ``"lbfgs"``,
    ``"trust-ncg"``, ``"arc"``. ``line_search`` is ``"armijo"``, ``"wolfe"`` or ``None`` (a
    fixed step ``lr``); the default depends on the method (gd, newton, newton-cg: Armijo;
    nlcg, bfgs, lbfgs: strong Wolfe); trust-ncg and arc take none.

    Common options: ``max_iter`` (1000), ``gtol`` (on ‖∇f‖∞; default max(1e-9, eps^(2/3)) of
    the dtype), ``ftol`` (eq. 29, off by default), ``max_evals``, ``max_time`` (seconds),
    ``callback(info) -> True | dict | None``, ``preconditioner``, ``precondition_every``,
    ``verbose``, ``initial_state`` (a previous ``Result.state``: continue that run),
    ``check_saddle`` (second-order methods: on convergence, test the Hessian for a negative
    eigenvalue), ``trace_theta`` (store θ in every trace row). Line-search options: ``lr`` (or
    ``step_size``), ``c1``, ``c2``, ``max_ls``. Method options: see ``docs/solvers.md``.

    Everything is validated before the first evaluation (by :func:`validate_options`, which
    runs the same checks without an evaluation). The loop calls
    ``objective.begin_iteration(k)`` at the top of every iteration and re-evaluates f and g
    when the function changed.
    """
    objective = _as_objective(f_or_objective, theta0)
    theta = _check_theta0(objective, theta0)
    cfg = validate_options(objective, method, line_search=line_search, **options)
    return _run(objective, theta, cfg)


def _gnorm(g: Tensor) -> float:
    return float(g.abs().max()) if g.numel() else 0.0


def _saddle(objective: Objective, theta: Tensor, method: str) -> tuple[float, float] | None:
    """(λ_min, tolerance) when the Hessian at θ has a clearly negative eigenvalue."""
    n = theta.numel()
    if method == "newton":
        ev = torch.linalg.eigvalsh(objective.hessian(theta))
        lo, hi = float(ev[0]), float(ev.abs().max())
    else:
        lo, hi = lanczos_extreme(
            objective.hvp_at(theta), n, steps=min(n, 30), dtype=theta.dtype, device=theta.device
        )
        hi = max(abs(lo), abs(hi))
    tol = math.sqrt(torch.finfo(theta.dtype).eps) * max(1.0, hi)
    return (lo, tol) if lo < -tol else None


def _run(objective: Objective, theta0: Tensor, cfg: dict) -> Result:
    method = cfg["method"]
    solver = cfg["solver"]
    precond = cfg["precond"]
    stop = StopRules(cfg["max_iter"], cfg["gtol"], cfg["ftol"], cfg["max_evals"], cfg["max_time"])
    counts0 = objective.counts.copy()
    state = cfg["initial_state"]
    base = {
        "nfev": 0,
        "ngev": 0,
        "nhev": 0,
        "time": 0.0,
        "changes": 0,
        "nonfinite": 0,
        "neg": [],
        "neg_first": None,
    }
    if state is not None:
        for key in base:
            if key in state:
                base[key] = state[key]
        solver.load_state_dict(state.get("solver", {}))
        if precond is not None:
            precond.load_state_dict(state.get("precond", {}))
    neg_iters: list[int] = list(base["neg"])
    neg_first: str | None = base["neg_first"]
    nonfinite = int(base["nonfinite"])
    changes = int(base["changes"])
    notes: list[str] = []

    def counts() -> tuple[int, int, int]:
        c = objective.counts
        return (
            base["nfev"] + c.f - counts0.f,
            base["ngev"] + c.g - counts0.g,
            base["nhev"]
            + (c.hv - counts0.hv)
            + (c.ggnv - counts0.ggnv)
            + (c.hessian - counts0.hessian),
        )

    def evals_now() -> int:
        return objective.counts.f - counts0.f

    evaluate = evaluator(objective)

    def elapsed() -> float:
        return base["time"] + stop.elapsed()

    if (method in MEMORY_METHODS) and objective.stochastic != "never":
        if objective.stochastic == "evaluation":
            warnings.warn(
                f"{_NAMES[method]} on an objective whose batches change at every evaluation: "
                "no two gradients come from the same function, so curvature information is "
                "noisy and line searches compare different functions; prefer fixed batches",
                RuntimeWarning,
                stacklevel=3,
            )
        elif not cfg["robust"]:
            warnings.warn(
                f"{_NAMES[method]} on an objective whose batches change every iteration keeps "
                "its memory across changes (faithful mode): curvature pairs mix different "
                "functions and the method may stop early; pass robust=True or use fixed batches",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- the starting point ------------------------------------------------------------------
    if state is not None:
        k = int(state["k"])
        theta = state["theta"].detach().clone().to(objective.dtype)
        # the function of iteration k is compared with the one the saved f and g belong to,
        # so the first iteration sees (and counts) a change exactly as an uninterrupted run
        # would, whether the objective is the one the run stopped with or a fresh copy
        if state.get("evaluations") is not None:  # samplers that draw per evaluation
            objective.load_sampling_state({"evaluations": int(state["evaluations"])})
        carried = objective.begin_iteration(k)
        if state.get("version") is not None:
            carried = objective.version != state["version"]
        if carried or state.get("g") is None:
            f, g = evaluate(theta)
            changes += int(carried)
        else:
            f, g = float(state["f"]), state["g"].detach().clone()
    else:
        k = 0
        theta = theta0
        carried = False
        objective.begin_iteration(k)
        f, g = evaluate(theta)
    point = 0
    trace = Trace()
    status: str | None = None
    message = ""
    iterations = 0

    def make_row(step: float, extra: dict) -> dict:
        nfev, ngev, nhev = counts()
        row = {
            "k": k,
            "f": f,
            "grad_norm": _gnorm(g),
            "step": step,
            "nfev": nfev,
            "ngev": ngev,
            "nhev": nhev,
            "time": elapsed(),
        }
        row.update(extra)
        if cfg["trace_theta"]:
            row["theta"] = theta.detach().clone()
        return row

    def report(row: dict) -> bool:
        """Callback and verbose output; True when the callback asks to stop."""
        stop_now = False
        cb = cfg["callback"]
        if cb is not None:
            info = dict(row)
            info.update(theta=theta, objective=objective, method=method, grad=g)
            out = cb(info)
            if isinstance(out, dict):
                row.update(out)
            elif out is True:
                stop_now = True
        trace.append(row)
        v = cfg["verbose"]
        if v and (v is True or row["k"] % int(v) == 0):
            print(
                f"[{method}] k={row['k']:5d}  f={row['f']:.10g}  |g|={row['grad_norm']:.3e}  "
                f"step={row['step']:.3g}  nfev={row['nfev']}"
            )
        return stop_now

    if not (math.isfinite(f) and bool(torch.isfinite(g).all())):
        status = "nonfinite"
        message = f"the objective or its gradient is not finite at the starting point (f = {f})"
    elif state is None and report(make_row(0.0, {})):
        status, message = "callback", "the callback asked to stop"
    if status is None and stop.converged(_gnorm(g)):
        status = "gtol"
        message = f"gradient norm ‖g‖∞ = {_gnorm(g):.3g} ≤ gtol = {stop.gtol:.3g} at the start"

    # -- iterations ------------------------------------------------------------------------
    while status is None:
        changed = objective.begin_iteration(k)
        if changed:
            f, g = evaluate(theta)
            changes += 1
            point += 1
            if not (math.isfinite(f) and bool(torch.isfinite(g).all())):
                status = "nonfinite"
                message = f"the objective became non-finite at iteration {k} after it changed"
                break
        changed, carried = changed or carried, False
        it = Iterate(
            objective=objective,
            theta=theta,
            f=f,
            g=g,
            k=k,
            precond=precond,
            lr=cfg["lr"],
            fixed_step=cfg.get("line_search") is None,
            changed=changed,
            point=point,
        )
        if precond is not None:
            precond.update(objective, theta, k)
        solver.begin(it)
        out = solver.step(it, evaluate, stop.evals_left(evals_now()))
        if it.negative_curvature:
            neg_iters.append(k)
            if neg_first is None:
                neg_first = f"at iteration {k} ({it.negative_curvature})"
        nonfinite += out.nonfinite
        if out.status is not None:
            status, message = out.status, out.message
            break
        f_before = f
        theta, f, g = out.theta, out.f, out.g
        if out.moved:
            point += 1
        k += 1
        iterations += 1
        extra = dict(it.info)
        extra.pop("ls_note", None)
        if changed:
            extra["changed"] = True
        stop_now = report(make_row(out.step, extra))
        if stop_now:
            status, message = "callback", "the callback asked to stop"
            break
        nfev_this = evals_now()
        rule = stop.check(
            iterations=iterations,
            f=f,
            f_prev=f_before,
            grad_norm=_gnorm(g),
            evals=nfev_this,
            moved=out.moved,
        )
        if rule is not None:
            status, message = rule

    # -- second-order check at a stationary point --------------------------------------------
    if status == "gtol" and cfg["check_saddle"]:
        found = _saddle(objective, theta, method)
        if found is not None:
            lam, _ = found
            status = "saddle"
            message = (
                f"the gradient vanished (‖g‖∞ = {_gnorm(g):.3g}) but the Hessian has a negative "
                f"eigenvalue ≈ {lam:.3g}: θ is a saddle point or a maximum, not a minimum"
            )
            if not neg_iters or neg_iters[-1] != k:
                neg_iters.append(k)
            if neg_first is None:
                neg_first = f"at iteration {k} (Hessian eigenvalue {lam:.3g} at the final point)"

    # -- the message ---------------------------------------------------------------------------
    if neg_iters:
        where = ", ".join(str(i) for i in neg_iters[:8]) + (" …" if len(neg_iters) > 8 else "")
        notes.append(
            f"negative curvature detected {neg_first}; at iteration(s) {where} in all"
            + (
                "; the Hessian was modified to give a descent direction"
                if method == "newton"
                else ""
            )
        )
    if nonfinite:
        notes.append(
            f"non-finite values met at {nonfinite} trial step(s); backtracked (shrank the step)"
        )
    if changes:
        if method in MEMORY_METHODS and not cfg["robust"]:
            if status != "objective_changed":
                notes.append(
                    f"the objective changed between iterations {changes} time(s) (reshuffled "
                    f"batches); faithful mode kept the {_NAMES[method]} memory across changes, "
                    "so it mixes different functions; pass robust=True to avoid this"
                )
        elif method in MEMORY_METHODS:
            how = (
                "each curvature pair was formed on one function"
                if method != "nlcg"
                else "NLCG restarted at each change"
            )
            notes.append(
                f"the objective changed between iterations {changes} time(s) (reshuffled "
                f"batches); robust mode: {how}"
            )
        else:
            notes.append(f"the objective changed between iterations {changes} time(s)")
    restarts = getattr(solver, "restarts", 0)
    if restarts and status not in ("objective_changed",):
        notes.append(
            f"the search direction was reset to steepest descent {restarts} time(s) after a "
            "failed line search or a non-descent direction"
        )
    full = message + ("; " + "; ".join(notes) if notes else "")

    nfev, ngev, nhev = counts()
    total_time = elapsed()
    result = Result(
        theta=theta.detach().clone(),
        f=f,
        grad_norm=_gnorm(g),
        nit=k,
        nfev=nfev,
        ngev=ngev,
        nhev=nhev,
        status=status,
        message=full,
        method=method,
        trace=trace,
        success=STATUSES.get(status, False),
        negative_curvature=bool(neg_iters),
        negative_curvature_iterations=neg_iters,
        nonfinite=nonfinite > 0,
        objective_changes=changes,
        grad=g.detach().clone(),
        info={
            **solver.info(),
            "line_search": cfg.get("line_search"),
            "precondition_updates": 0 if precond is None else precond.updates,
        },
    )
    result.state = {
        "method": method,
        "k": k,
        "theta": theta.detach().clone(),
        "f": f,
        "g": g.detach().clone(),
        "nfev": nfev,
        "ngev": ngev,
        "nhev": nhev,
        "time": total_time,
        "changes": changes,
        "nonfinite": nonfinite,
        "neg": list(neg_iters),
        "neg_first": neg_first,
        "solver": solver.state_dict(),
        "precond": {} if precond is None else precond.state_dict(),
        "version": objective.version,  # the function that f and g belong to
        "evaluations": objective.sampling_state()["evaluations"],
    }
    return result

"""Run any ``scipy.optimize.minimize`` method on an :class:`~secondorder.objective.Objective`.

:func:`scipy_minimize` hands scipy float64 NumPy vectors and converts them to the objective's
dtype and device. ``fun`` and ``jac`` share one ``value_and_grad`` per point through a
one-entry cache (scipy asks for f and g at the same x separately), ``hessp`` comes from
``Objective.hvp`` for the methods that use it (Newton-CG, trust-ncg, trust-krylov,
trust-constr) and ``hess`` from the dense ``Objective.hessian`` for dogleg and trust-exact.
Derivative-free methods get ``fun`` from ``Objective.value`` alone.

The result is a :class:`~secondorder.solvers.Result` with the same trace columns as
:func:`secondorder.solvers.minimize` (rows written from scipy's per-iteration callback, f from
its ``intermediate_result``), the counts read from the objective's counters, and scipy's own
``OptimizeResult`` in ``result.info["scipy"]`` (its status code in ``info["scipy_status"]``).

``status`` speaks the vocabulary of :data:`secondorder.solvers.STATUSES`, read from scipy's
status code and message (scipy's message is kept as ``message``):

- success: ``"gtol"`` where scipy's test was on the gradient (BFGS, CG, the trust-region
  methods, L-BFGS-B's projected gradient, TNC's local minimum, trust-constr's ``gtol``),
  ``"ftol"`` where it was on the change of f (L-BFGS-B's relative reduction, TNC), else
  ``"converged"`` (tests on the step or the simplex: Newton-CG, Nelder-Mead, Powell, SLSQP …);
- ``"max_iter"`` (scipy's ``maxiter`` reached), ``"max_evals"`` (its evaluation limit),
  ``"line_search"`` (BFGS/CG "precision loss", L-BFGS-B "ABNORMAL", TNC and SLSQP line-search
  failures), ``"nonfinite"`` (NaN met), ``"stalled"`` (no further progress possible),
  ``"callback"`` (our callback stopped it), and ``"failed"`` for anything else.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from secondorder._validation import check_choice
from secondorder.objective import FunctionObjective, Objective
from secondorder.solvers.result import Result, Trace

__all__ = [
    "GRADIENT_METHODS",
    "HESSP_METHODS",
    "check_scipy_options",
    "scipy_minimize",
    "scipy_options",
    "scipy_status",
]

GRADIENT_METHODS = {
    "cg",
    "bfgs",
    "newton-cg",
    "l-bfgs-b",
    "tnc",
    "slsqp",
    "dogleg",
    "trust-ncg",
    "trust-krylov",
    "trust-exact",
    "trust-constr",
}
HESSP_METHODS = {"newton-cg", "trust-ncg", "trust-krylov", "trust-constr"}
HESS_METHODS = {"dogleg", "trust-exact"}


def _gnorm(g: Tensor | None) -> float:
    return float("nan") if g is None else float(g.abs().max())


GTOL_METHODS = {"bfgs", "cg", "dogleg", "trust-ncg", "trust-krylov", "trust-exact"}


#: scipy's solver function of each ``minimize`` method, in ``scipy.optimize._minimize``
_SOLVERS = {
    "nelder-mead": "_minimize_neldermead",
    "powell": "_minimize_powell",
    "cg": "_minimize_cg",
    "bfgs": "_minimize_bfgs",
    "newton-cg": "_minimize_newtoncg",
    "l-bfgs-b": "_minimize_lbfgsb",
    "tnc": "_minimize_tnc",
    "cobyla": "_minimize_cobyla",
    "cobyqa": "_minimize_cobyqa",
    "slsqp": "_minimize_slsqp",
    "trust-constr": "_minimize_trustregion_constr",
    "dogleg": "_minimize_dogleg",
    "trust-ncg": "_minimize_trust_ncg",
    "trust-krylov": "_minimize_trust_krylov",
    "trust-exact": "_minimize_trustregion_exact",
}
#: the solvers' arguments that scipy.optimize.minimize fills itself (not options)
_NOT_OPTIONS = frozenset(
    {
        "fun",
        "func",
        "x0",
        "args",
        "jac",
        "grad",
        "hess",
        "hessp",
        "bounds",
        "constraints",
        "callback",
        "subproblem",
    }
)
#: options that are counts whatever their default (often None)
_INTEGER_OPTIONS = frozenset(
    {"maxiter", "maxfun", "maxfev", "maxcor", "maxls", "maxCGit", "iprint", "subproblem_maxiter"}
)


def scipy_options(method: str) -> dict | None:
    """The options of scipy's ``method`` (name → default), read from the signature of its
    solver; None when this scipy does not expose the solver where expected."""
    import inspect

    import scipy.optimize._minimize as solvers  # scipy's own table of minimize's solvers

    fn = getattr(solvers, _SOLVERS.get(method.lower(), ""), None)
    if fn is None:
        return None
    params = dict(inspect.signature(fn).parameters)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and (
        "trust_region_options" in params
    ):  # dogleg, trust-ncg, trust-krylov, trust-exact forward to the common trust region
        from scipy.optimize._trustregion import _minimize_trust_region

        params.update(inspect.signature(_minimize_trust_region).parameters)
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        n: p.default
        for n, p in params.items()
        if p.kind in plain and n not in _NOT_OPTIONS and p.default is not inspect.Parameter.empty
    }


def check_scipy_options(method: str, options: dict) -> dict:
    """Refuse, before any work, an unknown ``method``, an option ``method`` does not take
    (with the closest name) and an option of the wrong type (a count that is not an integer,
    a number that is not a real number, a flag that is not a bool); return ``options``."""
    check_choice("method", method.lower(), sorted(_SOLVERS))
    known = scipy_options(method)
    if known is None:
        return options
    for name, value in options.items():
        check_choice(f"scipy:{method} option", name, known)
        if value is None:
            continue
        want = _option_type(name, known[name])
        if want is not None and not _has_type(value, want):
            raise TypeError(
                f"option {name} of scipy:{method} must be {want}, got {value!r} "
                f"({type(value).__name__})"
            )
    return options


def _option_type(name: str, default) -> str | None:
    if name in _INTEGER_OPTIONS:
        return "an integer"
    if name == "disp" or isinstance(default, (bool, np.bool_)):
        return "a bool"
    if isinstance(default, (int, float, np.integer, np.floating)):
        return "a real number"
    return None  # arrays, callables, objects: scipy's own checks


def _has_type(value, want: str) -> bool:
    if want == "a bool":  # scipy's flags also take 0/1 and verbosity levels
        return isinstance(value, (bool, np.bool_, int, np.integer))
    if isinstance(value, (bool, np.bool_)):
        return False
    if want == "an integer":
        return isinstance(value, (int, np.integer))
    return isinstance(value, (int, float, np.integer, np.floating))


def scipy_status(method: str, res, maxiter: int | None = None) -> str:
    """Our status (see the module doc) for scipy's ``OptimizeResult`` of ``method``."""
    m = method.lower()
    msg = str(getattr(res, "message", "")).lower()
    code = getattr(res, "status", None)
    nit = getattr(res, "nit", None)
    if res.success:
        if m == "tnc":
            return {0: "gtol", 1: "ftol"}.get(code, "converged")
        if m == "trust-constr":
            return "gtol" if code == 1 else "converged"
        if "projected gradient" in msg:  # L-BFGS-B
            return "gtol"
        if "reduction of f" in msg or "rel_reduction" in msg:  # L-BFGS-B
            return "ftol"
        return "gtol" if m in GTOL_METHODS else "converged"
    if "iteration" in msg and any(w in msg for w in ("exceed", "limit", "reached")):
        return "max_iter"
    if maxiter is not None and nit is not None and nit >= maxiter:
        return "max_iter"  # e.g. trust-constr reports both limits as one status
    if "evaluation" in msg or "maxfun" in msg or "maxfev" in msg:
        return "max_evals"
    if any(
        w in msg for w in ("precision loss", "abnormal", "lnsrch", "linesearch", "linear search")
    ):
        return "line_search"
    if "nan" in re.findall(r"[a-z]+", msg):
        return "nonfinite"
    if "unable to progress" in msg or "failure to predict improvement" in msg:
        return "stalled"
    return "failed"


def scipy_minimize(
    objective: Objective | Callable[[Tensor], Tensor],
    theta0: Tensor,
    method: str = "L-BFGS-B",
    *,
    callback: Callable | None = None,
    bounds=None,
    constraints=(),
    tol: float | None = None,
    **options,
) -> Result:
    """``scipy.optimize.minimize(method=method)`` on ``objective`` from ``theta0``.

    ``options`` go to scipy's ``options`` dict (e.g. ``maxiter``, ``gtol``). ``callback(info)``
    follows :func:`secondorder.solvers.minimize`: it gets the trace row with ``theta``, may
    return a dict of extra columns, or True to stop (scipy ≥ 1.11 stops on StopIteration).
    """
    from scipy.optimize import minimize as sp_minimize  # scipy only when the bridge is used

    objective, theta0 = _checked(objective, theta0, method, callback)
    check_scipy_options(method, options)
    m = method.lower()
    problem = _Problem(objective)
    x0 = theta0.detach().cpu().to(torch.float64).numpy()
    recorder = _Recorder(problem, callback, method, x0)
    kwargs: dict = {"method": method, "callback": recorder.scipy_callback}
    kwargs["options"] = options or None
    if bounds is not None:
        kwargs["bounds"] = bounds
    if constraints:
        kwargs["constraints"] = constraints
    if tol is not None:
        kwargs["tol"] = tol
    f_call = problem.fun if m in GRADIENT_METHODS else problem.fun_only
    if m in GRADIENT_METHODS:
        kwargs["jac"] = problem.jac
    if m in HESSP_METHODS:
        kwargs["hessp"] = problem.hessp
    if m in HESS_METHODS:
        kwargs["hess"] = problem.hess

    # the starting row (k = 0): one evaluation that scipy's first call then reuses
    if m in GRADIENT_METHODS:
        problem.evaluate(x0)
        f0 = problem.cache["f"]
    else:
        f0 = problem.fun_only(x0)
    recorder.record(x0, f0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        res = sp_minimize(f_call, x0, **kwargs)
    return _result(problem, recorder, res, method, options.get("maxiter"))


def _checked(objective, theta0, method, callback) -> tuple[Objective, Tensor]:
    """The objective (a callable wrapped) and θ₀ in its dtype, or the error scipy would give
    less clearly."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string naming a scipy method, got {method!r}")
    if not isinstance(objective, Objective):
        if not callable(objective):
            raise TypeError(f"expected an Objective or a callable, got {type(objective).__name__}")
        t = torch.as_tensor(theta0)
        objective = FunctionObjective(
            objective,
            t.numel(),
            dtype=t.dtype if t.dtype.is_floating_point else torch.get_default_dtype(),
        )
    theta0 = torch.as_tensor(theta0)
    if not theta0.dtype.is_floating_point:
        theta0 = theta0.to(objective.dtype)
    theta0 = objective.check_theta(theta0, "theta0")
    if not bool(torch.isfinite(theta0).all()):
        raise ValueError("theta0 contains NaN or inf values")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    return objective, theta0


class _Problem:
    """The objective as scipy sees it: float64 NumPy vectors in and out, ``fun`` and ``jac``
    sharing one ``value_and_grad`` per point (scipy asks for f and g at the same x apart)."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.dtype, self.device = objective.dtype, objective.device
        self.counts0 = objective.counts.copy()
        self.cache: dict = {"x": None, "f": None, "g": None}  # the last value_and_grad
        self.values: dict = {"x": None, "f": None}  # the last value alone

    def to_torch(self, x: np.ndarray) -> Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float64)).to(
            dtype=self.dtype, device=self.device
        )

    def same(self, x: np.ndarray) -> bool:
        return self.cache["x"] is not None and np.array_equal(self.cache["x"], x)

    def evaluate(self, x: np.ndarray) -> None:
        f, g = self.objective.value_and_grad(self.to_torch(x))
        self.cache.update(x=np.array(x, dtype=np.float64, copy=True), f=float(f), g=g)

    def fun(self, x: np.ndarray) -> float:
        if not self.same(x):
            self.evaluate(x)
        return self.cache["f"]

    def jac(self, x: np.ndarray) -> np.ndarray:
        if not self.same(x):
            self.evaluate(x)
        return self.cache["g"].detach().cpu().to(torch.float64).numpy()

    def fun_only(self, x: np.ndarray) -> float:
        values = self.values
        if self.same(x) or (values["x"] is not None and np.array_equal(values["x"], x)):
            return self.cache["f"] if self.same(x) else values["f"]
        f = float(self.objective.value(self.to_torch(x)))
        values.update(x=np.array(x, dtype=np.float64, copy=True), f=f)
        return f

    def hessp(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        hv = self.objective.hvp(self.to_torch(x), self.to_torch(p))
        return hv.detach().cpu().to(torch.float64).numpy()

    def hess(self, x: np.ndarray) -> np.ndarray:
        H = self.objective.hessian(self.to_torch(x))
        return H.detach().cpu().to(torch.float64).numpy()

    def counts(self) -> tuple[int, int, int]:
        c, c0 = self.objective.counts, self.counts0
        return (
            c.f - c0.f,
            c.g - c0.g,
            (c.hv - c0.hv) + (c.ggnv - c0.ggnv) + (c.hessian - c0.hessian),
        )


class _Recorder:
    """Trace rows, one from each call of scipy's callback, and our callback on them."""

    def __init__(self, problem: _Problem, callback: Callable | None, method: str, x0) -> None:
        self.problem = problem
        self.callback = callback
        self.method = method
        self.x0 = x0
        self.trace = Trace()
        self.k = 0
        self.stopped = False
        self.start = time.perf_counter()

    def row_for(self, x: np.ndarray, f: float) -> dict:
        problem, rows = self.problem, self.trace.rows
        g = problem.cache["g"] if problem.same(x) else None
        nfev, ngev, nhev = problem.counts()
        prev = rows[-1]["theta_np"] if rows else self.x0
        step = float(np.max(np.abs(np.asarray(x) - prev))) if prev is not None else 0.0
        return {
            "k": self.k,
            "f": f,
            "grad_norm": _gnorm(g),
            "step": step,
            "nfev": nfev,
            "ngev": ngev,
            "nhev": nhev,
            "time": time.perf_counter() - self.start,
            "theta_np": np.array(x, copy=True),
        }

    def record(self, x: np.ndarray, f: float) -> bool:
        """Append the row of x; True when our callback asks to stop."""
        row = self.row_for(x, f)
        stop = False
        if self.callback is not None:
            info = {k: v for k, v in row.items() if k != "theta_np"}
            info.update(
                theta=self.problem.to_torch(x),
                objective=self.problem.objective,
                method=f"scipy:{self.method}",
            )
            out = self.callback(info)
            if isinstance(out, dict):
                row.update(out)
            elif out is True:
                stop = True
        self.trace.append(row)
        return stop

    def scipy_callback(self, intermediate_result) -> None:
        if hasattr(intermediate_result, "x"):
            x = intermediate_result.x
            f = getattr(intermediate_result, "fun", None)
            f = self.problem.fun_only(x) if f is None else float(f)
        else:  # methods that pass x alone (TNC, COBYLA, ...)
            x = np.asarray(intermediate_result)
            f = self.problem.fun_only(x)
        self.k += 1
        if self.record(x, f):
            self.stopped = True
            raise StopIteration


def _result(
    problem: _Problem, recorder: _Recorder, res, method: str, maxiter: int | None
) -> Result:
    """Our Result from scipy's: status in our vocabulary, g at the result where known."""
    m = method.lower()
    theta = problem.to_torch(res.x)
    f = float(res.fun) if np.ndim(res.fun) == 0 else float(np.asarray(res.fun).reshape(-1)[0])
    g = problem.cache["g"] if problem.same(res.x) else None
    if g is None and m in GRADIENT_METHODS:
        f_t, g = problem.objective.value_and_grad(theta)
        f = float(f_t)
    nfev, ngev, nhev = problem.counts()
    for r in recorder.trace.rows:
        r.pop("theta_np", None)
    stopped = recorder.stopped
    status = "callback" if stopped else scipy_status(m, res, maxiter)
    if status in ("failed", "line_search") and not math.isfinite(f):
        status = "nonfinite"
    message = "the callback asked to stop" if stopped else str(res.message)
    if g is not None and not math.isfinite(_gnorm(g)):
        message += "; the gradient is not finite at the result"
    return Result(
        theta=theta,
        f=f,
        grad_norm=_gnorm(g),
        nit=int(getattr(res, "nit", recorder.k) or recorder.k),
        nfev=nfev,
        ngev=ngev,
        nhev=nhev,
        status=status,
        message=message,
        method=f"scipy:{method}",
        trace=recorder.trace,
        success=bool(res.success) and not stopped,
        grad=None if g is None else g.detach().clone(),
        info={"scipy": res, "scipy_status": getattr(res, "status", None)},
    )

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

from secondorder.objective import FunctionObjective, Objective
from secondorder.solvers.result import Result, Trace

__all__ = ["GRADIENT_METHODS", "HESSP_METHODS", "scipy_minimize", "scipy_status"]

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
    from scipy.optimize import minimize as sp_minimize

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
    m = method.lower()
    dtype, device = objective.dtype, objective.device
    counts0 = objective.counts.copy()
    cache: dict = {"x": None, "f": None, "g": None}  # the last value_and_grad
    values: dict = {"x": None, "f": None}  # the last value alone
    start = time.perf_counter()

    def to_torch(x: np.ndarray) -> Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float64)).to(dtype=dtype, device=device)

    def same(x: np.ndarray) -> bool:
        return cache["x"] is not None and np.array_equal(cache["x"], x)

    def evaluate(x: np.ndarray) -> None:
        f, g = objective.value_and_grad(to_torch(x))
        cache.update(x=np.array(x, dtype=np.float64, copy=True), f=float(f), g=g)

    def fun(x: np.ndarray) -> float:
        if not same(x):
            evaluate(x)
        return cache["f"]

    def jac(x: np.ndarray) -> np.ndarray:
        if not same(x):
            evaluate(x)
        return cache["g"].detach().cpu().to(torch.float64).numpy()

    def fun_only(x: np.ndarray) -> float:
        if same(x) or (values["x"] is not None and np.array_equal(values["x"], x)):
            return cache["f"] if same(x) else values["f"]
        f = float(objective.value(to_torch(x)))
        values.update(x=np.array(x, dtype=np.float64, copy=True), f=f)
        return f

    def hessp(x: np.ndarray, p: np.ndarray) -> np.ndarray:
        hv = objective.hvp(to_torch(x), to_torch(p))
        return hv.detach().cpu().to(torch.float64).numpy()

    def hess(x: np.ndarray) -> np.ndarray:
        return objective.hessian(to_torch(x)).detach().cpu().to(torch.float64).numpy()

    def counts() -> tuple[int, int, int]:
        c = objective.counts
        return (
            c.f - counts0.f,
            c.g - counts0.g,
            (c.hv - counts0.hv) + (c.ggnv - counts0.ggnv) + (c.hessian - counts0.hessian),
        )

    trace = Trace()
    state = {"k": 0, "stopped": False}

    def row_for(x: np.ndarray, f: float) -> dict:
        g = cache["g"] if same(x) else None
        nfev, ngev, nhev = counts()
        prev = trace.rows[-1]["theta_np"] if trace.rows else x0
        step = float(np.max(np.abs(np.asarray(x) - prev))) if prev is not None else 0.0
        return {
            "k": state["k"],
            "f": f,
            "grad_norm": _gnorm(g),
            "step": step,
            "nfev": nfev,
            "ngev": ngev,
            "nhev": nhev,
            "time": time.perf_counter() - start,
            "theta_np": np.array(x, copy=True),
        }

    def record(x: np.ndarray, f: float) -> bool:
        row = row_for(x, f)
        stop = False
        if callback is not None:
            info = {k: v for k, v in row.items() if k != "theta_np"}
            info.update(theta=to_torch(x), objective=objective, method=f"scipy:{method}")
            out = callback(info)
            if isinstance(out, dict):
                row.update(out)
            elif out is True:
                stop = True
        trace.append(row)
        return stop

    def sp_callback(intermediate_result):
        if hasattr(intermediate_result, "x"):
            x = intermediate_result.x
            f = getattr(intermediate_result, "fun", None)
            f = fun_only(x) if f is None else float(f)
        else:  # methods that pass x alone (TNC, COBYLA, ...)
            x = np.asarray(intermediate_result)
            f = fun_only(x)
        state["k"] += 1
        if record(x, f):
            state["stopped"] = True
            raise StopIteration

    x0 = theta0.detach().cpu().to(torch.float64).numpy()
    kwargs: dict = {"method": method, "callback": sp_callback, "options": options or None}
    if bounds is not None:
        kwargs["bounds"] = bounds
    if constraints:
        kwargs["constraints"] = constraints
    if tol is not None:
        kwargs["tol"] = tol
    if m in GRADIENT_METHODS:
        kwargs["jac"] = jac
        f_call = fun
    else:
        f_call = fun_only
    if m in HESSP_METHODS:
        kwargs["hessp"] = hessp
    if m in HESS_METHODS:
        kwargs["hess"] = hess

    # the starting row (k = 0): one evaluation that scipy's first call then reuses
    if m in GRADIENT_METHODS:
        evaluate(x0)
        f0 = cache["f"]
    else:
        f0 = fun_only(x0)
    record(x0, f0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        res = sp_minimize(f_call, x0, **kwargs)

    theta = to_torch(res.x)
    f = float(res.fun) if np.ndim(res.fun) == 0 else float(np.asarray(res.fun).reshape(-1)[0])
    g = cache["g"] if same(res.x) else None
    if g is None and m in GRADIENT_METHODS:
        f_t, g = objective.value_and_grad(theta)
        f = float(f_t)
    nfev, ngev, nhev = counts()
    for r in trace.rows:
        r.pop("theta_np", None)
    maxiter = options.get("maxiter")
    status = "callback" if state["stopped"] else scipy_status(m, res, maxiter)
    if status in ("failed", "line_search") and not math.isfinite(f):
        status = "nonfinite"
    message = str(res.message)
    if state["stopped"]:
        message = "the callback asked to stop"
    if g is not None and not math.isfinite(_gnorm(g)):
        message += "; the gradient is not finite at the result"
    return Result(
        theta=theta,
        f=f,
        grad_norm=_gnorm(g),
        nit=int(getattr(res, "nit", state["k"]) or state["k"]),
        nfev=nfev,
        ngev=ngev,
        nhev=nhev,
        status=status,
        message=message,
        method=f"scipy:{method}",
        trace=trace,
        success=bool(res.success) and not state["stopped"],
        grad=None if g is None else g.detach().clone(),
        info={"scipy": res, "scipy_status": getattr(res, "status", None)},
    )

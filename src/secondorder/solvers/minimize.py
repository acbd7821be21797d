"""``minimize``: one loop for every method (a direction rule × a step rule, or a trust region).

See ``docs/solvers.md`` for the options of each method and the reasoning behind the defaults.
The methods and their options are declared in :mod:`secondorder.solvers.registry`, checked by
:mod:`secondorder.solvers.options` and run by :mod:`secondorder.solvers.loop`; the tables
below are re-exported from there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from secondorder._progress import Reporter, reporting
from secondorder.objective import FunctionObjective, Objective
from secondorder.solvers.loop import run
from secondorder.solvers.options import (  # noqa: F401 (LINE_SEARCHES: re-exported)
    DEFAULT,
    LINE_SEARCHES,
    OptionError,
    validate_options,
)

# the option tables, re-exported for code that reads them from this module
from secondorder.solvers.registry import (  # noqa: F401
    ALL_OPTIONS,
    COMMON_OPTIONS,
    DEFAULT_LINE_SEARCH,
    LINE_SEARCH_OPTIONS,
    METHOD_OPTIONS,
    METHODS,
    PRECONDITIONER_OPTIONS,
    REGISTRY,
)
from secondorder.solvers.result import Result

__all__ = ["DEFAULT_LINE_SEARCH", "METHODS", "OptionError", "minimize", "validate_options"]

#: flags of the built-in methods, as name tuples (the registry entries say the same)
TRUST_METHODS = tuple(n for n in METHODS if REGISTRY[n].trust_region is not None)
SECOND_ORDER = tuple(n for n in METHODS if REGISTRY[n].second_order)
MEMORY_METHODS = tuple(n for n in METHODS if REGISTRY[n].memory is not None)


# -- the arguments ---------------------------------------------------------------------------
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


# -- the loop ------------------------------------------------------------------------------------
def minimize(
    f_or_objective: Objective | Callable[[Tensor], Tensor],
    theta0: Tensor,
    method: str = "lbfgs",
    line_search: str | None = DEFAULT,
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
    ``precondition_damping`` (the γ of ``preconditioner="kfac"``),
    ``verbose``, ``progress`` (True: one status line on stderr; or a callable taking a
    ``ProgressEvent``), ``initial_state`` (a previous ``Result.state``: continue that run),
    ``check_saddle`` (second-order methods: on convergence, test the Hessian for a negative
    eigenvalue), ``trace_theta`` (store θ in every trace row). Line-search options: ``lr`` (or
    ``step_size``), ``c1``, ``c2``, ``max_ls``. Method options: see ``docs/solvers.md``.

    Everything is validated before the first evaluation (by :func:`validate_options`, which
    runs the same checks without an evaluation). The loop calls
    ``objective.begin_iteration(k)`` at the top of every iteration and re-evaluates f and g
    when the function changed.
    """
    progress = options.pop("progress", False)
    objective = _as_objective(f_or_objective, theta0)
    theta = _check_theta0(objective, theta0)
    cfg = validate_options(objective, method, line_search=line_search, **options)
    if not progress:
        return run(objective, theta, cfg)
    with reporting(progress, f"minimize ({method})") as rep:
        cfg["callback"] = _reporting_callback(cfg["callback"], rep, cfg["max_iter"])
        return run(objective, theta, cfg)


def _reporting_callback(callback, rep: Reporter, max_iter: int):
    """The user's callback, after reporting iteration k of max_iter and f to ``rep``."""

    def report(info: dict):
        rep.update(int(info["k"]), max_iter, f"f={float(info['f']):.6g}, iteration")
        return None if callback is None else callback(info)

    return report

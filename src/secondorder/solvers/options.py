"""The option checks of :func:`~secondorder.solvers.minimize`: :func:`validate_options`.

Every check runs before the first evaluation, in this order: the method and the line search,
the option names against the method (:class:`OptionError`), the loop's own options, the step
rule, the preconditioner, the method's options (read from its
:class:`~secondorder.solvers.registry.MethodEntry`) and a resumed ``initial_state``.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from secondorder._validation import check_choice, check_positive, check_positive_int, closest
from secondorder.errors import InvalidTypeError
from secondorder.linalg import check_dense_fits
from secondorder.objective import Objective
from secondorder.solvers.linesearch import UnevaluatedStep, make_step_rule
from secondorder.solvers.methods import LineSearchMethod, TrustMethod
from secondorder.solvers.precondition import (
    PRECONDITIONERS,
    Preconditioner,
    check_kfac_damping,
    make_preconditioner,
)
from secondorder.solvers.registry import (
    LINE_SEARCH_OPTIONS,
    PRECONDITIONER_OPTIONS,
    REGISTRY,
    MethodEntry,
    accepted_options,
    all_options,
    method_entry,
)
from secondorder.solvers.result import default_gtol

__all__ = ["DEFAULT", "LINE_SEARCHES", "OptionError", "validate_options"]

LINE_SEARCHES = ("armijo", "wolfe", "fixed")

#: ``line_search`` not given: the method's default step rule
DEFAULT: Any = object()


class OptionError(InvalidTypeError, ValueError):
    """An option that does not exist or does not apply to the chosen method."""


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
    line_search: str | None = DEFAULT,
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
    Newton products for ``curvature="ggn"`` / ``"ggn-diag"``, a ModelObjective for ``"eq14"``
    and ``"kfac"``) are skipped and the default dtype stands for the objective's.

    Returns the resolved configuration: ``method``, ``line_search`` (the step rule's name, or
    None for a fixed step), ``max_iter``, ``gtol``, ``ftol``, ``max_evals``, ``max_time``,
    ``lr``, ``robust``, ``check_saddle`` … with the defaults filled in, and the (unused) solver
    components ``minimize`` would run with.
    """
    objective = _objective_for_options(objective_or_n_params)
    return _validate(objective, method, line_search, options)


def _validate(objective, method: str, line_search, options: dict) -> dict:
    """The checks of :func:`validate_options` on an objective (or a :class:`_SizeOnly`)."""
    entry = method_entry(method)
    ls = _line_search(entry, line_search)
    _check_names(entry, ls, options)
    cfg: dict[str, Any] = {"method": method, "line_search": ls}
    _loop_options(cfg, entry, options, objective.dtype)
    _step_rule(cfg, entry, ls, options)
    cfg["precond"] = _preconditioner(entry, objective, options)
    own = _method_options(entry, objective, options)
    cfg["robust"] = own.get("robust", False)
    built = entry.build(own)
    serves = getattr(built, "check_serves", None)
    if serves is not None:  # a direction that can tell whether it can step on this θ
        serves(objective.dtype, objective.device)
    cfg["deferred"] = _defers_evaluation(objective, ls, built)
    if cfg["deferred"]:
        cfg["rule"] = UnevaluatedStep()
    if entry.trust_region is not None:
        cfg["solver"] = TrustMethod(entry, built)
    else:
        cfg["solver"] = LineSearchMethod(entry, built, cfg["rule"], robust=cfg["robust"])
    cfg["initial_state"] = _initial_state(objective, method, options.get("initial_state"))
    return cfg


def _defers_evaluation(objective, ls: str | None, built: Any) -> bool:
    """A mini-batch step (momentum, Adam, a torch.optim step: a fixed step that needs no
    descent) on a function that changes every iteration: f and ∇f at θ_{k+1} are evaluated
    once, on the function of iteration k+1, as a training loop does, not also on the old one.
    The trace's f after step k is then the loss of the batch of iteration k+1 at θ_{k+1}."""
    return (
        ls is None
        and not getattr(built, "requires_descent", True)
        and getattr(objective, "stochastic", "never") == "iteration"
    )


def _line_search(entry: MethodEntry, line_search) -> str | None:
    """The step rule's name (None: a fixed step, or a trust-region method)."""
    if line_search is DEFAULT:
        return None if entry.line_search == "fixed" else entry.line_search
    if entry.trust_region is not None and line_search is not None:
        raise OptionError(
            f"method={entry.name!r} takes no line search (it adapts its {entry.trust_region} "
            f"instead); got line_search={line_search!r}"
        )
    if line_search is not None and (
        not isinstance(line_search, str) or line_search not in LINE_SEARCHES
    ):
        raise ValueError(
            f"line_search={line_search!r} is not one of None, 'armijo', 'wolfe'"
            f"{closest(str(line_search), LINE_SEARCHES)}"
        )
    return None if line_search == "fixed" else line_search


#: the names torch.optim (and scipy) give to options that are called otherwise here
FOREIGN_NAMES = {
    "history_size": "memory",
    "tolerance_grad": "gtol",
    "tolerance_change": "ftol",
    "line_search_fn": "line_search",
    "max_eval": "max_evals",
    "maxiter": "max_iter",
    "weight_decay": "l2 (an objective setting, ModelObjective(..., l2=...))",
}


def _suggest(name: str, every: set[str]) -> str:
    """' (did you mean ...?)': torch's name for one of ours first, else the closest name."""
    ours = FOREIGN_NAMES.get(name)
    if ours is not None and ours.split(" ")[0] in every | {"l2"}:
        return f" (did you mean {ours!r}? {name!r} is torch.optim's name for it)"
    return closest(name, every)


def _check_names(entry: MethodEntry, ls: str | None, options: dict) -> None:
    """Every option exists, applies to the method and to the chosen step rule."""
    every = all_options() | entry.option_names
    allowed = accepted_options(entry.name)
    for name in options:
        if name not in every:
            raise OptionError(
                f"minimize() got an unexpected option {name!r}{_suggest(name, every)}"
            )
        if name not in allowed:
            owners = [m for m, e in REGISTRY.items() if name in e.option_names]
            why = f" (it is an option of {', '.join(owners)})" if owners else ""
            if name in LINE_SEARCH_OPTIONS:
                why = " (it configures a line search, which this method does not use)"
            if name in PRECONDITIONER_OPTIONS:
                why = (
                    " (Newton's method uses the exact Hessian)"
                    if entry.dense_hessian
                    else " (the method scales its steps itself)"
                )
            raise OptionError(f"option {name!r} does not apply to method={entry.name!r}{why}")
    if ls is None and entry.trust_region is None:
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


def _optional_positive(options: dict, name: str, default):
    v = options.get(name, default)
    if v is None:
        return None
    return check_positive(name, v)


def _loop_options(cfg: dict, entry: MethodEntry, options: dict, dtype: torch.dtype) -> None:
    """The options of :data:`~secondorder.solvers.registry.COMMON_OPTIONS` into ``cfg``."""
    cfg["max_iter"] = check_positive_int("max_iter", options.get("max_iter", 1000))
    cfg["gtol"] = _optional_positive(options, "gtol", default_gtol(dtype))
    cfg["ftol"] = _optional_positive(options, "ftol", None)
    me = options.get("max_evals")
    cfg["max_evals"] = None if me is None else check_positive_int("max_evals", me)
    cfg["max_time"] = _optional_positive(options, "max_time", None)
    cb = options.get("callback")
    if cb is not None and not callable(cb):
        raise TypeError(f"callback must be callable, got {type(cb).__name__}")
    cfg["callback"] = cb
    cfg["verbose"] = options.get("verbose", False)
    cfg["trace_theta"] = bool(options.get("trace_theta", False))
    cfg["check_saddle"] = bool(options.get("check_saddle", entry.second_order))


def _step_rule(cfg: dict, entry: MethodEntry, ls: str | None, options: dict) -> None:
    """``lr`` (or ``step_size``) and, for line-search methods, the step rule itself."""
    if entry.own_step:  # its lr is its own option; the loop takes the whole step
        cfg["lr"] = 1.0
    else:
        lr = options.get("lr", options.get("step_size", entry.lr))
        cfg["lr"] = check_positive("lr" if "lr" in options else "step_size", lr)
    c1 = check_positive("c1", options.get("c1", 1e-4))
    c2 = check_positive("c2", options.get("c2", entry.wolfe_c2))
    if ls == "wolfe" and not 0 < c1 < c2 < 1:
        raise ValueError(f"the strong Wolfe conditions need 0 < c1 < c2 < 1, got c1={c1}, c2={c2}")
    if ls == "armijo" and not 0 < c1 < 1:
        raise ValueError(f"c1 must lie in (0, 1), got {c1}")
    max_ls = check_positive_int("max_ls", options.get("max_ls", 25 if ls == "wolfe" else 30))
    if entry.trust_region is None:
        rule_opts: dict[str, Any] = {"max_ls": max_ls}
        if ls in ("armijo", "wolfe"):
            rule_opts["c1"] = c1
        if ls == "wolfe":
            rule_opts["c2"] = c2
        cfg["rule"] = make_step_rule(ls, **rule_opts)


def _preconditioner(entry: MethodEntry, objective, options: dict) -> Preconditioner | None:
    """``preconditioner``, ``precondition_every`` and ``precondition_damping``; trust regions
    take diagonals only."""
    if "precondition_every" in options:
        every = check_positive_int("precondition_every", options["precondition_every"])
    else:
        every = 1
    spec = options.get("preconditioner")
    damping = options.get("precondition_damping")
    if isinstance(objective, _SizeOnly) and isinstance(spec, str):
        check_choice("preconditioner", spec, PRECONDITIONERS)  # its needs are unknown here
        check_kfac_damping(spec, damping)
        precond = Preconditioner(spec, every=every)
    else:
        precond = make_preconditioner(spec, objective, every=every, damping=damping)
    if entry.trust_region is not None and precond is not None:
        if precond.kind == "callable":
            raise ValueError(
                f"method={entry.name!r} takes a diagonal preconditioner (a name or a tensor), "
                "not a callable"
            )
        if precond.kind == "kfac":
            raise ValueError(
                f"method={entry.name!r} takes a diagonal preconditioner; 'kfac' is "
                "block-diagonal (use it with gd, newton-cg, nlcg, bfgs, lbfgs or sgd)"
            )
    return precond


def _method_options(entry: MethodEntry, objective, options: dict) -> dict[str, Any]:
    """The method's own options, checked, with defaults; first the dense matrix must fit."""
    if entry.dense is not None:
        check_dense_fits(
            (objective.n_params, objective.n_params),
            objective.dtype,
            entry.dense,
            device=getattr(objective, "device", None),
        )
    return {opt.name: opt.value(options, objective) for opt in entry.options}


def _initial_state(objective, method: str, state) -> dict | None:
    """A previous ``Result.state`` of the same method, with a θ that fits the objective."""
    if state is not None:
        if not isinstance(state, dict) or "theta" not in state:
            raise TypeError("initial_state must be the dict of a Result's .state")
        missing = [key for key in ("k", "method") if key not in state]
        if missing:
            raise ValueError(
                f"initial_state lacks {missing}: it must be a Result's .state as saved, "
                "not a hand-made dict"
            )
        k = state["k"]
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 0:
            raise ValueError(f"initial_state['k'] must be a non-negative int, got {k!r}")
        if state.get("method") != method:
            raise ValueError(
                f"initial_state was saved by method={state.get('method')!r}, not {method!r}"
            )
        objective.check_theta(state["theta"], "initial_state['theta']")
    return state

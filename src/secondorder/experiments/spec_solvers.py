"""Which solver methods and option names a spec may give, read from the solvers' method
registry (:mod:`secondorder.solvers.registry`): a method registered there is accepted by specs
with exactly the options ``minimize`` accepts.

Only names are checked here; option values are checked later against the real objective
(``secondorder.solvers.validate_options``, in the runner's preflight), before any training.
"""

from __future__ import annotations

from secondorder._validation import closest
from secondorder.experiments.schema import did_you_mean, fmt_path
from secondorder.solvers.registry import REGISTRY, accepted_options, all_options, method_entry

__all__ = ["SCIPY_METHODS", "check_option_names", "method_ok", "our_methods"]

#: methods of ``scipy.optimize.minimize`` reached through the scipy bridge as ``scipy:<name>``
SCIPY_METHODS = (
    "Nelder-Mead",
    "Powell",
    "CG",
    "BFGS",
    "Newton-CG",
    "L-BFGS-B",
    "TNC",
    "SLSQP",
    "trust-constr",
    "dogleg",
    "trust-ncg",
    "trust-exact",
    "trust-krylov",
)


def method_ok(method: str, where: str, errors: list[str]) -> None:
    """Append an error when ``method`` is neither ours nor ``scipy:<a scipy method>``."""
    if method.startswith("scipy:"):
        name = method[6:]
        lower = {m.lower(): m for m in SCIPY_METHODS}
        if name.lower() not in lower:
            errors.append(
                f"{where}: {method!r}: scipy method {name!r} is not one of "
                f"{list(SCIPY_METHODS)}{closest(name, SCIPY_METHODS)}"
            )
        return
    if method.startswith("torch:"):
        try:
            method_entry(method)
        except ValueError as err:
            errors.append(f"{where}: {method!r}: {err}")
        return
    methods = our_methods()
    if method not in methods:
        errors.append(
            f"{where}: {method!r} is not one of {list(methods)} (or 'torch:<Name>', 'scipy:<name>')"
            f"{closest(method, methods)}"
        )


def our_methods() -> tuple[str, ...]:
    """Our methods, as accepted by ``secondorder.solvers.minimize`` (the live registry)."""
    return tuple(REGISTRY)


def check_option_names(method: str, options: dict, where: str, errors: list[str]) -> None:
    """Option names against the solvers' own tables;
    values are checked later, against the real objective, before any training."""
    try:
        entry = method_entry(method)
    except ValueError:
        return  # an unknown method is reported by method_ok
    reserved = {"callback", "initial_state", "max_iter"}
    allowed = accepted_options(method)
    every = all_options() | entry.option_names
    for name in options:
        if name in reserved:
            errors.append(
                f"{fmt_path(where, name)}: set by the runner (use the solver's max_iter key)"
            )
        elif name not in every:
            errors.append(f"{fmt_path(where, name)}: unknown option{did_you_mean(name, every)}")
        elif name not in allowed:
            owners = [m for m, e in REGISTRY.items() if name in e.option_names]
            why = f" (it is an option of {', '.join(owners)})" if owners else ""
            errors.append(f"{fmt_path(where, name)}: does not apply to method {method!r}{why}")

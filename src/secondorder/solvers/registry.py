"""The methods of :func:`~secondorder.solvers.minimize`, each declared once.

A :class:`MethodEntry` holds everything the rest of the package needs to know about a method:
its name and label, the factory that builds its direction rule (or trust-region solver) from
validated options, its own options (:class:`Option`: name, default, check), its default step
rule and its flags. The option checks of ``minimize``, its messages, the experiment specs'
option tables and the exported constants below are all read from :data:`REGISTRY`.

Adding a method: write its direction class (the :class:`~secondorder.solvers.protocol.Direction`
protocol) and call :func:`register` with one entry; :data:`METHODS`, :data:`METHOD_OPTIONS` …
are snapshots of the built-in methods, while the checks and the loop read the live registry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from secondorder._validation import check_choice, check_positive, check_positive_int
from secondorder.curvature.kfac import (
    KFAC_APPROXIMATIONS,
    KFAC_KINDS,
    check_factors_fit,
    kfac_layers,
)
from secondorder.objective import Objective
from secondorder.solvers.directions import (
    CURVATURES,
    NEWTON_MODIFICATIONS,
    NLCG_VARIANTS,
    Newton,
    NewtonCG,
    NonlinearCG,
    SteepestDescent,
)
from secondorder.solvers.firstorder import Adam, MomentumSGD
from secondorder.solvers.hessianfree import HessianFree
from secondorder.solvers.kfac import KFAC
from secondorder.solvers.muon import Muon
from secondorder.solvers.quasinewton import BFGS, LBFGS
from secondorder.solvers.sqn import SQN
from secondorder.solvers.torchstep import (
    TorchOptimizerStep,
    option_checks,
    torch_optimizer_class,
)
from secondorder.solvers.trust import ARC, TrustNCG

__all__ = [
    "ALL_OPTIONS",
    "COMMON_OPTIONS",
    "DEFAULT_LINE_SEARCH",
    "LINE_SEARCH_OPTIONS",
    "METHODS",
    "METHOD_OPTIONS",
    "PRECONDITIONER_OPTIONS",
    "REGISTRY",
    "MethodEntry",
    "Option",
    "accepted_options",
    "all_options",
    "method_entry",
    "register",
    "torch_entry",
    "unregister",
]

#: options of the loop itself, accepted by every method
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
#: options of the preconditioner M, for every method but those on the exact dense Hessian
PRECONDITIONER_OPTIONS = {"preconditioner", "precondition_every", "precondition_damping"}
#: options of the step rule, for every method but the trust-region ones
LINE_SEARCH_OPTIONS = {"lr", "step_size", "c1", "c2", "max_ls"}

Check = Callable[[str, Any], Any]


# -- option checks ----------------------------------------------------------------------------
def check_bool(arg: str, value: Any) -> bool:
    """Check that ``value`` is True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{arg} must be True or False, got {value!r}")
    return value


def optional(check: Check) -> Check:
    """``check`` for a value that may also be None (meaning "the method's own default")."""

    def check_or_none(arg: str, value: Any) -> Any:
        return None if value is None else check(arg, value)

    return check_or_none


def choice(choices: tuple[str, ...]) -> Check:
    """A check that the value is one of ``choices`` (with a suggestion for a misspelt one)."""
    return lambda arg, value: check_choice(arg, value, choices)


def below(bound: float) -> Check:
    """A check that the value is a number in [0, bound)."""

    def check_range(arg: str, value: Any) -> float:
        value = check_positive(arg, value, allow_zero=True)
        if value >= bound:
            raise ValueError(f"{arg} must lie in [0, {bound}), got {value}")
        return value

    return check_range


def _needs_ggn(objective: Any, curvature: str) -> None:
    """curvature='ggn' on an objective known to offer no Gauss–Newton products."""
    if (
        curvature == "ggn"
        and isinstance(objective, Objective)
        and type(objective).ggnvp_at is Objective.ggnvp_at
    ):
        raise ValueError(
            f"curvature='ggn' needs Gauss-Newton products, which {type(objective).__name__} "
            "does not offer (use a ModelObjective, or curvature='hessian')"
        )


@dataclass(frozen=True)
class Option:
    """One option of a method: its name, its default and the check of a given value.

    ``check(name, value)`` returns the value to use (converted, e.g. an int to a float) or
    raises; ``requires(objective, value)``, when given, checks what only the objective itself
    can tell (it is skipped when the objective is known by its size alone)."""

    name: str
    default: Any
    check: Check
    requires: Callable[[Any, Any], None] | None = None

    def value(self, options: dict[str, Any], objective: Any) -> Any:
        """The checked value of this option in ``options`` (the default when absent)."""
        value = self.check(self.name, options.get(self.name, self.default))
        if self.requires is not None:
            self.requires(objective, value)
        return value


@dataclass(frozen=True)
class MethodEntry:
    """A method of ``minimize``, declared once.

    ``build(options)`` gets the method's own options, checked and with defaults filled in
    (a dict name → value), and returns a direction rule, or a trust-region solver when
    ``trust_region`` is set. Flags: ``line_search`` the default step rule ("armijo", "wolfe";
    None for trust-region methods), ``second_order`` (``check_saddle`` on by default),
    ``memory`` (what the method remembers across iterations, e.g. "curvature pairs": a method
    with memory is reset to −M⁻¹g after a failed line search and its ``robust`` mode matters;
    ``robust_note`` says how robust mode keeps it consistent), ``trust_region`` (what it
    adapts instead of a step length), ``dense`` (the P×P matrix it allocates, checked to fit
    before the run), ``dense_hessian`` (works on the exact dense Hessian: no preconditioner,
    the saddle check uses its eigenvalues), ``wolfe_c2`` (the default curvature constant),
    ``lr`` (the default step size, the fixed step of a method whose ``line_search`` is
    ``"fixed"``), ``preconditioned`` (accepts ``preconditioner=``), ``own_step`` (the
    direction is the whole step, α = 1, and ``lr`` is one of the method's own options),
    ``escapes_saddles`` (at a stationary point with negative curvature the method steps along
    the Hessian eigenvector instead of stopping with status ``saddle``: solvers/escape.py)."""

    name: str
    label: str
    build: Callable[[dict[str, Any]], Any]
    options: tuple[Option, ...] = ()
    line_search: str | None = "armijo"
    second_order: bool = False
    memory: str | None = None
    robust_note: str = ""
    trust_region: str | None = None
    dense: str | None = None
    dense_hessian: bool = False
    wolfe_c2: float = 0.9
    lr: float = 1.0
    preconditioned: bool = True
    own_step: bool = False
    escapes_saddles: bool = False

    @property
    def option_names(self) -> frozenset[str]:
        return frozenset(o.name for o in self.options)


#: name → entry, in the order methods are listed in messages
REGISTRY: dict[str, MethodEntry] = {}


def register(entry: MethodEntry) -> MethodEntry:
    """Add a method; its name must be new."""
    if entry.name in REGISTRY:
        raise ValueError(f"a method named {entry.name!r} is registered already")
    if (entry.trust_region is None) == (entry.line_search is None):
        raise ValueError("a method has either a default line search or a trust region")
    REGISTRY[entry.name] = entry
    return entry


def unregister(name: str) -> MethodEntry:
    """Remove a method (e.g. one registered by a test); returns its entry."""
    return REGISTRY.pop(name)


def method_entry(name: str) -> MethodEntry:
    """The entry of method ``name``; a ValueError suggests the closest name otherwise.

    ``"torch:<Name>"`` is any ``torch.optim`` optimiser (see
    :mod:`~secondorder.solvers.torchstep`), its options read from its constructor."""
    if isinstance(name, str) and name.startswith("torch:"):
        return torch_entry(name[len("torch:") :])
    check_choice("method", name, REGISTRY)
    return REGISTRY[name]


_TORCH_ENTRIES: dict[str, MethodEntry] = {}


def torch_entry(optimizer: str) -> MethodEntry:
    """The entry of ``method="torch:<optimizer>"``: one ``optimizer.step()`` per iteration,
    with the optimiser's own constructor arguments (``lr`` included) as the method's options."""
    if optimizer not in _TORCH_ENTRIES:
        cls = torch_optimizer_class(optimizer)
        params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, params
        # an argument named like an option of the loop (LBFGS's max_iter: inner iterations
        # per step) is offered as optimizer_<name>, so both stay settable
        renamed = {
            (f"optimizer_{p.name}" if p.name in COMMON_OPTIONS else p.name): p
            for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
        checks = option_checks(cls)
        options = tuple(
            Option(
                name,
                None if p.default is inspect.Parameter.empty else p.default,
                checks[p.name],
            )
            for name, p in renamed.items()
        )

        def build(o: dict[str, Any], cls=cls, renamed=renamed) -> TorchOptimizerStep:
            given = {renamed[k].name: v for k, v in o.items() if v is not None}
            return TorchOptimizerStep(cls, given)

        _TORCH_ENTRIES[optimizer] = MethodEntry(
            f"torch:{optimizer}",
            f"torch.optim.{optimizer}",
            build,
            options,
            line_search="fixed",
            preconditioned=False,
            own_step=True,
        )
    return _TORCH_ENTRIES[optimizer]


def accepted_options(method: str) -> frozenset[str]:
    """Every option name ``minimize`` accepts for ``method``: the common ones, the step
    rule's (not for trust-region methods), the preconditioner's (not on the dense Hessian)
    and the method's own."""
    entry = method_entry(method)
    names = set(COMMON_OPTIONS) | entry.option_names
    if entry.preconditioned and not entry.dense_hessian:
        names |= PRECONDITIONER_OPTIONS
    if entry.trust_region is None and not entry.own_step:
        names |= LINE_SEARCH_OPTIONS
    return frozenset(names)


def all_options() -> set[str]:
    """Every option name of any registered method."""
    own = set().union(*(e.option_names for e in REGISTRY.values()))
    return COMMON_OPTIONS | PRECONDITIONER_OPTIONS | LINE_SEARCH_OPTIONS | own


# -- the built-in methods ---------------------------------------------------------------------
_ROBUST = Option("robust", False, check_bool)
_CURVATURE = Option("curvature", "hessian", choice(CURVATURES), requires=_needs_ggn)
_CG_MAX_ITER = Option("cg_max_iter", None, optional(check_positive_int))
_CG_TOL = Option("cg_tol", None, optional(check_positive))
_CG = (_CURVATURE, _CG_MAX_ITER, _CG_TOL)

register(MethodEntry("gd", "gradient descent", lambda o: SteepestDescent()))
register(
    MethodEntry(
        "newton",
        "Newton",
        lambda o: Newton(o["modification"]),
        (Option("modification", "damping", choice(NEWTON_MODIFICATIONS)),),
        second_order=True,
        escapes_saddles=True,
        dense="the dense Hessian",
        dense_hessian=True,
    )
)
register(
    MethodEntry(
        "newton-cg",
        "Newton-CG",
        lambda o: NewtonCG(
            o["curvature"], o["damping"], o["cg_max_iter"], o["cg_tol"], o["warm_start"]
        ),
        (
            *_CG,
            Option("damping", 0.0, lambda a, v: check_positive(a, v, allow_zero=True)),
            Option("warm_start", True, check_bool),
        ),
        second_order=True,
        escapes_saddles=True,
    )
)
register(
    MethodEntry(
        "nlcg",
        "NLCG",
        lambda o: NonlinearCG(o["variant"], o["restart_every"]),
        (
            Option("variant", "pr+", choice(NLCG_VARIANTS)),
            _ROBUST,
            Option("restart_every", None, optional(check_positive_int)),
        ),
        line_search="wolfe",
        memory="conjugate directions",
        robust_note="NLCG restarted at each change",
        wolfe_c2=0.1,
    )
)
_PAIRS = "each curvature pair was formed on one function"
register(
    MethodEntry(
        "bfgs",
        "BFGS",
        lambda o: BFGS(),
        (_ROBUST,),
        line_search="wolfe",
        memory="curvature pairs",
        robust_note=_PAIRS,
        dense="the dense BFGS matrix",
    )
)
register(
    MethodEntry(
        "lbfgs",
        "L-BFGS",
        lambda o: LBFGS(o["memory"]),
        (Option("memory", 10, check_positive_int), _ROBUST),
        line_search="wolfe",
        memory="curvature pairs",
        robust_note=_PAIRS,
    )
)
register(
    MethodEntry(
        "trust-ncg",
        "trust-region Newton-CG",
        lambda o: TrustNCG(
            o["initial_radius"],
            o["max_radius"],
            o["eta"],
            o["curvature"],
            o["cg_max_iter"],
            o["cg_tol"],
        ),
        (
            *_CG,
            Option("initial_radius", 1.0, check_positive),
            Option("max_radius", 1000.0, check_positive),
            Option("eta", 0.15, below(0.25)),
        ),
        line_search=None,
        second_order=True,
        escapes_saddles=True,
        trust_region="trust-region radius",
    )
)
register(
    MethodEntry(
        "arc",
        "ARC",
        lambda o: ARC(o["sigma0"], o["eta"], o["curvature"], o["cg_max_iter"], o["cg_tol"]),
        (*_CG, Option("sigma0", 1.0, check_positive), Option("eta", 0.1, below(0.9))),
        line_search=None,
        second_order=True,
        escapes_saddles=True,
        trust_region="cubic regulariser σ",
    )
)


def _nonnegative(arg: str, value: Any) -> float:
    return check_positive(arg, value, allow_zero=True)


register(
    MethodEntry(
        "sgd",
        "SGD",
        lambda o: MomentumSGD(o["momentum"], o["dampening"], o["nesterov"], o["weight_decay"]),
        (
            Option("momentum", 0.0, below(1.0)),
            Option("dampening", 0.0, below(1.0)),
            Option("nesterov", False, check_bool),
            Option("weight_decay", 0.0, _nonnegative),
        ),
        line_search="fixed",
        lr=1e-3,
    )
)
register(
    MethodEntry(
        "adam",
        "Adam",
        lambda o: Adam(
            o["beta1"],
            o["beta2"],
            o["eps"],
            o["weight_decay"],
            o["decoupled_weight_decay"],
            o["amsgrad"],
        ),
        (
            Option("beta1", 0.9, below(1.0)),
            Option("beta2", 0.999, below(1.0)),
            Option("eps", 1e-8, check_positive),
            Option("weight_decay", 0.0, _nonnegative),
            Option("decoupled_weight_decay", False, check_bool),
            Option("amsgrad", False, check_bool),
        ),
        line_search="fixed",
        lr=1e-3,
        preconditioned=False,
    )
)


def _network(objective: Any, method: str) -> Any:
    """The network of a ModelObjective (None for an objective known by its size alone);
    a clear error for any other objective, since ``method`` works on the network's layers."""
    if not isinstance(objective, Objective):
        return None
    model = getattr(objective, "model", None)
    if model is None:
        raise ValueError(
            f"method={method!r} needs a ModelObjective (a network and its data), got "
            f"{type(objective).__name__}"
        )
    return model


def _needs_network(objective: Any, momentum: float) -> None:
    """Muon needs the network's weight matrices: a ModelObjective."""
    _network(objective, "muon")


register(
    MethodEntry(
        "muon",
        "Muon (+ AdamW)",
        lambda o: Muon(
            o["momentum"],
            o["nesterov"],
            o["weight_decay"],
            o["ns_steps"],
            o["adamw_lr"],
            o["adamw_weight_decay"],
        ),
        (
            Option("momentum", 0.95, below(1.0), requires=_needs_network),
            Option("nesterov", True, check_bool),
            Option("weight_decay", 0.1, _nonnegative),
            Option("ns_steps", 5, check_positive_int),
            Option("adamw_lr", 1e-3, check_positive),
            Option("adamw_weight_decay", 0.01, _nonnegative),
        ),
        line_search="fixed",
        lr=1e-3,
        preconditioned=False,
    )
)


def _needs_layers(objective: Any, kind: str) -> None:
    """K-FAC factors the Linear and Conv2d layers of a ModelObjective's network."""
    model = _network(objective, "kfac")
    if model is None:
        return
    layers, _ = kfac_layers(model, purpose="method='kfac'")
    check_factors_fit(layers, objective.dtype, objective.device)


register(
    MethodEntry(
        "kfac",
        "K-FAC",
        lambda o: KFAC(
            o["damping"],
            o["kind"],
            o["ema"],
            o["inv_every"],
            o["rescale"],
            o["seed"],
            momentum=o["momentum"],
            factor_samples=o["factor_samples"],
            adapt_damping=o["adapt_damping"],
            approximation=o["approximation"],
            ekfac=o["ekfac"],
        ),
        (
            Option("damping", 1e-3, check_positive),
            Option("kind", "exact", choice(KFAC_KINDS), requires=_needs_layers),
            Option("ema", 0.95, below(1.0)),
            Option("inv_every", 1, check_positive_int),
            Option("rescale", True, check_bool),
            Option("seed", 0, lambda a, v: check_positive_int(a, v, allow_zero=True)),
            Option("momentum", False, check_bool),
            Option("factor_samples", None, optional(check_positive_int)),
            Option("adapt_damping", 0, lambda a, v: check_positive_int(a, v, allow_zero=True)),
            Option("approximation", "expand", choice(KFAC_APPROXIMATIONS)),
            Option("ekfac", False, check_bool),
        ),
        line_search="armijo",
        preconditioned=False,
    )
)


def _fraction(arg: str, value: Any) -> float:
    """A number in [0, 1]."""
    value = check_positive(arg, value, allow_zero=True)
    if value > 1:
        raise ValueError(f"{arg} must lie in [0, 1], got {value}")
    return value


_GGN_FIRST = Option("curvature", "ggn", choice(CURVATURES), requires=_needs_ggn)
register(
    MethodEntry(
        "hessian-free",
        "Hessian-free",
        lambda o: HessianFree(
            o["curvature"], o["damping"], o["max_cg"], o["cg_tol"], o["warm_start"], o["backtrack"]
        ),
        (
            _GGN_FIRST,
            Option("damping", 1.0, _nonnegative),
            Option("max_cg", 250, check_positive_int),
            _CG_TOL,
            Option("warm_start", 0.95, _fraction),
            Option("backtrack", True, check_bool),
        ),
        line_search="armijo",
    )
)
register(
    MethodEntry(
        "sqn",
        "SQN",
        lambda o: SQN(o["memory"], o["pair_every"], o["curvature"], o["decay"]),
        (
            Option("memory", 10, check_positive_int),
            Option("pair_every", 10, check_positive_int),
            _GGN_FIRST,
            Option("decay", 0.0, _nonnegative),
        ),
        line_search="fixed",
        lr=0.1,
        preconditioned=False,
    )
)

# -- snapshots of the built-in methods (for tables and the experiment specs) ------------------
METHODS = tuple(REGISTRY)
#: the step rule each method uses unless ``line_search=`` says otherwise
DEFAULT_LINE_SEARCH: dict[str, str | None] = {n: e.line_search for n, e in REGISTRY.items()}
METHOD_OPTIONS: dict[str, set[str]] = {n: set(e.option_names) for n, e in REGISTRY.items()}
ALL_OPTIONS = all_options()

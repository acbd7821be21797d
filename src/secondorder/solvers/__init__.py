"""Solvers: direction rules × step rules, one ``minimize`` loop, one ``Result``.

>>> import torch
>>> from secondorder.objective import rosenbrock
>>> from secondorder.solvers import minimize
>>> res = minimize(rosenbrock(), torch.tensor([-1.2, 1.0], dtype=torch.float64), method="bfgs")
>>> res.success, [round(v, 6) for v in res.theta.tolist()]
(True, [1.0, 1.0])
"""

from secondorder.solvers.minimize import (
    DEFAULT_LINE_SEARCH,
    METHODS,
    OptionError,
    minimize,
    validate_options,
)
from secondorder.solvers.protocol import Direction, Iterate
from secondorder.solvers.registry import MethodEntry, Option, register, unregister
from secondorder.solvers.result import STATUSES, Result, StopRules, Trace, default_gtol

__all__ = [
    "DEFAULT_LINE_SEARCH",
    "METHODS",
    "STATUSES",
    "Direction",
    "Iterate",
    "MethodEntry",
    "Option",
    "OptionError",
    "Result",
    "StopRules",
    "Trace",
    "default_gtol",
    "minimize",
    "register",
    "unregister",
    "validate_options",
]

"""secondorder: second-order optimisation and exact curvature for neural networks in PyTorch."""

# the subpackages users reach as attributes (``import secondorder as so; so.optim``)
from secondorder import curvature, data, diagnostics, optim, scipy_bridge, solvers  # noqa: F401
from secondorder.losses import get_loss
from secondorder.models import logistic_regression, mlp
from secondorder.objective import FunctionObjective, ModelObjective, Objective
from secondorder.solvers import OptionError, Result, Trace, minimize

__version__ = "0.1.0"

__all__ = [
    "FunctionObjective",
    "ModelObjective",
    "Objective",
    "OptionError",
    "Result",
    "Trace",
    "__version__",
    "get_loss",
    "logistic_regression",
    "minimize",
    "mlp",
]

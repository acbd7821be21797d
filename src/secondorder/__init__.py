"""secondorder: second-order optimisation and exact curvature for neural networks in PyTorch."""

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

"""What a spec may contain: the tables of keys (TOP, DATA, MODEL, SAMPLER, SOLVER, REPORT,
PART, SUITE_TOP) and their choice lists.

Choice lists that name things another module owns (samplers, losses, activations,
initialisations, line searches) are read from that module, so a new sampler or loss is
accepted by the spec as soon as it exists.
"""

from __future__ import annotations

from secondorder.experiments.functions import FUNCTIONS
from secondorder.experiments.metrics import EXTRA_METRICS
from secondorder.experiments.schema import F
from secondorder.losses import LOSSES as _LOSS_CLASSES
from secondorder.models import ACTIVATIONS as _ACTIVATION_CLASSES
from secondorder.models import INITIALISATIONS
from secondorder.sampling import SAMPLERS
from secondorder.solvers.minimize import LINE_SEARCHES as _SOLVER_LINE_SEARCHES

__all__ = [
    "ACTIVATIONS",
    "DATA",
    "DATA_COMMON",
    "DATA_KINDS",
    "DEFAULT_METRICS",
    "DTYPES",
    "FUNCTION_KINDS",
    "INITS",
    "L2_CONVENTIONS",
    "LINE_SEARCHES",
    "LOSSES",
    "METRICS",
    "MODEL",
    "MODEL_COMMON",
    "MODEL_KINDS",
    "NOT_PROBLEM_KEYS",
    "PART",
    "PROBLEM_KEYS",
    "REPORT",
    "SAMPLER",
    "SAMPLER_COMMON",
    "SAMPLER_KINDS",
    "SOLVER",
    "SUITE_TOP",
    "TOP",
]

#: line searches a spec names: the solvers' own, with "none" for the fixed step (the solvers
#: call it "fixed"; the runner passes line_search=None)
LINE_SEARCHES = ("none", *(ls for ls in _SOLVER_LINE_SEARCHES if ls != "fixed"))
#: what the runner can record besides the solver's own columns
METRICS = (
    "train_loss",
    "train_accuracy",
    "dev_accuracy",
    "test_accuracy",
    "dev_loss",
    "test_loss",
    "grad_norm",
    *EXTRA_METRICS,
)
#: the bundled studies whose reports secondorder.report.studies writes
STUDIES = ("train-dev", "depth", "preconditioning", "minibatch", "xu-criteria")
DTYPES = ("float32", "float64")
#: test functions (no data): secondorder.experiments.functions
FUNCTION_KINDS = tuple(FUNCTIONS)
DATA_KINDS = (*FUNCTION_KINDS, "two-class-2d", "fashion-mnist", "random")
MODEL_KINDS = ("logistic", "mlp", "cnn")
SAMPLER_KINDS = tuple(SAMPLERS)
LOSSES = tuple(_LOSS_CLASSES)
ACTIVATIONS = tuple(_ACTIVATION_CLASSES)
INITS = INITIALISATIONS
L2_CONVENTIONS = ("plain", "per-sample")
#: the keys of a spec that define the problem its solvers minimise — the objective (data, model,
#: loss, L2 term, the sampler's batches) and its start (the model's initialisation and seed);
#: the solvers, their budgets, the dtype and what is recorded do not. A table's keys count one
#: by one ("sampler.batch_size").
PROBLEM_KEYS = (
    "data",
    "model",
    "loss",
    "l2",
    "l2_convention",
    "l2_m",
    "regularize_bias",
    "sampler",
)
#: keys under those that say only where and how the data are found
NOT_PROBLEM_KEYS = ("data.root", "data.download")


TOP: dict[str, F] = {
    "name": F("str", doc="a short name (used in the run directory's name)"),
    "description": F("str", "", doc="one line shown by `secondorder list`"),
    "max_iter": F("int", 100, minimum=0, doc="iterations per solver"),
    "metrics": F("list[str]", choices=METRICS, doc="what to record besides the solver's columns"),
    "metrics_every": F("int", 1, minimum=1, doc="record metrics every this many iterations"),
    "seeds": F("list[int]", [0], doc="repeat the run with these seeds (offsets of model/sampler)"),
    "dtype": F("str", "float64", choices=DTYPES),
    "device": F("str", "cpu"),
    "threads": F("int", 0, minimum=0, doc="torch threads (0: torch's default)"),
    "checkpoint_every": F("int", 10, minimum=1, doc="iterations between checkpoints"),
    "loss": F("str", choices=LOSSES),
    "l2": F("float", 0.0, minimum=0.0, doc="λ of the L2 term"),
    "l2_convention": F(
        "str", "plain", choices=L2_CONVENTIONS, doc='"plain": λ/2‖W‖²; "per-sample": λ/(2m)‖W‖²'
    ),
    "l2_m": F("int", minimum=1, doc="m of the per-sample convention (default: training size)"),
    "regularize_bias": F("bool", False),
    "data": F("table", required=True),
    "model": F("table"),
    "sampler": F("table"),
    "curvature_sampler": F("table"),
    "solvers": F("list[any]", required=True),
    "sweep": F("table", {}),
    "quick": F("table", {}),
    "report": F("table", {}),
}

DATA_COMMON = {"kind": F("str", required=True, choices=DATA_KINDS)}
DATA: dict[str, dict[str, F]] = {
    **{kind: dict(fn.fields) for kind, fn in FUNCTIONS.items()},
    "two-class-2d": {
        "seed": F("int", 0, minimum=0),
        "n_train": F("int", 800, minimum=1),
        "n_test": F("int", 100, minimum=1),
    },
    "fashion-mnist": {
        "dev_size": F("int", 10000, minimum=0, doc="stratified dev split carved from train"),
        "split_seed": F("int", 0, minimum=0),
        "n_train": F("int", minimum=1, doc="keep a stratified subsample of this many"),
        "n_test": F("int", minimum=1),
        "subsample_seed": F("int", 0, minimum=0),
        "root": F("str", doc="directory of the four idx files"),
        "download": F("bool", True, doc="download when not found"),
        "pool": F("int", 1, minimum=1, doc="average the 28×28 images over k×k blocks (k | 28)"),
    },
    "random": {
        "n_train": F("int", 200, minimum=1),
        "n_test": F("int", 100, minimum=1),
        "n_features": F("int", 20, minimum=1),
        "n_classes": F("int", 3, minimum=2),
        "seed": F("int", 0, minimum=0),
    },
}
MODEL_COMMON = {"kind": F("str", required=True, choices=MODEL_KINDS)}
MODEL: dict[str, dict[str, F]] = {
    "logistic": {"bias": F("bool", True), "seed": F("int", minimum=0)},
    "mlp": {
        "widths": F("list[int]", minimum=1, doc="all widths, input to output"),
        "hidden": F("list[int]", minimum=1, doc="hidden widths (input/output from the data)"),
        "activation": F("str", "sigmoid", choices=ACTIVATIONS),
        "init": F("str", "torch", choices=INITS),
        "seed": F("int", 0, minimum=0),
    },
    "cnn": {
        "channels": F("list[int]", [16, 32], minimum=1, doc="3×3 conv (ReLU, 2×2 max-pool) widths"),
        "image": F("list[int]", [1, 28, 28], minimum=1, doc="(channels, height, width) of a row"),
        "seed": F("int", 0, minimum=0),
    },
}
SAMPLER_COMMON = {"kind": F("str", "full", choices=SAMPLER_KINDS)}
SAMPLER: dict[str, dict[str, F]] = {
    "full": {},
    "fixed": {
        "batch_size": F("int", required=True, minimum=1),
        "n_batches": F("int", minimum=1),
        "seed": F("int", 0, minimum=0),
    },
    "reshuffled": {
        "batch_size": F("int", required=True, minimum=1),
        "n_batches": F("int", minimum=1),
        "seed": F("int", 0, minimum=0),
        "every": F("str", "iteration", choices=("iteration", "evaluation")),
    },
    "epoch": {
        "batch_size": F("int", required=True, minimum=1),
        "seed": F("int", 0, minimum=0),
    },
    "subsample": {"size": F("int", required=True, minimum=1), "seed": F("int", 0, minimum=0)},
}
SOLVER: dict[str, F] = {
    "name": F("str", doc="label in traces and reports (default: the method)"),
    "method": F("str", required=True),
    "line_search": F("str", choices=LINE_SEARCHES),
    "max_iter": F("int", minimum=0, doc="overrides the spec's max_iter"),
    "gtol": F("float", minimum=0.0),
    "ftol": F("float", minimum=0.0),
    "max_evals": F("int", minimum=1),
    "max_time": F("float", minimum=0.0, exclusive_min=True),
    "options": F("table", {}),
    "paper_row": F("str", doc="the seed's row this solver is compared with"),
}
REPORT: dict[str, F] = {
    "epsilon": F("float", 1e-6, minimum=0.0, exclusive_min=True, doc="ε of eq. 29"),
    "log_y": F("bool", True),
    "paper": F(
        "list[str]", [], doc="the seed's tables this spec reproduces (secondorder.report.paper)"
    ),
    "f_star": F("float", doc="the known minimum (f − f* plots)"),
    "title": F("str"),
    "study": F("str", choices=STUDIES, doc="the study whose sections the report adds"),
}
PART: dict[str, F] = {
    "name": F("str", doc="subdirectory name (default: the spec's name)"),
    "spec": F("str", required=True),
    "quick": F("bool", False),
    "set": F("table", {}),
}
SUITE_TOP: dict[str, F] = {
    "name": F("str"),
    "description": F("str", ""),
    "parts": F("list[any]", required=True),
    "quick": F("table", {}),
    "report": F("table", {}),
}

DEFAULT_METRICS = {
    **{kind: ["train_loss"] for kind in FUNCTIONS},
    "two-class-2d": ["train_loss", "train_accuracy", "test_accuracy"],
    "fashion-mnist": ["train_loss", "train_accuracy", "dev_accuracy", "test_accuracy"],
    "random": ["train_loss", "train_accuracy", "test_accuracy"],
}

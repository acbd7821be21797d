"""Problems: what one cell's resolved spec asks to minimise, where to start, and what to measure.

:func:`build_problem` turns a spec dict into a :class:`Problem` — the objective (a plain
function such as Rosenbrock, eq. 6, optionally noisy; or a model's empirical risk with L2 term
and sampler, eq. 28), θ₀ and a metric function (full training loss, accuracy of eq. 30 on each
split, ‖∇L‖∞ of the full objective). :func:`make_model` and :func:`model_objective` are the
pieces the command line's ``gradtest`` and ``curvature`` share with it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from secondorder import distributed
from secondorder.data import from_arrays, load_fashion_mnist, stratified_split, two_class_2d
from secondorder.data.dataset import Dataset, Splits
from secondorder.experiments.functions import FUNCTIONS
from secondorder.experiments.metrics import EXTRA_METRICS
from secondorder.experiments.noisy import NoisyFunctionObjective
from secondorder.experiments.schema import SpecError
from secondorder.models import cnn, logistic_regression, mlp
from secondorder.objective import FunctionObjective, ModelObjective
from secondorder.sampling import FullBatch, make_sampler

__all__ = [
    "DTYPES",
    "DataCache",
    "Problem",
    "build_problem",
    "load_splits",
    "make_model",
    "model_objective",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Problem:
    """What one solver in one cell works on. ``noise`` is the generator of a noisy objective,
    saved with each checkpoint."""

    objective: Any
    theta0: torch.Tensor
    metrics: Callable[[torch.Tensor], dict[str, Any]]
    noise: torch.Generator | None = None
    kind: str = "model"


class DataCache:
    """Data sets loaded once per run, shared by every cell and solver that uses them."""

    def __init__(self) -> None:
        self._store: dict[str, Any] = {}

    def get(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._store:
            self._store[key] = make()
        return self._store[key]


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def _random_splits(data: dict[str, Any], dtype: torch.dtype) -> Splits:
    """Gaussian inputs labelled by a random linear teacher plus noise (arg max of the logits)."""
    g = torch.Generator().manual_seed(data["seed"])
    n = data["n_train"] + data["n_test"]
    X = torch.randn(n, data["n_features"], generator=g, dtype=torch.float64)
    teacher = torch.randn(data["n_features"], data["n_classes"], generator=g)
    logits = X @ teacher.double() + 0.5 * torch.randn(
        n, data["n_classes"], generator=g, dtype=torch.float64
    )
    y = logits.argmax(1)
    ds = from_arrays(X, y, n_classes=data["n_classes"], dtype=dtype, name="random")
    ntr = data["n_train"]
    return Splits(ds.subset(slice(0, ntr)), None, ds.subset(slice(ntr, n)))


def _fashion_mnist_splits(data: dict[str, Any], dtype: torch.dtype) -> Splits:
    splits = load_fashion_mnist(
        data.get("root"),
        dev_size=data["dev_size"],
        seed=data["split_seed"],
        download=data["download"],
        dtype=dtype,
    )
    train, dev, test = splits.train, splits.dev, splits.test
    if data.get("n_train") and data["n_train"] < len(train):
        _, train = stratified_split(train, data["n_train"], seed=data["subsample_seed"])
    if data.get("n_test") and data["n_test"] < len(test):
        _, test = stratified_split(test, data["n_test"], seed=data["subsample_seed"])
    k = data.get("pool", 1)
    if k > 1:
        train, test = _pooled(train, k), _pooled(test, k)
        dev = None if dev is None else _pooled(dev, k)
    return Splits(train, dev, test)


def _pooled(ds: Dataset, k: int) -> Dataset:
    """28×28 images averaged over k×k blocks: (28/k)² features (a smaller network input)."""
    X = torch.nn.functional.avg_pool2d(ds.X.reshape(-1, 1, 28, 28), k)
    return Dataset(X.reshape(len(ds), -1), ds.y, ds.n_classes, ds.name)


def _load_data(spec: dict[str, Any], cache: DataCache) -> Splits:
    data = spec["data"]
    dtype = DTYPES[spec["dtype"]]
    key = json.dumps([data, spec["dtype"]], sort_keys=True)

    def make() -> Splits:
        kind = data["kind"]
        if kind == "two-class-2d":
            return two_class_2d(
                n_train=data["n_train"], n_val=data["n_test"], seed=data["seed"], dtype=dtype
            )
        if kind == "random":
            return _random_splits(data, dtype)
        if kind == "fashion-mnist":
            return _fashion_mnist_splits(data, dtype)
        raise AssertionError(kind)

    return cache.get(key, make)


def load_splits(spec: dict[str, Any], cache: DataCache | None = None) -> Splits:
    """The train, dev and test data of one cell's resolved spec: what its runs fit and measure
    (a report that needs the images themselves reads them through this)."""
    return _load_data(spec, cache or DataCache())


# ----------------------------------------------------------------------------------------------
# Models and objectives
# ----------------------------------------------------------------------------------------------
def make_model(
    model: dict[str, Any], widths: list[int] | None, n_features: int, dtype: torch.dtype
) -> nn.Module:
    """The network of a ``[model]`` table: logistic regression, or an MLP with these widths
    (input to output; the caller has checked them against the data)."""
    if model["kind"] == "logistic":
        return logistic_regression(
            n_features, bias=model.get("bias", True), seed=model.get("seed"), dtype=dtype
        )
    if model["kind"] == "cnn":
        return cnn(
            model["channels"],
            widths[-1],
            image=tuple(model["image"]),
            seed=model["seed"],
            dtype=dtype,
        )
    return mlp(
        widths,
        model["activation"],
        init=model.get("init", "torch"),
        seed=model["seed"],
        dtype=dtype,
    )


def model_objective(model: nn.Module, loss: str, train: Any, **options: Any) -> ModelObjective:
    """The empirical risk of ``model`` on ``train`` (a Dataset or ``(X, y)``) with its L2 term
    and samplers: ``options`` are :class:`~secondorder.objective.ModelObjective`'s."""
    return ModelObjective(model, loss, train, **options)


def _spec_model(spec: dict[str, Any], n_features: int, n_classes: int) -> nn.Module:
    m = spec["model"]
    widths = None
    if m["kind"] == "cnn":
        pixels = math.prod(m["image"])
        if pixels != n_features:
            raise SpecError(
                f"model.image: {m['image']} holds {pixels} pixels, the data rows {n_features}"
            )
        widths = [n_features, 1 if spec["loss"] == "logistic" else n_classes]
    elif m["kind"] != "logistic":
        out = 1 if spec["loss"] == "logistic" else n_classes
        widths = m.get("widths") or [n_features, *m["hidden"], out]
        if widths[0] != n_features or widths[-1] != out:
            raise SpecError(
                f"model.widths: must start with the input width {n_features} and end with "
                f"{out} outputs, got {widths}"
            )
    return make_model(m, widths, n_features, DTYPES[spec["dtype"]])


def _sampler(table: dict[str, Any] | None, m: int):
    if not table:
        return None
    opts = {k: v for k, v in table.items() if k != "kind"}
    try:
        return make_sampler(table["kind"], m, **opts)
    except (ValueError, TypeError) as err:
        raise SpecError(f"sampler: {err}") from None


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------
def _function_problem(spec: dict[str, Any]) -> Problem:
    """A test function of :mod:`.functions` (Rosenbrock, eq. 6; the strict saddle), with
    N(0, σ²) noise on f and ∇f when ``data.noise`` > 0."""
    dtype = DTYPES[spec["dtype"]]
    device = torch.device(spec["device"])
    data = spec["data"]
    fn, x0 = FUNCTIONS[data["kind"]].build(data)
    n = len(x0)
    if data["noise"] > 0:
        obj = NoisyFunctionObjective(
            fn, n, sigma=data["noise"], seed=data["noise_seed"], dtype=dtype, device=device
        )
        noise = obj.generator
    else:
        obj, noise = FunctionObjective(fn, n, dtype=dtype, device=device), None
    theta0 = torch.tensor(x0, dtype=dtype, device=device)
    record_x = n <= 10
    wanted = tuple(spec["metrics"])

    def metrics(theta: torch.Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "train_loss" in wanted:
            with torch.no_grad():
                out["train_loss"] = float(fn(theta))
        if record_x:
            out["x"] = [float(v) for v in theta.detach().cpu()]
        return out

    return Problem(obj, theta0, metrics, noise, kind="function")


def _model_metrics(spec: dict[str, Any], obj: ModelObjective, splits: Splits, full_obj):
    """Full training loss, accuracy (eq. 30) and loss per split, and ‖∇L‖∞ of the full-batch
    objective when the solver's own is sampled."""
    wanted = tuple(spec["metrics"])
    extras = [name for name in wanted if name in EXTRA_METRICS]
    split_data = {
        "train": (splits.train.X, splits.train.y),
        "dev": None if splits.dev is None else (splits.dev.X, splits.dev.y),
        "test": None if splits.test is None else (splits.test.X, splits.test.y),
    }

    def reg(theta: torch.Tensor) -> float:
        c = obj.l2_coefficient
        return 0.5 * c * float((obj.l2_mask * theta * theta).sum()) if c else 0.0

    def metrics(theta: torch.Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "train_loss" in wanted:
            out["train_loss"] = obj.full_loss(theta)
        for split in ("train", "dev", "test"):
            d = split_data[split]
            if d is None:
                continue
            if f"{split}_accuracy" in wanted:
                out[f"{split}_accuracy"] = obj.accuracy(theta, *d)
            if split != "train" and f"{split}_loss" in wanted:
                out[f"{split}_loss"] = obj.full_loss(theta, *d) - reg(theta)
        if full_obj is not None:
            _, g = full_obj.value_and_grad(theta)
            out["train_grad_norm"] = float(g.abs().max())
        for name in extras:
            out.update(EXTRA_METRICS[name](obj, theta, splits))
        return out

    return metrics


def _model_problem(spec: dict[str, Any], cache: DataCache) -> Problem:
    splits = _load_data(spec, cache)
    train = splits.train
    model = _spec_model(spec, train.n_features, train.n_classes or 2)
    common = dict(
        l2=spec["l2"],
        l2_convention=spec["l2_convention"],
        l2_m=spec.get("l2_m"),
        regularize_bias=spec["regularize_bias"],
        dtype=DTYPES[spec["dtype"]],
        device=distributed.local_device(spec["device"]),  # cuda → this process's GPU
    )
    obj = model_objective(
        model,
        spec["loss"],
        train,
        sampler=_sampler(spec.get("sampler"), len(train)),
        curvature_sampler=_sampler(spec.get("curvature_sampler"), len(train)),
        **common,
    )
    obj = distributed.from_environment(obj)  # data-parallel under torchrun
    full_obj = None
    if "grad_norm" in spec["metrics"] and not isinstance(obj.sampler, FullBatch):
        full_obj = model_objective(model, spec["loss"], train, **common)
    metrics = _model_metrics(spec, obj, splits, full_obj)
    return Problem(obj, obj.initial_theta(), metrics, None, kind="model")


def build_problem(spec: dict[str, Any], cache: DataCache | None = None) -> Problem:
    """The objective, θ₀ and the metric function of one cell's resolved spec."""
    if spec["data"]["kind"] in FUNCTIONS:
        return _function_problem(spec)
    return _model_problem(spec, cache or DataCache())

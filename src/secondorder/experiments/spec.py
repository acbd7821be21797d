"""Experiment specs: TOML files (or bundled names) that describe a run, validated up front.

A spec names the problem (``[data]``, ``[model]``, ``loss``, ``l2``, ``[sampler]``), the solvers
(``[[solvers]]``), the budget (``max_iter``), what to record (``metrics``, ``metrics_every``),
repeats (``seeds``) and an optional ``[sweep]`` grid. Every key is checked before any training
starts: an unknown key is reported with its path and the closest valid key
(``solvers[1].metod: unknown key; did you mean 'method'?``), a wrong type with the type expected.

A minimal spec::

    name = "logistic-2d"
    max_iter = 50
    [data]
    kind = "two-class-2d"
    [model]
    kind = "logistic"
    [[solvers]]
    name = "Newton"
    method = "newton"
    line_search = "wolfe"

Sweeps. ``[sweep]`` maps a dotted key to a list of values; the run is repeated for every point
of the Cartesian grid (each in its own subdirectory)::

    [sweep]
    "sampler.batch_size" = [10, 50, 100]
    l2_convention = ["per-sample", "plain"]
    "model.hidden" = [[300], [300, 100]]
    "solvers.options.memory" = [5, 20]      # every solver ...
    "solvers[L-BFGS].options.memory" = [5]  # ... or one, by name or by index

``solvers.options.K`` sets option K on every solver that already lists K in its options, or on
all solvers when none does.

Suites. A spec with ``[[parts]]`` (each ``spec = "paper/..."``, optional ``quick = true`` and a
``set`` table of dotted overrides) runs several specs into one run directory.

``[quick]`` holds dotted overrides applied by ``secondorder run --quick`` (and ``only_solvers``,
a list of solver names to keep).
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from secondorder._validation import closest
from secondorder.models import INITIALISATIONS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = [
    "METHODS",
    "METRICS",
    "SCIPY_METHODS",
    "Cell",
    "Spec",
    "SpecError",
    "apply_override",
    "bundled_specs",
    "check_data_available",
    "check_run_dir",
    "load_spec",
    "parse_override",
    "resolve_spec_path",
    "slugify",
    "spec_from_dict",
    "to_toml",
]

#: our methods, as accepted by ``secondorder.solvers.minimize``
METHODS = ("gd", "newton", "newton-cg", "nlcg", "bfgs", "lbfgs", "trust-ncg", "arc")
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
LINE_SEARCHES = ("none", "armijo", "wolfe")
#: what the runner can record besides the solver's own columns
METRICS = (
    "train_loss",
    "train_accuracy",
    "dev_accuracy",
    "test_accuracy",
    "dev_loss",
    "test_loss",
    "grad_norm",
)
DTYPES = ("float32", "float64")
DATA_KINDS = ("rosenbrock", "two-class-2d", "fashion-mnist", "random")
MODEL_KINDS = ("logistic", "mlp")
SAMPLER_KINDS = ("full", "fixed", "reshuffled", "subsample")
LOSSES = ("cross_entropy", "logistic", "mse")
ACTIVATIONS = ("sigmoid", "tanh", "relu", "softplus", "identity")
INITS = INITIALISATIONS
L2_CONVENTIONS = ("plain", "per-sample")


class SpecError(ValueError):
    """A spec is invalid; ``errors`` lists every problem found (each names its key path)."""

    def __init__(self, errors: list[str] | str, source: str = "") -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.errors) == 1:
            text = f"invalid spec {where}{self.errors[0]}"
        else:
            text = f"invalid spec {where}{len(self.errors)} problems:\n  " + "\n  ".join(
                self.errors
            )
        super().__init__(text)


# ----------------------------------------------------------------------------------------------
# A small declarative schema
# ----------------------------------------------------------------------------------------------
_MISSING = object()


@dataclass
class F:
    """One key of a table: its type, default and constraints."""

    type: str  # str int float bool list[str] list[int] list[float] list[any] table any
    default: Any = _MISSING
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    exclusive_min: bool = False
    doc: str = ""
    required: bool = False


_TYPE_NAMES = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "list[str]": "a list of strings",
    "list[int]": "a list of integers",
    "list[float]": "a list of numbers",
    "list[any]": "a list",
    "table": "a table",
    "any": "a value",
}


def _fmt_path(path: str, key: str) -> str:
    k = key if re.fullmatch(r"[A-Za-z0-9_\-]+", key) else f'"{key}"'
    return f"{path}.{k}" if path else k


def _type_ok(value: Any, t: str) -> bool:
    if t == "any":
        return True
    if t == "str":
        return isinstance(value, str)
    if t == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "bool":
        return isinstance(value, bool)
    if t == "table":
        return isinstance(value, dict)
    if t.startswith("list["):
        if not isinstance(value, list):
            return False
        return all(_type_ok(v, t[5:-1]) for v in value)
    raise AssertionError(t)


def _check_value(value: Any, f: F, where: str, errors: list[str]) -> Any:
    if not _type_ok(value, f.type):
        got = type(value).__name__
        if isinstance(value, dict):
            got = "a table"
        elif isinstance(value, list):
            got = "a list" if not f.type.startswith("list[") else "a list with other items"
        errors.append(f"{where}: expected {_TYPE_NAMES[f.type]}, got {got} ({value!r})")
        return value
    if f.type == "float":
        value = float(value)
        if not math.isfinite(value):
            errors.append(f"{where}: expected a finite number, got {value!r}")
    if f.type == "list[float]":
        value = [float(v) for v in value]
    if f.choices is not None:
        items = value if f.type.startswith("list[") else [value]
        for v in items:
            if v not in f.choices:
                errors.append(
                    f"{where}: {v!r} is not one of {list(f.choices)}{closest(str(v), f.choices)}"
                )
    if f.minimum is not None:
        items = value if f.type.startswith("list[") else [value]
        for v in items:
            if isinstance(v, (int, float)) and (
                v < f.minimum or (f.exclusive_min and v == f.minimum)
            ):
                op = ">" if f.exclusive_min else ">="
                errors.append(f"{where}: must be {op} {f.minimum:g}, got {v!r}")
    return value


def _check_table(
    table: Any,
    schema: dict[str, F],
    path: str,
    errors: list[str],
    *,
    other_keys: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Validate ``table`` against ``schema``; fill defaults; report unknown keys with hints.

    ``other_keys`` maps keys valid elsewhere (e.g. for another ``kind``) to a note."""
    if not isinstance(table, dict):
        errors.append(f"{path or 'spec'}: expected a table, got {type(table).__name__}")
        return {}
    out: dict[str, Any] = {}
    for key, value in table.items():
        where = _fmt_path(path, key)
        if key not in schema:
            if other_keys and key in other_keys:
                errors.append(f"{where}: {other_keys[key]}")
            else:
                errors.append(f"{where}: unknown key{_did_you_mean(key, schema)}")
            continue
        out[key] = _check_value(value, schema[key], where, errors)
    for key, f in schema.items():
        if key in out:
            continue
        if f.required:
            errors.append(f"{_fmt_path(path, key)}: missing (required)")
        elif f.default is not _MISSING:
            out[key] = copy.deepcopy(f.default)
    return out


def _did_you_mean(key: str, choices) -> str:
    hint = closest(key, list(choices))
    return f"; did you mean {hint[len(' (did you mean ') : -2]}?" if hint else ""


# -- the tables --------------------------------------------------------------------------------
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
    "rosenbrock": {
        "a": F("float", 1.0),
        "b": F("float", 100.0),
        "x0": F("list[float]", [-1.2, 1.0]),
        "noise": F("float", 0.0, minimum=0.0, doc="std of Gaussian noise added to f and to g"),
        "noise_seed": F("int", 0),
    },
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
    "paper": F("list[str]", [], doc="the seed's tables this spec reproduces (see paper.py)"),
    "f_star": F("float", doc="the known minimum (f − f* plots)"),
    "title": F("str"),
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

_DEFAULT_METRICS = {
    "rosenbrock": ["train_loss"],
    "two-class-2d": ["train_loss", "train_accuracy", "test_accuracy"],
    "fashion-mnist": ["train_loss", "train_accuracy", "dev_accuracy", "test_accuracy"],
    "random": ["train_loss", "train_accuracy", "test_accuracy"],
}


def _kind_table(
    value: Any,
    common: dict[str, F],
    by_kind: dict[str, dict[str, F]],
    path: str,
    errors: list[str],
    default_kind: str | None = None,
) -> dict[str, Any]:
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a table, got {type(value).__name__}")
        return {}
    kind = value.get("kind", default_kind)
    if kind is None:
        errors.append(f"{path}.kind: missing (required): one of {list(by_kind)}")
        return {}
    if kind not in by_kind:
        _check_value(kind, common["kind"], f"{path}.kind", errors)
        return {"kind": kind}
    schema = {**common, **by_kind[kind]}
    others = {}
    for other, sch in by_kind.items():
        for k in sch:
            if k not in schema and k not in others:
                others[k] = f"not used by kind {kind!r} (it belongs to kind {other!r})"
    return _check_table(value, schema, path, errors, other_keys=others)


def _method_ok(method: str, where: str, errors: list[str]) -> None:
    if method.startswith("scipy:"):
        name = method[6:]
        lower = {m.lower(): m for m in SCIPY_METHODS}
        if name.lower() not in lower:
            errors.append(
                f"{where}: {method!r}: scipy method {name!r} is not one of "
                f"{list(SCIPY_METHODS)}{closest(name, SCIPY_METHODS)}"
            )
        return
    methods = _our_methods()
    if method not in methods:
        errors.append(
            f"{where}: {method!r} is not one of {list(methods)} (or 'scipy:<name>')"
            f"{closest(method, methods)}"
        )


def _our_methods() -> tuple[str, ...]:
    try:
        from secondorder import solvers

        names = getattr(solvers, "METHODS", None)
        if names:
            return tuple(names)
    except ImportError:
        pass
    return METHODS


def slugify(text: str) -> str:
    """A file-name-safe version of a label: ``"Newton (LS)"`` → ``"newton-ls"``."""
    s = re.sub(r"[^A-Za-z0-9.=+_-]+", "-", str(text)).strip("-").lower()
    return s or "x"


def _validate(raw: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    """Validate one (non-suite) spec; return it with every default filled in."""
    spec = _check_table(raw, TOP, "", errors)
    data = _kind_table(spec.get("data", {}), DATA_COMMON, DATA, "data", errors)
    spec["data"] = data
    kind = data.get("kind")
    problem_is_function = kind == "rosenbrock"
    if problem_is_function:
        for key in ("model", "sampler", "curvature_sampler", "loss", "l2_m"):
            if key in spec:
                errors.append(f"{key}: not used with data.kind = 'rosenbrock' (a plain function)")
        if "x0" in data and len(data["x0"]) < 2:
            errors.append("data.x0: needs at least 2 coordinates")
    else:
        if "model" not in spec:
            errors.append(f"model: missing (required for data.kind = {kind!r})")
            spec["model"] = {}
        else:
            spec["model"] = _kind_table(spec["model"], MODEL_COMMON, MODEL, "model", errors)
        model = spec["model"]
        if model.get("kind") == "mlp" and ("widths" in model) == ("hidden" in model):
            errors.append("model: give exactly one of 'widths' and 'hidden'")
        if model.get("kind") == "logistic" and kind in ("fashion-mnist", "random"):
            n_cls = 10 if kind == "fashion-mnist" else data.get("n_classes", 3)
            if n_cls != 2:
                errors.append(
                    f"model.kind: 'logistic' needs two classes, but data.kind = {kind!r} has "
                    f"{n_cls}"
                )
        if "loss" not in spec:
            spec["loss"] = "logistic" if model.get("kind") == "logistic" else "cross_entropy"
        spec["sampler"] = _kind_table(
            spec.get("sampler", {}), SAMPLER_COMMON, SAMPLER, "sampler", errors, "full"
        )
        if "curvature_sampler" in spec:
            spec["curvature_sampler"] = _kind_table(
                spec["curvature_sampler"], SAMPLER_COMMON, SAMPLER, "curvature_sampler", errors
            )
        if kind == "fashion-mnist":
            n_tr = 60000 - data.get("dev_size", 0)
            if data.get("dev_size", 0) >= 60000:
                errors.append("data.dev_size: must be below 60000 (the training images)")
            if data.get("n_train") is not None and data["n_train"] > n_tr:
                errors.append(
                    f"data.n_train: {data['n_train']} is more than the {n_tr} training images "
                    "left after the dev split"
                )
    if "metrics" not in spec and kind in _DEFAULT_METRICS:
        metrics = list(_DEFAULT_METRICS[kind])
        if kind == "fashion-mnist" and not data.get("dev_size"):
            metrics.remove("dev_accuracy")
        spec["metrics"] = metrics
    has_dev = kind == "fashion-mnist" and data.get("dev_size", 0) > 0
    for mname in spec.get("metrics", []):
        if problem_is_function and mname not in ("train_loss", "grad_norm"):
            errors.append(f"metrics: {mname!r} needs data (data.kind = 'rosenbrock' has none)")
        elif mname.startswith("dev_") and not has_dev and kind is not None:
            errors.append(f"metrics: {mname!r} needs a dev split (data.dev_size > 0)")
    if len(spec.get("seeds", [0])) == 0:
        errors.append("seeds: needs at least one seed")
    if len(set(spec.get("seeds", []))) != len(spec.get("seeds", [])):
        errors.append("seeds: repeated seed")
    spec["report"] = _check_table(spec.get("report", {}), REPORT, "report", errors)
    _validate_solvers(spec, errors)
    _validate_device(spec, errors)
    return spec


def _validate_device(spec: dict[str, Any], errors: list[str]) -> None:
    device = spec.get("device", "cpu")
    if not isinstance(device, str):
        return
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        errors.append(f"device: {device!r} is not 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            errors.append(f"device: {device!r} requested but CUDA is not available here")


def _validate_solvers(spec: dict[str, Any], errors: list[str]) -> None:
    solvers = spec.get("solvers")
    if not isinstance(solvers, list):
        return
    if not solvers:
        errors.append("solvers: needs at least one [[solvers]] table")
    out = []
    slugs: dict[str, str] = {}
    for i, s in enumerate(solvers):
        where = f"solvers[{i}]"
        s = _check_table(s, SOLVER, where, errors)
        if "method" in s and isinstance(s["method"], str):
            _method_ok(s["method"], f"{where}.method", errors)
            s.setdefault("name", s["method"])
        name = s.get("name", f"solver{i}")
        slug = slugify(name)
        if slug in slugs:
            errors.append(
                f"{where}.name: {name!r} clashes with {slugs[slug]!r} (names must differ as "
                "file names)"
            )
        slugs[slug] = name
        if isinstance(s.get("method"), str) and s["method"].startswith("scipy:"):
            for key in ("line_search", "gtol", "ftol", "max_evals", "max_time"):
                if key in s:
                    errors.append(
                        f"{where}.{key}: not used by scipy methods (give scipy's own options "
                        "in options, e.g. options = { gtol = 1e-6 })"
                    )
            for key in ("maxiter", "callback"):
                if key in (s.get("options") or {}):
                    errors.append(
                        f"{where}.options.{key}: set by the runner (use the solver's max_iter)"
                    )
        elif isinstance(s.get("method"), str) and isinstance(s.get("options"), dict):
            _check_option_names(s["method"], s["options"], f"{where}.options", errors)
        out.append(s)
    spec["solvers"] = out


def _check_option_names(method: str, options: dict, where: str, errors: list[str]) -> None:
    """Option names against the solvers' own tables (when the solvers package provides them);
    values are checked later, against the real objective, before any training."""
    import importlib

    try:
        mod = importlib.import_module("secondorder.solvers.minimize")
    except ImportError:
        return
    per_method = getattr(mod, "METHOD_OPTIONS", None)
    if not per_method or method not in per_method:
        return
    reserved = {"callback", "initial_state", "max_iter"}
    allowed = set(getattr(mod, "COMMON_OPTIONS", set())) | set(per_method[method])
    if method != "newton":
        allowed |= set(getattr(mod, "PRECONDITIONER_OPTIONS", set()))
    if method not in ("trust-ncg", "arc"):
        allowed |= set(getattr(mod, "LINE_SEARCH_OPTIONS", set()))
    every = set(getattr(mod, "ALL_OPTIONS", allowed))
    for name in options:
        if name in reserved:
            errors.append(
                f"{_fmt_path(where, name)}: set by the runner (use the solver's max_iter key)"
            )
        elif name not in every:
            errors.append(f"{_fmt_path(where, name)}: unknown option{_did_you_mean(name, every)}")
        elif name not in allowed:
            owners = [m for m, opts in per_method.items() if name in opts]
            why = f" (it is an option of {', '.join(owners)})" if owners else ""
            errors.append(f"{_fmt_path(where, name)}: does not apply to method {method!r}{why}")


# ----------------------------------------------------------------------------------------------
# Dotted overrides (sweeps, --set, quick)
# ----------------------------------------------------------------------------------------------
_SOLVER_SELECTOR = re.compile(r"^solvers(?:\[([^\]]+)\])?$")


def _split_key(key: str) -> list[str]:
    """``'solvers[L-BFGS].options.memory'`` → ``['solvers[L-BFGS]', 'options', 'memory']``;
    dots inside brackets are kept."""
    parts, depth, cur = [], 0, ""
    for ch in key:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "." and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    if any(not p for p in parts):
        raise SpecError(f"{key!r}: not a dotted key such as 'sampler.batch_size'")
    return parts


def _set_path(table: dict[str, Any], parts: list[str], value: Any, key: str) -> None:
    for p in parts[:-1]:
        nxt = table.get(p)
        if nxt is None:
            nxt = table[p] = {}
        if not isinstance(nxt, dict):
            raise SpecError(f"{key}: {p!r} is not a table, cannot set {parts[-1]!r} inside it")
        table = nxt
    table[parts[-1]] = copy.deepcopy(value)


def apply_override(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted ``key`` of a raw spec to ``value`` in place (see the module doc)."""
    parts = _split_key(key)
    m = _SOLVER_SELECTOR.match(parts[0])
    if m is None or (len(parts) == 1 and m.group(1) is None):
        _set_path(raw, parts, value, key)  # includes replacing the whole solvers list
        return
    solvers = raw.get("solvers")
    if not isinstance(solvers, list) or not solvers:
        raise SpecError(f"{key}: the spec has no [[solvers]] to set")
    if len(parts) < 2:
        raise SpecError(f"{key}: name a key inside the solver, e.g. 'solvers.options.memory'")
    sel = m.group(1)
    rest = parts[1:]
    if sel is None:
        targets = solvers
        if rest[0] == "options" and len(rest) == 2:
            having = [s for s in solvers if rest[1] in (s.get("options") or {})]
            targets = having or solvers
    else:
        if sel.lstrip("-").isdigit():
            i = int(sel)
            if not -len(solvers) <= i < len(solvers):
                raise SpecError(f"{key}: solver index {i} is out of range (0..{len(solvers) - 1})")
            targets = [solvers[i]]
        else:
            names = [s.get("name", s.get("method")) for s in solvers]
            if sel not in names:
                raise SpecError(
                    f"{key}: no solver named {sel!r}; names are {names}{closest(sel, names)}"
                )
            targets = [solvers[names.index(sel)]]
    for s in targets:
        _set_path(s, rest, value, key)


def parse_override(text: str) -> tuple[str, Any]:
    """``'sampler.batch_size=10'`` → ``('sampler.batch_size', 10)``; the value is read as a TOML
    value, or as a plain string when it is not one."""
    if "=" not in text:
        raise SpecError(f"--set {text!r}: expected KEY=VALUE, e.g. max_iter=5")
    key, value = text.split("=", 1)
    key = key.strip()
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key, parsed


# ----------------------------------------------------------------------------------------------
# Spec, cells and loading
# ----------------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One run of the grid: a sweep point and a seed, with its fully resolved spec."""

    id: str
    point: dict[str, Any]
    seed: int
    spec: dict[str, Any]

    @property
    def label(self) -> str:
        bits = [f"{k}={_short(v)}" for k, v in self.point.items()]
        return ", ".join(bits) if bits else "main"


def _short(v: Any) -> str:
    if isinstance(v, list):
        return "-".join(_short(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


@dataclass
class Spec:
    """A validated spec: ``data`` is the resolved base spec (defaults filled, sweep kept)."""

    data: dict[str, Any]
    source: str = ""
    parts: list[tuple[str, Spec]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.data.get("name") or "run"

    @property
    def is_suite(self) -> bool:
        return "parts" in self.data

    def cells(self) -> list[Cell]:
        """The grid: one cell per sweep point and seed, in a stable order."""
        return expand_cells(self.data)


def _offset_seeds(spec: dict[str, Any], s: int) -> None:
    if s == 0:
        return
    for table, key in (("model", "seed"), ("sampler", "seed"), ("data", "noise_seed")):
        t = spec.get(table)
        if isinstance(t, dict) and key in t:
            t[key] = t[key] + s
    model = spec.get("model")
    if isinstance(model, dict) and model.get("kind") == "logistic" and "seed" not in model:
        model["seed"] = s


def expand_cells(data: dict[str, Any]) -> list[Cell]:
    sweep = data.get("sweep") or {}
    keys = list(sweep)
    seeds = data.get("seeds", [0])
    grid = list(itertools.product(*[sweep[k] for k in keys])) if keys else [()]
    cells = []
    multi = len(grid) * len(seeds) > 1
    for values in grid:
        point = dict(zip(keys, values))
        for s in seeds:
            raw = copy.deepcopy(data)
            raw.pop("sweep", None)
            for k, v in point.items():
                apply_override(raw, k, v)
            errors: list[str] = []
            resolved = _validate(raw, errors)
            if errors:
                where = ", ".join(f"{k}={_short(v)}" for k, v in point.items())
                raise SpecError([f"[sweep point {where}] {e}" for e in errors])
            _offset_seeds(resolved, s)
            resolved["seeds"] = [s]
            bits = [f"{k}={_short(v)}" for k, v in point.items()]
            if len(seeds) > 1:
                bits.append(f"seed={s}")
            cid = slugify("__".join(bits)) if multi else "main"
            cells.append(Cell(cid, point, s, resolved))
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        for i, c in enumerate(cells):
            c.id = f"{i:03d}-{c.id}"
    return cells


def bundled_specs() -> dict[str, Path]:
    """Every bundled spec: ``{'paper/rosenbrock': path, ...}``."""
    root = resources.files("secondorder.experiments") / "specs"
    out: dict[str, Path] = {}
    base = Path(str(root))
    if not base.is_dir():
        return out
    for p in sorted(base.rglob("*.toml")):
        out[p.relative_to(base).with_suffix("").as_posix()] = p
    return out


def resolve_spec_path(name: str) -> Path:
    """A spec file path from a path or a bundled name (``paper/fashion-mnist``)."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    bundled = bundled_specs()
    key = name[:-5] if name.endswith(".toml") else name
    if key in bundled:
        return bundled[key]
    if p.suffix == ".toml" or os.sep in name and not key.startswith("paper/"):
        raise SpecError(f"spec file {name} not found")
    raise SpecError(
        f"{name!r} is neither a spec file nor a bundled spec; bundled specs are "
        f"{sorted(bundled)}{closest(key, bundled)} (see `secondorder list`)"
    )


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"not valid TOML: {err}", str(path)) from None


def _apply_quick(raw: dict[str, Any], source: str) -> None:
    quick = raw.get("quick") or {}
    if not isinstance(quick, dict):
        raise SpecError("quick: expected a table", source)
    quick = dict(quick)
    only = quick.pop("only_solvers", None)
    for k, v in _flatten_overrides(quick):
        try:
            apply_override(raw, k, v)
        except SpecError as err:
            raise SpecError(f"quick.{k}: {err.errors[0]}", source) from None
    if only is not None:
        solvers = raw.get("solvers") or []
        names = [s.get("name", s.get("method")) for s in solvers]
        for n in only:
            if n not in names:
                raise SpecError(
                    f"quick.only_solvers: no solver named {n!r}{closest(n, names)}", source
                )
        raw["solvers"] = [s for s in solvers if s.get("name", s.get("method")) in only]


def _flatten_overrides(table: dict[str, Any], prefix: str = ""):
    """Dotted keys of an override table. Quoted dotted keys stay as written; nested tables
    (``[quick.data]``) are flattened, except ``sweep`` and ``options`` which are values."""
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v and k not in ("sweep", "options") and "." not in k:
            yield from _flatten_overrides(v, key)
        else:
            yield key, v


def spec_from_dict(
    raw: dict[str, Any],
    source: str = "",
    *,
    quick: bool = False,
    overrides: list[tuple[str, Any]] | None = None,
    _depth: int = 0,
) -> Spec:
    """Validate a raw spec (a dict as read from TOML); raise :class:`SpecError` listing every
    problem. ``quick`` applies the ``[quick]`` overrides; ``overrides`` are (dotted key, value)."""
    raw = copy.deepcopy(raw)
    if quick:
        _apply_quick(raw, source)
    raw.pop("quick", None) if quick else None
    for k, v in overrides or []:
        try:
            apply_override(raw, k, v)
        except SpecError as err:
            raise SpecError(err.errors, source) from None
    if "parts" in raw:
        return _suite_from_dict(raw, source, quick=quick, depth=_depth)
    errors: list[str] = []
    data = _validate(raw, errors)
    sweep = data.get("sweep") or {}
    for k, v in sweep.items():
        if not isinstance(v, list) or not v:
            errors.append(f"{_fmt_path('sweep', k)}: expected a non-empty list of values")
        else:
            try:
                probe = copy.deepcopy(raw)
                apply_override(probe, k, v[0])
            except SpecError as err:
                errors.append(f"{_fmt_path('sweep', k)}: {err.errors[0]}")
    if errors:
        raise SpecError(errors, source)
    data.setdefault("name", Path(source).stem if source else "run")
    spec = Spec(data, source)
    spec.cells()  # validates every sweep point
    return spec


def _suite_from_dict(raw: dict[str, Any], source: str, *, quick: bool, depth: int) -> Spec:
    if depth > 3:
        raise SpecError("parts: suites nested too deeply", source)
    errors: list[str] = []
    data = _check_table(raw, SUITE_TOP, "", errors)
    parts = []
    names: set[str] = set()
    for i, part in enumerate(data.get("parts") or []):
        p = _check_table(part, PART, f"parts[{i}]", errors)
        if "spec" not in p:
            continue
        try:
            sub_raw, sub_source = load_raw(p["spec"])
            sub = spec_from_dict(
                sub_raw,
                sub_source,
                quick=p.get("quick", False),
                overrides=list(_flatten_overrides(p.get("set", {}))),
                _depth=depth + 1,
            )
        except SpecError as err:
            errors.extend(f"parts[{i}] ({p['spec']}): {e}" for e in err.errors)
            continue
        name = slugify(p.get("name") or sub.name)
        if name in names:
            errors.append(f"parts[{i}].name: {name!r} is used twice")
        names.add(name)
        parts.append((name, sub))
    if errors:
        raise SpecError(errors, source)
    data.setdefault("name", Path(source).stem if source else "suite")
    data["report"] = _check_table(data.get("report", {}), REPORT, "report", [])
    return Spec(data, source, parts)


def load_raw(name: str) -> tuple[dict[str, Any], str]:
    path = resolve_spec_path(name)
    bundled = {v: k for k, v in bundled_specs().items()}
    source = bundled.get(path, str(path))
    return read_toml(path), source


def load_spec(
    name: str, *, quick: bool = False, overrides: list[tuple[str, Any]] | None = None
) -> Spec:
    """Load, override and validate a spec from a path or a bundled name."""
    raw, source = load_raw(name)
    return spec_from_dict(raw, source, quick=quick, overrides=overrides)


# ----------------------------------------------------------------------------------------------
# Checks before training
# ----------------------------------------------------------------------------------------------
def check_data_available(spec: Spec) -> None:
    """Raise :class:`SpecError` when a dataset the spec needs is absent and may not be fetched."""
    specs = [s for _, s in spec.parts] if spec.is_suite else [spec]
    for s in specs:
        if s.is_suite:
            check_data_available(s)
            continue
        for cell in s.cells():
            data = cell.spec["data"]
            if data["kind"] != "fashion-mnist":
                continue
            from secondorder.data import DataError, fashion_mnist

            try:
                found = fashion_mnist.find_fashion_mnist(data.get("root"))
            except DataError as err:
                raise SpecError(f"data.root: {err}", s.source) from None
            if found is None and not data.get("download", True):
                looked = ", ".join(str(d) for d in fashion_mnist.search_dirs())
                raise SpecError(
                    "data: Fashion-MNIST not found (looked in "
                    f"{looked}) and data.download = false; run `secondorder data` to fetch it, "
                    "set $SECONDORDER_DATA, or set data.download = true",
                    s.source,
                )


def check_run_dir(path: str | os.PathLike[str], *, must_be_new: bool = True) -> Path:
    """Create ``path`` (if needed) and prove it writable; refuse a directory holding a run."""
    path = Path(path).expanduser()
    if must_be_new and path.exists():
        if not path.is_dir():
            raise SpecError(f"run directory {path} exists and is not a directory")
        if (path / "run.json").exists() or (path / "spec.toml").exists():
            raise SpecError(
                f"run directory {path} already holds a run; continue it with "
                f"`secondorder resume {path}` or choose another --run-dir"
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise SpecError(f"run directory {path} is not writable: {err.strerror or err}") from None
    return path


# ----------------------------------------------------------------------------------------------
# TOML writer (for the resolved spec saved in a run directory)
# ----------------------------------------------------------------------------------------------
def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_\-]+", k) else _toml_str(k)


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items())
        return "{" + inner + "}" if inner else "{}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def to_toml(data: dict[str, Any], _prefix: str = "") -> str:
    """Serialise a spec dict (scalars, lists, tables, arrays of tables) as TOML."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for k, v in data.items():
        if v is None:
            continue
        if isinstance(v, dict) and not v:
            lines.append(f"{_toml_key(k)} = {{}}")
        elif isinstance(v, dict) or _is_table_array(v):
            tables.append((k, v))
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    out = "\n".join(lines)
    for k, v in tables:
        name = f"{_prefix}.{_toml_key(k)}" if _prefix else _toml_key(k)
        if isinstance(v, dict):
            out += f"\n\n[{name}]\n{to_toml(v, name)}"
        else:
            for item in v:
                out += f"\n\n[[{name}]]\n{to_toml(item, name)}"
    return out.strip("\n") + ("\n" if not _prefix else "")

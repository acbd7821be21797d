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
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secondorder._format import format_spec_value
from secondorder._validation import check_device
from secondorder.data import DataError, fashion_mnist
from secondorder.experiments.bundled import bundled_specs, load_raw, resolve_spec_path
from secondorder.experiments.functions import FUNCTIONS
from secondorder.experiments.overrides import (
    apply_override,
    apply_quick,
    flatten_overrides,
    parse_override,
)
from secondorder.experiments.rundir import check_run_dir
from secondorder.experiments.schema import (
    F,  # noqa: F401 - public before the split
    SpecError,
    SpecWarning,
    check_depth,
    check_table,
    fmt_path,
    kind_table,
    slugify,
)
from secondorder.experiments.spec_solvers import (
    SCIPY_METHODS,
    check_option_names,
    method_ok,
)
from secondorder.experiments.spec_tables import (  # noqa: F401 - the names stay public here
    ACTIVATIONS,
    DATA,
    DATA_COMMON,
    DATA_KINDS,
    DEFAULT_METRICS,
    DTYPES,
    INITS,
    L2_CONVENTIONS,
    LINE_SEARCHES,
    LOSSES,
    METRICS,
    MODEL,
    MODEL_COMMON,
    MODEL_KINDS,
    NOT_PROBLEM_KEYS,
    PART,
    PROBLEM_KEYS,
    REPORT,
    SAMPLER,
    SAMPLER_COMMON,
    SAMPLER_KINDS,
    SOLVER,
    SUITE_TOP,
    TOP,
)
from secondorder.experiments.spec_toml import read_toml, to_toml, tomllib
from secondorder.solvers import METHODS  # noqa: F401 - public here as before

__all__ = [
    "METHODS",
    "METRICS",
    "SCIPY_METHODS",
    "Cell",
    "Spec",
    "SpecError",
    "SpecWarning",
    "apply_override",
    "bundled_specs",
    "check_data_available",
    "check_run_dir",
    "load_spec",
    "parse_override",
    "problem_of",
    "read_toml",
    "resolve_spec_path",
    "slugify",
    "spec_from_dict",
    "to_toml",
    "tomllib",
]


def _validate(raw: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    """Validate one (non-suite) spec; return it with every default filled in."""
    spec = check_table(raw, TOP, "", errors)
    data = kind_table(spec.get("data", {}), DATA_COMMON, DATA, "data", errors)
    spec["data"] = data
    kind = data.get("kind")
    problem_is_function = kind in FUNCTIONS
    if problem_is_function:
        for key in ("model", "sampler", "curvature_sampler", "loss", "l2_m"):
            if key in spec:
                errors.append(f"{key}: not used with data.kind = {kind!r} (a plain function)")
        FUNCTIONS[kind].check(data, errors)
    else:
        if "model" in spec:
            spec["model"] = kind_table(spec["model"], MODEL_COMMON, MODEL, "model", errors)
        else:
            if "model" not in raw:  # (one of the wrong type is reported already)
                errors.append(f"model: missing (required for data.kind = {kind!r})")
            spec["model"] = {}
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
        spec["sampler"] = kind_table(
            spec.get("sampler", {}), SAMPLER_COMMON, SAMPLER, "sampler", errors, "full"
        )
        if "curvature_sampler" in spec:
            spec["curvature_sampler"] = kind_table(
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
            pool = data.get("pool", 1)
            if isinstance(pool, int) and pool >= 1 and 28 % pool:
                errors.append(f"data.pool: must divide 28 (1, 2, 4, 7, 14 or 28), got {pool}")
    if "metrics" not in spec and kind in DEFAULT_METRICS:
        metrics = list(DEFAULT_METRICS[kind])
        if kind == "fashion-mnist" and not data.get("dev_size"):
            metrics.remove("dev_accuracy")
        spec["metrics"] = metrics
    has_dev = kind == "fashion-mnist" and data.get("dev_size", 0) > 0
    for mname in spec.get("metrics", []):
        if problem_is_function and mname not in ("train_loss", "grad_norm"):
            errors.append(f"metrics: {mname!r} needs data (data.kind = {kind!r} has none)")
        elif mname.startswith("dev_") and not has_dev and kind is not None:
            errors.append(f"metrics: {mname!r} needs a dev split (data.dev_size > 0)")
    if len(spec.get("seeds", [0])) == 0:
        errors.append("seeds: needs at least one seed")
    if len(set(spec.get("seeds", []))) != len(spec.get("seeds", [])):
        errors.append("seeds: repeated seed")
    spec["report"] = check_table(spec.get("report", {}), REPORT, "report", errors)
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
    try:
        check_device("device", device)
    except ValueError as err:
        errors.append(str(err))


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
        s = check_table(s, SOLVER, where, errors)
        if "method" in s and isinstance(s["method"], str):
            method_ok(s["method"], f"{where}.method", errors)
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
            check_option_names(s["method"], s["options"], f"{where}.options", errors)
        out.append(s)
    spec["solvers"] = out


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
        return format_spec_value(v)
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


def spec_from_dict(
    raw: dict[str, Any],
    source: str = "",
    *,
    quick: bool = False,
    overrides: list[tuple[str, Any]] | None = None,
    max_cells: int | None = None,
    _depth: int = 0,
) -> Spec:
    """Validate a raw spec (a dict as read from TOML); raise :class:`SpecError` listing every
    problem. ``quick`` applies the ``[quick]`` overrides; ``overrides`` are (dotted key, value).
    ``max_cells`` refuses, before expanding it, a grid of more cells (sweep points × seeds).
    Sweep points that define the same problem are reported with a :class:`SpecWarning`."""
    try:  # before any recursive walk of it (a copy, the checks)
        check_depth(raw)
        for k, v in overrides or []:
            check_depth(v, str(k))
    except SpecError as err:
        raise SpecError(err.errors, source) from None
    raw = copy.deepcopy(raw)
    if quick:
        apply_quick(raw, source)
    raw.pop("quick", None) if quick else None
    for k, v in overrides or []:
        try:
            apply_override(raw, k, v)
        except SpecError as err:
            raise SpecError(err.errors, source) from None
    try:  # a dotted key makes tables too
        check_depth(raw)
    except SpecError as err:
        raise SpecError(err.errors, source) from None
    if "parts" in raw:
        return _suite_from_dict(raw, source, quick=quick, depth=_depth, max_cells=max_cells)
    errors: list[str] = []
    data = _validate(raw, errors)
    sweep = data.get("sweep") or {}
    for k, v in sweep.items() if isinstance(sweep, dict) else ():  # else reported already
        if not isinstance(v, list) or not v:
            errors.append(f"{fmt_path('sweep', k)}: expected a non-empty list of values")
        else:
            try:
                probe = copy.deepcopy(raw)
                apply_override(probe, k, v[0])
            except SpecError as err:
                errors.append(f"{fmt_path('sweep', k)}: {err.errors[0]}")
    if errors:
        raise SpecError(errors, source)
    _check_grid_size(data, max_cells, source)
    data.setdefault("name", Path(source).stem if source else "run")
    spec = Spec(data, source)
    cells = spec.cells()  # validates every sweep point
    for note in same_problem_notes(cells):
        warnings.warn(f"{source or spec.name}: {note}", SpecWarning, stacklevel=2)
    return spec


def _check_grid_size(data: dict[str, Any], max_cells: int | None, source: str) -> None:
    """Refuse a grid larger than ``max_cells`` before any cell is built."""
    if max_cells is None:
        return
    sizes = [len(v) for v in (data.get("sweep") or {}).values()]
    n_seeds = len(data.get("seeds", [0]))
    n = math.prod(sizes) * n_seeds
    if n > max_cells:
        shape = " × ".join(str(k) for k in sizes) or "1"
        raise SpecError(
            f"sweep: the grid has {n:,} cells ({shape} sweep points × {n_seeds} seed(s)), more "
            f"than the limit of {max_cells:,}; allow it explicitly (secondorder run --max-cells "
            f"{n}) or sweep fewer values",
            source,
        )


def _train_size(spec: dict[str, Any]) -> int | None:
    """The number of training samples m a cell's spec gives its sampler (None: not known)."""
    data = spec.get("data", {})
    kind = data.get("kind")
    if kind in ("two-class-2d", "random"):
        return data.get("n_train")
    if kind == "fashion-mnist":
        return data.get("n_train") or 60000 - data.get("dev_size", 0)
    return None


def _normalised(spec: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """A copy of a resolved spec with the keys that cannot matter to its problem normalised
    away, and why each was: fixed batches that cover every sample equally often are the full
    objective (eq. 28 weights all 1/m); without an L2 term its convention does not matter."""
    s = copy.deepcopy(spec)
    why = []
    sampler, m = s.get("sampler") or {}, _train_size(s)
    if sampler.get("kind") == "fixed" and m:
        b = sampler["batch_size"]
        r = sampler.get("n_batches") or -(-m // b)
        if m % b == 0 and (r * b) % m == 0:
            s["sampler"] = {"kind": "full"}
            why.append(
                (
                    "sampler",
                    f"sampler.kind = 'fixed' with batch_size dividing m = {m} and n_batches × "
                    "batch_size a multiple of m weights every sample 1/m: the full objective",
                )
            )
    if not s.get("l2"):
        for key in ("l2_convention", "l2_m", "regularize_bias"):
            s.pop(key, None)
        why.append(("l2", "l2 = 0 makes l2_convention, l2_m and regularize_bias irrelevant"))
    elif s.get("l2_convention") == "plain":
        s.pop("l2_m", None)
        why.append(("l2", "l2_convention = 'plain' does not use l2_m"))
    return s, why


def _problem_key(spec: dict[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    """What determines a cell's results (the problem, the solvers and their budgets), with
    keys that cannot matter normalised away, and why each was (:func:`_normalised`)."""
    s, why = _normalised(spec)
    for key in ("metrics", "metrics_every", "checkpoint_every", "report", "threads", "name"):
        s.pop(key, None)
    return json.dumps(s, sort_keys=True, default=str), why


def problem_of(spec: dict[str, Any], *, normalised: bool = True) -> dict[str, Any]:
    """The problem a resolved (cell) spec defines: its :data:`PROBLEM_KEYS` as dotted keys
    (``"sampler.batch_size"``), without those that cannot matter (:func:`_normalised`; kept
    as written with ``normalised=False``) and those that only locate the data
    (:data:`NOT_PROBLEM_KEYS`). Two specs whose problems are equal minimise the same function
    from the same start."""
    s = _normalised(spec)[0] if normalised else spec
    out: dict[str, Any] = {}
    for key in PROBLEM_KEYS:
        value = s.get(key)
        if isinstance(value, dict):
            out.update((f"{key}.{k}", v) for k, v in value.items())
        elif key in s:
            out[key] = value
    return {k: v for k, v in out.items() if k not in NOT_PROBLEM_KEYS}


def same_problem_notes(cells: list[Cell]) -> list[str]:
    """One line per group of sweep points that define the same problem (their runs can
    differ only by rounding)."""
    groups: dict[str, list[Cell]] = {}
    reasons: dict[str, list[tuple[str, str]]] = {}
    for c in cells:
        key, why = _problem_key(c.spec)
        groups.setdefault(key, []).append(c)
        reasons[key] = why
    notes = []
    for key, same in groups.items():
        if len(same) > 1:
            labels = "; ".join(c.label for c in same[:4]) + ("; ..." if len(same) > 4 else "")
            swept = [k for c in same for k in c.point]
            texts = [t for tag, t in reasons[key] if any(k.startswith(tag) for k in swept)]
            why = f" ({'; '.join(texts)})" if texts else ""
            notes.append(
                f"sweep: {len(same)} cells define the same problem, so their results can "
                f"differ only by rounding: {labels}{why}"
            )
    return notes


def _suite_from_dict(
    raw: dict[str, Any], source: str, *, quick: bool, depth: int, max_cells: int | None
) -> Spec:
    if depth > 3:
        raise SpecError("parts: suites nested too deeply", source)
    errors: list[str] = []
    data = check_table(raw, SUITE_TOP, "", errors)
    parts = []
    names: set[str] = set()
    for i, part in enumerate(data.get("parts") or []):
        p = check_table(part, PART, f"parts[{i}]", errors)
        if "spec" not in p:
            continue
        try:
            sub_raw, sub_source = load_raw(p["spec"])
            sub = spec_from_dict(
                sub_raw,
                sub_source,
                quick=p.get("quick", False),
                overrides=list(flatten_overrides(p.get("set", {}))),
                max_cells=max_cells,
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
    data["report"] = check_table(data.get("report", {}), REPORT, "report", [])
    return Spec(data, source, parts)


def load_spec(
    name: str,
    *,
    quick: bool = False,
    overrides: list[tuple[str, Any]] | None = None,
    max_cells: int | None = None,
) -> Spec:
    """Load, override and validate a spec from a path or a bundled name (the arguments are
    those of :func:`spec_from_dict`)."""
    raw, source = load_raw(name)
    return spec_from_dict(raw, source, quick=quick, overrides=overrides, max_cells=max_cells)


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

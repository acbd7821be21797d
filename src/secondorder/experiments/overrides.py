"""Dotted overrides of a raw spec: ``--set KEY=VALUE``, ``[sweep]`` points and ``[quick]``.

``solvers.K`` sets K on every solver (``solvers.options.K`` only on those that already list
option K, or on all when none does); ``solvers[NAME].K`` or ``solvers[INDEX].K`` on one (a
NAME may hold dots and ``=``: ``--set 'solvers[Adam lr=0.01].options.lr=0.02'``).
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

from secondorder._validation import closest
from secondorder.experiments.schema import SpecError, SpecWarning
from secondorder.experiments.spec_toml import TOO_DEEP, tomllib

__all__ = ["apply_override", "apply_quick", "flatten_overrides", "key_end", "parse_override"]

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


def _solver_names(solvers: list[Any], key: str) -> list[str]:
    """Each solver's name (its method when unnamed); every solver must be a table."""
    names = []
    for i, s in enumerate(solvers):
        if not isinstance(s, dict):
            raise SpecError(f"{key}: solvers[{i}] is not a table (a [[solvers]] entry)")
        names.append(str(s.get("name", s.get("method"))))
    return names


def _table(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


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
    names = _solver_names(solvers, key)
    if sel is None:
        targets = solvers
        if rest[0] == "options" and len(rest) == 2:
            having = [s for s in solvers if rest[1] in _table(s.get("options"))]
            targets = having or solvers
    else:
        if sel.lstrip("-").isdigit():
            i = int(sel)
            if not -len(solvers) <= i < len(solvers):
                raise SpecError(f"{key}: solver index {i} is out of range (0..{len(solvers) - 1})")
            targets = [solvers[i]]
        else:
            if sel not in names:
                raise SpecError(
                    f"{key}: no solver named {sel!r}; names are {names}{closest(sel, names)}"
                )
            targets = [solvers[names.index(sel)]]
    for s in targets:
        _set_path(s, rest, value, key)


def key_end(text: str) -> int | None:
    """The position of the ``=`` that ends the key: the first outside brackets, so that a
    solver named ``"Adam lr=0.01"`` is addressed as ``solvers[Adam lr=0.01].KEY=VALUE``."""
    depth = 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        elif ch == "=" and depth == 0:
            return i
    return None


def parse_override(text: str) -> tuple[str, Any]:
    """``'sampler.batch_size=10'`` → ``('sampler.batch_size', 10)``; the value is read as a TOML
    value, or as a plain string when it is not one. The key ends at the first ``=`` outside
    brackets (a solver's name in ``solvers[NAME]`` may hold ``=``)."""
    split = key_end(text)
    if split is None:
        raise SpecError(f"--set {text!r}: expected KEY=VALUE, e.g. max_iter=5")
    key, value = text[:split].strip(), text[split + 1 :]
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    except RecursionError:
        raise SpecError(f"--set {key}: {TOO_DEEP}") from None
    return key, parsed


def apply_quick(raw: dict[str, Any], source: str) -> None:
    """Apply the ``[quick]`` overrides in place; a :class:`SpecWarning` when there are none
    (a suite's parts may still have ``quick = true``)."""
    quick = raw.get("quick") or {}
    if not isinstance(quick, dict):
        raise SpecError("quick: expected a table", source)
    if not quick and "parts" not in raw:
        warnings.warn(
            f"{source or 'the spec'} has no [quick] table: --quick changes nothing, the spec "
            "runs in full",
            SpecWarning,
            stacklevel=3,
        )
    quick = dict(quick)
    only = quick.pop("only_solvers", None)
    for k, v in flatten_overrides(quick):
        try:
            apply_override(raw, k, v)
        except SpecError as err:
            raise SpecError(f"quick.{k}: {err.errors[0]}", source) from None
    if only is not None:
        if not isinstance(only, list) or not all(isinstance(n, str) for n in only):
            raise SpecError(f"quick.only_solvers: expected a list of solver names, got {only!r}")
        solvers = raw.get("solvers")
        if not isinstance(solvers, list):
            return  # the check of the spec reports it
        names = _solver_names(solvers, "quick.only_solvers")
        for n in only:
            if n not in names:
                raise SpecError(
                    f"quick.only_solvers: no solver named {n!r}{closest(n, names)}", source
                )
        raw["solvers"] = [s for s, n in zip(solvers, names) if n in only]


def flatten_overrides(table: dict[str, Any], prefix: str = ""):
    """Dotted keys of an override table. Quoted dotted keys stay as written; nested tables
    (``[quick.data]``) are flattened, except ``sweep`` and ``options`` which are values."""
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v and k not in ("sweep", "options") and "." not in k:
            yield from flatten_overrides(v, key)
        else:
            yield key, v

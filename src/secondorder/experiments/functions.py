"""Plain test functions a spec can minimise (``data.kind`` without data): their ``[data]`` keys,
how each builds f and θ₀, and its known minimum f*.

Every function lives in :data:`FUNCTIONS` alone: the spec's tables, the problem builder and the
report's f − f* read them from here, so a new function is one entry. Each accepts ``noise``
(N(0, σ²) added to f and to ∇f, the noisy objective of the experiments) and ``noise_seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from secondorder.experiments.schema import F
from secondorder.objective import rosenbrock, strict_saddle, strict_saddle_minimum

__all__ = ["FUNCTIONS", "TestFunction", "function_f_star", "saddle_start"]

_NOISE = {
    "noise": F("float", 0.0, minimum=0.0, doc="std of Gaussian noise added to f and to g"),
    "noise_seed": F("int", 0),
}


@dataclass(frozen=True)
class TestFunction:
    """One test function: its ``[data]`` keys, ``build(data) -> (f, x0)``, ``f_star(data)``
    (None when unknown) and ``check(data, errors)`` for constraints across keys."""

    fields: dict[str, F]
    build: Callable[[dict[str, Any]], tuple[Callable[[Tensor], Tensor], list[float]]]
    f_star: Callable[[dict[str, Any]], float | None]
    check: Callable[[dict[str, Any], list[str]], None]


def _rosenbrock_build(data: dict[str, Any]):
    return rosenbrock(data["a"], data["b"]), list(data["x0"])


def _rosenbrock_check(data: dict[str, Any], errors: list[str]) -> None:
    if "x0" in data and len(data["x0"]) < 2:
        errors.append("data.x0: needs at least 2 coordinates")


def saddle_start(n: int, scale: float, seed: int) -> list[float]:
    """θ₀ of the strict saddle: ``scale`` times a random unit vector (drawn from ``seed``, apart
    from the rotation's draw), so that ``scale = 0`` starts exactly at the saddle."""
    gen = torch.Generator().manual_seed(int(seed) + 1)
    u = torch.randn(n, generator=gen, dtype=torch.float64)
    return [float(v) for v in scale * u / u.norm()]


def _saddle_build(data: dict[str, Any]):
    d = data["eigenvalues"]
    fn = strict_saddle(d, data["quartic"], data["seed"])
    return fn, saddle_start(len(d), data["x0_scale"], data["seed"])


def _saddle_check(data: dict[str, Any], errors: list[str]) -> None:
    d = data.get("eigenvalues")
    if isinstance(d, list) and not d:
        errors.append("data.eigenvalues: needs at least one eigenvalue")
    elif isinstance(d, list) and not all(math.isfinite(v) for v in d):
        errors.append(f"data.eigenvalues: expected finite numbers, got {d}")


FUNCTIONS: dict[str, TestFunction] = {
    "rosenbrock": TestFunction(
        {
            "a": F("float", 1.0),
            "b": F("float", 100.0),
            "x0": F("list[float]", [-1.2, 1.0]),
            **_NOISE,
        },
        _rosenbrock_build,
        lambda data: 0.0,
        _rosenbrock_check,
    ),
    "strict-saddle": TestFunction(
        {
            "eigenvalues": F(
                "list[float]",
                [-1.0, 1.0],
                doc="the Hessian's eigenvalues at the saddle x = 0 (some negative)",
            ),
            "quartic": F("float", 1.0, minimum=0.0, exclusive_min=True, doc="q of ¼ q z⁴"),
            "seed": F("int", 0, minimum=0, doc="draws the rotation Q and the start's direction"),
            "x0_scale": F(
                "float", 1e-3, minimum=0.0, doc="‖x₀‖, the distance of the start from the saddle"
            ),
            **_NOISE,
        },
        _saddle_build,
        lambda data: strict_saddle_minimum(data["eigenvalues"], data["quartic"]),
        _saddle_check,
    ),
}


def function_f_star(data: dict[str, Any]) -> float | None:
    """The known minimum of a test function's resolved ``[data]`` table (None for data)."""
    entry = FUNCTIONS.get(data.get("kind", ""))
    if entry is None:
        return None
    try:
        return entry.f_star(data)
    except (KeyError, TypeError):  # a table written before the key had a default
        return None

"""Metrics a spec may record besides the built-in losses and accuracies, in one registry.

A metric is a function ``fn(objective, theta, splits) -> dict[str, value]`` registered under
the name a spec's ``metrics`` list uses (``@register("name")``); the runner calls it every
``metrics_every`` iterations with the current θ and records what it returns in the trace. The
values must be numbers, or lists of numbers (one per layer, say). Registering a function here
is all it takes to make its name valid in specs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["EXTRA_METRICS", "MetricFn", "register"]

#: ``fn(objective, theta, splits)``: what to add to the trace row
MetricFn = Callable[[Any, torch.Tensor, Any], dict[str, Any]]

#: every registered metric, by the name specs use
EXTRA_METRICS: dict[str, MetricFn] = {}


def register(name: str) -> Callable[[MetricFn], MetricFn]:
    """Register ``fn`` as the metric ``name`` (a decorator)."""

    def add(fn: MetricFn) -> MetricFn:
        if name in EXTRA_METRICS:
            raise ValueError(f"metric {name!r} is registered twice")
        EXTRA_METRICS[name] = fn
        return fn

    return add


@register("batch_accuracy")
def batch_accuracy(objective: Any, theta: torch.Tensor, splits: Any) -> dict[str, Any]:
    """Eq. 30 on the samples the current objective sums over: the whole training set for the
    full batch, the R batches of eq. 28 (fixed or this iteration's), the current mini-batch.
    With batches that cover only part of the data it is the training accuracy the solver
    actually fits, where ``train_accuracy`` also counts the samples it never sees."""
    X, y, _ = objective.samples("value", whole=True)
    return {"batch_accuracy": objective.accuracy(theta, X, y)}

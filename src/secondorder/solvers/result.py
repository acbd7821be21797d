"""What a solver returns: :class:`Result`, its per-iteration :class:`Trace`, and the stopping rules.

Every solver of :func:`secondorder.solvers.minimize` (and the scipy bridge) returns the same
:class:`Result`. Its ``status`` is a short string saying why the run stopped:

==================== ======= ==============================================================
status               success meaning
==================== ======= ==============================================================
``"gtol"``           yes     ‖∇f‖∞ ≤ gtol
``"ftol"``           yes     |f_k − f_{k−1}| ≤ ftol (eq. 29)
``"max_iter"``       no      the iteration budget was spent
``"max_evals"``      no      the function-evaluation budget was spent
``"max_time"``       no      the wall-clock budget was spent
``"callback"``       no      the callback asked to stop
``"line_search"``    no      the line search found no decrease, even after a restart
``"stalled"``        no      steps no longer change θ or f at this precision
``"objective_changed"`` no   the function changed under a method that keeps memory across
                             iterations (faithful mode) and the method broke down
``"saddle"``         no      ‖∇f‖ is small but the Hessian has a negative eigenvalue
``"nonfinite"``      no      only non-finite values could be found
``"converged"``      yes     scipy bridge: scipy's own test passed, on neither the gradient
                             nor f (e.g. on the step or the simplex)
``"failed"``         no      scipy bridge: scipy stopped for another reason (see the message)
==================== ======= ==============================================================
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from secondorder._format import format_number, format_spec_value

__all__ = [
    "STATUSES",
    "Result",
    "StopRules",
    "Trace",
    "default_gtol",
]

#: status → whether it counts as success
STATUSES: dict[str, bool] = {
    "gtol": True,
    "ftol": True,
    "max_iter": False,
    "max_evals": False,
    "max_time": False,
    "callback": False,
    "line_search": False,
    "stalled": False,
    "objective_changed": False,
    "saddle": False,
    "nonfinite": False,
    "converged": True,  # scipy bridge only
    "failed": False,  # scipy bridge only
}


def default_gtol(dtype: torch.dtype) -> float:
    """The default gradient tolerance for ``dtype``: max(1e-9, eps^(2/3)).

    float64 → 1e-9, float32 → 2.4e-5, bfloat16 → 0.04: tight enough that superlinear methods
    reach about 1e-8 accuracy in float64, loose enough that float32 can meet it.
    """
    eps = torch.finfo(dtype).eps
    return max(1e-9, eps ** (2.0 / 3.0))


class Trace:
    """Per-iteration records: a list of dict rows (``.rows``), one per iteration.

    Every row has ``k`` (iteration), ``f``, ``grad_norm`` (‖∇f‖∞), ``step`` (the accepted step
    length α; 0 for a rejected trust-region step), ``nfev``, ``ngev``, ``nhev`` (cumulative
    counts), ``time`` (cumulative wall-clock seconds) and whatever the method or the callback
    add. ``trace["f"]`` is the column ``f``; ``trace[-1]`` the last row.
    """

    def __init__(self, rows: list[dict] | None = None) -> None:
        self.rows: list[dict] = list(rows or [])

    def append(self, row: dict) -> None:
        self.rows.append(dict(row))

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            return [r.get(key) for r in self.rows]
        return self.rows[key]

    def keys(self) -> list[str]:
        """Every column name, in first-seen order."""
        out: dict[str, None] = {}
        for r in self.rows:
            out.update(dict.fromkeys(r))
        return list(out)

    def to_columns(self) -> dict[str, list]:
        """{column: list of values}; a row without that column gives None."""
        return {k: [r.get(k) for r in self.rows] for k in self.keys()}

    def __repr__(self) -> str:
        return f"Trace({len(self.rows)} rows; columns {self.keys()})"


@dataclass(repr=False)
class Result:
    """The outcome of a run.

    ``nfev``/``ngev`` count function and gradient evaluations (one ``value_and_grad`` counts
    one of each); ``nhev`` counts Hessian-vector and Gauss–Newton-vector products, a dense
    Hessian counting as one. All counts, ``nit`` and the trace's ``time`` are cumulative over
    a resumed run. ``state`` is everything needed to continue: pass it back as
    ``minimize(..., initial_state=result.state)``.
    """

    theta: Tensor
    f: float
    grad_norm: float
    nit: int
    nfev: int
    ngev: int
    nhev: int
    status: str
    message: str
    method: str
    trace: Trace = field(default_factory=Trace)
    success: bool = False
    negative_curvature: bool = False
    negative_curvature_iterations: list[int] = field(default_factory=list)
    nonfinite: bool = False
    objective_changes: int = 0
    grad: Tensor | None = None
    state: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    # scipy-style aliases
    @property
    def x(self) -> Tensor:
        return self.theta

    @property
    def fun(self) -> float:
        return self.f

    def __repr__(self) -> str:
        flag = " negative_curvature=True" if self.negative_curvature else ""
        return (
            f"Result(method={self.method!r}, status={self.status!r}, success={self.success}, "
            f"f={format_number(self.f, 6)}, grad_norm={format_number(self.grad_norm, 3)}, "
            f"nit={self.nit}, nfev={self.nfev}, "
            f"ngev={self.ngev}, nhev={self.nhev}{flag},\n  message={self.message!r})"
        )


@dataclass
class StopRules:
    """The stopping rules shared by all methods. ``None`` switches a rule off.

    ``gtol`` tests ‖∇f‖∞ (the largest gradient component); ``ftol`` is eq. 29,
    |f_k − f_{k−1}| ≤ ftol, tested after steps that moved θ; ``max_iter``, ``max_evals``
    (function evaluations) and ``max_time`` (seconds) count from the start of this call.
    """

    max_iter: int | None = None
    gtol: float | None = None
    ftol: float | None = None
    max_evals: int | None = None
    max_time: float | None = None
    start_time: float = field(default_factory=time.perf_counter)

    def converged(self, grad_norm: float) -> bool:
        return self.gtol is not None and grad_norm <= self.gtol

    def check(
        self,
        *,
        iterations: int,
        f: float,
        f_prev: float | None,
        grad_norm: float,
        evals: int,
        moved: bool,
    ) -> tuple[str, str] | None:
        """(status, message) when a rule fires, else None. ``iterations`` and ``evals``
        count this call only."""
        if self.converged(grad_norm):
            return (
                "gtol",
                f"gradient norm ‖g‖∞ = {format_number(grad_norm, 3)} ≤ "
                f"gtol = {format_spec_value(self.gtol)}",
            )
        if (
            self.ftol is not None
            and moved
            and f_prev is not None
            and math.isfinite(f)
            and abs(f - f_prev) <= self.ftol
        ):
            return (
                "ftol",
                f"change in f |f_k − f_(k−1)| = {format_number(abs(f - f_prev), 3)} ≤ "
                f"ftol = {format_spec_value(self.ftol)}"
                " (eq. 29)",
            )
        if self.max_evals is not None and evals >= self.max_evals:
            return "max_evals", f"maximum number of function evaluations ({self.max_evals}) reached"
        if self.max_iter is not None and iterations >= self.max_iter:
            return "max_iter", f"maximum number of iterations ({self.max_iter}) reached"
        if self.max_time is not None and self.elapsed() >= self.max_time:
            return "max_time", f"time limit of {format_spec_value(self.max_time)} s reached"
        return None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time

    def evals_left(self, evals: int) -> int | None:
        return None if self.max_evals is None else max(0, self.max_evals - evals)

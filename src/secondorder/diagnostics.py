"""Derivative tests: is the gradient (eq. 31) and the Hessian-vector product right?

Gradient test (eq. 31). For a random direction d and a range of ε,

    e₁(ε) = | (J(θ+εd) − J(θ−εd)) / (2ε) − dᵀ∇J(θ) | = O(ε²),

so on a log-log plot the error falls with slope 2; a wrong gradient leaves an O(1) error.

Hessian (second-order Taylor) test. With the product Hd,

    e₂(ε) = | J(θ+εd) − J(θ) − ε dᵀ∇J(θ) − ½ε² dᵀH d | = O(ε³),

slope 3; a wrong product leaves O(ε²).

For a network with ReLU units the function is only piecewise smooth; the tests then run on the
smooth piece containing θ (the activation pattern at θ held fixed, see
``ModelObjective.frozen_kinks``), which has the same value and derivatives at θ.

The measured order is the least-squares slope of log e against log ε over the points whose
error stands clearly above the floating-point round-off floor (≈ u·|J|/ε for e₁, u·|J| for
e₂, with u the unit round-off of the dtype), so a float32 test is read correctly too.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from secondorder._format import format_number, format_spec_value
from secondorder.objective import Objective

__all__ = ["TaylorTest", "gradient_test", "hessian_test"]


@dataclass
class TaylorTest:
    """The outcome of a Taylor test: ε, errors, the fitted order and whether it passed."""

    kind: str
    eps: list[float]
    errors: list[float]
    expected_order: float
    order: float
    used: list[bool] = field(default_factory=list)
    value: float = 0.0
    directional_derivative: float = 0.0
    tolerance: float = 0.2

    @property
    def conclusive(self) -> bool:
        """False when too few errors stood above round-off to fit an order: the Taylor model is
        exact along d (a linear or quadratic function), or the dtype is too coarse."""
        return not math.isnan(self.order)

    @property
    def passed(self) -> bool:
        """Measured order within ``tolerance`` of the expected one."""
        return self.conclusive and abs(self.order - self.expected_order) <= self.tolerance

    def table(self) -> str:
        """A text table of ε against the error, with the fitted order."""
        lines = [f"{self.kind} test: expected order {format_spec_value(self.expected_order)}"]
        lines.append(f"{'eps':>12} {'error':>12}  fit")
        for e, err, u in zip(self.eps, self.errors, self.used):
            lines.append(f"{e:12.3e} {err:12.3e}  {'*' if u else ' '}")
        if not self.conclusive:
            lines.append(
                "inconclusive: every error is at round-off level (an exact Taylor model, or a "
                "dtype too coarse for this function: try float64)"
            )
        else:
            verdict = "PASS" if self.passed else "FAIL"
            lines.append(
                f"measured order {format_number(self.order, 3)} (points marked * used)  {verdict}"
            )
        return "\n".join(lines)


def _default_eps(dtype: torch.dtype) -> list[float]:
    if dtype == torch.float64:
        return [float(x) for x in np.logspace(-1, -6, 26)]
    return [float(x) for x in np.logspace(0, -3, 25)]


def _fit_order(eps: list[float], errors: list[float], floors: list[float]):
    """Slope of log error against log ε over the asymptotic regime.

    Points within 10× of the round-off floor are dropped. The asymptotic regime is the run of
    smallest usable ε whose successive local slopes agree (within 0.35 of their mean): at large
    ε higher-order terms, or the kinks of a ReLU network, bend the curve away from the
    asymptotic slope.
    """
    usable = [err > 10 * fl and err > 0 for err, fl in zip(errors, floors)]
    pts = sorted((e, r, i) for i, (e, r, u) in enumerate(zip(eps, errors, usable)) if u)
    used = [False] * len(eps)
    if len(pts) < 2:
        return float("nan"), used
    le = np.log([p[0] for p in pts])
    lr = np.log([p[1] for p in pts])
    run = 2
    slopes = [(lr[1] - lr[0]) / (le[1] - le[0])]
    while run < len(pts):
        s = (lr[run] - lr[run - 1]) / (le[run] - le[run - 1])
        if abs(s - float(np.mean(slopes))) > 0.35:
            break
        slopes.append(s)
        run += 1
    if run < 3 and len(pts) >= 3:
        run = len(pts)  # no consistent run: fit everything usable, and let the order tell
    for _, _, i in pts[:run]:
        used[i] = True
    return float(np.polyfit(le[:run], lr[:run], 1)[0]), used


def _smooth_piece(objective: Objective, theta: Tensor):
    """The objective's smooth piece around θ when it has kinks (ReLU), else a no-op."""
    freeze = getattr(objective, "frozen_kinks", None)
    return freeze(theta) if freeze is not None else contextlib.nullcontext()


def _prepare(
    objective: Objective,
    theta: Tensor | None,
    direction: Tensor | None,
    seed: int,
    eps: list[float] | None,
    eps_scale: float = 1.0,
):
    """Validate the arguments; return (θ, unit direction d, ε list, J(θ), dᵀ∇J(θ))."""
    if not isinstance(objective, Objective):
        raise TypeError(
            f"objective must be a secondorder Objective, got {type(objective).__name__}"
        )
    if theta is None:
        if not hasattr(objective, "initial_theta"):
            raise ValueError("theta is required for an objective without initial_theta()")
        theta = objective.initial_theta()
    theta = objective.check_theta(theta)
    if not bool(torch.isfinite(theta).all()):
        raise ValueError("theta contains NaN or inf values")
    if direction is None:
        g = torch.Generator().manual_seed(seed)
        direction = torch.randn(theta.numel(), generator=g, dtype=torch.float64)
        direction = direction.to(theta)
    direction = objective.check_theta(direction, "direction")
    norm = float(direction.norm())
    if not math.isfinite(norm) or norm == 0:
        raise ValueError("direction must be a finite, non-zero vector")
    if eps is None:
        eps = [e * eps_scale for e in _default_eps(objective.dtype)]
    eps = [float(e) for e in eps]
    if not eps or any(not (e > 0 and math.isfinite(e)) for e in eps):
        raise ValueError(f"eps must be a non-empty list of positive numbers, got {eps}")
    d = direction / norm
    f0, g0 = objective.value_and_grad(theta)
    return theta, d, eps, float(f0), float(g0.double() @ d.double())


def gradient_test(
    objective: Objective,
    theta: Tensor | None = None,
    *,
    direction: Tensor | None = None,
    eps: list[float] | None = None,
    seed: int = 0,
    tolerance: float = 0.2,
) -> TaylorTest:
    """The gradient test of eq. 31 by central differences; expected order 2.

    ``direction`` defaults to a random unit vector (from ``seed``); ``eps`` to a decade-spaced
    range suited to the objective's dtype.
    """
    theta, d, eps, f0, dg = _prepare(objective, theta, direction, seed, eps)
    u = torch.finfo(objective.dtype).eps
    errors, floors = [], []
    with _smooth_piece(objective, theta):
        for e in eps:
            fp = float(objective.value(theta + e * d))
            fm = float(objective.value(theta - e * d))
            errors.append(abs((fp - fm) / (2 * e) - dg))
            floors.append(u * (abs(fp) + abs(fm) + abs(f0)) / (2 * e))
    order, used = _fit_order(eps, errors, floors)
    return TaylorTest("gradient", eps, errors, 2.0, order, used, f0, dg, tolerance=tolerance)


def hessian_test(
    objective: Objective,
    theta: Tensor | None = None,
    *,
    direction: Tensor | None = None,
    eps: list[float] | None = None,
    seed: int = 0,
    tolerance: float = 0.2,
) -> TaylorTest:
    """The second-order Taylor test of the Hessian-vector product; expected order 3."""
    scale = 1.0 if objective.dtype == torch.float64 else 10.0
    theta, d, eps, f0, dg = _prepare(objective, theta, direction, seed, eps, scale)
    dHd = float(objective.hvp(theta, d).double() @ d.double())
    u = torch.finfo(objective.dtype).eps
    errors, floors = [], []
    with _smooth_piece(objective, theta):
        for e in eps:
            fe = float(objective.value(theta + e * d))
            errors.append(abs(fe - f0 - e * dg - 0.5 * e * e * dHd))
            floors.append(u * (abs(fe) + abs(f0)) * 4)
    order, used = _fit_order(eps, errors, floors)
    return TaylorTest("hessian", eps, errors, 3.0, order, used, f0, dg, tolerance=tolerance)

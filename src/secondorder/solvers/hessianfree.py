"""Mini-batch Hessian-free optimisation (Martens 2010) as a direction rule of
:func:`~secondorder.solvers.minimize`.

At θ_k, with g the gradient on the current batch and B the Gauss–Newton matrix (or the
Hessian) on the objective's curvature samples (its ``curvature_sampler``, else the same
batch), conjugate gradients minimise the damped model

    q_λ(x) = gᵀx + ½ xᵀ(B + λI)x,

warm-started from x₀ = ``warm_start``·(the previous CG solution) and stopped at the relative
residual ``cg_tol`` (default min(0.5, √‖g‖₂)) or after ``max_cg`` steps. With ``backtrack``
the iterates at CG steps ⌈1.3ⁱ⌉ (and the last) are kept, and the step d is found by walking
back from the last one while the objective on the batch decreases (CG backtracking). The
damping follows the Levenberg–Marquardt rule on the reduction ratio of the undamped model
q(d) = gᵀd + ½dᵀBd:

    ρ = (f(θ + d) − f(θ)) / q(d),   λ ← 3/2·λ if ρ < 1/4,   λ ← 2/3·λ if ρ > 3/4

(ρ = −∞ when q(d) ≥ 0: the model predicts no decrease). The step rule (Armijo by default)
then searches along d from α = 1.
"""

from __future__ import annotations

import math

from torch import Tensor

from secondorder.linalg import dot64, norm64
from secondorder.solvers.directions import (
    CGResult,
    NewtonCG,
    conjugate_gradient,
    negative_curvature_note,
)
from secondorder.solvers.protocol import Direction, Iterate

__all__ = ["HessianFree", "backtrack_choice", "saved_steps"]

#: CG iterates are kept at steps ⌈SPACING^i⌉ for CG backtracking (Martens' choice)
SPACING = 1.3


def saved_steps(max_cg: int) -> frozenset[int]:
    """The CG steps ⌈1.3ⁱ⌉ ≤ ``max_cg`` (i = 0, 1, …) whose iterates CG backtracking keeps."""
    steps, i = set(), 0
    while (j := math.ceil(SPACING**i)) <= max_cg:
        steps.add(j)
        i += 1
    return frozenset(steps)


def backtrack_choice(values: list[float]) -> int:
    """The index CG backtracking picks among the saved iterates' objective ``values``
    (oldest first): start at the last and step back while the value decreases. A non-finite
    value counts as +∞, so a blown-up last iterate is always stepped back from."""
    vals = [v if math.isfinite(v) else math.inf for v in values]
    i = len(vals) - 1
    while i > 0 and vals[i - 1] < vals[i]:
        i -= 1
    return i


class HessianFree(Direction):
    """Martens' Hessian-free step (see module doc)."""

    name = "hessian-free"
    restart_on_non_descent = True  # forget the warm start

    def __init__(
        self,
        curvature: str = "ggn",
        damping: float = 1.0,
        max_cg: int = 250,
        cg_tol: float | None = None,
        warm_start: float = 0.95,
        backtrack: bool = True,
    ) -> None:
        super().__init__()
        self.curvature = curvature
        self.damping = float(damping)
        self.max_cg = max_cg
        self.cg_tol = cg_tol
        self.warm_start = warm_start
        self.backtrack = backtrack
        self.p_prev: Tensor | None = None
        self.cg_total = 0
        self._steps = saved_steps(max_cg) if backtrack else frozenset()

    def _cg(self, it: Iterate, product, x0: Tensor | None) -> tuple[CGResult, list]:
        """CG on (B + λI)x = −g; the kept iterates as (step, x, xᵀBx), the last included."""
        g, lam = it.g, self.damping
        rtol = self.cg_tol if self.cg_tol is not None else min(0.5, math.sqrt(norm64(g)))
        kept: list[tuple[int, Tensor, float]] = []

        def record(j: int, x: Tensor, xAx: float) -> None:
            if j in self._steps:
                kept.append((j, x, xAx - lam * dot64(x, x)))

        minv = None if it.precond is None else it.precond.apply
        res = conjugate_gradient(
            product,
            g,
            damping=lam,
            minv=minv,
            x0=x0,
            rtol=rtol,
            max_iter=self.max_cg,
            record=record,
        )
        if not kept or kept[-1][0] != res.iterations:
            kept.append((res.iterations, res.x, res.xBx))
        return res, kept

    def compute(self, it: Iterate) -> Tensor:
        obj = it.objective
        product = obj.hvp_at(it.theta) if self.curvature == "hessian" else obj.ggnvp_at(it.theta)
        x0 = None
        if self.warm_start and self.p_prev is not None and not self.fresh:
            x0 = self.warm_start * self.p_prev
        res, kept = self._cg(it, product, x0)
        if x0 is not None and not NewtonCG._usable(res, it.g):
            cold, kept = self._cg(it, product, None)  # the warm start led CG astray
            cold.iterations += res.iterations
            res = cold
        self.cg_total += res.iterations
        self.p_prev = res.x.detach().clone()  # the next warm start: CG's own solution
        values = [float(obj.value(it.theta + x)) for _, x, _ in kept]
        i = backtrack_choice(values)
        step, d, dBd = kept[i]
        q = dot64(it.g, d) + 0.5 * dBd if math.isfinite(dBd) else math.nan
        rho = (values[i] - it.f) / q if q < 0 else -math.inf
        it.info.update(damping=self.damping, rho=rho, cg_iters=res.iterations, cg_step=step)
        if res.negative_curvature:
            it.negative_curvature = negative_curvature_note(res, self.curvature)
        if rho < 0.25:
            self.damping *= 1.5
        elif rho > 0.75:
            self.damping *= 2.0 / 3.0
        return d

    def initial_step(self, it: Iterate, d: Tensor, dphi0: float) -> float:
        return it.lr

    def reset(self) -> None:
        super().reset()
        self.p_prev = None

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "p_prev": None if self.p_prev is None else self.p_prev.clone(),
            "damping": self.damping,
            "cg_total": self.cg_total,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        p = state.get("p_prev")
        self.p_prev = None if p is None else p.clone()
        self.damping = state.get("damping", self.damping)
        self.cg_total = state.get("cg_total", 0)

"""Direction rules: where to step from θ_k, given f, ∇f and (optionally) curvature.

Each rule computes d_k, proposes a first trial step α₀ for the step rule, takes the curvature
pair (s_k, y_k) after a step, and can save and restore its state (for checkpoint / resume):

- :class:`SteepestDescent` — d = −M⁻¹g.
- :class:`Newton` — d = −H⁻¹g with the dense Hessian (Cholesky); an indefinite H is modified
  (``"damping"``: H + τI with τ increased until Cholesky succeeds; ``"eigen"``: eigenvalues
  clamped to ≥ δ; ``"saddle-free"``: |H| via the eigendecomposition, |λ| ≥ δ), with
  δ = sqrt(eps)·max(1, max|λ|).
- :class:`NewtonCG` — Hessian-free: inner conjugate gradients on v ↦ (B + λI)v with B the
  Hessian or the Gauss–Newton matrix (graph built once per outer iteration), stopped at the
  relative residual η_k = min(0.5, sqrt(‖g‖)) (Eisenstat–Walker) or ``cg_tol``, at negative
  curvature pᵀ(B + λI)p ≤ 0 (the last iterate, or −M⁻¹g on the first inner step), warm-started
  from 0.95× the previous solution, and Levenberg–Marquardt damping λ adapted by the
  reduction ratio ρ of the accepted step (Martens 2010): λ ← max(3/2·λ, λ_min) when ρ < 1/4
  (or when CG gave no usable model), λ ← 2/3·λ when ρ > 3/4, and back to 0 once below λ_min,
  with λ_min = 1e-4·max(1, ‖g‖₂). λ starts at ``damping`` (default 0: undamped Newton steps
  until the model predicts poorly), so the damping engages even from 0.
- :class:`NonlinearCG` — d = −M⁻¹g + β d_prev with β of Fletcher–Reeves ("fr"), Polak–Ribière+
  ("pr+"), Hestenes–Stiefel ("hs") or Dai–Yuan ("dy"); restarts with −M⁻¹g every n
  iterations, when β < 0 (pr+), or when d is not a descent direction.

Quasi-Newton directions (BFGS, L-BFGS) are in :mod:`secondorder.solvers.quasinewton` and the
base class :class:`Direction` in :mod:`secondorder.solvers.protocol`; both are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from secondorder._format import format_number
from secondorder.linalg import dot64, norm64
from secondorder.solvers.protocol import Direction, Iterate
from secondorder.solvers.quasinewton import BFGS, LBFGS, two_loop

__all__ = [
    "BFGS",
    "CURVATURES",
    "LBFGS",
    "NEWTON_MODIFICATIONS",
    "NLCG_VARIANTS",
    "Direction",
    "Iterate",
    "Newton",
    "NewtonCG",
    "NonlinearCG",
    "SteepestDescent",
    "conjugate_gradient",
    "two_loop",
]

NLCG_VARIANTS = ("fr", "pr+", "hs", "dy")
NEWTON_MODIFICATIONS = ("damping", "eigen", "saddle-free")
CURVATURES = ("hessian", "ggn")


class SteepestDescent(Direction):
    """d = −M⁻¹g."""

    name = "gd"

    def compute(self, it: Iterate) -> Tensor:
        return -it.minv(it.g)

    def initial_step(self, it, d, dphi0):
        if it.fixed_step:
            return it.lr
        return self._scaled_step(it, d, dphi0)


# -- Newton with the dense Hessian ------------------------------------------------------------
class Newton(Direction):
    """Newton's direction from the dense Hessian (see module doc for the modifications)."""

    name = "newton"

    def __init__(self, modification: str = "damping") -> None:
        super().__init__()
        self.modification = modification

    def compute(self, it: Iterate) -> Tensor:
        H = it.objective.hessian(it.theta)
        g = it.g
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            it.info["tau"] = 0.0
            return -torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1)
        evals, evecs = torch.linalg.eigh(H)
        lam_min = float(evals[0])
        if lam_min < 0:
            it.negative_curvature = (
                f"the Hessian is indefinite (smallest eigenvalue {format_number(lam_min, 3)})"
            )
        it.info["lambda_min"] = lam_min
        eps = torch.finfo(H.dtype).eps
        scale = max(1.0, float(evals.abs().max()))
        delta = math.sqrt(eps) * scale
        modification = self.modification
        if modification == "damping":
            diag_min = float(H.diagonal().min())
            beta = 1e-3 * scale
            tau = beta if diag_min > 0 else -diag_min + beta
            eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
            for _ in range(100):
                L, info = torch.linalg.cholesky_ex(H + tau * eye)
                if int(info) == 0:
                    it.info["tau"] = tau
                    return -torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1)
                tau = max(2.0 * tau, beta)
            # never factorised (a numerically broken H): a failed factor must not be used;
            # the eigenvalue modification needs none (τ = NaN in the trace says so)
            it.info["tau"] = math.nan
            modification = "eigen"
        # eigen: clamp the spectrum from below; saddle-free: |H|
        lam = (evals if modification == "eigen" else evals.abs()).clamp_min(delta)
        return -(evecs @ ((evecs.T @ g) / lam))


# -- conjugate gradients (inner solver of Newton-CG) -----------------------------------------
@dataclass
class CGResult:
    x: Tensor
    iterations: int
    residual: float
    converged: bool
    negative_curvature: bool
    curvature: float  # pᵀBp / pᵀp at detection (nan otherwise)
    xBx: float  # xᵀBx of the returned x (B undamped)


def conjugate_gradient(
    product,
    g: Tensor,
    *,
    damping: float = 0.0,
    minv=None,
    x0: Tensor | None = None,
    rtol: float = 0.5,
    max_iter: int = 250,
    record: Callable[[int, Tensor, float], None] | None = None,
) -> CGResult:
    """Approximately minimise q(x) = ½xᵀ(B + λI)x + gᵀx by preconditioned CG.

    Stops when ‖(B + λI)x + g‖ ≤ rtol·‖g‖, after ``max_iter`` steps, or at a direction p of
    non-positive curvature pᵀ(B + λI)p ≤ 0 (returning the last iterate; on the first step
    from x = 0 it returns −M⁻¹g instead). Also reports xᵀBx for the model reduction.
    ``record(j, x_j, x_jᵀ(B + λI)x_j)``, when given, sees every iterate (j = 1, 2, …)."""
    minv = minv or (lambda v: v)
    gnorm = norm64(g)
    tol = rtol * gnorm
    eps = torch.finfo(g.dtype).eps

    def A(v: Tensor) -> Tensor:
        Bv = product(v)
        return Bv + damping * v if damping else Bv

    if x0 is None:
        x = torch.zeros_like(g)
        r = g.clone()
        xAx = 0.0
    else:
        x = x0.clone()
        Ax = A(x)
        r = Ax + g
        xAx = dot64(x, Ax)
    z = minv(r)
    p = -z
    rz = dot64(r, z)
    neg = False
    curv = float("nan")
    j = 0
    rnorm = norm64(r)
    while j < max_iter and rnorm > tol:
        Ap = A(p)
        pAp = dot64(p, Ap)
        pp = dot64(p, p)
        if pAp - damping * pp < 0:
            curv = (pAp - damping * pp) / pp
            neg = True
        if pAp <= eps * pp:
            curv = (pAp - damping * pp) / pp
            neg = True
            if j == 0 and x0 is None:
                x = -minv(g)
                xAx = float("nan")
            break
        alpha = rz / pAp
        xAp = dot64(x, Ap)
        x = x + alpha * p
        xAx = xAx + 2 * alpha * xAp + alpha * alpha * pAp
        r = r + alpha * Ap
        rnorm = norm64(r)
        z = minv(r)
        rz_new = dot64(r, z)
        p = -z + (rz_new / rz) * p
        rz = rz_new
        j += 1
        if record is not None:
            record(j, x, xAx)
    xBx = xAx - damping * dot64(x, x) if math.isfinite(xAx) else float("nan")
    return CGResult(x, j, rnorm / gnorm if gnorm else 0.0, rnorm <= tol, neg, curv, xBx)


def negative_curvature_note(res: CGResult, curvature: str) -> str:
    """Where CG met negative curvature, in words (for the run's message)."""
    kind = "Hessian" if curvature == "hessian" else "Gauss-Newton matrix"
    return (
        f"negative curvature of the {kind} met in CG step {res.iterations + 1} "
        f"(pᵀBp/pᵀp = {format_number(res.curvature, 3)})"
    )


class NewtonCG(Direction):
    """Hessian-free Newton (see module doc)."""

    name = "newton-cg"
    restart_on_non_descent = True  # forget the warm start

    def __init__(
        self,
        curvature: str = "hessian",
        damping: float = 0.0,
        cg_max_iter: int | None = None,
        cg_tol: float | None = None,
        warm_start: bool = True,
        warm_decay: float = 0.95,
    ) -> None:
        super().__init__()
        self.curvature = curvature
        self.damping = float(damping)
        self.cg_max_iter = cg_max_iter
        self.cg_tol = cg_tol
        self.warm_start = warm_start
        self.warm_decay = warm_decay
        self.p_prev: Tensor | None = None
        self._model: tuple[float, float] | None = None  # (gᵀp, pᵀBp) of the last direction
        self.cg_total = 0

    def compute(self, it: Iterate) -> Tensor:
        obj = it.objective
        product = obj.hvp_at(it.theta) if self.curvature == "hessian" else obj.ggnvp_at(it.theta)
        g = it.g
        gnorm = norm64(g)
        rtol = self.cg_tol if self.cg_tol is not None else min(0.5, math.sqrt(gnorm))
        max_iter = self.cg_max_iter or min(2 * g.numel(), 250)
        minv = None if it.precond is None else it.precond.apply
        x0 = None
        if self.warm_start and self.p_prev is not None and not self.fresh:
            x0 = self.warm_decay * self.p_prev
        res = conjugate_gradient(
            product, g, damping=self.damping, minv=minv, x0=x0, rtol=rtol, max_iter=max_iter
        )
        # a warm start CG could not improve (negative curvature at its first step leaves x₀
        # as it is, and each outer step would shrink by warm_decay near a saddle), or one
        # that is no descent direction: solve again from zero
        stuck = res.negative_curvature and res.iterations == 0
        if x0 is not None and (stuck or not self._usable(res, g)):
            cold = conjugate_gradient(
                product, g, damping=self.damping, minv=minv, rtol=rtol, max_iter=max_iter
            )
            cold.iterations += res.iterations
            res = cold
        self.cg_total += res.iterations
        it.info["cg_iters"] = res.iterations
        if self.damping:
            it.info["damping"] = self.damping
        if res.negative_curvature:
            it.negative_curvature = negative_curvature_note(res, self.curvature)
        d = res.x
        self.p_prev = d.detach().clone()
        self._model = (dot64(g, d), res.xBx)
        return d

    @staticmethod
    def _usable(res: CGResult, g: Tensor) -> bool:
        gx = dot64(g, res.x)
        if not gx < 0:
            return False
        q = gx + 0.5 * res.xBx if math.isfinite(res.xBx) else gx
        return q < 0

    def initial_step(self, it, d, dphi0):
        return it.lr

    #: λ_min = DAMPING_FLOOR·max(1, ‖g‖₂): where λ starts from when ρ is poor at λ = 0
    DAMPING_FLOOR = 1e-4

    def after_step(self, it, alpha, dphi0, f_new):
        super().after_step(it, alpha, dphi0, f_new)
        if self._model is None:
            return
        gp, pBp = self._model
        rho = -math.inf  # no usable model (CG met negative curvature at once): as poor as it gets
        if math.isfinite(pBp):
            q = alpha * gp + 0.5 * alpha * alpha * pBp  # reduction predicted by the undamped model
            if q < 0:
                rho = (f_new - it.f) / q
            it.info["rho"] = rho
        floor = self.DAMPING_FLOOR * max(1.0, norm64(it.g))
        if rho < 0.25:
            self.damping = max(1.5 * self.damping, floor)
        elif rho > 0.75:
            self.damping *= 2.0 / 3.0
            if self.damping < floor:
                self.damping = 0.0

    def reset(self):
        super().reset()
        self.p_prev = None

    def state_dict(self):
        return {
            **super().state_dict(),
            "p_prev": None if self.p_prev is None else self.p_prev.clone(),
            "damping": self.damping,
            "cg_total": self.cg_total,
        }

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.p_prev = state.get("p_prev")
        self.damping = state.get("damping", self.damping)
        self.cg_total = state.get("cg_total", 0)


# -- nonlinear conjugate gradients -------------------------------------------------------------
class NonlinearCG(Direction):
    """Nonlinear CG with a choice of β (see module doc); preconditioned with M⁻¹ if given."""

    name = "nlcg"

    def __init__(self, variant: str = "pr+", restart_every: int | None = None) -> None:
        super().__init__()
        self.variant = variant
        self.restart_every = restart_every
        self.d_prev: Tensor | None = None
        self.gz_prev: float | None = None  # g_{k−1}ᵀ M⁻¹ g_{k−1}
        self.y: Tensor | None = None
        self.since_restart = 0
        self.restarts = 0

    def update(self, s, y, it):
        self.y = y

    def compute(self, it: Iterate) -> Tensor:
        z = it.minv(it.g)
        gz = dot64(it.g, z)
        n = self.restart_every or it.g.numel()
        beta = None
        if self.d_prev is not None and self.gz_prev and not self.fresh and self.since_restart < n:
            y, dp = self.y, self.d_prev
            if self.variant == "fr":
                beta = gz / self.gz_prev
            elif self.variant == "pr+":
                beta = max(0.0, dot64(z, y) / self.gz_prev) if y is not None else None
            elif self.variant == "hs":
                dy = dot64(dp, y) if y is not None else 0.0
                beta = dot64(z, y) / dy if dy else None
            else:  # dy
                dy = dot64(dp, y) if y is not None else 0.0
                beta = gz / dy if dy else None
            if beta is not None and not math.isfinite(beta):
                beta = None
        if beta is None or beta == 0.0:
            d = -z
            if self.d_prev is not None:
                self.restarts += 1
            self.since_restart = 0
        else:
            d = -z + beta * self.d_prev
            self.since_restart += 1
        it.info["beta"] = 0.0 if beta is None else beta
        self.gz_prev = gz
        self.d_prev = d
        return d

    def initial_step(self, it, d, dphi0):
        if it.fixed_step:
            return it.lr
        if self.fresh or self.f_prev is None:
            return self._first_step(it, d)
        # α₀ from the quadratic through f_{k−1}, f_k and φ′(0) (NW eq. 3.60, second form)
        a = 2.0 * (it.f - self.f_prev) / dphi0
        if not (math.isfinite(a) and a > 0):
            return self._scaled_step(it, d, dphi0)
        return it.lr * 1.01 * a

    def reset(self):
        super().reset()
        self.d_prev = None
        self.gz_prev = None
        self.y = None
        self.since_restart = 0

    def on_change(self, it, robust):
        if robust:
            self.d_prev = None
            self.gz_prev = None

    def state_dict(self):
        return {
            **super().state_dict(),
            "d_prev": None if self.d_prev is None else self.d_prev.clone(),
            "gz_prev": self.gz_prev,
            "y": None if self.y is None else self.y.clone(),
            "since_restart": self.since_restart,
            "restarts": self.restarts,
        }

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.d_prev = state.get("d_prev")
        self.gz_prev = state.get("gz_prev")
        self.y = state.get("y")
        self.since_restart = state.get("since_restart", 0)
        self.restarts = state.get("restarts", 0)

"""Leaving a strict saddle along a direction of negative curvature.

At a stationary point θ (‖∇f‖ ≤ gtol) where the Hessian has an eigenvalue λ < 0 with unit
eigenvector v, f(θ + t·s·v) = f(θ) + t·s·gᵀv + ½λt² + O(t³) decreases for small t > 0 with
the sign s = −sign(gᵀv) (s = +1 when gᵀv = 0). Methods that hold curvature information
(``MethodEntry.escapes_saddles``) take that step instead of stopping with status ``saddle``:
the trust-region methods scale it by their own model — t = Δ (trust-ncg: the step to the
boundary, where the quadratic model is lowest along v) or t = −λ/σ (ARC: the minimiser of
½λt² + σ/3·t³) — and shrink Δ or double σ after a rejected trial; the others start from
t = 1 and halve it. A trial is taken when it gives the sufficient decrease
f(θ + t·s·v) ≤ f(θ) + c·(t·s·gᵀv + ½λt²), c = 10⁻⁴.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from secondorder.lanczos import Lanczos
from secondorder.linalg import dot64
from secondorder.objective import Objective

__all__ = ["escape_step", "lowest_eigenpair"]

#: sufficient decrease along the escape direction, as a fraction of the quadratic model's
_C = 1e-4
#: trials before giving up (t halves each time: 2⁻⁶⁰ of the first length)
_TRIALS = 60


def lowest_eigenpair(
    objective: Objective, theta: Tensor, dense: bool, steps: int = 30
) -> tuple[float, Tensor, float]:
    """(λ_min, its unit eigenvector, max |λ|) of the Hessian at θ: from the dense Hessian
    (``dense``) or from ``steps`` Lanczos steps from a seeded random start (a Ritz pair)."""
    n = theta.numel()
    if dense:
        ev, V = torch.linalg.eigh(objective.hessian(theta))
        return float(ev[0]), V[:, 0], float(ev.abs().max())
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(device=theta.device)
    product = objective.hvp_at(theta)
    lz = Lanczos(
        lambda v: product(v.to(theta.dtype)).to(torch.float64), q, min(n, steps), generator=gen
    ).run()
    values, S = lz.ritz()
    v = lz.basis @ torch.as_tensor(S[:, 0], dtype=torch.float64, device=lz.basis.device)
    v = (v / v.norm()).to(theta.dtype)
    return float(values[0]), v, float(max(abs(values[0]), abs(values[-1])))


def escape_step(
    solver, evaluate, theta: Tensor, f: float, g: Tensor, lam: float, v: Tensor
) -> tuple[Tensor, float, Tensor, float] | None:
    """(θ', f', g', t) after a step along ±v with sufficient decrease, or None when no trial
    gives one. ``solver`` may define ``escape_length(λ)`` (the first t) and
    ``escape_rejected()`` (after a rejected trial; then t is asked again); else t starts at 1
    and halves."""
    gv = dot64(g, v)
    d = -v if gv > 0 else v
    slope = -abs(gv)
    own = hasattr(solver, "escape_length")
    t = solver.escape_length(lam) if own else 1.0
    for _ in range(_TRIALS):
        x = theta + t * d
        f_new, g_new = evaluate(x)
        f_new = float(f_new)
        model = t * slope + 0.5 * lam * t * t
        finite = math.isfinite(f_new) and bool(torch.isfinite(g_new).all())
        if finite and f_new <= f + _C * model and f_new < f:
            return x, f_new, g_new, t
        if own:
            solver.escape_rejected()
            t = solver.escape_length(lam)
        else:
            t *= 0.5
    return None

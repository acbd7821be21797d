"""Quasi-Newton directions: dense BFGS and limited-memory BFGS.

- :class:`BFGS` — dense inverse update, H₀ = (yᵀs/yᵀy)I before the first update (NW 6.20);
  pairs with yᵀs ≤ sqrt(eps)‖s‖‖y‖ are skipped.
- :class:`LBFGS` — the two-loop recursion over the last ``memory`` pairs, H₀ = γI with
  γ = sᵀy/yᵀy (or γM⁻¹ with γ = sᵀy/yᵀM⁻¹y when a diagonal or named preconditioner, e.g.
  K-FAC's, is given; a callable's M⁻¹ keeps γ = sᵀy/yᵀy); pairs violating the curvature
  condition are skipped and counted.

Both take the curvature pair (s_k, y_k) of the last step in ``update`` before ``compute``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from secondorder.linalg import check_dense_fits, dot64, norm64
from secondorder.solvers.protocol import Direction, Iterate

__all__ = ["BFGS", "LBFGS", "two_loop"]


def _curvature_ok(s: Tensor, y: Tensor, sy: float) -> bool:
    eps = torch.finfo(s.dtype).eps
    return math.isfinite(sy) and sy > math.sqrt(eps) * norm64(s) * norm64(y)


class BFGS(Direction):
    """Dense BFGS on the inverse Hessian approximation H (see module doc)."""

    name = "bfgs"

    def __init__(self) -> None:
        super().__init__()
        self.H: Tensor | None = None
        self.skipped = 0
        self.updates = 0

    def _h0(self, it: Iterate, s: Tensor, y: Tensor, sy: float) -> Tensor:
        n = s.numel()
        check_dense_fits((n, n), s.dtype, "the dense BFGS matrix", device=s.device)
        if it.precond is not None and it.precond.is_diagonal:
            minv = it.precond.inverse_diagonal()
            gamma = sy / dot64(y, minv * y)
            return torch.diag(gamma * minv)
        if it.precond is not None:
            eye = torch.eye(n, dtype=s.dtype, device=s.device)
            M = torch.stack([it.precond.apply(eye[i]) for i in range(n)], 1)
            M = 0.5 * (M + M.T)
            return (sy / dot64(y, M @ y)) * M
        return (sy / dot64(y, y)) * torch.eye(n, dtype=s.dtype, device=s.device)

    def update(self, s, y, it):
        sy = dot64(s, y)
        if not _curvature_ok(s, y, sy):
            self.skipped += 1
            return
        if self.H is None:
            self.H = self._h0(it, s, y, sy)
        H = self.H
        rho = 1.0 / sy
        Hy = H @ y
        yHy = dot64(y, Hy)
        self.H = (
            H
            - rho * (torch.outer(Hy, s) + torch.outer(s, Hy))
            + (rho * rho * yHy + rho) * torch.outer(s, s)
        )
        self.H = 0.5 * (self.H + self.H.T)
        self.updates += 1

    def compute(self, it: Iterate) -> Tensor:
        if self.H is None:
            return -it.minv(it.g)
        return -(self.H @ it.g)

    def initial_step(self, it, d, dphi0):
        if it.fixed_step:
            return it.lr
        return self._first_step(it, d) if self.H is None else it.lr

    def reset(self):
        super().reset()
        self.H = None

    def state_dict(self):
        return {
            **super().state_dict(),
            "H": None if self.H is None else self.H.clone(),
            "skipped": self.skipped,
            "updates": self.updates,
        }

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.H = state.get("H")
        self.skipped = state.get("skipped", 0)
        self.updates = state.get("updates", 0)


def two_loop(q: Tensor, S: list[Tensor], Y: list[Tensor], rho: list[float], h0) -> Tensor:
    """The L-BFGS two-loop recursion: returns H q for the inverse-Hessian approximation H
    built from the pairs (S[i], Y[i]), ρ_i = 1/(sᵢᵀyᵢ), oldest first; ``h0`` is a float γ
    (H₀ = γI) or a callable v ↦ H₀v. ``q`` is overwritten."""
    n = len(S)
    a = [0.0] * n
    for i in range(n - 1, -1, -1):
        a[i] = float(S[i].dot(q)) * rho[i]
        q.add_(Y[i], alpha=-a[i])
    r = h0(q) if callable(h0) else torch.mul(q, h0)
    for i in range(n):
        b = float(Y[i].dot(r)) * rho[i]
        r.add_(S[i], alpha=a[i] - b)
    return r


class LBFGS(Direction):
    """Limited-memory BFGS (see module doc)."""

    name = "lbfgs"

    def __init__(self, memory: int = 10) -> None:
        super().__init__()
        self.memory = memory
        self.S: list[Tensor] = []
        self.Y: list[Tensor] = []
        self.rho: list[float] = []
        self.gamma = 1.0
        self.skipped = 0

    def update(self, s, y, it):
        sy = dot64(s, y)
        if not _curvature_ok(s, y, sy):
            self.skipped += 1
            return
        if len(self.S) == self.memory:
            self.S.pop(0)
            self.Y.pop(0)
            self.rho.pop(0)
        self.S.append(s)
        self.Y.append(y)
        self.rho.append(1.0 / sy)
        if it.precond is not None and it.precond.approximates_curvature:
            self.gamma = sy / dot64(y, it.precond.apply(y))
        else:
            self.gamma = sy / dot64(y, y)

    def compute(self, it: Iterate) -> Tensor:
        if not self.S:
            return -it.minv(it.g)
        if it.precond is not None:
            gamma = self.gamma

            def h0(v: Tensor) -> Tensor:
                return gamma * it.precond.apply(v)
        else:
            h0 = self.gamma
        return two_loop(it.g.neg(), self.S, self.Y, self.rho, h0)

    def initial_step(self, it, d, dphi0):
        if it.fixed_step:
            return it.lr
        return self._first_step(it, d) if not self.S else it.lr

    def reset(self):
        super().reset()
        self.S, self.Y, self.rho = [], [], []
        self.gamma = 1.0

    def state_dict(self):
        return {
            **super().state_dict(),
            "S": [s.clone() for s in self.S],
            "Y": [y.clone() for y in self.Y],
            "rho": list(self.rho),
            "gamma": self.gamma,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.S = [s.clone() for s in state.get("S", [])]
        self.Y = [y.clone() for y in state.get("Y", [])]
        self.rho = list(state.get("rho", []))
        self.gamma = state.get("gamma", 1.0)
        self.skipped = state.get("skipped", 0)

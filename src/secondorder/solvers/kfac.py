"""K-FAC (Martens & Grosse 2015) as a direction rule of :func:`~secondorder.solvers.minimize`.

Each layer's Gauss–Newton block is approximated by G ⊗ A (see
:mod:`secondorder.curvature.kfac`), with running averages A ← ρA + (1 − ρ)A_k (the same for
G, ρ = ``ema``) over the functions of successive iterations. With factored Tikhonov damping
γ = ``damping`` + c (c the L2 coefficient, whose curvature is cI on the weights) the direction
of layer l is

    D̃_l = −(G + γ^{1/2}/π I)⁻¹ ∇_{W̃} (A + π γ^{1/2} I)⁻¹,   π² = (tr A / dim A) / (tr G / dim G),

with the damped inverses refreshed every ``inv_every`` iterations. With ``rescale`` the first
trial step is the minimiser of the quadratic model along d (Martens & Grosse's α):

    α* = −∇fᵀd / (dᵀ(B + γI)d),  B the Gauss–Newton matrix (one product per iteration).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from secondorder.curvature.kfac import KroneckerInverse, kfac_factors, mlp_structure
from secondorder.linalg import dot64
from secondorder.solvers.protocol import Direction, Iterate

__all__ = ["KFAC"]


def _clone(ts: list[Tensor] | None) -> list[Tensor] | None:
    return None if ts is None else [t.detach().clone() for t in ts]


class KFAC(Direction):
    """d = −(K-FAC approximation of B + γI)⁻¹ g, layer by layer (see module doc)."""

    name = "kfac"

    def __init__(
        self, damping: float, kind: str, ema: float, inv_every: int, rescale: bool, seed: int
    ) -> None:
        super().__init__()
        self.damping, self.kind, self.ema = damping, kind, ema
        self.inv_every, self.rescale, self.seed = inv_every, rescale, seed
        self.A: list[Tensor] | None = None
        self.G: list[Tensor] | None = None
        self.A_inv: list[Tensor] | None = None
        self.G_inv: list[Tensor] | None = None
        self.updates = 0
        self.generator: torch.Generator | None = None
        self._structure = None

    # -- the factors -------------------------------------------------------------------------
    def _update_factors(self, it: Iterate) -> None:
        objective = it.objective
        if self._structure is None:
            self._structure = mlp_structure(objective.model)
        if self.kind == "mc" and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.seed)
        factors = kfac_factors(
            objective,
            it.theta,
            kind=self.kind,
            generator=self.generator,
            structure=self._structure,
        )
        if self.A is None:
            self.A = [f.A for f in factors]
            self.G = [f.G for f in factors]
        else:
            r = self.ema
            self.A = [r * A + (1 - r) * f.A for A, f in zip(self.A, factors)]
            self.G = [r * G + (1 - r) * f.G for G, f in zip(self.G, factors)]

    def _gamma(self, it: Iterate) -> float:
        return self.damping + float(getattr(it.objective, "l2_coefficient", 0.0))

    def _invert(self, it: Iterate) -> None:
        inverse = KroneckerInverse.from_factors(
            self._structure.layers, self.A, self.G, self._gamma(it)
        )
        self.A_inv, self.G_inv = inverse.A_inv, inverse.G_inv

    # -- the protocol ----------------------------------------------------------------------
    def compute(self, it: Iterate) -> Tensor:
        self._update_factors(it)
        if self.A_inv is None or self.updates % self.inv_every == 0:
            self._invert(it)
        self.updates += 1
        inverse = KroneckerInverse(self._structure.layers, self.A_inv, self.G_inv)
        return -inverse.apply(it.g)

    def initial_step(self, it: Iterate, d: Tensor, dphi0: float) -> float:
        if not self.rescale:
            return it.lr
        Bd = it.objective.ggnvp(it.theta, d)
        curv = dot64(d, Bd) + self._gamma(it) * dot64(d, d)
        alpha = -dphi0 / curv if curv > 0 else 1.0
        return it.lr * alpha if math.isfinite(alpha) and alpha > 0 else it.lr

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "A": _clone(self.A),
            "G": _clone(self.G),
            "A_inv": _clone(self.A_inv),
            "G_inv": _clone(self.G_inv),
            "updates": self.updates,
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.A, self.G = _clone(state.get("A")), _clone(state.get("G"))
        self.A_inv, self.G_inv = _clone(state.get("A_inv")), _clone(state.get("G_inv"))
        self.updates = int(state.get("updates", 0))
        gen = state.get("generator")
        if gen is not None:
            self.generator = torch.Generator().manual_seed(self.seed)
            self.generator.set_state(gen)

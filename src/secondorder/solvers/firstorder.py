"""First-order references: stochastic gradient descent with momentum and Adam, as direction
rules of :func:`~secondorder.solvers.minimize` with a fixed step α = ``lr``.

On a reshuffled sampler one iteration is one mini-batch step, exactly as in a ``torch.optim``
training loop, so second-order methods can be compared with what practitioners use, in the
same loop, traces, checkpoints and reports. The updates follow ``torch.optim.SGD`` and
``torch.optim.Adam`` (the tests check them step for step):

**SGD** (momentum μ, dampening τ, weight decay λ, optionally Nesterov):
    g̃ = M⁻¹(g + λθ),  b ← μ b + (1 − τ) g̃  (b₁ = g̃),  d = −(g̃ + μ b) (Nesterov) or −b.

**Adam** (Kingma & Ba 2015; AdamW of Loshchilov & Hutter with ``decoupled_weight_decay``):
    m ← β₁ m + (1 − β₁) g,  v ← β₂ v + (1 − β₂) g²,
    d = −(m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)  (− λθ when decoupled; with coupled
    weight decay g is g + λθ); ``amsgrad`` uses the running maximum of v.

Neither needs a descent direction: momentum may point uphill for the current batch, which is
the point of it, so the loop does not replace such a step by −M⁻¹g.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from secondorder.solvers.protocol import Direction, Iterate

__all__ = ["Adam", "MomentumSGD"]


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone()


class MomentumSGD(Direction):
    """d = −b (heavy ball) or −(g̃ + μb) (Nesterov) with b the momentum buffer (see module)."""

    name = "sgd"
    requires_descent = False

    def __init__(
        self, momentum: float, dampening: float, nesterov: bool, weight_decay: float
    ) -> None:
        super().__init__()
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
        self.momentum = momentum
        self.dampening = dampening
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.buffer: Tensor | None = None

    def compute(self, it: Iterate) -> Tensor:
        g = it.g if self.weight_decay == 0 else it.g.add(it.theta, alpha=self.weight_decay)
        g = it.minv(g)
        if self.momentum == 0:
            return -g
        if self.buffer is None:
            self.buffer = g.clone()
        else:
            self.buffer = self.buffer.mul(self.momentum).add(g, alpha=1 - self.dampening)
        step = g.add(self.buffer, alpha=self.momentum) if self.nesterov else self.buffer
        return -step

    def reset(self) -> None:
        super().reset()
        self.buffer = None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": _clone(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer = _clone(state.get("buffer"))


class Adam(Direction):
    """The Adam / AdamW direction with bias-corrected moments (see module)."""

    name = "adam"
    requires_descent = False

    def __init__(
        self,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        decoupled_weight_decay: bool,
        amsgrad: bool,
    ) -> None:
        super().__init__()
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.weight_decay = weight_decay
        self.decoupled = decoupled_weight_decay
        self.amsgrad = amsgrad
        self.t = 0
        self.m: Tensor | None = None
        self.v: Tensor | None = None
        self.v_max: Tensor | None = None

    def compute(self, it: Iterate) -> Tensor:
        g = it.g
        if self.weight_decay and not self.decoupled:
            g = g.add(it.theta, alpha=self.weight_decay)
        if self.m is None:
            self.m, self.v = torch.zeros_like(g), torch.zeros_like(g)
        self.t += 1
        self.m = self.m.lerp(g, 1 - self.beta1)
        self.v = self.v.mul(self.beta2).addcmul(g, g, value=1 - self.beta2)
        v = self.v
        if self.amsgrad:
            self.v_max = v.clone() if self.v_max is None else torch.maximum(self.v_max, v)
            v = self.v_max
        denom = (v.sqrt() / math.sqrt(1 - self.beta2**self.t)).add(self.eps)
        d = -(self.m / (1 - self.beta1**self.t)) / denom
        if self.weight_decay and self.decoupled:
            d = d.sub(it.theta, alpha=self.weight_decay)
        return d

    def reset(self) -> None:
        super().reset()
        self.t, self.m, self.v, self.v_max = 0, None, None, None

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "t": self.t,
            "m": _clone(self.m),
            "v": _clone(self.v),
            "v_max": _clone(self.v_max),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.t = int(state.get("t", 0))
        self.m, self.v, self.v_max = (_clone(state.get(k)) for k in ("m", "v", "v_max"))

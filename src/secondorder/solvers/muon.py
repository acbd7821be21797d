"""Muon (Jordan et al. 2024): momentum orthogonalised by a Newton–Schulz iteration, on every
weight matrix and convolution kernel of a network; AdamW on its other parameters (the
biases), as a direction rule of :func:`~secondorder.solvers.minimize` with a fixed step
α = ``lr``.

For a weight W (a kernel (out, in, kh, kw) read as the (out, in·kh·kw) matrix) with gradient
G, momentum μ and weight decay λ:

    B ← μ B + (1 − μ) G,   U = (1 − μ) G + μ B (Nesterov) or B,
    O = NS₅(U / ‖U‖_F),    W ← W − α λ W − α √max(1, out/in) O,

where NS₅ is five steps of the quintic X ← a X + (b XXᵀ + c (XXᵀ)²) X with
(a, b, c) = (3.4445, −4.7750, 2.0315), run on the wide orientation of U: it maps the
singular values of U towards 1 (roughly U Vᵀ of U's SVD), in bfloat16 as torch.optim.Muon
does. The other parameters take AdamW steps of length ``adamw_lr``. Every parameter with two
or more dimensions counts as a matrix, the classifier's weight included (Muon's authors leave
the output layer and embeddings to AdamW; here it is one rule for all weights). The tests
check the iterates against torch.optim.Muon with torch.optim.AdamW on the biases.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from secondorder.solvers.firstorder import Adam
from secondorder.solvers.protocol import Direction, Iterate

__all__ = ["Muon", "newton_schulz"]

#: the quintic's coefficients (Jordan et al. 2024)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(U: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """The orthogonalisation NS(U) of a matrix: ``steps`` quintic Newton–Schulz steps on
    U/‖U‖_F in bfloat16 (on Uᵀ when U is tall), returned in bfloat16."""
    a, b, c = NS_COEFFICIENTS
    tall = U.shape[0] > U.shape[1]
    X = U.to(torch.bfloat16)
    if tall:
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(steps):
        gram = X @ X.T
        X = torch.addmm(X, torch.addmm(gram, gram, gram, beta=b, alpha=c), X, beta=a)
    return X.T if tall else X


class Muon(Direction):
    """Muon on the matrices of a ModelObjective's network, AdamW on the rest (see module)."""

    name = "muon"
    requires_descent = False

    def __init__(
        self,
        momentum: float,
        nesterov: bool,
        weight_decay: float,
        ns_steps: int,
        adamw_lr: float,
        adamw_weight_decay: float,
    ) -> None:
        super().__init__()
        self.momentum, self.nesterov = momentum, nesterov
        self.weight_decay, self.ns_steps = weight_decay, ns_steps
        self.adamw_lr, self.adamw_weight_decay = adamw_lr, adamw_weight_decay
        self._adam = Adam(0.9, 0.999, 1e-8, adamw_weight_decay, True, False)
        self.buffers: dict[int, Tensor] = {}
        self._layout: tuple | None = None

    @staticmethod
    def layout(objective) -> tuple[list[tuple[slice, tuple[int, int]]], list[slice]]:
        """Where the matrices lie in θ, each with its 2-D shape, and where the rest lies: from
        the shapes θ was laid out with when the ModelObjective was built (``minimize``
        refuses other objectives for this method before any work)."""
        mats, rest, at = [], [], 0
        for shape in objective.shapes:
            n = math.prod(shape)
            if len(shape) >= 2:
                mats.append((slice(at, at + n), (shape[0], n // shape[0])))
            else:
                rest.append(slice(at, at + n))
            at += n
        return mats, rest

    def compute(self, it: Iterate) -> Tensor:
        if self._layout is None:
            self._layout = self.layout(it.objective)
        mats, rest = self._layout
        d = torch.zeros_like(it.g)
        mu = self.momentum
        for j, (sl, shape) in enumerate(mats):
            g = it.g[sl].view(shape)
            buf = self.buffers.get(j)
            buf = (1 - mu) * g if buf is None else buf.lerp(g, 1 - mu)
            self.buffers[j] = buf
            U = g.lerp(buf, mu) if self.nesterov else buf
            O = newton_schulz(U, self.ns_steps).to(g.dtype)
            scale = math.sqrt(max(1.0, shape[0] / shape[1]))
            d[sl] = -(scale * O + self.weight_decay * it.theta[sl].view(shape)).reshape(-1)
        if rest:
            theta = torch.cat([it.theta[sl] for sl in rest])
            sub = dataclasses.replace(it, theta=theta, g=torch.cat([it.g[sl] for sl in rest]))
            # AdamW's step length relative to the loop's step lr (under a line search the
            # search's α replaces lr for both parts, keeping the ratio adamw_lr : lr)
            step = self._adam.compute(sub) * (self.adamw_lr / it.lr)
            for sl, part in zip(rest, step.split([sl.stop - sl.start for sl in rest])):
                d[sl] = part
        return d

    def reset(self) -> None:
        super().reset()
        self.buffers, self._layout = {}, None
        self._adam.reset()

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "buffers": {j: b.detach().clone() for j, b in self.buffers.items()},
            "adamw": self._adam.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffers = {int(j): b.detach().clone() for j, b in state.get("buffers", {}).items()}
        if "adamw" in state:
            self._adam.load_state_dict(state["adamw"])

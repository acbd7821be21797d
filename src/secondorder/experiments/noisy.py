"""A function objective whose value and gradient carry seeded Gaussian noise.

``NoisyFunctionObjective`` adds σ·ε to f and σ·η to ∇f, ε ~ N(0, 1) and η ~ N(0, I) drawn
independently from its own generator on every evaluation: ``value`` draws ε; ``value_and_grad``
draws ε, then η (one number per coordinate). The generator's state is part of a run's
checkpoint, so a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from secondorder.objective import FunctionObjective

__all__ = ["NoisyFunctionObjective"]


class NoisyFunctionObjective(FunctionObjective):
    """:class:`~secondorder.objective.FunctionObjective` plus N(0, σ²) noise on f and on each
    coordinate of ∇f (curvature products stay exact)."""

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        n_params: int,
        *,
        sigma: float,
        seed: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(fn, n_params, dtype=dtype, device=device)
        self.sigma = float(sigma)
        self.generator = torch.Generator().manual_seed(int(seed))

    def value(self, theta: Tensor) -> Tensor:
        f = super().value(theta)
        return f + self.sigma * torch.randn((), generator=self.generator, dtype=f.dtype)

    def value_and_grad(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        f, g = super().value_and_grad(theta)
        nf = torch.randn((), generator=self.generator, dtype=f.dtype)
        ng = torch.randn(g.shape, generator=self.generator, dtype=g.dtype)
        return f + self.sigma * nf, g + self.sigma * ng

"""K-FAC (Martens & Grosse 2015) as a direction rule of :func:`~secondorder.solvers.minimize`.

Each layer's Gauss–Newton block is approximated by G ⊗ A (see
:mod:`secondorder.curvature.kfac`), with running averages A ← ρA + (1 − ρ)A_k (the same for
G, ρ = ``ema``) over the functions of successive iterations, estimated on the first
``factor_samples`` samples of each batch (all by default; the quadratic model's Gauss–Newton
products below use the same samples). With factored Tikhonov damping
γ = λ + c (λ = ``damping``, c the L2 coefficient, whose curvature is cI on the weights) the
preconditioned gradient of layer l is

    Δ_l = −(G + γ^{1/2}/π I)⁻¹ ∇_{W̃} (A + π γ^{1/2} I)⁻¹,   π² = (tr A / dim A) / (tr G / dim G),

with the damped inverses refreshed every ``inv_every`` iterations. The step is then scaled by
the quadratic model M(s) = gᵀs + ½ sᵀ(B + γI)s with the exact Gauss–Newton matrix B:

- ``rescale``: s = α Δ with α = −gᵀΔ / Δᵀ(B + γI)Δ (one product per iteration);
- ``momentum``: s = α Δ + μ δ with δ the previous step and (α, μ) the minimiser of M over
  span{Δ, δ} (Martens & Grosse section 7; two products per iteration), a 2 × 2 solve.

``adapt_damping = T`` adjusts λ every T iterations by the reduction ratio
ρ = (f(θ + s) − f(θ)) / M(s) on the current batch (one extra value): λ ← ωλ when ρ > 3/4,
λ ← λ/ω when ρ < 1/4, ω = (19/20)^T (Levenberg–Marquardt, Martens & Grosse section 6.5).
Without momentum Δ is a descent direction; with it the step may point uphill for the current
batch, so the loop takes it as it is with a fixed step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from secondorder.curvature.kfac import (
    FlatLayout,
    KFACEngine,
    check_factors_fit,
    engine_state_from,
    kfac_layers,
    kfac_statistics,
)
from secondorder.linalg import dot64
from secondorder.solvers.protocol import Direction, Iterate

__all__ = ["KFAC"]

#: λ stays within these bounds while it adapts
_DAMPING_RANGE = (1e-8, 1e4)


def _clone(ts):
    if ts is None:
        return None
    if isinstance(ts, Tensor):
        return ts.detach().clone()
    return [t.detach().clone() for t in ts]


def _quadratic_minimiser(P: list[list[float]], r: list[float]) -> tuple[float, float] | None:
    """argmin over (a, b) of ½ [a b] P [a b]ᵀ + [a b]·r, or None unless P is positive definite."""
    (p11, p12), (_, p22) = P
    det = p11 * p22 - p12 * p12
    if not (p11 > 0 and det > 1e-12 * p11 * p22):
        return None
    a = (-r[0] * p22 + r[1] * p12) / det
    b = (r[0] * p12 - r[1] * p11) / det
    return (a, b) if math.isfinite(a) and math.isfinite(b) else None


class KFAC(Direction):
    """s = K-FAC step scaled by the quadratic model (see module doc)."""

    name = "kfac"
    requires_descent = False  # the momentum step need not be a descent direction

    def __init__(
        self,
        damping: float,
        kind: str,
        ema: float,
        inv_every: int,
        rescale: bool,
        seed: int,
        momentum: bool = False,
        factor_samples: int | None = None,
        adapt_damping: int = 0,
        approximation: str = "expand",
        ekfac: bool = False,
    ) -> None:
        super().__init__()
        if momentum and not rescale:
            raise ValueError(
                "momentum=True needs rescale=True (both come from the quadratic model)"
            )
        self.damping, self.kind, self.ema = damping, kind, ema
        self.inv_every, self.rescale, self.seed = inv_every, rescale, seed
        self.momentum, self.factor_samples = momentum, factor_samples
        self.adapt_damping = adapt_damping
        self.approximation, self.ekfac = approximation, ekfac
        self.engine: KFACEngine | None = None
        self._pending_engine: list | None = None  # from load_state_dict
        self._layout: FlatLayout | None = None
        self.updates = 0
        self.generator: torch.Generator | None = None
        self._pending_generator_state: Tensor | None = None  # from load_state_dict
        self.prev_step: Tensor | None = None
        self._scale = 1.0  # the step is lr·scale·d
        self._model: tuple[float, float] | None = None  # (gᵀd, dᵀ(B+γI)d) of the last d
        self._d: Tensor | None = None

    # -- the factors -------------------------------------------------------------------------
    def _start(self, objective) -> None:
        """The layers, their place in θ and the engine, at the first iteration (after a
        check that the factors fit in memory)."""
        layers, _ = kfac_layers(objective.model, purpose="method='kfac'")
        check_factors_fit(layers, objective.dtype, objective.device)
        self._layout = FlatLayout(objective.model, layers)
        self.engine = KFACEngine(layers, ema=self.ema, ekfac=self.ekfac)
        if self._pending_engine is not None:
            self.engine.load_state_dict(self._pending_engine)
            self._pending_engine = None

    def _update_factors(self, it: Iterate):
        objective = it.objective
        if self.engine is None:
            self._start(objective)
        if self.kind == "mc" and self.generator is None:
            self.generator = self._new_generator(objective)
        stats = kfac_statistics(
            objective,
            it.theta,
            kind=self.kind,
            generator=self.generator,
            layers=self.engine.layers,
            max_samples=self.factor_samples,
            approximation=self.approximation,
            per_sample=self.ekfac,
        )
        self.engine.update(stats.factors)
        return stats

    def _gamma(self, it: Iterate) -> float:
        return self.damping + float(getattr(it.objective, "l2_coefficient", 0.0))

    # -- the step ----------------------------------------------------------------------------
    def _scaled(self, it: Iterate, delta: Tensor) -> Tensor:
        """α Δ (+ μ δ): the quadratic model's minimiser (see module doc); sets the model."""
        gamma = self._gamma(it)
        product = it.objective.ggnvp_at(it.theta, max_samples=self.factor_samples)
        g_d = dot64(it.g, delta)
        Bd = product(delta)
        d_Bd = dot64(delta, Bd) + gamma * dot64(delta, delta)
        if self.momentum and self.prev_step is not None:
            prev = self.prev_step
            Bp = product(prev)
            d_Bp = dot64(delta, Bp) + gamma * dot64(delta, prev)
            p_Bp = dot64(prev, Bp) + gamma * dot64(prev, prev)
            g_p = dot64(it.g, prev)
            ab = _quadratic_minimiser([[d_Bd, d_Bp], [d_Bp, p_Bp]], [g_d, g_p])
            if ab is not None:
                a, b = ab
                it.info["kfac_alpha"], it.info["kfac_mu"] = a, b
                self._scale = 1.0
                self._model = (a * g_d + b * g_p, a * a * d_Bd + 2 * a * b * d_Bp + b * b * p_Bp)
                return delta * a + prev * b
        alpha = -g_d / d_Bd if d_Bd > 0 else 1.0
        if not (math.isfinite(alpha) and alpha > 0):
            alpha = 1.0
        it.info["kfac_alpha"] = alpha
        self._scale = alpha
        self._model = (g_d, d_Bd)
        return delta

    def compute(self, it: Iterate) -> Tensor:
        stats = self._update_factors(it)
        gamma = self._gamma(it)
        if not self.engine.ready or self.updates % self.inv_every == 0:
            self.engine.refresh(gamma)
        if self.ekfac:
            self.engine.update_scales(stats, getattr(it.objective, "sum_over_shards", None))
        self.updates += 1
        delta = -self._layout.apply(self.engine, it.g, gamma)
        self._scale, self._model = 1.0, None
        d = self._scaled(it, delta) if self.rescale else delta
        self._d = d
        return d

    def initial_step(self, it: Iterate, d: Tensor, dphi0: float) -> float:
        return it.lr * self._scale

    def after_step(self, it: Iterate, alpha: float, dphi0: float, f_new: float) -> None:
        super().after_step(it, alpha, dphi0, f_new)
        if self._d is not None:
            self.prev_step = self._d * alpha
        due = self.adapt_damping and self.updates % self.adapt_damping == 0
        if due and self._model is not None:
            self._adapt(it, alpha, f_new)
        self._d = None

    def _adapt(self, it: Iterate, alpha: float, f_new: float) -> None:
        """λ by the reduction ratio ρ on the current batch (see module doc); the step taken
        was s = α d, so M(s) = α gᵀd + ½ α² dᵀ(B + γI)d."""
        g_d, d_Bd = self._model
        predicted = alpha * g_d + 0.5 * alpha * alpha * d_Bd
        if not math.isfinite(f_new):  # a fixed step was not evaluated on this batch
            f_new = float(it.objective.value(torch.add(it.theta, self._d, alpha=alpha)))
        rho = (f_new - it.f) / predicted if predicted < 0 else -math.inf
        omega = (19 / 20) ** self.adapt_damping
        if rho > 0.75:
            self.damping *= omega
        elif rho < 0.25:
            self.damping /= omega
        self.damping = min(max(self.damping, _DAMPING_RANGE[0]), _DAMPING_RANGE[1])
        it.info["kfac_rho"] = rho
        it.info["kfac_damping"] = self.damping

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "engine": None if self.engine is None else self.engine.state_dict(),
            "updates": self.updates,
            "damping": self.damping,
            "prev_step": _clone(self.prev_step),
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._pending_engine = engine_state_from(state)
        if self.engine is not None and self._pending_engine is not None:
            self.engine.load_state_dict(self._pending_engine)
            self._pending_engine = None
        self.updates = int(state.get("updates", 0))
        self.damping = float(state.get("damping", self.damping))
        self.prev_step = _clone(state.get("prev_step"))
        gen = state.get("generator")
        if gen is not None:  # the generator is rebuilt on the objective's device at first use
            self.generator, self._pending_generator_state = None, gen

    def _new_generator(self, objective) -> torch.Generator:
        """The sampling generator on the objective's device (sampled targets are drawn
        there), restored from a loaded state when there is one."""
        gen = torch.Generator(device=objective.device).manual_seed(self.seed)
        if self._pending_generator_state is not None:
            gen.set_state(self._pending_generator_state)
            self._pending_generator_state = None
        return gen

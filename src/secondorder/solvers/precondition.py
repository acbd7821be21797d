"""Preconditioners M (applied as v ↦ M⁻¹v) for the solvers (section 2.1, eqs. 7–14).

``preconditioner=`` accepts:

- ``None`` — no preconditioning (M = I);
- ``"eq14"`` — the seed's diagonal of eq. 14, M = Diag(Σ_i ∇ℓ_i ∇ℓ_iᵀ)^{1/2}, i.e. the square
  root of the sum over the current samples of squared per-sample gradients (per-sample
  gradients by ``torch.func.vmap(grad)`` in chunks; needs a :class:`ModelObjective`). With
  non-uniform sampler weights w_i the sum is m_s·Σ_i w_i (∇ℓ_i)², which is the plain sum for
  the uniform weights 1/m_s;
- ``"hessian-diag"`` / ``"ggn-diag"`` — |diag ∇²f| or diag G: from
  ``secondorder.curvature.hessian_diagonal`` / ``ggn_diagonal`` (second-order backpropagation)
  for a ModelObjective with equal sample weights and the default L2 convention, otherwise
  computed here from the objective's products: exactly, one product per coordinate, up to
  ``exact_limit`` parameters, else by Hutchinson's estimator E[z ⊙ Bz] with Rademacher z;
- ``"kfac"`` — K-FAC's block-diagonal M = ⊕_l (G_l + √γ/π I) ⊗ (A_l + π√γ I) over the
  ``nn.Linear`` and ``nn.Conv2d`` layers of a ModelObjective's network (factored Tikhonov damping of
  G ⊗ A + γI, see :mod:`secondorder.curvature.kfac`), with the exact-GGN factors of the
  current curvature samples and γ = ``damping`` (``precondition_damping``, default 1e-3, as
  ``method="kfac"``) + the objective's L2 coefficient; M⁻¹v = G⁻¹ V A⁻¹ layer by layer;
- a tensor of positive diagonal values of M;
- a callable v ↦ M⁻¹v.

Diagonals get a floor δ = sqrt(eps)·max(diag) (at least the smallest normal number) so that
M⁻¹ stays finite. Named preconditioners are recomputed at the current θ every
``every`` iterations (default 1).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, vmap

from secondorder import curvature
from secondorder._validation import check_choice, check_positive
from secondorder.curvature.kfac import (
    FlatLayout,
    KFACEngine,
    check_factors_fit,
    engine_state_from,
    kfac_factors,
    kfac_layers,
)
from secondorder.functional import trainable_parameters
from secondorder.objective import ModelObjective, Objective

__all__ = [
    "KFAC_PRECONDITION_DAMPING",
    "check_kfac_damping",
    "PRECONDITIONERS",
    "KFACPreconditioner",
    "Preconditioner",
    "make_preconditioner",
]

PRECONDITIONERS = ("eq14", "hessian-diag", "ggn-diag", "kfac")
#: γ of ``preconditioner="kfac"`` unless ``precondition_damping`` is given (method="kfac"'s)
KFAC_PRECONDITION_DAMPING = 1e-3


class Preconditioner:
    """M⁻¹ as an operator. ``diagonal`` is M's diagonal when M is diagonal, else None."""

    def __init__(
        self,
        kind: str,
        *,
        diagonal: Tensor | None = None,
        apply: Callable[[Tensor], Tensor] | None = None,
        every: int = 1,
        probes: int = 32,
        exact_limit: int = 512,
        chunk_bytes: int = 2**27,
        seed: int = 0,
    ) -> None:
        self.kind = kind
        self.diagonal = diagonal
        self._apply = apply
        self.every = every
        self.probes = probes
        self.exact_limit = exact_limit
        self.chunk_bytes = chunk_bytes
        self.seed = seed
        self.updates = 0
        self._last_k: int | None = None

    @property
    def is_diagonal(self) -> bool:
        return self._apply is None

    @property
    def named(self) -> bool:
        return self.kind in PRECONDITIONERS

    @property
    def approximates_curvature(self) -> bool:
        """M stands for the curvature itself (not only its shape), so L-BFGS scales
        H₀ = γM⁻¹ by γ = sᵀy / yᵀM⁻¹y; a callable's M⁻¹ is scaled by sᵀy / yᵀy."""
        return self.kind != "callable"

    def apply(self, v: Tensor) -> Tensor:
        """M⁻¹ v."""
        if self._apply is not None:
            out = self._apply(v)
            if not isinstance(out, Tensor) or out.shape != v.shape:
                raise ValueError(
                    "the preconditioner callable must map a vector to a vector of the same "
                    f"shape {tuple(v.shape)}"
                )
            return out
        if self.diagonal is None:
            raise RuntimeError("the preconditioner was not computed yet (call update first)")
        return v / self.diagonal

    __call__ = apply

    def inverse_diagonal(self) -> Tensor | None:
        return None if self.diagonal is None else 1.0 / self.diagonal

    def update(self, objective, theta: Tensor, k: int) -> bool:
        """Recompute a named preconditioner at θ when due; return whether it changed."""
        if not self.named:
            return False
        if (
            self._last_k is not None
            and (k - self._last_k) < self.every
            and self.diagonal is not None
        ):
            return False
        if self.kind == "eq14":
            diag = eq14_diagonal(objective, theta, chunk_bytes=self.chunk_bytes)
        else:
            which = "hessian" if self.kind == "hessian-diag" else "ggn"
            diag = curvature_diagonal(
                objective,
                theta,
                which,
                probes=self.probes,
                exact_limit=self.exact_limit,
                seed=self.seed + k,
            ).abs()
        self.diagonal = _floor(diag)
        self._last_k = k
        self.updates += 1
        return True

    def state_dict(self) -> dict:
        return {
            "diagonal": None if self.diagonal is None else self.diagonal.clone(),
            "last_k": self._last_k,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.named and state:
            self.diagonal = state.get("diagonal")
            self._last_k = state.get("last_k")
            self.updates = state.get("updates", 0)


def _floor(diag: Tensor) -> Tensor:
    eps = torch.finfo(diag.dtype).eps
    top = float(diag.max()) if diag.numel() else 0.0
    delta = max(math.sqrt(eps) * top, torch.finfo(diag.dtype).tiny)
    return diag.clamp_min(delta)


class KFACPreconditioner(Preconditioner):
    """M⁻¹ = ⊕_l (G_l ⊗ A_l)⁻¹ from damped inverses of the exact-GGN Kronecker factors at
    the current θ (see module doc), recomputed every ``every`` iterations."""

    def __init__(self, layout: FlatLayout, *, every: int = 1, damping: float) -> None:
        super().__init__("kfac", every=every)
        self.layout = layout
        self.damping = damping
        self.engine = KFACEngine(layout.layers, ema=0.0)  # the factors at θ, no averaging

    @property
    def is_diagonal(self) -> bool:
        return False

    def inverse_diagonal(self) -> Tensor | None:
        return None

    def apply(self, v: Tensor) -> Tensor:
        """M⁻¹ v, layer by layer G⁻¹ V A⁻¹."""
        if not self.engine.ready:
            raise RuntimeError("the preconditioner was not computed yet (call update first)")
        return self.layout.apply(self.engine, v, self.damping)

    __call__ = apply

    def update(self, objective, theta: Tensor, k: int) -> bool:
        """New factors and damped inverses at θ when due; return whether they changed."""
        fresh = self._last_k is not None and k - self._last_k < self.every
        if self.engine.ready and fresh:
            return False
        factors = kfac_factors(objective, theta, kind="exact", layers=self.layout.layers)
        gamma = self.damping + float(getattr(objective, "l2_coefficient", 0.0))
        self.engine.update(factors)
        self.engine.refresh(gamma)
        self._last_k = k
        self.updates += 1
        return True

    def state_dict(self) -> dict:
        return {
            "engine": self.engine.state_dict(),
            "last_k": self._last_k,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        if state:
            engine = engine_state_from(state)
            if engine is not None:
                self.engine.load_state_dict(engine)
            self._last_k = state.get("last_k")
            self.updates = state.get("updates", 0)


def _kfac_preconditioner(objective, every: int, damping: float | None) -> KFACPreconditioner:
    """``preconditioner="kfac"``: a ModelObjective over an MLP K-FAC can factor."""
    if not hasattr(objective, "model") or not hasattr(objective, "samples"):
        raise ValueError(
            "preconditioner='kfac' needs a ModelObjective (a network and its data), got "
            f"{type(objective).__name__}"
        )
    layers, _ = kfac_layers(objective.model, purpose="preconditioner='kfac'")
    check_factors_fit(layers, objective.dtype, objective.device)
    gamma = KFAC_PRECONDITION_DAMPING if damping is None else damping
    return KFACPreconditioner(FlatLayout(objective.model, layers), every=every, damping=gamma)


def check_kfac_damping(spec, damping: float | None) -> float | None:
    """``precondition_damping``: a positive number, given with ``preconditioner="kfac"`` only."""
    if damping is None:
        return None
    damping = check_positive("precondition_damping", damping)
    if not (isinstance(spec, str) and spec == "kfac"):
        given = repr(spec) if spec is None or isinstance(spec, str) else type(spec).__name__
        raise ValueError(
            "precondition_damping applies to preconditioner='kfac' only, got "
            f"preconditioner={given}"
        )
    return damping


def make_preconditioner(
    spec, objective, *, every: int = 1, damping: float | None = None
) -> Preconditioner | None:
    """Validate ``spec`` (see module doc) without evaluating anything; ``damping`` is the γ
    of ``"kfac"`` (None: :data:`KFAC_PRECONDITION_DAMPING`)."""
    damping = check_kfac_damping(spec, damping)
    if spec is None:
        return None
    if isinstance(spec, str):
        check_choice("preconditioner", spec, PRECONDITIONERS)
        if spec == "kfac":
            return _kfac_preconditioner(objective, every, damping)
        if spec == "eq14" and not hasattr(objective, "loss"):
            raise ValueError(
                "preconditioner='eq14' needs per-sample gradients, so a ModelObjective "
                f"(model, loss, data); got {type(objective).__name__}"
            )
        if spec == "ggn-diag" and type(objective).ggnvp_at is Objective.ggnvp_at:
            raise ValueError(
                f"preconditioner='ggn-diag' needs Gauss-Newton products, which "
                f"{type(objective).__name__} does not offer; use 'hessian-diag'"
            )
        return Preconditioner(spec, every=every)
    if isinstance(spec, Tensor):
        d = spec.detach().to(dtype=objective.dtype, device=objective.device).reshape(-1)
        if d.numel() != objective.n_params:
            raise ValueError(
                f"preconditioner diagonal must have {objective.n_params} entries, got "
                f"{spec.numel()}"
            )
        if not bool(torch.isfinite(d).all()) or bool((d <= 0).any()):
            raise ValueError("preconditioner diagonal must be finite and positive")
        return Preconditioner("diagonal", diagonal=d)
    if callable(spec):
        return Preconditioner("callable", apply=spec)
    raise TypeError(
        "preconditioner must be None, one of "
        f"{list(PRECONDITIONERS)}, a tensor of diagonal values or a callable v -> M^-1 v; got "
        f"{type(spec).__name__}"
    )


# -- diagonals --------------------------------------------------------------------------------
def eq14_diagonal(objective, theta: Tensor, *, chunk_bytes: int = 2**27) -> Tensor:
    """sqrt(m_s Σ_i w_i (∂ℓ_i/∂θ)²) over the objective's current samples (eq. 14)."""
    X, y, w = objective.samples("value")
    theta = theta.detach()

    def loss_one(t: Tensor, x: Tensor, yy: Tensor) -> Tensor:
        out = objective.forward(t, x.unsqueeze(0))
        return objective.loss.per_sample(out, yy.unsqueeze(0))[0]

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    P = theta.numel()
    item = torch.empty((), dtype=theta.dtype).element_size()
    chunk = max(1, min(len(X), chunk_bytes // max(1, P * item)))
    acc = torch.zeros_like(theta)
    for i in range(0, len(X), chunk):
        G = per_sample(theta, X[i : i + chunk], y[i : i + chunk])
        acc += (w[i : i + chunk, None] * G * G).sum(0)
    (acc,) = objective.sum_over_shards(acc)  # data-parallel: X is this process's share
    return torch.sqrt(acc * objective.batch_size)


def _library_diagonal(objective, theta: Tensor, which: str) -> Tensor | None:
    """diag from ``secondorder.curvature`` (second-order backpropagation for MLPs) when it
    exists and computes the same function: a ModelObjective whose current samples carry equal
    weights and whose L2 term covers weight matrices only. None otherwise."""
    fn = getattr(curvature, f"{which}_diagonal", None)
    if fn is None or not isinstance(objective, ModelObjective) or objective.regularize_bias:
        return None
    X, y, w = objective.samples("curvature", whole=True)
    shard = objective.data_parallel
    if not bool(torch.all(w == w[0])) or (shard is not None and len(X) < shard.world_size):
        return None  # eq.-28 weights that are not uniform: use the products below
    model = copy.deepcopy(objective.model).to(dtype=objective.dtype, device=objective.device)
    with torch.no_grad():
        for p, t in zip(trainable_parameters(model), torch.split(theta.detach(), objective.numels)):
            p.copy_(t.view_as(p))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "autodiff fallback" notices
            args = (model, X, y, objective.loss, objective.l2_coefficient)
            out = fn(*args) if shard is None else shard.curvature(fn, *args)
    except (TypeError, ValueError, NotImplementedError):
        return None
    return out.detach().reshape(-1).to(dtype=theta.dtype, device=theta.device)


def curvature_diagonal(
    objective,
    theta: Tensor,
    which: str,
    *,
    probes: int = 32,
    exact_limit: int = 512,
    seed: int = 0,
) -> Tensor:
    """diag of the Hessian (``which="hessian"``) or Gauss–Newton matrix (``"ggn"``).

    Uses ``secondorder.curvature.hessian_diagonal`` / ``ggn_diagonal`` when available;
    otherwise exact (one product per coordinate) up to ``exact_limit`` parameters, else
    Hutchinson's estimator with ``probes`` Rademacher vectors."""
    lib = _library_diagonal(objective, theta, which)
    if lib is not None:
        return lib
    product = objective.hvp_at(theta) if which == "hessian" else objective.ggnvp_at(theta)
    n_p = theta.numel()
    if n_p <= exact_limit:
        out = torch.empty_like(theta)
        e = torch.zeros_like(theta)
        for i in range(n_p):
            e[i] = 1.0
            out[i] = product(e)[i]
            e[i] = 0.0
        return out
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    acc = torch.zeros_like(theta)
    for _ in range(probes):
        z = (torch.randint(0, 2, (n_p,), generator=gen) * 2 - 1).to(theta)
        acc += z * product(z)
    return acc / probes

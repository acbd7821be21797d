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
from secondorder._validation import check_choice
from secondorder.objective import ModelObjective, Objective

__all__ = ["PRECONDITIONERS", "Preconditioner", "make_preconditioner"]

PRECONDITIONERS = ("eq14", "hessian-diag", "ggn-diag")


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


def make_preconditioner(spec, objective, *, every: int = 1) -> Preconditioner | None:
    """Validate ``spec`` (see module doc) without evaluating anything."""
    if spec is None:
        return None
    if isinstance(spec, str):
        check_choice("preconditioner", spec, PRECONDITIONERS)
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
    return torch.sqrt(acc * len(X))


def _library_diagonal(objective, theta: Tensor, which: str) -> Tensor | None:
    """diag from ``secondorder.curvature`` (second-order backpropagation for MLPs) when it
    exists and computes the same function: a ModelObjective whose current samples carry equal
    weights and whose L2 term covers weight matrices only. None otherwise."""
    fn = getattr(curvature, f"{which}_diagonal", None)
    if fn is None or not isinstance(objective, ModelObjective) or objective.regularize_bias:
        return None
    X, y, w = objective.samples("curvature")
    if not bool(torch.all(w == w[0])):
        return None  # eq.-28 weights that are not uniform: use the products below
    model = copy.deepcopy(objective.model).to(dtype=objective.dtype, device=objective.device)
    with torch.no_grad():
        for p, t in zip(model.parameters(), torch.split(theta.detach(), objective.numels)):
            p.copy_(t.view_as(p))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "autodiff fallback" notices
            out = fn(model, X, y, loss=objective.loss, l2=objective.l2_coefficient)
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

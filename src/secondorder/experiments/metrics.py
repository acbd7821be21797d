"""Metrics a spec may record besides the built-in losses and accuracies, in one registry.

A metric is a function ``fn(objective, theta, splits) -> dict[str, value]`` registered under
the name a spec's ``metrics`` list uses (``@register("name")``); the runner calls it every
``metrics_every`` iterations with the current θ and records what it returns in the trace. The
values must be numbers, or lists of numbers (one per layer, say). Registering a function here
is all it takes to make its name valid in specs.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from secondorder.curvature.operators import HessianOperator, lanczos_eigs
from secondorder.curvature.saddle import activation_curvature
from secondorder.curvature.structure import analyse_mlp, theta_blocks
from secondorder.linalg import norm64
from secondorder.objective import ModelObjective
from secondorder.sampling import FullBatch

__all__ = [
    "EXTRA_METRICS",
    "LANCZOS_STEPS",
    "MetricFn",
    "lambda_min",
    "layer_grad_norms",
    "negative_curvature_fraction",
    "register",
]

#: ``fn(objective, theta, splits)``: what to add to the trace row
MetricFn = Callable[[Any, torch.Tensor, Any], dict[str, Any]]

#: every registered metric, by the name specs use
EXTRA_METRICS: dict[str, MetricFn] = {}


def register(name: str) -> Callable[[MetricFn], MetricFn]:
    """Register ``fn`` as the metric ``name`` (a decorator)."""

    def add(fn: MetricFn) -> MetricFn:
        if name in EXTRA_METRICS:
            raise ValueError(f"metric {name!r} is registered twice")
        EXTRA_METRICS[name] = fn
        return fn

    return add


# -- the layer-block structure of the Hessian (Appendix B), for the preconditioning study -----
#: the largest network (parameters) whose dense Hessian the block-structure metric forms
BLOCK_STRUCTURE_LIMIT = 4096


def _frobenius_ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    d = float(torch.linalg.matrix_norm(den)) if den.dim() == 2 else float(den.norm())
    n = float(torch.linalg.matrix_norm(num)) if num.dim() == 2 else float(num.norm())
    return n / d if d > 0 else 0.0


@register("layer_block_structure")
def layer_block_structure(objective, theta: torch.Tensor, splits) -> dict[str, Any]:
    """How much of the curvature each preconditioner's form can hold, per ``nn.Linear`` layer
    l, from the exact layer blocks H_l (eqs. 68-70, 78-80) and G_l of the mean loss (no L2
    term) over the objective's current samples at θ:

    - ``diag_fraction_h`` / ``diag_fraction_ggn``: ‖diag H_l‖_F / ‖H_l‖_F, ‖diag G_l‖_F / ‖G_l‖_F
      (what a diagonal preconditioner keeps of the block);
    - ``kfac_error_ggn`` / ``kfac_error_h``: ‖G_l − G_l^K ⊗ A_l‖_F / ‖G_l‖_F and the same
      against H_l (K-FAC's Kronecker factors of the exact Gauss–Newton block);
    - ``layer_block_fraction``: ‖blockdiag_l H_l‖_F / ‖H‖_F (what any layer-block-diagonal
      preconditioner can hold of the whole Hessian; the rest is cross-layer blocks).

    Needs a sequential MLP of at most :data:`BLOCK_STRUCTURE_LIMIT` parameters (the dense
    Hessian is formed) with equal sample weights."""
    import copy

    from secondorder import curvature
    from secondorder.curvature.kfac import kfac_factors

    n = int(theta.numel())
    if n > BLOCK_STRUCTURE_LIMIT:
        raise ValueError(
            f"metric 'layer_block_structure' forms the dense Hessian: the model has {n} "
            f"parameters, more than {BLOCK_STRUCTURE_LIMIT}; use it on a smaller network"
        )
    X, y, w = objective.samples("value", whole=True)
    if not bool(torch.all(w == w[0])):
        raise ValueError(
            "metric 'layer_block_structure' needs equal sample weights (a full or subsample "
            "sampler, or fixed batches covering the samples once)"
        )
    model = copy.deepcopy(objective.model).to(dtype=theta.dtype, device=theta.device)
    with torch.no_grad():
        for p, t in zip(model.parameters(), torch.split(theta.detach(), objective.numels)):
            p.copy_(t.view_as(p))
    struct, why = analyse_mlp(model)
    if struct is None:
        raise ValueError(f"metric 'layer_block_structure' needs a sequential MLP, but {why}")
    H = curvature.hessian(model, X, y, objective.loss)
    G = curvature.ggn(model, X, y, objective.loss)
    blocks = curvature.layer_hessians(model, X, y, objective.loss)
    factors = kfac_factors(objective, theta, kind="exact", which="value")
    out: dict[str, Any] = {k: [] for k in ("diag_fraction_h", "diag_fraction_ggn")}
    out.update(kfac_error_ggn=[], kfac_error_h=[])
    block_sq = 0.0
    for info, Hl, f in zip(struct.layers, blocks, factors):
        Gl = G[info.params, info.params]
        K = f.dense().to(Gl)
        out["diag_fraction_h"].append(_frobenius_ratio(torch.diagonal(Hl), Hl))
        out["diag_fraction_ggn"].append(_frobenius_ratio(torch.diagonal(Gl), Gl))
        out["kfac_error_ggn"].append(_frobenius_ratio(Gl - K, Gl))
        out["kfac_error_h"].append(_frobenius_ratio(Hl - K, Hl))
        block_sq += float(torch.linalg.matrix_norm(Hl)) ** 2
    total = float(torch.linalg.matrix_norm(H))
    out["layer_block_fraction"] = block_sq**0.5 / total if total > 0 else 0.0
    return out


@register("batch_accuracy")
def batch_accuracy(objective: Any, theta: torch.Tensor, splits: Any) -> dict[str, Any]:
    """Eq. 30 on the samples the current objective sums over: the whole training set for the
    full batch, the R batches of eq. 28 (fixed or this iteration's), the current mini-batch.
    With batches that cover only part of the data it is the training accuracy the solver
    actually fits, where ``train_accuracy`` also counts the samples it never sees."""
    X, y, _ = objective.samples("value", whole=True)
    return {"batch_accuracy": objective.accuracy(theta, X, y)}


# -- the metrics of the depth study (vanishing gradients, negative curvature) -----------------
#: Lanczos steps of ``lambda_min``: the extreme Ritz values of a short run bound the spectrum
#: from inside (a negative one proves negative curvature), at 30 Hessian products a record
LANCZOS_STEPS = 30

_FULL_BATCH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _uncounted(objective: Any):
    """Evaluations made for a metric leave the solver's counts and sampling state as they were
    (a reshuffled-per-evaluation sampler would otherwise move on)."""
    counts, state = objective.counts.as_dict(), objective.sampling_state()
    try:
        yield
    finally:
        for key, value in counts.items():  # in place: the solver's loop holds this object
            setattr(objective.counts, key, value)
        objective.load_sampling_state(state)


def _full_batch(objective: Any) -> Any:
    """The objective itself when it is full-batch, else its full-batch twin (same data,
    model, loss and L2 term), built once: λ_min is a property of the training objective."""
    sampled = not isinstance(objective.sampler, FullBatch) or objective.curvature_sampler
    if not sampled:
        return objective
    if objective not in _FULL_BATCH:
        _FULL_BATCH[objective] = ModelObjective(
            objective.model,
            objective.loss,
            (objective.X, objective.y),
            l2=objective.l2,
            l2_convention=objective.l2_convention,
            l2_m=objective.l2_m,
            regularize_bias=objective.regularize_bias,
            dtype=objective.dtype,
            device=objective.device,
        )
    return _FULL_BATCH[objective]


def _structure(objective: Any) -> Any:
    struct, reason = analyse_mlp(objective.model)
    if struct is None:
        raise ValueError(f"per-layer metrics need a sequential MLP: {reason}")
    return struct


@register("layer_grad_norms")
def layer_grad_norms(objective: Any, theta: torch.Tensor, splits: Any) -> dict[str, Any]:
    """‖∂J/∂θ_l‖₂ of each Linear layer l (weights and bias, input layer first) of the
    objective the solver sees: vanishing (exploding) gradients shrink (grow) towards layer 1."""
    blocks = theta_blocks(objective.model, _structure(objective))
    with _uncounted(objective):
        _, g = objective.value_and_grad(theta)
    return {"layer_grad_norms": [norm64(g[a:b]) for _, a, b in blocks]}


@register("negative_curvature_fraction")
def negative_curvature_fraction(objective: Any, theta: torch.Tensor, splits: Any) -> dict:
    """Per hidden layer, the fraction of (sample, unit) pairs whose Appendix-C term
    σ″(Z)·∂J/∂X (eq. 87) is negative, over the current function's samples."""
    _structure(objective)
    X, y, _ = objective.samples("value", whole=True)
    stats = activation_curvature(objective.model, X, y, objective.loss, theta)
    return {"negative_curvature_fraction": [a.fraction_negative for a in stats]}


@register("lambda_min")
def lambda_min(objective: Any, theta: torch.Tensor, splits: Any) -> dict[str, float]:
    """The smallest and largest eigenvalue of the full-batch Hessian ∇²J(θ) (with the L2
    term) estimated by :data:`LANCZOS_STEPS` Lanczos steps from a fixed start: Ritz values lie
    inside the spectrum, so ``lambda_min`` < 0 proves a direction of negative curvature."""
    full = _full_batch(objective)
    n = full.n_params
    with _uncounted(full), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short run is meant: no convergence warning
        op = HessianOperator(full, theta=theta)
        vals, _ = lanczos_eigs(op, k=1, which="both", max_iter=min(n, LANCZOS_STEPS), seed=0)
    return {"lanczos_lambda_min": float(vals[0]), "lanczos_lambda_max": float(vals[-1])}

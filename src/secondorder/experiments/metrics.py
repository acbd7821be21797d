"""Metrics a spec may record besides the built-in losses and accuracies, in one registry.

A metric is a function ``fn(objective, theta, splits) -> dict[str, value]`` registered under
the name a spec's ``metrics`` list uses (``@register("name")``); the runner calls it every
``metrics_every`` iterations with the current θ and records what it returns in the trace. The
values must be numbers, or lists of numbers (one per layer, say). Registering a function here
is all it takes to make its name valid in specs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["EXTRA_METRICS", "MetricFn", "register"]

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
    from secondorder.curvature.kfac import kfac_factors, mlp_structure

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
    struct = mlp_structure(model)
    H = curvature.hessian(model, X, y, objective.loss)
    G = curvature.ggn(model, X, y, objective.loss)
    blocks = curvature.layer_hessians(model, X, y, objective.loss)
    factors = kfac_factors(objective, theta, kind="exact", which="value", structure=None)
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

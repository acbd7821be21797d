"""Kronecker factors of the Gauss–Newton matrix per ``nn.Linear`` layer (K-FAC, Martens &
Grosse 2015).

For a layer s = W̃ ã with ã = (a, 1) (the bias as a last input column) and samples weighted by
w_i (Σ w_i = 1), the Gauss–Newton block of vec(W̃) (row-major) is

    G_W̃ = Σ_i w_i (J_{s,i}ᵀ H_{z,i} J_{s,i}) ⊗ (ã_i ã_iᵀ)  ≈  G ⊗ A,

with A = Σ_i w_i ã_i ã_iᵀ and G = Σ_i w_i Σ_c g_{i,c} g_{i,c}ᵀ, where g_{i,c} = J_{s,i}ᵀ L_{i,c}
back-propagates the columns of a factor H_z = L Lᵀ of the loss Hessian in the output (the
softmax H_Z of eq. 83: L = diag √p − p √pᵀ) — the exact-GGN factorisation — or, for the
Monte-Carlo Fisher, g_i = J_{s,i}ᵀ ∂ℓ(z_i, ŷ_i)/∂z with ŷ_i drawn from the model. For one
sample the factorisation is exact: the block is A ⊗ G itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from secondorder._validation import check_choice
from secondorder.curvature.structure import LayerInfo, MLPStructure, analyse_mlp

__all__ = [
    "KFAC_KINDS",
    "KroneckerFactors",
    "KroneckerInverse",
    "damped_inverses",
    "kfac_factors",
    "layer_factors",
    "mlp_structure",
]

KFAC_KINDS = ("exact", "mc")


@dataclass
class KroneckerFactors:
    """A (inputs, with a last column of ones when the layer has a bias) and G (output
    gradients) of one layer; :meth:`dense` is the P_l × P_l block they stand for."""

    layer: LayerInfo
    A: Tensor
    G: Tensor

    def dense(self) -> Tensor:
        """G ⊗ A, reordered from vec(W̃) row-major to the layer's θ order (W row-major, then
        the bias): for small layers and tests."""
        info = self.layer
        n_in_aug = self.A.shape[0]
        block = torch.kron(self.G, self.A)
        idx = torch.arange(info.n_out * n_in_aug).view(info.n_out, n_in_aug)
        order = idx[:, : info.n_in].reshape(-1)
        if info.bias:
            order = torch.cat([order, idx[:, info.n_in]])
        return block[order][:, order]


def mlp_structure(model) -> MLPStructure:
    """The model's layer structure, or a ValueError saying why K-FAC cannot factor it."""
    struct, why = analyse_mlp(model)
    if struct is None:
        raise ValueError(f"K-FAC needs a sequential MLP of nn.Linear layers: {why}")
    return struct


def kfac_factors(
    objective,
    theta: Tensor,
    *,
    kind: str = "exact",
    which: str = "curvature",
    generator: torch.Generator | None = None,
    structure: MLPStructure | None = None,
    max_samples: int | None = None,
) -> list[KroneckerFactors]:
    """The Kronecker factors (A, G) of every layer of a
    :class:`~secondorder.objective.ModelObjective` at θ, over the samples and eq.-28 weights
    of its current function (``which="curvature"``: its curvature subsample when it has one).

    ``kind="exact"`` back-propagates the columns of L with H_z = L Lᵀ (one backward pass per
    output); ``kind="mc"`` one gradient of the loss at targets drawn from the model.
    ``max_samples`` keeps the first n samples (weights renormalised): a cheaper estimate."""
    check_choice("kind", kind, KFAC_KINDS)
    struct = structure if structure is not None else mlp_structure(objective.model)
    X, y, w = objective.samples(which, max_samples=max_samples)
    inputs: list[Tensor] = []
    outputs: list[Tensor] = []

    def capture(module, args, out):
        inputs.append(args[0].detach())
        outputs.append(out)

    hooks = [info.linear.register_forward_hook(capture) for info in struct.layers]
    try:
        with torch.enable_grad():
            z = objective.forward(theta.detach().requires_grad_(True), X)
    finally:
        for h in hooks:
            h.remove()
    loss = objective.loss
    if kind == "exact":
        L = loss.hessian_output_sqrt(z.detach(), y)
        columns = [L[:, :, c] for c in range(L.shape[2])]
    else:
        targets = _sampled_targets(objective, z, which, max_samples, generator)
        columns = [loss.grad_output(z.detach(), targets)]
    per_layer: list[list[Tensor]] = [[] for _ in outputs]
    for i, col in enumerate(columns):
        grads = torch.autograd.grad(z, outputs, col, retain_graph=i + 1 < len(columns))
        for j, g in enumerate(grads):
            per_layer[j].append(g)
    factors = [layer_factors(*args, w) for args in zip(struct.layers, inputs, per_layer)]
    # data-parallel: every factor is a sum over samples; all of them in one collective
    sums = getattr(objective, "sum_over_shards", None)
    if sums is not None:
        summed = sums(*[t for f in factors for t in (f.A, f.G)])
        for i, f in enumerate(factors):
            f.A, f.G = summed[2 * i], summed[2 * i + 1]
    return factors


def _sampled_targets(objective, z: Tensor, which: str, max_samples, generator) -> Tensor:
    """Targets drawn from the model at the outputs z; in a data-parallel run they are drawn
    for the whole batch's outputs (gathered) and this process keeps its rows, so the draws
    and the generator's state are those of one process."""
    z = z.detach()
    shard = getattr(objective, "data_parallel", None)
    if shard is None:
        return objective.loss.sample_targets(z, generator)
    n = len(objective.samples(which, max_samples=max_samples, whole=True)[0])
    lo, hi = shard.bounds(n)
    return objective.loss.sample_targets(shard.gather_rows(z, n), generator)[lo:hi]


def layer_factors(info: LayerInfo, a: Tensor, grads: list[Tensor], w: Tensor) -> KroneckerFactors:
    """One layer's factors from its per-sample inputs a (m, n_in) and per-sample output
    gradients (one (m, n_out) tensor per back-propagated column c), weights w (m,):
    A = Σ_i w_i ã_i ã_iᵀ with ã = (a, 1) when the layer has a bias, G = Σ_c Σ_i w_i g_ic g_icᵀ."""
    a = a.flatten(1)  # (m, n_in), also for a process whose share is empty
    if info.bias:
        a = torch.cat([a, a.new_ones(len(a), 1)], 1)
    G = sum((g * w[:, None]).T @ g for g in grads)
    return KroneckerFactors(info, (a * w[:, None]).T @ a, G)


def damped_inverses(A: Tensor, G: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Factored Tikhonov damping (Martens & Grosse 2015, section 6.3): the inverses of
    A + π√γ I and G + √γ/π I, with π² = (tr A / dim A) / (tr G / dim G), whose Kronecker
    product approximates (G ⊗ A + γ I)⁻¹ (exactly when A and G are multiples of I)."""
    root = math.sqrt(gamma)
    ta, tg = float(A.trace()) / A.shape[0], float(G.trace()) / G.shape[0]
    pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
    eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    eye_g = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.inv(A + pi * root * eye_a), torch.linalg.inv(G + root / pi * eye_g)


@dataclass
class KroneckerInverse:
    """The block-diagonal operator v ↦ (G_l ⊗ A_l)⁻¹ v over the layers, from damped inverses
    (A_l⁻¹, G_l⁻¹): on layer l, with V the layer's part of v as an (n_out, n_in [+1]) matrix
    (the bias as a last column), the result is G_l⁻¹ V A_l⁻¹ (A and G are symmetric)."""

    layers: list[LayerInfo]
    A_inv: list[Tensor]
    G_inv: list[Tensor]

    @classmethod
    def from_factors(
        cls, layers: list[LayerInfo], A: list[Tensor], G: list[Tensor], gamma: float
    ) -> KroneckerInverse:
        """Damped inverses of every layer's factors (see :func:`damped_inverses`)."""
        pairs = [damped_inverses(a, g, gamma) for a, g in zip(A, G)]
        return cls(list(layers), [p[0] for p in pairs], [p[1] for p in pairs])

    def apply(self, v: Tensor) -> Tensor:
        """(⊕_l G_l ⊗ A_l)⁻¹ v for a flat v in θ order (entries outside the layers unchanged)."""
        out = v.clone()
        for info, A_inv, G_inv in zip(self.layers, self.A_inv, self.G_inv):
            part = v[info.params]
            vw = part[: info.n_weight].view(info.n_out, info.n_in)
            aug = torch.cat([vw, part[info.n_weight :, None]], 1) if info.bias else vw
            step = G_inv @ aug @ A_inv
            dst = out[info.params]
            dst[: info.n_weight] = step[:, : info.n_in].reshape(-1)
            if info.bias:
                dst[info.n_weight :] = step[:, info.n_in]
        return out

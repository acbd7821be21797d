r"""The second-order backpropagation pass (Appendix B, Algorithm 3) and its chunks of samples.

With ``z⁽ˡ⁾ = W⁽ˡ⁾x⁽ˡ⁻¹⁾ + b⁽ˡ⁾`` and ``x⁽ˡ⁾ = σ_l(z⁽ˡ⁾)`` the objective is

    J(θ) = (1/N) Σ_i ℓ(x_i⁽ᴸ⁾, y_i) + (l2/2)·Σ_l ‖W⁽ˡ⁾‖²_F .

Per sample, the gradient g⁽ˡ⁾ = ∂ℓ/∂z⁽ˡ⁾ and the Hessian H_Z⁽ˡ⁾ = ∂²ℓ/∂z⁽ˡ⁾² go backwards
(eqs. 66-67, 81-83), both carrying the 1/N of the mean:

    H_X⁽ˡ⁻¹⁾ = W⁽ˡ⁾ᵀ H_Z⁽ˡ⁾ W⁽ˡ⁾,
    H_Z⁽ˡ⁻¹⁾ = D H_X⁽ˡ⁻¹⁾ D + diag(σ″(z⁽ˡ⁻¹⁾) ⊙ ∂ℓ/∂x⁽ˡ⁻¹⁾),   D = diag σ′(z⁽ˡ⁻¹⁾).

Dropping every σ″ term leaves the Gauss–Newton recursion, whose G_Z is PSD. The pass keeps, per
layer, what the block kernels (:mod:`.blocks`) and the convexity report (:mod:`.saddle`) read:
the inputs x⁽ˡ⁻¹⁾, σ′, g, H_Z and the σ″ terms of eq. 87. The activations say what may be
skipped (``is_identity``, ``is_piecewise_linear``); the loss gives ∂ℓ/∂ŷ and H_ŷ.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from secondorder._progress import tick
from secondorder._validation import check_positive_int
from secondorder.losses import Loss

from .request import CurvatureRequest
from .structure import MLPStructure, is_linear_map

__all__ = [
    "CHUNK_BYTES",
    "SecondOrderPass",
    "per_sample_bytes",
    "sample_chunks",
    "second_order_pass",
]

#: bytes for one chunk's temporaries (per-sample factors, H_Z, Jacobians)
CHUNK_BYTES = 2**28


@dataclass
class SecondOrderPass:
    """Per-sample quantities of one chunk (all derivatives include the 1/N of the mean)."""

    xs: list[Tensor]  # x⁽ˡ⁻¹⁾, the input of every Linear: (n, n_in)
    d1: list[Tensor | None]  # σ′(z⁽ˡ⁾), None when there is no activation
    gz: list[Tensor]  # ∂J/∂z⁽ˡ⁾: (n, n_out)
    hz: list[Tensor] | None  # H_Z⁽ˡ⁾ (or G_Z⁽ˡ⁾ for the Gauss–Newton matrix): (n, n_out, n_out)
    resid: list[Tensor | None]  # σ″(z⁽ˡ⁾) ⊙ ∂J/∂x⁽ˡ⁾ (eq. 87), None when σ″ ≡ 0
    out: Tensor
    losses: Tensor


def second_order_pass(
    struct: MLPStructure,
    X: Tensor,
    y: Tensor,
    loss: Loss,
    weight: float,
    curvature: str | None,
    diag_first: bool = False,
    lowest: int = 0,
) -> SecondOrderPass:
    """Forward, then backpropagate g and (for curvature "hessian" or "ggn") H_Z per sample.

    With ``diag_first`` the first layer's H_Z is only its diagonal, shape (n, n_out): all the
    diagonal of the Hessian needs, without the (n, n_1, n_1) products of the widest layer.
    The backward pass stops at layer ``lowest`` (the layers below get no g, H_Z).
    """
    dtype = X.dtype
    xs: list[Tensor] = []
    d1s: list[Tensor | None] = []
    d2s: list[Tensor | None] = []
    x = X
    with torch.no_grad():
        for layer in struct.layers:
            W, b = layer.weights(dtype)
            xs.append(x)
            z = F.linear(x, W, b)
            if is_linear_map(layer.activation):
                x, d1, d2 = z, None, None
            else:
                x, d1, d2 = layer.activation.derivatives(z)
                if layer.activation.is_piecewise_linear:
                    d2 = None
            d1s.append(d1)
            d2s.append(d2)
        out = x
        losses = loss.per_sample(out, y)
        gx = loss.grad_output(out, y) * weight
        hx = None
        if curvature is not None:
            hx = loss.hessian_output(out, y) * weight
        L = len(struct.layers)
        gz: list[Tensor] = [None] * L  # type: ignore[list-item]
        hz: list[Tensor] = [None] * L  # type: ignore[list-item]
        resid: list[Tensor | None] = [None] * L
        for l in range(L - 1, lowest - 1, -1):
            d1, d2 = d1s[l], d2s[l]
            g = gx if d1 is None else gx * d1
            if d2 is not None:
                resid[l] = d2 * gx
            if hx is not None and hx.ndim == 2:  # the diagonal only (diag_first, l = 0)
                h = hx if d1 is None else hx * d1 * d1
                if curvature == "hessian" and resid[l] is not None:
                    h = h + resid[l]
                hz[l] = h
            elif hx is not None:
                h = hx if d1 is None else hx * d1[:, :, None] * d1[:, None, :]
                if curvature == "hessian" and resid[l] is not None:
                    h.diagonal(dim1=1, dim2=2).add_(resid[l])
                hz[l] = h
            gz[l] = g
            if l > lowest:
                W, _ = struct.layers[l].weights(dtype)
                gx = g @ W
                if hx is not None and diag_first and l == 1:
                    hx = (torch.matmul(hz[l], W) * W).sum(1)  # diag(Wᵀ H_Z W)
                elif hx is not None:
                    hx = torch.matmul(torch.matmul(hz[l], W).transpose(1, 2), W)
    return SecondOrderPass(xs, d1s, gz, hz if curvature else None, resid, out, losses)


def per_sample_bytes(struct: MLPStructure, item: int, buffer_cols: int) -> int:
    """Temporaries per sample of a pass that keeps every layer's H_Z and the cross-layer
    Jacobians, plus ``buffer_cols`` entries of a row factor."""
    n = buffer_cols
    widths = [(layer.n_in, layer.n_out) for layer in struct.layers]
    for a, b in widths:
        n += a + 4 * b + 3 * b * b + b * a
    for i, (_, a) in enumerate(widths):
        for _, b in widths[i + 1 :]:
            n += 4 * a * b + 2 * b * b
    return item * max(n, 1)


def sample_chunks(
    problem: CurvatureRequest,
    struct: MLPStructure,
    chunk_size: int | None,
    buffer_cols: int = 0,
    *,
    per_sample: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """(X, y) chunks of at most ``chunk_size`` samples (default: CHUNK_BYTES of temporaries at
    ``per_sample`` bytes a sample, estimated for the dense blocks unless given)."""
    N = problem.n_samples
    if chunk_size is None:
        per = per_sample or per_sample_bytes(struct, problem.dtype.itemsize, buffer_cols)
        chunk_size = max(1, min(N, CHUNK_BYTES // per))
    else:
        chunk_size = check_positive_int("chunk_size", chunk_size)
    X0 = struct.input(problem.X)
    for a in range(0, N, chunk_size):
        yield X0[a : a + chunk_size], problem.y[a : a + chunk_size]
        tick(min(a + chunk_size, N), N)  # samples done, to a caller's progress= (if any)

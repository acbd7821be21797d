r"""The diagonal of the Hessian or Gauss–Newton matrix of a sequential MLP.

diag H holds Σ_i diag(H_Z,i)_j x_im² per weight and Σ_i diag(H_Z,i)_j per bias. Every per-sample
quantity is kept feature-major — x⁽ˡ⁾, σ′, g as (n_l, n), H_Z as (n_l, n_l, n) — so that each
step is one GEMM with the samples along its wide dimension (z = W·x, g ← Wᵀ·g, the congruence
Wᵀ H_Z W as two GEMMs) or one elementwise pass; no batched products of small per-sample
matrices. The first layer's H_Z is needed only on its diagonal,

    diag(Wᵀ H_Z W)_m = Σ_cc′ H_Z[c, c′] W_cm W_c′m = Kᵀ·vec(H_Z),   K[(c, c′), m] = W_cm W_c′m,

one GEMM (for a softmax loss right at the output, H_Z = w(diag p − ppᵀ) and this is
w((W ⊙ W)ᵀp − (Wᵀp)²), two thin GEMMs and no H_Z at all). Then per layer one GEMM
diag(H_Z)·(x ⊙ x), for the wide input in cache-sized row blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from secondorder._validation import check_finite as check_finite_values
from secondorder.losses import Loss

from .backward import sample_chunks
from .request import CurvatureRequest
from .structure import LayerInfo, MLPStructure, is_linear_map

__all__ = ["diagonal", "reveals_nonfinite_input"]


#: largest K matrix (entries) that :func:`diagonal` builds for the second layer
_K_ELEMENTS = 2**22
#: bytes of the row block of x ⊙ x that :func:`_add_squares_gemm` keeps in cache
_SQUARE_BLOCK_BYTES = 2**20


def _add_squares_gemm(out: Tensor, a: Tensor, x: Tensor, alpha: float = 1.0) -> None:
    """out += α·a·(x ⊙ x) for a (m, n), x (n, k): x ⊙ x is formed a row block at a time in a
    reused buffer that stays in cache (no n×k temporary) and each block is one GEMM."""
    n, k = x.shape
    rows = max(16, _SQUARE_BLOCK_BYTES // max(1, k * x.element_size()))
    if n <= rows:
        out.addmm_(a, x * x, alpha=alpha)
        return
    buf = torch.empty(rows, k, dtype=x.dtype, device=x.device)
    for s in range(0, n, rows):
        xb = x[s : s + rows]
        b = buf[: xb.shape[0]]
        torch.mul(xb, xb, out=b)
        out.addmm_(a[:, s : s + rows], b, alpha=alpha)


def _add_scaled_squares(out: Tensor, a: Tensor, x: Tensor, alpha: float) -> None:
    """out += α·a·(x ⊙ x) for a (m, n), x (n, k), as (a·(x/s)²)·s·s with s the largest |x| of
    each column: finite wherever the exact sum is, also when x² itself overflows."""
    s = x.abs().amax(0)
    s = torch.where(s > 0, s, torch.ones_like(s))
    r = x / s
    out.add_(torch.mm(a, r * r).mul_(s).mul_(s), alpha=alpha)


def _congruence_fm(h: Tensor, W: Tensor) -> Tensor:
    """Wᵀ h_i W for every sample, feature-major: h (k, k, n) symmetric per sample, W (k, m);
    returns (m, m, n). Two GEMMs with the samples along the wide dimension (no batched
    small products) and one transposing copy between them."""
    k, _, n = h.shape
    m = W.shape[1]
    A = torch.mm(W.T, h.reshape(k, k * n))  # [m, c′, i] = Σ_c W_cm h_cc′
    A = A.view(m, k, n).transpose(0, 1).reshape(k, m * n)
    return torch.mm(W.T, A).view(m, m, n)  # [m′, m, i] = (Wᵀ h W)_mm′


def _diag_per_sample_bytes(struct: MLPStructure, item: int) -> int:
    """Temporaries per sample of :func:`diagonal`: activations, σ′, σ″, g and diag H_Z of
    every layer, and the full H_Z (with one congruence factor) of every layer above the first."""
    n = 0
    for l, layer in enumerate(struct.layers):
        n += layer.n_in + 6 * layer.n_out
        if l > 0:
            n += 3 * layer.n_out**2 + 2 * layer.n_out * layer.n_in
    return item * max(n, 1)


def reveals_nonfinite_input(struct: MLPStructure) -> bool:
    """Whether a NaN or inf anywhere in X must show in the diagonal: X reaches the first
    GEMMs unchanged (at most flattened), and then x ⊙ x holds it, and every weight of the
    first layer's row in the result is NaN or ±inf (0·inf is NaN). A finite diagonal thus
    proves X finite, and only a non-finite one needs the elementwise test."""
    return struct.layers[0].n_out > 0 and all(isinstance(m, nn.Flatten) for m in struct.preprocess)


@dataclass
class _Plan:
    """What every chunk of :func:`diagonal` shares: the weights, the views of the result per
    layer, and the precomputed factors of the top and second layers."""

    layers: tuple[LayerInfo, ...]
    Ws: list[tuple[Tensor, Tensor | None]]
    dW: list[Tensor]
    db: list[Tensor | None]
    loss: Loss
    weight: float
    hess: bool
    softmax_top: bool  # a softmax loss straight after the last Linear: H_Z stays implicit
    Wt_top: Tensor | None = None  # Wᵀ and (W ⊙ W)ᵀ of the last layer, for softmax_top
    WW_top: Tensor | None = None
    K: Tensor | None = None  # K[(c, c′), m] = W_cm W_c′m of the second layer
    scaled: bool = False  # form x ⊙ x as (x/s)² · s² (no overflow for large inputs)


def _plan(problem: CurvatureRequest, struct: MLPStructure, mode: str, d: Tensor) -> _Plan:
    layers = struct.layers
    L = len(layers)
    Ws = [layer.weights(problem.dtype) for layer in layers]
    plan = _Plan(
        layers,
        Ws,
        [d[ly.offset : ly.offset + ly.n_weight].view(ly.n_out, ly.n_in) for ly in layers],
        [
            d[ly.offset + ly.n_weight : ly.offset + ly.n_params] if ly.bias else None
            for ly in layers
        ],
        problem.loss,
        1.0 / problem.n_samples,
        mode == "hessian",
        problem.loss.softmax_output and is_linear_map(layers[-1].activation),
    )
    if plan.softmax_top and L > 1:
        W = Ws[-1][0]
        plan.Wt_top, plan.WW_top = W.T.contiguous(), (W * W).T.contiguous()
    if L > 1 and not (plan.softmax_top and L == 2):
        W = Ws[1][0]
        if W.shape[0] ** 2 * W.shape[1] <= _K_ELEMENTS:
            plan.K = (W[None, :, :] * W[:, None, :]).reshape(-1, W.shape[1]).T.contiguous()
    return plan


def diagonal(
    problem: CurvatureRequest,
    struct: MLPStructure,
    mode: str,
    chunk_size: int | None,
    check_finite: bool = False,
) -> Tensor:
    """diag H (mode "hessian") or diag G ("ggn") with the l2 term (see the module doc).

    With ``check_finite``, X is tested for NaN/inf here, by the result when
    :func:`reveals_nonfinite_input` holds (the caller tests it upfront otherwise).
    """
    d = torch.zeros(struct.n_params, dtype=problem.dtype, device=problem.device)
    plan = _plan(problem, struct, mode, d)
    per = _diag_per_sample_bytes(struct, problem.dtype.itemsize)
    with torch.no_grad():
        for X, y in sample_chunks(problem, struct, chunk_size, per_sample=per):
            _add_chunk(plan, X, y)
        if not bool(torch.isfinite(d).all()):
            if check_finite:
                check_finite_values("X", problem.X)  # raises on NaN/inf in X
            # x ⊙ x may have overflowed where diag(H_Z)·x² does not (0·inf = NaN for a
            # saturated unit): again with the squares scaled by each column's largest |x|
            d.zero_()
            plan.scaled = True
            for X, y in sample_chunks(problem, struct, chunk_size, per_sample=per):
                _add_chunk(plan, X, y)
    if problem.l2:
        d.add_(problem.l2_mask, alpha=problem.l2)
    return d


def _forward_fm(plan: _Plan, X: Tensor):
    """The forward pass, feature-major: (layer inputs — X sample-major (n, n_in), the others
    (n_l, n) —, σ′ and σ″ per layer (None where they are 1 or 0), the output (k, n))."""
    xs: list[Tensor] = [X]
    d1s: list[Tensor | None] = []
    d2s: list[Tensor | None] = []
    x = X.T
    for layer, (W, b) in zip(plan.layers, plan.Ws):
        z = torch.mm(W, x)
        if b is not None:
            z.add_(b[:, None])
        act = layer.activation
        if is_linear_map(act):
            x, d1, d2 = z, None, None
        else:
            x, d1, d2 = act.derivatives(z)
            if not plan.hess or act.is_piecewise_linear:
                d2 = None
        xs.append(x)
        d1s.append(d1)
        d2s.append(d2)
    return xs, d1s, d2s, x


def _add_chunk(plan: _Plan, X: Tensor, y: Tensor) -> None:
    """Add one chunk's share to the diagonal: the forward pass, the top layer(s), then
    diag H_Z and H_X downwards."""
    L = len(plan.layers)
    xs, d1s, d2s, x = _forward_fm(plan, X)
    if plan.softmax_top:  # the last layer from p alone
        top = _softmax_top(plan, x, y, xs)
        if top is None:
            return
        gx, hx, scale = top
        start = L - 2
    else:
        gx, hx = plan.loss.output_derivatives_fm(x, y, plan.weight, grad=plan.hess)
        scale = 1.0  # the weight w = 1/N is already in hx and gx
        start = L - 1
    _backward_fm(plan, xs, d1s, d2s, gx, hx, scale, start)


def _softmax_top(plan: _Plan, x: Tensor, y: Tensor, xs: list[Tensor]):
    """The last layer's diagonal from p = softmax(output) alone; then (g, H_X, the weight w
    still to apply to both) at the layer below, or None for a single layer."""
    L = len(plan.layers)
    weight = plan.weight
    p = torch.softmax(x, 0)
    l = L - 1
    dh = torch.addcmul(p, p, p, value=-1.0)  # diag(diag p − ppᵀ), w in the GEMM
    _add_layer_diag(plan.dW[l], plan.db[l], dh, xs[l], l, weight, plan.scaled)
    if L == 1:
        return None
    W = plan.Ws[l][0]
    q = torch.mm(W.T, p)  # Wᵀp
    # ∂ℓ/∂x = Wᵀ(p − e_y): no one-hot, the label's column of Wᵀ is gathered
    gx = torch.sub(q, plan.Wt_top.index_select(1, y)) if plan.hess else None
    if L == 2:  # diag(Wᵀ(diag p − ppᵀ)W) = (W ⊙ W)ᵀp − (Wᵀp)²
        return gx, torch.mm(plan.WW_top, p).sub_(q.square()), weight
    _, h = plan.loss.output_derivatives_fm(x, y, weight, grad=False)
    hx = _congruence_fm(h, W)
    if gx is not None:
        gx.mul_(weight)
    return gx, hx, 1.0


def _backward_fm(
    plan: _Plan,
    xs: list[Tensor],
    d1s: list[Tensor | None],
    d2s: list[Tensor | None],
    gx: Tensor | None,
    hx: Tensor,
    scale: float,
    start: int,
) -> None:
    """From layer ``start`` down: diag H_Z per layer into the result (times ``scale``), and
    g, H_X one layer lower — only diag H_X for the first layer."""
    for l in range(start, -1, -1):
        d1, d2 = d1s[l], d2s[l]
        if hx.ndim == 2:  # the first layer: diag H_X only, (n_1, n)
            h = hx if d1 is None else hx * (d1 * d1)
            if d2 is not None:
                h = h.addcmul_(d2, gx)
            dh = h
        else:  # (n_l, n_l, n)
            h = hx
            if d1 is not None:
                h = h.mul_(d1[:, None, :]).mul_(d1[None, :, :])
            dh = h.diagonal(dim1=0, dim2=1).T
            if d2 is not None:
                dh.addcmul_(d2, gx)
        _add_layer_diag(plan.dW[l], plan.db[l], dh, xs[l], l, scale, plan.scaled)
        if l == 0:
            break
        W = plan.Ws[l][0]
        if gx is not None:
            gx = torch.mm(W.T, gx if d1 is None else gx * d1)
        if l > 1:
            hx = _congruence_fm(h, W)
        elif plan.K is not None:  # diag(Wᵀ H_Z W) = Kᵀ·vec(H_Z)
            hx = torch.mm(plan.K, h.reshape(-1, h.shape[2]))
        else:  # the same, as Σ_c W_cm (Wᵀ H_Z)[m, c]
            k, _, n = h.shape
            A = torch.mm(W.T, h.reshape(k, k * n)).view(W.shape[1], k, n)
            hx = (A * W.T[:, :, None]).sum(1)


def _add_layer_diag(
    dW: Tensor,
    db: Tensor | None,
    dh: Tensor,
    x: Tensor,
    l: int,
    alpha: float = 1.0,
    scaled: bool = False,
) -> None:
    """dW += α·diag(H_Z)·(x ⊙ x) and db += α·Σ_i diag(H_Z); dh is (n_out, n), x is the
    layer's input, sample-major (n, n_in) for the first layer and feature-major above."""
    if scaled:
        _add_scaled_squares(dW, dh, x if l == 0 else x.T, alpha)
    elif l == 0:
        _add_squares_gemm(dW, dh, x, alpha)
    else:
        dW.addmm_(dh, (x * x).T, alpha=alpha)
    if db is not None:
        db.add_(dh.sum(1), alpha=alpha)

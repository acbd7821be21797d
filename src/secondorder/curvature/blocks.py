r"""Block kernels: the Hessian (or Gauss–Newton) blocks of a sequential MLP from its pass.

A layer's own block follows from z⁽ˡ⁾ being linear in (W⁽ˡ⁾, b⁽ˡ⁾) (eqs. 68-70):
H[(j,m),(j′,m′)] = Σ_i x_m H_Z[j,j′] x_m′. A cross-layer block (k < l) has two parts: θ_k moves
z⁽ˡ⁾ through x⁽ˡ⁻¹⁾, and z⁽ˡ⁾ = W⁽ˡ⁾x⁽ˡ⁻¹⁾ is bilinear, so ∂²z⁽ˡ⁾/∂W⁽ˡ⁾∂x⁽ˡ⁻¹⁾ ≠ 0. With the
per-sample Jacobian J⁽ˡ←ᵏ⁾ = ∂z⁽ˡ⁾/∂z⁽ᵏ⁾ and E⁽ᵏˡ⁾ = ∂x⁽ˡ⁻¹⁾/∂z⁽ᵏ⁾ = D_{l−1} J⁽ˡ⁻¹←ᵏ⁾,

    ∂²ℓ/∂W⁽ᵏ⁾_{jm} ∂W⁽ˡ⁾_{j′m′} = x⁽ᵏ⁻¹⁾_m · ( [J⁽ˡ←ᵏ⁾ᵀ H_Z⁽ˡ⁾]_{j j′} x⁽ˡ⁻¹⁾_{m′}
                                             + g⁽ˡ⁾_{j′} E⁽ᵏˡ⁾_{m′ j} ),

and the bias rows and columns are the same with x_m (or x_m′) replaced by 1 (a bias column of
layer l has no bilinear part). Dropping every σ″ term and the bilinear part leaves the
Gauss–Newton matrix Jᵀ H_loss J.

No Kronecker product and no (n_l·m)² matrix is formed. *Wide layers*: the block is made of the
sub-blocks S_jj′ = Σ_i H_Z,i[j, j′] x_i x_iᵀ, and S_jj′ = S_j′j = S_jj′ᵀ. Only the pairs j ≤ j′
and, per band of input rows m, the columns m′ ≥ m are computed — for all pairs by one GEMM
(pairs × N)·(N × band·n_in) against the products x_im x_im′ — and every result is copied to its
four places: about ¼·N·P_l² multiply-adds (:func:`_layer_block`). Narrow layers (and the
cross-layer blocks) use row factors instead: for every row j of a layer the factor C_j[i, ·]
(one row per sample, one column per parameter of the column layer) is built elementwise and one
GEMM ``X⁽ᵏ⁻¹⁾ᵀ C_j`` writes the n_{k−1} rows (j, ·) of the block; its column sums give the bias
row; within a layer only the columns j′ ≥ j are computed and the rest mirrored. The full Hessian
of a network whose first layer dominates thus costs about ¼·N·P_1² + N·P_1·(P − P_1) + …
multiply-adds, a quarter of the N·P² of a dense per-sample product. Outputs start
uninitialised (every entry is written once); samples are processed in chunks that bound memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .backward import (
    CHUNK_BYTES,
    SecondOrderPass,
    per_sample_bytes,
    sample_chunks,
    second_order_pass,
)
from .request import CurvatureRequest
from .structure import LayerInfo, MLPStructure

__all__ = ["add_l2", "assemble", "dense"]


def _diag_pair(
    out: Tensor, hz: Tensor, x: Tensor, bias: bool, buf: Tensor, first: bool = False
) -> None:
    """Add Σ_i (∂z/∂θ_l)ᵀ H_Z (∂z/∂θ_l) to the upper band part of the layer block ``out``
    (with ``first``, write it: ``out`` may hold garbage, e.g. fresh ``torch.empty`` memory)."""
    n, a, _ = hz.shape
    n_in = x.shape[1]
    nW = a * n_in
    xt = x.T
    beta = 0.0 if first else 1.0  # β = 0: the old contents are ignored, NaN included
    for j in range(a):
        width = (a - j) * n_in
        ncols = width + (a if bias else 0)
        C = buf[: n * ncols].view(n, ncols)
        torch.mul(hz[:, j, j:, None], x[:, None, :], out=C[:, :width].view(n, a - j, n_in))
        if bias:
            C[:, width:].copy_(hz[:, j, :])
        out[j * n_in : (j + 1) * n_in, j * n_in :].addmm_(xt, C, beta=beta)
        if bias:
            _put(out[nW + j, nW:], C[:, width:].sum(0), first)


def _put(dst: Tensor, src: Tensor, first: bool) -> None:
    if first:
        dst.copy_(src)
    else:
        dst.add_(src)


def _copy_transposed(dst: Tensor, src: Tensor, tile: int = 512) -> None:
    """dst ← srcᵀ, tile by tile (a strided transposed copy of a large view is cache-hostile)."""
    r, c = dst.shape
    for i in range(0, r, tile):
        for j in range(0, c, tile):
            dst[i : i + tile, j : j + tile].copy_(src[j : j + tile, i : i + tile].T)


def _mirror_diag(out: Tensor, a: int, n_in: int, bias: bool) -> None:
    """Fill the part of a layer block below the computed bands from its transpose, and make
    the diagonal sub-blocks (computed whole, so equal to their transposes only up to rounding)
    exactly symmetric."""
    for j in range(a):
        band = slice(j * n_in, (j + 1) * n_in)
        _copy_transposed(out[band, : j * n_in], out[: j * n_in, band])
        _symmetrize_small(out[band, band])
    if bias:
        nW = a * n_in
        _copy_transposed(out[nW:, :nW], out[:nW, nW:])
        _symmetrize_small(out[nW:, nW:])


def _symmetrize_small(block: Tensor) -> None:
    block.copy_(0.5 * (block + block.T))


def _cross_pair(
    out: Tensor,
    M: Tensor,
    xr: Tensor,
    xc: Tensor,
    g: Tensor | None,
    E: Tensor | None,
    bias_r: bool,
    bias_c: bool,
    buf: Tensor,
    first: bool = False,
) -> None:
    """Add (with ``first``, write) the block (row layer k, column layer l > k):
    Σ_i x_m (M[j,j′] x′_m′ + g_j′ E[m′,j])."""
    n, a, b = M.shape
    n_in_r, n_in_c = xr.shape[1], xc.shape[1]
    nWc = b * n_in_c
    ncols = nWc + (b if bias_c else 0)
    nWr = a * n_in_r
    C = buf[: n * ncols].view(n, ncols)
    Cw = C[:, :nWc].view(n, b, n_in_c)
    xt = xr.T
    beta = 0.0 if first else 1.0
    for j in range(a):
        torch.mul(M[:, j, :, None], xc[:, None, :], out=Cw)
        if E is not None:
            Cw.addcmul_(g[:, :, None], E[:, None, :, j])
        if bias_c:
            C[:, nWc:].copy_(M[:, j, :])
        out[j * n_in_r : (j + 1) * n_in_r].addmm_(xt, C, beta=beta)
        if bias_r:
            _put(out[nWr + j], C.sum(0), first)


#: layers with at least this many units get their diagonal block from :func:`_layer_block`
_PAIR_MIN_UNITS = 8
#: the widest row band (inputs m) of one pair GEMM in :func:`_layer_block`
_PAIR_MAX_BAND = 32


#: below this many elements PyTorch copies on one thread (its internal grain size)
_SERIAL_ELEMENTS = 32768


def _copy_serial(dst: Tensor, src: Tensor) -> None:
    """dst ← src in pieces along dim 0 that PyTorch copies on one thread. Thousands of
    parallel copies of a few hundred KB each gain little from a second core and, when that
    core is busy, each waits for it: the pieces keep the copies off the thread pool."""
    n0 = dst.shape[0]
    step = max(1, (_SERIAL_ELEMENTS - 1) // max(1, dst[0].numel())) if n0 else 1
    if step >= n0:
        dst.copy_(src)
        return
    for s in range(0, n0, step):
        dst[s : s + step].copy_(src[s : s + step])


def _layer_block(out: Tensor, hz: Tensor, x: Tensor, bias: bool, budget: int) -> None:
    """Write a layer's whole diagonal block into ``out`` (every entry, exactly symmetric).

    The weight part is made of the sub-blocks S_jj′ = Σ_i h_i[j, j′] x_i x_iᵀ (n_in × n_in),
    symmetric twice over: S_jj′ = S_j′j (H_Z is symmetric) and S_jj′ = S_jj′ᵀ. Only the pairs
    j ≤ j′ and, within a band of rows m0 ≤ m < m1, the columns m′ ≥ m0 are computed, for all
    pairs at once by one GEMM

        R[(j, j′), (m, m′)] = Σ_i h_i[j, j′] · x_im x_im′,     (pairs × N)·(N × band·(n_in − m0)),

    and each result lands in its four places (S_jj′ and S_j′j, the band and its transpose) by
    strided copies. That is about ¼·N·P_l² multiply-adds — half of the ½·N·P_l² of computing
    the row bands j′ ≥ j — plus O(N·P_l) elementwise work to form the products x_im x_im′.
    The bias rows and columns are one GEMM (n_l² × N)·(N × n_in) and Σ_i H_Z,i.
    """
    N, a, _ = hz.shape
    n = x.shape[1]
    nW = a * n
    item = x.element_size()
    iu = torch.triu_indices(a, a, device=hz.device)
    HpT = hz[:, iu[0], iu[1]].T.contiguous()  # (pairs, N), pairs (j, j′ ≥ j) row by row
    npairs = HpT.shape[0]
    starts = [j * a - j * (j - 1) // 2 for j in range(a + 1)]  # the first pair of row j
    band = int(min(n, _PAIR_MAX_BAND, max(8, budget // (item * n * (N + npairs)))))
    nc = int(min(N, max(256, budget // (item * band * n) - npairs)))
    Fbuf = torch.empty(nc * band * n, dtype=x.dtype, device=x.device)
    Rbuf = torch.empty(npairs * band * n, dtype=x.dtype, device=x.device)
    W4 = out[:nW, :nW].unflatten(0, (a, n)).unflatten(2, (a, n))  # [j, m, j′, m′]
    for m0 in range(0, n, band):
        m1 = min(m0 + band, n)
        b, w = m1 - m0, n - m0
        R = Rbuf[: npairs * b * w].view(npairs, b * w)
        for s0 in range(0, N, nc):
            xs = x[s0 : s0 + nc]
            F = Fbuf[: xs.shape[0] * b * w].view(xs.shape[0], b, w)
            torch.mul(xs[:, m0:m1, None], xs[:, None, m0:], out=F)
            F2 = F.view(xs.shape[0], b * w)
            if s0 == 0:
                torch.mm(HpT[:, s0 : s0 + nc], F2, out=R)
            else:
                R.addmm_(HpT[:, s0 : s0 + nc], F2)
        R3 = R.view(npairs, b, w)  # [(j, j′), m − m0, m′ − m0] = S_jj′[m, m′]
        corner = R3[:, :, :b]  # computed on both sides of its diagonal: make it exact
        corner.copy_(0.5 * (corner + corner.transpose(1, 2)))
        for j in range(a):
            Rj = R3[starts[j] : starts[j + 1]]  # (a − j, b, w): j′ = j … a − 1
            _copy_serial(W4[j, m0:m1, j:, m0:], Rj.transpose(0, 1))
            _copy_serial(W4[j:, m0:m1, j, m0:], Rj)
            if b < w:
                low = Rj[:, :, b:]  # S_jj′[m0:m1, m1:]; its transpose is S_jj′[m1:, m0:m1]
                _copy_serial(W4[j, m1:, j:, m0:m1], low.permute(2, 0, 1))
                _copy_serial(W4[j:, m1:, j, m0:m1], low.transpose(1, 2))
    if bias:
        T = torch.mm(hz.reshape(N, a * a).T, x).view(a, a, n)  # [j, j′, m] = Σ_i h_jj′ x_m
        out[:nW, nW:].unflatten(0, (a, n)).copy_(T.permute(0, 2, 1))
        out[nW:, :nW].unflatten(1, (a, n)).copy_(T.transpose(0, 1))
        S = hz.sum(0)
        out[nW:, nW:].copy_(0.5 * (S + S.T))


def assemble(
    problem: CurvatureRequest,
    struct: MLPStructure,
    targets: dict[tuple[int, int], Tensor],
    mode: str,
    chunk_size: int | None,
) -> None:
    """Write the blocks ``targets[(k, l)]`` (k ≤ l) of the Hessian or Gauss–Newton matrix.

    Every entry of a target is written (the first chunk overwrites, later ones add; the
    diagonal blocks of wide layers are written once, at the end, by :func:`_layer_block`), so
    the targets may start uninitialised: no pass to zero them. Diagonal blocks come out
    complete and exactly symmetric; no l2 term is added.
    """
    layers = struct.layers
    # wide layers: whole block at the end from all samples' H_Z (one pass over the output);
    # narrow ones: row bands per chunk, mirrored at the end
    wide = {k for k, l in targets if k == l and layers[k].n_out >= _PAIR_MIN_UNITS}
    cols = max([layers[l].n_params for k, l in targets if k != l or k not in wide] or [0])
    reach: dict[int, int] = {}
    for k, l in targets:
        if l > k:
            reach[k] = max(reach.get(k, k), l)
    weight = 1.0 / problem.n_samples
    lowest = min(k for k, _ in targets)
    buf = None
    item = problem.dtype.itemsize
    out_bytes = sum(t.numel() for t in targets.values()) * item
    # temporaries up to 1/8 of the output (at least CHUNK_BYTES): one chunk where that fits
    budget = max(CHUNK_BYTES, out_bytes // 8)
    per = per_sample_bytes(struct, item, cols)
    size = chunk_size if chunk_size is not None else max(1, budget // per)
    kept: dict[int, tuple[list[Tensor], list[Tensor]]] = {k: ([], []) for k in wide}
    for c, (X, y) in enumerate(sample_chunks(problem, struct, size, cols)):
        first = c == 0
        n = X.shape[0]
        if buf is None or buf.numel() < n * cols:
            buf = torch.empty(n * cols, dtype=problem.dtype, device=problem.device)
        ps = second_order_pass(struct, X, y, problem.loss, weight, mode, lowest=lowest)
        for (k, l), out in targets.items():
            if k == l and k in wide:
                kept[k][0].append(ps.hz[k])
                kept[k][1].append(ps.xs[k])
            elif k == l:
                _diag_pair(out, ps.hz[k], ps.xs[k], layers[k].bias, buf, first)
        _cross_blocks(targets, reach, ps, layers, mode == "hessian", buf, first)
    del buf
    for k, (hzs, xs) in kept.items():
        hz = hzs[0] if len(hzs) == 1 else torch.cat(hzs)
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        hzs.clear()
        xs.clear()
        _layer_block(targets[(k, k)], hz, x, layers[k].bias, budget)
    for (k, l), out in targets.items():
        if k == l and k not in wide:
            _mirror_diag(out, layers[k].n_out, layers[k].n_in, layers[k].bias)


def _cross_blocks(
    targets: dict[tuple[int, int], Tensor],
    reach: dict[int, int],
    ps: SecondOrderPass,
    layers: Sequence[LayerInfo],
    hess: bool,
    buf: Tensor,
    first: bool,
) -> None:
    """One chunk's share of the cross-layer targets (k < l ≤ reach[k]): the Jacobians
    J⁽ˡ←ᵏ⁾ = W⁽ˡ⁾ E⁽ᵏˡ⁾, E⁽ᵏˡ⁾ = D_{l−1} J⁽ˡ⁻¹←ᵏ⁾, go up from layer k; the bilinear part
    (g⁽ˡ⁾, E) belongs to the Hessian only."""
    X = ps.xs[0]
    n = X.shape[0]
    for k, last in reach.items():
        J = None  # J⁽ˡ←ᵏ⁾ for the current l; None is the identity (l = k)
        for l in range(k + 1, last + 1):
            d1 = ps.d1[l - 1]
            if J is None:
                ones = torch.ones(n, layers[k].n_out, dtype=X.dtype, device=X.device)
                E = torch.diag_embed(ones if d1 is None else d1)
            else:
                E = J if d1 is None else d1[:, :, None] * J
            W, _ = layers[l].weights(X.dtype)
            J = torch.matmul(W, E)
            if (k, l) in targets:
                M = torch.matmul(J.transpose(1, 2), ps.hz[l])
                _cross_pair(
                    targets[(k, l)],
                    M,
                    ps.xs[k],
                    ps.xs[l],
                    ps.gz[l] if hess else None,
                    E if hess else None,
                    layers[k].bias,
                    layers[l].bias,
                    buf,
                    first,
                )


def add_l2(problem: CurvatureRequest, out: Tensor, rows: slice) -> None:
    """Add l2 to the diagonal of the block ``out`` of the rows ``rows`` (weights only)."""
    if problem.l2:
        out.diagonal().add_(problem.l2 * problem.l2_mask[rows])


def dense(problem: CurvatureRequest, struct: MLPStructure, mode: str, chunk_size) -> Tensor:
    """The dense P×P Hessian (mode "hessian") or Gauss–Newton matrix ("ggn") with the l2 term:
    the upper blocks by :func:`assemble`, the lower ones as their transposes. The caller has
    checked that P×P fits."""
    P = struct.n_params
    H = torch.empty(P, P, dtype=problem.dtype, device=problem.device)  # every entry written
    sl = [layer.params for layer in struct.layers]
    L = len(sl)
    targets = {(k, l): H[sl[k], sl[l]] for k in range(L) for l in range(k, L)}
    assemble(problem, struct, targets, mode, chunk_size)
    for k in range(L):
        for l in range(k + 1, L):
            _copy_transposed(H[sl[l], sl[k]], H[sl[k], sl[l]])
    add_l2(problem, H, slice(0, P))
    return H

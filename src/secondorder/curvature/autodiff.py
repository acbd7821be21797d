"""Exact curvature of any ``nn.Module`` by automatic differentiation (the fallback engine).

Second-order backpropagation (:mod:`secondorder.curvature.backprop`) covers sequential MLPs.
Every other model — convolutions, custom modules, activations without a closed-form σ″ — goes
through the functions here, which differentiate a flat-parameter function with ``torch.func``:

- Hessian columns are Hessian-vector products over chunks of identity columns, batched by
  double backward with ``is_grads_batched`` or by ``vmap`` over the pullback of
  ``vjp(grad)`` (reverse-over-reverse, the gradient's graph built once), or by
  ``vmap(jvp(grad))`` (forward-over-reverse), whichever the model supports; the dense Hessian,
  its diagonal and its blocks are assembled from them, chunk by chunk.
- The Gauss–Newton matrix G = Σ_i J_iᵀ H_{out,i} J_i uses per-sample output Jacobians
  (``vmap(jacrev)``), chunked over samples.

The objective is the one of :class:`secondorder.objective.ModelObjective` with the full batch,
as a :class:`secondorder.curvature.request.CurvatureRequest` holds it (``prepare`` and
``parameter_groups`` are re-exported here for callers of this engine).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from secondorder._validation import check_positive_int
from secondorder.functional import parameter_groups
from secondorder.linalg import check_dense_fits

from .request import CurvatureRequest, prepare

__all__ = [
    "autodiff_ggn",
    "autodiff_ggn_diagonal",
    "autodiff_hessian",
    "autodiff_ggn_blocks",
    "autodiff_hessian_blocks",
    "autodiff_hessian_diagonal",
    "hessian_rows",
    "parameter_groups",
    "prepare",
]

#: default bytes for the temporaries of one chunk (columns or samples)
CHUNK_BYTES = 2**28


# -- Hessian rows by batched Hessian-vector products --------------------------------------------


def _rows_reverse(fn: Callable, theta: Tensor) -> Callable[[Tensor], Tensor]:
    t = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(fn(t), t, create_graph=True)

    def rows(V: Tensor) -> Tensor:
        if not g.requires_grad:
            return torch.zeros_like(V)
        (hv,) = torch.autograd.grad(
            g, t, V, retain_graph=True, is_grads_batched=True, allow_unused=True
        )
        return torch.zeros_like(V) if hv is None else hv.detach()

    return rows


def _rows_forward(fn: Callable, theta: Tensor) -> Callable[[Tensor], Tensor]:
    grad_fn = torch.func.grad(fn)
    theta = theta.detach()

    def hvp(v: Tensor) -> Tensor:
        return torch.func.jvp(grad_fn, (theta,), (v,))[1]

    batched = torch.func.vmap(hvp)
    return lambda V: batched(V).detach()


def _rows_vjp(fn: Callable, theta: Tensor) -> Callable[[Tensor], Tensor]:
    """Reverse-over-reverse through torch.func: the gradient's graph is recorded once by
    ``vjp(grad(fn))`` and the pullback is vmapped over the rows of V."""
    _, pullback = torch.func.vjp(torch.func.grad(fn), theta.detach())
    batched = torch.func.vmap(pullback)
    return lambda V: batched(V)[0].detach()


def _rows_loop(fn: Callable, theta: Tensor) -> Callable[[Tensor], Tensor]:
    t = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(fn(t), t, create_graph=True)

    def rows(V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        if not g.requires_grad:
            return out
        for i in range(V.shape[0]):
            (hv,) = torch.autograd.grad(g, t, V[i], retain_graph=True, allow_unused=True)
            if hv is not None:
                out[i] = hv
        return out

    return rows


ROUTES = ("reverse", "vjp", "forward", "loop")


def hessian_rows(
    fn: Callable[[Tensor], Tensor], theta: Tensor, route: str = "auto"
) -> tuple[Callable[[Tensor], Tensor], str]:
    """A batched product V ↦ V ∇²fn(θ) (rows of V are directions; ∇² is symmetric).

    ``route``: ``"reverse"`` (double backward, batched with ``is_grads_batched``; the gradient
    graph is built once), ``"vjp"`` (the same through torch.func: ``vmap`` over the pullback of
    ``vjp(grad)``, graph recorded once), ``"forward"`` (``vmap(jvp(grad))``), ``"loop"`` (one
    double backward per row) or ``"auto"``: the first of these that the model supports.
    Returns the product and the route taken.
    """
    candidates = ROUTES if route == "auto" else (route,)
    if route != "auto" and route not in ROUTES:
        raise ValueError(f"route={route!r} is not one of {['auto', *ROUTES]}")
    probe = torch.zeros(1, theta.numel(), dtype=theta.dtype, device=theta.device)
    probe[0, 0] = 1.0
    last: Exception | None = None
    for name in candidates:
        maker = {
            "reverse": _rows_reverse,
            "vjp": _rows_vjp,
            "forward": _rows_forward,
            "loop": _rows_loop,
        }[name]
        try:
            rows = maker(fn, theta)
            rows(probe)
        except Exception as exc:  # noqa: BLE001 - try the next route
            last = exc
            continue
        return rows, name
    raise RuntimeError(f"no Hessian-vector product route works for this model: {last}")


def _column_chunk(problem: CurvatureRequest, chunk_columns: int | None) -> int:
    if chunk_columns is not None:
        return check_positive_int("chunk_columns", chunk_columns)
    # one batched product holds a few P-vectors and the tangents of the activations; the
    # latter are estimated as N × max(64, k) numbers per layer-ish (a heuristic, not a bound)
    item = problem.theta.element_size()
    per_column = item * (4 * problem.n_params + 8 * problem.n_samples * max(64, problem.out_dim))
    return int(max(1, min(128, problem.n_params, CHUNK_BYTES // per_column)))


def _symmetrize_(H: Tensor, tile: int = 2048) -> Tensor:
    """H ← (H + Hᵀ)/2 in place, tile by tile (no P×P temporary)."""
    n = H.shape[0]
    for i in range(0, n, tile):
        i1 = min(i + tile, n)
        a = H[i:i1, i:i1]
        a.copy_(0.5 * (a + a.T))
        for j in range(i1, n, tile):
            j1 = min(j + tile, n)
            m = 0.5 * (H[i:i1, j:j1] + H[j:j1, i:i1].T)
            H[i:i1, j:j1].copy_(m)
            H[j:j1, i:i1].copy_(m.T)
    return H


def autodiff_hessian(
    problem: CurvatureRequest,
    *,
    max_bytes: int | None = None,
    chunk_columns: int | None = None,
    route: str = "auto",
) -> Tensor:
    """The dense P×P Hessian from chunks of Hessian-vector products with identity columns."""
    P = problem.n_params
    check_dense_fits(
        (P, P), problem.dtype, "the dense Hessian", max_bytes=max_bytes, device=problem.device
    )
    H = torch.empty(P, P, dtype=problem.dtype, device=problem.device)
    rows, _ = hessian_rows(problem.objective(), problem.theta, route)
    c = _column_chunk(problem, chunk_columns)
    for a in range(0, P, c):
        b = min(a + c, P)
        E = torch.zeros(b - a, P, dtype=problem.dtype, device=problem.device)
        E[:, a:b].fill_diagonal_(1.0)
        H[a:b] = rows(E)
    return _symmetrize_(H)


def autodiff_hessian_diagonal(
    problem: CurvatureRequest, *, chunk_columns: int | None = None, route: str = "auto"
) -> Tensor:
    """The Hessian diagonal from chunked Hessian-vector products (P products in all)."""
    P = problem.n_params
    rows, _ = hessian_rows(problem.objective(), problem.theta, route)
    c = _column_chunk(problem, chunk_columns)
    diag = torch.empty(P, dtype=problem.dtype, device=problem.device)
    for a in range(0, P, c):
        b = min(a + c, P)
        E = torch.zeros(b - a, P, dtype=problem.dtype, device=problem.device)
        E[:, a:b].fill_diagonal_(1.0)
        diag[a:b] = rows(E)[:, a:b].diagonal()
    return diag


def autodiff_hessian_blocks(
    problem: CurvatureRequest,
    groups: Sequence[tuple[int, int]],
    pairs: Sequence[tuple[int, int]],
    *,
    max_bytes: int | None = None,
    chunk_columns: int | None = None,
    route: str = "auto",
) -> dict[tuple[int, int], Tensor]:
    """Blocks H[groups[a], groups[b]] for the requested pairs (a, b), from rows of group a."""
    need: dict[int, list[int]] = {}
    for a, b in pairs:
        need.setdefault(a, []).append(b)
    total = sum((groups[a][1] - groups[a][0]) * (groups[b][1] - groups[b][0]) for a, b in pairs)
    check_dense_fits(
        (total,), problem.dtype, "the Hessian blocks", max_bytes=max_bytes, device=problem.device
    )
    P = problem.n_params
    rows, _ = hessian_rows(problem.objective(), problem.theta, route)
    c = _column_chunk(problem, chunk_columns)
    out: dict[tuple[int, int], Tensor] = {}
    for a, bs in need.items():
        r0, r1 = groups[a]
        for b in bs:
            c0, c1 = groups[b]
            out[(a, b)] = torch.empty(r1 - r0, c1 - c0, dtype=problem.dtype, device=problem.device)
        for s in range(r0, r1, c):
            e = min(s + c, r1)
            E = torch.zeros(e - s, P, dtype=problem.dtype, device=problem.device)
            E[:, s:e].fill_diagonal_(1.0)
            R = rows(E)
            for b in bs:
                c0, c1 = groups[b]
                out[(a, b)][s - r0 : e - r0] = R[:, c0:c1]
        for b in bs:
            if a == b:
                _symmetrize_(out[(a, b)])
    return out


# -- Gauss–Newton matrix ------------------------------------------------------------------------


def _sample_chunk(problem: CurvatureRequest, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return check_positive_int("chunk_size", chunk_size)
    item = problem.theta.element_size()
    per_sample = item * (2 * problem.out_dim * problem.n_params + 1)
    return int(max(1, min(problem.n_samples, CHUNK_BYTES // per_sample)))


def _output_jacobians(problem: CurvatureRequest, X: Tensor) -> Tensor:
    """Per-sample Jacobians ∂f(x_i)/∂θ, shape (n, k, P)."""
    theta = problem.theta.detach()

    def one(th: Tensor, x: Tensor) -> Tensor:
        return problem.forward(th, x[None])[0]

    try:
        return torch.func.vmap(torch.func.jacrev(one), in_dims=(None, 0))(theta, X)
    except Exception:  # noqa: BLE001 - modules without batching rules: one backward per output
        J = torch.func.jacrev(lambda th: problem.forward(th, X))(theta)
        return J


def _ggn_chunks(problem: CurvatureRequest, chunk_size: int | None):
    n = _sample_chunk(problem, chunk_size)
    w = 1.0 / problem.n_samples
    for a in range(0, problem.n_samples, n):
        X, y = problem.X[a : a + n], problem.y[a : a + n]
        J = _output_jacobians(problem, X)
        with torch.no_grad():
            out = problem.forward(problem.theta, X)
        Hout = problem.loss.hessian_output(out, y) * w
        yield J, Hout


def autodiff_ggn(
    problem: CurvatureRequest, *, max_bytes: int | None = None, chunk_size: int | None = None
) -> Tensor:
    """G = (1/N) Σ_i J_iᵀ H_{out,i} J_i (+ l2 on weight diagonals), J_i by ``vmap(jacrev)``."""
    P = problem.n_params
    check_dense_fits(
        (P, P),
        problem.dtype,
        "the dense Gauss-Newton matrix",
        max_bytes=max_bytes,
        device=problem.device,
    )
    G = torch.zeros(P, P, dtype=problem.dtype, device=problem.device)
    for J, Hout in _ggn_chunks(problem, chunk_size):
        HJ = torch.matmul(Hout, J)
        G.addmm_(J.reshape(-1, P).T, HJ.reshape(-1, P))
    _symmetrize_(G)
    problem.add_l2_diagonal(G)
    return G


def autodiff_ggn_blocks(
    problem: CurvatureRequest, groups: Sequence[tuple[int, int]], *, chunk_size: int | None = None
) -> list[Tensor]:
    """The diagonal blocks G[a:b, a:b] of the Gauss–Newton matrix for each group (a, b)."""
    out = [torch.zeros(b - a, b - a, dtype=problem.dtype, device=problem.device) for a, b in groups]
    for J, Hout in _ggn_chunks(problem, chunk_size):
        for (a, b), block in zip(groups, out):
            Jb = J[:, :, a:b]
            block += torch.einsum("nkp,nkq->pq", Jb, torch.matmul(Hout, Jb))
    for (a, b), block in zip(groups, out):
        _symmetrize_(block)
        if problem.l2:
            block.diagonal().add_(problem.l2 * problem.l2_mask[a:b])
    return out


def autodiff_ggn_diagonal(problem: CurvatureRequest, *, chunk_size: int | None = None) -> Tensor:
    """diag(G) from per-sample output Jacobians."""
    d = torch.zeros(problem.n_params, dtype=problem.dtype, device=problem.device)
    for J, Hout in _ggn_chunks(problem, chunk_size):
        d += (J * torch.matmul(Hout, J)).sum((0, 1))
    if problem.l2:
        d += problem.l2 * problem.l2_mask
    return d

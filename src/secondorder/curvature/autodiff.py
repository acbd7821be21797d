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

The objective is the one of :class:`secondorder.objective.ModelObjective` with the full batch:
J(θ) = (1/N) Σ_i ℓ(f(x_i; θ), y_i) + (l2/2)·‖W‖², where ‖W‖² covers the parameters with two
or more dimensions (weight matrices and kernels, not biases).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn
from torch.func import functional_call

from secondorder._validation import check_positive, check_positive_int
from secondorder.linalg import check_dense_fits
from secondorder.losses import Loss, get_loss

__all__ = [
    "Problem",
    "autodiff_ggn",
    "autodiff_ggn_diagonal",
    "autodiff_hessian",
    "autodiff_hessian_blocks",
    "autodiff_hessian_diagonal",
    "hessian_rows",
    "parameter_groups",
    "prepare",
]

#: default bytes for the temporaries of one chunk (columns or samples)
CHUNK_BYTES = 2**28


@dataclass
class Problem:
    """A validated curvature request: the model, its data and loss, and the flat θ layout.

    ``weight = 1/N`` per sample; ``l2_mask`` is 1 on the entries of parameters with two or more
    dimensions, 0 elsewhere. ``theta`` and ``l2_mask`` are formed on first use (from the
    parameters as they are then; every curvature function uses them at once or not at all).
    """

    model: nn.Module
    X: Tensor
    y: Tensor
    loss: Loss
    l2: float
    names: list[str]
    shapes: list[torch.Size]
    numels: list[int]
    params: tuple[Tensor, ...]  # detached
    out_dim: int

    @cached_property
    def theta(self) -> Tensor:
        return torch.cat([p.reshape(-1) for p in self.params])

    @cached_property
    def l2_mask(self) -> Tensor:
        mask = torch.zeros(self.n_params, dtype=self.dtype, device=self.device)
        start = 0
        for n, shape in zip(self.numels, self.shapes):
            if len(shape) >= 2:
                mask[start : start + n] = 1.0
            start += n
        return mask

    @property
    def n_params(self) -> int:
        return int(sum(self.numels))

    @property
    def n_samples(self) -> int:
        return int(self.X.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return functools.reduce(torch.promote_types, (p.dtype for p in self.params))

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        return {
            n: t.view(s)
            for n, t, s in zip(self.names, torch.split(theta, self.numels), self.shapes)
        }

    def forward(self, theta: Tensor, X: Tensor) -> Tensor:
        buffers = dict(self.model.named_buffers())
        return functional_call(self.model, {**self.unflatten(theta), **buffers}, (X,))

    def regulariser(self, theta: Tensor) -> Tensor:
        if self.l2 == 0.0:
            return theta.new_zeros(())
        return 0.5 * self.l2 * (self.l2_mask * theta * theta).sum()

    def objective(self, X: Tensor | None = None, y: Tensor | None = None) -> Callable:
        """θ ↦ (1/N)·Σ ℓ_i over (X, y) (all data by default; N = all samples) + L2 term."""
        X = self.X if X is None else X
        y = self.y if y is None else y
        scale = 1.0 / self.n_samples

        def fn(theta: Tensor) -> Tensor:
            data = scale * self.loss.per_sample(self.forward(theta, X), y).sum()
            return data + self.regulariser(theta)

        return fn

    def add_l2_diagonal(self, H: Tensor, rows: slice | None = None) -> None:
        """Add l2 to the diagonal entries of weight parameters (of a block starting at rows)."""
        if self.l2 == 0.0:
            return
        start = 0 if rows is None else rows.start
        n = H.shape[0] if rows is None else rows.stop - rows.start
        H.diagonal().add_(self.l2 * self.l2_mask[start : start + n])


def _as_tensor(value, arg: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except Exception as exc:  # noqa: BLE001 - report the argument's type
        raise TypeError(f"{arg} must be a tensor or array, got {type(value).__name__}") from exc


def _check_finite(X: Tensor) -> None:
    """Raise on NaN or inf in X. A finite sum proves every entry finite (a NaN or an inf
    entry makes the sum NaN or ±inf) at the cost of one read; only a non-finite sum, from a bad
    entry or an overflow, pays for the elementwise test."""
    if X.is_floating_point() and bool(torch.isfinite(X.sum())):
        return
    finite = torch.isfinite(X)
    if not bool(finite.all()):
        bad = int((~finite).reshape(len(X), -1).any(1).nonzero()[0, 0])
        raise ValueError(f"X contains NaN or inf values (first in sample {bad})")


def prepare(
    model: nn.Module,
    X,
    y,
    loss: str | Loss,
    l2: float,
    *,
    check_finite: bool = True,
    probe: Callable[[Tensor], int] | None = None,
) -> Problem:
    """Validate a curvature request and return it in the model's dtype and device.

    Errors name the argument and what was expected: the model must be an ``nn.Module`` with
    parameters; X a tensor of shape (N, features…) with N ≥ 1 and finite values; y holds N
    targets of the kind the loss needs (class labels in range, 0/1 labels, or float targets of
    the output's shape); l2 ≥ 0; the loss one of ``secondorder.losses.LOSSES``. With
    ``check_finite=False`` the caller takes over the NaN/inf test of X (``_check_finite``).
    ``probe(X)`` replaces applying the model to one sample: it returns the output width or
    raises ValueError (for a structure known in advance).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    loss_obj = get_loss(loss)
    l2 = check_positive("l2", l2, allow_zero=True)
    params = dict(model.named_parameters())
    if not params:
        raise ValueError("model has no parameters to differentiate")
    first = next(iter(params.values()))
    dtype, device = first.dtype, first.device
    if not dtype.is_floating_point:
        raise ValueError(f"the model's parameters must be floating point, got {dtype}")
    X = _as_tensor(X, "X")
    y = _as_tensor(y, "y")
    if X.ndim < 2 or X.shape[0] == 0:
        raise ValueError(
            f"X must have shape (N, n_features, ...) with N >= 1 samples, got {tuple(X.shape)}"
        )
    if y.ndim == 0 or y.shape[0] != X.shape[0]:
        raise ValueError(
            f"y must hold one target per sample of X: X has {X.shape[0]} samples, y has shape "
            f"{tuple(y.shape)}"
        )
    X = X.to(dtype=dtype, device=device)
    if check_finite:
        _check_finite(X)
    if probe is not None:
        out_dim = probe(X)
    else:
        with torch.no_grad():
            try:
                out = model(X[:1])
            except Exception as exc:
                raise ValueError(
                    f"the model cannot be applied to X of shape {tuple(X.shape)}: {exc}"
                ) from exc
        if out.ndim != 2:
            raise ValueError(
                f"the model must map X of shape (N, ...) to outputs (N, k), got {tuple(out.shape)}"
            )
        out_dim = out.shape[1]
    y = y.to(device)
    if torch.is_floating_point(y) and not bool(torch.isfinite(y).all()):
        raise ValueError("y contains NaN or inf values")
    y = loss_obj.check_targets(y, out_dim)
    if torch.is_floating_point(y):
        y = y.to(dtype)
    names = list(params)
    shapes = [p.shape for p in params.values()]
    numels = [p.numel() for p in params.values()]
    detached = tuple(p.detach() for p in params.values())
    return Problem(model, X, y, loss_obj, l2, names, shapes, numels, detached, out_dim)


def parameter_groups(model: nn.Module) -> list[tuple[str, int, int]]:
    """The blocks of θ for a generic model: one per module that owns parameters directly.

    Returns ``(module name, start, stop)`` ranges of the flat θ (the order of
    ``model.parameters()``). When the modules' parameters are not contiguous in that order,
    every parameter is its own block.
    """
    params = list(model.parameters())
    starts = [0]
    for p in params:
        starts.append(starts[-1] + p.numel())
    owner: dict[int, str] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), name or type(module).__name__)
    runs: list[list] = []
    for i, p in enumerate(params):
        o = owner[id(p)]
        if runs and runs[-1][0] == o:
            runs[-1][2] = starts[i + 1]
        else:
            runs.append([o, starts[i], starts[i + 1]])
    if len({r[0] for r in runs}) == len(runs):
        return [(o, a, b) for o, a, b in runs]
    names = [n for n, _ in model.named_parameters()]
    return [(names[i], starts[i], starts[i + 1]) for i in range(len(params))]


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


def _column_chunk(problem: Problem, chunk_columns: int | None) -> int:
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
    problem: Problem,
    *,
    max_bytes: int | None = None,
    chunk_columns: int | None = None,
    route: str = "auto",
) -> Tensor:
    """The dense P×P Hessian from chunks of Hessian-vector products with identity columns."""
    P = problem.n_params
    check_dense_fits((P, P), problem.dtype, "the dense Hessian", max_bytes=max_bytes)
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
    problem: Problem, *, chunk_columns: int | None = None, route: str = "auto"
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
    problem: Problem,
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
    check_dense_fits((total,), problem.dtype, "the Hessian blocks", max_bytes=max_bytes)
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


def _sample_chunk(problem: Problem, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return check_positive_int("chunk_size", chunk_size)
    item = problem.theta.element_size()
    per_sample = item * (2 * problem.out_dim * problem.n_params + 1)
    return int(max(1, min(problem.n_samples, CHUNK_BYTES // per_sample)))


def _output_jacobians(problem: Problem, X: Tensor) -> Tensor:
    """Per-sample Jacobians ∂f(x_i)/∂θ, shape (n, k, P)."""
    theta = problem.theta.detach()

    def one(th: Tensor, x: Tensor) -> Tensor:
        return problem.forward(th, x[None])[0]

    try:
        return torch.func.vmap(torch.func.jacrev(one), in_dims=(None, 0))(theta, X)
    except Exception:  # noqa: BLE001 - modules without batching rules: one backward per output
        J = torch.func.jacrev(lambda th: problem.forward(th, X))(theta)
        return J


def _ggn_chunks(problem: Problem, chunk_size: int | None):
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
    problem: Problem, *, max_bytes: int | None = None, chunk_size: int | None = None
) -> Tensor:
    """G = (1/N) Σ_i J_iᵀ H_{out,i} J_i (+ l2 on weight diagonals), J_i by ``vmap(jacrev)``."""
    P = problem.n_params
    check_dense_fits((P, P), problem.dtype, "the dense Gauss-Newton matrix", max_bytes=max_bytes)
    G = torch.zeros(P, P, dtype=problem.dtype, device=problem.device)
    for J, Hout in _ggn_chunks(problem, chunk_size):
        HJ = torch.matmul(Hout, J)
        G.addmm_(J.reshape(-1, P).T, HJ.reshape(-1, P))
    _symmetrize_(G)
    problem.add_l2_diagonal(G)
    return G


def autodiff_ggn_diagonal(problem: Problem, *, chunk_size: int | None = None) -> Tensor:
    """diag(G) from per-sample output Jacobians."""
    d = torch.zeros(problem.n_params, dtype=problem.dtype, device=problem.device)
    for J, Hout in _ggn_chunks(problem, chunk_size):
        d += (J * torch.matmul(Hout, J)).sum((0, 1))
    if problem.l2:
        d += problem.l2 * problem.l2_mask
    return d

r"""Exact curvature of sequential MLPs by second-order backpropagation (Appendix B): the
public functions.

Every function here is one *quantity* on one skeleton (:func:`_compute`): validate the request
(:func:`secondorder.curvature.request.prepare`), analyse the model
(:mod:`.structure`), refuse a result that would not fit before allocating it, then compute it by
second-order backpropagation — the pass of :mod:`.backward` over chunks of samples, and the
kernels of :mod:`.blocks` (dense matrix and blocks) or :mod:`.diagonal` — or, for any other
model, by the autodiff fallback (:mod:`.autodiff`) with a warning that says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from secondorder._progress import ProgressArg, reporting
from secondorder._validation import check_choice, check_finite, check_positive_int
from secondorder.linalg import check_dense_fits
from secondorder.losses import Loss

from .autodiff import (
    autodiff_ggn,
    autodiff_ggn_blocks,
    autodiff_ggn_diagonal,
    autodiff_hessian,
    autodiff_hessian_blocks,
    autodiff_hessian_diagonal,
)
from .backward import CHUNK_BYTES, sample_chunks, second_order_pass
from .blocks import add_l2, assemble, dense
from .chain import Chain, analyse_chain, chain_diagonal, chain_ggn, chain_layer_blocks
from .diagonal import diagonal, reveals_nonfinite_input
from .request import CurvatureRequest, prepare
from .structure import LayerInfo, MLPStructure, analyse_mlp, theta_blocks

__all__ = [
    "LayerInfo",
    "MLPStructure",
    "analyse_mlp",
    "ggn",
    "ggn_diagonal",
    "hessian",
    "hessian_blocks",
    "hessian_diagonal",
    "layer_ggns",
    "layer_hessians",
    "per_sample_hz",
    "supports_fast_path",
]

METHODS = ("auto", "backprop", "autodiff")


# -- the skeleton -------------------------------------------------------------------------------


@dataclass
class _Call:
    """One validated request, as the kernels of a quantity receive it."""

    problem: CurvatureRequest
    struct: MLPStructure | None  # None: the autodiff fallback
    chunk_size: int | None
    max_bytes: int | None
    options: dict[str, Any] = field(default_factory=dict)  # the quantity's own arguments
    chain: Chain | None = None  # a chain of layers (CNNs), when not an MLP

    @cached_property
    def groups(self) -> list[tuple[int, int]]:
        """The (start, stop) of every layer of θ (a module's own parameters for the fallback)."""
        return [(a, b) for _, a, b in theta_blocks(self.problem.model, self.struct)]


@dataclass(frozen=True)
class _Quantity:
    """A curvature quantity: its kernel by second-order backpropagation, its autodiff fallback
    (None: the fast path only) and the dense shape to refuse before allocating (``guard``, which
    may also validate the quantity's own arguments)."""

    name: str
    fast: Callable[[_Call], Any]
    fallback: Callable[[_Call], Any] | None = None
    guard: Callable[[_Call], tuple[tuple[int, ...], str]] | None = None
    defer_finite: bool = False  # the fast kernel tests X for NaN/inf by its result
    chain: Callable[[_Call], Any] | None = None  # the kernel for a chain of layers


def _compute(
    q: _Quantity,
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    loss: str | Loss,
    l2: float,
    method: str = "auto",
    *,
    chunk_size: int | None = None,
    max_bytes: int | None = None,
    **options: Any,
) -> Any:
    """Validate, analyse, guard memory, then run the MLP kernel, the chain kernel or the
    fallback of ``q``."""
    problem, struct, chain = _setup(q, model, X, y, loss, l2, method)
    call = _Call(problem, struct, chunk_size, max_bytes, options, chain)
    if q.guard is not None:
        shape, what = q.guard(call)
        check_dense_fits(shape, problem.dtype, what, max_bytes=max_bytes, device=problem.device)
    if struct is not None:
        return q.fast(call)
    if chain is not None:
        return q.chain(call)
    return q.fallback(call)


def _setup(q: _Quantity, model, X, y, loss, l2, method: str):
    """(request, MLP structure or None, chain or None). With ``q.defer_finite`` the NaN/inf
    test of X is left to the MLP kernel where it reads X unchanged (see
    :func:`.diagonal.reveals_nonfinite_input`)."""
    if q.fallback is None:  # the fast path only: validate as for any model, then require it
        problem = prepare(model, X, y, loss, l2)
        struct, reason = analyse_mlp(model)
        if struct is None:
            raise ValueError(f"{q.name} needs a sequential MLP, but {reason}")
        return problem, struct, None
    check_choice("method", method, METHODS)
    struct, reason = (None, "") if method == "autodiff" else analyse_mlp(model)
    chain = None
    if struct is None and method != "autodiff":
        chain, reason = analyse_chain(model)
        if chain is not None and q.chain is None:
            chain, reason = (
                None,
                (
                    "blocks between layers of the Hessian need the modules' mixed second "
                    "derivatives, which second-order backpropagation covers for MLPs only"
                ),
            )
    probe = None if struct is None else struct.output_width
    problem = prepare(model, X, y, loss, l2, check_finite=not q.defer_finite, probe=probe)
    if q.defer_finite and (struct is None or not reveals_nonfinite_input(struct)):
        check_finite("X", problem.X)
    if method == "autodiff" or struct is not None or chain is not None:
        return problem, struct, chain
    if method == "backprop":
        raise ValueError(f"method='backprop' needs a chain of supported layers, but {reason}")
    warnings.warn(
        f"{q.name}: second-order backpropagation does not apply because {reason}; using "
        "the slower autodiff fallback (torch.func)",
        stacklevel=4,  # the caller of the public function
    )
    return problem, None, None


# -- the quantities -----------------------------------------------------------------------------


def _square(what: str) -> Callable[[_Call], tuple[tuple[int, ...], str]]:
    return lambda c: ((c.problem.n_params, c.problem.n_params), what)


def _layer_blocks_fast(c: _Call, mode: str = "hessian") -> list[Tensor]:
    p = c.problem
    out = [torch.empty(b - a, b - a, dtype=p.dtype, device=p.device) for a, b in c.groups]
    assemble(p, c.struct, {(i, i): t for i, t in enumerate(out)}, mode, c.chunk_size)
    for (a, b), t in zip(c.groups, out):
        add_l2(p, t, slice(a, b))
    return out


def _layer_blocks_autodiff(c: _Call) -> list[Tensor]:
    n = len(c.groups)
    blocks = autodiff_hessian_blocks(c.problem, c.groups, [(i, i) for i in range(n)])
    return [blocks[(i, i)] for i in range(n)]


def _block_pairs(c: _Call) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(the pairs asked for, validated; the blocks (k ≤ l) to compute for them)."""
    L = len(c.groups)
    pairs = c.options["pairs"]
    if pairs is None:
        pairs = [(k, l) for k in range(L) for l in range(L)]
    wanted: list[tuple[int, int]] = []
    for p in pairs:
        if (
            not isinstance(p, (tuple, list))
            or len(p) != 2
            or not all(isinstance(i, int) and 0 <= i < L for i in p)
        ):
            raise ValueError(f"pairs must hold (k, l) with 0 <= k, l < {L} (the layers), got {p!r}")
        wanted.append((int(p[0]), int(p[1])))
    return wanted, sorted({(min(k, l), max(k, l)) for k, l in wanted})


def _blocks_guard(c: _Call) -> tuple[tuple[int, ...], str]:
    g = c.groups
    total = sum((g[k][1] - g[k][0]) * (g[l][1] - g[l][0]) for k, l in _block_pairs(c)[1])
    return (total,), "the Hessian blocks"


def _blocks_fast(c: _Call) -> dict[tuple[int, int], Tensor]:
    p, g = c.problem, c.groups
    wanted, upper = _block_pairs(c)
    computed = {
        (k, l): torch.empty(g[k][1] - g[k][0], g[l][1] - g[l][0], dtype=p.dtype, device=p.device)
        for k, l in upper
    }
    assemble(p, c.struct, computed, "hessian", c.chunk_size)
    for k in range(len(g)):
        if (k, k) in computed:
            add_l2(p, computed[(k, k)], slice(*g[k]))
    return _arrange(computed, wanted)


def _blocks_autodiff(c: _Call) -> dict[tuple[int, int], Tensor]:
    wanted, upper = _block_pairs(c)
    return _arrange(autodiff_hessian_blocks(c.problem, c.groups, upper), wanted)


def _arrange(
    computed: dict[tuple[int, int], Tensor], wanted: list[tuple[int, int]]
) -> dict[tuple[int, int], Tensor]:
    """The blocks asked for: (l, k) of a computed (k, l) is its transpose, a view when (k, l)
    is asked for too, else a copy."""
    result: dict[tuple[int, int], Tensor] = {}
    for k, l in wanted:
        if (k, l) in computed:
            result[(k, l)] = computed[(k, l)]
        elif (l, k) in wanted:
            result[(k, l)] = computed[(l, k)].T
        else:
            result[(k, l)] = computed[(l, k)].T.contiguous()
    return result


def _hz_pass_bytes(struct: MLPStructure, item: int) -> int:
    """Bytes per sample of a pass that keeps every layer's H_Z (``second_order_pass``): the
    layer inputs, z, σ′, σ″, g, the residual and H_Z of each layer kept, the loss's output
    terms, plus the largest transient of one step down (H_X, its two products with σ′, H_Z W
    and the next layer's H_X)."""
    kept = sum(ly.n_in + 6 * ly.n_out + ly.n_out**2 for ly in struct.layers)
    k = struct.layers[-1].n_out
    top = 4 * k + 2 * k * k  # the output, the losses, ∂ℓ/∂z and H_z of the loss
    step = max(3 * ly.n_out**2 + ly.n_out * ly.n_in + ly.n_in**2 for ly in struct.layers)
    return item * (kept + top + step)


def _hz_chunk(c: _Call) -> int:
    """Samples per chunk of per_sample_hz (``chunk_size``, else CHUNK_BYTES of a pass)."""
    if c.chunk_size is not None:
        return check_positive_int("chunk_size", c.chunk_size)
    per = _hz_pass_bytes(c.struct, c.problem.dtype.itemsize)
    return max(1, min(c.problem.n_samples, CHUNK_BYTES // per))


def _per_sample_hz(c: _Call) -> list[Tensor]:
    """The results allocated once, each chunk's H_Z copied into its rows (a list of chunks
    concatenated at the end held every H_Z twice); the pass's own tensors are the result
    when one chunk holds every sample."""
    p, struct = c.problem, c.struct
    N = p.n_samples
    out: list[Tensor] = []
    start = 0
    for Xc, yc in sample_chunks(p, struct, _hz_chunk(c)):
        ps = second_order_pass(struct, Xc, yc, p.loss, 1.0 / N, c.options["mode"])
        if len(Xc) == N:
            return list(ps.hz)
        if not out:
            out = [h.new_empty((N, *h.shape[1:])) for h in ps.hz]
        for o, h in zip(out, ps.hz):
            o[start : start + len(Xc)] = h
        start += len(Xc)
        del ps  # one chunk's pass at a time, as the guard counts
    return out


def _per_sample_hz_guard(c: _Call) -> tuple[tuple[int, ...], str]:
    """per_sample_hz at its peak, in elements: one chunk's pass and, when the samples come in
    several chunks, the N·Σ n_l² results beside it."""
    p, struct = c.problem, c.struct
    N, item = p.n_samples, p.dtype.itemsize
    chunk = min(N, _hz_chunk(c))
    results = sum(N * layer.n_out**2 for layer in struct.layers) if chunk < N else 0
    return (results + -(-chunk * _hz_pass_bytes(struct, item) // item),), "the per-sample H_Z"


HESSIAN = _Quantity(
    "hessian",
    fast=lambda c: dense(c.problem, c.struct, "hessian", c.chunk_size),
    fallback=lambda c: autodiff_hessian(c.problem, max_bytes=c.max_bytes),
    guard=_square("the dense Hessian"),
)
GGN = _Quantity(
    "ggn",
    fast=lambda c: dense(c.problem, c.struct, "ggn", c.chunk_size),
    fallback=lambda c: autodiff_ggn(c.problem, max_bytes=c.max_bytes),
    guard=_square("the dense Gauss-Newton matrix"),
    chain=lambda c: chain_ggn(c.problem, c.chain, c.chunk_size),
)
HESSIAN_DIAGONAL = _Quantity(
    "hessian_diagonal",
    fast=lambda c: diagonal(c.problem, c.struct, "hessian", c.chunk_size, check_finite=True),
    fallback=lambda c: autodiff_hessian_diagonal(c.problem),
    defer_finite=True,
    chain=lambda c: chain_diagonal(c.problem, c.chain, "hessian", c.chunk_size),
)
GGN_DIAGONAL = _Quantity(
    "ggn_diagonal",
    fast=lambda c: diagonal(c.problem, c.struct, "ggn", c.chunk_size, check_finite=True),
    fallback=lambda c: autodiff_ggn_diagonal(c.problem),
    defer_finite=True,
    chain=lambda c: chain_diagonal(c.problem, c.chain, "ggn", c.chunk_size),
)
LAYER_HESSIANS = _Quantity(
    "layer_hessians",
    fast=_layer_blocks_fast,
    fallback=_layer_blocks_autodiff,
    guard=lambda c: ((sum((b - a) ** 2 for a, b in c.groups),), "the layer Hessian blocks"),
    chain=lambda c: chain_layer_blocks(c.problem, c.chain, "hessian", c.chunk_size),
)
LAYER_GGNS = _Quantity(
    "layer_ggns",
    fast=lambda c: _layer_blocks_fast(c, "ggn"),
    fallback=lambda c: autodiff_ggn_blocks(c.problem, c.groups),
    guard=lambda c: ((sum((b - a) ** 2 for a, b in c.groups),), "the layer Gauss-Newton blocks"),
    chain=lambda c: chain_layer_blocks(c.problem, c.chain, "ggn", c.chunk_size),
)
HESSIAN_BLOCKS = _Quantity(
    "hessian_blocks", fast=_blocks_fast, fallback=_blocks_autodiff, guard=_blocks_guard
)
PER_SAMPLE_HZ = _Quantity(
    "per_sample_hz",
    fast=_per_sample_hz,
    guard=_per_sample_hz_guard,
)


# -- the public functions -----------------------------------------------------------------------


def supports_fast_path(model: nn.Module) -> tuple[bool, str]:
    """Whether second-order backpropagation covers ``model``; if not, the reason.

    Covered: an ``nn.Sequential`` (nested ones flattened) of modules with a layer class
    (:mod:`secondorder.layers`: ``nn.Linear``, ``nn.Conv2d`` with groups = 1, activations with
    closed-form σ′ and σ″, Flatten, Unflatten, Identity, Dropout in eval mode, max and average
    pooling), every parameter trainable and owned by one module. Sequential MLPs also get every
    block between layers; other chains get the diagonals, the layer blocks and the
    Gauss–Newton matrix, and leave the dense Hessian and its cross-layer blocks to torch.func.
    Every other model uses the torch.func fallback.
    """
    struct, reason = analyse_mlp(model)
    if struct is not None:
        return True, ""
    chain, reason = analyse_chain(model)
    return chain is not None, reason


def hessian(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    loss: str | Loss = "cross_entropy",
    l2: float = 0.0,
    *,
    max_bytes: int | None = None,
    chunk_size: int | None = None,
    method: str = "auto",
    progress: ProgressArg = False,
) -> Tensor:
    """The dense P×P Hessian of J(θ) = mean loss + (l2/2)·‖W‖² (weights only).

    Parameters are ordered as ``parameters_to_vector(model.parameters())``. Sequential MLPs use
    exact second-order backpropagation, every other model the autodiff fallback (with a warning
    saying why); ``method="backprop"`` or ``"autodiff"`` forces one. ``max_bytes`` bounds the
    dense result (default: half the free memory); ``chunk_size`` the samples per chunk.
    ``progress`` (True: a line on stderr; or a callable taking a ``ProgressEvent``) reports
    the samples backpropagated so far.
    """
    with reporting(progress, "hessian"):
        return _compute(
            HESSIAN, model, X, y, loss, l2, method, chunk_size=chunk_size, max_bytes=max_bytes
        )


def ggn(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    loss: str | Loss = "cross_entropy",
    l2: float = 0.0,
    *,
    max_bytes: int | None = None,
    chunk_size: int | None = None,
    method: str = "auto",
) -> Tensor:
    """The dense Gauss–Newton matrix (1/N) Σ_i J_iᵀ H_{out,i} J_i + l2·diag(weight mask).

    J_i = ∂f(x_i)/∂θ and H_out the loss's Hessian in the model output (after any output
    activation, which is then part of f). PSD whenever H_out is (all three losses).
    """
    return _compute(GGN, model, X, y, loss, l2, method, chunk_size=chunk_size, max_bytes=max_bytes)


def hessian_diagonal(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    loss: str | Loss = "cross_entropy",
    l2: float = 0.0,
    *,
    chunk_size: int | None = None,
    method: str = "auto",
) -> Tensor:
    """diag ∇²J(θ), length P: Σ_i H_Z[j,j] x_m² per weight, Σ_i H_Z[j,j] per bias (+ l2)."""
    return _compute(HESSIAN_DIAGONAL, model, X, y, loss, l2, method, chunk_size=chunk_size)


def ggn_diagonal(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    loss: str | Loss = "cross_entropy",
    l2: float = 0.0,
    *,
    chunk_size: int | None = None,
    method: str = "auto",
) -> Tensor:
    """The diagonal of the Gauss–Newton matrix (see :func:`ggn`), length P."""
    return _compute(GGN_DIAGONAL, model, X, y, loss, l2, method, chunk_size=chunk_size)


def layer_hessians(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    loss: str | Loss = "cross_entropy",
    l2: float = 0.0,
    *,
    max_bytes: int | None = None,
    chunk_size: int | None = None,
    method: str = "auto",
) -> list[Tensor]:
    """The diagonal blocks of the Hessian, one per Linear layer (eqs. 68-70, 78-80).

    Block l covers that layer's weight (row-major, ``weight.reshape(-1)``) then its bias: size
    (n_out·n_in + n_out)². For the autodiff fallback a block is a module's own parameters.
    """
    return _compute(
        LAYER_HESSIANS, model, X, y, loss, l2, method, chunk_size=chunk_size, max_bytes=max_bytes
    )


def layer_ggns(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    loss: str | Loss = "cross_entropy",
    l2: float = 0.0,
    *,
    max_bytes: int | None = None,
    chunk_size: int | None = None,
    method: str = "auto",
) -> list[Tensor]:
    """The diagonal blocks of the Gauss–Newton matrix (see :func:`ggn`), one per layer with
    parameters, laid out as in :func:`layer_hessians`."""
    return _compute(
        LAYER_GGNS, model, X, y, loss, l2, method, chunk_size=chunk_size, max_bytes=max_bytes
    )


def hessian_blocks(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    loss: str | Loss = "cross_entropy",
    l2: float = 0.0,
    *,
    pairs: Sequence[tuple[int, int]] | None = None,
    max_bytes: int | None = None,
    chunk_size: int | None = None,
    method: str = "auto",
) -> dict[tuple[int, int], Tensor]:
    """Hessian blocks ``{(k, l): ∂²J/∂θ_k∂θ_l}`` between layers, cross-layer blocks included.

    θ_k is layer k's (weight, bias) as in :func:`layer_hessians`. ``pairs`` picks the blocks
    (default: all); only these are computed. When both (k, l) and (l, k) are asked for, the
    second is a transposed view of the first (no extra memory).
    """
    return _compute(
        HESSIAN_BLOCKS,
        model,
        X,
        y,
        loss,
        l2,
        method,
        chunk_size=chunk_size,
        max_bytes=max_bytes,
        pairs=pairs,
    )


def per_sample_hz(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    loss: str | Loss = "cross_entropy",
    *,
    ggn: bool = False,
    max_bytes: int | None = None,
    chunk_size: int | None = None,
) -> list[Tensor]:
    """Per-sample H_Z⁽ˡ⁾ = ∂²J/∂z⁽ˡ⁾² for every Linear layer l, each of shape (N, n_l, n_l).

    They include the 1/N of the mean, as eq. 83 does: Σ_i H_Z,i is the layer's bias block
    (eq. 70). With ``ggn=True`` the σ″ terms are dropped (G_Z, always PSD). For the output
    layer with cross-entropy and no output activation this is (1/N)(diag p − p pᵀ).
    Needs a sequential MLP (see :func:`supports_fast_path`).
    """
    mode = "ggn" if ggn else "hessian"
    return _compute(
        PER_SAMPLE_HZ, model, X, y, loss, 0.0, chunk_size=chunk_size, max_bytes=max_bytes, mode=mode
    )

r"""Exact curvature of a chain of layers (CNNs and any ``nn.Sequential`` of supported modules).

The network is x⁽ⁱ⁺¹⁾ = m_i(x⁽ⁱ⁾; θ_i) with every m_i handled by a :class:`~secondorder.layers.
Layer`. Per sample, the curvature at a module's output is kept as signed columns plus a
diagonal,

    H_out = Σ_c s_c v_c v_cᵀ + diag(D),

starting at the model output from a square-root factor of the loss Hessian (H_ŷ = S Sᵀ,
columns of S scaled by √w, s = +1, D = 0), and passed down a module (eqs. 81-83 of Appendix B
written for any module):

    v_c ← Jₓᵀ v_c,   diag(D) ← Jₓᵀ diag(D) Jₓ  (+ diag(r) for the Hessian),

where r = Σ_o g_o ∂²x_o/∂x² is the module's own second-derivative term (σ″ ⊙ g for an
activation, eq. 87; none for the Gauss–Newton matrix). When Jₓᵀ diag(D) Jₓ is not diagonal
(a convolution, a linear map, average pooling), D becomes columns √|D_u| e_u with signs
sign(D_u). A module with parameters is affine in them, so its block of the Hessian (or the
GGN) is Σ_n J_θᵀ H_out J_θ exactly: its diagonal is Σ s (J_θᵀ v)² + diag(J_θᵀ diag(D) J_θ) and
its dense block Σ s (J_θᵀ v)(J_θᵀ v)ᵀ. For the GGN the columns are the same for every layer,
which gives the dense matrix too. Blocks between layers of the Hessian need the
mixed second derivatives of the modules; they use the ``torch.func`` route.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from secondorder._progress import tick
from secondorder._validation import check_positive_int
from secondorder.layers import Layer, diagonal_columns, make_layer
from secondorder.losses import Loss

from .request import CurvatureRequest
from .structure import named_modules_flat

__all__ = ["Chain", "analyse_chain", "chain_diagonal", "chain_ggn", "chain_layer_blocks"]

#: bytes for one chunk's temporaries: small chunks stay in cache and reuse the allocator's
#: blocks (1.5× faster than 2**28 on a LeNet)
_CHUNK_BYTES = 2**25


@dataclass(frozen=True)
class Chain:
    """The layers of a sequential model, each with the offset of its parameters in θ."""

    layers: tuple[Layer, ...]
    offsets: tuple[int, ...]  # θ offset of each layer's parameters (unused when it has none)
    n_params: int

    @property
    def lowest(self) -> int:
        """The index of the first layer with parameters (the backward pass stops there)."""
        return next(i for i, ly in enumerate(self.layers) if ly.n_params)

    def param_layers(self) -> list[tuple[int, Layer, slice]]:
        """(index, layer, its slice of θ) for every layer with parameters."""
        return [
            (i, ly, slice(o, o + ly.n_params))
            for i, (ly, o) in enumerate(zip(self.layers, self.offsets))
            if ly.n_params
        ]

    def forward(self, X: Tensor) -> list[Tensor]:
        """Every layer's input, and the output last."""
        xs = [X]
        for layer in self.layers:
            xs.append(layer.forward(xs[-1]))
        return xs

    @property
    def has_residuals(self) -> bool:
        """Whether some module has a second-derivative term of its own (then the Hessian's
        columns grow on the way down)."""
        return any(ly.has_residual for ly in self.layers)


def analyse_chain(model: nn.Module) -> tuple[Chain | None, str]:
    """The :class:`Chain` of ``model``, or ``(None, why it is not one)``.

    A chain is an ``nn.Sequential`` (nested ones flattened) of modules with a registered layer
    class whose parameters are trainable, owned by one module each and registered in order."""
    if not isinstance(model, nn.Sequential):
        return None, (
            f"the model is a {type(model).__name__}, not an nn.Sequential (its graph is not a "
            "chain of modules)"
        )
    layers: list[Layer] = []
    for name, module in named_modules_flat(model):
        layer, why = make_layer(module, name)
        if layer is None:
            return None, why
        layers.append(layer)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        return None, f"parameters {', '.join(frozen)} are frozen (requires_grad=False)"
    expected = [p for ly in layers for p in ly.parameters()]
    actual = list(model.parameters())
    if not expected:
        return None, "the model has no parameters (no nn.Linear, nn.Conv2d or other layer with any)"
    if len(actual) != len(expected) or any(a is not b for a, b in zip(actual, expected)):
        return None, "the model's parameters are shared between layers or registered out of order"
    offsets, offset = [], 0
    for ly in layers:
        offsets.append(offset)
        offset += ly.n_params
    return Chain(tuple(layers), tuple(offsets), offset), ""


# -- the backward pass ------------------------------------------------------------------------


@dataclass
class _Curvature:
    """H_out = Σ_c s_c v_c v_cᵀ + diag(D) at one module's output, per sample."""

    V: Tensor  # (n, C, *shape)
    sign: Tensor | None  # (n, C); None: all +1
    D: Tensor | None  # (n, *shape)

    def columns(self) -> tuple[Tensor, Tensor | None]:
        """Every term as signed columns (the diagonal expanded)."""
        if self.D is None:
            return self.V, self.sign
        Vd, sd = diagonal_columns(self.D)
        return torch.cat([self.V, Vd], 1), torch.cat([self._signs(), sd], 1)

    def _signs(self) -> Tensor:
        if self.sign is not None:
            return self.sign
        return self.V.new_ones(self.V.shape[:2])

    def pass_down(self, layer: Layer, x: Tensor, out: Tensor, r: Tensor | None) -> _Curvature:
        V = layer.input_vjp(x, out, self.V)
        sign, D = self.sign, None
        if self.D is not None:
            D = layer.pass_diagonal(x, out, self.D)
            if D is None:  # no longer diagonal: as columns
                Vd, sd = diagonal_columns(self.D)
                V = torch.cat([V, layer.input_vjp(x, out, Vd)], 1)
                sign = torch.cat([self._signs(), sd], 1)
        if r is not None:
            D = r if D is None else D + r
        return _Curvature(V, sign, D)


def _backward(
    chain: Chain,
    X: Tensor,
    y: Tensor,
    loss: Loss,
    weight: float,
    mode: str,
    visit: Callable[[int, Layer, Tensor, _Curvature], None],
) -> None:
    """Forward, then pass H_out (``mode`` "hessian" or "ggn") down the chain, calling
    ``visit(index, layer, input, curvature at its output)`` for every layer with parameters."""
    xs = chain.forward(X)
    out = xs[-1]
    S = loss.hessian_output_sqrt(out, y)  # (n, k, C): H_ŷ = S Sᵀ
    cur = _Curvature(S.transpose(1, 2) * math.sqrt(weight), None, None)
    # the output gradient feeds only the modules' own second-derivative terms
    g = loss.grad_output(out, y) * weight if mode == "hessian" and chain.has_residuals else None
    for i in range(len(chain.layers) - 1, chain.lowest - 1, -1):
        layer, x, o = chain.layers[i], xs[i], xs[i + 1]
        if layer.n_params:
            visit(i, layer, x, cur)
        if i == chain.lowest:
            break
        r = None if g is None else layer.residual(x, o, g)
        cur = cur.pass_down(layer, x, o, r)
        if g is not None:
            g = layer.input_vjp(x, o, g[:, None])[:, 0]


def _chunks(
    problem: CurvatureRequest, chain: Chain, chunk_size: int | None, mode: str
) -> Iterator[tuple[Tensor, Tensor]]:
    """(X, y) chunks of at most ``chunk_size`` samples (default: a chunk's temporaries within
    _CHUNK_BYTES, estimated from one sample's feature sizes)."""
    N = problem.n_samples
    if chunk_size is None:
        feats = [x[0].numel() for x in chain.forward(problem.X[:1])]
        C = problem.out_dim + 1
        widest = max(feats)
        columns = C + (widest if mode == "hessian" and chain.has_residuals else 0)
        per = problem.dtype.itemsize * (3 * sum(feats) + 6 * columns * widest)
        chunk_size = max(1, min(N, _CHUNK_BYTES // per))
    else:
        chunk_size = check_positive_int("chunk_size", chunk_size)
    for a in range(0, N, chunk_size):
        yield problem.X[a : a + chunk_size], problem.y[a : a + chunk_size]
        tick(min(a + chunk_size, N), N)


def _add_l2(problem: CurvatureRequest, diag: Tensor, rows: slice) -> None:
    if problem.l2:
        diag.add_(problem.l2 * problem.l2_mask[rows])


# -- the quantities ----------------------------------------------------------------------------


def chain_diagonal(
    problem: CurvatureRequest, chain: Chain, mode: str, chunk_size: int | None
) -> Tensor:
    """diag of the Hessian (``mode="hessian"``) or the GGN of J, length P."""
    d = torch.zeros(chain.n_params, dtype=problem.dtype, device=problem.device)
    slices = {i: s for i, _, s in chain.param_layers()}

    def visit(i: int, layer: Layer, x: Tensor, cur: _Curvature) -> None:
        part = layer.param_squares(x, cur.V, cur.sign)
        if cur.D is not None:
            part = part + layer.param_sandwich(x, cur.D)
        d[slices[i]] += part

    N = problem.n_samples
    for Xc, yc in _chunks(problem, chain, chunk_size, mode):
        _backward(chain, Xc, yc, problem.loss, 1.0 / N, mode, visit)
    _add_l2(problem, d, slice(0, chain.n_params))
    return d


def chain_layer_blocks(
    problem: CurvatureRequest, chain: Chain, mode: str, chunk_size: int | None
) -> list[Tensor]:
    """The diagonal blocks of the Hessian or the GGN, one per layer with parameters."""
    layers = chain.param_layers()
    kw = {"dtype": problem.dtype, "device": problem.device}
    blocks = {i: torch.zeros(s.stop - s.start, s.stop - s.start, **kw) for i, _, s in layers}

    def visit(i: int, layer: Layer, x: Tensor, cur: _Curvature) -> None:
        V, sign = cur.columns()
        G = layer.param_vjp(x, V)  # (n, C, P_l)
        Gs = G if sign is None else G * sign[:, :, None]
        blocks[i] += torch.einsum("ncp,ncq->pq", Gs, G)

    N = problem.n_samples
    for Xc, yc in _chunks(problem, chain, chunk_size, mode):
        _backward(chain, Xc, yc, problem.loss, 1.0 / N, mode, visit)
    out = []
    for i, _, s in layers:
        block = blocks[i]
        if problem.l2:
            block.diagonal().add_(problem.l2 * problem.l2_mask[s])
        out.append(block)
    return out


def chain_ggn(problem: CurvatureRequest, chain: Chain, chunk_size: int | None) -> Tensor:
    """The dense Gauss–Newton matrix: Σ_{n,c} (J_θᵀ v)(J_θᵀ v)ᵀ over every layer at once (the
    GGN's columns are the same for all layers)."""
    P = chain.n_params
    G = torch.zeros(P, P, dtype=problem.dtype, device=problem.device)
    N = problem.n_samples
    parts: dict[int, Tensor] = {}

    def visit(i: int, layer: Layer, x: Tensor, cur: _Curvature) -> None:
        parts[i] = layer.param_vjp(x, cur.V)

    for Xc, yc in _chunks(problem, chain, chunk_size, "ggn"):
        _backward(chain, Xc, yc, problem.loss, 1.0 / N, "ggn", visit)
        J = torch.cat([parts[i] for i, _, _ in chain.param_layers()], 2)  # (n, C, P)
        J = J.reshape(-1, P)
        G.addmm_(J.T, J)
    _add_l2(problem, G.diagonal(), slice(0, P))
    return G

r"""Exact second-order backpropagation for sequential MLPs (Appendix B, Algorithm 3).

A supported model is an ``nn.Sequential`` (nested ones are flattened) of ``nn.Linear`` layers
(with or without bias) and elementwise activations that
:func:`secondorder.models.activation_derivatives` recognises, in any order: consecutive
activations are composed, activations before the first Linear (and an ``nn.Flatten`` there) only
transform the input, and an activation may follow the last Linear (ŷ = f(z⁽ᴸ⁾)). With
``z⁽ˡ⁾ = W⁽ˡ⁾x⁽ˡ⁻¹⁾ + b⁽ˡ⁾`` and ``x⁽ˡ⁾ = σ_l(z⁽ˡ⁾)`` the objective is

    J(θ) = (1/N) Σ_i ℓ(x_i⁽ᴸ⁾, y_i) + (l2/2)·Σ_l ‖W⁽ˡ⁾‖²_F .

The mathematics
---------------
Per sample, the gradient g⁽ˡ⁾ = ∂ℓ/∂z⁽ˡ⁾ and the Hessian H_Z⁽ˡ⁾ = ∂²ℓ/∂z⁽ˡ⁾² go backwards
(eqs. 66-67, 81-83), both carrying the 1/N of the mean:

    H_X⁽ˡ⁻¹⁾ = W⁽ˡ⁾ᵀ H_Z⁽ˡ⁾ W⁽ˡ⁾,
    H_Z⁽ˡ⁻¹⁾ = D H_X⁽ˡ⁻¹⁾ D + diag(σ″(z⁽ˡ⁻¹⁾) ⊙ ∂ℓ/∂x⁽ˡ⁻¹⁾),   D = diag σ′(z⁽ˡ⁻¹⁾).

A layer's own block follows from z⁽ˡ⁾ being linear in (W⁽ˡ⁾, b⁽ˡ⁾) (eqs. 68-70):
H[(j,m),(j′,m′)] = Σ_i x_m H_Z[j,j′] x_m′. A cross-layer block (k < l) has two parts: θ_k moves
z⁽ˡ⁾ through x⁽ˡ⁻¹⁾, and z⁽ˡ⁾ = W⁽ˡ⁾x⁽ˡ⁻¹⁾ is bilinear, so ∂²z⁽ˡ⁾/∂W⁽ˡ⁾∂x⁽ˡ⁻¹⁾ ≠ 0. With the
per-sample Jacobian J⁽ˡ←ᵏ⁾ = ∂z⁽ˡ⁾/∂z⁽ᵏ⁾ and E⁽ᵏˡ⁾ = ∂x⁽ˡ⁻¹⁾/∂z⁽ᵏ⁾ = D_{l−1} J⁽ˡ⁻¹←ᵏ⁾,

    ∂²ℓ/∂W⁽ᵏ⁾_{jm} ∂W⁽ˡ⁾_{j′m′} = x⁽ᵏ⁻¹⁾_m · ( [J⁽ˡ←ᵏ⁾ᵀ H_Z⁽ˡ⁾]_{j j′} x⁽ˡ⁻¹⁾_{m′}
                                             + g⁽ˡ⁾_{j′} E⁽ᵏˡ⁾_{m′ j} ),

and the bias rows and columns are the same with x_m (or x_m′) replaced by 1 (a bias column of
layer l has no bilinear part). Dropping every σ″ term and the bilinear part leaves the
Gauss–Newton matrix Jᵀ H_loss J, whose backpropagated G_Z is PSD.

The implementation
------------------
No Kronecker product and no (n_l·m)² matrix is formed.

*Layer blocks* (wide layers): the block is made of the sub-blocks
S_jj′ = Σ_i H_Z,i[j, j′] x_i x_iᵀ, and S_jj′ = S_j′j = S_jj′ᵀ. Only the pairs j ≤ j′ and, per band
of input rows m, the columns m′ ≥ m are computed — for all pairs by one GEMM
(pairs × N)·(N × band·n_in) against the products x_im x_im′ — and every result is copied to its
four places: about ¼·N·P_l² multiply-adds (:func:`_layer_block`). Narrow layers (and the
cross-layer blocks) use row factors instead: for every row j of a layer the factor C_j[i, ·]
(one row per sample, one column per parameter of the column layer) is built elementwise and one
GEMM ``X⁽ᵏ⁻¹⁾ᵀ C_j`` writes the n_{k−1} rows (j, ·) of the block; its column sums give the bias
row; within a layer only the columns j′ ≥ j are computed and the rest mirrored. The full Hessian
of a network whose first layer dominates thus costs about ¼·N·P_1² + N·P_1·(P − P_1) + …
multiply-adds, a quarter of the N·P² of a dense per-sample product. Outputs start
uninitialised (every entry is written once); samples are processed in chunks that bound memory.

*The diagonal* keeps every per-sample quantity feature-major ((n_l, N), H_Z as (n_l, n_l, N)) so
that each step is one GEMM with the samples along its wide side or one elementwise pass, needs
only diag H_Z of the first layer (diag(Wᵀ H_Z W) as one GEMM with K[(c, c′), m] = W_cm W_c′m, or,
for cross-entropy right after the last Linear, w((W ⊙ W)ᵀp − (Wᵀp)²)), and ends with one GEMM
diag(H_Z)·(x ⊙ x) per layer (:func:`_diagonal`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from secondorder._validation import check_choice, check_positive_int
from secondorder.linalg import check_dense_fits
from secondorder.losses import CrossEntropy, Loss
from secondorder.models import Activation, Identity, ReLU, activation_derivatives

from . import autodiff as _ad

__all__ = [
    "LayerInfo",
    "MLPStructure",
    "analyse_mlp",
    "ggn",
    "ggn_diagonal",
    "hessian",
    "hessian_blocks",
    "hessian_diagonal",
    "layer_hessians",
    "per_sample_hz",
    "supports_fast_path",
]

METHODS = ("auto", "backprop", "autodiff")
#: bytes for one chunk's temporaries (per-sample factors, H_Z, Jacobians)
CHUNK_BYTES = 2**28


# -- structure --------------------------------------------------------------------------------


class _Chain(Activation):
    """Consecutive elementwise activations, composed.

    (f∘g)′ = f′(g)·g′ and (f∘g)″ = f″(g)·g′² + f′(g)·g″.
    """

    def __init__(self, acts: Sequence[Activation]) -> None:
        super().__init__()
        self._acts = list(acts)
        self.name = "∘".join(a.name or type(a).__name__ for a in reversed(self._acts))

    def forward(self, z: Tensor) -> Tensor:
        for a in self._acts:
            z = a.forward(z)
        return z

    def derivatives(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s, d1, d2 = self._acts[0].derivatives(z)
        for a in self._acts[1:]:
            s, e1, e2 = a.derivatives(s)
            d2 = e2 * d1 * d1 + e1 * d2
            d1 = e1 * d1
        return s, d1, d2

    def derivative(self, z: Tensor) -> Tensor:
        return self.derivatives(z)[1]

    def second_derivative(self, z: Tensor) -> Tensor:
        return self.derivatives(z)[2]


def _is_linear_map(act: Activation | None) -> bool:
    """True when σ is the identity (σ′ ≡ 1, σ″ ≡ 0)."""
    if act is None or isinstance(act, Identity):
        return True
    if isinstance(act, _Chain):
        return all(_is_linear_map(a) for a in act._acts)
    return False


def _zero_curvature(act: Activation | None) -> bool:
    """True when σ″ ≡ 0 (identity, ReLU and compositions of them)."""
    if act is None or isinstance(act, (Identity, ReLU)):
        return True
    if isinstance(act, _Chain):
        return all(_zero_curvature(a) for a in act._acts)
    return False


@dataclass(frozen=True)
class LayerInfo:
    """One ``nn.Linear`` of a supported MLP and the elementwise activation after it (if any)."""

    name: str
    linear: nn.Linear
    activation: Activation | None
    n_in: int
    n_out: int
    bias: bool
    offset: int

    @property
    def n_weight(self) -> int:
        return self.n_in * self.n_out

    @property
    def n_params(self) -> int:
        return self.n_weight + (self.n_out if self.bias else 0)

    @property
    def params(self) -> slice:
        """Where this layer's (weight, bias) lie in the flat θ."""
        return slice(self.offset, self.offset + self.n_params)

    @property
    def activation_name(self) -> str:
        if self.activation is None:
            return "none"
        return self.activation.name or type(self.activation).__name__


@dataclass(frozen=True)
class MLPStructure:
    """What second-order backpropagation needs to know about a sequential MLP."""

    layers: tuple[LayerInfo, ...]
    preprocess: tuple[nn.Module, ...]
    n_params: int

    def input(self, X: Tensor) -> Tensor:
        """Apply the parameter-free modules before the first Linear (Flatten, activations)."""
        with torch.no_grad():
            for m in self.preprocess:
                X = m(X)
        return X


def _named_flat(model: nn.Sequential, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, m in model._modules.items():  # not named_children(): it hides repeated modules
        if m is None:
            continue
        full = f"{prefix}{name}"
        if isinstance(m, nn.Sequential):
            out.extend(_named_flat(m, full + "."))
        else:
            out.append((full, m))
    return out


def _finish_activation(acts: list[Activation]) -> Activation | None:
    acts = [a for a in acts if not isinstance(a, Identity)]
    if not acts:
        return None
    return acts[0] if len(acts) == 1 else _Chain(acts)


def analyse_mlp(model: nn.Module) -> tuple[MLPStructure | None, str]:
    """The :class:`MLPStructure` of ``model``, or ``(None, why it is not supported)``."""
    if not isinstance(model, nn.Sequential):
        return None, (
            f"the model is a {type(model).__name__}, not an nn.Sequential of nn.Linear layers "
            "and elementwise activations"
        )
    pre: list[nn.Module] = []
    layers: list[dict] = []
    pending: list[Activation] = []
    for name, m in _named_flat(model):
        label = f"layer {name} ({type(m).__name__})"
        if isinstance(m, nn.Linear):
            if type(m).forward is not nn.Linear.forward:
                return None, f"{label} overrides nn.Linear.forward"
            if layers:
                layers[-1]["activation"] = _finish_activation(pending)
            pending = []
            layers.append({"name": name, "linear": m, "activation": None})
            continue
        if isinstance(m, nn.Flatten):
            if layers:
                return None, f"{label} follows a Linear layer"
            pre.append(m)
            continue
        if any(True for _ in m.parameters()):
            return None, f"{label} has parameters but is not nn.Linear"
        act = activation_derivatives(m)
        if act is None:
            return None, (
                f"{label} has no closed-form σ″ (secondorder.models.activation_derivatives "
                "does not recognise it)"
            )
        if layers:
            pending.append(act)
        else:
            pre.append(m)
    if not layers:
        return None, "the model has no nn.Linear layer"
    layers[-1]["activation"] = _finish_activation(pending)
    expected: list[nn.Parameter] = []
    infos: list[LayerInfo] = []
    offset = 0
    for d in layers:
        lin: nn.Linear = d["linear"]
        expected.append(lin.weight)
        if lin.bias is not None:
            expected.append(lin.bias)
        info = LayerInfo(
            d["name"],
            lin,
            d["activation"],
            lin.in_features,
            lin.out_features,
            lin.bias is not None,
            offset,
        )
        offset += info.n_params
        infos.append(info)
    actual = list(model.parameters())
    if len(actual) != len(expected) or any(a is not b for a, b in zip(actual, expected)):
        return None, "the model's parameters are shared between layers or registered out of order"
    for prev, nxt in zip(infos[:-1], infos[1:]):
        if prev.n_out != nxt.n_in:
            return None, (
                f"layer {nxt.name} expects {nxt.n_in} inputs but the layer before gives "
                f"{prev.n_out}"
            )
    return MLPStructure(tuple(infos), tuple(pre), offset), ""


def supports_fast_path(model: nn.Module) -> tuple[bool, str]:
    """Whether second-order backpropagation covers ``model``; if not, the reason.

    Supported: ``nn.Sequential`` (nested ones flattened) of ``nn.Linear`` (bias optional) and
    elementwise activations with closed-form σ′, σ″ (``secondorder.models`` activations and
    ``nn.Sigmoid``, ``nn.Tanh``, ``nn.ReLU``, ``nn.Identity``, ``nn.Softplus(beta=1)``), an
    optional ``nn.Flatten`` or parameter-free activations before the first Linear, and an
    optional activation after the last one. Everything else uses the autodiff fallback.
    """
    struct, reason = analyse_mlp(model)
    return struct is not None, reason


# -- the forward and backward pass --------------------------------------------------------------


@dataclass
class _Pass:
    """Per-sample quantities of one chunk (all derivatives include the 1/N of the mean)."""

    xs: list[Tensor]  # x⁽ˡ⁻¹⁾, the input of every Linear: (n, n_in)
    d1: list[Tensor | None]  # σ′(z⁽ˡ⁾), None when there is no activation
    gz: list[Tensor]  # ∂J/∂z⁽ˡ⁾: (n, n_out)
    hz: list[Tensor] | None  # H_Z⁽ˡ⁾ (or G_Z⁽ˡ⁾ for the Gauss–Newton matrix): (n, n_out, n_out)
    resid: list[Tensor | None]  # σ″(z⁽ˡ⁾) ⊙ ∂J/∂x⁽ˡ⁾ (eq. 87), None when σ″ ≡ 0
    out: Tensor
    losses: Tensor


def _weights(layer: LayerInfo, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    W = layer.linear.weight.detach().to(dtype)
    b = layer.linear.bias.detach().to(dtype) if layer.bias else None
    return W, b


def _second_order_pass(
    struct: MLPStructure,
    X: Tensor,
    y: Tensor,
    loss: Loss,
    weight: float,
    curvature: str | None,
    diag_first: bool = False,
    lowest: int = 0,
) -> _Pass:
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
            W, b = _weights(layer, dtype)
            xs.append(x)
            z = F.linear(x, W, b)
            if _is_linear_map(layer.activation):
                x, d1, d2 = z, None, None
            else:
                x, d1, d2 = layer.activation.derivatives(z)
                if _zero_curvature(layer.activation):
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
                W, _ = _weights(struct.layers[l], dtype)
                gx = g @ W
                if hx is not None and diag_first and l == 1:
                    hx = (torch.matmul(hz[l], W) * W).sum(1)  # diag(Wᵀ H_Z W)
                elif hx is not None:
                    hx = torch.matmul(torch.matmul(hz[l], W).transpose(1, 2), W)
    return _Pass(xs, d1s, gz, hz if curvature else None, resid, out, losses)


# -- chunking -----------------------------------------------------------------------------------


def _per_sample_bytes(struct: MLPStructure, item: int, buffer_cols: int) -> int:
    n = buffer_cols
    widths = [(layer.n_in, layer.n_out) for layer in struct.layers]
    for a, b in widths:
        n += a + 4 * b + 3 * b * b + b * a
    for i, (_, a) in enumerate(widths):
        for _, b in widths[i + 1 :]:
            n += 4 * a * b + 2 * b * b
    return item * max(n, 1)


def _chunks(
    problem: _ad.Problem,
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
        per = per_sample or _per_sample_bytes(struct, problem.dtype.itemsize, buffer_cols)
        chunk_size = max(1, min(N, CHUNK_BYTES // per))
    else:
        chunk_size = check_positive_int("chunk_size", chunk_size)
    X0 = struct.input(problem.X)
    for a in range(0, N, chunk_size):
        yield X0[a : a + chunk_size], problem.y[a : a + chunk_size]


# -- block assembly -----------------------------------------------------------------------------


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


def _assemble(
    problem: _ad.Problem,
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
    per = _per_sample_bytes(struct, item, cols)
    size = chunk_size if chunk_size is not None else max(1, budget // per)
    kept: dict[int, tuple[list[Tensor], list[Tensor]]] = {k: ([], []) for k in wide}
    for c, (X, y) in enumerate(_chunks(problem, struct, size, cols)):
        first = c == 0
        n = X.shape[0]
        if buf is None or buf.numel() < n * cols:
            buf = torch.empty(n * cols, dtype=problem.dtype, device=problem.device)
        ps = _second_order_pass(struct, X, y, problem.loss, weight, mode, lowest=lowest)
        for (k, l), out in targets.items():
            if k == l and k in wide:
                kept[k][0].append(ps.hz[k])
                kept[k][1].append(ps.xs[k])
            elif k == l:
                _diag_pair(out, ps.hz[k], ps.xs[k], layers[k].bias, buf, first)
        for k, last in reach.items():
            J = None  # J⁽ˡ←ᵏ⁾ for the current l; None is the identity (l = k)
            for l in range(k + 1, last + 1):
                d1 = ps.d1[l - 1]
                if J is None:
                    ones = torch.ones(n, layers[k].n_out, dtype=X.dtype, device=X.device)
                    E = torch.diag_embed(ones if d1 is None else d1)
                else:
                    E = J if d1 is None else d1[:, :, None] * J
                W, _ = _weights(layers[l], X.dtype)
                J = torch.matmul(W, E)
                if (k, l) in targets:
                    M = torch.matmul(J.transpose(1, 2), ps.hz[l])
                    hess = mode == "hessian"
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


def _add_l2(problem: _ad.Problem, out: Tensor, rows: slice) -> None:
    if problem.l2:
        out.diagonal().add_(problem.l2 * problem.l2_mask[rows])


def _fast_dense(problem: _ad.Problem, struct: MLPStructure, mode: str, chunk_size, max_bytes):
    P = struct.n_params
    what = "the dense Hessian" if mode == "hessian" else "the dense Gauss-Newton matrix"
    check_dense_fits((P, P), problem.dtype, what, max_bytes=max_bytes)
    H = torch.empty(P, P, dtype=problem.dtype, device=problem.device)  # every entry written
    sl = [layer.params for layer in struct.layers]
    L = len(sl)
    targets = {(k, l): H[sl[k], sl[l]] for k in range(L) for l in range(k, L)}
    _assemble(problem, struct, targets, mode, chunk_size)
    for k in range(L):
        for l in range(k + 1, L):
            _copy_transposed(H[sl[l], sl[k]], H[sl[k], sl[l]])
    _add_l2(problem, H, slice(0, P))
    return H


#: largest K matrix (entries) that :func:`_diagonal` builds for the second layer
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


def _congruence_fm(h: Tensor, W: Tensor) -> Tensor:
    """Wᵀ h_i W for every sample, feature-major: h (k, k, n) symmetric per sample, W (k, m);
    returns (m, m, n). Two GEMMs with the samples along the wide dimension (no batched
    small products) and one transposing copy between them."""
    k, _, n = h.shape
    m = W.shape[1]
    A = torch.mm(W.T, h.reshape(k, k * n))  # [m, c′, i] = Σ_c W_cm h_cc′
    A = A.view(m, k, n).transpose(0, 1).reshape(k, m * n)
    return torch.mm(W.T, A).view(m, m, n)  # [m′, m, i] = (Wᵀ h W)_mm′


def _output_derivatives_fm(
    loss: Loss, out: Tensor, y: Tensor, weight: float, grad: bool
) -> tuple[Tensor | None, Tensor]:
    """Feature-major (k, n) output ``out``: (weight·∂ℓ/∂out as (k, n) or None,
    weight·∂²ℓ/∂out² as (k, k, n)); cross-entropy computes its softmax once."""
    if type(loss) is CrossEntropy:
        p = torch.softmax(out, 0)
        g = None
        if grad:
            g = p * weight
            g[y, torch.arange(len(y), device=y.device)] -= weight
        pw = p * weight
        H = torch.mul(pw[:, None, :], p[None, :, :]).neg_()  # w(diag p − p pᵀ)
        H.diagonal(dim1=0, dim2=1).add_(pw.T)
        return g, H
    g = loss.grad_output(out.T, y).T * weight if grad else None
    H = loss.hessian_output(out.T, y).permute(1, 2, 0) * weight
    return g, H.contiguous()


def _diag_per_sample_bytes(struct: MLPStructure, item: int) -> int:
    """Temporaries per sample of :func:`_diagonal`: activations, σ′, σ″, g and diag H_Z of
    every layer, and the full H_Z (with one congruence factor) of every layer above the first."""
    n = 0
    for l, layer in enumerate(struct.layers):
        n += layer.n_in + 6 * layer.n_out
        if l > 0:
            n += 3 * layer.n_out**2 + 2 * layer.n_out * layer.n_in
    return item * max(n, 1)


def _diagonal(
    problem: _ad.Problem, struct: MLPStructure, mode: str, chunk_size, check_finite: bool = False
) -> Tensor:
    """diag H (or diag G): Σ_i diag(H_Z,i)_j x_im² per weight, Σ_i diag(H_Z,i)_j per bias.

    Every per-sample quantity is kept feature-major — x⁽ˡ⁾, σ′, g as (n_l, n), H_Z as
    (n_l, n_l, n) — so that each step is one GEMM with the samples along its wide dimension
    (z = W·x, g ← Wᵀ·g, the congruence Wᵀ H_Z W as two GEMMs) or one elementwise pass; no
    batched products of small per-sample matrices. The first layer's H_Z is needed only on its
    diagonal,

        diag(Wᵀ H_Z W)_m = Σ_cc′ H_Z[c, c′] W_cm W_c′m = Kᵀ·vec(H_Z),   K[(c, c′), m] = W_cm W_c′m,

    one GEMM (for cross-entropy right at the output, H_Z = w(diag p − ppᵀ) and this is
    w((W ⊙ W)ᵀp − (Wᵀp)²), two thin GEMMs and no H_Z at all). Then per layer one GEMM
    diag(H_Z)·(x ⊙ x), for the wide input in cache-sized row blocks.
    """
    layers = struct.layers
    L = len(layers)
    dtype = problem.dtype
    hess = mode == "hessian"
    loss = problem.loss
    weight = 1.0 / problem.n_samples
    Ws = [_weights(layer, dtype) for layer in layers]
    d = torch.zeros(struct.n_params, dtype=dtype, device=problem.device)
    dW = [d[ly.offset : ly.offset + ly.n_weight].view(ly.n_out, ly.n_in) for ly in layers]
    db = [
        d[ly.offset + ly.n_weight : ly.offset + ly.n_params] if ly.bias else None for ly in layers
    ]
    # cross-entropy straight after the last Linear: H_Z = w(diag p − ppᵀ) stays implicit
    ce_top = type(loss) is CrossEntropy and _is_linear_map(layers[-1].activation)
    if ce_top and L > 1:
        W = Ws[-1][0]
        Wt_top, WW_top = W.T.contiguous(), (W * W).T.contiguous()
    K = None
    if L > 1 and not (ce_top and L == 2):
        W = Ws[1][0]
        if W.shape[0] ** 2 * W.shape[1] <= _K_ELEMENTS:
            K = (W[None, :, :] * W[:, None, :]).reshape(-1, W.shape[1]).T.contiguous()
    per = _diag_per_sample_bytes(struct, problem.dtype.itemsize)
    with torch.no_grad():
        for X, y in _chunks(problem, struct, chunk_size, per_sample=per):
            xs: list[Tensor] = [X]  # X sample-major (n, n_in); the others (n_l, n)
            d1s: list[Tensor | None] = []
            d2s: list[Tensor | None] = []
            x = X.T
            for layer, (W, b) in zip(layers, Ws):
                z = torch.mm(W, x)
                if b is not None:
                    z.add_(b[:, None])
                act = layer.activation
                if _is_linear_map(act):
                    x, d1, d2 = z, None, None
                else:
                    x, d1, d2 = act.derivatives(z)
                    if not hess or _zero_curvature(act):
                        d2 = None
                xs.append(x)
                d1s.append(d1)
                d2s.append(d2)
            gx: Tensor | None
            scale = 1.0  # the weight w = 1/N still to apply to hx and gx
            if ce_top:  # the last layer from p alone
                p = torch.softmax(x, 0)
                l = L - 1
                dh = torch.addcmul(p, p, p, value=-1.0)  # diag(diag p − ppᵀ), w in the GEMM
                _add_layer_diag(dW[l], db[l], dh, xs[l], l, weight)
                if L == 1:
                    continue
                W = Ws[l][0]
                q = torch.mm(W.T, p)  # Wᵀp
                # ∂ℓ/∂x = Wᵀ(p − e_y): no one-hot, the label's column of Wᵀ is gathered
                gx = torch.sub(q, Wt_top.index_select(1, y)) if hess else None
                if L == 2:  # diag(Wᵀ(diag p − ppᵀ)W) = (W ⊙ W)ᵀp − (Wᵀp)²
                    hx = torch.mm(WW_top, p).sub_(q.square())
                    scale = weight
                else:
                    _, h = _output_derivatives_fm(loss, x, y, weight, grad=False)
                    hx = _congruence_fm(h, W)
                    if gx is not None:
                        gx.mul_(weight)
                top = L - 2
            else:
                gx, hx = _output_derivatives_fm(loss, x, y, weight, grad=hess)
                top = L - 1
            for l in range(top, -1, -1):
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
                _add_layer_diag(dW[l], db[l], dh, xs[l], l, scale)
                if l == 0:
                    break
                W = Ws[l][0]
                if gx is not None:
                    gx = torch.mm(W.T, gx if d1 is None else gx * d1)
                if l > 1:
                    hx = _congruence_fm(h, W)
                elif K is not None:  # diag(Wᵀ H_Z W) = Kᵀ·vec(H_Z)
                    hx = torch.mm(K, h.reshape(-1, h.shape[2]))
                else:  # the same, as Σ_c W_cm (Wᵀ H_Z)[m, c]
                    k, _, n = h.shape
                    A = torch.mm(W.T, h.reshape(k, k * n)).view(W.shape[1], k, n)
                    hx = (A * W.T[:, :, None]).sum(1)
    if check_finite and not bool(torch.isfinite(d.sum())):
        _ad._check_finite(problem.X)  # raises on NaN/inf in X; else d overflowed honestly
    if problem.l2:
        d.add_(problem.l2_mask, alpha=problem.l2)
    return d


def _add_layer_diag(
    dW: Tensor, db: Tensor | None, dh: Tensor, x: Tensor, l: int, alpha: float = 1.0
) -> None:
    """dW += α·diag(H_Z)·(x ⊙ x) and db += α·Σ_i diag(H_Z); dh is (n_out, n), x is the
    layer's input, sample-major (n, n_in) for the first layer and feature-major above."""
    if l == 0:
        _add_squares_gemm(dW, dh, x, alpha)
    else:
        dW.addmm_(dh, (x * x).T, alpha=alpha)
    if db is not None:
        db.add_(dh.sum(1), alpha=alpha)


# -- public functions ---------------------------------------------------------------------------


def _setup(model, X, y, loss, l2, method: str, what: str, defer_finite: bool = False):
    """Validate and analyse. With ``defer_finite``, the NaN/inf test of X is left to the
    caller where the fast path reads X unchanged (see :func:`_finite_deferred`)."""
    check_choice("method", method, METHODS)
    struct, reason = (None, "") if method == "autodiff" else analyse_mlp(model)
    probe = None if struct is None else _probe(struct)
    problem = _ad.prepare(model, X, y, loss, l2, check_finite=not defer_finite, probe=probe)
    if defer_finite and (struct is None or not _finite_deferred(struct)):
        _ad._check_finite(problem.X)
    if method == "autodiff":
        return problem, None
    if struct is None:
        if method == "backprop":
            raise ValueError(f"method='backprop' needs a sequential MLP, but {reason}")
        warnings.warn(
            f"{what}: second-order backpropagation does not apply because {reason}; using the "
            "slower autodiff fallback (torch.func)",
            stacklevel=3,
        )
    return problem, struct


def _probe(struct: MLPStructure):
    """What ``prepare`` checks by applying the model to one sample, from the structure: the
    first Linear must receive (1, n_in) after the leading modules; the output width is the
    last Linear's."""

    def probe(X: Tensor) -> int:
        try:
            x = struct.input(X[:1])
        except Exception as exc:
            raise ValueError(
                f"the model cannot be applied to X of shape {tuple(X.shape)}: {exc}"
            ) from exc
        n_in = struct.layers[0].n_in
        if x.shape[-1] != n_in:
            raise ValueError(
                f"the model cannot be applied to X of shape {tuple(X.shape)}: its first Linear "
                f"layer takes {n_in} features, got {x.shape[-1]}"
            )
        if x.ndim != 2:
            out = (*x.shape[:-1], struct.layers[-1].n_out)
            raise ValueError(f"the model must map X of shape (N, ...) to outputs (N, k), got {out}")
        return struct.layers[-1].n_out

    return probe


def _finite_deferred(struct: MLPStructure) -> bool:
    """Whether a NaN or inf anywhere in X must show in the diagonal: X reaches the first
    GEMMs unchanged (at most flattened), and then x ⊙ x holds it, and every weight of the
    first layer's row in the result is NaN or ±inf (0·inf is NaN). A finite diagonal thus
    proves X finite, and only a non-finite one needs the elementwise test."""
    return struct.layers[0].n_out > 0 and all(isinstance(m, nn.Flatten) for m in struct.preprocess)


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
) -> Tensor:
    """The dense P×P Hessian of J(θ) = mean loss + (l2/2)·‖W‖² (weights only).

    Parameters are ordered as ``parameters_to_vector(model.parameters())``. Sequential MLPs use
    exact second-order backpropagation, every other model the autodiff fallback (with a warning
    saying why); ``method="backprop"`` or ``"autodiff"`` forces one. ``max_bytes`` bounds the
    dense result (default: half the free memory); ``chunk_size`` the samples per chunk.
    """
    problem, struct = _setup(model, X, y, loss, l2, method, "hessian")
    if struct is None:
        return _ad.autodiff_hessian(problem, max_bytes=max_bytes)
    return _fast_dense(problem, struct, "hessian", chunk_size, max_bytes)


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
    problem, struct = _setup(model, X, y, loss, l2, method, "ggn")
    if struct is None:
        return _ad.autodiff_ggn(problem, max_bytes=max_bytes)
    return _fast_dense(problem, struct, "ggn", chunk_size, max_bytes)


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
    problem, struct = _setup(model, X, y, loss, l2, method, "hessian_diagonal", True)
    if struct is None:
        return _ad.autodiff_hessian_diagonal(problem)
    return _diagonal(problem, struct, "hessian", chunk_size, check_finite=True)


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
    problem, struct = _setup(model, X, y, loss, l2, method, "ggn_diagonal", True)
    if struct is None:
        return _ad.autodiff_ggn_diagonal(problem)
    return _diagonal(problem, struct, "ggn", chunk_size, check_finite=True)


def _groups(problem: _ad.Problem, struct: MLPStructure | None) -> list[tuple[int, int]]:
    if struct is not None:
        return [(layer.params.start, layer.params.stop) for layer in struct.layers]
    return [(a, b) for _, a, b in _ad.parameter_groups(problem.model)]


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
    problem, struct = _setup(model, X, y, loss, l2, method, "layer_hessians")
    groups = _groups(problem, struct)
    total = sum((b - a) ** 2 for a, b in groups)
    check_dense_fits((total,), problem.dtype, "the layer Hessian blocks", max_bytes=max_bytes)
    if struct is None:
        blocks = _ad.autodiff_hessian_blocks(problem, groups, [(i, i) for i in range(len(groups))])
        out = [blocks[(i, i)] for i in range(len(groups))]
    else:
        out = [
            torch.empty(b - a, b - a, dtype=problem.dtype, device=problem.device) for a, b in groups
        ]
        _assemble(problem, struct, {(i, i): t for i, t in enumerate(out)}, "hessian", chunk_size)
        for (a, b), t in zip(groups, out):
            _add_l2(problem, t, slice(a, b))
    return out


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
    problem, struct = _setup(model, X, y, loss, l2, method, "hessian_blocks")
    groups = _groups(problem, struct)
    L = len(groups)
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
    upper = sorted({(min(k, l), max(k, l)) for k, l in wanted})
    total = sum((groups[k][1] - groups[k][0]) * (groups[l][1] - groups[l][0]) for k, l in upper)
    check_dense_fits((total,), problem.dtype, "the Hessian blocks", max_bytes=max_bytes)
    if struct is None:
        computed = _ad.autodiff_hessian_blocks(problem, groups, upper)
    else:
        computed = {
            (k, l): torch.empty(
                groups[k][1] - groups[k][0],
                groups[l][1] - groups[l][0],
                dtype=problem.dtype,
                device=problem.device,
            )
            for k, l in upper
        }
        _assemble(problem, struct, computed, "hessian", chunk_size)
        for k in range(L):
            if (k, k) in computed:
                _add_l2(problem, computed[(k, k)], slice(*groups[k]))
    result: dict[tuple[int, int], Tensor] = {}
    for k, l in wanted:
        if (k, l) in computed:
            result[(k, l)] = computed[(k, l)]
        elif (l, k) in wanted:
            result[(k, l)] = computed[(l, k)].T
        else:
            result[(k, l)] = computed[(l, k)].T.contiguous()
    return result


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
    problem = _ad.prepare(model, X, y, loss, 0.0)
    struct, reason = analyse_mlp(model)
    if struct is None:
        raise ValueError(f"per_sample_hz needs a sequential MLP, but {reason}")
    N = problem.n_samples
    total = sum(N * layer.n_out**2 for layer in struct.layers)
    check_dense_fits((total,), problem.dtype, "the per-sample H_Z", max_bytes=max_bytes)
    parts: list[list[Tensor]] = [[] for _ in struct.layers]
    mode = "ggn" if ggn else "hessian"
    for Xc, yc in _chunks(problem, struct, chunk_size):
        ps = _second_order_pass(struct, Xc, yc, problem.loss, 1.0 / N, mode)
        for p, h in zip(parts, ps.hz):
            p.append(h)
    return [torch.cat(p) for p in parts]

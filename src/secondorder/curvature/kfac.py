r"""K-FAC: Kronecker factors of each layer's curvature block, and the one engine that keeps,
inverts and applies them (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016;
EKFAC, George et al. 2018).

For a layer s_r = W̃ ã_r over positions r (one for a dense layer on vectors; the R output
pixels of a convolution, ã_r its unfolded patch; ã = (a, 1) with a bias) and samples weighted
by w_n (Σ w_n = 1), the Gauss–Newton block of W̃ (row-major) is

    B = Σ_n w_n Σ_c (Σ_r g_{n,c,r} ã_{n,r}ᵀ)(…)ᵀ  ≈  G ⊗ A,

where g_{n,c,r} = J_{s,n,r}ᵀ v_{n,c} back-propagates a per-sample vector v at the model output:
the columns of a factor L Lᵀ = H_z of the loss Hessian (``kind="exact"``, the GGN), the loss
gradient at targets drawn from the model (``"mc"``, the Fisher) or at the true labels
(``"empirical"``). The factors (Eschenhagen et al. 2023; the normalisation of curvlinops):

    expand:  A = Σ_n w_n (1/R) Σ_r ã_{n,r} ã_{n,r}ᵀ,   G = Σ_n w_n Σ_c Σ_r g_{n,c,r} g_{n,c,r}ᵀ,
    reduce:  A = Σ_n w_n ā_n ā_nᵀ (ā_n = mean_r ã_{n,r}),   G = Σ_n w_n Σ_c ĝ_{n,c} ĝ_{n,c}ᵀ
             (ĝ = Σ_r g_r).

For one sample of a dense layer both are the block itself. A module applied several times in a
forward pass (shared weights) adds its calls as further positions. :class:`KFACEngine` keeps
running averages A ← ρA + (1 − ρ)A_k, refreshes damped inverses or eigendecompositions, and
applies (G ⊗ A + damping)⁻¹ to a gradient: the same engine behind ``minimize(..., "kfac")``,
``secondorder.optim.KFAC`` and ``preconditioner="kfac"``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from secondorder._validation import check_choice
from secondorder.layers import KFAC_APPROXIMATIONS, Layer, make_layer
from secondorder.linalg import check_dense_fits

__all__ = [
    "KFAC_APPROXIMATIONS",
    "KFAC_KINDS",
    "KFACEngine",
    "FlatLayout",
    "KFACStatistics",
    "KroneckerFactors",
    "LayerCapture",
    "all_finite",
    "backpropagate",
    "check_factors_fit",
    "damped_inverses",
    "factor_dtype",
    "engine_state_from",
    "kfac_factors",
    "kfac_layers",
    "kfac_statistics",
    "layer_factors",
    "output_vectors",
    "per_sample_gradients",
]

KFAC_KINDS = ("exact", "mc", "empirical")
#: what K-FAC does with parameters of modules it has no factors for
UNSUPPORTED = ("error", "gradient")


# -- which modules ------------------------------------------------------------------------------


def kfac_layers(
    model: nn.Module, *, unsupported: str = "error", purpose: str = "K-FAC"
) -> tuple[list[Layer], list[tuple[str, nn.Parameter]]]:
    """The layers K-FAC factors (every module whose own trainable parameters it can factor,
    whatever the graph) and the trainable parameters outside them.

    ``unsupported="error"`` refuses a parameter in any other module (BatchNorm, LayerNorm,
    Embedding, a bare ``nn.Parameter``) with its name; ``"gradient"`` returns those
    parameters, which the faces then update with the plain gradient."""
    check_choice("unsupported", unsupported, UNSUPPORTED)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers: list[Layer] = []
    others: list[tuple[str, nn.Parameter]] = []
    owner: dict[int, str] = {}
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        full = [(f"{name}.{n}" if name else n, p) for n, p in own]
        for pname, p in full:
            if id(p) in owner:
                raise ValueError(
                    f"{purpose}: parameter {pname} is shared with {owner[id(p)]}; K-FAC needs "
                    "each parameter in one module (share the module instead)"
                )
            owner[id(p)] = pname
        layer, why = make_layer(module, name)
        if layer is not None and type(layer).kfac and len(layer.parameters()) == len(own):
            layers.append(layer)
            continue
        if unsupported == "gradient":
            others.extend(full)
            continue
        label = f"{name} ({type(module).__name__})" if name else type(module).__name__
        reason = why or "K-FAC has Kronecker factors for nn.Linear and nn.Conv2d only"
        raise ValueError(
            f"{purpose} cannot factor the parameters of module {label}: {reason}. Freeze them "
            "(requires_grad=False), pass unsupported='gradient' to update them with the plain "
            "gradient, or use a method without Kronecker factors (e.g. 'newton-cg')"
        )
    if not layers:
        raise ValueError(
            f"{purpose} needs at least one nn.Linear or nn.Conv2d layer with trainable "
            f"parameters; {type(model).__name__} has none"
        )
    return layers, others


def check_factors_fit(
    layers: list[Layer], dtype: torch.dtype, device=None, *, copies: int = 4, max_bytes=None
) -> int:
    """Refuse, before any allocation, factors (A, G, their inverses or eigenvectors and the
    running averages: ``copies`` of each) that would not fit in memory."""
    total = sum(copies * (a * a + g * g) for g, a in (ly.kfac_dims for ly in layers))
    widest = max(layers, key=lambda ly: max(ly.kfac_dims))
    what = (
        f"K-FAC's Kronecker factors ({len(layers)} layers; the largest, {widest.label}, has "
        f"factors of {widest.kfac_dims[1]}² and {widest.kfac_dims[0]}² entries)"
    )
    try:
        return check_dense_fits((total,), dtype, what, max_bytes=max_bytes, device=device)
    except MemoryError as err:
        raise type(err)(
            f"{err.args[0].split('; use ')[0]}; narrow the layer, or use a method without "
            "Kronecker factors (e.g. 'newton-cg' with Gauss–Newton products)"
        ) from None


# -- capturing layer inputs and output gradients -----------------------------------------------


@dataclass
class LayerCapture:
    """Inputs, outputs and (after a backward pass) output gradients of each layer, per call."""

    layers: list[Layer]
    inputs: list[list[Tensor]] = field(default_factory=list)
    outputs: list[list[Tensor]] = field(default_factory=list)
    grads: list[list[Tensor]] = field(default_factory=list)

    @contextmanager
    def recording(self, *, grads: bool = False) -> Iterator[LayerCapture]:
        """Hooks on every layer while the block runs (a forward pass, and with ``grads`` the
        user's backward pass too); the lists start empty."""
        n = len(self.layers)
        self.inputs = [[] for _ in range(n)]
        self.outputs = [[] for _ in range(n)]
        self.grads = [[] for _ in range(n)]

        def hook(j: int):
            def forward_hook(module, args, out):
                self.inputs[j].append(args[0].detach())
                self.outputs[j].append(out)
                if grads and out.requires_grad:
                    out.register_hook(lambda g: self.grads[j].append(g.detach()))

            return forward_hook

        handles = [ly.module.register_forward_hook(hook(j)) for j, ly in enumerate(self.layers)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def complete(self) -> bool:
        return all(self.inputs)


def output_vectors(
    loss, z: Tensor, kind: str, y: Tensor | None = None, generator: torch.Generator | None = None
) -> list[Tensor]:
    """The per-sample vectors v at the model output z that K-FAC back-propagates: the columns
    of L (H_z = L Lᵀ, ``"exact"``), ∂ℓ(z, ŷ)/∂z at ŷ drawn from the model (``"mc"``) or at the
    labels y (``"empirical"``)."""
    z = z.detach()
    if kind == "exact":
        # H_z of these losses does not depend on the target (canonical links)
        target = loss.predict(z) if y is None else y
        L = loss.hessian_output_sqrt(z, target)
        return [L[:, :, c] for c in range(L.shape[2])]
    if kind == "mc":
        return [loss.grad_output(z, loss.sample_targets(z, generator))]
    if y is None:
        raise ValueError("kind='empirical' needs the labels y")
    return [loss.grad_output(z, y)]


def backpropagate(
    z: Tensor, capture: LayerCapture, vectors: list[Tensor], *, retain: bool = False
) -> list[list[list[Tensor]]]:
    """The gradients of every layer call's output for each vector: ``grads[j][c][call]``
    (calls become further positions in :func:`layer_factors`); ``retain`` keeps the graph
    after the last vector."""
    outs = [o for calls in capture.outputs for o in calls]
    counts = [len(calls) for calls in capture.outputs]
    per_column: list[list[list[Tensor]]] = []
    for i, v in enumerate(vectors):
        flat = torch.autograd.grad(z, outs, v, retain_graph=retain or i + 1 < len(vectors))
        it = iter(flat)
        per_column.append([[next(it) for _ in range(c)] for c in counts])
    return [[col[j] for col in per_column] for j in range(len(counts))]


# -- the factors ------------------------------------------------------------------------------


@dataclass
class KroneckerFactors:
    """A (inputs) and G (output gradients) of one layer; :meth:`dense` is G ⊗ A in the
    layer's θ order (weight flattened, then bias)."""

    layer: Layer
    A: Tensor
    G: Tensor
    params: slice | None = None  # where the layer's parameters lie in θ, when known

    def dense(self) -> Tensor:
        """G ⊗ A reordered from vec(W̃) row-major to θ order: for small layers and tests."""
        d_out, d_in = self.layer.kfac_dims
        block = torch.kron(self.G, self.A)
        idx = torch.arange(d_out * d_in).view(d_out, d_in)
        order = torch.cat([t.reshape(-1) for t in self.layer.split_matrix(idx)])
        return block[order][:, order]


def factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype factors are formed and inverted in: float32 for half-precision models (bf16
    or fp16 factors give broken inverses and eigenvectors), else the model's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _positions(layer: Layer, calls: list[Tensor], grads: bool) -> Tensor:
    """(n, R, d): every call's rows as positions of one sample, in the factors' dtype."""
    rows = [layer.kfac_output_grads(t) if grads else layer.kfac_inputs(t) for t in calls]
    out = rows[0] if len(rows) == 1 else torch.cat(rows, 1)
    return out.to(factor_dtype(out.dtype))


def layer_factors(
    layer: Layer,
    inputs: list[Tensor],
    grads: list[list[Tensor]],
    w: Tensor,
    approximation: str = "expand",
) -> KroneckerFactors:
    """One layer's factors (see module doc) from its inputs (one tensor per call), the output
    gradients (per column, one tensor per call) and the sample weights w (n,)."""
    a = _positions(layer, inputs, grads=False)  # (n, R, d_in)
    w = w.to(a.dtype)
    if approximation == "expand":
        wa = (w / a.shape[1])[:, None, None] * a
        A = wa.flatten(0, 1).T @ a.flatten(0, 1)
    else:
        ab = a.mean(1)
        A = (w[:, None] * ab).T @ ab
    d_out = layer.kfac_dims[0]
    G = a.new_zeros(d_out, d_out)
    for col in grads:
        g = _positions(layer, col, grads=True)  # (n, R, d_out)
        if approximation == "expand":
            G += (w[:, None, None] * g).flatten(0, 1).T @ g.flatten(0, 1)
        else:
            gs = g.sum(1)
            G += (w[:, None] * gs).T @ gs
    return KroneckerFactors(layer, A, G)


def per_sample_gradients(layer: Layer, inputs: list[Tensor], grads: list[Tensor]) -> Tensor:
    """Σ_r g_{n,r} ã_{n,r}ᵀ per sample: (n, d_out, d_in) for one back-propagated column."""
    a = _positions(layer, inputs, grads=False)
    g = _positions(layer, grads, grads=True)
    return torch.einsum("nro,nri->noi", g, a)


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one host synchronisation: a sum is
    finite exactly when its terms are (short of an overflow, itself a sign of trouble)."""
    if not tensors:
        return True
    sums = torch.stack([t.sum().to(torch.float64) for t in tensors])
    return bool(torch.isfinite(sums).all())


@dataclass
class KFACStatistics:
    """What one K-FAC step reads of a batch: each layer's factors and, for EKFAC, each
    layer's per-sample gradients (one (n, d_out, d_in) tensor per back-propagated column),
    with the sample weights w."""

    factors: list[KroneckerFactors]
    per_sample: list[list[Tensor]] | None
    w: Tensor

    def finite(self) -> bool:
        """Whether every factor (and per-sample gradient) is finite: a batch with an inf or
        NaN must not enter the running averages."""
        tensors = [t for f in self.factors for t in (f.A, f.G)]
        for cols in self.per_sample or []:
            tensors.extend(cols)
        return all_finite(tensors)


def statistics_from(
    layers: list[Layer],
    capture: LayerCapture,
    grads: list[list[list[Tensor]]],
    w: Tensor,
    approximation: str,
    per_sample: bool,
) -> KFACStatistics:
    """Factors (and per-sample gradients) of every layer from a capture and the output
    gradients ``grads[j][c][call]`` of :func:`backpropagate`."""
    factors = [
        layer_factors(ly, capture.inputs[j], grads[j], w, approximation)
        for j, ly in enumerate(layers)
    ]
    samples = None
    if per_sample:
        samples = [
            [per_sample_gradients(ly, capture.inputs[j], col) for col in grads[j]]
            for j, ly in enumerate(layers)
        ]
    return KFACStatistics(factors, samples, w)


def kfac_statistics(
    objective,
    theta: Tensor,
    *,
    kind: str = "exact",
    which: str = "curvature",
    generator: torch.Generator | None = None,
    layers: list[Layer] | None = None,
    max_samples: int | None = None,
    approximation: str = "expand",
    per_sample: bool = False,
) -> KFACStatistics:
    """The Kronecker factors of every layer of a :class:`~secondorder.objective.
    ModelObjective` at θ, over the samples and eq.-28 weights of its current function
    (``which="curvature"``: its curvature subsample when it has one); ``max_samples`` keeps
    the first n samples (weights renormalised); ``per_sample`` adds EKFAC's per-sample
    gradients."""
    check_choice("kind", kind, KFAC_KINDS)
    check_choice("approximation", approximation, KFAC_APPROXIMATIONS)
    if layers is None:
        layers, _ = kfac_layers(objective.model)
    X, y, w = objective.samples(which, max_samples=max_samples)
    capture = LayerCapture(layers)
    with capture.recording(), torch.enable_grad():
        z = objective.forward(theta.detach().requires_grad_(True), X)
    if kind == "mc":
        vectors = [_sampled(objective, z, which, max_samples, generator)]
    else:
        vectors = output_vectors(objective.loss, z, kind, y)
    grads = backpropagate(z, capture, vectors)
    stats = statistics_from(layers, capture, grads, w, approximation, per_sample)
    for f, sl in zip(stats.factors, FlatLayout(objective.model, layers).slices):
        f.params = slice(sl[0].start, sl[-1].stop)
    # data-parallel: every factor is a sum over samples; all of them in one collective
    sums = getattr(objective, "sum_over_shards", None)
    if sums is not None:
        summed = sums(*[t for f in stats.factors for t in (f.A, f.G)])
        for i, f in enumerate(stats.factors):
            f.A, f.G = summed[2 * i], summed[2 * i + 1]
    return stats


def kfac_factors(objective, theta: Tensor, **kwargs) -> list[KroneckerFactors]:
    """The factors of :func:`kfac_statistics` alone."""
    return kfac_statistics(objective, theta, **kwargs).factors


def _sampled(objective, z: Tensor, which: str, max_samples, generator) -> Tensor:
    """∂ℓ/∂z at targets drawn from the model; in a data-parallel run they are drawn for the
    whole batch's outputs (gathered) and this process keeps its rows, so the draws and the
    generator's state are those of one process."""
    z = z.detach()
    loss = objective.loss
    shard = getattr(objective, "data_parallel", None)
    if shard is None:
        return loss.grad_output(z, loss.sample_targets(z, generator))
    n = len(objective.samples(which, max_samples=max_samples, whole=True)[0])
    lo, hi = shard.bounds(n)
    targets = loss.sample_targets(shard.gather_rows(z, n), generator)[lo:hi]
    return loss.grad_output(z, targets)


# -- inverses -----------------------------------------------------------------------------------


def damped_inverses(A: Tensor, G: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Factored Tikhonov damping (Martens & Grosse 2015, section 6.3): the inverses of
    A + π√γ I and G + √γ/π I, with π² = (tr A / dim A) / (tr G / dim G), whose Kronecker
    product approximates (G ⊗ A + γ I)⁻¹ (exactly when A and G are multiples of I)."""
    root = math.sqrt(gamma)
    ta, tg = float(A.trace()) / A.shape[0], float(G.trace()) / G.shape[0]
    pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
    eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    eye_g = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return _spd_inverse(A + pi * root * eye_a), _spd_inverse(G + root / pi * eye_g)


def _spd_inverse(M: Tensor) -> Tensor:
    """The inverse of a symmetric positive definite M, by Cholesky (the general inverse when
    rounding leaves M indefinite)."""
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        return torch.cholesky_inverse(L)
    try:
        return torch.linalg.inv(M)
    except RuntimeError:  # exactly singular: the caller sees a non-finite inverse
        return torch.full_like(M, math.nan)


def _eigh(M: Tensor) -> tuple[Tensor, Tensor] | None:
    """(eigenvalues clamped at 0, eigenvectors) of a symmetric M, None when eigh fails."""
    try:
        d, Q = torch.linalg.eigh(M)
    except RuntimeError:  # ill-conditioned input: the caller keeps its previous basis
        return None
    if not (torch.isfinite(d).all() and torch.isfinite(Q).all()):
        return None
    return d.clamp_min(0), Q


# -- the engine ---------------------------------------------------------------------------------


class KFACEngine:
    """Running Kronecker factors of a list of layers, their damped inverses (K-FAC) or
    eigendecompositions with per-coordinate scales (EKFAC), and the preconditioned gradient.

    ``update(factors)`` folds a step's factors into the running averages (the first taken as
    they are); ``refresh(gamma)`` recomputes the inverses (K-FAC: factored Tikhonov damping,
    see :func:`damped_inverses`) or the eigenbases Q_A, Q_G (EKFAC); ``update_scales`` folds
    the second moments of per-sample gradients in that basis, S = E[(Q_Gᵀ ∇_n Q_A)²]
    (EKFAC); ``precondition(M, gamma)`` returns (G ⊗ A + γ)⁻¹ vec M for K-FAC and
    Q_G [(Q_Gᵀ M Q_A) / (S + γ)] Q_Aᵀ for EKFAC.
    """

    def __init__(self, layers: list[Layer], *, ema: float, ekfac: bool = False) -> None:
        self.layers = list(layers)
        self.ema = ema
        self.ekfac = ekfac
        self.state: list[dict[str, Tensor]] = [{} for _ in self.layers]
        self.refreshes = [0] * len(self.layers)  # inverses or eigenbases computed, per layer

    # -- factors ---------------------------------------------------------------------------
    def refreshed_keys(self) -> tuple[str, ...]:
        """What :meth:`refresh` writes per layer."""
        return ("QA", "QG", "S") if self.ekfac else ("A_inv", "G_inv")

    def refreshed_shapes(self, j: int) -> dict[str, tuple[int, int]]:
        d_out, d_in = self.layers[j].kfac_dims
        shapes = {"QA": (d_in, d_in), "QG": (d_out, d_out), "S": (d_out, d_in)}
        shapes.update(A_inv=(d_in, d_in), G_inv=(d_out, d_out))
        return {k: shapes[k] for k in self.refreshed_keys()}

    @property
    def ready(self) -> bool:
        key = "QA" if self.ekfac else "A_inv"
        return all(key in st for st in self.state)

    def update(self, factors: list[KroneckerFactors]) -> None:
        r = self.ema
        for st, f in zip(self.state, factors):
            if "A" not in st:
                st["A"], st["G"] = f.A.clone(), f.G.clone()
            else:  # in place: no new arrays
                st["A"].mul_(r).add_(f.A, alpha=1 - r)
                st["G"].mul_(r).add_(f.G, alpha=1 - r)

    def refresh(self, gamma: float | list[float], only: list[int] | None = None) -> None:
        """New inverses (K-FAC) or eigenbases (EKFAC) of the running factors; ``gamma`` is the
        damping, one for all layers or one per layer; ``only`` restricts the work to those
        layers (a data-parallel process's share). A factor whose inverse or
        eigendecomposition is not finite (a singular or NaN factor) keeps the layer's previous
        one, with a warning once per engine."""
        gammas = gamma if isinstance(gamma, list) else [gamma] * len(self.state)
        for j, (ly, st, gam) in enumerate(zip(self.layers, self.state, gammas)):
            if only is not None and j not in only:
                continue
            self.refreshes[j] += 1
            if self.ekfac:
                ea, eg = _eigh(st["A"]), _eigh(st["G"])
                if ea is None or eg is None:
                    self._kept(ly)
                    if "QA" not in st:  # no basis yet: the identity
                        st["QA"] = torch.eye(st["A"].shape[0], dtype=st["A"].dtype)
                        st["QG"] = torch.eye(st["G"].shape[0], dtype=st["G"].dtype)
                        st["S"] = torch.zeros(st["G"].shape[0], st["A"].shape[0])
                    continue
                st["QA"], st["QG"] = ea[1], eg[1]
                # until new scales arrive, the eigenvalues' products are K-FAC's own
                st["S"] = eg[0][:, None] * ea[0][None, :]
                continue
            A_inv, G_inv = damped_inverses(st["A"], st["G"], gam)
            if all_finite([A_inv, G_inv]):
                st["A_inv"], st["G_inv"] = A_inv, G_inv
                continue
            self._kept(ly)
            if "A_inv" not in st:  # nothing to keep: the damped identity, a gradient step
                d_out, d_in = ly.kfac_dims
                root = math.sqrt(gam)
                st["A_inv"] = torch.eye(d_in, dtype=st["A"].dtype, device=st["A"].device) / root
                st["G_inv"] = torch.eye(d_out, dtype=st["A"].dtype, device=st["A"].device) / root

    def _kept(self, layer: Layer) -> None:
        if not getattr(self, "_warned", False):
            warnings.warn(
                f"K-FAC: a factor of layer {layer.label} is singular or not finite; the "
                "layer keeps its previous inverse (warned once)",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned = True

    def update_scales(self, stats: KFACStatistics, reduce=None) -> None:
        """EKFAC's scales from a step's per-sample gradients; ``reduce`` sums tensors over
        data-parallel processes (None: one process)."""
        r, w = self.ema, stats.w
        new = []
        for st, cols in zip(self.state, stats.per_sample):
            S = None
            for grads in cols:
                proj = st["QG"].T @ grads.to(st["QG"].dtype) @ st["QA"]  # (n, d_out, d_in)
                term = torch.einsum("n,noi->oi", w.to(proj.dtype), proj * proj)
                S = term if S is None else S + term
            new.append(S)
        if reduce is not None:
            new = list(reduce(*new))
        for st, S in zip(self.state, new):
            if "S_avg" not in st:
                st["S_avg"] = S
            else:
                st["S_avg"].mul_(r).add_(S, alpha=1 - r)
            st["S"] = st["S_avg"]

    def precondition(self, mats: list[Tensor], gamma: float | list[float]) -> list[Tensor]:
        gammas = gamma if isinstance(gamma, list) else [gamma] * len(self.state)
        out = []
        for st, M, gamma in zip(self.state, mats, gammas):
            M = M.to(st["A"].dtype)
            if self.ekfac:
                QG, QA = st["QG"], st["QA"]
                out.append(QG @ ((QG.T @ M @ QA) / (st["S"] + gamma)) @ QA.T)
            else:
                out.append(st["G_inv"] @ M @ st["A_inv"])
        return out

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> list[dict[str, Tensor]]:
        return [{k: v.clone() for k, v in st.items()} for st in self.state]

    def load_state_dict(self, state: list[dict[str, Tensor]]) -> None:
        if len(state) != len(self.layers):
            raise ValueError(
                f"the K-FAC state holds {len(state)} layers, the model has {len(self.layers)}"
            )
        for ly, st in zip(self.layers, state):
            d_out, d_in = ly.kfac_dims
            for key, size in (("A", d_in), ("G", d_out)):
                if key in st and tuple(st[key].shape) != (size, size):
                    raise ValueError(
                        f"the K-FAC state of layer {ly.label} has {key} of shape "
                        f"{tuple(st[key].shape)}, expected {(size, size)}"
                    )
        self.state = [{k: v.clone() for k, v in st.items()} for st in state]


def engine_state_from(state: dict) -> list | None:
    """An engine's per-layer state from a direction's or preconditioner's state dict (an
    older one kept A, G, A_inv and G_inv as lists over the layers)."""
    if state.get("engine") is not None:
        return state["engine"]
    if state.get("A") is None:
        return None
    keys = [k for k in ("A", "G", "A_inv", "G_inv") if state.get(k) is not None]
    return [{k: state[k][i].detach().clone() for k in keys} for i in range(len(state["A"]))]


class FlatLayout:
    """Where each K-FAC layer's parameters lie in a flat θ (``model.parameters()`` order of
    the trainable ones), to precondition flat vectors."""

    def __init__(self, model: nn.Module, layers: list[Layer]) -> None:
        offsets: dict[int, int] = {}
        at = 0
        for p in model.parameters():
            if p.requires_grad:
                offsets[id(p)] = at
                at += p.numel()
        self.n_params = at
        self.slices = [
            [slice(offsets[id(p)], offsets[id(p)] + p.numel()) for p in ly.parameters()]
            for ly in layers
        ]
        self.layers = layers

    def matrices(self, v: Tensor) -> list[Tensor]:
        """Each layer's part of v as its (d_out, d_in [+1]) gradient matrix."""
        return [
            ly.grad_matrix([v[s].view(p.shape) for s, p in zip(sl, ly.parameters())])
            for ly, sl in zip(self.layers, self.slices)
        ]

    def apply(self, engine: KFACEngine, v: Tensor, gamma: float) -> Tensor:
        """v with every layer's part preconditioned (other entries unchanged)."""
        out = v.clone()
        steps = engine.precondition(self.matrices(v), gamma)
        for ly, sl, M in zip(self.layers, self.slices, steps):
            for s, t in zip(sl, ly.split_matrix(M)):
                out[s] = t.reshape(-1).to(out.dtype)
        return out

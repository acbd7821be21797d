"""Convexity and saddle-point report (Appendix C, eqs. 86-90).

Appendix C observes that every term of the backpropagated H_Z (eq. 82) is a congruence
xᵀ H x of a PSD matrix, except σ″(Z)·∂L/∂X on the diagonal, which is non-negative exactly when
eq. 87 holds (Z and ∂L/∂X of the same sign for σ″ = sigmoid″, eqs. 88-89). The report counts,
per activation layer, the (sample, unit) pairs where σ″(Z)·∂L/∂X < 0.

That sign condition does not settle convexity on its own: the bilinear dependence of
z⁽ˡ⁾ = W⁽ˡ⁾x⁽ˡ⁻¹⁾ on both W⁽ˡ⁾ and the earlier layers adds cross-layer terms ∂ℓ/∂z⁽ˡ⁾ ⊗ ∂x⁽ˡ⁻¹⁾/∂θ
that are indefinite whenever ∂ℓ/∂z⁽ˡ⁾ ≠ 0. At θ = 0 of a tanh network, for instance, every
σ″ vanishes, the layer blocks are PSD, and yet the Hessian is [[0, B], [Bᵀ, 0]]: a saddle. The
report therefore also gives the smallest eigenvalue of every layer block and of the whole
Hessian (dense when small, Lanczos otherwise), the matching unit eigenvector (a
negative-curvature direction when λ_min < 0), the gradient norm and a verdict:

- ``"locally convex"``: λ_min ≥ −tol;
- ``"saddle"``: λ_min < −tol and ‖∇J‖ ≤ grad_tol (a stationary point with negative curvature);
- ``"indefinite"``: λ_min < −tol and the gradient is not small.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from secondorder._format import format_number
from secondorder._progress import ProgressArg, Reporter, reporting
from secondorder._validation import check_positive, check_positive_int
from secondorder.functional import trainable_parameters
from secondorder.losses import Loss

from .backprop import hessian, hessian_blocks
from .backward import sample_chunks, second_order_pass
from .operators import HessianOperator, SpectralDensity, lanczos_eigs, spectral_density
from .request import CurvatureRequest, prepare
from .structure import MLPStructure, analyse_mlp, theta_blocks

__all__ = [
    "ActivationCurvature",
    "LayerCurvature",
    "SaddleReport",
    "activation_curvature",
    "saddle_report",
]

VERDICTS = ("locally convex", "saddle", "indefinite")


@dataclass
class ActivationCurvature:
    """The sign of σ″(Z)·∂J/∂X (eq. 87) over the (sample, unit) pairs of one activation."""

    layer: int  # index of the Linear layer the activation follows
    name: str
    n_pairs: int
    fraction_negative: float
    most_negative: float  # min over pairs of σ″(Z)·∂J/∂X (with the 1/N of the mean)


@dataclass
class LayerCurvature:
    """Extreme eigenvalues of one layer's diagonal Hessian block."""

    layer: int
    name: str
    n_params: int
    lambda_min: float
    lambda_max: float
    method: str  # "dense" or "lanczos"


@dataclass
class SaddleReport:
    """What :func:`saddle_report` found; ``to_text()`` prints it (the figure is drawn by
    :func:`secondorder.report.diagnostics_figures.plot_saddle_report`)."""

    verdict: str
    lambda_min: float
    lambda_max: float
    direction: Tensor  # unit eigenvector of λ_min, length P
    grad_norm: float
    loss: float
    tol: float
    grad_tol: float
    method: str
    n_params: int
    activations: list[ActivationCurvature]
    layers: list[LayerCurvature]
    eigenvalues: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    _operator: HessianOperator | None = field(default=None, repr=False, compare=False)

    @property
    def negative_curvature(self) -> bool:
        return self.lambda_min < -self.tol

    def to_text(self) -> str:
        """A readable table of the report."""
        lines = [
            f"verdict: {self.verdict}",
            f"  loss J(θ)            {format_number(self.loss, 6)}",
            f"  ‖∇J(θ)‖              {self.grad_norm:.3e}   (small if ≤ {self.grad_tol:.1e})",
            f"  λ_min(H)             {self.lambda_min:.6e}   (negative if < −{self.tol:.1e})",
            f"  λ_max(H)             {self.lambda_max:.6e}",
            f"  parameters           {self.n_params}   (eigenvalues: {self.method})",
        ]
        if self.activations:
            lines += [
                "",
                "activation curvature σ″(Z)·∂J/∂X (eq. 87)",
                f"  {'layer':>5}  {'activation':<14}{'pairs':>10}{'negative':>11}"
                f"{'most negative':>16}",
            ]
            for a in self.activations:
                lines.append(
                    f"  {a.layer:>5}  {a.name:<14}{a.n_pairs:>10}{a.fraction_negative:>10.1%}"
                    f"{a.most_negative:>16.3e}"
                )
        if self.layers:
            lines += [
                "",
                "layer blocks",
                f"  {'layer':>5}  {'name':<14}{'params':>8}{'λ_min':>14}{'λ_max':>14}  method",
            ]
            for b in self.layers:
                lines.append(
                    f"  {b.layer:>5}  {b.name[:14]:<14}{b.n_params:>8}{b.lambda_min:>14.4e}"
                    f"{b.lambda_max:>14.4e}  {b.method}"
                )
        if self.notes:
            lines += ["", *[f"note: {n}" for n in self.notes]]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def spectral_density(self, n_probes: int = 8, n_steps: int = 60) -> SpectralDensity:
        """An SLQ density of the Hessian spectrum (needs the operator kept by the report)."""
        if self._operator is None:
            raise ValueError("this report holds no Hessian operator")
        return spectral_density(self._operator, n_probes=n_probes, n_steps=n_steps)


def _load_theta(model: nn.Module, theta) -> nn.Module:
    params = trainable_parameters(model)
    P = sum(p.numel() for p in params)
    theta = torch.as_tensor(theta)
    if theta.ndim != 1 or theta.numel() != P:
        raise ValueError(
            f"theta must be a flat vector of the model's {P} parameters, got shape "
            f"{tuple(theta.shape)}"
        )
    model = copy.deepcopy(model)
    theta = theta.to(dtype=params[0].dtype, device=params[0].device)
    sizes = [q.numel() for q in params]
    with torch.no_grad():
        for p, t in zip(trainable_parameters(model), torch.split(theta, sizes)):
            p.copy_(t.view_as(p))
    return model


def saddle_report(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    loss: str | Loss = "cross_entropy",
    l2: float = 0.0,
    theta: Tensor | None = None,
    *,
    tol: float | None = None,
    grad_tol: float | None = None,
    dense_limit: int = 3000,
    max_iter: int | None = None,
    seed: int | None = 0,
    progress: ProgressArg = False,
) -> SaddleReport:
    """Convexity / saddle diagnosis of J(θ) = mean loss + (l2/2)·‖W‖² at θ (see module doc).

    ``theta`` (flat, ordered as ``model.parameters()``) defaults to the model's parameters;
    the model itself is never modified. Eigenvalues come from the dense Hessian when P ≤
    ``dense_limit`` (and likewise per layer block; 0: never dense), else from Lanczos
    (``max_iter`` steps at most). ``tol`` defaults to √ε·max(1, |λ|_max) and ``grad_tol`` to
    10·√ε, with ε the machine epsilon of the model's dtype. ``progress`` (True: a line on
    stderr; or a callable taking a ``ProgressEvent``) reports the samples and Lanczos steps.
    """
    check_positive_int("dense_limit", dense_limit, allow_zero=True)
    with reporting(progress, "saddle report") as rep:
        return _saddle_report(
            model, X, y, loss, l2, theta, tol, grad_tol, dense_limit, max_iter, seed, rep
        )


def _saddle_report(
    model, X, y, loss, l2, theta, tol, grad_tol, dense_limit, max_iter, seed, rep: Reporter
) -> SaddleReport:
    if theta is not None:
        model = _load_theta(model, theta)
    problem = prepare(model, X, y, loss, l2)
    eps = torch.finfo(problem.dtype).eps
    notes: list[str] = []
    struct, reason = analyse_mlp(model)
    activations: list[ActivationCurvature] = []
    if struct is not None:
        rep.update(0, problem.n_samples, "σ″ signs, samples")
        activations = _activation_curvature(problem, struct)
    else:
        notes.append(f"no σ″ statistics and autodiff curvature: {reason}")
    op = HessianOperator(model, problem.X, problem.y, problem.loss, l2)
    value, grad = op.objective.value_and_grad(op.theta)
    with warnings.catch_warnings(), _counting_products(op, rep):
        warnings.simplefilter("ignore")
        spectrum = _extreme_eigenpairs(problem, op, dense_limit, max_iter, seed, rep)
        layers = _layer_curvature(problem, struct, op, spectrum.H, dense_limit, max_iter, seed, rep)
    lam_min, lam_max = spectrum.lambda_min, spectrum.lambda_max
    scale = max(1.0, abs(lam_min), abs(lam_max))
    tol = math.sqrt(eps) * scale if tol is None else check_positive("tol", tol)
    grad_tol = 10 * math.sqrt(eps) if grad_tol is None else check_positive("grad_tol", grad_tol)
    gnorm = float(grad.double().norm())
    if lam_min >= -tol:
        verdict = "locally convex"
    elif gnorm <= grad_tol:
        verdict = "saddle"
    else:
        verdict = "indefinite"
    negative_sigma = any(a.fraction_negative > 0 for a in activations)
    if verdict != "locally convex" and struct is not None and not negative_sigma:
        notes.append(
            "every σ″(Z)·∂J/∂X ≥ 0 (eq. 87 holds), yet the Hessian is indefinite: the "
            "negative curvature comes from the cross-layer bilinear terms"
        )
    return SaddleReport(
        verdict=verdict,
        lambda_min=lam_min,
        lambda_max=lam_max,
        direction=spectrum.direction.to(problem.dtype),
        grad_norm=gnorm,
        loss=float(value),
        tol=float(tol),
        grad_tol=float(grad_tol),
        method=spectrum.method,
        n_params=op.shape[0],
        activations=activations,
        layers=layers,
        eigenvalues=spectrum.eigenvalues,
        notes=notes,
        _operator=op,
    )


def activation_curvature(
    model: nn.Module, X: Tensor, y: Tensor, loss: str | Loss = "cross_entropy", theta=None
) -> list[ActivationCurvature]:
    """Only the σ″(Z)·∂J/∂X sign statistics (eq. 87) of :func:`saddle_report`, per activation
    layer, at ``theta`` (default: the model's parameters): no eigenvalues, one pass over the
    samples. The L2 term does not enter ∂J/∂X, so it is not asked for."""
    struct, reason = analyse_mlp(model)
    if struct is None:
        raise ValueError(f"model: σ″ statistics need a sequential MLP: {reason}")
    if theta is not None:
        model = _load_theta(model, theta)
        struct, _ = analyse_mlp(model)
    return _activation_curvature(prepare(model, X, y, loss, 0.0), struct)


def _activation_curvature(
    problem: CurvatureRequest, struct: MLPStructure
) -> list[ActivationCurvature]:
    """Per activation layer, the sign statistics of σ″(Z)·∂J/∂X (eq. 87) over all samples."""
    counts = [[0, 0, math.inf] for _ in struct.layers]
    for Xc, yc in sample_chunks(problem, struct, None):
        ps = second_order_pass(struct, Xc, yc, problem.loss, 1.0 / problem.n_samples, None)
        for c, r in zip(counts, ps.resid):
            if r is not None:
                c[0] += int((r < 0).sum())
                c[1] += r.numel()
                c[2] = min(c[2], float(r.min()))
    out: list[ActivationCurvature] = []
    for l, (layer, c) in enumerate(zip(struct.layers, counts)):
        if layer.activation is None:
            continue
        n_pairs = problem.n_samples * layer.n_out
        frac = c[0] / n_pairs if n_pairs else 0.0
        most = c[2] if c[1] else 0.0
        out.append(ActivationCurvature(l, layer.activation_name, n_pairs, frac, most))
    return out


@dataclass
class _Spectrum:
    """The extreme eigenpairs of the whole Hessian (and the dense Hessian when formed)."""

    lambda_min: float
    lambda_max: float
    direction: Tensor
    method: str
    H: Tensor | None = None
    eigenvalues: np.ndarray | None = None


def _extreme_eigenpairs(
    problem: CurvatureRequest, op: HessianOperator, dense_limit: int, max_iter, seed, rep
) -> _Spectrum:
    """λ_min, λ_max and the unit eigenvector of λ_min: dense when P ≤ dense_limit, else by
    Lanczos on the operator."""
    n = op.shape[0]
    rep.update(0, None if n <= dense_limit else _steps(n, max_iter), _stage("", n, dense_limit))
    if n <= dense_limit:
        H = hessian(problem.model, problem.X, problem.y, problem.loss, problem.l2).double()
        evals, evecs = torch.linalg.eigh(H)
        return _Spectrum(
            float(evals[0]),
            float(evals[-1]),
            evecs[:, 0].clone(),
            "dense",
            H,
            evals.cpu().numpy(),
        )
    vals, vecs = lanczos_eigs(op, k=1, which="both", max_iter=max_iter, seed=seed)
    return _Spectrum(float(vals[0]), float(vals[-1]), vecs[:, 0].clone(), "lanczos")


def _layer_curvature(
    problem: CurvatureRequest,
    struct: MLPStructure | None,
    op: HessianOperator,
    H: Tensor | None,
    dense_limit: int,
    max_iter,
    seed,
    rep: Reporter,
) -> list[LayerCurvature]:
    """The extreme eigenvalues of every layer's diagonal block: dense (from H when it was
    formed) when the block has at most dense_limit rows, else by Lanczos on the block."""
    p = problem
    layers: list[LayerCurvature] = []
    blocks = theta_blocks(p.model, struct)
    for i, (name, a, b) in enumerate(blocks):
        n = b - a
        where = f"block {i + 1}/{len(blocks)} ({name}), "
        rep.update(
            0, None if n <= dense_limit else _steps(n, max_iter), _stage(where, n, dense_limit)
        )
        if n <= dense_limit:
            block = (
                H[a:b, a:b]
                if H is not None
                else hessian_blocks(p.model, p.X, p.y, p.loss, p.l2, pairs=[(i, i)])[
                    (i, i)
                ].double()
            )
            ev = torch.linalg.eigvalsh(block)
            layers.append(LayerCurvature(i, name, n, float(ev[0]), float(ev[-1]), "dense"))
        else:
            sub = _BlockOperator(op, a, b)
            v, _ = lanczos_eigs(sub, k=1, which="both", max_iter=max_iter, seed=seed)
            layers.append(LayerCurvature(i, name, n, float(v[0]), float(v[-1]), "lanczos"))
    return layers


def _steps(n: int, max_iter: int | None) -> int:
    """The most Lanczos steps on an n×n operator (lanczos_eigs's default for k = 1)."""
    return min(n, 300) if max_iter is None else max_iter


def _stage(where: str, n: int, dense_limit: int) -> str:
    return f"{where}dense {n}×{n}" if n <= dense_limit else f"{where}Lanczos step"


@contextlib.contextmanager
def _counting_products(op: HessianOperator, rep: Reporter):
    """Report every Hessian-vector product of ``op`` (one per Lanczos step) to ``rep``; the
    count restarts at each stage."""
    if not rep.enabled:
        yield
        return
    inner, count = op.matvec, {"stage": None, "n": 0}

    def matvec(v):
        if count["stage"] != rep.stage:
            count["stage"], count["n"] = rep.stage, 0
        count["n"] += 1
        rep.update(count["n"])
        return inner(v)

    op.matvec = matvec
    try:
        yield
    finally:
        del op.matvec  # the operator kept in the report is the plain one


class _BlockOperator:
    """The diagonal block H[a:b, a:b] of a Hessian operator, as an operator on R^(b−a)."""

    def __init__(self, op: HessianOperator, a: int, b: int) -> None:
        self.op, self.a, self.b = op, a, b
        self.shape = (b - a, b - a)

    def matvec(self, v) -> np.ndarray:
        full = torch.zeros(self.op.shape[0], dtype=self.op.dtype, device=self.op.device)
        full[self.a : self.b] = torch.as_tensor(np.asarray(v)).to(full)
        return self.op.matvec(full)[self.a : self.b].detach().cpu().double().numpy()

"""Matrix-free curvature: linear operators, Lanczos eigenvalues, spectral densities, traces.

:class:`HessianOperator` and :class:`GGNOperator` wrap an objective's Hessian- and
Gauss–Newton-vector products (double backward, the gradient graph built once, see
:meth:`secondorder.objective.Objective.hvp_at`) as P×P symmetric operators with ``matvec``,
``matmat``, ``shape``, ``dtype`` and ``to_scipy()``.

The algorithms accept any symmetric operator: one of ours, a ``scipy.sparse.linalg``
``LinearOperator``, a dense torch tensor or numpy array, or any object with ``shape`` and
``matvec``. They work in float64 whatever the operator's dtype.

- :func:`lanczos_eigs` — extreme eigenpairs by Lanczos with full reorthogonalisation.
- :func:`spectral_density` — stochastic Lanczos quadrature (SLQ): Ritz nodes and weights from
  Rademacher probes, smoothed by a Gaussian into a density on a grid.
- :func:`hutchinson_trace` — Hutchinson's trace estimator with Rademacher probes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from secondorder._format import format_number, format_spec_value
from secondorder._validation import check_choice, check_positive, check_positive_int
from secondorder.lanczos import Lanczos
from secondorder.linalg import check_dense_fits
from secondorder.losses import Loss
from secondorder.objective import ModelObjective, Objective

__all__ = [
    "CurvatureOperator",
    "GGNOperator",
    "HessianOperator",
    "SpectralDensity",
    "TraceEstimate",
    "hutchinson_trace",
    "lanczos_eigs",
    "spectral_density",
]


class CurvatureOperator:
    """A symmetric P×P operator from a product v ↦ A v on flat torch vectors."""

    kind = "curvature"

    def __init__(
        self, product: Callable[[Tensor], Tensor], n: int, dtype: torch.dtype, device
    ) -> None:
        self._product = product
        self.shape = (int(n), int(n))
        self.dtype = dtype
        self.device = torch.device(device)
        self.n_products = 0

    def _check(self, v: Tensor, arg: str, ndim: int) -> Tensor:
        if not isinstance(v, Tensor):
            v = torch.as_tensor(v)
        if v.ndim != ndim or v.shape[0] != self.shape[0]:
            want = "(P,)" if ndim == 1 else "(P, k)"
            raise ValueError(
                f"{arg} must have shape {want} with P = {self.shape[0]}, got {tuple(v.shape)}"
            )
        return v.to(dtype=self.dtype, device=self.device)

    def matvec(self, v: Tensor) -> Tensor:
        """A v for a vector of length P."""
        v = self._check(v, "v", 1)
        self.n_products += 1
        return self._product(v)

    def matmat(self, V: Tensor) -> Tensor:
        """A V for a (P, k) matrix, one product per column."""
        V = self._check(V, "V", 2)
        out = torch.empty_like(V)
        for i in range(V.shape[1]):
            out[:, i] = self.matvec(V[:, i])
        return out

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if other.ndim == 1 else self.matmat(other)

    def to_dense(self, *, max_bytes: int | None = None) -> Tensor:
        """The dense matrix from P products with identity columns (refused when too large)."""
        n = self.shape[0]
        check_dense_fits(
            (n, n),
            self.dtype,
            f"the dense {self.kind} matrix",
            max_bytes=max_bytes,
            device=self.device,
        )
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        A = self.matmat(eye)
        return 0.5 * (A + A.T)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` with float64 numpy input and output."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x)
            flat = x.reshape(-1) if x.ndim == 2 and x.shape[1] == 1 else x
            if flat.ndim == 2:
                return mm(flat)
            v = torch.as_tensor(np.ascontiguousarray(flat, dtype=np.float64))
            out = self.matvec(v).detach().cpu().double().numpy()
            return out.reshape(x.shape)

        def mm(X: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float64))
            return self.matmat(V).detach().cpu().double().numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, dtype=np.float64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


def _objective_and_theta(model_or_objective, X, y, loss, l2, theta) -> tuple[Objective, Tensor]:
    if isinstance(model_or_objective, Objective):
        if X is not None or y is not None:
            raise ValueError(
                "X and y must be left out when an Objective is given (it holds its own data)"
            )
        obj = model_or_objective
        if theta is None:
            if not isinstance(obj, ModelObjective):
                raise ValueError(f"theta is required for a {type(obj).__name__}")
            theta = obj.initial_theta()
        return obj, obj.check_theta(theta)
    if isinstance(model_or_objective, nn.Module):
        if X is None or y is None:
            raise ValueError("X and y are required when a model is given")
        params = list(model_or_objective.parameters())
        dtype = params[0].dtype if params else None
        obj = ModelObjective(model_or_objective, loss, (X, y), l2=l2, dtype=dtype)
        theta = obj.initial_theta() if theta is None else obj.check_theta(theta)
        return obj, theta
    raise TypeError(
        "model_or_objective must be a torch.nn.Module or a secondorder Objective, got "
        f"{type(model_or_objective).__name__}"
    )


class _ObjectiveOperator(CurvatureOperator):
    """A product of the objective's (``_product`` names it), built once at θ."""

    _product = ""

    def __init__(
        self,
        model_or_objective,
        X: Tensor | None = None,
        y: Tensor | None = None,
        loss: str | Loss = "cross_entropy",
        l2: float = 0.0,
        *,
        theta: Tensor | None = None,
    ) -> None:
        obj, theta = _objective_and_theta(model_or_objective, X, y, loss, l2, theta)
        self.objective = obj
        self.theta = theta
        product = getattr(obj, self._product)(theta)
        super().__init__(product, obj.n_params, obj.dtype, obj.device)


class HessianOperator(_ObjectiveOperator):
    """v ↦ ∇²J(θ) v for a model (with X, y, loss, l2) or an :class:`Objective` (at ``theta``).

    From a model, J is the mean loss plus (l2/2)·‖W‖² over weight matrices, at the model's
    current parameters unless ``theta`` is given. Each product is one double-backward pass
    through a gradient graph built once here.
    """

    kind = "Hessian"
    _product = "hvp_at"


class GGNOperator(_ObjectiveOperator):
    """v ↦ G(θ) v, the Gauss–Newton matrix Σ_i w_i J_iᵀ H_{out,i} J_i (+ l2 on weights)."""

    kind = "Gauss-Newton"
    _product = "ggnvp_at"


# -- generic operator access --------------------------------------------------------------------


def _as_matvec(op) -> tuple[Callable[[Tensor], Tensor], int, torch.device]:
    """(float64 v ↦ A v, n, device) for our operators, tensors, arrays and scipy operators."""
    if isinstance(op, CurvatureOperator):
        dt = op.dtype
        return (lambda v: op.matvec(v.to(dt)).to(torch.float64)), op.shape[0], op.device
    if isinstance(op, Tensor):
        if op.ndim != 2 or op.shape[0] != op.shape[1]:
            raise ValueError(f"op must be a square matrix, got shape {tuple(op.shape)}")
        _check_symmetric(op)
        A = op
        return (lambda v: (A @ v.to(A.dtype)).to(torch.float64)), op.shape[0], op.device
    if isinstance(op, np.ndarray):
        return _as_matvec(torch.as_tensor(op))
    shape = getattr(op, "shape", None)
    if shape is None or not hasattr(op, "matvec") or len(shape) != 2 or shape[0] != shape[1]:
        raise TypeError(
            "op must be a square operator: a secondorder operator, a torch tensor, a numpy "
            f"array, or an object with shape (n, n) and matvec; got {type(op).__name__}"
        )

    def mv(v: Tensor) -> Tensor:
        out = op.matvec(v.detach().cpu().numpy())
        out = torch.as_tensor(np.asarray(out, dtype=np.float64)).reshape(-1)
        return out.to(v.device)

    return mv, int(shape[0]), torch.device("cpu")


def _symmetry_tolerance(dtype: torch.dtype) -> float:
    """The relative asymmetry above which an operator is taken as non-symmetric: eps^(1/3)
    (float64 6e-6, float32 5e-3), far above the rounding of a symmetric product."""
    return float(torch.finfo(dtype if dtype.is_floating_point else torch.float64).eps) ** (1 / 3)


def _check_symmetric(A: Tensor) -> None:
    """Refuse an explicit matrix with ‖A − Aᵀ‖_max > tol·‖A‖_max (one pass over A)."""
    scale = float(A.abs().max()) if A.numel() else 0.0
    gap = float((A - A.T).abs().max()) if A.numel() else 0.0
    if gap > _symmetry_tolerance(A.dtype) * max(scale, 1e-300):
        raise ValueError(
            f"op must be a symmetric matrix: max |A − Aᵀ| = {gap:.3g} with max |A| = "
            f"{scale:.3g}; Lanczos assumes A = Aᵀ (use torch.linalg.eigvals for a general "
            "matrix, or pass (A + A.T) / 2)"
        )


def _warn_if_asymmetric(lz: Lanczos, op, caller: str) -> None:
    """Warn when the Lanczos recurrence shows A ≠ Aᵀ (see :attr:`Lanczos.asymmetry`)."""
    dtype = getattr(op, "dtype", torch.float64)
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float64
    if lz.asymmetry > _symmetry_tolerance(dtype):
        import warnings

        warnings.warn(
            f"{caller}: the operator is not symmetric (|q_{{i-1}}ᵀ A q_i − β_{{i-1}}| up to "
            f"{lz.asymmetry:.3g} of ‖T‖): Lanczos assumes A = Aᵀ, so these eigenvalues are "
            "not A's",
            RuntimeWarning,
            stacklevel=3,
        )


WHICH = ("SA", "LA", "both")


def lanczos_eigs(
    op,
    k: int = 1,
    which: str = "SA",
    *,
    tol: float = 1e-10,
    max_iter: int | None = None,
    seed: int | None = 0,
    v0: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    ``which``: ``"SA"`` the k smallest (algebraic), ``"LA"`` the k largest, ``"both"`` the k
    smallest and the k largest. Returns ``(eigenvalues, eigenvectors)``: float64 tensors of
    shape (m,) ascending and (n, m) with unit columns. It stops when every wanted Ritz pair has
    a residual ‖A y − θ y‖ = |β_m s_m| ≤ tol·max(1, ‖T‖) or after ``max_iter`` steps (default
    min(n, max(300, 20k))), warning then. Memory: n·max_iter float64 numbers. A single Lanczos
    vector resolves a repeated eigenvalue once; ask for a larger k to see its multiplicity.
    """
    check_positive_int("k", k)
    check_choice("which", which, WHICH)
    check_positive("tol", tol)
    mv, n, device = _as_matvec(op)
    if max_iter is None:
        max_iter = min(n, max(300, 20 * k))
    check_positive_int("max_iter", max_iter)
    want = k if which != "both" else 2 * k
    if want > n:
        raise ValueError(f"k={k} asks for {want} eigenvalues of a {n}x{n} operator")
    g = torch.Generator().manual_seed(0 if seed is None else int(seed))
    q0 = torch.randn(n, dtype=torch.float64, generator=g) if v0 is None else v0.double().cpu()
    if q0.numel() != n:
        raise ValueError(f"v0 must have {n} entries, got {q0.numel()}")
    q0 = q0.to(device)

    def pick(theta: np.ndarray) -> np.ndarray:
        m = len(theta)
        if which == "SA":
            return np.arange(min(k, m))
        if which == "LA":
            return np.arange(max(0, m - k), m)
        if 2 * k >= m:
            return np.arange(m)
        return np.concatenate([np.arange(k), np.arange(m - k, m)])

    state: dict[str, bool] = {"converged": False}

    def check(lz: Lanczos) -> bool:
        m = lz.m
        if m < min(want, n) or (m % 5 and m < n):
            return m >= n
        theta, S = lz.ritz()
        idx = pick(theta)
        res = np.abs(lz.residual * S[-1, idx])
        scale = max(1.0, float(np.abs(theta).max()))
        ok = bool(np.all(res <= tol * scale)) and len(idx) >= min(want, n)
        state["converged"] = ok
        return ok or m >= n

    lz = Lanczos(mv, q0, max_iter, generator=g).run(check)
    _warn_if_asymmetric(lz, op, "lanczos_eigs")
    theta, S = lz.ritz()
    Q = lz.basis
    if not state["converged"] and lz.m < n:
        import warnings

        warnings.warn(
            "lanczos_eigs: the wanted Ritz pairs did not reach "
            f"tol={format_spec_value(tol)} in {lz.m} "
            "steps; raise max_iter",
            stacklevel=2,
        )
    idx = pick(theta)
    vals = torch.as_tensor(theta[idx])
    vecs = Q @ torch.as_tensor(S[:, idx], device=Q.device)
    vecs = vecs / vecs.norm(dim=0, keepdim=True)
    return vals, vecs


@dataclass
class SpectralDensity:
    """An SLQ spectral density: ``density`` on ``grid`` (integrates to ≈ 1), from Ritz
    ``nodes`` with quadrature ``weights`` (all probes pooled, weights summing to 1)."""

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    n_probes: int

    def mean(self) -> float:
        """Σ w θ: an estimate of trace/P."""
        return float(np.dot(self.weights, self.nodes))


def spectral_density(
    op,
    n_probes: int = 10,
    n_steps: int = 80,
    grid: int | np.ndarray = 1000,
    *,
    sigma: float | None = None,
    seed: int | None = 0,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature estimate of the eigenvalue density of a symmetric operator.

    Each Rademacher probe v (normalised) runs ``n_steps`` Lanczos steps; the eigenpairs
    (θ_j, s_j) of the tridiagonal matrix give nodes θ_j and weights s_{1j}², so
    vᵀ f(A) v ≈ Σ_j s_{1j}² f(θ_j) for every f. The density is the pooled nodes smoothed by a
    Gaussian of width ``sigma`` (default 1% of the node range), evaluated on ``grid`` (a number
    of points spanning the nodes ± 5σ, or an array of points).
    """
    check_positive_int("n_probes", n_probes)
    check_positive_int("n_steps", n_steps)
    mv, n, device = _as_matvec(op)
    g = torch.Generator().manual_seed(0 if seed is None else int(seed))
    nodes, weights = [], []
    for _ in range(n_probes):
        v = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.float64).to(device)
        lz = Lanczos(mv, v, n_steps, generator=g).run()
        _warn_if_asymmetric(lz, op, "spectral_density")
        theta, S = lz.ritz()
        nodes.append(theta)
        weights.append(S[0] ** 2 / n_probes)
    nodes_a = np.concatenate(nodes)
    weights_a = np.concatenate(weights)
    lo, hi = float(nodes_a.min()), float(nodes_a.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else 0.01 * max(1.0, abs(hi))
    check_positive("sigma", sigma)
    if isinstance(grid, (int, np.integer)):
        check_positive_int("grid", int(grid))
        grid_a = np.linspace(lo - 5 * sigma, hi + 5 * sigma, int(grid))
    else:
        grid_a = np.asarray(grid, dtype=np.float64).reshape(-1)
    density = np.zeros_like(grid_a)
    c = 1.0 / (sigma * math.sqrt(2 * math.pi))
    for start in range(0, len(nodes_a), 256):
        th = nodes_a[start : start + 256]
        w = weights_a[start : start + 256]
        density += (w[None, :] * np.exp(-0.5 * ((grid_a[:, None] - th[None, :]) / sigma) ** 2)).sum(
            1
        ) * c
    return SpectralDensity(grid_a, density, nodes_a, weights_a, float(sigma), n_probes)


class TraceEstimate(NamedTuple):
    """A Hutchinson trace estimate with its standard error and the per-probe samples."""

    estimate: float
    stderr: float
    samples: np.ndarray

    def __repr__(self) -> str:
        return (
            f"TraceEstimate(estimate={format_number(self.estimate, 6)}, "
            f"stderr={format_number(self.stderr, 3)}, "
            f"n_probes={len(self.samples)})"
        )


def hutchinson_trace(op, n_probes: int = 100, seed: int | None = 0) -> TraceEstimate:
    """tr A ≈ mean of zᵀA z over Rademacher probes z; the standard error is std/√n_probes."""
    check_positive_int("n_probes", n_probes)
    mv, n, device = _as_matvec(op)
    g = torch.Generator().manual_seed(0 if seed is None else int(seed))
    samples = np.empty(n_probes)
    for i in range(n_probes):
        z = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.float64).to(device)
        samples[i] = float(torch.dot(z, mv(z)))
    est = float(samples.mean())
    se = float(samples.std(ddof=1) / math.sqrt(n_probes)) if n_probes > 1 else float("inf")
    return TraceEstimate(est, se, samples)

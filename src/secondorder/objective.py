"""The problem a solver sees: a scalar function of one flat parameter vector θ.

An :class:`Objective` answers ``value``, ``grad``, ``value_and_grad``, ``hvp``, ``ggnvp`` and a
small dense ``hessian``, and counts its evaluations. Two kinds exist:

- :class:`FunctionObjective` wraps a plain callable θ ↦ scalar tensor (Rosenbrock, eq. 6; a
  quadratic; anything autograd can differentiate twice).
- :class:`ModelObjective` is the training objective of a network: the sampler's weighted mean of
  per-sample losses (eq. 28) plus an L2 term,

      J(θ) = Σ_i w_i ℓ(f(x_i; θ), y_i) + (c/2)·‖W‖²,

  with weights w_i from the sampler (uniform 1/m for the full batch) and c = λ under the
  ``"plain"`` convention (λ/2·‖W‖² added to the mean loss) or c = λ/m_reg under the
  ``"per-sample"`` convention (λ/(2m)·‖W‖², m_reg = ``l2_m``, by default the number of training
  samples). ‖W‖² covers weight matrices only (tensors with two or more dimensions) unless
  ``regularize_bias=True``.

The only sum over samples lives in :meth:`ModelObjective._weighted_loss`; a data-parallel
objective (:mod:`secondorder.distributed`) sums each result of it over the processes. The
function changes only when the sampler says so (see :mod:`secondorder.sampling`): ask
``begin_iteration(k)`` at the top of each iteration.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from secondorder._format import format_spec_value
from secondorder._validation import (
    check_choice,
    check_device,
    check_finite,
    check_positive,
    check_same_length,
    check_shape,
)
from secondorder.functional import FlatModel, check_model_output
from secondorder.linalg import MemoryError_, check_dense_fits
from secondorder.losses import Loss, get_loss
from secondorder.models import ReLU
from secondorder.objective_base import EvalCounts, Objective
from secondorder.sampling import FullBatch, Sampler

__all__ = [
    "EvalCounts",
    "FunctionObjective",
    "MemoryError_",
    "ModelObjective",
    "Objective",
    "check_dense_fits",
    "quadratic",
    "rosenbrock",
    "strict_saddle",
    "strict_saddle_minimum",
]


class FunctionObjective(Objective):
    """An objective from a plain callable θ ↦ scalar tensor, differentiated by autograd.

    ``grad_fn`` and ``hvp_fn`` (optional) supply closed forms instead of autograd.
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        n_params: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        grad_fn: Callable[[Tensor], Tensor] | None = None,
        hvp_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if isinstance(n_params, bool) or not isinstance(n_params, int) or n_params < 1:
            raise ValueError(f"n_params must be a positive integer, got {n_params!r}")
        self.fn = fn
        self.n_params = n_params
        self.dtype = dtype or torch.get_default_dtype()
        self.device = check_device("device", device) or torch.device("cpu")
        self.grad_fn = grad_fn
        self.hvp_fn = hvp_fn
        self.name = name or getattr(fn, "__name__", "function")

    def _call(self, theta: Tensor) -> Tensor:
        out = self.fn(theta)
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise TypeError(
                f"the objective function must return a scalar tensor, got "
                f"{type(out).__name__}{'' if not isinstance(out, Tensor) else tuple(out.shape)}"
            )
        return out.reshape(())

    def value(self, theta: Tensor) -> Tensor:
        theta = self.check_theta(theta)
        self.counts.f += 1
        with torch.no_grad():
            return self._call(theta).detach()

    def value_and_grad(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        theta = self.check_theta(theta)
        self.counts.f += 1
        self.counts.g += 1
        if self.grad_fn is not None:
            with torch.no_grad():
                g = self.grad_fn(theta)
                check_shape("grad_fn", g, theta.shape)
                return self._call(theta).detach(), g.detach()
        t = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            f = self._call(t)
            g = None
            if f.requires_grad:  # a constant (e.g. a NaN returned early) has no graph
                (g,) = torch.autograd.grad(f, t, allow_unused=True)
        if g is None:
            g = torch.zeros_like(t)
        return f.detach(), g.detach()

    def hvp_at(self, theta: Tensor) -> Callable[[Tensor], Tensor]:
        theta = self.check_theta(theta)
        if self.hvp_fn is not None:

            def closed_form(v: Tensor) -> Tensor:
                self.counts.hv += 1
                hv = self.hvp_fn(theta, v)
                check_shape("hvp_fn", hv, v.shape)
                return hv.detach()

            return closed_form
        t = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            f = self._call(t)
            if f.requires_grad:
                (g,) = torch.autograd.grad(f, t, create_graph=True, allow_unused=True)
            else:
                g = None
        if g is None:
            g = torch.zeros_like(t)

        def product(v: Tensor) -> Tensor:
            self.counts.hv += 1
            if not g.requires_grad:  # g does not depend on θ: a linear function
                return torch.zeros_like(v)
            (hv,) = torch.autograd.grad(g @ v, t, retain_graph=True, allow_unused=True)
            return torch.zeros_like(v) if hv is None else hv.detach()

        return product


def rosenbrock(a: float = 1.0, b: float = 100.0) -> Callable[[Tensor], Tensor]:
    """Rosenbrock's function (eq. 6), chained over consecutive pairs for n > 2:
    Σ_i (a − x_i)² + b (x_{i+1} − x_i²)²; minimum 0 at (a, a², …) — (1, 1) for a = 1."""

    def f(x: Tensor) -> Tensor:
        return ((a - x[:-1]) ** 2 + b * (x[1:] - x[:-1] ** 2) ** 2).sum()

    f.__name__ = f"rosenbrock(a={format_spec_value(a)}, b={format_spec_value(b)})"
    return f


def strict_saddle(
    eigenvalues: list[float] | tuple[float, ...], quartic: float = 1.0, seed: int = 0
) -> Callable[[Tensor], Tensor]:
    """A quartic with a strict saddle at the origin: with z = Qᵀx for a random orthogonal Q
    (drawn from ``seed``) and d = ``eigenvalues``,

        f(x) = Σ_i ½ d_i z_i² + ¼ q z_i⁴,   q = ``quartic`` > 0.

    ∇²f(0) = Q diag(d) Qᵀ, so x = 0 is a strict saddle when some d_i < 0 (a minimum when none
    is). Each coordinate is minimised separately: z_i = 0 where d_i ≥ 0, z_i = ±√(−d_i/q)
    where d_i < 0, so the 2^(#negative) minimisers share f* = −Σ_{d_i<0} d_i²/(4q)
    (:func:`strict_saddle_minimum`). The quartic keeps f bounded below."""
    d = torch.tensor([float(v) for v in eigenvalues], dtype=torch.float64)
    if d.numel() < 1 or not bool(torch.isfinite(d).all()):
        raise ValueError(
            f"eigenvalues must be a non-empty list of finite numbers, got {eigenvalues}"
        )
    check_positive("quartic", quartic)
    gen = torch.Generator().manual_seed(int(seed))
    # QR of a Gaussian matrix, signs fixed by R's diagonal: a Haar-distributed rotation
    q_mat, r = torch.linalg.qr(
        torch.randn(d.numel(), d.numel(), generator=gen, dtype=torch.float64)
    )
    q_mat = q_mat * torch.sign(torch.diagonal(r))

    def f(x: Tensor) -> Tensor:
        z = x @ q_mat.to(x)
        return (0.5 * d.to(x) * z * z + 0.25 * quartic * z**4).sum()

    f.__name__ = f"strict_saddle(n={d.numel()}, negative={int((d < 0).sum())})"
    f.rotation = q_mat  # type: ignore[attr-defined]  # the Q of z = Qᵀx, for tests and plots
    return f


def strict_saddle_minimum(
    eigenvalues: list[float] | tuple[float, ...], quartic: float = 1.0
) -> float:
    """f* of :func:`strict_saddle`: −Σ_{d_i<0} d_i²/(4q)."""
    return -sum(float(v) ** 2 for v in eigenvalues if v < 0) / (4.0 * quartic)


def quadratic(A: Tensor, b: Tensor | None = None, c: float = 0.0) -> Callable[[Tensor], Tensor]:
    """q(x) = ½ xᵀA x − bᵀx + c (A symmetrised); minimiser A⁻¹b when A is positive definite."""
    A = 0.5 * (A + A.T)
    b = torch.zeros(A.shape[0], dtype=A.dtype) if b is None else b

    def f(x: Tensor) -> Tensor:
        return 0.5 * x @ (A.to(x) @ x) - b.to(x) @ x + c

    f.__name__ = "quadratic"
    return f


L2_CONVENTIONS = ("plain", "per-sample")


class ModelObjective(Objective):
    """The training objective of a network over a dataset, with a sampler (see module doc).

    ``data`` is a :class:`secondorder.data.Dataset` or a pair ``(X, y)``. The model's trainable
    parameters are read once as the flat θ₀ (``initial_theta()``) in the order of
    ``model.parameters()``, as ``torch.optim`` sees them: a parameter with
    ``requires_grad=False`` is no part of θ and keeps its value, and a parameter shared by
    several modules has one entry (its gradient sums its uses). Evaluations never modify the
    model; only ``load_into_model`` writes θ into it. ``curvature_sampler`` (optional) chooses
    a separate subsample for Hessian and Gauss–Newton products.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | Loss,
        data,
        *,
        l2: float = 0.0,
        l2_convention: str = "plain",
        l2_m: int | None = None,
        regularize_bias: bool = False,
        sampler: Sampler | None = None,
        curvature_sampler: Sampler | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.loss = get_loss(loss)
        self.l2 = check_positive("l2", l2, allow_zero=True)
        check_choice("l2_convention", l2_convention, L2_CONVENTIONS)
        X, y = _unpack_data(data)
        flat = FlatModel(model, "optimise", device)
        self.dtype = dtype or (X.dtype if torch.is_floating_point(X) else flat.params[0].dtype)
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {self.dtype}")
        self.device = flat.device
        X = X.to(dtype=self.dtype, device=self.device)
        if X.ndim < 2 or X.shape[0] == 0:
            raise ValueError(
                f"X must have shape (m, n_features, ...) with m >= 1, got {tuple(X.shape)}"
            )
        check_finite("X", X)
        check_same_length(X, y)
        self.model, self.flat = model, flat
        self.names, self.shapes, self.numels = flat.names, flat.shapes, flat.numels
        self.n_params, self.buffers = flat.n_params, flat.buffers
        self._theta0 = flat.theta0(self.dtype, self.device)
        with torch.no_grad():
            out = check_model_output(model, self.forward(self._theta0, X[:1]), 1)
        self.y = self.loss.prepare_targets(y, out.shape[1], self.dtype, self.device)
        self.X = X
        self.m = X.shape[0]
        self.sampler = sampler or FullBatch(self.m)
        self.curvature_sampler = curvature_sampler
        for arg, s in (("sampler", self.sampler), ("curvature_sampler", curvature_sampler)):
            if s is not None and s.m != self.m:
                raise ValueError(f"{arg} was built for m={s.m} samples but the data has {self.m}")
        self.l2_convention = l2_convention
        self.l2_m = self.m if l2_m is None else int(l2_m)
        if self.l2_m < 1:
            raise ValueError(f"l2_m must be a positive integer, got {l2_m}")
        self.regularize_bias = bool(regularize_bias)
        self.l2_mask = flat.l2_mask(self.dtype, self.device, bias=self.regularize_bias)
        self._cache: dict[tuple[str, int], tuple] = {}

    # -- parameters -------------------------------------------------------------------------------
    def initial_theta(self) -> Tensor:
        """The model's parameters as one flat vector (a copy)."""
        return self._theta0.clone()

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Views of θ shaped like the model's parameters, by name."""
        return self.flat.unflatten(theta)

    def load_into_model(self, theta: Tensor) -> nn.Module:
        """Copy θ into the model's trainable parameters (e.g. after training) and return it."""
        theta = self.check_theta(theta)
        with torch.no_grad():
            for p, t in zip(self.flat.trainable, torch.split(theta, self.numels)):
                p.copy_(t.view_as(p))
        return self.model

    def forward(self, theta: Tensor, X: Tensor) -> Tensor:
        """The network's outputs f(X; θ), computed functionally (the model is not modified)."""
        return self.flat.forward(theta, X)

    @property
    def l2_coefficient(self) -> float:
        """c in (c/2)·‖W‖²: λ ("plain") or λ/m_reg ("per-sample")."""
        return self.l2 if self.l2_convention == "plain" else self.l2 / self.l2_m

    # -- sampling ---------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.sampler.version(self._iteration, self._evaluations)

    @property
    def stochastic(self) -> str:
        return self.sampler.changes

    @property
    def n_samples(self) -> int:
        return self.m

    @property
    def batch_size(self) -> int:
        return int(self.samples("value", whole=True)[0].shape[0])

    def samples(
        self, which: str = "value", *, max_samples: int | None = None, whole: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(X, y, w) of the current function: the sampler's samples and eq.-28 weights.

        ``which`` is ``"value"`` (value and gradient) or ``"curvature"`` (Hessian and
        Gauss–Newton products; the same as ``"value"`` without a ``curvature_sampler``).
        ``max_samples=n`` keeps the first n of them, weights renormalised to sum to one (a
        cheaper estimate on a random subset: the samplers' batches are random). In a
        data-parallel run (:mod:`secondorder.distributed`) this process's share of those
        samples comes back, with their weights in the whole batch, unless ``whole=True``.
        """
        X, y, w = self._samples(which)
        if max_samples is not None and max_samples < len(X):
            X, y, w = X[:max_samples], y[:max_samples], w[:max_samples]
            w = w / w.sum()
        if self.data_parallel is None or whole:
            return X, y, w
        return self.data_parallel.take(X, y, w)

    def _samples(self, which: str) -> tuple[Tensor, Tensor, Tensor]:
        if which == "curvature" and self.curvature_sampler is None:
            which = "value"
        sampler = self.curvature_sampler if which == "curvature" else self.sampler
        version = sampler.version(self._iteration, self._evaluations)
        key = (which, version)
        if key not in self._cache:
            idx, w = sampler.weights(version).to_torch(self.dtype, self.device)
            X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
            self._cache = {k: v for k, v in self._cache.items() if k[0] != which}
            self._cache[key] = (X, y, w)
        return self._cache[key]

    # -- the one sum over samples ---------------------------------------------------------------
    def _weighted_loss(self, theta: Tensor, X: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """Σ_i w_i ℓ(f(x_i; θ), y_i): every sum over samples goes through here."""
        return w @ self.loss.per_sample(self.forward(theta, X), y)

    def _regulariser(self, theta: Tensor) -> Tensor:
        c = self.l2_coefficient
        if c == 0.0:
            return theta.new_zeros(())
        return 0.5 * c * (self.l2_mask * theta * theta).sum()

    # -- evaluations -------------------------------------------------------------------------------
    def value(self, theta: Tensor) -> Tensor:
        theta = self.check_theta(theta)
        X, y, w = self.samples("value")
        self.counts.f += 1
        self._count_evaluation()
        with torch.no_grad():
            (f,) = self.sum_over_shards(self._weighted_loss(theta, X, y, w))
            return f + self._regulariser(theta)

    def value_and_grad(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        theta = self.check_theta(theta)
        X, y, w = self.samples("value")
        self.counts.f += 1
        self.counts.g += 1
        self._count_evaluation()
        t = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            f = self._weighted_loss(t, X, y, w)
            (g,) = torch.autograd.grad(f, t)
        f, g = self.sum_over_shards(f.detach(), g)  # one collective when data-parallel
        c = self.l2_coefficient
        if c:
            f = f + self._regulariser(theta)
            g = g + c * self.l2_mask * theta
        return f.detach(), g.detach()

    def hvp_at(self, theta: Tensor) -> Callable[[Tensor], Tensor]:
        theta = self.check_theta(theta)
        X, y, w = self.samples("curvature")
        t = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            f = self._weighted_loss(t, X, y, w)
            (g,) = torch.autograd.grad(f, t, create_graph=True)
        c = self.l2_coefficient
        mask = self.l2_mask

        def product(v: Tensor) -> Tensor:
            self.counts.hv += 1
            if g.requires_grad:
                # differentiate the scalar gᵀv: cheaper to set up than a vector grad_outputs
                (hv,) = torch.autograd.grad(g @ v, t, retain_graph=True, allow_unused=True)
                hv = torch.zeros_like(v) if hv is None else hv.detach()
            else:
                hv = torch.zeros_like(v)
            (hv,) = self.sum_over_shards(hv)
            return hv + c * mask * v if c else hv

        return product

    def ggnvp_at(
        self, theta: Tensor, *, max_samples: int | None = None
    ) -> Callable[[Tensor], Tensor]:
        """v ↦ (Σ_i w_i J_iᵀ H_{z,i} J_i + c·diag(mask)) v, with J_i = ∂f(x_i)/∂θ, over the
        curvature samples (the first ``max_samples`` of them, see :meth:`samples`).

        Jv comes from differentiating the vector-Jacobian product u ↦ Jᵀu with respect to u
        (the graph is built once), H_z v from the loss's closed form, Jᵀ(·) from one backward.
        """
        theta = self.check_theta(theta)
        X, y, w = self.samples("curvature", max_samples=max_samples)
        t = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.forward(t, X)
            u = torch.zeros_like(out, requires_grad=True)
            (jtu,) = torch.autograd.grad(out, t, u, create_graph=True)
        out_d = out.detach()
        c = self.l2_coefficient
        mask = self.l2_mask

        def product(v: Tensor) -> Tensor:
            self.counts.ggnv += 1
            (jv,) = torch.autograd.grad(jtu @ v, u, retain_graph=True)
            hjv = w[:, None] * self.loss.hessian_output_matvec(out_d, y, jv)
            (gv,) = torch.autograd.grad((out * hjv).sum(), t, retain_graph=True)
            (gv,) = self.sum_over_shards(gv)
            return gv + c * mask * v if c else gv

        return product

    # -- non-smooth points ----------------------------------------------------------------------
    @contextlib.contextmanager
    def frozen_kinks(self, theta: Tensor):
        """Within this context, every ReLU (or LeakyReLU) keeps the on/off pattern it has at θ
        on the current samples: J becomes the smooth extension of the piece that contains θ.

        J and its derivatives agree with this extension at θ (and wherever the pattern is the
        same), so derivative tests use it to measure Taylor orders without the O(ε) remainders
        of the kinks a step of size ε may cross.
        """
        modules = [m for m in self.model.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU, ReLU))]
        masks: dict[int, Tensor] = {}
        recording = True

        def hook(module, inputs, output):
            z = inputs[0]
            key = id(module)
            if recording:
                masks[key] = (z > 0).detach()
                return None
            slope = module.negative_slope if isinstance(module, nn.LeakyReLU) else 0.0
            mask = masks[key]
            if mask.shape != z.shape:
                raise RuntimeError("frozen_kinks: the samples changed inside the context")
            return z * torch.where(mask, 1.0, slope).to(z.dtype)

        handles = [m.register_forward_hook(hook) for m in modules]
        try:
            if modules:
                X, _, _ = self.samples("value")
                with torch.no_grad():
                    self.forward(self.check_theta(theta), X)
            recording = False
            yield self
        finally:
            for h in handles:
                h.remove()

    # -- metrics ---------------------------------------------------------------------------
    def predict(self, theta: Tensor, X: Tensor) -> Tensor:
        """Predicted labels (or values) of the model with parameters θ."""
        theta = self.check_theta(theta)
        with torch.no_grad():
            return self.loss.predict(self.forward(theta, X.to(self.dtype).to(self.device)))

    def accuracy(self, theta: Tensor, X: Tensor | None = None, y: Tensor | None = None) -> float:
        """Eq. 30: the fraction of samples whose predicted class equals the label
        (on the training data when X, y are not given); NaN when the outputs are not
        finite (a diverged θ, or NaN in X), never an accuracy of arbitrary predictions."""
        if not self.loss.classification:
            raise ValueError(f"accuracy needs a classification loss, not loss={self.loss.name!r}")
        X = self.X if X is None else X
        y = self.y if y is None else y
        out = self.forward(self.check_theta(theta), X.to(self.dtype).to(self.device)).detach()
        if not bool(torch.isfinite(out).all()):  # argmax of NaN is an arbitrary class
            return math.nan
        pred = self.loss.predict(out)
        return float((pred.cpu() == y.cpu().long().reshape(-1)).double().mean())

    def full_loss(self, theta: Tensor, X: Tensor | None = None, y: Tensor | None = None) -> float:
        """Mean loss over all of (X, y) (training data by default) plus the L2 term,
        whatever the sampler; counts no evaluation."""
        theta = self.check_theta(theta)
        X = self.X if X is None else X.to(self.dtype).to(self.device)
        y = self.y if y is None else self.loss.check_targets(y.to(self.device), self._out_dim())
        w = torch.full((len(X),), 1.0 / len(X), dtype=self.dtype, device=self.device)
        with torch.no_grad():
            return float(self._weighted_loss(theta, X, y, w) + self._regulariser(theta))

    def _out_dim(self) -> int:
        with torch.no_grad():
            return self.forward(self._theta0, self.X[:1]).shape[1]


def _unpack_data(data) -> tuple[Tensor, Tensor]:
    if hasattr(data, "X") and hasattr(data, "y"):
        X, y = data.X, data.y
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        X, y = data
    else:
        raise TypeError("data must be a secondorder.data.Dataset or a pair (X, y)")
    X = torch.as_tensor(X)
    y = torch.as_tensor(y)
    if not torch.is_floating_point(X):
        X = X.to(torch.get_default_dtype())
    return X, y

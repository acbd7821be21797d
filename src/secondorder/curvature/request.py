"""A validated curvature request: the model, its data and loss, and the flat θ layout.

Both engines — second-order backpropagation and the autodiff fallback — start from one
:class:`CurvatureRequest` made by :func:`prepare`, for the objective

    J(θ) = (1/N) Σ_i ℓ(f(x_i; θ), y_i) + (l2/2)·‖W‖²,

where ‖W‖² covers the parameters with two or more dimensions (weight matrices and kernels, not
biases).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from secondorder import _validation
from secondorder._validation import check_positive, check_same_length
from secondorder.functional import FlatModel, check_model_output
from secondorder.losses import Loss, get_loss

__all__ = ["CurvatureRequest", "prepare"]


@dataclass
class CurvatureRequest:
    """The model, its data (in the parameters' dtype and device), loss and l2, and its flat θ.

    ``l2_mask`` is 1 on the entries of parameters with two or more dimensions, 0 elsewhere.
    ``theta`` and ``l2_mask`` are formed on first use (from the parameters as they are then;
    every curvature function uses them at once or not at all).
    """

    model: nn.Module
    X: Tensor
    y: Tensor
    loss: Loss
    l2: float
    flat: FlatModel
    out_dim: int

    @cached_property
    def theta(self) -> Tensor:
        return self.flat.theta0()

    @cached_property
    def l2_mask(self) -> Tensor:
        return self.flat.l2_mask(self.dtype, self.device)

    @property
    def n_params(self) -> int:
        return int(self.flat.n_params)

    @property
    def n_samples(self) -> int:
        return int(self.X.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.flat.param_dtype

    @property
    def device(self) -> torch.device:
        return self.flat.device

    def forward(self, theta: Tensor, X: Tensor) -> Tensor:
        return self.flat.forward(theta, X)

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


def _output_width(model: nn.Module, X: Tensor) -> int:
    """The model's output width, from applying it to one sample."""
    with torch.no_grad():
        try:
            out = model(X[:1])
        except Exception as exc:
            raise ValueError(
                f"the model cannot be applied to X of shape {tuple(X.shape)}: {exc}"
            ) from exc
    return check_model_output(model, out, 1).shape[1]


def prepare(
    model: nn.Module,
    X,
    y,
    loss: str | Loss,
    l2: float,
    *,
    check_finite: bool = True,
    probe: Callable[[Tensor], int] | None = None,
) -> CurvatureRequest:
    """Validate a curvature request and return it in the model's dtype and device.

    Errors name the argument and what was expected: the model must be an ``nn.Module`` with
    parameters; X a tensor of shape (N, features…) with N ≥ 1 and finite values; y holds N
    targets of the kind the loss needs (class labels in range, 0/1 labels, or float targets of
    the output's shape); l2 ≥ 0; the loss one of ``secondorder.losses.LOSSES``. With
    ``check_finite=False`` the caller takes over the NaN/inf test of X
    (:func:`secondorder._validation.check_finite`). ``probe(X)`` replaces applying the model to
    one sample: it returns the output width or raises ValueError (for a structure known in
    advance).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    loss_obj = get_loss(loss)
    l2 = check_positive("l2", l2, allow_zero=True)
    flat = FlatModel(model, "differentiate")
    dtype, device = flat.params[0].dtype, flat.device
    if not dtype.is_floating_point:
        raise ValueError(f"the model's parameters must be floating point, got {dtype}")
    X = _as_tensor(X, "X")
    y = _as_tensor(y, "y")
    if X.ndim < 2 or X.shape[0] == 0:
        raise ValueError(
            f"X must have shape (N, n_features, ...) with N >= 1 samples, got {tuple(X.shape)}"
        )
    check_same_length(X, y)
    X = X.to(dtype=dtype, device=device)
    if check_finite:  # the argument shadows the function
        _validation.check_finite("X", X)
    out_dim = probe(X) if probe is not None else _output_width(model, X)
    y = loss_obj.prepare_targets(y, out_dim, dtype, device)
    return CurvatureRequest(model, X, y, loss_obj, l2, flat, out_dim)

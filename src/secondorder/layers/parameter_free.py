r"""Parameter-free modules: elementwise activations, reshapes, pooling.

Elementwise σ: Jₓ = diag σ′, so columns scale by σ′, a diagonal D stays diagonal (D σ′²), and
the module's own second-derivative term is σ″ ⊙ g (eq. 87; none for piecewise-linear σ).
Reshapes (Flatten, Unflatten, Identity, Dropout in eval mode) only move entries. Max-pooling
routes each output to one input, so Jₓᵀ diag(D) Jₓ is diagonal: D summed onto the arg-max
entries. Average pooling mixes entries: its Jₓᵀ v is the generic vector–Jacobian product.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from secondorder.models import Activation, activation_derivatives

from .base import Layer

__all__ = ["AveragePool", "Elementwise", "MaxPool2d", "Reshape"]


class Elementwise(Layer):
    """An activation with closed-form σ′ and σ″ (:func:`secondorder.models.
    activation_derivatives`: ours, and ``nn.Sigmoid``, ``nn.Tanh``, ``nn.ReLU``,
    ``nn.Softplus(beta=1)``)."""

    module_types = (Activation, nn.Sigmoid, nn.Tanh, nn.ReLU, nn.Softplus)

    def __init__(self, module: nn.Module, name: str = "") -> None:
        super().__init__(module, name)
        self.activation = activation_derivatives(module)

    @classmethod
    def unsupported(cls, module: nn.Module) -> str:
        if activation_derivatives(module) is None:
            return (
                "it has no closed-form σ″ (secondorder.models.activation_derivatives does not "
                "recognise it)"
            )
        return ""

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(x)

    def derivative(self, x: Tensor, out: Tensor) -> Tensor:
        return self.activation.derivative(x)

    def input_vjp(self, x: Tensor, out: Tensor, V: Tensor) -> Tensor:
        return V * self.activation.derivative(x)[:, None]

    @property
    def has_residual(self) -> bool:
        act = self.activation
        return not (act.is_identity or act.is_piecewise_linear)

    def residual(self, x: Tensor, out: Tensor, g: Tensor) -> Tensor | None:
        return self.activation.second_derivative(x) * g if self.has_residual else None


class Reshape(Layer):
    """Modules that only rearrange or pass entries: Flatten, Unflatten, Identity, and Dropout
    in eval mode (or with p = 0)."""

    module_types = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)

    @classmethod
    def unsupported(cls, module: nn.Module) -> str:
        if isinstance(module, nn.Dropout) and module.training and module.p > 0:
            return "it is a Dropout in training mode (random); call model.eval()"
        if isinstance(module, nn.Flatten) and module.start_dim == 0:
            return "it flattens the sample dimension (start_dim=0)"
        if isinstance(module, nn.Unflatten) and module.dim == 0:
            return "it unflattens the sample dimension (dim=0)"
        return ""

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return x if isinstance(self.module, nn.Dropout) else self.module(x)

    def input_vjp(self, x: Tensor, out: Tensor, V: Tensor) -> Tensor:
        return V.reshape(*V.shape[:2], *x.shape[1:])

    def pass_diagonal(self, x: Tensor, out: Tensor, D: Tensor) -> Tensor:
        return D.reshape(x.shape)


class MaxPool2d(Layer):
    """``nn.MaxPool2d`` (any kernel, stride, padding, dilation, ceil mode; not returning the
    indices)."""

    module_types = (nn.MaxPool2d,)

    @classmethod
    def unsupported(cls, module: nn.Module) -> str:
        return "it returns the indices" if module.return_indices else ""

    def _indices(self, x: Tensor) -> Tensor:
        m = self.module
        _, idx = F.max_pool2d(
            x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True
        )
        return idx.flatten(2)  # (n, c, R) into each channel's H·W entries

    def input_vjp(self, x: Tensor, out: Tensor, V: Tensor) -> Tensor:
        n, C, c = V.shape[:3]
        idx = self._indices(x)[:, None].expand(n, C, c, -1)
        grad = V.new_zeros(n, C, c, x.shape[2] * x.shape[3])
        grad.scatter_add_(3, idx, V.reshape(n, C, c, -1))
        return grad.reshape(n, C, *x.shape[1:])

    def pass_diagonal(self, x: Tensor, out: Tensor, D: Tensor) -> Tensor:
        n, c = D.shape[:2]
        grad = D.new_zeros(n, c, x.shape[2] * x.shape[3])
        grad.scatter_add_(2, self._indices(x), D.reshape(n, c, -1))
        return grad.reshape(x.shape)


class AveragePool(Layer):
    """``nn.AvgPool2d`` and ``nn.AdaptiveAvgPool2d``: linear maps of each sample."""

    module_types = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)

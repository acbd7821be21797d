r"""``nn.Linear``: z = W x + b, applied to the last dimension of x (n, *mid, d_in).

With x̃ = (x, 1) when there is a bias, the parameters' derivatives are J_Wᵀ v = Σ_m v_m x̃_mᵀ
(summed over the middle dimensions m, if any), so

    diag(J_θᵀ diag(D) J_θ)_{o,i} = Σ_{n,m} D_{n,m,o} x̃_{n,m,i}²,

and without middle dimensions Σ_c s_c (J_Wᵀ v_c)²_{o,i} = (Σ_c s_c v_{c,o}²) x_i² per sample:
the diagonals need no per-column gradients (Appendix B, eqs. 68-70).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Layer

__all__ = ["Linear"]


def _augment(x: Tensor) -> Tensor:
    """(x, 1) along the last dimension."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)


def _positions(x: Tensor) -> Tensor:
    """x (n, *mid, d) as (n, m, d) (sizes spelt out: n may be 0 in a data-parallel share)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])


class Linear(Layer):
    """``nn.Linear`` (with or without bias)."""

    module_types = (nn.Linear,)
    kfac = True

    @classmethod
    def unsupported(cls, module: nn.Module) -> str:
        if type(module).forward is not nn.Linear.forward:
            return "it overrides nn.Linear.forward"
        return ""

    @property
    def bias(self) -> bool:
        return self.module.bias is not None

    def parameters(self) -> list[nn.Parameter]:
        m = self.module
        return [m.weight] if m.bias is None else [m.weight, m.bias]

    def _weight(self, dtype: torch.dtype) -> Tensor:
        return self.module.weight.detach().to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        m = self.module
        b = None if m.bias is None else m.bias.detach().to(x.dtype)
        return F.linear(x, self._weight(x.dtype), b)

    def input_vjp(self, x: Tensor, out: Tensor, V: Tensor) -> Tensor:
        return V @ self._weight(V.dtype)

    def param_vjp(self, x: Tensor, V: Tensor) -> Tensor:
        n, C = V.shape[:2]
        xm = _positions(x)  # (n, m, d_in)
        Vm = V.reshape(n, C, xm.shape[1], V.shape[-1])  # (n, C, m, d_out)
        gw = torch.einsum("ncmo,nmi->ncoi", Vm, xm).reshape(n, C, -1)
        if not self.bias:
            return gw
        return torch.cat([gw, Vm.sum(2)], 2)

    def param_squares(self, x: Tensor, V: Tensor, sign: Tensor | None = None) -> Tensor:
        if x.ndim != 2:
            return super().param_squares(x, V, sign)
        V2 = V * V
        if sign is not None:
            V2 = V2 * sign[:, :, None]
        S = V2.sum(1)  # (n, d_out)
        return self._pack(S.T @ (x * x), S.sum(0))

    def param_sandwich(self, x: Tensor, D: Tensor) -> Tensor:
        Dm = D.reshape(-1, D.shape[-1])
        xm = x.reshape(-1, x.shape[-1])
        return self._pack(Dm.T @ (xm * xm), Dm.sum(0))

    def _pack(self, w: Tensor, b: Tensor) -> Tensor:
        return torch.cat([w.reshape(-1), b]) if self.bias else w.reshape(-1)

    # -- K-FAC ---------------------------------------------------------------------------------
    @property
    def kfac_dims(self) -> tuple[int, int]:
        m = self.module
        return m.out_features, m.in_features + (1 if self.bias else 0)

    def kfac_inputs(self, x: Tensor) -> Tensor:
        x = _positions(x)  # the middle dimensions are positions
        return _augment(x) if self.bias else x

    def kfac_output_grads(self, g: Tensor) -> Tensor:
        return _positions(g)

    def grad_matrix(self, grads: list[Tensor]) -> Tensor:
        w = grads[0]
        return torch.cat([w, grads[1][:, None]], 1) if self.bias else w

    def split_matrix(self, M: Tensor) -> list[Tensor]:
        d_in = self.module.in_features
        return [M[:, :d_in], M[:, d_in]] if self.bias else [M]

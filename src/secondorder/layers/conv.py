r"""``nn.Conv2d`` (groups = 1, zero padding): z = W ⋆ x + b, read as a matrix product on patches.

Unfolding x (n, c_in, H, W) into patches U (n, c_in·k_h·k_w, R) over the R output positions
(im2col, channel-major as ``torch.nn.functional.unfold``), the layer is z_r = W̃ ũ_r with W̃
the (c_out, c_in·k_h·k_w) kernel matrix and ũ = (u, 1) with a bias. So J_W̃ᵀ v = Σ_r v_r ũ_rᵀ,

    diag(J_θᵀ diag(D) J_θ)_{o,i} = Σ_{n,r} D_{n,o,r} ũ_{n,i,r}²,

and K-FAC (Grosse & Martens 2016, Eschenhagen et al. 2023) takes the rows ũ_r of every position
as samples of A ("expand") or their mean over positions ("reduce", with the output gradients
summed over positions).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Layer

__all__ = ["Conv2d"]


def _int_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    """The symmetric zero padding the module applies, or None when it is not symmetric."""
    pad = module.padding
    if pad == "valid":
        return (0, 0)
    if pad == "same":
        out = []
        for k, d in zip(module.kernel_size, module.dilation):
            total = d * (k - 1)
            if total % 2:
                return None
            out.append(total // 2)
        return (out[0], out[1])
    return (int(pad[0]), int(pad[1]))


class Conv2d(Layer):
    """``nn.Conv2d`` with stride, padding and dilation; groups = 1; with or without bias."""

    module_types = (nn.Conv2d,)
    kfac = True

    @classmethod
    def unsupported(cls, module: nn.Module) -> str:
        if type(module).forward is not nn.Conv2d.forward:
            return "it overrides nn.Conv2d.forward"
        if module.groups != 1:
            return f"it has groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return f"its padding_mode is {module.padding_mode!r} (only 'zeros' is supported)"
        if _int_padding(module) is None:
            return "its padding='same' is asymmetric (an even effective kernel size)"
        return ""

    @property
    def bias(self) -> bool:
        return self.module.bias is not None

    def parameters(self) -> list[nn.Parameter]:
        m = self.module
        return [m.weight] if m.bias is None else [m.weight, m.bias]

    def _kernel(self, dtype: torch.dtype) -> Tensor:
        return self.module.weight.detach().to(dtype)

    def _geometry(self) -> dict:
        m = self.module
        return {"stride": m.stride, "padding": _int_padding(m), "dilation": m.dilation}

    def unfold(self, x: Tensor) -> Tensor:
        """Patches (n, c_in·k_h·k_w, R) of x, in the kernel's flattening order."""
        return F.unfold(x, self.module.kernel_size, **self._geometry())

    def forward(self, x: Tensor) -> Tensor:
        m = self.module
        b = None if m.bias is None else m.bias.detach().to(x.dtype)
        return F.conv2d(x, self._kernel(x.dtype), b, **self._geometry())

    def input_vjp(self, x: Tensor, out: Tensor, V: Tensor) -> Tensor:
        n, C = V.shape[:2]
        flat = V.reshape(n * C, *V.shape[2:])
        size = (n * C, *x.shape[1:])
        grad = torch.nn.grad.conv2d_input(size, self._kernel(V.dtype), flat, **self._geometry())
        return grad.reshape(n, C, *x.shape[1:])

    def param_vjp(self, x: Tensor, V: Tensor) -> Tensor:
        n, C, o = V.shape[:3]
        U = self.unfold(x)  # (n, i, R)
        Vr = V.reshape(n, C, o, V.shape[3] * V.shape[4])
        gw = torch.einsum("ncor,nir->ncoi", Vr, U).reshape(n, C, -1)
        return torch.cat([gw, Vr.sum(3)], 2) if self.bias else gw

    def param_squares(self, x: Tensor, V: Tensor, sign: Tensor | None = None) -> Tensor:
        n, C, o = V.shape[:3]
        U = self.unfold(x)
        Vr = V.reshape(n, C, o, -1)
        G = torch.einsum("ncor,nir->ncoi", Vr, U)
        G = G * G
        gb = Vr.sum(3)
        gb = gb * gb
        if sign is not None:
            G = G * sign[:, :, None, None]
            gb = gb * sign[:, :, None]
        w = G.sum((0, 1)).reshape(-1)
        return torch.cat([w, gb.sum((0, 1))]) if self.bias else w

    def param_sandwich(self, x: Tensor, D: Tensor) -> Tensor:
        U = self.unfold(x)
        Dr = D.reshape(D.shape[0], D.shape[1], -1)  # (n, o, R)
        w = torch.einsum("nor,nir->oi", Dr, U * U).reshape(-1)
        return torch.cat([w, Dr.sum((0, 2))]) if self.bias else w

    # -- K-FAC ---------------------------------------------------------------------------------
    @property
    def kfac_dims(self) -> tuple[int, int]:
        m = self.module
        d_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        return m.out_channels, d_in + (1 if self.bias else 0)

    def kfac_inputs(self, x: Tensor) -> Tensor:
        U = self.unfold(x).transpose(1, 2)  # (n, R, i)
        return torch.cat([U, U.new_ones(*U.shape[:2], 1)], 2) if self.bias else U

    def kfac_output_grads(self, g: Tensor) -> Tensor:
        n, o = g.shape[:2]
        return g.reshape(n, o, g.shape[2] * g.shape[3]).transpose(1, 2)  # (n, R, o)

    def grad_matrix(self, grads: list[Tensor]) -> Tensor:
        w = grads[0].reshape(grads[0].shape[0], -1)
        return torch.cat([w, grads[1][:, None]], 1) if self.bias else w

    def split_matrix(self, M: Tensor) -> list[Tensor]:
        shape = self.module.weight.shape
        d_in = shape[1] * shape[2] * shape[3]
        w = M[:, :d_in].reshape(shape)
        return [w, M[:, d_in]] if self.bias else [w]

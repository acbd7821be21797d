r"""``nn.Conv2d`` and ``nn.Conv1d`` (groups = 1, zero padding): z = W ⋆ x + b, read as a matrix
product on patches.

Unfolding x (n, c_in, H, W) into patches U (n, c_in·k_h·k_w, R) over the R output positions
(im2col, channel-major as ``torch.nn.functional.unfold``), the layer is z_r = W̃ ũ_r with W̃
the (c_out, c_in·k_h·k_w) kernel matrix and ũ = (u, 1) with a bias. So J_W̃ᵀ v = Σ_r v_r ũ_rᵀ,

    diag(J_θᵀ diag(D) J_θ)_{o,i} = Σ_{n,r} D_{n,o,r} ũ_{n,i,r}²,

and K-FAC (Grosse & Martens 2016, Eschenhagen et al. 2023) takes the rows ũ_r of every position
as samples of A ("expand") or their mean over positions ("reduce", with the output gradients
summed over positions). A one-dimensional convolution is the two-dimensional one on inputs of
height 1: :class:`Conv1d` only says how its tensors are viewed that way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Layer

__all__ = ["Conv1d", "Conv2d"]


def _int_padding(module: nn.Module) -> tuple[int, ...] | None:
    """The symmetric zero padding the module applies per spatial dimension, or None when it is
    not symmetric."""
    pad = module.padding
    if pad == "valid":
        return (0,) * len(module.kernel_size)
    if pad == "same":
        out = []
        for k, d in zip(module.kernel_size, module.dilation):
            total = d * (k - 1)
            if total % 2:
                return None
            out.append(total // 2)
        return tuple(out)
    return tuple(int(p) for p in pad)


class Conv2d(Layer):
    """``nn.Conv2d`` with stride, padding and dilation; groups = 1; with or without bias."""

    module_types = (nn.Conv2d,)
    kfac = True

    @classmethod
    def unsupported(cls, module: nn.Module) -> str:
        base = cls.module_types[0]
        if type(module).forward is not base.forward:
            return f"it overrides nn.{base.__name__}.forward"
        if module.groups != 1:
            return f"it has groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return f"its padding_mode is {module.padding_mode!r} (only 'zeros' is supported)"
        if _int_padding(module) is None:
            return "its padding='same' is asymmetric (an even effective kernel size)"
        return ""

    # -- the two-dimensional view (Conv1d overrides these four) --------------------------------
    def _planar(self, t: Tensor, lead: int) -> Tensor:
        """A tensor of the module's own layout (``lead`` leading dimensions, then channels and
        the spatial ones) in the 2-D layout: the same here."""
        return t

    def _native(self, t: Tensor, lead: int) -> Tensor:
        """The inverse of :meth:`_planar`."""
        return t

    def _geometry(self) -> dict:
        m = self.module
        return {"stride": m.stride, "padding": _int_padding(m), "dilation": m.dilation}

    def _kernel(self, dtype: torch.dtype) -> Tensor:
        return self.module.weight.detach().to(dtype)

    # -- the layer -----------------------------------------------------------------------------
    @property
    def bias(self) -> bool:
        return self.module.bias is not None

    def parameters(self) -> list[nn.Parameter]:
        m = self.module
        return [m.weight] if m.bias is None else [m.weight, m.bias]

    def unfold(self, x: Tensor) -> Tensor:
        """Patches (n, c_in·k_h·k_w, R) of x, in the kernel's flattening order."""
        kernel = self._kernel(x.dtype).shape[2:]
        return F.unfold(self._planar(x, 1), kernel, **self._geometry())

    def forward(self, x: Tensor) -> Tensor:
        m = self.module
        b = None if m.bias is None else m.bias.detach().to(x.dtype)
        out = F.conv2d(self._planar(x, 1), self._kernel(x.dtype), b, **self._geometry())
        return self._native(out, 1)

    def input_vjp(self, x: Tensor, out: Tensor, V: Tensor) -> Tensor:
        n, C = V.shape[:2]
        V2 = self._planar(V, 2)
        flat = V2.reshape(n * C, *V2.shape[2:])
        x2 = self._planar(x, 1)
        size = (n * C, *x2.shape[1:])
        grad = torch.nn.grad.conv2d_input(size, self._kernel(V.dtype), flat, **self._geometry())
        return self._native(grad.reshape(n, C, *x2.shape[1:]), 2)

    def _columns(self, V: Tensor) -> Tensor:
        """Columns (n, C, c_out, *spatial) as (n, C, c_out, R)."""
        n, C, o = V.shape[:3]
        return V.reshape(n, C, o, math.prod(V.shape[3:]))

    def param_vjp(self, x: Tensor, V: Tensor) -> Tensor:
        n, C = V.shape[:2]
        Vr = self._columns(V)
        gw = torch.einsum("ncor,nir->ncoi", Vr, self.unfold(x)).reshape(n, C, -1)
        return torch.cat([gw, Vr.sum(3)], 2) if self.bias else gw

    def param_squares(self, x: Tensor, V: Tensor, sign: Tensor | None = None) -> Tensor:
        Vr = self._columns(V)
        G = torch.einsum("ncor,nir->ncoi", Vr, self.unfold(x))
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
        Dr = D.reshape(D.shape[0], D.shape[1], math.prod(D.shape[2:]))  # (n, o, R)
        w = torch.einsum("nor,nir->oi", Dr, U * U).reshape(-1)
        return torch.cat([w, Dr.sum((0, 2))]) if self.bias else w

    # -- K-FAC ---------------------------------------------------------------------------------
    @property
    def kfac_dims(self) -> tuple[int, int]:
        shape = self.module.weight.shape
        return shape[0], math.prod(shape[1:]) + (1 if self.bias else 0)

    def kfac_inputs(self, x: Tensor) -> Tensor:
        U = self.unfold(x).transpose(1, 2)  # (n, R, i)
        return torch.cat([U, U.new_ones(*U.shape[:2], 1)], 2) if self.bias else U

    def kfac_output_grads(self, g: Tensor) -> Tensor:
        n, o = g.shape[:2]
        return g.reshape(n, o, math.prod(g.shape[2:])).transpose(1, 2)  # (n, R, o)

    def grad_matrix(self, grads: list[Tensor]) -> Tensor:
        w = grads[0].reshape(grads[0].shape[0], -1)
        return torch.cat([w, grads[1][:, None]], 1) if self.bias else w

    def split_matrix(self, M: Tensor) -> list[Tensor]:
        shape = self.module.weight.shape
        d_in = math.prod(shape[1:])
        w = M[:, :d_in].reshape(shape)
        return [w, M[:, d_in]] if self.bias else [w]


class Conv1d(Conv2d):
    """``nn.Conv1d``: the 2-D layer on inputs (n, c, 1, L) with kernels (c_out, c_in, 1, k)."""

    module_types = (nn.Conv1d,)

    def _planar(self, t: Tensor, lead: int) -> Tensor:
        return t.unsqueeze(lead + 1)  # (…, c, L) → (…, c, 1, L)

    def _native(self, t: Tensor, lead: int) -> Tensor:
        return t.squeeze(lead + 1)

    def _geometry(self) -> dict:
        m = self.module
        return {
            "stride": (1, m.stride[0]),
            "padding": (0, _int_padding(m)[0]),
            "dilation": (1, m.dilation[0]),
        }

    def _kernel(self, dtype: torch.dtype) -> Tensor:
        return self.module.weight.detach().to(dtype).unsqueeze(2)

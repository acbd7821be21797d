r"""The layer protocol: how one module of a network passes first- and second-order quantities.

A network is read as a chain of modules x⁽ⁱ⁺¹⁾ = m_i(x⁽ⁱ⁾; θ_i). Every curvature engine of the
library asks a module's :class:`Layer` the same few questions, per sample and batched over
samples n and over *columns* c (vectors in the module's output space, such as the columns of a
square-root factor S of the loss Hessian, H = S Sᵀ):

- ``input_vjp``: Jₓᵀ v for each column v (back-propagation of columns, eq. 66);
- ``pass_diagonal``: Jₓᵀ diag(D) Jₓ when it is diagonal again (elementwise maps, reshapes,
  max-pooling), else None — the engine then expands diag(D) into columns;
- ``residual``: the second-derivative term Σ_o g_o ∂²x_o/∂x² of the module itself (diagonal
  for elementwise activations: σ″ ⊙ g, eq. 87), which the Hessian adds to the Gauss–Newton
  recursion (eqs. 81-83);
- for modules with parameters, the per-sample, per-column parameter gradients J_θᵀ v (in the
  order weight, then bias, each flattened) and the squares Σ_{n,c} s_c (J_θᵀ v)² that make a
  diagonal, with their cheaper diagonal sandwich diag(J_θᵀ diag(D) J_θ);
- for K-FAC: the rows of the Kronecker input factor A (inputs, or unfolded patches of a
  convolution, with a column of ones for the bias) and of the output-gradient factor G, and the
  parameter gradient as one (d_out, d_in [+1]) matrix.

A module of parameters is affine in θ_i, so its own block of the Hessian is Jᵀ H_out J: no
second-derivative term in θ_i. Add a module type with one subclass and one
:func:`secondorder.layers.register` call.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

__all__ = ["KFAC_APPROXIMATIONS", "Layer"]

#: how K-FAC treats the positions a weight is shared over (Eschenhagen et al. 2023): "expand"
#: makes each position a sample of its own, "reduce" sums the output gradients and averages the
#: inputs over positions before forming the factors
KFAC_APPROXIMATIONS = ("expand", "reduce")


class Layer:
    """One module and what the curvature engines need of it (see the module doc).

    Subclasses set ``module_types`` and override what differs; the defaults serve any
    parameter-free module that maps each sample independently (a generic vector–Jacobian
    product through ``torch.func``)."""

    #: the module types this class handles (subclasses of them too)
    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: whether K-FAC has Kronecker factors for it
    kfac: ClassVar[bool] = False

    def __init__(self, module: nn.Module, name: str = "") -> None:
        self.module = module
        self.name = name

    # -- what is supported ---------------------------------------------------------------------
    @classmethod
    def unsupported(cls, module: nn.Module) -> str:
        """Why this module cannot be handled exactly ("" when it can)."""
        return ""

    @property
    def label(self) -> str:
        """``name (Type)`` for messages."""
        kind = type(self.module).__name__
        return f"{self.name} ({kind})" if self.name else kind

    # -- parameters ----------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The module's own parameters in θ order (weight, then bias); [] when parameter-free."""
        return []

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward and first order ---------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """The module applied to a batch x (N, ...), without a graph."""
        with torch.no_grad():
            return self.module(x)

    def input_vjp(self, x: Tensor, out: Tensor, V: Tensor) -> Tensor:
        """Jₓᵀ v for columns V (n, C, *out_shape) at inputs x: (n, C, *in_shape)."""
        _, vjp = torch.func.vjp(self.module, x)
        return torch.func.vmap(lambda v: vjp(v)[0], in_dims=1, out_dims=1)(V)

    def derivative(self, x: Tensor, out: Tensor) -> Tensor | None:
        """σ′(x) when the module is elementwise (Jₓ = diag σ′), else None."""
        return None

    def pass_diagonal(self, x: Tensor, out: Tensor, D: Tensor) -> Tensor | None:
        """Jₓᵀ diag(D) Jₓ as a diagonal (n, *in_shape) when it is one, else None."""
        d1 = self.derivative(x, out)
        return None if d1 is None else D * d1 * d1

    # -- second order --------------------------------------------------------------------------
    @property
    def has_residual(self) -> bool:
        """Whether :meth:`residual` can be non-zero (the Hessian's columns then grow below)."""
        return False

    def residual(self, x: Tensor, out: Tensor, g: Tensor) -> Tensor | None:
        """The diagonal second-derivative term Σ_o g_o ∂²out_o/∂x² (n, *in_shape) for the
        output gradient g, or None when it vanishes (linear or piecewise-linear maps)."""
        return None

    # -- parameters' derivatives ---------------------------------------------------------------
    def param_vjp(self, x: Tensor, V: Tensor) -> Tensor:
        """J_θᵀ v per sample and column: (n, C, P_layer) in θ order."""
        raise NotImplementedError(f"{self.label} has no parameters")

    def param_squares(self, x: Tensor, V: Tensor, sign: Tensor | None = None) -> Tensor:
        """Σ_{n,c} s_{n,c} (J_θᵀ v_{n,c})², length P_layer (s = 1 without ``sign``)."""
        G = self.param_vjp(x, V)
        G = G * G
        if sign is not None:
            G = G * sign[:, :, None]
        return G.sum((0, 1))

    def param_sandwich(self, x: Tensor, D: Tensor) -> Tensor:
        """diag(Σ_n J_θᵀ diag(D_n) J_θ), length P_layer, for D (n, *out_shape)."""
        V, sign = diagonal_columns(D)
        return self.param_squares(x, V, sign)

    # -- K-FAC ---------------------------------------------------------------------------------
    def kfac_inputs(self, x: Tensor) -> Tensor:
        """The rows ã of the input factor A at every position the weight is shared over:
        (n, R, d_in [+1]), with a last entry 1 for the bias."""
        raise NotImplementedError(f"{self.label} has no Kronecker factors")

    def kfac_output_grads(self, g: Tensor) -> Tensor:
        """The output gradients g (n, *out_shape) as rows of G per position: (n, R, d_out)."""
        raise NotImplementedError(f"{self.label} has no Kronecker factors")

    def grad_matrix(self, grads: list[Tensor]) -> Tensor:
        """The parameter gradients (weight, bias) as one (d_out, d_in [+1]) matrix."""
        raise NotImplementedError(f"{self.label} has no Kronecker factors")

    def split_matrix(self, M: Tensor) -> list[Tensor]:
        """Inverse of :meth:`grad_matrix`: tensors shaped like the parameters."""
        raise NotImplementedError(f"{self.label} has no Kronecker factors")

    @property
    def kfac_dims(self) -> tuple[int, int]:
        """(d_out, d_in [+1]): the sizes of G and A."""
        raise NotImplementedError(f"{self.label} has no Kronecker factors")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label})"


def diagonal_columns(D: Tensor) -> tuple[Tensor, Tensor]:
    """diag(D_n) = Σ_u s_u v_u v_uᵀ as columns: V (n, U, *shape) with v_u = √|D_u| e_u and
    signs s (n, U), U = the number of entries of one sample's D."""
    n, shape = D.shape[0], D.shape[1:]
    flat = D.reshape(n, -1)
    U = flat.shape[1]
    V = torch.diag_embed(flat.abs().sqrt()).reshape(n, U, *shape)
    return V, torch.sign(flat)

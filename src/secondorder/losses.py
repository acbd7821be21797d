"""Per-sample losses and their derivatives with respect to the model output.

Each loss ℓ(z, y) acts on one sample's model output z (logits for classification). The objective
averages them (with the sampler's weights); second-order backpropagation starts from the
per-sample output gradient ∂ℓ/∂z and Hessian H_z = ∂²ℓ/∂z² (eqs. 23 and 83).

- ``"cross_entropy"`` — softmax cross-entropy (eqs. 21-22): ℓ = logsumexp(z) − z_y;
  ∂ℓ/∂z = p − e_y; H_z = diag(p) − p pᵀ with p = softmax(z), PSD by eqs. 84-85.
- ``"logistic"`` — logistic loss (eq. 15) on one logit: ℓ = −y log σ(z) − (1−y) log(1−σ(z));
  ∂ℓ/∂z = σ(z) − y; H_z = σ(z)(1 − σ(z)).
- ``"mse"`` — squared error ½‖y − z‖²; ∂ℓ/∂z = z − y; H_z = I.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from secondorder._validation import check_choice, check_finite

__all__ = ["LOSSES", "Loss", "get_loss"]


class Loss:
    """A per-sample loss ℓ(z, y) with closed-form output derivatives."""

    name: str = ""
    #: whether targets are integer class labels (else float targets with the output's shape)
    classification: bool = True
    #: ℓ = logsumexp(z) − z_y: ∂ℓ/∂z = p − e_y and H_z = diag p − ppᵀ with p = softmax(z),
    #: so curvature kernels may work from p alone and never form H_z
    softmax_output: bool = False

    def per_sample(self, out: Tensor, y: Tensor) -> Tensor:
        """ℓ_i for every sample, shape (m,)."""
        raise NotImplementedError

    def grad_output(self, out: Tensor, y: Tensor) -> Tensor:
        """∂ℓ_i/∂z_i, shape (m, k)."""
        raise NotImplementedError

    def hessian_output(self, out: Tensor, y: Tensor) -> Tensor:
        """H_z for every sample, shape (m, k, k)."""
        raise NotImplementedError

    def hessian_output_matvec(self, out: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """H_z v for every sample (v of shape (m, k)), without forming H_z."""
        return torch.einsum("mij,mj->mi", self.hessian_output(out, y), v)

    def hessian_output_sqrt(self, out: Tensor, y: Tensor) -> Tensor:
        """A factor L of H_z = L Lᵀ for every sample, shape (m, k, r) (K-FAC's exact
        Gauss–Newton factorisation back-propagates its r columns). By default from the
        eigendecomposition of H_z (negative eigenvalues, from rounding, clipped at 0)."""
        evals, evecs = torch.linalg.eigh(self.hessian_output(out, y))
        return evecs * evals.clamp(min=0).sqrt()[:, None, :]

    def sample_targets(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Targets drawn from the model's predictive distribution at ``out`` (for the
        Monte-Carlo Fisher: E_ŷ[∂ℓ(z, ŷ)/∂z ∂ℓ(z, ŷ)/∂zᵀ] = H_z for these losses)."""
        raise NotImplementedError(f"loss={self.name!r} cannot sample targets from the model")

    def output_derivatives_fm(
        self, out: Tensor, y: Tensor, weight: float, grad: bool
    ) -> tuple[Tensor | None, Tensor]:
        """Feature-major output ``out`` of shape (k, m): (weight·∂ℓ/∂z as (k, m), or None
        without ``grad``; weight·H_z as (k, k, m)), for kernels that keep samples last."""
        g = self.grad_output(out.T, y).T * weight if grad else None
        H = self.hessian_output(out.T, y).permute(1, 2, 0) * weight
        return g, H.contiguous()

    def check_targets(self, y: Tensor, out_dim: int, arg: str = "y") -> Tensor:
        """Validate targets against the model's output width; return them in canonical form."""
        raise NotImplementedError

    def prepare_targets(
        self, y: Tensor, out_dim: int, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """``y`` on ``device``, finite, checked by :meth:`check_targets` for a model with
        ``out_dim`` outputs; float targets in ``dtype``."""
        y = y.to(device)
        check_finite("y", y)
        y = self.check_targets(y, out_dim)
        if torch.is_floating_point(y):
            y = y.to(dtype)
        return y

    def predict(self, out: Tensor) -> Tensor:
        """Predicted labels (classification) or values (regression) from model outputs."""
        raise NotImplementedError


class CrossEntropy(Loss):
    name = "cross_entropy"
    softmax_output = True

    def per_sample(self, out: Tensor, y: Tensor) -> Tensor:
        return torch.logsumexp(out, dim=1) - out.gather(1, y[:, None]).squeeze(1)

    def grad_output(self, out: Tensor, y: Tensor) -> Tensor:
        g = torch.softmax(out, dim=1)
        g[torch.arange(len(y), device=y.device), y] -= 1
        return g

    def hessian_output(self, out: Tensor, y: Tensor) -> Tensor:
        p = torch.softmax(out, dim=1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]

    def hessian_output_matvec(self, out: Tensor, y: Tensor, v: Tensor) -> Tensor:
        p = torch.softmax(out, dim=1)
        return p * v - p * (p * v).sum(1, keepdim=True)

    def hessian_output_sqrt(self, out: Tensor, y: Tensor) -> Tensor:
        # diag p − ppᵀ = S Sᵀ with S = diag √p − p √pᵀ, because Σ p = 1 (eq. 83's H_Z); S √p = 0,
        # so S = S Q Qᵀ for Q an orthonormal basis of √p's complement, and L = S Q has k − 1
        # columns (fewer columns to back-propagate). Q: the first k − 1 columns of the
        # Householder reflection R = I − 2 v vᵀ / vᵀv, v = √p + e_k (‖v‖ ≥ 1), which maps √p
        # to −e_k.
        p = torch.softmax(out, dim=1)
        r = p.sqrt()
        S = torch.diag_embed(r) - p[:, :, None] * r[:, None, :]
        k = out.shape[1]
        if k == 1:
            return S
        v = r.clone()
        v[:, -1] += 1
        Q = (
            torch.eye(k, k - 1, dtype=out.dtype, device=out.device)
            - (2 / (v * v).sum(1))[:, None, None] * v[:, :, None] * v[:, None, : k - 1]
        )
        return S @ Q

    def sample_targets(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        p = torch.softmax(out, dim=1)
        return torch.multinomial(p, 1, generator=generator)[:, 0]

    def output_derivatives_fm(
        self, out: Tensor, y: Tensor, weight: float, grad: bool
    ) -> tuple[Tensor | None, Tensor]:
        p = torch.softmax(out, 0)  # once, for both
        g = None
        if grad:
            g = p * weight
            g[y, torch.arange(len(y), device=y.device)] -= weight
        pw = p * weight
        H = torch.mul(pw[:, None, :], p[None, :, :]).neg_()  # w(diag p − p pᵀ)
        H.diagonal(dim1=0, dim2=1).add_(pw.T)
        return g, H

    def check_targets(self, y: Tensor, out_dim: int, arg: str = "y") -> Tensor:
        _check_labels(y, out_dim, arg)
        if out_dim < 2:
            raise ValueError(
                f"loss='cross_entropy' needs a model with at least 2 outputs, got {out_dim}; "
                "use loss='logistic' for a single logit"
            )
        return y.long()

    def predict(self, out: Tensor) -> Tensor:
        return out.argmax(1)


class Logistic(Loss):
    name = "logistic"

    def per_sample(self, out: Tensor, y: Tensor) -> Tensor:
        z = out[:, 0]
        return F.softplus(z) - y * z

    def grad_output(self, out: Tensor, y: Tensor) -> Tensor:
        return (torch.sigmoid(out[:, 0]) - y)[:, None]

    def hessian_output(self, out: Tensor, y: Tensor) -> Tensor:
        s = torch.sigmoid(out[:, :1])
        return (s * (1 - s))[:, :, None]

    def hessian_output_matvec(self, out: Tensor, y: Tensor, v: Tensor) -> Tensor:
        s = torch.sigmoid(out[:, :1])
        return s * (1 - s) * v

    def hessian_output_sqrt(self, out: Tensor, y: Tensor) -> Tensor:
        s = torch.sigmoid(out[:, :1])
        return (s * (1 - s)).sqrt()[:, :, None]

    def sample_targets(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(out[:, 0]), generator=generator)

    def check_targets(self, y: Tensor, out_dim: int, arg: str = "y") -> Tensor:
        if out_dim != 1:
            raise ValueError(f"loss='logistic' needs a model with exactly 1 output, got {out_dim}")
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise ValueError(
                f"{arg} must have shape (m,) for loss='logistic', got {tuple(y.shape)}"
            )
        bad = ~((y == 0) | (y == 1))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{arg} must hold labels 0 or 1 for loss='logistic'; {arg}[{i}] = {y[i].item()}"
            )
        return y

    def predict(self, out: Tensor) -> Tensor:
        return (out[:, 0] > 0).long()


class SquaredError(Loss):
    name = "mse"
    classification = False

    def per_sample(self, out: Tensor, y: Tensor) -> Tensor:
        return 0.5 * ((out - y) ** 2).sum(1)

    def grad_output(self, out: Tensor, y: Tensor) -> Tensor:
        return out - y

    def hessian_output(self, out: Tensor, y: Tensor) -> Tensor:
        m, k = out.shape
        return torch.eye(k, dtype=out.dtype, device=out.device).expand(m, k, k).clone()

    def hessian_output_matvec(self, out: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return v

    def hessian_output_sqrt(self, out: Tensor, y: Tensor) -> Tensor:
        return self.hessian_output(out, y)

    def sample_targets(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype)
        return out + noise.to(out.device)  # ℓ = ½‖z − y‖²: y ~ N(z, I)

    def check_targets(self, y: Tensor, out_dim: int, arg: str = "y") -> Tensor:
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape[1] != out_dim:
            raise ValueError(
                f"{arg} must have shape (m, {out_dim}) to match the model output for loss='mse', "
                f"got {tuple(y.shape)}"
            )
        if not torch.is_floating_point(y):
            y = y.to(torch.get_default_dtype())
        return y

    def predict(self, out: Tensor) -> Tensor:
        return out


def _check_labels(y: Tensor, n_classes: int, arg: str) -> None:
    if y.ndim != 1:
        raise ValueError(f"{arg} must be a 1-D tensor of class labels, got shape {tuple(y.shape)}")
    if torch.is_floating_point(y) and bool((y != y.round()).any()):
        raise ValueError(f"{arg} must hold integer class labels 0..{n_classes - 1}")
    bad = (y < 0) | (y >= n_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{arg} must hold class labels in 0..{n_classes - 1} (the model has {n_classes} "
            f"outputs); {arg}[{i}] = {y[i].item()}"
        )


LOSSES: dict[str, type[Loss]] = {cls.name: cls for cls in (CrossEntropy, Logistic, SquaredError)}
_ALIASES = {"ce": "cross_entropy", "cross-entropy": "cross_entropy", "squared_error": "mse"}


def get_loss(loss: str | Loss) -> Loss:
    """The loss by name (``"cross_entropy"``, ``"logistic"``, ``"mse"``) or as given."""
    if isinstance(loss, Loss):
        return loss
    loss = _ALIASES.get(loss, loss) if isinstance(loss, str) else loss
    check_choice("loss", loss, LOSSES)
    return LOSSES[loss]()

"""The one Lanczos process of the package: a Krylov basis of a symmetric operator, grown a
step at a time, with full reorthogonalisation.

For a symmetric A and a start q₁ (‖q₁‖ = 1), m steps give an orthonormal basis Q_m of the
Krylov space span{q₁, Aq₁, …, A^{m−1}q₁} and the tridiagonal T_m = Q_mᵀ A Q_m with diagonal
α₁…α_m and off-diagonal β₁…β_{m−1}:

    A Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ.

The eigenpairs (θ_j, s_j) of T_m are Ritz pairs of A with residuals ‖A y_j − θ_j y_j‖ =
|β_m s_{mj}|, and s_{1j}² are the Gauss quadrature weights of q₁ᵀ f(A) q₁ (stochastic Lanczos
quadrature). Every consumer asks this one class: the extreme eigenvalues and spectral densities
of the curvature engine, the saddle check of the solvers and the ARC subproblem, which solves
its cubic model on T_m after each step.

Vectors are float64 (on the start vector's device): the orthogonality of Q is what keeps Ritz
values from repeating, and float32 loses it after a few dozen steps.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from secondorder.linalg import check_dense_fits

__all__ = ["Lanczos", "tridiagonal_eigh"]


class Lanczos:
    """A Lanczos basis of the operator ``matvec`` (float64 vector ↦ float64 vector), grown by
    :meth:`step` from the start vector ``q0`` (normalised here).

    Each step orthogonalises A q_i against the whole basis twice (classical Gram–Schmidt, which
    is enough in floating point). On a breakdown — β_i ≈ 0, an invariant subspace found — the
    basis continues from a random vector orthogonal to it with coupling 0 when ``generator``
    is given (so small operators are resolved completely), and stops otherwise
    (:attr:`exhausted`).
    """

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        q0: Tensor,
        max_steps: int,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        q0 = q0.reshape(-1).to(torch.float64)
        self.n = q0.numel()
        self.max_steps = min(int(max_steps), self.n)
        self.matvec = matvec
        self.generator = generator
        # the basis is n × steps float64: refuse it readably before allocating
        check_dense_fits(
            (self.n, self.max_steps), torch.float64, "the Lanczos basis", device=q0.device
        )
        self._Q = torch.empty(self.n, self.max_steps, dtype=torch.float64, device=q0.device)
        self._alpha = np.zeros(self.max_steps)
        self._beta = np.zeros(self.max_steps)  # β_i couples q_i and q_{i+1}; the last is β_m
        self._next = q0 / q0.norm()
        self._scale = 0.0
        self._asym = 0.0  # max |q_{i−1}ᵀ A q_i − β_{i−1}|: 0 for a symmetric A
        self.m = 0
        self.exhausted = False

    @property
    def alpha(self) -> np.ndarray:
        """α₁…α_m, the diagonal of T_m."""
        return self._alpha[: self.m]

    @property
    def beta(self) -> np.ndarray:
        """β₁…β_{m−1}, the off-diagonal of T_m."""
        return self._beta[: max(self.m - 1, 0)]

    @property
    def residual(self) -> float:
        """β_m, the norm of the part of A q_m outside the basis (0 after a breakdown)."""
        return float(self._beta[self.m - 1]) if self.m else 0.0

    @property
    def asymmetry(self) -> float:
        """max_i |q_{i−1}ᵀ A q_i − β_{i−1}| relative to ‖T_m‖: rounding-sized for a symmetric
        operator, O(1) when A ≠ Aᵀ (then T_m is not Q_mᵀ A Q_m and its Ritz values mean
        nothing)."""
        return self._asym / max(self._scale, 1e-300) if self.m > 1 else 0.0

    @property
    def basis(self) -> Tensor:
        """Q_m, of shape (n, m), orthonormal columns."""
        return self._Q[:, : self.m]

    @property
    def done(self) -> bool:
        """No further step possible: the step budget is spent or the space is exhausted."""
        return self.exhausted or self.m >= self.max_steps

    def step(self) -> float:
        """Add q_{m+1} to the basis; return the new residual β_{m+1}."""
        if self.done:
            raise RuntimeError("the Lanczos basis cannot grow further")
        i = self.m
        q = self._next
        self._Q[:, i] = q
        w = self.matvec(q)
        if i > 0:  # symmetric A: q_{i−1}ᵀ A q_i = (A q_{i−1})ᵀ q_i = β_{i−1}, a free test
            c = float(torch.dot(self._Q[:, i - 1], w))
            self._asym = max(self._asym, abs(c - float(self._beta[i - 1])))
        a = float(torch.dot(q, w))
        self._alpha[i] = a
        basis = self._Q[:, : i + 1]
        w = self._orthogonalise(w, basis)
        b = float(w.norm())
        self.m = i + 1
        self._scale = max(self._scale, abs(a) + b)
        self._beta[i] = b
        if self.m < self.max_steps:
            if b > 1e-13 * max(self._scale, 1e-300):
                self._next = w / b
            elif self.generator is not None:
                # breakdown: continue orthogonally to the Krylov space found so far
                r = torch.randn(self.n, dtype=torch.float64, generator=self.generator)
                r = self._orthogonalise(r.to(q.device), basis)
                self._beta[i] = 0.0
                self._next = r / r.norm()
            else:
                self.exhausted = True
        return float(self._beta[i])

    @staticmethod
    def _orthogonalise(w: Tensor, basis: Tensor) -> Tensor:
        for _ in range(2):
            w = w - basis @ (basis.T @ w)
        return w

    def run(self, check: Callable[[Lanczos], bool] | None = None) -> Lanczos:
        """Step until :attr:`done` or until ``check(self)`` returns True; return self."""
        while not self.done:
            self.step()
            if check is not None and check(self):
                break
        return self

    def tridiagonal(self) -> Tensor:
        """T_m as a dense float64 (m, m) tensor."""
        m = self.m
        T = torch.zeros(m, m, dtype=torch.float64)
        T[range(m), range(m)] = torch.as_tensor(self.alpha)
        if m > 1:
            off = torch.as_tensor(self.beta)
            T[range(1, m), range(m - 1)] = off
            T[range(m - 1), range(1, m)] = off
        return T

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """(θ, S): the eigenvalues of T_m ascending and its eigenvectors as columns."""
        return tridiagonal_eigh(self.alpha, self.beta)


def tridiagonal_eigh(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal matrix with
    diagonal ``alpha`` and off-diagonal ``beta``."""
    from scipy.linalg import eigh_tridiagonal  # scipy.linalg takes ~0.2 s to import

    if len(alpha) == 1:
        return np.asarray(alpha, dtype=np.float64).copy(), np.ones((1, 1))
    return eigh_tridiagonal(alpha, beta)

"""The Lanczos kernel against dense eigendecompositions (float64)."""

import numpy as np
import pytest
import torch

from secondorder.lanczos import Lanczos, tridiagonal_eigh
from secondorder.linalg import MemoryError_


def _sym(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (A + A.T) / 2


@pytest.mark.parametrize("seed", [0, 1])
def test_full_basis_reproduces_the_spectrum(seed):
    n = 40
    A = _sym(n, seed)
    q0 = torch.randn(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    lz = Lanczos(lambda v: A @ v, q0, n).run()
    assert lz.m == n
    Q = lz.basis
    torch.testing.assert_close(Q.T @ Q, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    # Qᵀ A Q is the tridiagonal T
    torch.testing.assert_close(Q.T @ A @ Q, lz.tridiagonal(), atol=1e-11, rtol=0)
    theta, _ = lz.ritz()
    np.testing.assert_allclose(theta, torch.linalg.eigvalsh(A).numpy(), atol=1e-10)


def test_partial_basis_satisfies_the_lanczos_relation():
    n, m = 60, 12
    A = _sym(n, 3)
    q0 = torch.ones(n, dtype=torch.float64)
    lz = Lanczos(lambda v: A @ v, q0, m).run()
    Q, T = lz.basis, lz.tridiagonal()
    R = A @ Q - Q @ T  # = β_m q_{m+1} e_mᵀ: zero but for the last column
    assert float(R[:, :-1].abs().max()) < 1e-11
    assert float(R[:, -1].norm()) == pytest.approx(lz.residual, rel=1e-10)


def test_breakdown_restarts_with_a_generator_and_stops_without():
    # a start vector in a 2-dimensional invariant subspace of a diagonal operator
    d = torch.arange(1.0, 7.0, dtype=torch.float64)
    q0 = torch.zeros(6, dtype=torch.float64)
    q0[:2] = 1.0
    stopped = Lanczos(lambda v: d * v, q0, 6).run()
    assert stopped.exhausted and stopped.m == 2
    np.testing.assert_allclose(stopped.ritz()[0], [1.0, 2.0], atol=1e-12)
    full = Lanczos(lambda v: d * v, q0, 6, generator=torch.Generator().manual_seed(0)).run()
    assert full.m == 6
    np.testing.assert_allclose(full.ritz()[0], d.numpy(), atol=1e-10)


def test_check_stops_early_and_tridiagonal_eigh_matches_dense():
    A = _sym(30, 4)
    lz = Lanczos(lambda v: A @ v, torch.ones(30, dtype=torch.float64), 30)
    lz.run(check=lambda s: s.m == 5)
    assert lz.m == 5
    theta, S = tridiagonal_eigh(lz.alpha, lz.beta)
    T = lz.tridiagonal().numpy()
    np.testing.assert_allclose(T @ S, S * theta, atol=1e-12)
    with pytest.raises(RuntimeError, match="cannot grow"):
        Lanczos(lambda v: A @ v, torch.ones(30, dtype=torch.float64), 1).run().step()


def test_a_basis_that_cannot_fit_is_refused_before_it_is_allocated():
    q0 = torch.ones(2_000_000, dtype=torch.float64)
    with pytest.raises(MemoryError_, match="Lanczos basis"):
        Lanczos(lambda v: v, q0, max_steps=10**6)

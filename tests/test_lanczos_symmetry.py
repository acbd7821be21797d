"""Lanczos assumes a symmetric operator: an explicit non-symmetric matrix is refused, a
matrix-free one is detected from the recurrence (q_{i−1}ᵀ A q_i must equal β_{i−1}) and
warned about; symmetric operators give no warning and match ``torch.linalg.eigvalsh``."""

import warnings

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import aslinearoperator

from secondorder.curvature import HessianOperator, lanczos_eigs, spectral_density
from secondorder.lanczos import Lanczos
from secondorder.models import mlp

f64 = torch.float64


def _matrices(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, dtype=f64, generator=g)
    return A, A + A.T


class _MatrixFree:
    """An operator known only by its shape and products."""

    def __init__(self, A):
        self.A, self.shape = np.asarray(A), tuple(A.shape)

    def matvec(self, x):
        return self.A @ x


@pytest.mark.parametrize("kind", ["tensor", "ndarray"])
def test_an_explicit_non_symmetric_matrix_is_refused(kind):
    A, _ = _matrices()
    op = A if kind == "tensor" else A.numpy()
    with pytest.raises(ValueError, match=r"op must be a symmetric matrix: max \|A − Aᵀ\|"):
        lanczos_eigs(op)
    with pytest.raises(ValueError, match="op must be a symmetric matrix"):
        spectral_density(op, n_probes=1, n_steps=5)


@pytest.mark.parametrize("wrap", [aslinearoperator, _MatrixFree], ids=["scipy", "matvec"])
def test_a_matrix_free_non_symmetric_operator_is_warned_about(wrap):
    A, _ = _matrices()
    with pytest.warns(RuntimeWarning, match="lanczos_eigs: the operator is not symmetric"):
        lanczos_eigs(wrap(A.numpy()))
    # slightly non-symmetric (1e-3 relative) is still caught
    _, S = _matrices(seed=1)
    N = torch.randn(40, 40, dtype=f64, generator=torch.Generator().manual_seed(2))
    with pytest.warns(RuntimeWarning, match="not symmetric"):
        lanczos_eigs(wrap((S + 1e-3 * float(S.abs().max()) * N).numpy()))


@pytest.mark.parametrize(
    "wrap",
    [lambda S: S, lambda S: aslinearoperator(S.numpy()), lambda S: _MatrixFree(S.numpy())],
    ids=["tensor", "scipy", "matvec"],
)
def test_symmetric_operators_give_no_warning_and_the_right_eigenvalues(wrap):
    _, S = _matrices()
    op = wrap(S)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vals, _ = lanczos_eigs(op, 2, which="both")
    ev = torch.linalg.eigvalsh(S)
    torch.testing.assert_close(vals, torch.stack([ev[0], ev[1], ev[-2], ev[-1]]))


def test_a_float32_hessian_operator_is_symmetric_enough():
    model = mlp([4, 6, 3], "tanh", seed=0, dtype=torch.float32)
    X, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lanczos_eigs(HessianOperator(model, X, y), 2, which="both", tol=1e-4)


def test_the_asymmetry_measure_of_the_recurrence():
    A, S = _matrices()
    q0 = torch.randn(40, dtype=f64, generator=torch.Generator().manual_seed(3))
    sym = Lanczos(lambda v: S @ v, q0, 20).run()
    asym = Lanczos(lambda v: A @ v, q0, 20).run()
    assert sym.asymmetry < 1e-12
    assert asym.asymmetry > 0.1
    assert np.isfinite(asym.asymmetry)

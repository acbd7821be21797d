"""Curvature operators against dense matrices; Lanczos against numpy and scipy; Hutchinson and
stochastic Lanczos quadrature against the exact trace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from secondorder.curvature import (
    GGNOperator,
    HessianOperator,
    ggn,
    hessian,
    hutchinson_trace,
    lanczos_eigs,
    spectral_density,
)
from secondorder.models import mlp
from secondorder.objective import MemoryError_, ModelObjective

f64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices: one thread is as fast and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    model = mlp([6, 8, 4], "tanh", seed=3, dtype=f64)
    X = torch.randn(50, 6, generator=g, dtype=f64)
    y = torch.randint(0, 4, (50,), generator=g)
    H = hessian(model, X, y, "cross_entropy", 0.01)
    return model, X, y, H


def test_hessian_operator_matches_dense(problem):
    model, X, y, H = problem
    op = HessianOperator(model, X, y, "cross_entropy", 0.01)
    P = H.shape[0]
    assert op.shape == (P, P) and op.dtype == f64
    v = torch.randn(P, dtype=f64)
    assert torch.allclose(op.matvec(v), H @ v, rtol=1e-12, atol=1e-14)
    V = torch.randn(P, 3, dtype=f64)
    assert torch.allclose(op.matmat(V), H @ V, rtol=1e-12, atol=1e-14)
    assert torch.allclose(op @ v, H @ v, rtol=1e-12, atol=1e-14)
    assert torch.allclose(op.to_dense(), H, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"v must have shape \(P,\)"):
        op.matvec(torch.randn(P + 1, dtype=f64))
    with pytest.raises(MemoryError_, match="bytes"):
        op.to_dense(max_bytes=10)


def test_operators_from_objective_and_ggn(problem):
    model, X, y, H = problem
    obj = ModelObjective(model, "cross_entropy", (X, y), l2=0.01)
    theta = obj.initial_theta()
    op = HessianOperator(obj)
    v = torch.randn(H.shape[0], dtype=f64)
    assert torch.allclose(op.matvec(v), H @ v, rtol=1e-12, atol=1e-14)
    G = ggn(model, X, y, "cross_entropy", 0.01)
    gop = GGNOperator(obj, theta=theta)
    assert torch.allclose(gop.matvec(v), G @ v, rtol=1e-12, atol=1e-14)
    assert torch.allclose(GGNOperator(model, X, y, "cross_entropy", 0.01).to_dense(), G, atol=1e-14)
    with pytest.raises(ValueError, match="X and y must be left out"):
        HessianOperator(obj, X, y)
    with pytest.raises(ValueError, match="X and y are required"):
        HessianOperator(model)
    with pytest.raises(TypeError, match="model_or_objective"):
        HessianOperator("model", X, y)


def test_float32_operator_keeps_dtype():
    model = mlp([4, 5, 3], "sigmoid", seed=0, dtype=torch.float32)
    X, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    op = HessianOperator(model, X, y)
    assert op.dtype == torch.float32
    assert op.matvec(torch.randn(op.shape[0])).dtype == torch.float32
    vals, _ = lanczos_eigs(op, k=1, which="LA", tol=1e-5)
    H = hessian(model.double(), X.double(), y)
    assert float(vals[0]) == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-4)


def test_to_scipy_with_eigsh(problem):
    model, X, y, H = problem
    lin = HessianOperator(model, X, y, "cross_entropy", 0.01).to_scipy()
    assert isinstance(lin, LinearOperator) and lin.dtype == np.float64
    x = np.random.default_rng(0).standard_normal(H.shape[0])
    assert np.allclose(lin @ x, H.numpy() @ x, rtol=1e-12, atol=1e-14)
    assert np.allclose(lin.matmat(np.eye(H.shape[0])[:, :2]), H.numpy()[:, :2], atol=1e-14)
    ev = np.linalg.eigvalsh(H.numpy())
    top = eigsh(lin, k=2, which="LA", return_eigenvectors=False)
    assert np.allclose(np.sort(top), ev[-2:], rtol=1e-10)
    low = eigsh(lin, k=1, which="SA", return_eigenvectors=False)
    assert low[0] == pytest.approx(ev[0], rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("which", ["SA", "LA", "both"])
def test_lanczos_extreme_eigenpairs(problem, which):
    model, X, y, H = problem
    op = HessianOperator(model, X, y, "cross_entropy", 0.01)
    ev = np.linalg.eigvalsh(H.numpy())
    vals, vecs = lanczos_eigs(op, k=2, which=which, seed=1)
    want = {"SA": ev[:2], "LA": ev[-2:], "both": np.r_[ev[:2], ev[-2:]]}[which]
    scale = np.abs(ev).max()
    assert np.allclose(vals.numpy(), want, rtol=0, atol=1e-9 * scale)
    assert torch.allclose(vecs.norm(dim=0), torch.ones(len(vals), dtype=f64))
    res = H @ vecs - vecs * vals
    assert float(res.norm(dim=0).max()) <= 1e-6 * scale


def test_lanczos_dense_inputs_breakdown_and_scipy_operator():
    # a small diagonal matrix with repeated eigenvalues forces breakdowns and restarts
    d = torch.tensor([3.0, 3.0, 1.0, -2.0, 5.0, 5.0, 0.5], dtype=f64)
    A = torch.diag(d)
    vals, _ = lanczos_eigs(A, k=3, which="SA")
    assert np.allclose(vals.numpy(), [-2.0, 0.5, 1.0])
    vals, _ = lanczos_eigs(A.numpy(), k=1, which="LA")
    assert float(vals[0]) == pytest.approx(5.0)
    lin = LinearOperator((7, 7), matvec=lambda x: d.numpy() * np.ravel(x), dtype=np.float64)
    vals, vecs = lanczos_eigs(lin, k=1, which="both")
    assert np.allclose(vals.numpy(), [-2.0, 5.0])
    with pytest.raises(ValueError, match="did you mean 'SA'"):
        lanczos_eigs(A, which="SM")
    with pytest.raises(ValueError, match="k=4 asks for 8"):
        lanczos_eigs(A, k=4, which="both")
    with pytest.raises(TypeError, match="square operator"):
        lanczos_eigs([1, 2, 3])


def test_lanczos_warns_when_not_converged():
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((400, 400)))
    A = (Q * np.linspace(0, 1, 400)) @ Q.T
    with pytest.warns(UserWarning, match="raise max_iter"):
        lanczos_eigs(A, k=1, which="SA", max_iter=10)


def test_hutchinson_within_standard_errors(problem):
    model, X, y, H = problem
    op = HessianOperator(model, X, y, "cross_entropy", 0.01)
    est = hutchinson_trace(op, n_probes=200, seed=3)
    tr = float(H.trace())
    assert abs(est.estimate - tr) <= 4 * est.stderr
    assert est.stderr < abs(tr)
    assert len(est.samples) == 200


def test_spectral_density_integrates_to_one_and_mean(problem):
    model, X, y, H = problem
    op = HessianOperator(model, X, y, "cross_entropy", 0.01)
    P = H.shape[0]
    n_probes = 30
    sd = spectral_density(op, n_probes=n_probes, n_steps=40, grid=2000, seed=2)
    assert np.trapezoid(sd.density, sd.grid) == pytest.approx(1.0, abs=1e-3)
    assert sd.weights.sum() == pytest.approx(1.0)
    ev = np.linalg.eigvalsh(H.numpy())
    assert sd.nodes.min() >= ev[0] - 1e-9 and sd.nodes.max() <= ev[-1] + 1e-9
    # the SLQ mean is a Hutchinson estimate of trace/P: Rademacher variance 2 Σ_{i≠j} H_ij²
    off = H - torch.diag(H.diagonal())
    se = float(torch.sqrt(2 * (off**2).sum() / n_probes)) / P
    assert abs(sd.mean() - float(H.trace()) / P) <= 5 * se


def test_spectral_density_of_small_matrix_is_exact():
    d = np.array([-1.0, 0.0, 2.0, 2.0, 4.0])
    sd = spectral_density(np.diag(d), n_probes=4, n_steps=10, sigma=0.05)
    # Lanczos resolves a 5×5 matrix: nodes are eigenvalues, mean is exactly trace/P
    assert sd.mean() == pytest.approx(d.mean())
    for node, w in zip(sd.nodes, sd.weights):
        if w > 1e-12:
            assert np.min(np.abs(d - node)) < 1e-10

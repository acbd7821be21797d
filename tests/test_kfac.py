"""K-FAC: its Kronecker factors against the exact Gauss–Newton blocks of the curvature engine
(float64), the Monte-Carlo Fisher against the exact factorisation, and the method in
``minimize`` against Newton's minimiser."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secondorder import ModelObjective, minimize, mlp
from secondorder.curvature import ggn
from secondorder.curvature.kfac import kfac_factors
from secondorder.objective import FunctionObjective, rosenbrock
from secondorder.sampling import ReshuffledBatches

D = torch.float64


def _data(n: int, loss: str, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=D)
    if loss == "cross_entropy":
        y = torch.randint(0, k, (n,), generator=g)
    elif loss == "logistic":
        y = torch.randint(0, 2, (n,), generator=g).to(D)
    else:
        y = torch.randn(n, k, generator=g, dtype=D)
    return X, y


@pytest.mark.parametrize("loss,k", [("cross_entropy", 3), ("logistic", 1), ("mse", 2)])
@pytest.mark.parametrize("hidden", [[], [5], [5, 6]])
@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_one_sample_factors_equal_the_exact_gauss_newton_blocks(loss, k, hidden, activation):
    X, y = _data(1, loss, k)
    model = mlp([4, *hidden, k], activation, seed=2, dtype=D)
    obj = ModelObjective(model, loss, (X, y))
    factors = kfac_factors(obj, obj.initial_theta())
    assert len(factors) == len(hidden) + 1
    G = ggn(model, X, y, loss)  # the engine's exact GGN (second-order backpropagation)
    for f in factors:
        block = G[f.layer.params, f.layer.params]
        torch.testing.assert_close(f.dense(), block, rtol=0, atol=1e-10)


def test_factors_of_many_samples_are_weighted_means_and_psd():
    X, y = _data(50, "cross_entropy", 3)
    model = mlp([4, 5, 3], "tanh", seed=2, dtype=D)
    obj = ModelObjective(model, "cross_entropy", (X, y))
    factors = kfac_factors(obj, obj.initial_theta())
    a = torch.cat([X, torch.ones(50, 1, dtype=D)], 1)
    torch.testing.assert_close(factors[0].A, a.T @ a / 50, rtol=1e-12, atol=1e-14)
    for f in factors:
        assert float(torch.linalg.eigvalsh(f.G)[0]) > -1e-12
        assert float(torch.linalg.eigvalsh(f.A)[0]) > -1e-12


def test_monte_carlo_fisher_averages_to_the_exact_factor():
    X, y = _data(1, "cross_entropy", 3)
    X, y = X.repeat(40000, 1), y.repeat(40000)  # one input, many sampled targets
    model = mlp([4, 5, 3], "tanh", seed=2, dtype=D)
    obj = ModelObjective(model, "cross_entropy", (X, y))
    exact = kfac_factors(obj, obj.initial_theta())
    mc = kfac_factors(
        obj, obj.initial_theta(), kind="mc", generator=torch.Generator().manual_seed(1)
    )
    for e, m in zip(exact, mc):
        torch.testing.assert_close(m.A, e.A, rtol=1e-12, atol=1e-14)
        err = float((m.G - e.G).abs().max() / e.G.abs().max())
        assert err < 0.03, err


def test_kfac_reaches_newtons_minimiser():
    X, y = _data(300, "cross_entropy", 3, seed=5)
    results = {}
    for method in ("kfac", "newton"):
        obj = ModelObjective(
            mlp([4, 3], "tanh", seed=0, dtype=D),
            "cross_entropy",
            (X, y),
            l2=1e-2,
            regularize_bias=True,
        )
        results[method] = minimize(obj, obj.initial_theta(), method=method, max_iter=500)
        assert results[method].success, results[method].message
    torch.testing.assert_close(results["kfac"].theta, results["newton"].theta, atol=1e-6, rtol=0)


def test_kfac_resumes_exactly_on_moving_batches_and_refuses_what_it_cannot_factor():
    X, y = _data(120, "cross_entropy", 3)

    def objective():
        return ModelObjective(
            mlp([4, 6, 3], "tanh", seed=0, dtype=D),
            "cross_entropy",
            (X, y),
            sampler=ReshuffledBatches(120, 30, n_batches=1, seed=1),
        )

    opts = {"kind": "mc", "ema": 0.9, "inv_every": 3, "gtol": None}
    obj = objective()
    whole = minimize(obj, obj.initial_theta(), method="kfac", max_iter=10, **opts)
    obj = objective()
    first = minimize(obj, obj.initial_theta(), method="kfac", max_iter=4, **opts)
    obj = objective()
    rest = minimize(
        obj, obj.initial_theta(), method="kfac", max_iter=6, initial_state=first.state, **opts
    )
    assert torch.equal(rest.theta, whole.theta)
    with pytest.raises(ValueError, match="needs a ModelObjective"):
        minimize(
            FunctionObjective(rosenbrock(), 2, dtype=D), torch.zeros(2, dtype=D), method="kfac"
        )
    conv = nn.Sequential(
        nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(2, 3)
    ).to(D)
    obj = ModelObjective(conv, "cross_entropy", (X, y))
    with pytest.raises(ValueError, match="K-FAC needs a sequential MLP"):
        minimize(obj, obj.initial_theta(), method="kfac")
    assert obj.counts.f == 0

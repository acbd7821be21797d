"""K-FAC: its Kronecker factors against the exact Gauss–Newton blocks of the curvature engine
(float64), the Monte-Carlo Fisher against the exact factorisation, and the method in
``minimize`` against Newton's minimiser."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secondorder import ModelObjective, minimize, mlp
from secondorder.curvature import ggn
from secondorder.curvature.kfac import FlatLayout, KFACEngine, kfac_factors
from secondorder.objective import FunctionObjective, rosenbrock
from secondorder.sampling import ReshuffledBatches, make_sampler

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


def _moving_objective(X, y, sampler):
    """A 4-6-3 tanh net on (X, y) whose batches move with ``sampler``."""
    return ModelObjective(
        mlp([4, 6, 3], "tanh", seed=0, dtype=D), "cross_entropy", (X, y), sampler=sampler
    )


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
        block = G[f.params, f.params]
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
        return _moving_objective(X, y, ReshuffledBatches(120, 30, n_batches=1, seed=1))

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
    normed = (
        nn.Sequential(
            nn.Unflatten(1, (1, 2, 2)),
            nn.Conv2d(1, 2, 2),
            nn.BatchNorm2d(2),
            nn.Flatten(),
            nn.Linear(2, 3),
        )
        .to(D)
        .eval()
    )
    obj = ModelObjective(normed, "cross_entropy", (X, y))
    with pytest.raises(ValueError, match=r"module 2 \(BatchNorm2d\).*unsupported='gradient'"):
        minimize(obj, obj.initial_theta(), method="kfac")
    assert obj.counts.f == 0


def _full_batch_problem():
    X, y = _data(200, "cross_entropy", 3, seed=7)
    model = mlp([4, 5, 3], "tanh", seed=1, dtype=D)
    return ModelObjective(model, "cross_entropy", (X, y), l2=1e-2), X, y


def _dense_ggn(obj, theta, X, y):
    """The exact Gauss–Newton matrix of the objective (the L2 term's c·mask on the diagonal)."""
    model = obj.load_into_model(theta)
    return ggn(model, X, y, "cross_entropy") + torch.diag(obj.l2_coefficient * obj.l2_mask)


def test_momentum_step_minimises_the_quadratic_model_over_the_two_directions():
    obj, X, y = _full_batch_problem()
    damping = 1e-3
    opts = {"kind": "exact", "ema": 0.0, "inv_every": 1, "damping": damping, "momentum": True}
    res = minimize(
        obj, obj.initial_theta(), "kfac", line_search=None, max_iter=3, trace_theta=True, **opts
    )
    thetas = [row["theta"] for row in res.trace]
    gamma = damping + obj.l2_coefficient
    for k in (1, 2):  # iterations with a previous step
        theta, prev = thetas[k], thetas[k] - thetas[k - 1]
        _, g = obj.value_and_grad(theta)
        B = _dense_ggn(obj, theta, X, y) + gamma * torch.eye(obj.n_params, dtype=D)
        # K-FAC's Δ = −(⊕ G⊗A + damping)⁻¹ g with ema = 0: the factors at θ (exact kind)
        factors = kfac_factors(obj, theta)
        delta = -_factored_inverse_apply(obj.model, factors, g, gamma)
        assert float(g @ delta) < 0
        V = torch.stack([delta, prev], 1)
        ab = torch.linalg.solve(V.T @ B @ V, -V.T @ g)  # the 2×2 model minimiser, densely
        step = thetas[k + 1] - theta
        torch.testing.assert_close(step, V @ ab, rtol=1e-8, atol=1e-10)
        assert res.trace[k + 1]["kfac_mu"] == pytest.approx(float(ab[1]), rel=1e-8)


def _factored_inverse_apply(model, factors, v, gamma):
    layers = [f.layer for f in factors]
    engine = KFACEngine(layers, ema=0.0)
    engine.update(factors)
    engine.refresh(gamma)
    return FlatLayout(model, layers).apply(engine, v, gamma)


def test_factored_inverse_is_the_kronecker_inverse_of_the_damped_factors():
    obj, X, y = _full_batch_problem()
    factors = kfac_factors(obj, obj.initial_theta())
    gamma = 0.3
    v = torch.randn(obj.n_params, generator=torch.Generator().manual_seed(0), dtype=D)
    blocks = []
    for f in factors:
        ta, tg = f.A.trace() / len(f.A), f.G.trace() / len(f.G)
        pi = float((ta / tg).sqrt())
        A = f.A + pi * gamma**0.5 * torch.eye(len(f.A), dtype=D)
        G = f.G + gamma**0.5 / pi * torch.eye(len(f.G), dtype=D)
        blocks.append(type(f)(f.layer, A, G).dense())
    dense = torch.linalg.solve(torch.block_diag(*blocks), v)
    torch.testing.assert_close(
        _factored_inverse_apply(obj.model, factors, v, gamma), dense, rtol=1e-10, atol=1e-12
    )


def test_adaptive_damping_follows_the_reduction_ratio():
    obj, X, y = _full_batch_problem()
    opts = {"kind": "exact", "ema": 0.5, "inv_every": 1, "damping": 1.0, "adapt_damping": 1}
    res = minimize(
        obj,
        obj.initial_theta(),
        "kfac",
        line_search=None,
        lr=1.5,
        max_iter=6,
        trace_theta=True,
        **opts,
    )
    damping, omega = 1.0, 19 / 20
    for k in range(1, len(res.trace)):
        before, row = res.trace[k - 1], res.trace[k]
        theta, s = before["theta"], row["theta"] - before["theta"]
        f0, g = obj.value_and_grad(theta)
        B = _dense_ggn(obj, theta, X, y)
        model = float(g @ s + 0.5 * s @ B @ s + 0.5 * (damping + obj.l2_coefficient) * s @ s)
        rho = (float(obj.value(row["theta"])) - float(f0)) / model
        assert row["kfac_rho"] == pytest.approx(rho, rel=1e-7)
        damping = damping * omega if rho > 0.75 else damping / omega if rho < 0.25 else damping
        assert row["kfac_damping"] == pytest.approx(damping, rel=1e-12)
    assert len({round(r["kfac_damping"], 12) for r in res.trace[1:]}) > 1  # it did move


def test_factor_samples_estimate_on_the_first_samples_of_the_batch():
    X, y = _data(60, "cross_entropy", 3)
    model = mlp([4, 5, 3], "tanh", seed=2, dtype=D)
    whole = ModelObjective(model, "cross_entropy", (X, y))
    theta = whole.initial_theta()
    few = kfac_factors(ModelObjective(model, "cross_entropy", (X[:20], y[:20])), theta)
    cut = kfac_factors(whole, theta, max_samples=20)
    for a, b in zip(few, cut):
        torch.testing.assert_close(b.A, a.A, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(b.G, a.G, rtol=1e-13, atol=1e-15)


def test_kfac_with_momentum_and_adaptive_damping_resumes_exactly():
    X, y = _data(120, "cross_entropy", 3)

    def objective():
        return _moving_objective(X, y, make_sampler("epoch", 120, batch_size=30, seed=1))

    opts = {"kind": "mc", "momentum": True, "adapt_damping": 2, "factor_samples": 10}
    opts.update(line_search=None, gtol=None, inv_every=3)
    obj = objective()
    whole = minimize(obj, obj.initial_theta(), method="kfac", max_iter=9, **opts)
    assert whole.nfev < 2 * 9  # one evaluation per step, plus one every other step for ρ
    obj = objective()
    first = minimize(obj, obj.initial_theta(), method="kfac", max_iter=5, **opts)
    obj = objective()
    rest = minimize(
        obj, obj.initial_theta(), method="kfac", max_iter=4, initial_state=first.state, **opts
    )
    assert torch.equal(rest.theta, whole.theta)
    with pytest.raises(ValueError, match="momentum=True needs rescale=True"):
        minimize(obj, obj.initial_theta(), method="kfac", momentum=True, rescale=False)


def test_gauss_newton_products_on_the_first_samples_equal_those_of_the_subset():
    X, y = _data(60, "cross_entropy", 3)
    model = mlp([4, 5, 3], "tanh", seed=2, dtype=D)
    whole = ModelObjective(model, "cross_entropy", (X, y), l2=0.1)
    part = ModelObjective(model, "cross_entropy", (X[:25], y[:25]), l2=0.1)
    theta = whole.initial_theta()
    v = torch.randn(whole.n_params, generator=torch.Generator().manual_seed(3), dtype=D)
    torch.testing.assert_close(
        whole.ggnvp_at(theta, max_samples=25)(v), part.ggnvp(theta, v), rtol=1e-12, atol=1e-14
    )
    Xs, ys, ws = whole.samples(max_samples=25)
    assert torch.equal(Xs, X[:25]) and float(ws.sum()) == pytest.approx(1.0, abs=1e-15)

"""Mini-batch Hessian-free and the stochastic quasi-Newton method: their minimisers against
closed forms and scipy (float64), the Levenberg–Marquardt damping and CG backtracking against
hand-computed references (dense Hessians, the curvature engine's Gauss–Newton matrix), their
behaviour on reshuffled mini-batches, exact resume and the refusal of bad options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch

from secondorder import ModelObjective, minimize, mlp
from secondorder.curvature import ggn
from secondorder.data import two_class_2d
from secondorder.objective import FunctionObjective, quadratic
from secondorder.sampling import make_sampler
from secondorder.solvers import validate_options
from secondorder.solvers.hessianfree import backtrack_choice, saved_steps

D = torch.float64
M = 200
DATA = two_class_2d(n_train=M, seed=1).train


def _logistic(sampler=None, curvature_sampler=None, hidden=(), l2=1e-2, seed=0):
    return ModelObjective(
        mlp([2, *hidden, 1], "tanh", seed=seed, dtype=D),
        "logistic",
        DATA,
        l2=l2,
        regularize_bias=True,
        sampler=sampler,
        curvature_sampler=curvature_sampler,
    )


def _scipy_minimiser(obj) -> torch.Tensor:
    """The full-batch minimiser by scipy's BFGS at a tight tolerance."""

    def fg(x):
        f, g = obj.value_and_grad(torch.from_numpy(x))
        return float(f), g.numpy()

    ref = scipy.optimize.minimize(
        fg, obj.initial_theta().numpy(), jac=True, method="BFGS", options={"gtol": 1e-12}
    )
    return torch.from_numpy(ref.x)


def _quadratic():
    g = torch.Generator().manual_seed(3)
    Q = torch.randn(6, 6, generator=g, dtype=D)
    A = Q @ Q.T + torch.eye(6, dtype=D)
    b = torch.randn(6, generator=g, dtype=D)
    return FunctionObjective(quadratic(A, b), 6, dtype=D), torch.linalg.solve(A, b)


# -- full batch: the true minimiser -------------------------------------------------------------
def test_hessian_free_solves_a_quadratic_in_one_step_and_logistic_regression():
    obj, x_star = _quadratic()
    res = minimize(
        obj,
        torch.zeros(6, dtype=D),
        method="hessian-free",
        curvature="hessian",
        damping=1e-12,
        cg_tol=1e-13,
        gtol=1e-10,
    )
    assert res.success and res.nit <= 2, res.message
    torch.testing.assert_close(res.theta, x_star, rtol=0, atol=1e-10)
    obj = _logistic()
    res = minimize(obj, obj.initial_theta(), method="hessian-free", max_iter=200)
    assert res.success, res.message
    torch.testing.assert_close(res.theta, _scipy_minimiser(_logistic()), rtol=0, atol=1e-7)


def test_sqn_reaches_the_minimiser_of_a_quadratic_and_of_fixed_batches():
    obj, x_star = _quadratic()
    res = minimize(
        obj,
        torch.zeros(6, dtype=D),
        method="sqn",
        curvature="hessian",
        lr=0.5,
        pair_every=2,
        max_iter=3000,
    )
    assert res.success, res.message
    assert res.info["updates"] > 0 and res.info["skipped_pairs"] == 0
    torch.testing.assert_close(res.theta, x_star, rtol=0, atol=1e-8)
    # four fixed batches that partition the data: the full-batch function, in four pieces
    obj = _logistic(make_sampler("fixed", M, batch_size=50))
    res = minimize(obj, obj.initial_theta(), method="sqn", lr=1.0, pair_every=2, max_iter=500)
    assert res.success, res.message
    torch.testing.assert_close(res.theta, _scipy_minimiser(_logistic()), rtol=0, atol=1e-7)


def test_sqn_takes_plain_gradient_steps_until_its_first_pair():
    obj, _ = _quadratic()
    res = minimize(
        obj,
        torch.zeros(6, dtype=D),
        method="sqn",
        curvature="hessian",
        lr=0.05,
        pair_every=3,
        max_iter=8,
        gtol=None,
        trace_theta=True,
        decay=0.5,
    )
    rows = res.trace.rows
    for k in range(6):  # the first pair is formed in iteration 2L − 1 = 5, used from 6
        theta, nxt = rows[k]["theta"], rows[k + 1]["theta"]
        alpha = 0.05 / (1 + 0.5 * k)
        torch.testing.assert_close(nxt, theta - alpha * obj.grad(theta), rtol=0, atol=1e-14)
    assert "pair_sy" in rows[6] and "pair_sy" not in rows[3]
    # after it, the step is the L-BFGS step of the one pair (θ̄₂ − θ̄₁, A s)
    s = torch.stack([r["theta"] for r in rows[3:6]]).mean(0) - torch.stack(
        [r["theta"] for r in rows[0:3]]
    ).mean(0)
    y = obj.hvp(rows[6]["theta"], s)
    gamma = float(s @ y / (y @ y))
    g = obj.grad(rows[6]["theta"])
    H = gamma * (torch.eye(6, dtype=D) - torch.outer(y, s) / (s @ y))
    H = (torch.eye(6, dtype=D) - torch.outer(s, y) / (s @ y)) @ H + torch.outer(s, s) / (s @ y)
    torch.testing.assert_close(
        rows[7]["theta"], rows[6]["theta"] - 0.05 / (1 + 0.5 * 6) * (H @ g), rtol=0, atol=1e-13
    )


# -- the Levenberg–Marquardt damping and CG backtracking ---------------------------------------
def _pseudo_huber(theta: torch.Tensor) -> torch.Tensor:
    A = torch.tensor([[2.0, 1.0], [0.5, 1.5]], dtype=theta.dtype)
    return torch.sqrt(1 + (A @ theta) ** 2).sum()


def test_damping_follows_the_reduction_ratio_rule():
    """λ's trajectory against ρ computed from the dense Hessian: d = −(H + λI)⁻¹g (CG solves
    the 2×2 system exactly), ρ = (f(θ + d) − f(θ)) / (gᵀd + ½dᵀHd)."""
    obj = FunctionObjective(_pseudo_huber, 2, dtype=D)
    res = minimize(
        obj,
        torch.tensor([3.0, -2.0], dtype=D),
        method="hessian-free",
        curvature="hessian",
        damping=0.01,
        backtrack=False,
        cg_tol=1e-14,
        max_iter=40,
        trace_theta=True,
    )
    assert res.success, res.message
    rows = res.trace.rows
    lam = 0.01
    regimes = set()
    for k in range(1, len(rows)):
        theta = rows[k - 1]["theta"]
        f, g = obj.value_and_grad(theta)
        H = torch.func.hessian(_pseudo_huber)(theta)
        d = -torch.linalg.solve(H + lam * torch.eye(2, dtype=D), g)
        rho = (float(_pseudo_huber(theta + d)) - float(f)) / float(g @ d + 0.5 * d @ H @ d)
        assert rows[k]["damping"] == pytest.approx(lam, rel=1e-12)
        assert rows[k]["rho"] == pytest.approx(rho, rel=1e-7, abs=1e-9)
        if rho < 0.25:
            lam, regime = 1.5 * lam, "up"
        elif rho > 0.75:
            lam, regime = lam * 2 / 3, "down"
        else:
            regime = "kept"
        regimes.add(regime)
    assert {"up", "down"} <= regimes  # both branches of the rule were exercised
    assert res.info["damping"] == pytest.approx(lam, rel=1e-12)


def test_backtracking_picks_the_cg_iterate_a_hand_written_cg_picks():
    """One iteration on a small network: plain CG on the engine's dense Gauss–Newton matrix,
    iterates kept at steps ⌈1.3ⁱ⌉, walk back from the last while f decreases."""
    obj = _logistic(hidden=(6,), l2=0.0, seed=2)
    theta0 = obj.initial_theta() * 2
    lam, max_cg = 1e-3, 6
    res = minimize(
        obj,
        theta0,
        method="hessian-free",
        damping=lam,
        max_cg=max_cg,
        cg_tol=1e-12,
        max_iter=1,
        trace_theta=True,
        gtol=None,
    )
    model = obj.load_into_model(theta0)
    G = ggn(model, obj.X, obj.y, "logistic") + lam * torch.eye(obj.n_params, dtype=D)
    g = obj.grad(theta0)
    x, r = torch.zeros_like(g), g.clone()
    p, kept = -r, []
    for j in range(1, max_cg + 1):
        a = float(r @ r) / float(p @ G @ p)
        x, r_new = x + a * p, r + a * (G @ p)
        p, r = -r_new + float(r_new @ r_new) / float(r @ r) * p, r_new
        if j in saved_steps(max_cg) or j == max_cg:
            kept.append((j, x))
    values = [float(obj.value(theta0 + x)) for _, x in kept]
    i = len(values) - 1
    while i > 0 and values[i - 1] < values[i]:
        i -= 1
    row = res.trace.rows[1]
    assert row["cg_step"] == kept[i][0] < max_cg  # it did step back
    assert row["step"] == 1.0
    torch.testing.assert_close(row["theta"] - theta0, kept[i][1], rtol=1e-8, atol=1e-10)


def test_backtrack_choice_and_saved_steps():
    assert sorted(saved_steps(10)) == sorted({math.ceil(1.3**i) for i in range(9)})
    assert backtrack_choice([3.0, 1.0, 2.0, 5.0]) == 1
    assert backtrack_choice([3.0, 2.0, 1.0]) == 2
    assert backtrack_choice([1.0, 2.0, math.nan]) == 0


# -- reshuffled mini-batches ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,options,batch",
    [("hessian-free", {}, 100), ("sqn", {"lr": 0.5, "decay": 0.05, "pair_every": 5}, 40)],
)
def test_mini_batches_reach_the_full_batch_minimum(method, options, batch):
    f_min = _logistic().full_loss(_scipy_minimiser(_logistic()))
    obj = _logistic(
        make_sampler("reshuffled", M, batch_size=batch, n_batches=1),
        make_sampler("subsample", M, size=50),
    )
    res = minimize(obj, obj.initial_theta(), method=method, max_iter=60, gtol=None, **options)
    assert res.status == "max_iter" and res.objective_changes > 0, res.message
    assert all(math.isfinite(row["f"]) for row in res.trace.rows)
    assert obj.full_loss(res.theta) <= 1.03 * f_min
    if method == "sqn":
        sy = [row["pair_sy"] for row in res.trace.rows if "pair_sy" in row]
        assert len(sy) >= 5 and all(v > 0 for v in sy)
        assert res.info["skipped_pairs"] == 0 and res.info["updates"] == len(sy)


# -- resume ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,options",
    [
        ("hessian-free", {"max_cg": 5}),
        ("sqn", {"lr": 0.3, "pair_every": 2, "memory": 2, "decay": 0.1}),
        ("sqn", {"lr": 0.3, "pair_every": 3, "curvature": "hessian", "line_search": "armijo"}),
    ],
)
def test_resume_continues_exactly(method, options):
    def objective():
        return _logistic(
            make_sampler("reshuffled", M, batch_size=60, n_batches=1, seed=2),
            make_sampler("subsample", M, size=40),
            hidden=(3,),
        )

    def run(obj, n, **extra):
        return minimize(
            obj, obj.initial_theta(), method=method, max_iter=n, gtol=None, **options, **extra
        )

    whole = run(objective(), 11)
    first = run(objective(), 4)
    rest = run(objective(), 7, initial_state=first.state)
    assert torch.equal(rest.theta, whole.theta)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "time"} for r in rows]

    assert strip(first.trace.rows + rest.trace.rows) == strip(whole.trace.rows)


# -- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,options,error,match",
    [
        ("hessian-free", {"damping": -1.0}, ValueError, "damping"),
        ("hessian-free", {"max_cg": 0}, ValueError, "max_cg"),
        ("hessian-free", {"cg_tol": 0.0}, ValueError, "cg_tol"),
        ("hessian-free", {"warm_start": 1.5}, ValueError, r"warm_start must lie in \[0, 1\]"),
        ("hessian-free", {"backtrack": "yes"}, TypeError, "backtrack must be True or False"),
        ("hessian-free", {"curvature": "gn"}, ValueError, "curvature"),
        ("hessian-free", {"memory": 5}, TypeError, "memory.*does not apply"),
        ("sqn", {"memory": 0}, ValueError, "memory"),
        ("sqn", {"pair_every": 1.5}, TypeError, "pair_every"),
        ("sqn", {"lr": -0.1}, ValueError, "lr"),
        ("sqn", {"decay": -1}, ValueError, "decay"),
        ("sqn", {"curvature": "fisher"}, ValueError, "curvature"),
        ("sqn", {"preconditioner": "hessian-diag"}, TypeError, "preconditioner"),
    ],
)
def test_bad_options_are_refused_before_any_evaluation(method, options, error, match):
    obj = _logistic()
    with pytest.raises(error, match=match):
        minimize(obj, obj.initial_theta(), method=method, **options)
    assert obj.counts.f == obj.counts.g == obj.counts.ggnv == obj.counts.hv == 0
    with pytest.raises(error, match=match):
        validate_options(3, method, **options)


def test_gauss_newton_curvature_needs_a_model_objective():
    obj, _ = _quadratic()
    for method in ("hessian-free", "sqn"):
        with pytest.raises(ValueError, match="curvature='ggn' needs Gauss-Newton products"):
            minimize(obj, torch.zeros(6, dtype=D), method=method)
    assert obj.counts.f == 0
    assert np.isfinite(validate_options(6, "sqn")["lr"])

"""Line searches: the conditions they promise, one evaluation per trial point, non-finite
values, failure reports, and the interpolation they rely on."""

from __future__ import annotations

import math

import pytest
import torch

from secondorder.objective import FunctionObjective, rosenbrock
from secondorder.solvers.linesearch import (
    Armijo,
    LineFunction,
    StrongWolfe,
    armijo,
    cubic_minimizer,
    evaluator,
    fixed_step,
    strong_wolfe,
)

D = torch.float64


def _phi_values(fn, theta, d, alpha):
    x = (theta + alpha * d).detach().requires_grad_(True)
    f = fn(x)
    (g,) = torch.autograd.grad(f, x)
    return float(f.detach()), float(g @ d)


# Moré & Thuente (1994) test functions as 1-D problems θ ↦ φ(θ), searched from 0 along d = 1
def mt1(x):
    return -x[0] / (x[0] ** 2 + 2.0)


def mt2(x):
    return (x[0] + 0.004) ** 5 - 2.0 * (x[0] + 0.004) ** 4


def mt3(x):
    b = 0.01
    return (1 - x[0]) ** 2 + 0.5 * b * torch.sin(20 * math.pi * x[0])  # wiggly, many local minima


def quartic(x):
    return (x**4).sum() - (x**2).sum() + x.sum()


CASES = [
    ("mt1", mt1, torch.zeros(1, dtype=D), torch.ones(1, dtype=D)),
    ("mt2", mt2, torch.zeros(1, dtype=D), torch.ones(1, dtype=D)),
    ("mt3", mt3, torch.zeros(1, dtype=D), torch.ones(1, dtype=D)),
    ("rosen-sd", rosenbrock(), torch.tensor([-1.2, 1.0], dtype=D), None),
    ("quartic", quartic, torch.tensor([0.3, -0.8, 1.1], dtype=D), None),
]


@pytest.mark.parametrize("alpha0", [1e-3, 1.0, 10.0, 1e3])
@pytest.mark.parametrize("c2", [0.9, 0.1])
@pytest.mark.parametrize("name, fn, theta, d", CASES, ids=[c[0] for c in CASES])
def test_strong_wolfe_conditions_hold(name, fn, theta, d, c2, alpha0):
    obj = FunctionObjective(fn, theta.numel(), dtype=D)
    f0, g0 = obj.value_and_grad(theta)
    if d is None:
        d = -g0
    res = strong_wolfe(obj, theta, d, f0=float(f0), g0=g0, alpha0=alpha0, c2=c2, max_ls=40)
    assert res.success and res.wolfe, res.message
    dphi0 = float(g0 @ d)
    f, dphi = _phi_values(fn, theta, d, res.alpha)
    assert f == pytest.approx(res.f, rel=1e-14, abs=1e-300)
    assert f <= float(f0) + 1e-4 * res.alpha * dphi0
    assert abs(dphi) <= c2 * abs(dphi0) * (1 + 1e-12)
    assert torch.equal(res.theta, torch.add(theta, d, alpha=res.alpha))


@pytest.mark.parametrize("name, fn, theta, d", CASES, ids=[c[0] for c in CASES])
def test_each_trial_point_is_evaluated_once(name, fn, theta, d):
    obj = FunctionObjective(fn, theta.numel(), dtype=D)
    f0, g0 = obj.value_and_grad(theta)
    d = -g0 if d is None else d
    before = obj.counts.copy()
    res = strong_wolfe(obj, theta, d, f0=float(f0), g0=g0, alpha0=5.0)
    assert obj.counts.f - before.f == res.nfev == len(res.trials)
    assert obj.counts.g - before.g == res.nfev
    assert len({a for a, _ in res.trials}) == len(res.trials)  # no α twice
    # the accepted point's f and g come back: nothing to evaluate again
    f, g = obj.value_and_grad(res.theta)
    assert float(f) == res.f and torch.equal(g, res.g)


def test_line_function_memoises():
    obj = FunctionObjective(rosenbrock(), 2, dtype=D)
    theta = torch.tensor([-1.2, 1.0], dtype=D)
    f0, g0 = obj.value_and_grad(theta)
    phi = LineFunction(evaluator(obj), theta, -g0, float(f0), g0)
    a = phi(1e-3)
    b = phi(1e-3)
    assert a[0] == b[0] and phi.nfev == 1 and obj.counts.f == 2
    assert phi(0.0)[0] == float(f0) and phi.nfev == 1


def test_armijo_accepts_the_newton_step_at_once():
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=D)

    def q(x):
        return 0.5 * x @ A @ x - x.sum()

    obj = FunctionObjective(q, 2, dtype=D)
    theta = torch.tensor([2.0, -1.0], dtype=D)
    f0, g0 = obj.value_and_grad(theta)
    d = -torch.linalg.solve(A, g0)
    res = armijo(obj, theta, d, f0=float(f0), g0=g0)
    assert res.success and res.alpha == 1.0 and res.nfev == 1
    assert torch.allclose(res.theta, torch.linalg.solve(A, torch.ones(2, dtype=D)))


@pytest.mark.parametrize("alpha0", [1.0, 50.0])
def test_armijo_sufficient_decrease(alpha0):
    obj = FunctionObjective(rosenbrock(), 2, dtype=D)
    theta = torch.tensor([-1.2, 1.0], dtype=D)
    f0, g0 = obj.value_and_grad(theta)
    res = armijo(obj, theta, -g0, f0=float(f0), g0=g0, alpha0=alpha0)
    assert res.success and res.wolfe
    assert res.f <= float(f0) - 1e-4 * res.alpha * float(g0 @ g0)
    assert res.alpha < alpha0


def nan_beyond_two(x):
    return torch.where(x.abs().max() < 2, (x**2).sum(), torch.full((), float("nan"), dtype=x.dtype))


@pytest.mark.parametrize("search", [strong_wolfe, armijo, fixed_step])
def test_nonfinite_trials_backtrack(search):
    obj = FunctionObjective(nan_beyond_two, 1, dtype=D)
    theta = torch.tensor([1.5], dtype=D)
    f0, g0 = obj.value_and_grad(theta)
    res = search(obj, theta, -g0, f0=float(f0), g0=g0, alpha0=10.0)
    assert res.success
    assert res.nonfinite >= 1 and "non-finite" in res.message
    assert math.isfinite(res.f) and bool(torch.isfinite(res.g).all())
    assert abs(float(res.theta)) < 2


def finite_only_at_one(x):
    return torch.where(x[0] == 1.0, (x**2).sum(), torch.full((), float("nan"), dtype=x.dtype))


def test_all_trials_nonfinite_is_a_failure():
    obj = FunctionObjective(finite_only_at_one, 1, dtype=D)
    theta = torch.tensor([1.0], dtype=D)
    f0, g0 = obj.value_and_grad(theta)
    for rule in (StrongWolfe(max_ls=6), Armijo(max_ls=6)):
        res = rule.search(evaluator(obj), theta, -g0, float(f0), g0, -float(g0 @ g0), 1.0)
        assert not res.success and "non-finite" in res.message
        assert res.alpha == 0.0 and torch.equal(res.theta, theta) and res.nonfinite == res.nfev


def test_failure_when_no_decrease_exists():
    """A wrong gradient claims descent where f rises: the search reports it and returns θ."""
    obj = FunctionObjective(lambda x: (x**2).sum(), 1, dtype=D, grad_fn=lambda x: -2 * x)
    theta = torch.tensor([1.0], dtype=D)
    f0, g0 = obj.value_and_grad(theta)  # g0 = −2: "descent" along d = +1, but f rises
    for rule in (StrongWolfe(), Armijo()):
        res = rule.search(evaluator(obj), theta, -g0, float(f0), g0, float(g0 @ -g0), 1.0)
        assert not res.success
        assert "line search failed" in res.message and "no decrease" in res.message
        assert res.alpha == 0.0 and res.f == float(f0) and torch.equal(res.theta, theta)


def test_descent_direction_required():
    obj = FunctionObjective(rosenbrock(), 2, dtype=D)
    theta = torch.tensor([-1.2, 1.0], dtype=D)
    g0 = obj.grad(theta)
    with pytest.raises(ValueError, match="descent"):
        strong_wolfe(obj, theta, g0)


def test_float32_theta_float64_scalars():
    obj = FunctionObjective(rosenbrock(), 2, dtype=torch.float32)
    theta = torch.tensor([-1.2, 1.0], dtype=torch.float32)
    f0, g0 = obj.value_and_grad(theta)
    res = strong_wolfe(obj, theta, -g0, f0=float(f0), g0=g0)
    assert res.success and res.theta.dtype == torch.float32 and res.g.dtype == torch.float32
    assert isinstance(res.alpha, float) and isinstance(res.f, float)


def test_cubic_minimizer():
    # c(t) = (t − 1)³ − 3(t − 1) has its local minimum at t = 2
    def c(t):
        return (t - 1) ** 3 - 3 * (t - 1)

    def dc(t):
        return 3 * (t - 1) ** 2 - 3

    assert cubic_minimizer(0.5, c(0.5), dc(0.5), 3.0, c(3.0), dc(3.0)) == pytest.approx(2.0)
    assert cubic_minimizer(3.0, c(3.0), dc(3.0), 0.5, c(0.5), dc(0.5)) == pytest.approx(2.0)
    # kept inside the bounds; non-finite data → the middle of the bounds
    assert cubic_minimizer(0.5, c(0.5), dc(0.5), 3.0, c(3.0), dc(3.0), bounds=(0.6, 1.5)) == 1.5
    assert cubic_minimizer(0.0, 1.0, -1.0, 1.0, math.inf, math.nan) == 0.5
    # a quadratic (cubic term zero): its minimiser
    assert cubic_minimizer(0.0, 1.0, -2.0, 2.0, 1.0, 2.0) == pytest.approx(1.0)


def test_approximate_wolfe_at_the_precision_limit():
    """f flat to rounding along d, slope still informative: the search still moves θ."""
    A = torch.diag(torch.tensor([1.0, 100.0], dtype=D))
    b = torch.tensor([1.0, 1.0], dtype=D)

    def q(x):
        return 0.5 * x @ A @ x - b @ x + 1e3

    obj = FunctionObjective(q, 2, dtype=D)
    xs = torch.linalg.solve(A, b)
    theta = xs + torch.tensor([3e-9, 0.0], dtype=D)  # decrease ~1e-17, far below eps·f
    f0, g0 = obj.value_and_grad(theta)
    for rule in (StrongWolfe(), Armijo()):
        res = rule.search(evaluator(obj), theta, -g0, float(f0), g0, -float(g0 @ g0), 1.0)
        assert res.success
        assert float((res.theta - xs).norm()) < 1e-2 * float((theta - xs).norm())

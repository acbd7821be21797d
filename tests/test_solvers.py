"""minimize(): convergence, rates, honesty about curvature and non-finite values, sampling,
resume, stopping rules and argument checks. References: closed forms, scipy, dense float64."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from secondorder._validation import check_positive
from secondorder.data import two_class_2d
from secondorder.models import logistic_regression
from secondorder.objective import FunctionObjective, ModelObjective, quadratic, rosenbrock
from secondorder.sampling import FixedBatches, ReshuffledBatches
from secondorder.solvers import METHODS, OptionError, Result, minimize, validate_options
from secondorder.solvers.protocol import Direction
from secondorder.solvers.registry import (
    REGISTRY,
    MethodEntry,
    Option,
    accepted_options,
    all_options,
    register,
    unregister,
)

D = torch.float64
X0 = (-1.2, 1.0)


def rosen_obj(b: float = 100.0) -> FunctionObjective:
    return FunctionObjective(rosenbrock(1.0, b), 2, dtype=D)


def start() -> torch.Tensor:
    return torch.tensor(X0, dtype=D)


# the mini-batch first-order references take a fixed step lr and do not converge to a gtol
# (checked against torch.optim step for step in tests/test_firstorder.py); K-FAC needs a
# network (checked against the exact curvature engine in tests/test_kfac.py); so does sqn's
# default Gauss-Newton curvature, and it takes a fixed step too
# (tests/test_stochastic_second_order.py); Muon orthogonalises a network's weight matrices
# (checked against torch.optim.Muon in tests/test_muon.py)
FULL_BATCH_METHODS = [m for m in METHODS if m not in ("sgd", "adam", "kfac", "sqn", "muon")]
#: options a method needs on a plain function (no network, so no Gauss-Newton matrix)
ON_FUNCTIONS = {"hessian-free": {"curvature": "hessian"}}


# -- Rosenbrock -----------------------------------------------------------------------------------
@pytest.mark.parametrize("b", [100.0, 50.0])
@pytest.mark.parametrize("method", [m for m in FULL_BATCH_METHODS if m != "gd"])
def test_rosenbrock_converges(method, b):
    obj = rosen_obj(b)
    res = minimize(obj, start(), method=method, **ON_FUNCTIONS.get(method, {}))
    assert isinstance(res, Result)
    assert res.success, res.message
    assert res.status == "gtol"
    assert float((res.theta - 1).abs().max()) < 1e-8
    assert res.nfev == obj.counts.f and res.ngev == obj.counts.g
    assert res.theta.dtype == D
    assert res.trace[-1]["k"] == res.nit and res.trace[0]["k"] == 0


@pytest.mark.parametrize("line_search", ["armijo", "wolfe"])
def test_rosenbrock_gradient_descent_b50(line_search):
    # b = 50 (the seed's Figure 1): gradient descent needs thousands of iterations but gets there
    res = minimize(rosen_obj(50.0), start(), method="gd", line_search=line_search, max_iter=30000)
    assert res.success, res.message
    assert float((res.theta - 1).abs().max()) < 1e-8


SCIPY_FAMILY = {  # ours → (scipy method, options that make scipy reach ~1e-8 as well)
    "bfgs": ("BFGS", {"gtol": 1e-9}),
    "nlcg": ("CG", {"gtol": 1e-9}),
    "newton-cg": ("Newton-CG", {"xtol": 1e-12}),
    "trust-ncg": ("trust-ncg", {"gtol": 1e-9}),
    "lbfgs": ("L-BFGS-B", {"gtol": 1e-10, "ftol": 1e-20}),
}


def _scipy_rosen(b: float, method: str, options: dict):
    from scipy.optimize import minimize as sp_minimize

    def f(x):
        return (1 - x[0]) ** 2 + b * (x[1] - x[0] ** 2) ** 2

    def g(x):
        return np.array(
            [-2 * (1 - x[0]) - 4 * b * x[0] * (x[1] - x[0] ** 2), 2 * b * (x[1] - x[0] ** 2)]
        )

    def hp(x, p):
        H = np.array(
            [
                [2 - 4 * b * (x[1] - x[0] ** 2) + 8 * b * x[0] ** 2, -4 * b * x[0]],
                [-4 * b * x[0], 2 * b],
            ]
        )
        return H @ p

    kw = {"hessp": hp} if method in ("Newton-CG", "trust-ncg") else {}
    return sp_minimize(f, np.array(X0), jac=g, method=method, options=options, **kw)


def test_rosenbrock_table_against_scipy():
    """Iterations and function evaluations to reach (1, 1) within 1e-8, ours vs scipy's method
    of the same family (scipy's tolerances tightened to the same accuracy)."""
    lines = [
        f"{'b':>5} {'ours':>10} {'nit':>5} {'nfev':>5} {'err':>8}   {'scipy':>10} {'nit':>5} "
        f"{'nfev':>5} {'err':>8}  ratio"
    ]
    for b in (100.0, 50.0):
        for ours, (theirs, opts) in SCIPY_FAMILY.items():
            res = minimize(rosen_obj(b), start(), method=ours)
            sp = _scipy_rosen(b, theirs, opts)
            err = float((res.theta - 1).abs().max())
            sp_err = float(np.abs(sp.x - 1).max())
            ratio = res.nfev / sp.nfev
            lines.append(
                f"{b:5.0f} {ours:>10} {res.nit:5d} {res.nfev:5d} {err:8.1e}   {theirs:>10} "
                f"{sp.nit:5d} {sp.nfev:5d} {sp_err:8.1e}  {ratio:.2f}"
            )
            assert err < 1e-8
            assert res.nfev <= 1.5 * sp.nfev, (ours, res.nfev, theirs, sp.nfev)
    print("\nRosenbrock from (-1.2, 1), float64: ours vs scipy\n" + "\n".join(lines))


# -- rates of convergence ------------------------------------------------------------------------
def _errors(res: Result) -> list[float]:
    return [float((row["theta"] - 1).norm()) for row in res.trace]


def test_newton_converges_quadratically():
    res = minimize(rosen_obj(), start(), method="newton", trace_theta=True, gtol=1e-12)
    e = _errors(res)
    tail = [(e[i], e[i + 1]) for i in range(len(e) - 1) if e[i + 1] > 1e-12 and e[i] < 1e-1]
    assert len(tail) >= 2
    ratios = [b / a**2 for a, b in tail]
    assert max(ratios) < 1e3, ratios  # e_{k+1} ≤ C e_k² with a moderate C
    assert e[-1] < 1e-12


def test_bfgs_converges_superlinearly():
    res = minimize(rosen_obj(), start(), method="bfgs", trace_theta=True, gtol=1e-12)
    e = _errors(res)
    ratios = [e[i + 1] / e[i] for i in range(len(e) - 1) if e[i + 1] > 1e-12]
    assert ratios[-1] < 0.02, ratios[-6:]  # e_{k+1}/e_k → 0
    assert min(ratios[-3:]) < 0.01
    assert max(ratios[:5]) > 0.1  # the early phase is not superlinear: the test sees the trend


# -- logistic regression (eqs. 15-18) ------------------------------------------------------------
@pytest.fixture(scope="module")
def two_class():
    return two_class_2d(n_train=200, n_val=100, seed=0)


def _logreg(data, sampler=None, dtype=D):
    return ModelObjective(
        logistic_regression(2, dtype=dtype),
        "logistic",
        (data.train.X.to(dtype), data.train.y),
        sampler=sampler,
    )


def _grad_eq17(data, theta):
    """Eq. 17 with X augmented by a ones column: (1/m) Xᵀ(h − y); θ = (w1, w2, bias)."""
    X = torch.cat([data.train.X, torch.ones(len(data.train.X), 1, dtype=D)], 1)
    h = torch.sigmoid(X @ theta)
    return X.T @ (h - data.train.y.to(D)) / len(X)


def test_logistic_regression_all_methods_agree(two_class):
    thetas, accs = {}, {}
    for method in FULL_BATCH_METHODS:
        obj = _logreg(two_class)
        res = minimize(obj, obj.initial_theta(), method=method, max_iter=5000)
        assert res.success, (method, res.message)
        assert float(_grad_eq17(two_class, res.theta).norm()) < 1e-8, method
        thetas[method] = res.theta
        accs[method] = obj.accuracy(res.theta, two_class.test.X, two_class.test.y)
    ref = thetas["newton"]
    for method, t in thetas.items():
        assert torch.allclose(t, ref, atol=1e-7), method
    assert len(set(accs.values())) == 1, accs
    assert accs["newton"] > 0.8


def test_float32_logistic_regression(two_class):
    for method in ("lbfgs", "newton-cg", "nlcg", "trust-ncg"):
        obj = _logreg(two_class, dtype=torch.float32)
        res = minimize(obj, obj.initial_theta(), method=method)
        assert res.theta.dtype == torch.float32 and res.grad.dtype == torch.float32
        assert res.success, (method, res.message)
        ref = minimize(_logreg(two_class), _logreg(two_class).initial_theta(), method="newton")
        assert torch.allclose(res.theta.double(), ref.theta, atol=1e-3), method


def test_ggn_curvature_and_damping(two_class):
    obj = _logreg(two_class)
    res = minimize(obj, obj.initial_theta(), method="newton-cg", curvature="ggn", damping=1.0)
    assert res.success, res.message
    assert obj.counts.ggnv > 0
    assert res.info["damping"] < 1.0  # λ shrank on good reduction ratios
    assert float(_grad_eq17(two_class, res.theta).norm()) < 1e-8


def test_newton_cg_damping_engages_from_zero():
    """λ = 0 (the default) is not a dead end: a poor reduction ratio ρ raises λ to
    λ_min = 1e-4·max(1, ‖g‖₂), good ratios lower it by 2/3 and back to 0 below λ_min."""
    from secondorder.solvers.directions import Iterate, NewtonCG

    d = NewtonCG()
    it = Iterate(
        objective=None, theta=torch.zeros(2, dtype=D), f=1.0, g=torch.tensor([3.0, 4.0]), k=0
    )
    d._model = (-1.0, 1.0)  # the model predicts a reduction of 0.5 for the full step
    d.after_step(it, 1.0, -1.0, 0.99)  # ρ = 0.02
    assert it.info["rho"] == pytest.approx(0.02) and d.damping == pytest.approx(5e-4)
    d.after_step(it, 1.0, -1.0, 0.99)
    assert d.damping == pytest.approx(7.5e-4)
    d.after_step(it, 1.0, -1.0, 0.5)  # ρ = 1
    assert d.damping == pytest.approx(5e-4)
    d.after_step(it, 1.0, -1.0, 0.5)
    assert d.damping == 0.0

    # a tanh network: the Newton model predicts poorly at some step, and λ engages there
    from secondorder.models import mlp

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(100, 4, generator=g, dtype=D), torch.randint(0, 3, (100,), generator=g)
    torch.manual_seed(0)
    obj = ModelObjective(mlp([4, 8, 3], activation="tanh", dtype=D), "cross_entropy", (X, y))
    res = minimize(obj, obj.initial_theta(), method="newton-cg", max_iter=30, check_saddle=False)
    poor = [r["k"] for r in res.trace if r.get("rho", 1.0) < 0.25]
    assert poor, "expected a poor reduction ratio on this problem"
    assert res.trace[poor[0] + 1]["damping"] > 0  # the next direction is damped

    # where the model is good (Rosenbrock, logistic regression) λ stays 0: no extra evaluations
    for b, nfev in ((100.0, 40), (50.0, 21)):
        res = minimize(rosen_obj(b), start(), method="newton-cg")
        assert res.success and res.nfev <= nfev and res.info["damping"] == 0.0


@pytest.mark.parametrize(
    "preconditioner", ["eq14", "hessian-diag", "ggn-diag", "tensor", "callable"]
)
@pytest.mark.parametrize("method", ["lbfgs", "nlcg", "newton-cg", "trust-ncg", "gd"])
def test_preconditioners(two_class, preconditioner, method):
    obj = _logreg(two_class)
    pre = preconditioner
    if pre == "tensor":
        pre = torch.tensor([2.0, 3.0, 1.0], dtype=D)
    elif pre == "callable":
        pre = lambda v: v / torch.tensor([2.0, 3.0, 1.0], dtype=D)  # noqa: E731
        if method == "trust-ncg":
            with pytest.raises(ValueError, match="diagonal"):
                minimize(obj, obj.initial_theta(), method=method, preconditioner=pre)
            return
    res = minimize(obj, obj.initial_theta(), method=method, preconditioner=pre, max_iter=5000)
    assert res.success, res.message
    assert float(_grad_eq17(two_class, res.theta).norm()) < 1e-8


def test_eq14_diagonal_matches_per_sample_gradients(two_class):
    from secondorder.solvers.precondition import eq14_diagonal

    obj = _logreg(two_class)
    theta = torch.tensor([0.3, -0.2, 0.1], dtype=D)
    X = torch.cat([two_class.train.X, torch.ones(200, 1, dtype=D)], 1)
    G = (torch.sigmoid(X @ theta) - two_class.train.y.to(D))[:, None] * X  # per-sample ∇ℓ_i
    assert torch.allclose(eq14_diagonal(obj, theta), (G**2).sum(0).sqrt())
    assert torch.allclose(eq14_diagonal(obj, theta, chunk_bytes=64), (G**2).sum(0).sqrt())


@pytest.mark.parametrize("which", ["hessian", "ggn"])
def test_curvature_diagonals_match_products(which):
    from secondorder.models import mlp
    from secondorder.solvers.precondition import _library_diagonal, curvature_diagonal

    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 4, generator=g, dtype=D)
    y = torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(0)
    obj = ModelObjective(
        mlp([4, 5, 3], activation="sigmoid", dtype=D), "cross_entropy", (X, y), l2=0.1
    )
    theta = obj.initial_theta() + 0.1
    product = obj.hvp_at(theta) if which == "hessian" else obj.ggnvp_at(theta)
    eye = torch.eye(obj.n_params, dtype=D)
    exact = torch.stack([product(eye[i])[i] for i in range(obj.n_params)])
    assert torch.allclose(curvature_diagonal(obj, theta, which), exact, atol=1e-12)
    lib = _library_diagonal(obj, theta, which)  # secondorder.curvature, when present
    if lib is not None:
        assert torch.allclose(lib, exact, atol=1e-12)
    hutch = curvature_diagonal(obj, theta, which, exact_limit=0, probes=2000)
    assert torch.allclose(hutch, exact, atol=0.1 * float(exact.abs().max()))


def test_eq14_needs_a_model_objective():
    obj = rosen_obj()
    with pytest.raises(ValueError, match="ModelObjective"):
        minimize(obj, start(), method="lbfgs", preconditioner="eq14")
    assert obj.counts.f == 0


# -- quadratics: known minimiser, indefinite, saddle ----------------------------------------------
def _spd(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))[0]
    A = Q @ torch.diag(torch.logspace(0, 2, n, dtype=D)) @ Q.T
    b = torch.randn(n, generator=g, dtype=D)
    return A, b


@pytest.mark.parametrize("method", FULL_BATCH_METHODS)
def test_quadratic_known_minimiser(method):
    A, b = _spd()
    res = minimize(
        quadratic(A, b),
        torch.zeros(6, dtype=D),
        method=method,
        max_iter=20000,
        **ON_FUNCTIONS.get(method, {}),
    )
    assert res.success, res.message
    assert torch.allclose(res.theta, torch.linalg.solve(A, b), atol=1e-8)
    if method == "newton":
        assert res.nit == 1  # one exact Newton step
    assert not res.negative_curvature


INDEFINITE = (torch.diag(torch.tensor([2.0, -1.0], dtype=D)), torch.tensor([1.0, 1.0], dtype=D))


@pytest.mark.parametrize("method", ["newton", "newton-cg", "trust-ncg", "arc"])
def test_indefinite_quadratic_reports_negative_curvature(method):
    res = minimize(
        quadratic(*INDEFINITE), torch.tensor([0.5, 0.3], dtype=D), method=method, max_iter=20
    )
    assert res.negative_curvature
    assert res.negative_curvature_iterations and res.negative_curvature_iterations[0] == 0
    assert "negative curvature" in res.message
    assert not res.success  # unbounded below: it must not claim convergence
    assert res.f < quadratic(*INDEFINITE)(torch.tensor([0.5, 0.3], dtype=D))  # it went downhill


@pytest.mark.parametrize("modification", ["damping", "eigen", "saddle-free"])
def test_newton_modifications_give_descent(modification):
    res = minimize(
        quadratic(*INDEFINITE),
        torch.tensor([0.5, 0.3], dtype=D),
        method="newton",
        modification=modification,
        max_iter=5,
    )
    assert res.negative_curvature and "indefinite" in res.message
    fs = res.trace["f"]
    assert all(b < a for a, b in zip(fs, fs[1:]))


@pytest.mark.parametrize("method", ["gd", "lbfgs", "bfgs", "nlcg"])
def test_saddle_point_is_not_claimed_as_minimum(method):
    # methods without curvature information stop there, with status saddle
    stationary = torch.tensor([0.5, -1.0], dtype=D)  # ∇q = 0 there; q is indefinite
    res = minimize(quadratic(*INDEFINITE), stationary, method=method, check_saddle=True)
    assert res.status == "saddle" and not res.success
    assert res.negative_curvature
    assert "saddle" in res.message and "negative eigenvalue" in res.message


@pytest.mark.parametrize("method", ["newton", "newton-cg", "trust-ncg", "arc"])
def test_second_order_methods_leave_a_saddle_of_an_unbounded_quadratic(method):
    stationary = torch.tensor([0.5, -1.0], dtype=D)
    q = quadratic(*INDEFINITE)
    res = minimize(q, stationary, method=method, max_iter=20)
    assert not res.success and res.status not in ("gtol", "saddle")
    assert res.negative_curvature and "left a saddle point" in res.message
    assert res.f < float(q(stationary)) - 1.0  # q is unbounded below along the second axis


# -- non-finite values ------------------------------------------------------------------------
def nan_outside(x: torch.Tensor) -> torch.Tensor:
    """x² inside ‖x‖ < 2, NaN outside (a constant without a graph)."""
    if x.norm() < 2:
        return (x**2).sum()
    return torch.tensor(float("nan"), dtype=x.dtype)


def nan_outside_where(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.norm() < 2, (x**2).sum(), torch.full((), float("nan"), dtype=x.dtype))


@pytest.mark.parametrize("fn", [nan_outside, nan_outside_where])
def test_nonfinite_values_backtrack(fn):
    x0 = torch.tensor([1.5], dtype=D)
    res = minimize(fn, x0, method="gd", line_search=None, lr=10.0, max_iter=30)
    assert math.isfinite(res.f) and bool(torch.isfinite(res.theta).all())
    assert res.nonfinite and "non-finite" in res.message
    for ls in ("armijo", "wolfe"):
        res = minimize(fn, x0, method="gd", line_search=ls, lr=10.0)
        assert res.success and res.nonfinite and "non-finite" in res.message
        assert abs(float(res.theta)) < 1e-8
    for method, kw in [
        ("lbfgs", {"lr": 5.0}),
        ("nlcg", {"lr": 5.0}),
        ("newton", {"lr": 5.0}),
        ("trust-ncg", {"initial_radius": 5.0}),
        ("arc", {"sigma0": 1e-3}),
    ]:
        res = minimize(fn, torch.tensor([1.9], dtype=D), method=method, **kw)
        assert res.success, (method, res.message)


def test_nonfinite_start_is_reported():
    res = minimize(nan_outside, torch.tensor([3.0], dtype=D), method="lbfgs")
    assert res.status == "nonfinite" and not res.success and "not finite" in res.message


# -- sampling -----------------------------------------------------------------------------------
def test_reshuffled_batches_faithful_and_robust(two_class):
    """Batches redrawn every iteration (the seed's Table 1 setting, 5 batches of 20)."""

    def obj():
        return _logreg(two_class, ReshuffledBatches(200, 20, n_batches=5, seed=1))

    optimum = 0.15331278173847224  # full-batch minimum (see the test above)
    for method in ("lbfgs", "nlcg"):
        o = obj()
        with pytest.warns(RuntimeWarning, match="robust=True"):
            faithful = minimize(o, o.initial_theta(), method=method, max_iter=60)
        assert faithful.objective_changes > 0
        assert "objective changed between iterations" in faithful.message
        o = obj()
        robust = minimize(
            o,
            o.initial_theta(),
            method=method,
            robust=True,
            max_iter=60,
            callback=lambda info, o=o: {"full_loss": o.full_loss(info["theta"])},
        )
        assert robust.nit == 60 and robust.status == "max_iter", robust.message
        full = robust.trace["full_loss"]
        assert full[0] == pytest.approx(math.log(2))
        assert sum(full[-10:]) / 10 < optimum + 0.03  # it keeps working near the optimum
        assert "robust mode" in robust.message
    # faithful NLCG breaks down as the seed's did (Table 1): it stops early and says why
    o = obj()
    with pytest.warns(RuntimeWarning):
        res = minimize(o, o.initial_theta(), method="nlcg", max_iter=60)
    assert res.status == "objective_changed" and res.nit < 60 and not res.success
    assert "reshuffled batches" in res.message and "robust=True" in res.message


def test_fixed_batches_equal_full_batch(two_class):
    # 20 batches of 10 partition the 200 samples: eq. 28 is the full objective
    obj = _logreg(two_class, FixedBatches(200, 10))
    res = minimize(obj, obj.initial_theta(), method="lbfgs")
    ref = minimize(_logreg(two_class), _logreg(two_class).initial_theta(), method="lbfgs")
    assert res.success and torch.allclose(res.theta, ref.theta, atol=1e-8)
    assert res.objective_changes == 0


@pytest.mark.parametrize("method", METHODS)
def test_batches_redrawn_at_every_evaluation_do_not_crash(two_class, method):
    obj = _logreg(two_class, ReshuffledBatches(200, 10, n_batches=3, seed=2, every="evaluation"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = minimize(obj, obj.initial_theta(), method=method, max_iter=15)
    assert math.isfinite(res.f) and bool(torch.isfinite(res.theta).all())
    assert res.status in ("max_iter", "line_search", "stalled", "objective_changed", "gtol")
    assert obj.full_loss(res.theta) < obj.full_loss(obj.initial_theta())


# -- resume -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "problem,method",
    [("rosenbrock", m) for m in FULL_BATCH_METHODS] + [("logistic", m) for m in METHODS],
)
def test_resume_is_exact(method, problem, two_class):
    def make():
        if problem == "rosenbrock":
            return rosen_obj(), start()
        o = _logreg(two_class, ReshuffledBatches(200, 20, n_batches=4, seed=3))
        return o, o.initial_theta()

    kw = {"gtol": 1e-30, "robust": True} if method in ("lbfgs", "nlcg", "bfgs") else {"gtol": 1e-30}
    if problem == "rosenbrock":
        kw.update(ON_FUNCTIONS.get(method, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        o, t0 = make()
        whole = minimize(o, t0, method=method, max_iter=20, **kw)
        o, t0 = make()
        first = minimize(o, t0, method=method, max_iter=10, **kw)
        o, t0 = make()
        second = minimize(o, t0, method=method, max_iter=10, initial_state=first.state, **kw)
    assert whole.nit == 20 == second.nit, (whole.message, second.message)
    assert torch.equal(second.theta, whole.theta)
    assert second.nfev == whole.nfev and second.nhev == whole.nhev
    assert [r["f"] for r in first.trace] + [r["f"] for r in second.trace] == whole.trace["f"]


def _rows(trace) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time"} for row in trace]


def _split_run(make, method, kw, fresh=True):
    """(12 uninterrupted iterations, first 6, 6 resumed from the first part's state)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        o = make()
        whole = minimize(o, o.initial_theta(), method=method, max_iter=12, gtol=1e-30, **kw)
        o = make()
        first = minimize(o, o.initial_theta(), method=method, max_iter=6, gtol=1e-30, **kw)
        o = make() if fresh else o
        state = first.state
        second = minimize(
            o, o.initial_theta(), method=method, max_iter=6, gtol=1e-30, initial_state=state, **kw
        )
    return whole, first, second


def _assert_same_run(whole, first, second):
    assert torch.equal(second.theta, whole.theta)
    assert _rows(first.trace) + _rows(second.trace) == _rows(whole.trace)
    assert second.objective_changes == whole.objective_changes
    assert (second.status, second.nit, second.nfev) == ("max_iter", 12, whole.nfev)


@pytest.mark.parametrize(
    "method, kw",
    [("lbfgs", {}), ("lbfgs", {"robust": True}), ("nlcg", {"robust": True})],
    ids=["lbfgs-faithful", "lbfgs-robust", "nlcg-robust"],
)
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-objective", "same-objective"])
def test_resume_after_the_function_changed_is_exact(two_class, method, kw, fresh):
    """6 iterations + 6 resumed == 12 uninterrupted with batches redrawn every iteration: the
    first resumed iteration sees the change (its ``changed`` row, the robust restart, the
    change count) exactly as the uninterrupted run does, whether it continues on the objective
    the first part stopped with or on a freshly built one."""

    def make():
        return _logreg(two_class, ReshuffledBatches(200, 20, n_batches=4, seed=3))

    whole, first, second = _split_run(make, method, kw, fresh)
    _assert_same_run(whole, first, second)
    assert whole.objective_changes == 11
    assert second.trace[0]["changed"] is True and whole.trace[7]["changed"] is True


@pytest.mark.parametrize(
    "method, kw",
    [("lbfgs", {"robust": True, "line_search": None, "lr": 0.5}), ("gd", {"line_search": None})],
    ids=["lbfgs", "gd"],
)
def test_resume_with_batches_drawn_per_evaluation_is_exact(two_class, method, kw):
    """Batches drawn at every evaluation: the state carries the evaluation count, so a fresh
    objective continues with the batches the uninterrupted run would have drawn."""

    def make():
        sampler = ReshuffledBatches(200, 20, n_batches=4, seed=3, every="evaluation")
        return _logreg(two_class, sampler)

    _assert_same_run(*_split_run(make, method, kw))


# -- stopping rules, trace, callback, counters ---------------------------------------------------
def test_stopping_rules():
    res = minimize(rosen_obj(), start(), method="lbfgs", ftol=1e-3)
    assert res.status == "ftol" and res.success and "eq. 29" in res.message
    fs = res.trace["f"]
    assert abs(fs[-1] - fs[-2]) <= 1e-3
    obj = rosen_obj()
    res = minimize(obj, start(), method="nlcg", max_evals=17)
    assert res.status == "max_evals" and not res.success and obj.counts.f <= 17 + 1
    res = minimize(rosen_obj(), start(), method="gd", max_iter=7)
    assert res.status == "max_iter" and res.nit == 7 and len(res.trace) == 8
    res = minimize(rosen_obj(), start(), method="gd", max_time=1e-9)
    assert res.status == "max_time" and res.nit == 1


def test_trace_columns_and_counters():
    obj = rosen_obj()
    res = minimize(obj, start(), method="lbfgs")
    cols = res.trace.to_columns()
    for key in ("k", "f", "grad_norm", "step", "nfev", "ngev", "nhev", "time"):
        assert key in cols and len(cols[key]) == len(res.trace)
    assert cols["k"] == list(range(res.nit + 1))
    assert all(b >= a for a, b in zip(cols["time"], cols["time"][1:]))
    assert cols["nfev"][-1] == res.nfev == obj.counts.f
    # every point is evaluated once: the accepted point's f and g are reused
    assert res.nfev == res.ngev == 1 + sum(r["ls_evals"] for r in res.trace.rows[1:])
    assert res.trace[-1]["f"] == res.f and res.trace[-1]["grad_norm"] == res.grad_norm
    assert res.grad_norm == float(res.grad.abs().max())
    assert res.x is res.theta and res.fun == res.f


def test_callback_metrics_and_stop(two_class):
    obj = _logreg(two_class)
    seen = []

    def cb(info):
        seen.append(info["k"])
        assert info["theta"].shape == (3,) and "f" in info and info["objective"] is obj
        acc = obj.accuracy(info["theta"], two_class.test.X, two_class.test.y)
        return {"dev_accuracy": acc}

    res = minimize(obj, obj.initial_theta(), method="bfgs", callback=cb)
    assert seen == list(range(res.nit + 1))
    assert all("dev_accuracy" in r for r in res.trace)
    res = minimize(obj, obj.initial_theta(), method="bfgs", callback=lambda i: i["k"] >= 3)
    assert res.status == "callback" and res.nit == 3 and not res.success


def test_verbose(capsys):
    minimize(rosen_obj(), start(), method="newton", verbose=True, max_iter=2)
    out = capsys.readouterr().out
    assert "[newton]" in out and out.count("\n") == 3


def test_plain_callable_and_dtype():
    res = minimize(rosenbrock(), torch.tensor(X0, dtype=torch.float32), method="lbfgs")
    assert res.theta.dtype == torch.float32 and res.success
    assert float((res.theta - 1).abs().max()) < 1e-3
    res = minimize(rosenbrock(), [-1.2, 1.0], method="bfgs")  # array-like θ₀
    assert res.success


# -- argument checks: all before any evaluation --------------------------------------------------
BAD_OPTIONS = pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"method": "lbgfs"}, ValueError, "did you mean 'lbfgs'"),
        ({"method": "gd", "memory": 5}, (TypeError, ValueError), "memory.*gd"),
        ({"method": "lbfgs", "variant": "fr"}, (TypeError, ValueError), "variant.*lbfgs"),
        ({"method": "trust-ncg", "line_search": "wolfe"}, (TypeError, ValueError), "line search"),
        ({"method": "arc", "lr": 0.1}, (TypeError, ValueError), "lr"),
        ({"method": "newton", "preconditioner": "eq14"}, (TypeError, ValueError), "precondition"),
        ({"method": "lbfgs", "gtol": 0.0}, ValueError, "gtol"),
        ({"method": "lbfgs", "gtol": -1.0}, ValueError, "gtol"),
        ({"method": "lbfgs", "ftol": 0.0}, ValueError, "ftol"),
        ({"method": "lbfgs", "max_iter": 0}, ValueError, "max_iter"),
        ({"method": "lbfgs", "memory": 0}, ValueError, "memory"),
        ({"method": "nlcg", "variant": "pr"}, ValueError, "variant"),
        ({"method": "newton", "modification": "eig"}, ValueError, "did you mean 'eigen'"),
        ({"method": "newton-cg", "curvature": "ggn"}, ValueError, "Gauss-Newton"),
        ({"method": "lbfgs", "line_search": "wolf"}, ValueError, "wolfe"),
        ({"method": "lbfgs", "c1": 0.5, "c2": 0.1}, ValueError, "c1"),
        ({"method": "gd", "line_search": None, "c1": 0.1}, (TypeError, ValueError), "c1"),
        ({"method": "lbfgs", "bogus": 1}, TypeError, "bogus"),
        ({"method": "lbfgs", "callback": 3}, TypeError, "callback"),
        ({"method": "lbfgs", "preconditioner": "adagrad"}, ValueError, "preconditioner"),
        ({"method": "lbfgs", "preconditioner": torch.ones(3, dtype=D)}, ValueError, "2 entries"),
        ({"method": "trust-ncg", "initial_radius": 5.0, "max_radius": 1.0}, ValueError, "radius"),
        ({"method": "lbfgs", "initial_state": {"x": 1}}, TypeError, "initial_state"),
    ],
)


@BAD_OPTIONS
def test_bad_options_refused_before_evaluation(kwargs, exc, match):
    obj = rosen_obj()
    kwargs = dict(kwargs)
    method = kwargs.pop("method")
    with pytest.raises(exc, match=match):
        minimize(obj, start(), method=method, **kwargs)
    assert obj.counts.as_dict() == {"f": 0, "g": 0, "hv": 0, "ggnv": 0, "hessian": 0}


@BAD_OPTIONS
def test_validate_options_raises_what_minimize_raises(kwargs, exc, match):
    kwargs = dict(kwargs)
    method = kwargs.pop("method")
    obj = rosen_obj()
    with pytest.raises(exc, match=match) as checked:
        validate_options(obj, method, **kwargs)
    assert obj.counts.as_dict() == {"f": 0, "g": 0, "hv": 0, "ggnv": 0, "hessian": 0}
    with pytest.raises(exc) as ran:
        minimize(rosen_obj(), start(), method=method, **kwargs)
    assert type(ran.value) is type(checked.value) and str(ran.value) == str(checked.value)
    if "ggn" not in str(kwargs) and "2 entries" not in match:  # needs no objective: a size will do
        with pytest.raises(exc, match=match):
            validate_options(2, method, **kwargs)


def test_validate_options_resolves_defaults_without_evaluating():
    obj = rosen_obj()
    cfg = validate_options(obj, "lbfgs", memory=5)
    assert cfg["method"] == "lbfgs" and cfg["line_search"] == "wolfe"
    assert cfg["max_iter"] == 1000 and cfg["gtol"] == 1e-9 and cfg["robust"] is False
    assert validate_options(obj, "gd", line_search=None, lr=0.1)["line_search"] is None
    assert validate_options(obj, "trust-ncg")["line_search"] is None
    assert obj.counts.f == 0 and obj.counts.g == 0
    # known by its size only: the checks that need the objective itself are left out
    validate_options(3, "newton-cg", curvature="ggn", preconditioner="eq14")
    with pytest.raises(ValueError, match="Gauss-Newton"):
        validate_options(rosen_obj(), "newton-cg", curvature="ggn")
    with pytest.raises(MemoryError, match="Hessian"):
        validate_options(200_000, "newton")
    with pytest.raises(ValueError, match="3 entries"):
        validate_options(3, "lbfgs", preconditioner=torch.ones(2))
    with pytest.raises(TypeError, match="number of parameters"):
        validate_options("rosenbrock", "lbfgs")
    with pytest.raises(ValueError, match="n_params"):
        validate_options(0, "lbfgs")
    with pytest.raises(OptionError, match="objective_or_n_params"):
        validate_options(2, "lbfgs", objective_or_n_params=3)


def test_option_error_is_both_type_and_value_error():
    with pytest.raises(OptionError):
        minimize(rosen_obj(), start(), method="gd", memory=3)
    assert issubclass(OptionError, TypeError) and issubclass(OptionError, ValueError)


@pytest.mark.parametrize(
    "theta0, exc",
    [
        (torch.tensor([float("nan"), 1.0], dtype=D), ValueError),
        (torch.tensor([1.0, float("inf")], dtype=D), ValueError),
        (torch.zeros(3, dtype=D), ValueError),
        ("abc", TypeError),
    ],
)
def test_bad_theta0_refused_before_evaluation(theta0, exc):
    obj = rosen_obj()
    with pytest.raises(exc):
        minimize(obj, theta0, method="lbfgs")
    assert obj.counts.f == 0 and obj.counts.g == 0


def test_state_survives_torch_save(tmp_path):
    first = minimize(rosen_obj(), start(), method="lbfgs", max_iter=8, gtol=1e-30)
    path = tmp_path / "state.pt"
    torch.save(first.state, path)
    state = torch.load(path, weights_only=True)
    second = minimize(
        rosen_obj(), start(), method="lbfgs", max_iter=8, gtol=1e-30, initial_state=state
    )
    whole = minimize(rosen_obj(), start(), method="lbfgs", max_iter=16, gtol=1e-30)
    assert torch.equal(second.theta, whole.theta)


def test_dense_newton_refused_before_evaluation_when_too_big():
    from secondorder.objective import MemoryError_

    obj = FunctionObjective(lambda x: (x**2).sum(), 200_000, dtype=D)
    with pytest.raises(MemoryError_, match="Hessian"):
        minimize(obj, torch.zeros(200_000, dtype=D), method="newton")
    assert obj.counts.f == 0


def test_initial_state_of_another_method_is_refused():
    res = minimize(rosen_obj(), start(), method="lbfgs", max_iter=2)
    obj = rosen_obj()
    with pytest.raises(ValueError, match="lbfgs"):
        minimize(obj, start(), method="bfgs", initial_state=res.state)
    assert obj.counts.f == 0


# -- the method registry -------------------------------------------------------------------------
def _docs_text() -> str:
    return (Path(__file__).resolve().parents[1] / "docs" / "solvers.md").read_text()


def _shown(default) -> str:
    """A default as docs/solvers.md writes it (`name=default`)."""
    if isinstance(default, str):
        return f'"{default}"'
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def test_docs_list_every_option_of_every_method():
    """The methods table of docs/solvers.md names every option of each registry entry in its
    row (with the registry's default where it shows one), and every option a method accepts
    appears in the docs: docs and registry cannot drift apart."""
    text = _docs_text()
    rows = {
        line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `")
    }
    for name, entry in REGISTRY.items():
        row = rows[f'`"{name}"`']
        for opt in entry.options:
            assert f"`{opt.name}" in row, (name, opt.name)
            shown = re.search(rf"`{re.escape(opt.name)}=([^`]*)`", row)
            if shown is not None:
                assert shown.group(1) == _shown(opt.default), (name, opt.name, shown.group(1))
        for option in accepted_options(name):
            assert re.search(rf"`{re.escape(option)}\b", text), (name, option)


class ScaledDescent(Direction):
    """d = −c·M⁻¹g: the toy method registered by the test below."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def compute(self, it):
        return -self.scale * it.minv(it.g)


def test_a_method_is_one_direction_class_and_one_registry_entry():
    register(
        MethodEntry(
            "scaled-gd",
            "scaled gradient descent",
            lambda o: ScaledDescent(o["scale"]),
            (Option("scale", 0.5, check_positive),),
        )
    )
    try:
        assert accepted_options("scaled-gd") >= {"scale", "lr", "c1", "preconditioner", "gtol"}
        cfg = validate_options(2, "scaled-gd", scale=2.0)
        assert cfg["line_search"] == "armijo" and cfg["check_saddle"] is False
        with pytest.raises(ValueError, match="scale must be a finite number > 0"):
            validate_options(2, "scaled-gd", scale=-1.0)
        with pytest.raises(OptionError, match="memory.*scaled-gd.*lbfgs"):
            validate_options(2, "scaled-gd", memory=3)
        with pytest.raises(OptionError, match="scale.*gd.*scaled-gd"):
            validate_options(2, "gd", scale=3)
        A, b = _spd(4)
        obj = FunctionObjective(quadratic(A, b), 4, dtype=D)
        res = minimize(obj, torch.zeros(4, dtype=D), method="scaled-gd", scale=0.25)
        assert res.success and res.method == "scaled-gd", res.message
        assert torch.allclose(res.theta, torch.linalg.solve(A, b), atol=1e-6)
        again = minimize(obj, torch.zeros(4, dtype=D), method="scaled-gd", scale=0.25, max_iter=3)
        more = minimize(
            obj, torch.zeros(4, dtype=D), method="scaled-gd", scale=0.25, initial_state=again.state
        )
        assert torch.equal(more.theta, res.theta)
    finally:
        unregister("scaled-gd")
    assert "scaled-gd" not in REGISTRY and "scale" not in all_options()
    with pytest.raises(ValueError, match="method='scaled-gd' is not one of"):
        validate_options(2, "scaled-gd")


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda s: s.pop("k"), r"lacks \['k'\]"),
        (lambda s: s.update(k=-1), "non-negative int"),
        (lambda s: s.update(k="3"), "non-negative int"),
    ],
)
def test_a_damaged_initial_state_is_refused_before_any_evaluation(edit, match):
    obj = FunctionObjective(rosenbrock(), 2, dtype=torch.float64)
    first = minimize(obj, torch.zeros(2, dtype=torch.float64), "lbfgs", max_iter=3)
    state = dict(first.state)
    edit(state)
    before = obj.counts.f
    with pytest.raises(ValueError, match=match):
        minimize(obj, torch.zeros(2, dtype=torch.float64), "lbfgs", initial_state=state)
    assert obj.counts.f == before


def test_a_short_closed_form_gradient_is_not_mistaken_for_convergence():
    obj = FunctionObjective(
        lambda x: (x**2).sum(), 3, dtype=torch.float64, grad_fn=lambda x: torch.zeros(1)
    )
    with pytest.raises(ValueError, match="grad_fn must return a tensor of shape"):
        minimize(obj, torch.ones(3, dtype=torch.float64), "lbfgs")


def test_newton_never_solves_with_a_failed_cholesky_factor(monkeypatch):
    """When no damping makes H + τI factorisable, Newton takes the eigenvalue-modified step
    (checked against a dense eigendecomposition) instead of solving with the failed factor."""
    A = torch.tensor([[2.0, 0.3], [0.3, -1.0]], dtype=torch.float64)
    obj = FunctionObjective(quadratic(A), 2, dtype=torch.float64)
    x0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    real = torch.linalg.cholesky_ex

    def failing(M, *args, **kwargs):
        L, info = real(M, *args, **kwargs)
        return torch.full_like(L, math.nan), torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    res = minimize(obj, x0, "newton", line_search=None, max_iter=1, gtol=None)
    evals, evecs = torch.linalg.eigh(A)
    delta = math.sqrt(torch.finfo(torch.float64).eps) * float(evals.abs().max())
    g = A @ x0
    expected = x0 - evecs @ ((evecs.T @ g) / evals.clamp_min(delta))
    torch.testing.assert_close(res.theta, expected, rtol=1e-12, atol=1e-12)
    assert math.isnan(res.trace[1]["tau"])


def test_warm_started_newton_cg_leaves_a_saddle_instead_of_shrinking_its_last_step():
    """f = x² − y² + y⁴/4 from next to its saddle: the minimisers are (0, ±√2). A warm start
    that meets negative curvature at once used to be returned as it was, so every step was
    0.95× the last (2000 iterations, ‖g‖ ≈ 0.16)."""
    obj = FunctionObjective(lambda z: z[0] ** 2 - z[1] ** 2 + z[1] ** 4 / 4, 2, dtype=torch.float64)
    res = minimize(obj, torch.tensor([0.5, 1e-3], dtype=torch.float64), "newton-cg", max_iter=200)
    assert res.success and res.nit < 50, (res.nit, res.message)
    torch.testing.assert_close(
        res.theta, torch.tensor([0.0, math.sqrt(2.0)], dtype=torch.float64), atol=1e-8, rtol=0
    )

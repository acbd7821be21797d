"""scipy.optimize methods on an Objective: our Result, our trace, counts from our counters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize as sp_minimize

from secondorder.data import two_class_2d
from secondorder.models import logistic_regression
from secondorder.objective import FunctionObjective, ModelObjective, rosenbrock
from secondorder.scipy_bridge import scipy_minimize
from secondorder.solvers import STATUSES, Result, minimize

D = torch.float64
X0 = torch.tensor([-1.2, 1.0], dtype=D)


def _numpy_rosen():
    def f(x):
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    def g(x):
        return np.array(
            [-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2), 200 * (x[1] - x[0] ** 2)]
        )

    return f, g


def test_lbfgsb_on_rosenbrock():
    obj = FunctionObjective(rosenbrock(), 2, dtype=D)
    res = scipy_minimize(obj, X0, method="L-BFGS-B", gtol=1e-10, ftol=1e-20)
    assert isinstance(res, Result) and res.success and res.method == "scipy:L-BFGS-B"
    assert float((res.theta - 1).abs().max()) < 1e-8 and res.theta.dtype == D
    sp = res.info["scipy"]
    # one value_and_grad per point: our counts are scipy's
    assert res.nfev == sp.nfev == obj.counts.f and res.ngev == sp.njev == obj.counts.g
    f, g = _numpy_rosen()
    ref = sp_minimize(
        f, X0.numpy(), jac=g, method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 1e-20}
    )
    assert ref.nfev == sp.nfev and np.allclose(ref.x, res.theta.numpy(), atol=1e-12)
    # the trace: a row per iteration plus the start, same columns as minimize's
    assert len(res.trace) == sp.nit + 1
    cols = res.trace.to_columns()
    for key in ("k", "f", "grad_norm", "step", "nfev", "ngev", "nhev", "time"):
        assert key in cols
    assert cols["k"] == list(range(sp.nit + 1))
    assert cols["f"][-1] == pytest.approx(res.f) and cols["nfev"][-1] <= res.nfev
    assert all(np.isfinite(cols["grad_norm"]))
    common = {"k", "f", "grad_norm", "step", "nfev", "ngev", "nhev", "time"}
    assert common <= set(minimize(obj, X0, method="lbfgs").trace.keys())


@pytest.mark.parametrize("method", ["Newton-CG", "trust-ncg", "trust-krylov"])
def test_hessian_vector_methods(method):
    obj = FunctionObjective(rosenbrock(), 2, dtype=D)
    res = scipy_minimize(obj, X0, method=method)
    assert res.success and float((res.theta - 1).abs().max()) < 1e-3
    assert res.nhev == obj.counts.hv > 0


@pytest.mark.parametrize("method", ["Nelder-Mead", "Powell", "TNC", "CG", "BFGS", "trust-exact"])
def test_other_methods(method):
    obj = FunctionObjective(rosenbrock(), 2, dtype=D)
    res = scipy_minimize(obj, X0, method=method)
    assert res.success, res.message
    assert float((res.theta - 1).abs().max()) < 1e-2
    assert res.nfev == obj.counts.f and len(res.trace) >= 2


def test_model_objective_and_callback():
    data = two_class_2d(n_train=200, n_val=100, seed=0)
    obj = ModelObjective(logistic_regression(2, dtype=D), "logistic", (data.train.X, data.train.y))

    def cb(info):
        return {"dev_accuracy": obj.accuracy(info["theta"], data.test.X, data.test.y)}

    res = scipy_minimize(obj, obj.initial_theta(), method="BFGS", callback=cb, gtol=1e-9)
    ours = minimize(obj, obj.initial_theta(), method="bfgs")
    assert torch.allclose(res.theta, ours.theta, atol=1e-7)
    assert all("dev_accuracy" in r for r in res.trace)
    stop = scipy_minimize(
        obj, obj.initial_theta(), method="L-BFGS-B", callback=lambda info: info["k"] >= 2
    )
    assert stop.status == "callback" and not stop.success and len(stop.trace) == 3


def test_bad_input():
    obj = FunctionObjective(rosenbrock(), 2, dtype=D)
    with pytest.raises(ValueError):
        scipy_minimize(obj, torch.tensor([float("nan"), 1.0], dtype=D))
    with pytest.raises(ValueError):
        scipy_minimize(obj, torch.zeros(3, dtype=D))
    assert obj.counts.f == 0


@pytest.mark.parametrize(
    "method",
    [
        "L-BFGS-B",
        "BFGS",
        "CG",
        "Newton-CG",
        "trust-ncg",
        "trust-exact",
        "trust-constr",
        "SLSQP",
        "Nelder-Mead",
        "Powell",
    ],
)
def test_maxiter_is_max_iter_with_scipys_message(method):
    obj = FunctionObjective(rosenbrock(), 2, dtype=D)
    res = scipy_minimize(obj, X0, method=method, maxiter=2)
    assert res.status == "max_iter" and not res.success
    assert res.message == str(res.info["scipy"].message)  # scipy's own words


@pytest.mark.parametrize(
    "method, options, status",
    [
        ("BFGS", {}, "gtol"),
        ("trust-ncg", {}, "gtol"),
        ("L-BFGS-B", {}, "ftol"),  # relative reduction of f
        ("L-BFGS-B", {"ftol": 1e-20, "gtol": 1e-6}, "gtol"),  # projected gradient
        ("trust-constr", {}, "gtol"),
        ("Nelder-Mead", {}, "converged"),
        ("Newton-CG", {}, "converged"),  # scipy's test is on the step
    ],
)
def test_success_statuses(method, options, status):
    res = scipy_minimize(FunctionObjective(rosenbrock(), 2, dtype=D), X0, method=method, **options)
    assert res.success and res.status == status
    assert res.status in STATUSES and STATUSES[res.status]


def test_line_search_failure_and_evaluation_limit():
    # a gradient of the wrong sign: no step along −∇ decreases f
    wrong = FunctionObjective(lambda x: (x**2).sum(), 2, dtype=D, grad_fn=lambda x: -2 * x)
    for method in ("BFGS", "CG"):
        res = scipy_minimize(wrong, X0, method=method)
        assert res.status == "line_search" and not res.success, res.message
        assert "precision loss" in res.message
    obj = FunctionObjective(rosenbrock(), 2, dtype=D)
    res = scipy_minimize(obj, X0, method="L-BFGS-B", maxfun=3)
    assert res.status == "max_evals" and "EVALUATIONS" in res.message
    res = scipy_minimize(obj, X0, method="Nelder-Mead", maxfev=10)
    assert res.status == "max_evals"

"""scipy: methods check their options before the first evaluation: an unknown method or
option name (with the closest one), and an option of the wrong type; valid options reach
scipy unchanged (the result equals scipy.optimize.minimize's own)."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize as sp_minimize

from secondorder.objective import FunctionObjective, rosenbrock
from secondorder.scipy_bridge import check_scipy_options, scipy_minimize, scipy_options

D = torch.float64


def _objective():
    return FunctionObjective(rosenbrock(), 2, dtype=D)


@pytest.mark.parametrize(
    ("method", "options", "error", "match"),
    [
        ("L-BFGS-B", {"maxitr": 5}, ValueError, r"option='maxitr'.*did you mean 'maxiter'"),
        ("BFGS", {"gtoll": 1e-6}, ValueError, r"did you mean 'gtol'"),
        ("trust-ncg", {"initial_radius": 0.5}, ValueError, r"initial_trust_radius"),
        ("Nelder-Mead", {"ftol": 1e-3}, ValueError, r"scipy:Nelder-Mead option='ftol'"),
        ("L-BFGS-B", {"maxiter": "10"}, TypeError, r"maxiter of scipy:L-BFGS-B must be an integer"),
        ("L-BFGS-B", {"maxiter": 10.0}, TypeError, r"must be an integer, got 10.0 \(float\)"),
        ("CG", {"gtol": "1e-5"}, TypeError, r"gtol of scipy:CG must be a real number"),
        ("TNC", {"eta": True}, TypeError, r"eta of scipy:TNC must be a real number"),
        ("BFGS", {"disp": "yes"}, TypeError, r"disp of scipy:BFGS must be a bool"),
        ("L-BFGS", {}, ValueError, r"method='l-bfgs' is not one of .*did you mean 'l-bfgs-b'"),
    ],
)
def test_bad_options_are_refused_before_any_evaluation(method, options, error, match):
    obj = _objective()
    with pytest.raises(error, match=match):
        scipy_minimize(obj, torch.tensor([-1.2, 1.0], dtype=D), method, **options)
    assert obj.counts.f == 0 and obj.counts.g == 0


def test_the_options_are_read_from_scipy():
    assert {"maxiter", "maxcor", "gtol", "ftol"} <= set(scipy_options("L-BFGS-B"))
    assert {"initial_trust_radius", "max_trust_radius", "eta"} <= set(scipy_options("trust-ncg"))
    assert "maxfev" in scipy_options("nelder-mead")
    assert check_scipy_options("TNC", {"eta": 0.25, "maxCGit": 3, "disp": 0}) == {
        "eta": 0.25,
        "maxCGit": 3,
        "disp": 0,
    }


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("L-BFGS-B", {"maxiter": np.int64(7), "maxcor": 3, "gtol": 1e-9}),
        ("trust-ncg", {"initial_trust_radius": 0.5, "maxiter": 6}),
        ("Nelder-Mead", {"maxfev": 40, "xatol": 1e-6}),
    ],
)
def test_valid_options_reach_scipy_unchanged(method, options):
    x0 = np.array([-1.2, 1.0])
    res = scipy_minimize(_objective(), torch.as_tensor(x0), method, **options)
    f = rosenbrock()

    def fun(x):
        return float(f(torch.as_tensor(x)))

    def jac(x):
        t = torch.as_tensor(x).requires_grad_(True)
        (g,) = torch.autograd.grad(f(t), t)
        return g.numpy()

    def hessp(x, p):
        t = torch.as_tensor(x).requires_grad_(True)
        (g,) = torch.autograd.grad(f(t), t, create_graph=True)
        (hv,) = torch.autograd.grad(g @ torch.as_tensor(p), t)
        return hv.numpy()

    kw = {} if method == "Nelder-Mead" else {"jac": jac}
    if method == "trust-ncg":
        kw["hessp"] = hessp
    ref = sp_minimize(fun, x0, method=method, options=options, **kw)
    np.testing.assert_allclose(res.theta.numpy(), ref.x, rtol=1e-10, atol=1e-12)

"""Gradient (eq. 31) and Hessian Taylor tests: the measured orders, and that they catch errors."""

import subprocess
import sys

import pytest
import torch

from secondorder.data import two_class_2d
from secondorder.diagnostics import gradient_test, hessian_test
from secondorder.models import ACTIVATIONS, logistic_regression, mlp
from secondorder.objective import FunctionObjective, ModelObjective, rosenbrock
from secondorder.report.diagnostics_figures import plot_gradient_test

f64 = torch.float64


def test_logistic_regression_order_two():
    data = two_class_2d(seed=0, dtype=f64).train
    obj = ModelObjective(logistic_regression(2, seed=1, dtype=f64), "logistic", data)
    r = gradient_test(obj)
    assert r.passed and abs(r.order - 2.0) <= 0.1, r.table()
    h = hessian_test(obj)
    assert abs(h.order - 3.0) <= 0.15, h.table()


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("seed", [0, 1])
def test_mlp_order_two_every_activation(act, seed):
    torch.manual_seed(seed)
    model = mlp([6, 8, 5, 3], act, seed=seed, dtype=f64)
    X, y = torch.randn(300, 6, dtype=f64), torch.randint(0, 3, (300,))
    obj = ModelObjective(model, "cross_entropy", (X, y), l2=0.01)
    r = gradient_test(obj, seed=seed)
    assert abs(r.order - 2.0) <= 0.1, r.table()
    h = hessian_test(obj, seed=seed)
    assert abs(h.order - 3.0) <= 0.15, h.table()


def test_wrong_gradient_is_caught():
    good = rosenbrock(1.0, 50.0)
    obj = FunctionObjective(good, 2, dtype=f64, grad_fn=lambda t: torch.func.grad(good)(t) * 1.01)
    r = gradient_test(obj, torch.tensor([-1.2, 1.0], dtype=f64))
    assert not r.passed and r.order < 0.5


def test_wrong_hvp_is_caught():
    good = rosenbrock(1.0, 50.0)
    obj = FunctionObjective(
        good,
        2,
        dtype=f64,
        hvp_fn=lambda t, v: 1.05 * torch.func.hessian(good)(t) @ v,
    )
    h = hessian_test(obj, torch.tensor([-1.2, 1.0], dtype=f64))
    assert not h.passed and abs(h.order - 2.0) < 0.3


def test_plot_and_table(tmp_path):
    obj = FunctionObjective(rosenbrock(), 2, dtype=f64)
    r = gradient_test(obj, torch.tensor([0.5, 0.5], dtype=f64))
    assert "measured order" in r.table()
    path = plot_gradient_test(r, str(tmp_path / "g.png"))
    assert (tmp_path / "g.png").stat().st_size > 1000 and path.endswith("g.png")


def test_bad_arguments():
    obj = FunctionObjective(rosenbrock(), 2, dtype=f64)
    with pytest.raises(ValueError, match="theta is required"):
        gradient_test(obj)
    with pytest.raises(ValueError, match="eps"):
        gradient_test(obj, torch.zeros(2, dtype=f64), eps=[0.1, -1.0])
    with pytest.raises(ValueError, match="non-zero"):
        gradient_test(obj, torch.zeros(2, dtype=f64), direction=torch.zeros(2, dtype=f64))
    with pytest.raises(ValueError, match="NaN"):
        gradient_test(obj, torch.tensor([float("nan"), 0.0], dtype=f64))


def test_cli_gradtest(tmp_path):
    plot = tmp_path / "gt.png"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "secondorder.cli",
            "gradtest",
            "--activation",
            "tanh",
            "--widths",
            "5,7,3",
            "--hessian",
            "--plot",
            str(plot),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "measured order 2.0" in out.stdout and "PASS" in out.stdout
    assert (tmp_path / "gt-gradient.png").exists() and (tmp_path / "gt-hessian.png").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "secondorder.cli", "gradtest", "--widths", "5,x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--widths" in bad.stderr

"""The report layer draws what the core's diagnostics return (the core draws nothing)."""

from __future__ import annotations

import torch

from secondorder.curvature import saddle_report
from secondorder.diagnostics import gradient_test
from secondorder.models import Composed, Identity, ReLU, Sigmoid, mlp
from secondorder.objective import FunctionObjective, rosenbrock
from secondorder.report.diagnostics_figures import plot_gradient_test, plot_saddle_report

f64 = torch.float64


def test_plot_gradient_test_is_deterministic(tmp_path):
    obj = FunctionObjective(rosenbrock(), 2, dtype=f64)
    r = gradient_test(obj, torch.tensor([0.5, 0.5], dtype=f64))
    a = plot_gradient_test(r, str(tmp_path / "a.png"))
    b = plot_gradient_test(r, str(tmp_path / "b.png"))
    assert a.endswith("a.png") and b.endswith("b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_plot_saddle_report_dense_and_slq(tmp_path):
    model = mlp([3, 4, 2], "tanh", seed=0, dtype=f64)
    X, y = torch.randn(20, 3, dtype=f64), torch.randint(0, 2, (20,))
    for limit, name in ((3000, "dense.png"), (3, "slq.png")):
        r = saddle_report(model, X, y, dense_limit=limit)
        path = plot_saddle_report(r, tmp_path / name)
        assert path == tmp_path / name and path.stat().st_size > 0


def test_activations_say_what_the_kernels_may_skip():
    assert Identity().is_identity and Identity().is_piecewise_linear
    assert ReLU().is_piecewise_linear and not ReLU().is_identity
    assert not Sigmoid().is_piecewise_linear
    chain = Composed([ReLU(), ReLU()])
    assert chain.is_piecewise_linear and not chain.is_identity
    assert Composed([Identity(), Identity()]).is_identity
    z = torch.linspace(-2, 2, 9, dtype=f64)
    s, d1, d2 = Composed([Sigmoid(), ReLU()]).derivatives(z)
    assert torch.equal(s, torch.relu(torch.sigmoid(z)))

"""The depth study: its metrics against independent references, its rules on hand-made
inputs, the data.pool option, and the quick variant end to end (Fashion-MNIST fixture)."""

import math

import numpy as np
import pytest
import torch

from secondorder.data.dataset import Dataset
from secondorder.experiments import metrics as M
from secondorder.experiments.problems import _pooled
from secondorder.experiments.schema import SpecError
from secondorder.experiments.spec import load_spec, spec_from_dict
from secondorder.models import mlp
from secondorder.objective import ModelObjective
from secondorder.report.studies import depth
from secondorder.sampling import make_sampler


def _problem(act="sigmoid", hidden=(3, 3), n=40, d=4, k=3, **kw):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    model = mlp([d, *hidden, k], act, seed=2, dtype=torch.float64)
    obj = ModelObjective(model, "cross_entropy", (X, y), l2=0.01, **kw)
    theta = obj.initial_theta() + 0.3 * torch.randn(obj.n_params, generator=g, dtype=torch.float64)
    return model, X, y, obj, theta


def _loss_fn(model, X, y, obj):
    """J(θ) written directly with torch (mean cross-entropy + c/2 ‖W‖², weights only)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def J(theta):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            m = math.prod(shape)
            params[name] = theta[i : i + m].view(shape)
            i += m
        out = torch.func.functional_call(model, params, (X,))
        reg = sum((params[n] ** 2).sum() for n in names if n.endswith("weight"))
        return torch.nn.functional.cross_entropy(out, y) + 0.5 * obj.l2_coefficient * reg

    return J


def test_layer_grad_norms_match_autograd_per_parameter_group():
    model, X, y, obj, theta = _problem()
    t = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_loss_fn(model, X, y, obj)(t), t)
    sizes = [sum(p.numel() for p in lin.parameters()) for lin in model if hasattr(lin, "weight")]
    parts = torch.split(g, sizes)
    out = M.layer_grad_norms(obj, theta, None)["layer_grad_norms"]
    np.testing.assert_allclose(out, [float(p.norm()) for p in parts], rtol=1e-10)


def test_negative_curvature_fraction_matches_a_direct_count():
    model, X, y, obj, theta = _problem("sigmoid", hidden=(5,))
    obj.load_into_model(theta)
    lin1, lin2 = model[0], model[2]
    z = (X @ lin1.weight.T + lin1.bias).detach()
    h = torch.sigmoid(z).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(h @ lin2.weight.T + lin2.bias, y)
    (dh,) = torch.autograd.grad(loss, h)
    s = torch.sigmoid(z)
    d2 = s * (1 - s) * (1 - 2 * s)  # σ″ of the logistic function
    expected = float(((d2 * dh) < 0).double().mean())
    out = M.negative_curvature_fraction(obj, theta, None)["negative_curvature_fraction"]
    assert out == pytest.approx([expected], abs=1e-12)
    assert 0 < expected < 1  # both signs occur, so the count is tested


def test_lambda_min_matches_the_dense_hessian_and_leaves_counts_alone():
    model, X, y, obj, theta = _problem("tanh", hidden=(3,))
    assert obj.n_params <= M.LANCZOS_STEPS  # Lanczos then spans the whole space: exact
    H = torch.autograd.functional.hessian(_loss_fn(model, X, y, obj), theta)
    ev = torch.linalg.eigvalsh(H)
    counts = obj.counts  # the object a solver's loop holds
    before = counts.as_dict()
    out = M.lambda_min(obj, theta, None)
    assert out["lanczos_lambda_min"] == pytest.approx(float(ev[0]), abs=1e-8)
    assert out["lanczos_lambda_max"] == pytest.approx(float(ev[-1]), abs=1e-8)
    assert ev[0] < 0  # the test point is indefinite, so the sign is tested too
    M.layer_grad_norms(obj, theta, None)
    assert counts.as_dict() == before and obj.counts is counts


def test_lambda_min_uses_the_full_batch_when_the_solver_samples():
    *_, full, theta = _problem("tanh", hidden=(3,))
    model, X, y, obj, _ = _problem(
        "tanh",
        hidden=(3,),
        sampler=make_sampler("fixed", 40, batch_size=10, n_batches=1),
        curvature_sampler=make_sampler("subsample", 40, size=5),
    )
    assert M.lambda_min(obj, theta, None) == pytest.approx(M.lambda_min(full, theta, None))


def test_metrics_refuse_a_model_that_is_not_an_mlp():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(8, 3, dtype=torch.float64, generator=g), torch.arange(8) % 2
    model = torch.nn.Bilinear(3, 3, 2).double()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.b = model

        def forward(self, x):
            return self.b(x, x)

    obj = ModelObjective(Net(), "cross_entropy", (X, y))
    with pytest.raises(ValueError, match="sequential MLP"):
        M.layer_grad_norms(obj, obj.initial_theta(), None)
    with pytest.raises(ValueError, match="sequential MLP"):
        M.negative_curvature_fraction(obj, obj.initial_theta(), None)


def test_pool_averages_blocks_and_a_bad_factor_is_refused():
    X = torch.arange(2 * 784, dtype=torch.float64).reshape(2, 784)
    ds = _pooled(Dataset(X, torch.tensor([0, 1]), 2), 4)
    img = X[1].reshape(28, 28)
    assert ds.n_features == 49
    assert float(ds.X[1, 8]) == pytest.approx(float(img[4:8, 4:8].mean()))  # block (1, 1)
    raw = {
        "name": "p",
        "data": {"kind": "fashion-mnist", "pool": 5, "download": False},
        "model": {"kind": "mlp", "hidden": [3]},
        "solvers": [{"method": "gd"}],
    }
    with pytest.raises(SpecError, match="data.pool: must divide 28"):
        spec_from_dict(raw, "test")


# -- the rules -----------------------------------------------------------------------------------
def test_failing_rule():
    assert depth.failing(2.3, {"a": 0.3, "b": 1.4, "c": 2.29}) == {"b", "c"}
    assert depth.failing(2.3, {"a": 0.3, "b": 1.0}) == set()  # 1.3 ≥ half of 2.0
    assert depth.failing(2.3, {"a": 2.25, "b": 2.28}) == {"a", "b"}  # nobody makes progress
    assert depth.failing(2.3, {"a": 0.3, "b": math.nan}) == {"b"}
    # from f₀ = 2.6 every method reaches the class-frequency plateau log 10 ≈ 2.303 only
    assert depth.failing(2.6, {"a": 2.303, "b": 2.31}) == set()
    assert depth.failing(2.6, {"a": 2.303, "b": 2.31}, math.log(10)) == {"a", "b"}
    assert depth.failing(2.6, {"a": 2.0, "b": 2.31}, math.log(10)) == {"b"}


def test_a_short_budget_is_judged_after_as_many_iterations():
    """SFN given 5 of 100 iterations: after 5 it leads, so it does not fail, although its loss
    after 5 is far above the others' after 100; GD, behind everyone at the end, fails."""
    from pathlib import Path

    from secondorder.report.rundata import CellRun, SolverRun

    def run(name, fs):
        rows = [{"k": k, "f": f, "train_loss": f} for k, f in fs]
        return SolverRun(name, name, "x", rows)

    spec = {
        "max_iter": 100,
        "solvers": [{"name": "GD"}, {"name": "L-BFGS"}, {"name": "SFN", "max_iter": 5}],
    }
    solvers = [
        run("GD", [(0, 2.0), (5, 1.9), (100, 1.5)]),
        run("L-BFGS", [(0, 2.0), (5, 1.8), (100, 0.3)]),
        run("SFN", [(0, 2.0), (5, 1.2)]),
    ]
    cell = CellRun("c", Path("."), {}, 0, spec, solvers)
    assert depth._failures({1: cell}) == {1: {"GD"}}
    # the same SFN given the full budget (and stopping at 5) is judged on its final loss
    spec["solvers"][2].pop("max_iter")
    assert depth._failures({1: cell}) == {1: {"GD", "SFN"}}


def test_a_cell_whose_solvers_recorded_no_row_is_judged_without_error():
    from pathlib import Path

    from secondorder.report.rundata import CellRun, SolverRun

    spec = {"max_iter": 0, "solvers": [{"name": "GD"}, {"name": "L-BFGS"}]}
    solvers = [SolverRun("GD", "gd", "gd", []), SolverRun("L-BFGS", "l-bfgs", "lbfgs", [])]
    cell = CellRun("c", Path("."), {}, 0, spec, solvers)
    assert depth._failures({1: cell}) == {1: {"GD", "L-BFGS"}}  # no loss: nothing learnt


def test_onset_rule():
    assert depth.onset({1: False, 2: False, 3: True, 4: True}) == 3
    assert depth.onset({1: True, 2: False, 3: False, 4: True}) == 4
    assert depth.onset({1: True, 2: True}) == 1
    assert depth.onset({1: False, 2: True, 3: False}) is None


def test_gradient_trend_rule():
    assert depth.gradient_trend({1: 1.0, 4: 0.3, 8: 0.05}) == "vanish"
    assert depth.gradient_trend({1: 1.0, 8: 20.0}) == "explode"
    assert depth.gradient_trend({1: 1.0, 8: 0.2}) == "neither"
    assert depth.gradient_trend({1: 1.0}) == "neither"


def test_curvature_gain_rule():
    assert depth.curvature_gain(2.3, 2.2, 0.3) == pytest.approx(1.9 / 2.0)
    assert depth.curvature_gain(2.3, 0.3, 2.2) == pytest.approx(-1.9 / 2.0)
    assert abs(depth.curvature_gain(2.3, 0.5, 0.49)) < depth.GAIN
    assert depth.curvature_gain(2.3, 2.3, 2.3) == 0.0


# -- end to end ----------------------------------------------------------------------------------
def test_quick_study_end_to_end(tmp_path, fashion_mnist):
    from secondorder.experiments.runner import RunOptions, start_run
    from secondorder.report import write_report

    spec = load_spec(
        "studies/depth",
        quick=True,
        overrides=[
            ("data.n_train", 60),
            ("data.n_test", 60),
            ("curvature_sampler.size", 30),
            ("max_iter", 3),
            ("metrics_every", 3),
            ("solvers[SFN].max_iter", 1),
            ("sweep", {"model.hidden": [[3], [3, 3]], "model.activation": ["tanh"]}),
        ],
    )
    run = start_run(spec, tmp_path / "run", RunOptions(progress=False, log=lambda *_: None))
    (report,) = write_report(run)
    text = report.read_text()
    assert "Conclusions" in text and "| question |" in text
    for title in (depth.F_GRAD, depth.F_LOSS, depth.F_LAMBDA, depth.F_SIGMA):
        assert title in text
    for name in ("depth-layer-gradients", "depth-final-loss", "depth-lambda-min"):
        assert (report.parent / "figures" / f"{name}.png").stat().st_size > 1000
    for question in ("vanish or explode", "begin to fail", "curvature help", "indefinite"):
        assert question in text
    assert depth.T_FINAL in text and depth.T_ONSET in text

"""The Objective against independent references: closed forms (eqs. 17-18), dense autograd
Hessians in float64, and the sampler's eq. 28."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from secondorder.data import two_class_2d
from secondorder.models import logistic_regression, mlp
from secondorder.objective import (
    FunctionObjective,
    MemoryError_,
    ModelObjective,
    check_dense_fits,
    quadratic,
    rosenbrock,
)
from secondorder.sampling import FixedBatches, ReshuffledBatches, Subsample

f64 = torch.float64


def _closed_form_logistic(theta, X, y):
    """Eqs. 16-18 on X augmented with a column of ones for the bias."""
    Xa = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    h = torch.sigmoid(Xa @ theta)
    m = len(X)
    f = -(y * torch.log(h) + (1 - y) * torch.log(1 - h)).mean()
    g = Xa.T @ (h - y) / m
    H = Xa.T @ (Xa * (h * (1 - h))[:, None]) / m
    return f, g, H


def test_logistic_regression_matches_eqs_17_18():
    data = two_class_2d(seed=1, dtype=f64).train
    model = logistic_regression(2, dtype=f64)
    obj = ModelObjective(model, "logistic", data)
    theta = torch.tensor([0.7, -1.3, 0.2], dtype=f64)
    f, g, H = _closed_form_logistic(theta, data.X, data.y.double())
    f_o, g_o = obj.value_and_grad(theta)
    assert abs(float(f_o - f)) <= 1e-10 * abs(float(f))
    assert float((g_o - g).norm()) <= 1e-10 * float(g.norm())
    assert float((obj.hessian(theta) - H).norm()) <= 1e-10 * float(H.norm())
    v = torch.randn(3, dtype=f64)
    assert float((obj.hvp(theta, v) - H @ v).norm()) <= 1e-10 * float((H @ v).norm())
    # logistic regression: the Gauss-Newton matrix is the Hessian
    assert float((obj.ggnvp(theta, v) - H @ v).norm()) <= 1e-10 * float((H @ v).norm())


def _reference(obj, theta):
    X, y, w = obj.samples("value")

    def J(t):
        return obj._weighted_loss(t, X, y, w) + obj._regulariser(t)

    return J(theta), torch.func.grad(J)(theta), torch.func.hessian(J)(theta)


@pytest.mark.parametrize(
    "loss,act", [("cross_entropy", "tanh"), ("mse", "sigmoid"), ("cross_entropy", "softplus")]
)
@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_mlp_grad_hvp_against_dense_autograd(loss, act, l2):
    model = mlp([4, 5, 3, 3], act, seed=2, dtype=f64)
    X = torch.randn(30, 4, dtype=f64)
    y = torch.randint(0, 3, (30,)) if loss == "cross_entropy" else torch.randn(30, 3, dtype=f64)
    obj = ModelObjective(model, loss, (X, y), l2=l2)
    theta = obj.initial_theta()
    f, g, H = _reference(obj, theta)
    f_o, g_o = obj.value_and_grad(theta)
    torch.testing.assert_close(f_o, f, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_o, g, rtol=1e-10, atol=1e-14)
    V = torch.randn(len(theta), 3, dtype=f64)
    hv = obj.hvp_at(theta)
    for v in V.T:
        torch.testing.assert_close(hv(v), H @ v, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(obj.hessian(theta), H, rtol=1e-10, atol=1e-13)
    assert obj.counts.f == 1 and obj.counts.g == 1 and obj.counts.hv == 3


def test_ggn_against_jacobian_reference():
    model = mlp([3, 6, 4], "sigmoid", seed=0, dtype=f64)
    X = torch.randn(25, 3, dtype=f64)
    y = torch.randint(0, 4, (25,))
    obj = ModelObjective(model, "cross_entropy", (X, y), l2=0.1)
    theta = obj.initial_theta() + 0.1 * torch.randn(obj.n_params, dtype=f64)
    Jac = torch.func.jacrev(lambda t: obj.forward(t, X))(theta)  # (m, k, P)
    p = torch.softmax(obj.forward(theta, X), 1)
    Hz = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    G = torch.einsum("mip,mij,mjq->pq", Jac, Hz, Jac) / 25 + 0.1 * torch.diag(obj.l2_mask)
    ggnv = obj.ggnvp_at(theta)
    for _ in range(3):
        v = torch.randn(obj.n_params, dtype=f64)
        torch.testing.assert_close(ggnv(v), G @ v, rtol=1e-10, atol=1e-13)
    assert float(torch.linalg.eigvalsh(G).min()) > -1e-12


def test_l2_conventions_and_bias_rule():
    model = mlp([3, 4, 2], "tanh", seed=0, dtype=f64)
    X, y = torch.randn(10, 3, dtype=f64), torch.randint(0, 2, (10,))
    base = ModelObjective(model, "cross_entropy", (X, y))
    theta = base.initial_theta()
    W2 = sum(
        float((p.detach() ** 2).sum()) for n, p in model.named_parameters() if n.endswith("weight")
    )
    b2 = sum(
        float((p.detach() ** 2).sum()) for n, p in model.named_parameters() if n.endswith("bias")
    )
    f0 = float(base.value(theta))
    plain = ModelObjective(model, "cross_entropy", (X, y), l2=0.5)
    assert math.isclose(float(plain.value(theta)), f0 + 0.25 * W2, rel_tol=1e-13)
    per = ModelObjective(model, "cross_entropy", (X, y), l2=0.5, l2_convention="per-sample")
    assert math.isclose(float(per.value(theta)), f0 + 0.25 * W2 / 10, rel_tol=1e-13)
    per_m = ModelObjective(
        model, "cross_entropy", (X, y), l2=0.5, l2_convention="per-sample", l2_m=1000
    )
    assert math.isclose(float(per_m.value(theta)), f0 + 0.25 * W2 / 1000, rel_tol=1e-13)
    both = ModelObjective(model, "cross_entropy", (X, y), l2=0.5, regularize_bias=True)
    assert math.isclose(float(both.value(theta)), f0 + 0.25 * (W2 + b2), rel_tol=1e-13)


def test_fixed_batches_covering_data_equal_full_batch():
    model = mlp([3, 5, 3], "sigmoid", seed=1, dtype=f64)
    X, y = torch.randn(80, 3, dtype=f64), torch.randint(0, 3, (80,))
    full = ModelObjective(model, "cross_entropy", (X, y))
    fixed = ModelObjective(model, "cross_entropy", (X, y), sampler=FixedBatches(80, 10, seed=5))
    theta = full.initial_theta()
    f1, g1 = full.value_and_grad(theta)
    f2, g2 = fixed.value_and_grad(theta)
    torch.testing.assert_close(f1, f2, rtol=1e-14, atol=0)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-15)


def test_eq_28_is_mean_of_batch_means():
    model = mlp([3, 4, 2], "tanh", seed=1, dtype=f64)
    X, y = torch.randn(23, 3, dtype=f64), torch.randint(0, 2, (23,))
    sampler = ReshuffledBatches(23, 5, n_batches=7, seed=3)
    obj = ModelObjective(model, "cross_entropy", (X, y), sampler=sampler)
    theta = obj.initial_theta()
    for k in (0, 4):
        obj.begin_iteration(k)
        with torch.no_grad():
            batch_means = [
                float(nn.functional.cross_entropy(model(X[b]), y[b])) for b in sampler.batches(k)
            ]
        assert math.isclose(float(obj.value(theta)), float(np.mean(batch_means)), rel_tol=1e-13)


def test_reshuffled_objective_changes_only_between_iterations():
    model = mlp([3, 4, 2], "tanh", seed=1, dtype=f64)
    X, y = torch.randn(50, 3, dtype=f64), torch.randint(0, 2, (50,))
    obj = ModelObjective(model, "cross_entropy", (X, y), sampler=ReshuffledBatches(50, 5, 3))
    theta = obj.initial_theta()
    assert obj.stochastic == "iteration"
    assert obj.begin_iteration(0) is False
    a, b = float(obj.value(theta)), float(obj.value(theta))
    assert a == b
    assert obj.begin_iteration(1) is True
    assert float(obj.value(theta)) != a
    assert obj.begin_iteration(1) is False
    fixed = ModelObjective(model, "cross_entropy", (X, y), sampler=FixedBatches(50, 5))
    assert fixed.begin_iteration(7) is False and fixed.stochastic == "never"


def test_per_evaluation_reshuffling_moves_on_every_call():
    model = mlp([3, 4, 2], "tanh", seed=1, dtype=f64)
    X, y = torch.randn(50, 3, dtype=f64), torch.randint(0, 2, (50,))
    sampler = ReshuffledBatches(50, 5, 2, every="evaluation")
    obj = ModelObjective(model, "cross_entropy", (X, y), sampler=sampler)
    theta = obj.initial_theta()
    values = {float(obj.value(theta)) for _ in range(5)}
    assert len(values) > 1


def test_curvature_subsample_is_used_for_products_only():
    model = mlp([3, 4, 2], "tanh", seed=1, dtype=f64)
    X, y = torch.randn(40, 3, dtype=f64), torch.randint(0, 2, (40,))
    sub = Subsample(40, 10, seed=2)
    obj = ModelObjective(model, "cross_entropy", (X, y), curvature_sampler=sub)
    small = ModelObjective(model, "cross_entropy", (X[sub.batches(0)[0]], y[sub.batches(0)[0]]))
    full = ModelObjective(model, "cross_entropy", (X, y))
    theta = obj.initial_theta()
    v = torch.randn(obj.n_params, dtype=f64)
    torch.testing.assert_close(obj.hvp(theta, v), small.hvp(theta, v), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(obj.value(theta), full.value(theta), rtol=1e-14, atol=0)


def test_float32_keeps_dtype():
    model = mlp([3, 4, 2], "sigmoid", seed=1, dtype=torch.float32)
    X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    obj = ModelObjective(model, "cross_entropy", (X, y))
    f, g = obj.value_and_grad(obj.initial_theta())
    hv = obj.hvp(obj.initial_theta(), torch.ones(obj.n_params))
    assert f.dtype == g.dtype == hv.dtype == torch.float32


def test_evaluations_do_not_touch_the_model():
    model = mlp([3, 4, 2], "sigmoid", seed=1, dtype=f64)
    before = [p.clone() for p in model.parameters()]
    X, y = torch.randn(20, 3, dtype=f64), torch.randint(0, 2, (20,))
    obj = ModelObjective(model, "cross_entropy", (X, y))
    obj.value_and_grad(obj.initial_theta() + 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    obj.load_into_model(obj.initial_theta() + 1.0)
    assert torch.equal(model[0].bias, before[1] + 1.0)


def test_function_objective_rosenbrock_closed_form():
    obj = FunctionObjective(rosenbrock(1.0, 50.0), 2, dtype=f64)
    x = torch.tensor([-1.2, 1.0], dtype=f64)
    a, b = 1.0, 50.0
    g = torch.tensor(
        [-2 * (a - x[0]) - 4 * b * x[0] * (x[1] - x[0] ** 2), 2 * b * (x[1] - x[0] ** 2)]
    )
    H = torch.tensor([[2 - 4 * b * (x[1] - 3 * x[0] ** 2), -4 * b * x[0]], [-4 * b * x[0], 2 * b]])
    f, g_o = obj.value_and_grad(x)
    assert math.isclose(float(f), (a - x[0]) ** 2 + b * (x[1] - x[0] ** 2) ** 2, rel_tol=1e-14)
    torch.testing.assert_close(g_o, g.to(f64), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(obj.hessian(x), H.to(f64), rtol=1e-13, atol=1e-13)


def test_quadratic_objective():
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=f64)
    b = torch.tensor([1.0, -1.0], dtype=f64)
    obj = FunctionObjective(quadratic(A, b), 2, dtype=f64)
    x = torch.linalg.solve(A, b)
    assert float(obj.grad(x).norm()) < 1e-14
    torch.testing.assert_close(obj.hessian(x), A)


def test_dense_refusal_names_bytes_before_allocating():
    with pytest.raises(MemoryError_, match=r"8,000,000,000 bytes.*hvp"):
        check_dense_fits((10**5, 10**4), f64, "the dense Hessian", max_bytes=10**6)
    obj = FunctionObjective(lambda t: (t**2).sum(), 5000, dtype=f64)
    with pytest.raises(MemoryError_):
        obj.hessian(torch.zeros(5000, dtype=f64), max_bytes=1000)
    assert obj.counts.hv == 0


def test_frozen_kinks_agree_at_theta():
    model = mlp([3, 6, 2], "relu", seed=1, dtype=f64)
    X, y = torch.randn(30, 3, dtype=f64), torch.randint(0, 2, (30,))
    obj = ModelObjective(model, "cross_entropy", (X, y))
    theta = obj.initial_theta()
    f, g = obj.value_and_grad(theta)
    with obj.frozen_kinks(theta):
        f2, g2 = obj.value_and_grad(theta)
        far = obj.value(theta + 5.0)
    torch.testing.assert_close(f, f2)
    torch.testing.assert_close(g, g2)
    assert float(far) != float(obj.value(theta + 5.0))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"X": torch.randn(10), "y": torch.zeros(10, dtype=torch.long)}, "X must have shape"),
        ({"y": torch.zeros(9, dtype=torch.long)}, "same number of samples"),
        ({"y": torch.full((10,), 3)}, r"labels in 0\.\.2.*y\[0\] = 3"),
        ({"y": torch.full((10,), -1)}, r"y\[0\] = -1"),
        ({"X": torch.full((10, 4), float("nan"))}, "NaN"),
        ({"l2": -0.1}, "l2 must be"),
        ({"loss": "crossentropy"}, "did you mean 'cross_entropy'"),
        ({"l2_convention": "mean"}, "l2_convention"),
        ({"sampler": FixedBatches(11, 3)}, "m=11"),
    ],
)
def test_bad_input_is_refused(kwargs, match):
    args = {
        "X": torch.randn(10, 4, dtype=f64),
        "y": torch.zeros(10, dtype=torch.long),
        "loss": "cross_entropy",
    }
    args.update(kwargs)
    X, y, loss = args.pop("X"), args.pop("y"), args.pop("loss")
    with pytest.raises((ValueError, TypeError), match=match):
        ModelObjective(mlp([4, 3, 3], seed=0, dtype=f64), loss, (X, y), **args)


def test_bad_theta_is_refused():
    obj = FunctionObjective(lambda t: (t**2).sum(), 3, dtype=f64)
    with pytest.raises(ValueError, match="flat vector of 3"):
        obj.value(torch.zeros(4, dtype=f64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        obj.value([0.0, 0.0, 0.0])


def test_function_objective_constant_output_has_zero_gradient():
    obj = FunctionObjective(lambda t: torch.tensor(float("nan"), dtype=f64), 2, dtype=f64)
    f, g = obj.value_and_grad(torch.zeros(2, dtype=f64))
    assert math.isnan(float(f)) and torch.equal(g, torch.zeros(2, dtype=f64))
    assert torch.equal(
        obj.hvp(torch.zeros(2, dtype=f64), torch.ones(2, dtype=f64)), torch.zeros(2, dtype=f64)
    )


def test_a_closed_form_of_the_wrong_shape_is_refused_by_name():
    f = lambda x: (x**2).sum()  # noqa: E731
    obj = FunctionObjective(f, 3, dtype=torch.float64, grad_fn=lambda x: 2 * x[:2])
    with pytest.raises(ValueError, match=r"grad_fn must return a tensor of shape \(3,\)"):
        obj.value_and_grad(torch.ones(3, dtype=torch.float64))
    obj = FunctionObjective(f, 3, dtype=torch.float64, hvp_fn=lambda x, v: 2.0)
    with pytest.raises(ValueError, match="hvp_fn must return a tensor"):
        obj.hvp(torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))


def test_accuracy_of_non_finite_outputs_is_nan_not_a_number_of_arbitrary_labels():
    X = torch.randn(20, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    obj = ModelObjective(mlp([4, 3], "tanh", seed=0, dtype=torch.float64), "cross_entropy", (X, y))
    theta = obj.initial_theta()
    assert 0.0 <= obj.accuracy(theta) <= 1.0
    assert math.isnan(obj.accuracy(torch.full_like(theta, math.nan)))
    X_bad = X.clone()
    X_bad[3, 1] = math.nan
    assert math.isnan(obj.accuracy(theta, X_bad, y))

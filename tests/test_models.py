"""Activations' σ′ and σ″ against autograd; model builders and their validation."""

import pytest
import torch
from torch import nn

from secondorder.models import (
    ACTIVATIONS,
    activation,
    activation_derivatives,
    cnn,
    logistic_regression,
    mlp,
)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_derivatives_match_autograd(name):
    act = activation(name)
    z = torch.linspace(-4, 4, 101, dtype=torch.float64)
    z = z[z.abs() > 1e-3]  # away from the ReLU kink
    d1 = torch.func.vmap(torch.func.grad(lambda t: act(t)))(z)
    d2 = torch.func.vmap(torch.func.grad(torch.func.grad(lambda t: act(t))))(z)
    s, s1, s2 = act.derivatives(z)
    torch.testing.assert_close(s, act(z))
    torch.testing.assert_close(s1, d1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, d2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(act.derivative(z), d1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(act.second_derivative(z), d2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "module,name",
    [
        (nn.Sigmoid(), "sigmoid"),
        (nn.Tanh(), "tanh"),
        (nn.ReLU(), "relu"),
        (nn.Softplus(), "softplus"),
        (nn.Identity(), "identity"),
    ],
)
def test_torch_activations_are_recognised(module, name):
    act = activation_derivatives(module)
    assert act is not None and act.name == name
    z = torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(act(z), module(z))


def test_unrecognised_activation_returns_none():
    assert activation_derivatives(nn.GELU()) is None
    assert activation_derivatives(nn.Softplus(beta=2.0)) is None


def test_mlp_structure_and_seed():
    m = mlp([784, 300, 100, 10], "tanh", seed=3, dtype=torch.float64)
    kinds = [type(l).__name__ for l in m]
    assert kinds == ["Linear", "Tanh", "Linear", "Tanh", "Linear"]
    assert sum(p.numel() for p in m.parameters()) == 784 * 300 + 300 + 300 * 100 + 100 + 1010
    m2 = mlp([784, 300, 100, 10], "tanh", seed=3, dtype=torch.float64)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    m3 = mlp([784, 300, 100, 10], "tanh", seed=4, dtype=torch.float64)
    assert not torch.equal(m[0].weight, m3[0].weight)


def test_small_normal_init_is_gaussian_with_std_001_and_zero_bias():
    from scipy import stats

    model = mlp([784, 300, 10], init="small-normal", seed=3)
    w = model[0].weight.detach().double().flatten().numpy()
    assert abs(w.mean()) < 4 * 0.01 / len(w) ** 0.5
    assert w.std() == pytest.approx(0.01, rel=0.01)
    assert stats.kstest(w / 0.01, "norm").pvalue > 1e-3
    assert all(
        float(m.bias.detach().abs().max()) == 0.0 for m in model if isinstance(m, torch.nn.Linear)
    )
    other = mlp([784, 300, 10], init="small-normal", seed=3)
    assert torch.equal(model[2].weight, other[2].weight)


def test_mlp_output_activation_and_dtype():
    m = mlp([3, 4, 2], "sigmoid", output_activation="sigmoid", dtype=torch.float32)
    assert isinstance(m[-1], ACTIVATIONS["sigmoid"])
    assert m[0].weight.dtype == torch.float32
    out = m(torch.randn(5, 3))
    assert out.shape == (5, 2) and bool(((out > 0) & (out < 1)).all())


def test_logistic_regression_is_eq_16():
    model = logistic_regression(2, seed=1, dtype=torch.float64)
    X = torch.randn(10, 2, dtype=torch.float64)
    w, b = model[0].weight[0], model[0].bias
    torch.testing.assert_close(torch.sigmoid(model(X)[:, 0]), 1 / (1 + torch.exp(-(X @ w + b))))
    assert torch.count_nonzero(logistic_regression(3)[0].weight) == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"widths": [3, 4, 2], "activation": "sigmod"}, "did you mean 'sigmoid'"),
        ({"widths": [3]}, "at least an input and an output"),
        ({"widths": [3, 0, 2]}, r"widths\[1\]"),
        ({"widths": [3, 2], "init": "he"}, "init"),
    ],
)
def test_mlp_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mlp(**kwargs)


def test_activation_bad_name():
    with pytest.raises(ValueError, match="did you mean 'tanh'"):
        activation("tahn")


def test_cnn_is_the_benchmark_network_and_checks_its_arguments():
    net = cnn()
    assert sum(p.numel() for p in net.parameters()) == 20_490
    assert net(torch.zeros(3, 784)).shape == (3, 10)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.padding) for c in convs] == [
        (1, 16, (1, 1)),
        (16, 32, (1, 1)),
    ]
    same = cnn(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), same.parameters()))
    assert not torch.equal(cnn(seed=1)[1].weight, net[1].weight)
    small = cnn([4], 3, image=(2, 6, 6), seed=None, dtype=torch.float64)
    assert small(torch.zeros(2, 72, dtype=torch.float64)).shape == (2, 3)
    with pytest.raises(ValueError, match="channels"):
        cnn([])
    with pytest.raises(ValueError, match="too small"):
        cnn([4, 4, 4], image=(1, 4, 4))
    with pytest.raises(ValueError, match="image"):
        cnn(image=(28, 28))

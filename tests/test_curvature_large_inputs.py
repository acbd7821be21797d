"""The Hessian and Gauss–Newton diagonals stay finite for finite inputs so large that x ⊙ x
overflows (a saturated unit multiplies 0 by inf), checked against the dense Hessian's
diagonal from ``torch.func`` autodiff in float64 and the engine's own dense matrices."""

import copy
import warnings

import pytest
import torch

from secondorder import curvature
from secondorder.losses import get_loss
from secondorder.models import mlp

f64 = torch.float64


def _autodiff_hessian(model, X, y, loss):
    """The dense Hessian of the mean loss by torch.func, in float64."""
    model = copy.deepcopy(model).to(f64)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    theta = torch.cat([p.reshape(-1) for p in params])
    sizes = [p.numel() for p in params]
    L = get_loss(loss)

    def J(t):
        views = {n: v.view_as(p) for n, v, p in zip(names, torch.split(t, sizes), params)}
        out = torch.func.functional_call(model, views, (X.to(f64),))
        return L.per_sample(out, y).mean()

    return torch.func.hessian(J)(theta)


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float32, 1e20), (f64, 1e160)])
@pytest.mark.parametrize("act", ["sigmoid", "tanh", "softplus"])
@pytest.mark.parametrize(
    ("loss", "k", "widths"),
    [
        ("cross_entropy", 3, [4, 3]),
        ("cross_entropy", 3, [4, 5, 6, 3]),
        ("logistic", 1, [4, 1]),
        ("logistic", 1, [4, 5, 1]),
    ],
)
def test_diagonals_of_huge_finite_inputs_are_finite_and_exact(dtype, scale, act, loss, k, widths):
    model = mlp(widths, act, seed=0, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(6, 4, dtype=f64, generator=g) * scale).to(dtype)
    y = torch.randint(0, max(k, 2), (6,), generator=g)
    ref = _autodiff_hessian(model, X, y, loss).diagonal()
    assert bool(torch.isfinite(ref).all())
    d = curvature.hessian_diagonal(model, X, y, loss)
    assert bool(torch.isfinite(d).all())
    tol = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(d.to(f64), ref, **tol)
    torch.testing.assert_close(d, curvature.hessian(model, X, y, loss).diagonal(), **tol)
    gd = curvature.ggn_diagonal(model, X, y, loss)
    torch.testing.assert_close(gd, curvature.ggn(model, X, y, loss).diagonal(), **tol)


def test_a_nan_in_x_is_still_reported_by_name():
    model = mlp([4, 5, 3], "sigmoid", seed=0, dtype=f64)
    X = torch.randn(6, 4, dtype=f64)
    X[2, 1] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match="X"):
            curvature.hessian_diagonal(model, X, torch.randint(0, 3, (6,)))

"""nn.Conv1d, added to the layer registry as one class: exact curvature against torch.func and
K-FAC factors against the formulas written out here with F.unfold on an (n, c, 1, L) view."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from secondorder.curvature import (
    ggn,
    ggn_diagonal,
    hessian_diagonal,
    layer_ggns,
    layer_hessians,
    supports_fast_path,
)
from secondorder.curvature.kfac import kfac_statistics
from secondorder.objective import ModelObjective

D = torch.float64


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv1d(3, 2, 2, dilation=2, bias=False),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).to(D)


def _data(n=5):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 2, 11, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize(
    "fn",
    [hessian_diagonal, ggn_diagonal, layer_hessians, layer_ggns, ggn],
    ids=lambda f: f.__name__,
)
def test_conv1d_curvature_equals_torch_func(fn):
    model, (X, y) = _model(), _data()
    assert supports_fast_path(model) == (True, "")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the chain engine, not the fallback
        got = fn(model, X, y, l2=0.1)
    ref = fn(model, X, y, l2=0.1, method="autodiff")
    for a, b in zip(
        got if isinstance(got, list) else [got], ref if isinstance(ref, list) else [ref]
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
def test_conv1d_kfac_factors_follow_the_patch_formulas(approximation):
    """A = Σ_n (1/N)(1/R) Σ_r ũ ũᵀ (expand) or (1/N) Σ_n ū ūᵀ (reduce), G likewise from the
    output gradients of the loss-Hessian columns, computed here from autograd and F.unfold."""
    model, (X, y) = _model(), _data(4)
    obj = ModelObjective(model, "cross_entropy", (X, y))
    f = kfac_statistics(obj, obj.initial_theta(), approximation=approximation).factors[0]
    conv = model[0]
    U = F.unfold(X[:, :, None], (1, 3), stride=(1, 2), padding=(0, 1)).transpose(1, 2)
    U = torch.cat([U, torch.ones(*U.shape[:2], 1, dtype=D)], 2)  # (n, R, 7)
    z = conv(X)
    out = model[1:](z)
    p = torch.softmax(out, 1)
    A = G = 0
    N, R = U.shape[:2]
    for n in range(N):
        u = U[n]
        A = A + (u.T @ u / R if approximation == "expand" else torch.outer(u.mean(0), u.mean(0)))
        H = torch.diag(p[n]) - torch.outer(p[n], p[n])
        evals, evecs = torch.linalg.eigh(H.detach())
        for c in range(3):
            v = evecs[:, c] * evals[c].clamp_min(0).sqrt()
            (g,) = torch.autograd.grad(out[n], z, v, retain_graph=True)
            g = g[n].T  # (R, c_out)
            G = G + (g.T @ g if approximation == "expand" else torch.outer(g.sum(0), g.sum(0)))
    torch.testing.assert_close(f.A, A / N, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f.G, G.detach() / N, rtol=1e-10, atol=1e-12)

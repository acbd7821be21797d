"""Muon in ``minimize`` against torch.optim.Muon (weights and flattened kernels) with
torch.optim.AdamW on the biases, step for step on full batches and reshuffled mini-batches;
its Newton–Schulz map against the scalar quintic applied to the singular values (float64
SVD); exact resume; and its refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from secondorder import ModelObjective, minimize
from secondorder.objective import FunctionObjective, quadratic
from secondorder.sampling import ReshuffledBatches
from secondorder.solvers.muon import NS_COEFFICIENTS, newton_schulz

N = 48


def _net() -> nn.Sequential:
    """A conv kernel (4 × 9, wide), a wide matrix (5 × 144) and a tall one (12 × 5)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 36, 5),
        nn.Tanh(),
        nn.Linear(5, 12),
    )


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 1, 6, 6, generator=g), torch.randint(0, 12, (N,), generator=g)


def _torch_run(batches, **muon_options) -> torch.Tensor:
    """The reference loop: torch.optim.Muon on 2-D views of the weights, AdamW on the rest,
    one step on each (X, y) of ``batches``."""
    model = _net()
    weights = [p for p in model.parameters() if p.ndim >= 2]
    views = [p if p.ndim == 2 else p.detach().view(p.shape[0], -1) for p in weights]
    lr, adamw_lr = muon_options.pop("lr"), muon_options.pop("adamw_lr")
    muon = torch.optim.Muon(views, lr=lr, **muon_options)
    adamw = torch.optim.AdamW([p for p in model.parameters() if p.ndim < 2], lr=adamw_lr)
    for X, y in batches:
        model.zero_grad()
        F.cross_entropy(model(X), y).backward()
        for p, v in zip(weights, views):
            if v is not p:
                v.grad = p.grad.view(v.shape)
        muon.step()
        adamw.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _objective(sampler: bool) -> ModelObjective:
    X, y = _data()
    return ModelObjective(
        _net(),
        "cross_entropy",
        (X, y),
        sampler=ReshuffledBatches(N, 12, seed=3) if sampler else None,
    )


@pytest.mark.parametrize("sampler", [False, True])
@pytest.mark.parametrize(
    "options",
    [
        {"lr": 0.02, "adamw_lr": 1e-3},
        {"lr": 0.05, "adamw_lr": 3e-3, "nesterov": False, "momentum": 0.9, "weight_decay": 0.0},
    ],
)
def test_matches_torch_muon_with_adamw_step_for_step(options, sampler):
    steps = 8
    obj = _objective(sampler)
    theta0 = obj.initial_theta()
    res = minimize(obj, theta0, "muon", max_iter=steps, gtol=None, **options)
    batches = []  # the batch minimize sees at each iteration
    twin = _objective(sampler)
    for k in range(steps):
        twin.begin_iteration(k)
        batches.append(twin.samples("value")[:2])
    ref = _torch_run(batches, **dict(options))
    moved = float((ref - theta0).abs().max())
    assert moved > 0.05
    torch.testing.assert_close(res.theta, ref, rtol=0, atol=1e-6)


def test_the_layout_is_the_one_theta_was_built_with():
    """Muon reads where the matrices lie in θ from the objective, not from the network's
    current requires_grad flags: freezing a layer after the objective is built changes
    nothing (θ still holds it), and a layer frozen before is no part of θ."""
    plain = minimize(_objective(False), _objective(False).initial_theta(), "muon", lr=0.02,
                     max_iter=4, gtol=None)  # fmt: skip
    obj = _objective(False)
    obj.model[0].weight.requires_grad_(False)  # after θ's layout was fixed
    later = minimize(obj, obj.initial_theta(), "muon", lr=0.02, max_iter=4, gtol=None)
    assert torch.equal(later.theta, plain.theta)
    X, y = _data()
    net = _net()
    net[3].weight.requires_grad_(False)  # before: θ has no place for it
    obj = ModelObjective(net, "cross_entropy", (X, y))
    res = minimize(obj, obj.initial_theta(), "muon", lr=0.02, max_iter=4, gtol=None)
    assert res.theta.numel() == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert torch.isfinite(res.theta).all() and res.trace["f"][-1] < res.trace["f"][0]


def test_newton_schulz_maps_singular_values_by_the_quintic():
    """NS(U) = P φ(Σ/‖U‖_F) Qᵀ for U = P Σ Qᵀ, φ five steps of x ↦ ax + bx³ + cx⁵: the matrix
    iteration acts on each singular value alone (bfloat16 against a float64 SVD)."""
    a, b, c = NS_COEFFICIENTS
    g = torch.Generator().manual_seed(5)
    for shape in [(5, 12), (12, 5), (7, 7)]:
        U = torch.randn(*shape, generator=g, dtype=torch.float64)
        P, S, Qt = torch.linalg.svd(U, full_matrices=False)
        x = S / torch.linalg.norm(U)
        for _ in range(5):
            x = a * x + b * x**3 + c * x**5
        expected = P @ torch.diag(x) @ Qt
        got = newton_schulz(U).double()
        assert got.shape == U.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=5e-2)
        # the map pulls every singular value into a band around 1
        s = torch.linalg.svdvals(got)
        assert float(s.min()) > 0.5 and float(s.max()) < 1.5, s


def test_resume_continues_exactly():
    whole = minimize(_objective(True), _objective(True).initial_theta(), "muon", lr=0.02,
                     max_iter=10, gtol=None)  # fmt: skip
    first = minimize(_objective(True), _objective(True).initial_theta(), "muon", lr=0.02,
                     max_iter=4, gtol=None)  # fmt: skip
    rest = minimize(
        _objective(True),
        _objective(True).initial_theta(),
        "muon",
        lr=0.02,
        max_iter=6,
        gtol=None,
        initial_state=first.state,
    )
    assert torch.equal(rest.theta, whole.theta)


def test_refuses_an_objective_without_a_network_and_bad_options():
    obj = FunctionObjective(quadratic(torch.eye(3), torch.ones(3)), 3)
    with pytest.raises(ValueError, match="method='muon' needs a ModelObjective"):
        minimize(obj, torch.zeros(3), "muon")
    for bad, match in (
        ({"momentum": 1.0}, "momentum"),
        ({"ns_steps": 0}, "ns_steps"),
        ({"adamw_lr": -1.0}, "adamw_lr"),
    ):
        with pytest.raises(ValueError, match=match):
            minimize(_objective(False), _objective(False).initial_theta(), "muon", **bad)

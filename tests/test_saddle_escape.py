"""Second-order methods started at a strict saddle (∇f = 0, a negative Hessian eigenvalue)
leave it along the negative-curvature eigenvector and converge to a minimiser; the
references are the closed-form minimisers of separable quartics."""

import math

import pytest
import torch

from secondorder import minimize

D = torch.float64
ESCAPING = [
    ("newton", {"modification": "saddle-free"}),
    ("newton", {"modification": "eigen"}),
    ("newton", {"modification": "damping"}),
    ("newton-cg", {}),
    ("trust-ncg", {}),
    ("arc", {}),
]
IDS = [f"{m}-{kw.get('modification', '')}".rstrip("-") for m, kw in ESCAPING]


def two_d(t):
    """x² − y² + y⁴/4: a strict saddle at 0, minima f = −1 at (0, ±√2)."""
    return t[0] ** 2 - t[1] ** 2 + t[1] ** 4 / 4


@pytest.mark.parametrize(("method", "kw"), ESCAPING, ids=IDS)
def test_a_strict_saddle_in_two_dimensions_is_left_for_a_minimum(method, kw):
    res = minimize(two_d, torch.zeros(2, dtype=D), method=method, max_iter=100, **kw)
    assert res.status == "gtol" and res.success
    assert res.negative_curvature and "left a saddle point" in res.message
    assert abs(float(res.theta[0])) < 1e-8
    assert abs(abs(float(res.theta[1])) - math.sqrt(2.0)) < 1e-8
    assert abs(res.f + 1.0) < 1e-12


def _quartic(n=8, negative=(-1.5, -0.7), seed=0):
    """f(x) = Σ_i ½λ_i u_i² + u_i⁴/4 with u = Qᵀx (Q a random rotation): minimisers
    u_i = ±√(−λ_i) where λ_i < 0, u_i = 0 elsewhere; minimum −Σ_{λ_i<0} λ_i²/4."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=D, generator=g))
    lam = torch.cat(
        [torch.tensor(negative, dtype=D), 0.5 + torch.rand(n - 2, dtype=D, generator=g)]
    )

    def f(x):
        u = Q.T @ x
        return (0.5 * lam * u * u + u**4 / 4).sum()

    return f, Q, lam


@pytest.mark.parametrize(("method", "kw"), ESCAPING, ids=IDS)
def test_a_random_strict_saddle_is_left_for_the_closed_form_minimiser(method, kw):
    f, Q, lam = _quartic()
    res = minimize(f, torch.zeros(8, dtype=D), method=method, max_iter=300, **kw)
    assert res.status == "gtol" and res.success
    u = Q.T @ res.theta
    expected = torch.where(lam < 0, (-lam).clamp(min=0).sqrt(), torch.zeros_like(lam))
    torch.testing.assert_close(u.abs(), expected, atol=1e-7, rtol=0)
    assert abs(res.f - float(-(lam[lam < 0] ** 2).sum() / 4)) < 1e-10


@pytest.mark.parametrize("method", ["trust-ncg", "arc", "newton-cg"])
def test_a_run_resumed_after_the_escape_continues_exactly(method):
    f, _, _ = _quartic(seed=1)
    theta0 = torch.zeros(8, dtype=D)
    full = minimize(f, theta0, method=method, max_iter=300)
    first = minimize(f, theta0, method=method, max_iter=1)  # stops right after the escape
    assert first.status == "max_iter" and "left a saddle point" in first.message
    rest = minimize(f, theta0, method=method, max_iter=300, initial_state=first.state)
    assert rest.status == full.status and rest.nit == full.nit
    torch.testing.assert_close(rest.theta, full.theta, rtol=0, atol=0)
    assert rest.state["escapes"] == full.state["escapes"]

"""preconditioner="kfac": M⁻¹ against a dense solve with the damped Kronecker blocks (float64),
newton-cg / nlcg / lbfgs reaching the same minimiser as without it, exact resume, and the
refusals made before any evaluation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from secondorder import ModelObjective, minimize, mlp
from secondorder.curvature.kfac import KroneckerFactors, kfac_factors
from secondorder.objective import FunctionObjective, rosenbrock
from secondorder.sampling import ReshuffledBatches
from secondorder.solvers import validate_options
from secondorder.solvers.precondition import make_preconditioner

D = torch.float64


def _data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


def test_kfac_preconditioner_solves_the_damped_block_diagonal_system():
    X, y = _data(50)
    obj = ModelObjective(
        mlp([4, 5, 6, 3], "tanh", seed=1, dtype=D), "cross_entropy", (X, y), l2=0.05
    )
    theta = obj.initial_theta() + 0.05
    pre = make_preconditioner("kfac", obj, damping=1e-2)
    assert pre.update(obj, theta, 0)
    root = math.sqrt(1e-2 + 0.05)  # γ = precondition_damping + the L2 coefficient
    blocks = []
    for f in kfac_factors(obj, theta):
        A, G = f.A, f.G
        pi = math.sqrt((float(A.trace()) / len(A)) / (float(G.trace()) / len(G)))
        eye_a, eye_g = torch.eye(len(A), dtype=D), torch.eye(len(G), dtype=D)
        blocks.append(
            KroneckerFactors(f.layer, A + pi * root * eye_a, G + root / pi * eye_g).dense()
        )
    M = torch.block_diag(*blocks)
    v = torch.randn(obj.n_params, generator=torch.Generator().manual_seed(3), dtype=D)
    torch.testing.assert_close(pre.apply(v), torch.linalg.solve(M, v), rtol=0, atol=1e-10)
    assert not pre.update(obj, theta, 0)  # not due again at the same iteration


@pytest.mark.parametrize("method", ["newton-cg", "nlcg", "lbfgs"])
def test_preconditioned_methods_reach_the_same_minimiser(method):
    """Multinomial logistic regression with L2 on all parameters (strictly convex): the unique
    minimiser, from Newton's method on the dense Hessian, with and without K-FAC."""
    X, y = _data(120, seed=4)

    def objective():
        model = mlp([4, 3], "tanh", seed=0, dtype=D)
        return ModelObjective(model, "cross_entropy", (X, y), l2=1e-2, regularize_bias=True)

    obj = objective()
    newton = minimize(obj, obj.initial_theta(), "newton")
    assert newton.success
    for pre in (None, "kfac"):
        obj = objective()
        res = minimize(obj, obj.initial_theta(), method, preconditioner=pre, max_iter=500)
        assert res.success, res.message
        torch.testing.assert_close(res.theta, newton.theta, rtol=0, atol=1e-7)
    assert res.info["precondition_updates"] == res.nit


def test_kfac_preconditioner_resumes_exactly():
    X, y = _data(120)

    def objective():
        return ModelObjective(
            mlp([4, 6, 3], "tanh", seed=0, dtype=D),
            "cross_entropy",
            (X, y),
            sampler=ReshuffledBatches(120, 40, n_batches=1, seed=1),
        )

    opts = {"preconditioner": "kfac", "precondition_every": 3, "precondition_damping": 0.1}
    opts |= {"gtol": None, "curvature": "ggn"}
    obj = objective()
    whole = minimize(obj, obj.initial_theta(), "newton-cg", max_iter=10, **opts)
    obj = objective()
    first = minimize(obj, obj.initial_theta(), "newton-cg", max_iter=4, **opts)
    obj = objective()
    rest = minimize(
        obj, obj.initial_theta(), "newton-cg", max_iter=6, initial_state=first.state, **opts
    )
    assert torch.equal(rest.theta, whole.theta)
    assert rest.info["precondition_updates"] == whole.info["precondition_updates"] == 4


def test_kfac_preconditioner_refusals_before_any_evaluation():
    fobj = FunctionObjective(rosenbrock(), 2, dtype=D)
    with pytest.raises(ValueError, match="preconditioner='kfac' needs a ModelObjective"):
        minimize(fobj, torch.zeros(2, dtype=D), "lbfgs", preconditioner="kfac")
    X, y = _data(20)
    normed = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).to(D)
    obj = ModelObjective(normed, "cross_entropy", (X, y))
    with pytest.raises(ValueError, match=r"preconditioner='kfac'.*module 1 \(LayerNorm\)"):
        minimize(obj, obj.initial_theta(), "newton-cg", preconditioner="kfac")
    obj = ModelObjective(mlp([4, 3], "tanh", dtype=D), "cross_entropy", (X, y))
    with pytest.raises(ValueError, match="diagonal preconditioner; 'kfac' is block-diagonal"):
        minimize(obj, obj.initial_theta(), "trust-ncg", preconditioner="kfac")
    with pytest.raises(ValueError, match="precondition_damping applies to preconditioner='kfac'"):
        minimize(
            obj, obj.initial_theta(), "lbfgs", preconditioner="ggn-diag", precondition_damping=1.0
        )
    with pytest.raises(ValueError, match="precondition_damping"):
        minimize(obj, obj.initial_theta(), "lbfgs", preconditioner="kfac", precondition_damping=0.0)
    assert obj.counts.f == 0 and fobj.counts.f == 0
    # by size alone: the name and the damping are checked, the objective's needs are not
    validate_options(5, "nlcg", preconditioner="kfac", precondition_damping=1e-2)
    with pytest.raises(ValueError, match="block-diagonal"):
        validate_options(5, "arc", preconditioner="kfac")
    with pytest.raises(ValueError, match="precondition_damping"):
        validate_options(5, "nlcg", precondition_damping=1e-2)

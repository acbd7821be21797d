"""SGD and Adam in ``minimize`` against torch.optim.SGD / torch.optim.Adam, step for step
(float64), on a full batch and on reshuffled mini-batches, and their exact resume."""

from __future__ import annotations

import pytest
import torch

from secondorder import ModelObjective, minimize, mlp
from secondorder.objective import FunctionObjective, quadratic
from secondorder.sampling import ReshuffledBatches
from secondorder.solvers import OptionError, validate_options

D = torch.float64
STEPS = 25


def _objective(sampler: bool) -> ModelObjective:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, 5, generator=g, dtype=D)
    y = torch.randint(0, 3, (120,), generator=g)
    model = mlp([5, 7, 3], "tanh", seed=1, dtype=D)
    return ModelObjective(
        model,
        "cross_entropy",
        (X, y),
        l2=0.01,
        sampler=ReshuffledBatches(120, 20, seed=3) if sampler else None,
    )


def _torch_reference(make_opt, sampler: bool, steps: int = STEPS) -> torch.Tensor:
    """θ after ``steps`` torch.optim steps, each on the batch minimize sees at that iteration."""
    obj = _objective(sampler)
    theta = torch.nn.Parameter(obj.initial_theta())
    opt = make_opt([theta])
    for k in range(steps):
        obj.begin_iteration(k)
        _, grad = obj.value_and_grad(theta.detach())
        opt.zero_grad()
        theta.grad = grad.clone()
        opt.step()
    return theta.detach()


CASES = [
    ("sgd", {"lr": 0.1}, lambda p: torch.optim.SGD(p, lr=0.1)),
    (
        "sgd",
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    ),
    (
        "sgd",
        {"lr": 0.05, "momentum": 0.8, "nesterov": True},
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True),
    ),
    (
        "sgd",
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.5},
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.5),
    ),
    ("adam", {"lr": 0.01}, lambda p: torch.optim.Adam(p, lr=0.01)),
    (
        "adam",
        {"lr": 0.02, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 1e-2},
        lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2),
    ),
    (
        "adam",
        {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ),
    ("adam", {"lr": 0.01, "amsgrad": True}, lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True)),
]


@pytest.mark.parametrize("sampler", [False, True], ids=["full-batch", "reshuffled"])
@pytest.mark.parametrize("method,options,make_opt", CASES)
def test_matches_torch_optim_step_for_step(method, options, make_opt, sampler):
    obj = _objective(sampler)
    res = minimize(obj, obj.initial_theta(), method=method, max_iter=STEPS, gtol=None, **options)
    assert res.nit == STEPS and res.status == "max_iter", res.message
    ref = _torch_reference(make_opt, sampler)
    torch.testing.assert_close(res.theta, ref, rtol=1e-12, atol=1e-13)
    assert not bool(torch.equal(res.theta, obj.initial_theta()))
    assert all(row["step"] == options["lr"] for row in res.trace.rows[1:])


@pytest.mark.parametrize("method,options", [(c[0], c[1]) for c in CASES])
def test_resume_continues_exactly(method, options):
    obj = _objective(True)
    whole = minimize(obj, obj.initial_theta(), method=method, max_iter=12, gtol=None, **options)
    obj = _objective(True)
    first = minimize(obj, obj.initial_theta(), method=method, max_iter=5, gtol=None, **options)
    obj = _objective(True)
    rest = minimize(
        obj,
        obj.initial_theta(),
        method=method,
        max_iter=7,
        gtol=None,
        initial_state=first.state,
        **options,
    )
    assert torch.equal(rest.theta, whole.theta)


def test_momentum_converges_on_a_quadratic_to_the_solution():
    g = torch.Generator().manual_seed(4)
    Q = torch.randn(6, 6, generator=g, dtype=D)
    A = Q @ Q.T + 6 * torch.eye(6, dtype=D)
    b = torch.randn(6, generator=g, dtype=D)
    obj = FunctionObjective(quadratic(A, b), 6, dtype=D)
    L = float(torch.linalg.eigvalsh(A)[-1])
    for method, opts in (("sgd", {"lr": 1 / L, "momentum": 0.5}), ("adam", {"lr": 0.05})):
        res = minimize(obj, torch.zeros(6, dtype=D), method=method, max_iter=20000, **opts)
        assert res.success, (method, res.message)
        torch.testing.assert_close(res.theta, torch.linalg.solve(A, b), atol=1e-7, rtol=0)


def test_options_are_checked_before_any_evaluation():
    with pytest.raises(ValueError, match="momentum must lie in"):
        validate_options(4, "sgd", momentum=1.5)
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        validate_options(4, "sgd", nesterov=True)
    with pytest.raises(OptionError, match="'beta1' does not apply to method='sgd'.*adam"):
        validate_options(4, "sgd", beta1=0.9)
    with pytest.raises(OptionError, match="preconditioner.*scales its steps itself"):
        validate_options(4, "adam", preconditioner="hessian-diag")
    cfg = validate_options(4, "adam")
    assert cfg["line_search"] is None and cfg["lr"] == 1e-3


def test_trace_counts_samples_and_epochs_across_a_resume():
    obj = _objective(False)
    res = minimize(obj, obj.initial_theta(), method="adam", lr=0.01, max_iter=4, gtol=None)
    assert [r["epochs"] for r in res.trace.rows] == [0.0, 1.0, 2.0, 3.0, 4.0]
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(120, 5, generator=g, dtype=D), torch.randint(0, 3, (120,), generator=g)

    def minibatch():  # one batch of 30 per iteration: four iterations make an epoch
        model = mlp([5, 7, 3], "tanh", seed=1, dtype=D)
        sampler = ReshuffledBatches(120, 30, n_batches=1, seed=3)
        return ModelObjective(model, "cross_entropy", (X, y), sampler=sampler)

    obj = minibatch()
    first = minimize(obj, obj.initial_theta(), method="sgd", lr=0.1, max_iter=6, gtol=None)
    assert first.trace.rows[-1]["samples"] == 180 and first.trace.rows[-1]["epochs"] == 1.5
    obj = minibatch()
    rest = minimize(
        obj,
        obj.initial_theta(),
        method="sgd",
        lr=0.1,
        max_iter=2,
        gtol=None,
        initial_state=first.state,
    )
    assert rest.trace.rows[-1]["epochs"] == 2.0
    plain = FunctionObjective(quadratic(torch.eye(2, dtype=D)), 2, dtype=D)
    res = minimize(plain, torch.ones(2, dtype=D), method="gd", max_iter=3)
    assert "epochs" not in res.trace.rows[-1]


TORCH_CASES = [
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.5, "centered": True}),
    ("NAdam", {"lr": 0.01}),
]


@pytest.mark.parametrize("sampler", [False, True], ids=["full-batch", "reshuffled"])
@pytest.mark.parametrize("name,options", TORCH_CASES)
def test_any_torch_optimizer_matches_its_own_loop(name, options, sampler):
    obj = _objective(sampler)
    res = minimize(
        obj, obj.initial_theta(), method=f"torch:{name}", max_iter=STEPS, gtol=None, **options
    )
    assert res.nit == STEPS and res.method == f"torch:{name}"
    ref = _torch_reference(lambda p: getattr(torch.optim, name)(p, **options), sampler)
    torch.testing.assert_close(res.theta, ref, rtol=1e-12, atol=1e-13)


def _torch_lbfgs_reference(steps: int, **options) -> torch.Tensor:
    """θ after ``steps`` calls of torch.optim.LBFGS(**options).step(closure), full batch."""
    ref_obj = _objective(False)
    p = torch.nn.Parameter(ref_obj.initial_theta())
    opt = torch.optim.LBFGS([p], **options)

    def closure():
        f, g = ref_obj.value_and_grad(p.detach())
        p.grad = g.clone()
        return f

    for _ in range(steps):
        opt.step(closure)
    return p.detach()


def test_torch_sgd_equals_our_sgd_and_lbfgs_gets_a_closure():
    obj = _objective(True)
    ours = minimize(obj, obj.initial_theta(), method="sgd", lr=0.05, momentum=0.9, max_iter=10)
    obj = _objective(True)
    theirs = minimize(
        obj, obj.initial_theta(), method="torch:SGD", lr=0.05, momentum=0.9, max_iter=10
    )
    torch.testing.assert_close(ours.theta, theirs.theta, rtol=1e-12, atol=1e-13)
    # torch.optim.LBFGS, one step() per iteration, against the same loop written by hand
    obj = _objective(False)
    res = minimize(
        obj,
        obj.initial_theta(),
        method="torch:LBFGS",
        max_iter=3,
        gtol=None,
        history_size=5,
        line_search_fn="strong_wolfe",
    )
    ref = _torch_lbfgs_reference(3, history_size=5, line_search_fn="strong_wolfe")
    torch.testing.assert_close(res.theta, ref, rtol=1e-12, atol=1e-13)


def test_torch_optimizer_resumes_and_refuses_bad_input_before_evaluating():
    obj = _objective(True)
    whole = minimize(obj, obj.initial_theta(), method="torch:Adam", lr=0.01, max_iter=9, gtol=None)
    obj = _objective(True)
    first = minimize(obj, obj.initial_theta(), method="torch:Adam", lr=0.01, max_iter=4, gtol=None)
    state = first.state
    obj = _objective(True)
    rest = minimize(
        obj,
        obj.initial_theta(),
        method="torch:Adam",
        lr=0.01,
        max_iter=5,
        gtol=None,
        initial_state=state,
    )
    torch.testing.assert_close(rest.theta, whole.theta, rtol=0, atol=0)
    obj = _objective(False)
    with pytest.raises(ValueError, match=r"no optimiser 'Adamm' \(did you mean 'Adam'\?\)"):
        minimize(obj, obj.initial_theta(), method="torch:Adamm")
    with pytest.raises(ValueError, match="torch.optim.Adam: .*beta"):
        minimize(obj, obj.initial_theta(), method="torch:Adam", betas=(1.5, 0.9))
    with pytest.raises(OptionError, match="did you mean 'lr_decay'"):
        minimize(obj, obj.initial_theta(), method="torch:Adagrad", lr_decy=0.1)
    assert obj.counts.f == 0 and obj.counts.g == 0


TORCH_REFUSALS = [
    ("Adam", {"maximize": "false", "lr": 0.1}, "maximize must be true or false, got 'false'"),
    ("Adam", {"maximize": True}, "maximize=True would climb f"),
    ("Adam", {"betas": {"a": 1}}, "betas must be a list of 2 numbers, got dict"),
    ("Adam", {"betas": [0.9, 0.99, 0.1]}, "betas must be a list of 2 numbers, got list of 3"),
    ("Adam", {"lr": "0.01"}, "lr must be a finite number"),
    ("Adam", {"eps": float("nan")}, "eps must be a finite number, got nan"),
    ("Adam", {"capturable": True}, "capturable=True needs θ on a CUDA device"),
    ("Adam", {"differentiable": True}, "torch.optim.Adam cannot serve here"),
    ("Adam", {"foreach": "yes"}, "foreach must be true or false or None"),
    ("SGD", {"lr": float("inf")}, "lr must be a finite number, got inf"),
    ("SGD", {"dampening": -1.0}, "dampening must be >= 0"),
    ("LBFGS", {"history_size": 0}, "history_size must be an integer >= 1, got 0"),
    ("LBFGS", {"history_size": 2.5}, "history_size must be an integer, got 2.5"),
    ("LBFGS", {"max_eval": 0}, "max_eval must be an integer >= 1"),
    ("LBFGS", {"line_search_fn": "wolfe"}, "LBFGS cannot serve here: .*strong_wolfe"),
    ("SparseAdam", {}, "SparseAdam cannot serve here: .*dense gradients"),
    ("Rprop", {"etas": [0.5, "1.2"]}, "etas must be a list of 2 numbers"),
]


@pytest.mark.parametrize(
    "name,options,match",
    TORCH_REFUSALS,
    ids=[f"{n}-{i}" for i, (n, *_) in enumerate(TORCH_REFUSALS)],
)
def test_torch_options_are_checked_by_type_before_any_evaluation(name, options, match):
    obj = _objective(False)
    with pytest.raises((TypeError, ValueError), match=match):
        validate_options(obj, f"torch:{name}", **options)
    with pytest.raises((TypeError, ValueError), match=match):
        minimize(obj, obj.initial_theta(), method=f"torch:{name}", **options)
    assert obj.counts.f == 0 and obj.counts.g == 0


def test_a_torch_argument_named_like_a_loop_option_is_prefixed():
    # torch.optim.LBFGS(max_iter=1): one inner iteration per step(); here optimizer_max_iter
    obj = _objective(False)
    res = minimize(
        obj,
        obj.initial_theta(),
        method="torch:LBFGS",
        max_iter=4,
        gtol=None,
        optimizer_max_iter=1,
        trace_theta=True,
    )
    assert res.nit == 4
    # from a fresh state its one iteration is the gradient step lr·min(1, 1/‖g‖₁)·g
    theta0 = obj.initial_theta()
    g = _objective(False).value_and_grad(theta0)[1]
    first = theta0 - min(1.0, 1.0 / float(g.abs().sum())) * g
    torch.testing.assert_close(res.trace.rows[1]["theta"], first, rtol=1e-12, atol=1e-14)
    ref = _torch_lbfgs_reference(4, max_iter=1)
    torch.testing.assert_close(res.theta, ref, rtol=1e-12, atol=1e-13)


def test_mini_batch_steps_evaluate_once_per_step_on_the_batch_they_start():
    obj = _objective(True)
    res = minimize(
        obj, obj.initial_theta(), method="adam", lr=0.01, max_iter=8, gtol=None, trace_theta=True
    )
    assert res.nfev == 9 and res.ngev == 9  # θ₀, then one per step
    check = _objective(True)
    for row in res.trace.rows:
        check.begin_iteration(row["k"])  # row k: θ_k on the batch of iteration k
        assert float(check.value(row["theta"])) == row["f"]
    # with a line search (or on a fixed function) every step is still evaluated where it lands
    obj = _objective(False)
    res = minimize(obj, obj.initial_theta(), method="adam", lr=0.01, max_iter=8, gtol=None)
    assert res.nfev == 9

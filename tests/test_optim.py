"""The torch.optim faces: LBFGS step for step against torch.optim.LBFGS, no silent stall in
float32, and NLCG / NewtonCG on real nn.Module training loops."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from secondorder.optim import LBFGS, NLCG, NewtonCG

D = torch.float64


def _regression(dtype=D, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=dtype)
    y = (X @ torch.tensor([1.0, -2.0, 0.5], dtype=dtype)).sin()[:, None]
    y = y + 0.1 * torch.randn(n, 1, generator=g, dtype=dtype)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
    return X, y, net


def _flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def _run(cls, net, X, y, steps, **kw):
    opt = cls(net.parameters(), **kw)

    def closure():
        opt.zero_grad()
        loss = ((net(X) - y) ** 2).mean()
        loss.backward()
        return loss

    out = []
    for _ in range(steps):
        opt.step(closure)
        out.append(_flat(net).clone())
    return out, opt


@pytest.mark.parametrize(
    "kw",
    [
        {"history_size": 10, "line_search_fn": "strong_wolfe"},
        {"history_size": 10, "line_search_fn": "strong_wolfe", "max_iter": 1, "max_eval": 4},
        {"history_size": 10, "line_search_fn": "strong_wolfe", "max_iter": 4, "lr": 0.5},
        {"history_size": 5},
        {"history_size": 3, "line_search_fn": "strong_wolfe", "max_iter": 30, "max_eval": 33},
    ],
    ids=["wolfe", "wolfe-1-iter", "wolfe-lr", "fixed-step", "wolfe-budget"],
)
def test_lbfgs_matches_torch_step_for_step(kw):
    X, y, net = _regression()
    ours, opt = _run(LBFGS, copy.deepcopy(net), X, y, 8, **kw)
    theirs, ref = _run(torch.optim.LBFGS, copy.deepcopy(net), X, y, 8, **kw)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert float((a - b).abs().max()) <= 1e-10, f"step {k}"
    s_ours = opt.state[next(iter(opt.state))]
    s_ref = ref.state[next(iter(ref.state))]
    assert s_ours["func_evals"] == s_ref["func_evals"] and s_ours["n_iter"] == s_ref["n_iter"]
    assert opt.stalls == 0


def test_lbfgs_stall_with_one_trial_per_step():
    """max_iter=1 leaves torch's line search max_eval=1 trial: once a unit step is rejected it
    is repeated unchanged at every later call. Ours warns; by default it resets and goes on,
    with on_stall="warn" it keeps torch's behaviour exactly."""
    X, y, net = _regression()
    kw = {"history_size": 10, "line_search_fn": "strong_wolfe", "max_iter": 1}
    theirs, _ = _run(torch.optim.LBFGS, copy.deepcopy(net), X, y, 20, **kw)
    stuck = next(i for i in range(1, 20) if torch.equal(theirs[i], theirs[-1]))
    assert stuck < 15
    with pytest.warns(RuntimeWarning, match="no progress"):
        same, opt = _run(LBFGS, copy.deepcopy(net), X, y, 20, on_stall="warn", **kw)
    assert all(torch.equal(a, b) for a, b in zip(same, theirs)) and opt.stalls > 0
    with pytest.warns(RuntimeWarning, match="memory reset"):
        ours, opt = _run(LBFGS, copy.deepcopy(net), X, y, 20, **kw)
    assert all(torch.equal(a, b) for a, b in zip(ours[:stuck], theirs[:stuck]))
    loss = [float(((_apply(net, p, X) - y) ** 2).mean()) for p in (ours[-1], theirs[-1])]
    assert loss[0] < loss[1]


def _apply(net, flat, X):
    from torch.func import functional_call

    params, i = {}, 0
    for name, p in net.named_parameters():
        params[name] = flat[i : i + p.numel()].view_as(p)
        i += p.numel()
    return functional_call(net, params, (X,))


def test_lbfgs_does_not_stall_silently_in_float32():
    """The PEERS.md setting where torch.optim.LBFGS stops moving for good: float32, strong
    Wolfe, one iteration per step. Ours warns, resets its memory and carries on."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 20, generator=g)
    W = torch.randn(20, 5, generator=g)
    labels = (X @ W + 0.5 * torch.randn(300, 5, generator=g)).argmax(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 16), nn.Sigmoid(), nn.Linear(16, 5))

    def train(cls, steps=60):
        model = copy.deepcopy(net)
        opt = cls(model.parameters(), history_size=20, line_search_fn="strong_wolfe", max_iter=1)

        def closure():
            opt.zero_grad()
            reg = sum((p**2).sum() for p in model.parameters() if p.ndim == 2)
            loss = nn.functional.cross_entropy(model(X), labels) + 5e-3 * reg
            loss.backward()
            return loss

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = [float(opt.step(closure).detach()) for _ in range(steps)]
        return losses, opt, [w for w in caught if issubclass(w.category, RuntimeWarning)]

    theirs, _, _ = train(torch.optim.LBFGS)
    ours, opt, caught = train(LBFGS)
    stalled = next(i for i in range(1, len(theirs)) if len(set(theirs[i:])) == 1)
    assert stalled < 45  # torch's stops moving, without a word
    assert opt.stalls >= 1 and caught and "no progress" in str(caught[0].message)
    assert ours[-1] < theirs[-1]  # ours keeps going
    assert len(set(ours[stalled:])) > 1


def test_lbfgs_defaults_one_iteration_per_step_float32_keeps_decreasing():
    """Default settings (fixed step lr = 1, no line search, history 100), max_iter=1 per
    step, float32, 100 steps of a small MLP classifier with noisy labels: every step moves
    the parameters until the gradient test is met, nothing stalls, and the loss keeps going
    down (it is not monotone: a fixed-step quasi-Newton step may overshoot, as torch's does)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, 4, generator=g)
    labels = (X[:, 0] * X[:, 1] > 0).long() + (X[:, 2] > 0.5).long()
    noisy = torch.rand(200, generator=g) < 0.15
    labels = torch.where(noisy, torch.randint(0, 3, (200,), generator=g), labels)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = LBFGS(net.parameters(), max_iter=1)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(X), labels)
        loss.backward()
        return loss

    losses, moved = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(100):
            before = _flat(net).clone()
            losses.append(float(opt.step(closure)))
            grad = max(float(p.grad.abs().max()) for p in net.parameters())
            moved.append(not torch.equal(before, _flat(net)) or grad <= 1e-7)
    assert all(moved) and opt.stalls == 0
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert losses[-1] < 0.1 * losses[0]
    for q in (25, 50, 75):  # every quarter reaches a loss lower than all before it
        assert min(losses[q : q + 25]) < min(losses[:q])


def test_lbfgs_rejected_steepest_descent_step_is_rescaled_not_repeated():
    """One line-search trial per step (max_iter=1, strong Wolfe) and a first step that
    overshoots: torch.optim.LBFGS repeats the rejected step at every call; ours warns, scales
    the first step down and goes on."""
    A = torch.tensor([100.0, 300.0])

    def train(cls):
        w = nn.Parameter(torch.tensor([1e-3, -2e-3]))
        opt = cls([w], line_search_fn="strong_wolfe", max_iter=1)

        def closure():
            opt.zero_grad()
            loss = 0.5 * (A * w * w).sum()
            loss.backward()
            return loss

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = [float(opt.step(closure).detach()) for _ in range(20)]
        return losses, opt, [w for w in caught if issubclass(w.category, RuntimeWarning)]

    theirs, _, _ = train(torch.optim.LBFGS)
    assert len(set(theirs)) == 1  # never moves
    ours, opt, caught = train(LBFGS)
    assert opt.stalls >= 1 and len(caught) == 1 and "too long" in str(caught[0].message)
    assert ours[-1] < 1e-6 * ours[0]


def test_lbfgs_multiple_tensors_and_real_training_loop():
    X, y, net = _regression(dtype=torch.float32)
    opt = LBFGS(net.parameters(), line_search_fn="strong_wolfe", max_iter=5)
    losses = []
    for _ in range(10):

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(X), y)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure)))
    assert losses[-1] < 0.2 * losses[0]
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_closure_without_backward_is_accepted():
    X, y, net = _regression()
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    opt_a = LBFGS(a.parameters(), line_search_fn="strong_wolfe")
    opt_b = LBFGS(b.parameters(), line_search_fn="strong_wolfe")

    def with_backward():
        opt_a.zero_grad()
        loss = ((a(X) - y) ** 2).mean()
        loss.backward()
        return loss

    def without_backward():
        return ((b(X) - y) ** 2).mean()

    opt_a.step(with_backward)
    opt_b.step(without_backward)
    assert torch.equal(_flat(a), _flat(b))


@pytest.mark.parametrize("variant", ["pr+", "fr", "hs", "dy"])
def test_nlcg_trains(variant):
    X, y, net = _regression()
    opt = NLCG(net.parameters(), variant=variant, max_iter=10)

    def closure():
        opt.zero_grad()
        loss = ((net(X) - y) ** 2).mean()
        loss.backward()
        return loss

    losses = [float(opt.step(closure)) for _ in range(15)]
    assert losses[-1] < 0.1 * losses[0]
    assert opt.last_result is not None and opt.last_result.method == "nlcg"
    state = opt.state[next(iter(opt.state))]
    assert state["func_evals"] == opt.last_result.nfev


def test_newton_cg_trains_and_refuses_backward_closures():
    X, y, net = _regression()
    opt = NewtonCG(net.parameters(), max_iter=3, damping=0.1)

    def closure():
        return ((net(X) - y) ** 2).mean()  # no backward: NewtonCG differentiates twice itself

    losses = [float(opt.step(closure)) for _ in range(6)]
    assert losses[-1] < 0.1 * losses[0]
    assert opt.last_result.nhev > 0

    X, y, net = _regression()
    opt = NewtonCG(net.parameters())

    def bad_closure():
        opt.zero_grad()
        loss = ((net(X) - y) ** 2).mean()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="without calling backward"):
        opt.step(bad_closure)


@pytest.mark.parametrize("cls", [NewtonCG, NLCG, LBFGS])
def test_a_closure_without_a_gradient_is_refused_not_taken_for_convergence(cls):
    X, y, net = _regression()
    before = _flat(net).clone()
    opt = cls(net.parameters())

    def under_no_grad():
        with torch.no_grad():
            return ((net(X) - y) ** 2).mean()

    with pytest.raises(ValueError, match=rf"{cls.__name__}: .*no gradient.*torch.no_grad"):
        opt.step(under_no_grad)
    other = nn.Parameter(torch.ones(1, dtype=D))
    with pytest.raises(ValueError, match="does not depend on the optimizer's parameters"):
        opt.step(lambda: (other * 2.0).sum())
    assert torch.equal(_flat(net), before)
    if cls is not LBFGS:
        assert opt.last_result is None


def test_newton_cg_matches_minimize():
    from secondorder.objective import FunctionObjective
    from secondorder.solvers import minimize

    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=D)
    b = torch.tensor([1.0, 2.0], dtype=D)
    w = nn.Parameter(torch.zeros(2, dtype=D))
    opt = NewtonCG([w], max_iter=1)
    for _ in range(6):
        opt.step(lambda: 0.5 * w @ A @ w - b @ w)
    assert torch.allclose(w.detach(), torch.linalg.solve(A, b))
    res = minimize(
        FunctionObjective(lambda x: 0.5 * x @ A @ x - b @ x, 2, dtype=D),
        torch.zeros(2, dtype=D),
        method="newton-cg",
    )
    assert torch.allclose(res.theta, w.detach())


def test_bad_arguments():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="line_search_fn"):
        LBFGS([p], line_search_fn="wolfe")
    with pytest.raises(ValueError, match="variant"):
        NLCG([p], variant="pr")
    with pytest.raises(ValueError, match="groups"):
        LBFGS([{"params": [p]}, {"params": [nn.Parameter(torch.zeros(2))]}])
    with pytest.raises(ValueError, match="closure"):
        LBFGS([p]).step(None)


@pytest.mark.parametrize("history_size", [0, -3, 2.5])
def test_lbfgs_refuses_a_history_it_cannot_keep(history_size):
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises((ValueError, TypeError), match="history_size"):
        LBFGS([x], history_size=history_size)


def test_strong_wolfe_lbfgs_on_a_closure_that_is_nan_everywhere_keeps_the_parameters():
    x = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = LBFGS([x], line_search_fn="strong_wolfe", max_iter=5)

    def closure():
        opt.zero_grad()
        loss = (x * float("nan")).sum()
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = opt.step(closure)  # used to end in an AttributeError on the missing gradient
    assert math.isnan(float(loss))
    assert torch.equal(x.detach(), torch.ones(3, dtype=torch.float64))

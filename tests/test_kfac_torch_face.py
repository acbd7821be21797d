"""K-FAC in a user's own loop: torch's closure contract, ``step()`` after ``loss.backward()``,
the preconditioner for any torch.optim optimiser, the loss's reduction, parameter groups and
schedulers, non-finite factors and bfloat16 autocast. References: ``minimize(..., "kfac")`` on
the same batches, and the closure face itself."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from secondorder import minimize
from secondorder.curvature.kfac import KFACEngine
from secondorder.models import mlp
from secondorder.objective import ModelObjective
from secondorder.optim import KFAC, KFACPreconditioner

D = torch.float64


def _data(n: int = 40, d: int = 4, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=D)
    return X, (X @ torch.randn(d, k, generator=g, dtype=D)).argmax(1)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 6, 6)),
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(108, 3),
    ).to(D)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


OPTS = {
    "lr": 0.5,
    "damping": 1e-2,
    "kind": "exact",
    "ema": 0.8,
    "inv_every": 2,
    "kl_clip": None,
    "rescale": False,
}


def _run(model, X, y, how: str, steps: int = 5, **opts):
    """Train with one of the three ways to call step; returns the parameters after each step."""
    opt = KFAC(model, **{**OPTS, **opts})
    out = []
    for k in range(steps):
        idx = torch.arange(k * 8, k * 8 + 8) % len(X)
        if how == "no-backward closure":
            opt.step(lambda idx=idx: F.cross_entropy(model(X[idx]), y[idx]))
        elif how == "backward closure":

            def closure(idx=idx):
                opt.zero_grad()
                loss = F.cross_entropy(model(X[idx]), y[idx])
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
        out.append(_flat(model))
    return out


@pytest.mark.parametrize("make", [lambda: mlp([4, 6, 3], "tanh", seed=1, dtype=D), _cnn])
@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
def test_the_three_ways_to_step_give_the_same_trajectory(make, kind):
    X, y = _data(40, 36 if make is _cnn else 4)
    ref = _run(make(), X, y, "backward closure", kind=kind)
    for how in ("user loop", "no-backward closure"):
        got = _run(make(), X, y, how, kind=kind)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "make", [lambda: mlp([4, 6, 3], "tanh", seed=2, dtype=D), _cnn], ids=["mlp", "cnn"]
)
def test_a_user_loop_follows_minimize_kfac_on_the_same_batches(make):
    """backward(); step() against minimize(..., "kfac") with the settings both share: exact
    factors, a fixed step, no rescaling, the objective's L2 as weight decay."""
    X, y = _data(48, 36 if make is _cnn else 4)
    c, lr, steps = 0.05, 0.7, 6
    model = make()
    obj = ModelObjective(copy.deepcopy(model), "cross_entropy", (X, y), l2=c)
    res = minimize(
        obj,
        obj.initial_theta(),
        "kfac",
        kind="exact",
        line_search=None,
        rescale=False,
        lr=lr,
        damping=1e-2,
        ema=0.8,
        inv_every=2,
        max_iter=steps,
        gtol=None,
        trace_theta=True,
    )
    opt = KFAC(
        model,
        lr=lr,
        damping=1e-2,
        kind="exact",
        ema=0.8,
        inv_every=2,
        weight_decay=c,
        kl_clip=None,
        rescale=False,
    )
    for k in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
        torch.testing.assert_close(_flat(model), res.trace[k + 1]["theta"], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("ekfac", [False, True])
def test_the_preconditioner_with_sgd_is_kfac(ekfac):
    X, y = _data(40, 36)
    ref = _run(_cnn(), X, y, "user loop", ekfac=ekfac)
    model = _cnn()
    pre = KFACPreconditioner(model, damping=1e-2, kind="exact", ema=0.8, inv_every=2, ekfac=ekfac)
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    for k, want in enumerate(ref):
        idx = torch.arange(k * 8, k * 8 + 8) % len(X)
        sgd.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        pre.step()
        sgd.step()
        torch.testing.assert_close(_flat(model), want, rtol=1e-12, atol=1e-12)


def test_the_preconditioner_state_round_trips():
    X, y = _data(40, 36)

    def train(model, pre, sgd, ks):
        for k in ks:
            idx = torch.arange(k * 8, k * 8 + 8) % len(X)
            sgd.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            pre.step()
            sgd.step()

    def build():
        model = _cnn()
        return model, KFACPreconditioner(model, kind="mc"), None

    model, pre, _ = build()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, pre, sgd, range(6))
    whole = _flat(model)
    model, pre, _ = build()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, pre, sgd, range(3))
    saved = (copy.deepcopy(model.state_dict()), pre.state_dict(), sgd.state_dict())
    model, pre, _ = build()
    model.load_state_dict(saved[0])
    pre.load_state_dict(saved[1])
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sgd.load_state_dict(saved[2])
    train(model, pre, sgd, range(3, 6))
    torch.testing.assert_close(_flat(model), whole, rtol=0, atol=0)


def test_a_sum_loss_with_its_reduction_steps_as_the_mean():
    """Σ over n samples has n× the mean's gradient and Fisher: with loss_reduction='sum' and
    the damping scaled by n, the factored damping scales by n too and the steps are the
    mean's exactly."""
    X, y = _data(8)
    final = {}
    for reduction, ekfac in (("mean", False), ("sum", False), ("mean", True), ("sum", True)):
        model = mlp([4, 6, 3], "tanh", seed=3, dtype=D)
        damping = 1e-2 * (8 if reduction == "sum" else 1)
        opt = KFAC(
            model,
            lr=0.5,
            kind="exact",
            damping=damping,
            loss_reduction=reduction,
            inv_every=1,
            ekfac=ekfac,
            kl_clip=None,
            rescale=False,
        )
        for _ in range(4):
            opt.zero_grad()
            F.cross_entropy(model(X), y, reduction=reduction).backward()
            opt.step()
        final[reduction, ekfac] = _flat(model)
    for ekfac in (False, True):
        torch.testing.assert_close(
            final["sum", ekfac], final["mean", ekfac], rtol=1e-10, atol=1e-12
        )


def test_a_sum_loss_called_a_mean_is_refused_saying_how_to_fix_it():
    X, y = _data(16)
    model = mlp([4, 6, 3], "tanh", seed=3, dtype=D)
    opt = KFAC(model)
    opt.zero_grad()
    F.cross_entropy(model(X), y, reduction="sum").backward()
    with pytest.raises(ValueError, match="loss_reduction='sum'"):
        opt.step()


def test_parameter_groups_and_a_scheduler_behave_as_in_torch():
    """A group without weight decay and a StepLR: the learning rate follows the scheduler and
    weight decay acts only where its group asks."""
    X, y = _data(40)
    model = mlp([4, 6, 3], "tanh", seed=4, dtype=D)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = KFAC(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        model=model,
        lr=0.5,
        kind="exact",
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [0.5, 0.25, 0.25, 0.125]
    with pytest.raises(ValueError, match="every trainable parameter.*missing: 0.bias"):
        KFAC([{"params": decay}], model=model)


def test_a_nan_factor_keeps_the_previous_inverse_and_no_parameter_turns_nan():
    X, y = _data(40)
    model = mlp([4, 6, 3], "tanh", seed=5, dtype=D)
    opt = KFAC(model, kind="exact", inv_every=1)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    engine: KFACEngine = opt._pre.engine
    kept = engine.state[0]["A_inv"].clone()
    engine.state[0]["A"][0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="singular or not finite"):
        engine.refresh(1e-2)
    assert torch.equal(engine.state[0]["A_inv"], kept)
    engine.state[0]["A"].copy_(torch.eye(len(kept), dtype=D))
    engine.state[0]["G"].zero_()  # a singular factor: damping keeps it invertible
    opt.zero_grad()
    F.cross_entropy(model(X), y).backward()
    opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_bfloat16_autocast_trains_like_float32(fashion_mnist):
    """Under torch.autocast (bfloat16 on the CPU) factors accumulate and invert in float32;
    the 784-64-10 MLP ends within half a point of float32's test accuracy."""
    from secondorder.data import load_fashion_mnist

    splits = load_fashion_mnist(fashion_mnist, download=False, progress=False)
    Xtr, ytr = splits.train.X[:3000], splits.train.y[:3000]
    Xte, yte = splits.test.X[:2000], splits.test.y[:2000]
    acc = {}
    for mode in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 64), nn.Tanh(), nn.Linear(64, 10))
        opt = KFAC(model, lr=0.1, damping=0.1)
        for _ in range(2):
            for idx in torch.arange(3000).split(100):
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bfloat16"):
                    loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
                loss.backward()
                opt.step()
        assert opt.layer_state(0)["A"].dtype == torch.float32
        with torch.no_grad():
            acc[mode] = float((model(Xte).argmax(1) == yte).float().mean())
    assert acc["float32"] > 0.75
    assert abs(acc["bfloat16"] - acc["float32"]) <= 0.005


@pytest.mark.parametrize("kappa", [1e-6, 1e3])
def test_kl_clip_scales_the_step_to_the_bound(kappa):
    """ν = min(1, √(κ / lr² Δᵀg)): computed here from the unclipped step Δθ = −lr Δ."""
    X, y = _data(40)
    steps = {}
    for clip in (None, kappa):
        model = mlp([4, 6, 3], "tanh", seed=6, dtype=D)
        before = _flat(model)
        opt = KFAC(model, lr=0.5, kind="exact", kl_clip=clip, rescale=False)
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        steps[clip] = (_flat(model) - before, grad)
    step, grad = steps[None]
    dg = float((-step / 0.5) @ grad)
    nu = min(1.0, (kappa / (0.25 * dg)) ** 0.5)
    torch.testing.assert_close(steps[kappa][0], nu * step, rtol=1e-10, atol=1e-14)
    assert (nu < 1) == (kappa == 1e-6)

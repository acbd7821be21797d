"""secondorder.optim.KFAC: step for step against minimize(method="kfac") on the same batches,
its factors against kfac_factors, its one-sample step against a dense solve with the exact
Gauss–Newton block of the curvature engine, exact resume, and its refusals (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from secondorder import ModelObjective, minimize, mlp
from secondorder.curvature import ggn
from secondorder.curvature.kfac import FlatLayout, KroneckerFactors, kfac_factors, kfac_layers
from secondorder.losses import get_loss
from secondorder.optim import KFAC, LBFGS  # noqa: F401  (LBFGS: the old exports still work)
from secondorder.sampling import ReshuffledBatches

D = torch.float64
LOSS_FN = {
    "cross_entropy": F.cross_entropy,
    "mse": lambda z, y: 0.5 * ((z - y) ** 2).sum(1).mean(),
}


def _data(n: int, k: int = 3, seed: int = 0, loss: str = "cross_entropy"):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=D)
    if loss == "cross_entropy":
        return X, torch.randint(0, k, (n,), generator=g)
    return X, torch.randn(n, k, generator=g, dtype=D)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _closure(opt, model, X, y, loss="cross_entropy"):
    return lambda: LOSS_FN[loss](model(X), y)


@pytest.mark.parametrize("rescale", [False, True])
def test_exact_kfac_equals_minimize_kfac_step_for_step(rescale):
    """The same steps as minimize's K-FAC; with ``rescale`` its quadratic model's scale,
    there from a double-backward Gauss–Newton product, here from forward-mode J·Δ."""
    X, y = _data(60)
    c, steps = 0.05, 6
    opts = {"lr": 0.7, "damping": 1e-2, "ema": 0.8, "inv_every": 2}

    def objective():
        return ModelObjective(
            mlp([4, 5, 3], "tanh", seed=1, dtype=D),
            "cross_entropy",
            (X, y),
            l2=c,
            sampler=ReshuffledBatches(60, 15, n_batches=1, seed=2),
        )

    obj = objective()
    res = minimize(
        obj,
        obj.initial_theta(),
        "kfac",
        kind="exact",
        line_search=None,
        rescale=rescale,
        max_iter=steps,
        gtol=None,
        trace_theta=True,
        **opts,
    )
    batches = objective()
    model = mlp([4, 5, 3], "tanh", seed=1, dtype=D)
    opt = KFAC(
        model, "cross_entropy", kind="exact", weight_decay=c, **opts, kl_clip=None, rescale=rescale
    )
    for k in range(steps):
        batches.begin_iteration(k)
        Xk, yk, _ = batches.samples("value")
        opt.step(_closure(opt, model, Xk, yk))
        torch.testing.assert_close(_flat(model), res.trace[k + 1]["theta"], rtol=0, atol=1e-12)
    assert not torch.allclose(res.trace[1]["theta"], res.trace[steps]["theta"])


@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
def test_factors_after_one_step_equal_kfac_factors(kind, monkeypatch):
    X, y = _data(40)
    model = mlp([4, 6, 5, 3], "sigmoid", seed=3, dtype=D)
    obj = ModelObjective(copy.deepcopy(model), "cross_entropy", (X, y))
    loss = get_loss("cross_entropy")
    if kind == "empirical":  # the empirical Fisher: the "sampled" targets are the labels
        monkeypatch.setattr(type(loss), "sample_targets", lambda self, z, gen=None: y)
    ref = kfac_factors(
        obj,
        obj.initial_theta(),
        kind="exact" if kind == "exact" else "mc",
        generator=torch.Generator().manual_seed(7),
    )
    opt = KFAC(model, "cross_entropy", kind=kind, ema=0.0, seed=7)
    opt.step(_closure(opt, model, X, y))
    for j, f in enumerate(ref):
        st = opt.layer_state(j)
        torch.testing.assert_close(st["A"], f.A, rtol=0, atol=1e-12)
        torch.testing.assert_close(st["G"], f.G, rtol=0, atol=1e-12)
    # the gradient the optimizer set is the closure loss's
    model2 = copy.deepcopy(obj.model)
    F.cross_entropy(model2(X), y).backward()
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-14)


@pytest.mark.parametrize("loss,k", [("cross_entropy", 3), ("mse", 2)])
def test_one_sample_step_solves_the_exact_gauss_newton_block_with_factored_damping(loss, k):
    """One sample: G ⊗ A is the exact GGN block (from secondorder.curvature.ggn), so the step
    of each layer is −lr·(B_l + D_l)⁻¹ ∇_l with D_l the factored damping (G+δ_G)⊗(A+δ_A) − G⊗A."""
    X, y = _data(1, k, seed=4, loss=loss)
    model = mlp([4, 5, k], "tanh", seed=5, dtype=D)
    theta0, lr, gamma = _flat(model), 0.3, 1e-2
    B = ggn(copy.deepcopy(model), X, y, loss)
    m2 = copy.deepcopy(model)
    LOSS_FN[loss](m2(X), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in m2.parameters()])
    opt = KFAC(model, loss, lr=lr, damping=gamma, kind="exact", kl_clip=None, rescale=False)
    opt.step(_closure(opt, model, X, y, loss))
    step = _flat(model) - theta0
    layers = kfac_layers(model)[0]
    for j, (info, sl) in enumerate(zip(layers, FlatLayout(model, layers).slices)):
        params = slice(sl[0].start, sl[-1].stop)
        st = opt.layer_state(j)
        A, G = st["A"], st["G"]
        ta, tg = float(A.trace()) / A.shape[0], float(G.trace()) / G.shape[0]
        pi = (ta / tg) ** 0.5
        eye_a, eye_g = torch.eye(A.shape[0], dtype=D), torch.eye(G.shape[0], dtype=D)
        damped = KroneckerFactors(info, A + pi * gamma**0.5 * eye_a, G + gamma**0.5 / pi * eye_g)
        block = B[params, params]
        M = block + damped.dense() - KroneckerFactors(info, A, G).dense()
        expected = -lr * torch.linalg.solve(M, g[params])
        torch.testing.assert_close(step[params], expected, rtol=0, atol=1e-10)


def _train(model, opt, batches, start=0, stop=None):
    for X, y in batches[start:stop]:
        opt.step(_closure(opt, model, X, y))


def test_state_dict_resumes_exactly_with_momentum_and_weight_decay():
    X, y = _data(80)
    batches = [(X[i : i + 20], y[i : i + 20]) for i in range(0, 80, 20)] * 3  # 12 steps
    opts = {"lr": 0.5, "kind": "mc", "ema": 0.9, "inv_every": 3, "momentum": 0.5}
    opts |= {"weight_decay": 1e-2, "seed": 3}
    whole = mlp([4, 6, 3], "tanh", seed=0, dtype=D)
    opt = KFAC(whole, "cross_entropy", **opts)
    _train(whole, opt, batches[:10])
    first = mlp([4, 6, 3], "tanh", seed=0, dtype=D)
    opt1 = KFAC(first, "cross_entropy", **opts)
    _train(first, opt1, batches[:5])
    saved, params = copy.deepcopy(opt1.state_dict()), copy.deepcopy(first.state_dict())
    rest = mlp([4, 6, 3], "tanh", seed=9, dtype=D)
    rest.load_state_dict(params)
    opt2 = KFAC(rest, "cross_entropy", **opts)
    opt2.load_state_dict(saved)
    _train(rest, opt2, batches[5:10])
    assert torch.equal(_flat(rest), _flat(whole))


def test_momentum_is_heavy_ball_on_the_preconditioned_step():
    """With inv_every=1, ema=0 the steps are Δ_k = K-FAC⁻¹ ∇ on each batch; a momentum run
    equals the hand-written recurrence b ← μb + Δ, θ ← θ − lr·b with Δ from a plain KFAC."""
    X, y = _data(40)
    batches = [(X[:20], y[:20]), (X[20:], y[20:])] * 2
    mu, lr = 0.7, 0.4
    ref = mlp([4, 5, 3], "tanh", seed=2, dtype=D)
    model = copy.deepcopy(ref)
    opt = KFAC(
        model,
        "cross_entropy",
        lr=lr,
        kind="exact",
        ema=0.0,
        inv_every=1,
        momentum=mu,
        kl_clip=None,
        rescale=False,
    )
    buf = None
    for Xk, yk in batches:
        probe = copy.deepcopy(ref)  # one plain step from the reference point gives Δ
        before = _flat(probe)
        KFAC(probe, "cross_entropy", lr=1.0, kind="exact", kl_clip=None, rescale=False).step(
            _closure(None, probe, Xk, yk)
        )
        delta = before - _flat(probe)
        buf = delta if buf is None else mu * buf + delta
        torch.nn.utils.vector_to_parameters(before - lr * buf, ref.parameters())
        opt.step(_closure(opt, model, Xk, yk))
        torch.testing.assert_close(_flat(model), _flat(ref), rtol=0, atol=1e-12)


def test_trains_to_the_minimiser_of_a_convex_problem():
    """Multinomial logistic regression with L2 on the weights (convex; the biases may shift
    together): full-batch exact K-FAC with weight decay reaches a stationary point with
    Newton's minimum value and predictions (and lowers the loss)."""
    X, y = _data(100, seed=6)
    c = 1e-2
    model = mlp([4, 3], "tanh", seed=0, dtype=D)
    obj = ModelObjective(copy.deepcopy(model), "cross_entropy", (X, y), l2=c)
    newton = minimize(obj, obj.initial_theta(), "newton")
    assert newton.success
    opt = KFAC(
        model,
        "cross_entropy",
        lr=1.0,
        damping=1e-8,
        kind="exact",
        ema=0.0,
        inv_every=1,
        kl_clip=None,
        rescale=False,
    )
    opt.param_groups[0]["weight_decay"] = c
    start = float(obj.value(_flat(model)))
    for _ in range(150):
        opt.step(_closure(opt, model, X, y))
    assert float(obj.value(_flat(model))) < start
    theta = _flat(model)
    assert float(obj.grad(theta).abs().max()) < 1e-9
    assert abs(float(obj.value(theta)) - newton.fun) < 1e-12
    torch.testing.assert_close(
        torch.softmax(obj.forward(theta, X), 1),
        torch.softmax(obj.forward(newton.theta, X), 1),
        rtol=0,
        atol=1e-8,
    )


def test_refusals():
    model = mlp([4, 3], "tanh", dtype=D)
    normed = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    with pytest.raises(ValueError, match=r"module 1 \(LayerNorm\).*unsupported='gradient'"):
        KFAC(normed)
    with pytest.raises(ValueError, match="unsupported"):
        KFAC(normed, unsupported="skip")
    with pytest.raises(ValueError, match="approximation"):
        KFAC(model, approximation="mean")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        KFAC(list(model.parameters()))
    for kw, match in (
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"damping": 0.0}, "damping"),
        ({"kind": "fisher"}, "kind"),
        ({"ema": 1.0}, "ema"),
        ({"momentum": -0.1}, "momentum"),
        ({"inv_every": 0}, "inv_every"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"loss": "hinge"}, "loss"),
    ):
        with pytest.raises(ValueError, match=match):
            KFAC(model, **kw)
    X, y = _data(5)
    opt = KFAC(model)
    with pytest.raises(RuntimeError, match="no forward pass was recorded"):
        opt.step()
    with pytest.raises(RuntimeError, match="no forward pass was recorded"):
        opt.step(lambda: model[0].weight.sum() * 2)
    F.cross_entropy(model(X), y)  # a forward pass, no backward
    for p in model.parameters():
        p.grad = None
    with pytest.raises(RuntimeError, match=r"no \.grad: call loss.backward\(\)"):
        opt.step()
    with pytest.raises(TypeError, match="one-element tensor"):
        opt.step(lambda: F.cross_entropy(model(X), y, reduction="none"))


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_factor_samples_form_the_factors_of_the_first_samples(kind, monkeypatch):
    """factor_samples = m: the factors of the whole batch's step are kfac_factors of its first
    m samples (the gradient still the whole batch's)."""
    X, y = _data(40)
    m = 15
    model = mlp([4, 6, 3], "tanh", seed=3, dtype=D)
    obj = ModelObjective(copy.deepcopy(model), "cross_entropy", (X[:m], y[:m]))
    if kind == "empirical":  # the empirical Fisher: the "sampled" targets are the labels
        loss = get_loss("cross_entropy")
        monkeypatch.setattr(type(loss), "sample_targets", lambda self, z, gen=None: y[:m])
    ref = kfac_factors(obj, obj.initial_theta(), kind="exact" if kind == "exact" else "mc")
    opt = KFAC(model, kind=kind, ema=0.0, factor_samples=m, rescale=False)
    opt.step(_closure(opt, model, X, y))
    for j, f in enumerate(ref):
        torch.testing.assert_close(opt.layer_state(j)["A"], f.A, rtol=0, atol=1e-12)
        torch.testing.assert_close(opt.layer_state(j)["G"], f.G, rtol=0, atol=1e-12)


def test_rescale_uses_the_gauss_newton_form_of_the_first_samples():
    """α = gᵀΔ / (Δᵀ B Δ + γ‖Δ‖² + λ‖Δ_W‖²) with B the dense Gauss–Newton matrix of the
    first factor_samples samples (from the curvature engine): the step is −lr α Δ."""
    X, y = _data(30)
    m, lr, gamma = 12, 0.5, 1e-2
    steps = {}
    for rescale in (False, True):
        model = mlp([4, 5, 3], "tanh", seed=2, dtype=D)
        before = _flat(model)
        opt = KFAC(
            model, lr=lr, damping=gamma, kind="exact", kl_clip=None, rescale=rescale,
            factor_samples=m,
        )  # fmt: skip
        opt.step(_closure(opt, model, X, y))
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        steps[rescale] = _flat(model) - before
    delta = -steps[False] / lr  # the plain K-FAC step
    B = ggn(mlp([4, 5, 3], "tanh", seed=2, dtype=D), X[:m], y[:m])
    alpha = float(grad @ delta) / float(delta @ B @ delta + gamma * delta @ delta)
    assert alpha != pytest.approx(1.0, abs=1e-3)
    torch.testing.assert_close(steps[True], alpha * steps[False], rtol=1e-9, atol=1e-13)


def test_rescale_replays_the_training_pass_dropout_masks_and_leaves_the_random_state():
    """With dropout, the replay starts from the training pass's random state: it draws the
    same masks, so α is the quadratic model of the network the gradient came from (checked
    against a forward-mode product of that network with the masks fixed and the softmax
    Hessian diag(p) − ppᵀ written out), and the caller's random stream is left as the
    training pass left it."""
    X, y = _data(16)
    lr, gamma = 0.5, 1e-2

    def run(rescale: bool):
        torch.manual_seed(4)
        model = nn.Sequential(
            nn.Linear(4, 6, dtype=D), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3, dtype=D)
        )
        masks = []
        model[2].register_forward_hook(lambda mod, i, o: masks.append((o != 0).clone()))
        before = [p.detach().clone() for p in model.parameters()]
        opt = KFAC(
            model, lr=lr, damping=gamma, kind="exact", kl_clip=None, rescale=rescale,
            factor_samples=None,
        )  # fmt: skip
        opt.step(_closure(opt, model, X, y))
        step = [p.detach() - b for p, b in zip(model.parameters(), before)]
        grads = [p.grad.clone() for p in model.parameters()]
        return before, step, grads, masks, torch.get_rng_state()

    theta, plain, grads, masks_plain, rng_plain = run(False)
    _, scaled, _, masks, rng = run(True)
    assert len(masks_plain) == 1 and len(masks) == 2  # the training pass and the replay
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks_plain[0])
    assert torch.equal(rng, rng_plain)

    keep = masks[0].to(D) * 2.0  # inverted dropout: kept units scaled by 1/(1 - 0.5)
    delta = [-t / lr for t in plain]

    def net(W1, b1, W2, b2):
        return (keep * torch.tanh(X @ W1.T + b1)) @ W2.T + b2

    z, jz = torch.func.jvp(net, tuple(theta), tuple(delta))
    p = torch.softmax(z, 1)
    form = float(((jz * (p * jz)).sum(1) - (p * jz).sum(1) ** 2).mean())
    g_d = sum(float((g * d).sum()) for g, d in zip(grads, delta))
    d_d = sum(float((d * d).sum()) for d in delta)
    alpha = g_d / (form + gamma * d_d)
    assert alpha != pytest.approx(1.0, abs=1e-3)
    for a, b in zip(scaled, plain):
        torch.testing.assert_close(a, alpha * b, rtol=1e-9, atol=1e-13)


def test_rescale_warns_and_goes_unscaled_for_a_model_it_cannot_replay():
    class NoForwardAD(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5, dtype=D), nn.Linear(5, 3, dtype=D)

        def forward(self, x):
            return self.b(NoForwardAD.apply(torch.tanh(self.a(x))))

    X, y = _data(20)
    model = Net()
    opt = KFAC(model, lr=0.5, damping=1e-2, kind="exact")
    with pytest.warns(RuntimeWarning, match="rescale=True could not replay"):
        opt.step(_closure(opt, model, X, y))
    assert opt.rescale is False
    opt.step(_closure(opt, model, X, y))  # no second warning, and it trains on
    assert all(torch.isfinite(p).all() for p in model.parameters())

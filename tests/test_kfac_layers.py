"""K-FAC on Conv2d layers and graphs that are not chains: factors against curvlinops (a peer,
in the test environment only) and against exact Gauss–Newton blocks from torch.func; EKFAC's
scales against the exact block in the Kronecker eigenbasis; training through all three faces."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import require_peers
from secondorder import minimize
from secondorder.curvature import layer_ggns
from secondorder.curvature.kfac import (
    FlatLayout,
    KFACEngine,
    kfac_layers,
    kfac_statistics,
)
from secondorder.objective import ModelObjective
from secondorder.optim import KFAC, KFACPreconditioner

D = torch.float64


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 2, dilation=2, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(36, 5),
        nn.Sigmoid(),
        nn.Linear(5, 3),
    ).to(D)


class _Residual(nn.Module):
    """x + tanh(W₂ relu(W₁ x)) then a head: not an nn.Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.outer = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(x + torch.tanh(self.outer(F.relu(self.inner(x)))))


def _data(n: int, shape=(2, 9, 9), k: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=D), torch.randint(0, k, (n,), generator=g)


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
@pytest.mark.parametrize("kind,fisher", [("exact", "type-2"), ("empirical", "empirical")])
def test_conv_factors_equal_curvlinops(approximation, kind, fisher):
    """curvlinops' KFACLinearOperator with separate_weight_and_bias=False (the bias as a last
    input column, as here) and a mean loss has A and G normalised exactly as documented in
    secondorder.curvature.kfac."""
    try:
        import curvlinops
    except ImportError:
        require_peers("curvlinops is not installed (make test installs it)")
    model = _cnn()
    X, y = _data(7)
    op = curvlinops.KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        list(model.parameters()),
        [(X, y)],
        fisher_type=fisher,
        kfac_approx=approximation,
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    obj = ModelObjective(model, "cross_entropy", (X, y))
    stats = kfac_statistics(obj, obj.initial_theta(), kind=kind, approximation=approximation)
    assert [f.layer.name for f in stats.factors] == ["0", "2", "5", "7"]
    for f in stats.factors:
        A, G = op._input_covariances[f.layer.name], op._gradient_covariances[f.layer.name]
        torch.testing.assert_close(f.A, A, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(f.G, G, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
def test_one_sample_of_a_deep_linear_network_gives_the_exact_blocks(approximation):
    """No weight sharing and one sample: G ⊗ A is the Gauss–Newton block itself (torch.func)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 6, bias=False), nn.Linear(6, 3)).to(D)
    X, y = torch.randn(1, 4, dtype=D), torch.tensor([2])
    obj = ModelObjective(model, "cross_entropy", (X, y))
    factors = kfac_statistics(obj, obj.initial_theta(), approximation=approximation).factors
    blocks = layer_ggns(model, X, y, method="autodiff")
    for f, block in zip(factors, blocks, strict=True):
        torch.testing.assert_close(f.dense(), block, rtol=1e-10, atol=1e-12)


def test_a_residual_graph_is_factored_through_its_modules():
    """Hooks see every Linear of a non-sequential model; with one sample each block is exact."""
    model = _Residual().to(D)
    X, y = torch.randn(1, 6, dtype=D), torch.tensor([1])
    obj = ModelObjective(model, "cross_entropy", (X, y))
    factors = kfac_statistics(obj, obj.initial_theta()).factors
    assert [f.layer.name for f in factors] == ["inner", "outer", "head"]
    blocks = layer_ggns(model, X, y, method="autodiff")
    for f, block in zip(factors, blocks, strict=True):
        torch.testing.assert_close(f.dense(), block, rtol=1e-10, atol=1e-12)


def test_a_module_called_twice_adds_its_calls_as_positions():
    """A shared Linear applied twice: its factors sum the output gradients of both calls and
    average the inputs over them (the 'expand' rule for positions)."""
    shared = nn.Linear(3, 3).to(D)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared, self.head = shared, nn.Linear(3, 2).to(D)

        def forward(self, x):
            return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))

    model = Twice()
    X, y = torch.randn(5, 3, dtype=D), torch.randint(0, 2, (5,))
    obj = ModelObjective(model, "cross_entropy", (X, y))
    f = kfac_statistics(obj, obj.initial_theta()).factors[0]
    a1 = torch.cat([X, torch.ones(5, 1, dtype=D)], 1)
    h = torch.tanh(shared(X)).detach()
    a2 = torch.cat([h, torch.ones(5, 1, dtype=D)], 1)
    torch.testing.assert_close(f.A, (a1.T @ a1 + a2.T @ a2) / 10, rtol=1e-12, atol=1e-14)


def test_ekfac_scales_are_the_exact_block_in_the_kronecker_eigenbasis():
    """EKFAC's S (ema 0, exact kind) is diag(Qᵀ B Q) with Q = Q_G ⊗ Q_A and B the exact
    Gauss–Newton block of the layer, weight sharing included (George et al. 2018)."""
    model = _cnn()
    X, y = _data(6)
    obj = ModelObjective(model, "cross_entropy", (X, y))
    stats = kfac_statistics(obj, obj.initial_theta(), per_sample=True)
    layers = [f.layer for f in stats.factors]
    engine = KFACEngine(layers, ema=0.0, ekfac=True)
    engine.update(stats.factors)
    engine.refresh(0.1)
    engine.update_scales(stats)
    blocks = layer_ggns(model, X, y, method="autodiff")
    for f, st, block in zip(stats.factors, engine.state, blocks, strict=True):
        Q = f.layer.split_matrix  # θ order of the layer: weight flattened, then bias
        d_out, d_in = f.layer.kfac_dims
        idx = torch.arange(d_out * d_in).view(d_out, d_in)
        order = torch.cat([t.reshape(-1) for t in Q(idx)])
        B = torch.empty_like(block)
        B[order[:, None], order[None, :]] = block  # back to vec(W̃) row-major
        K = torch.kron(st["QG"], st["QA"])
        expected = torch.diagonal(K.T @ B @ K).view(d_out, d_in)
        torch.testing.assert_close(st["S"], expected, rtol=1e-8, atol=1e-12)
    # and the preconditioned step is Q (S + γ)⁻¹ Qᵀ g
    layout = FlatLayout(model, layers)
    g = torch.randn(layout.n_params, dtype=D)
    out = layout.apply(engine, g, 0.1)
    st, sl = engine.state[0], layout.slices[0]
    M = layers[0].grad_matrix([g[s].view(p.shape) for s, p in zip(sl, layers[0].parameters())])
    step = st["QG"] @ ((st["QG"].T @ M @ st["QA"]) / (st["S"] + 0.1)) @ st["QA"].T
    got = layers[0].grad_matrix([out[s].view(p.shape) for s, p in zip(sl, layers[0].parameters())])
    torch.testing.assert_close(got, step, rtol=1e-12, atol=1e-14)


def test_unsupported_parameters_take_the_plain_gradient_when_asked():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)).to(D)
    layers, others = kfac_layers(model, unsupported="gradient")
    assert [ly.name for ly in layers] == ["0", "2"]
    assert [n for n, _ in others] == ["1.weight", "1.bias"]
    X, y = torch.randn(8, 4, dtype=D), torch.randint(0, 2, (8,))
    opt = KFAC(model, lr=0.5, unsupported="gradient")
    ln_before = model[1].weight.detach().clone()

    def closure():
        opt.zero_grad()
        return F.cross_entropy(model(X), y)

    opt.step(closure)
    grad = model[1].weight.grad
    torch.testing.assert_close(model[1].weight.detach(), ln_before - 0.5 * grad)


def test_bare_parameters_are_refused_by_module_name():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return self.scale * self.lin(x)

    with pytest.raises(ValueError, match=r"module Scaled.*Freeze them.*unsupported='gradient'"):
        KFAC(Scaled())


def test_factor_memory_is_checked_before_allocating(tmp_path, capsys):
    from secondorder.cli import main

    model = nn.Sequential(nn.Linear(40000, 2))
    X, y = torch.zeros(2, 40000), torch.tensor([0, 1])
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    obj = ModelObjective(model, "cross_entropy", (X, y))
    for build in (
        lambda: KFAC(model),
        lambda: KFACPreconditioner(model),
        lambda: minimize(obj, theta, "kfac"),
        lambda: minimize(obj, theta, "nlcg", preconditioner="kfac"),
    ):
        with pytest.raises(MemoryError, match=r"K-FAC's Kronecker factors.*0 \(Linear\)"):
            build()
    assert obj.counts.f == 0
    spec = tmp_path / "wide.toml"
    spec.write_text(
        'description = "wide"\n[data]\nkind = "random"\n[model]\nkind = "mlp"\n'
        'hidden = [40000]\n[[solvers]]\nname = "K"\nmethod = "kfac"\n'
    )
    run = tmp_path / "run"
    assert main(["run", str(spec), "--run-dir", str(run), "--no-progress"]) != 0
    assert "K-FAC's Kronecker factors" in capsys.readouterr().err
    assert not run.exists()


def _lenet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def _fashion(fashion_mnist, n_train: int, n_test: int):
    from secondorder.data import load_fashion_mnist

    splits = load_fashion_mnist(fashion_mnist, flatten=False, download=False, progress=False)
    Xtr, ytr = splits.train.X[:n_train, None], splits.train.y[:n_train]
    Xte, yte = splits.test.X[:n_test, None], splits.test.y[:n_test]
    return Xtr, ytr, Xte, yte


def _accuracy(model, X, y) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


@pytest.mark.parametrize("ekfac", [False, True])
def test_optim_kfac_trains_a_cnn_on_fashion_mnist(fashion_mnist, ekfac):
    Xtr, ytr, Xte, yte = _fashion(fashion_mnist, 2000, 1000)
    model = _lenet()
    # the recipe for ReLU CNNs: more damping than the default, and the KL bound on the step
    opt = KFAC(model, damping=1e-2, kl_clip=1e-2, ekfac=ekfac)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for idx in torch.randperm(len(Xtr), generator=g).split(50):

            def closure(idx=idx):
                opt.zero_grad()
                return F.cross_entropy(model(Xtr[idx]), ytr[idx])

            opt.step(closure)
    assert _accuracy(model, Xte, yte) > 0.7


def test_minimize_kfac_and_the_kfac_preconditioner_train_a_cnn(fashion_mnist):
    Xtr, ytr, Xte, yte = _fashion(fashion_mnist, 1000, 1000)
    for run in ("kfac", "preconditioned"):
        model = _lenet()
        obj = ModelObjective(model, "cross_entropy", (Xtr, ytr))
        if run == "kfac":
            res = minimize(obj, obj.initial_theta(), "kfac", max_iter=15, approximation="reduce")
        else:
            res = minimize(obj, obj.initial_theta(), "nlcg", max_iter=15, preconditioner="kfac")
        trained = copy.deepcopy(model)
        torch.nn.utils.vector_to_parameters(res.theta, trained.parameters())
        assert res.trace[-1]["f"] < 0.8 * res.trace[0]["f"], run
        assert _accuracy(trained, Xte, yte) > 0.6, run


def test_optim_kfac_trains_a_residual_mlp_on_fashion_mnist(fashion_mnist):
    Xtr, ytr, Xte, yte = _fashion(fashion_mnist, 2000, 1000)

    class ResMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.mid, self.out = nn.Linear(784, 64), nn.Linear(64, 64), nn.Linear(64, 10)

        def forward(self, x):
            h = torch.tanh(self.inp(x.flatten(1)))
            return self.out(h + torch.tanh(self.mid(h)))

    torch.manual_seed(0)
    model = ResMLP()
    opt = KFAC(model, lr=0.1)
    for _ in range(2):
        for idx in torch.arange(len(Xtr)).split(100):

            def closure(idx=idx):
                opt.zero_grad()
                return F.cross_entropy(model(Xtr[idx]), ytr[idx])

            opt.step(closure)
    assert _accuracy(model, Xte, yte) > 0.7


def test_a_non_finite_batch_is_skipped_without_poisoning_the_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = KFAC(model, lr=0.1)

    def closure(X=X):
        opt.zero_grad()
        return F.cross_entropy(model(X), y)

    opt.step(closure)
    before = [p.detach().clone() for p in model.parameters()]
    factors = [opt.layer_state(j)["A"].clone() for j in range(len(opt._layers))]
    bad = X.clone()
    bad[3, 1] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite.*skipped"):
        opt.step(lambda: closure(bad))
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
    for j, A in enumerate(factors):
        assert torch.equal(opt.layer_state(j)["A"], A)
    loss0 = float(closure())
    for _ in range(5):
        opt.step(closure)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert float(closure()) < loss0


def test_bfloat16_models_keep_float32_factors_and_train():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    model = model.to(torch.bfloat16)
    X = torch.randn(32, 1, 8, 8).to(torch.bfloat16)
    y = torch.randint(0, 3, (32,))
    opt = KFAC(model, lr=0.05, damping=0.1)

    def closure():
        opt.zero_grad()
        return F.cross_entropy(model(X).float(), y)

    loss0 = float(closure())
    for _ in range(10):
        opt.step(closure)
    st = opt.layer_state(0)
    assert st["A"].dtype == torch.float32 and st["A_inv"].dtype == torch.float32
    assert model[0].weight.dtype == torch.bfloat16
    assert float(closure()) < loss0


def test_meta_device_models_are_refused():
    model = nn.Sequential(nn.Linear(3, 2)).to("meta")
    with pytest.raises(ValueError, match="meta device"):
        KFAC(model)


def test_state_of_another_model_and_new_parameter_groups_are_refused():
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    wide = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3))
    X, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = KFAC(small)
    opt.step(lambda: F.cross_entropy(small(X), y))
    other = KFAC(wide)
    with pytest.raises(ValueError, match=r"layer 0 \(Linear\).*another model"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="no further parameter groups"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_nan_outputs_in_a_user_loop_skip_the_step_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = KFAC(model)
    before = [p.detach().clone() for p in model.parameters()]
    bad = X.clone()
    bad[0, 0] = float("nan")
    opt.zero_grad()
    F.cross_entropy(model(bad), y).backward()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
    opt.zero_grad()
    F.cross_entropy(model(X), y).backward()
    opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())

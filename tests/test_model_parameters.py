"""Frozen, shared and misbehaving parameters of a model: θ holds the trainable parameters once,
the user's model is never modified by an evaluation, and a model whose forward returns
something other than a tensor of outputs is refused by name. References: autograd on the
model itself (its trainable parameters), double backward for Hessian-vector products, and
dense float64 Hessians from ``torch.autograd.functional.hessian``."""

import warnings

import pytest
import torch
from torch import nn

from secondorder import curvature, minimize
from secondorder.objective import ModelObjective

f64 = torch.float64


def _data(n=12, d=3, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=f64), torch.randint(0, k, (n,), generator=g)


def _autograd_reference(model, X, y, v=None):
    """Mean cross-entropy, its gradient and (with v) Hv, by autograd on the model's own
    trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = nn.functional.cross_entropy(model(X), y)
    g = torch.autograd.grad(loss, params, create_graph=v is not None)
    flat_g = torch.cat([t.reshape(-1) for t in g])
    if v is None:
        return loss.detach(), flat_g.detach(), None
    hv = torch.autograd.grad(flat_g @ v, params)
    return loss.detach(), flat_g.detach(), torch.cat([t.reshape(-1) for t in hv])


def _snapshot(model):
    return {k: (type(v), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}


def _assert_unchanged(model, before):
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for k, v in after.items():
        assert type(v) is before[k][0], k
        assert isinstance(v, nn.Parameter), k
        assert torch.equal(v.detach(), before[k][1]), k


# -- frozen parameters -------------------------------------------------------------------------
def _frozen_mlp():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(f64)
    model[0].requires_grad_(False)
    return model


def test_frozen_parameters_are_left_out_of_theta_and_kept_fixed():
    model = _frozen_mlp()
    X, y = _data()
    obj = ModelObjective(model, "cross_entropy", (X, y))
    assert obj.n_params == 4 * 2 + 2  # only the last layer
    assert obj.names == ["2.weight", "2.bias"]
    theta = obj.initial_theta() + 0.1
    ref_model = _frozen_mlp()
    ref_model[2].weight.data.copy_(theta[:8].view(2, 4))
    ref_model[2].bias.data.copy_(theta[8:])
    v = torch.randn(obj.n_params, dtype=f64)
    f_ref, g_ref, hv_ref = _autograd_reference(ref_model, X, y, v)
    f, g = obj.value_and_grad(theta)
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(obj.hvp(theta, v), hv_ref)


def test_frozen_parameters_stay_fixed_through_minimize_and_load_into_model():
    model = _frozen_mlp()
    frozen = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    X, y = _data()
    obj = ModelObjective(model, "cross_entropy", (X, y))
    before = _snapshot(model)
    res = minimize(obj, obj.initial_theta(), method="lbfgs", max_iter=20)
    _assert_unchanged(model, before)  # minimize never writes into the model
    obj.load_into_model(res.theta)
    torch.testing.assert_close(model[0].weight, frozen[0], rtol=0, atol=0)
    torch.testing.assert_close(model[0].bias, frozen[1], rtol=0, atol=0)
    torch.testing.assert_close(model[2].bias.detach(), res.theta[8:])


def test_curvature_of_a_model_with_frozen_parameters_is_over_the_trainable_ones():
    model = _frozen_mlp()
    X, y = _data()
    W1, b1 = model[0].weight.detach(), model[0].bias.detach()
    theta = torch.cat([p.detach().reshape(-1) for p in model[2].parameters()])

    def J(t):
        out = torch.tanh(X @ W1.T + b1) @ t[:8].view(2, 4).T + t[8:]
        return nn.functional.cross_entropy(out, y)

    H_ref = torch.autograd.functional.hessian(J, theta)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        H = curvature.hessian(model, X, y, "cross_entropy")
        d = curvature.hessian_diagonal(model, X, y, "cross_entropy")
    assert any("frozen" in str(w.message) for w in caught)  # the fast path says why not
    torch.testing.assert_close(H, H_ref)
    torch.testing.assert_close(d, H_ref.diagonal())


def test_a_model_with_every_parameter_frozen_is_refused():
    model = _frozen_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters.*requires_grad=False"):
        ModelObjective(model, "cross_entropy", _data())


# -- shared parameters ------------------------------------------------------------------------
class _TiedParameter(nn.Module):
    """l2 borrows l1's weight; ``again`` is ``out`` registered a second time."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.out = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
        self.l2.weight = self.l1.weight
        self.again = self.out

    def forward(self, x):
        return self.again(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def _shared_module():
    lin = nn.Linear(3, 3)
    return nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(3, 2))


@pytest.mark.parametrize("build", [_TiedParameter, _shared_module], ids=["parameter", "module"])
def test_shared_parameters_count_once_and_the_model_is_never_modified(build):
    torch.manual_seed(2)
    model = build().to(f64)
    X, y = _data()
    before = _snapshot(model)
    obj = ModelObjective(model, "cross_entropy", (X, y))
    assert obj.n_params == sum(p.numel() for p in model.parameters())  # each shared one once
    theta = obj.initial_theta() * 1.5  # evaluate away from the model's own values
    v = torch.randn(obj.n_params, dtype=f64)
    f, g = obj.value_and_grad(theta)
    hv = obj.hvp(theta, v)
    obj.ggnvp(theta, v)
    _assert_unchanged(model, before)
    minimize(obj, theta, method="trust-ncg", max_iter=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the autodiff fallback notice
        H = curvature.hessian(model, X, y, "cross_entropy")
        curvature.saddle_report(model, X, y, "cross_entropy")
    _assert_unchanged(model, before)
    obj.load_into_model(theta)  # the one call that writes: the reference at θ
    f_ref, g_ref, hv_ref = _autograd_reference(model, X, y, v)
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(g, g_ref)  # the sum over both uses
    torch.testing.assert_close(hv, hv_ref)
    _, _, hv0 = _autograd_reference(model, X, y, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.testing.assert_close(curvature.hessian(model, X, y, "cross_entropy") @ v, hv0)
    assert H.shape == (obj.n_params, obj.n_params)
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_a_forward_that_raises_leaves_the_model_as_it_was():
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.fail = False

        def forward(self, x):
            out = self.lin(x)
            if self.fail:
                raise RuntimeError("boom")
            return out

    model = Flaky().to(f64)
    obj = ModelObjective(model, "cross_entropy", _data())
    before = _snapshot(model)
    model.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        obj.value(obj.initial_theta() + 1.0)
    _assert_unchanged(model, before)


# -- a forward that does not return a tensor of outputs ---------------------------------------
class _Returns(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.lin, self.kind = nn.Linear(3, 2), kind

    def forward(self, x):
        out = self.lin(x)
        return {"tuple": (out, x), "dict": {"logits": out}, "flat": out[:, 0]}[self.kind]


@pytest.mark.parametrize(
    ("kind", "error", "match"),
    [
        ("tuple", TypeError, r"model _Returns returned a tuple from forward; expected a tensor"),
        ("dict", TypeError, r"model _Returns returned a dict from forward; expected a tensor"),
        ("flat", ValueError, r"model _Returns must map .* \(m, k\) outputs.*shape \(1,\)"),
    ],
)
def test_a_forward_returning_no_output_tensor_is_refused_by_name(kind, error, match):
    model = _Returns(kind).to(f64)
    X, y = _data()
    with pytest.raises(error, match=match):
        ModelObjective(model, "cross_entropy", (X, y))
    with pytest.raises(error, match=match):
        curvature.hessian(model, X, y, "cross_entropy")

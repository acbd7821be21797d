"""Second-order backpropagation against torch.func in float64: full Hessian, every block, the
diagonal, the Gauss–Newton matrix, per-sample H_Z; the autodiff fallback; refusals; bad inputs;
the saddle report; the worked example."""

from __future__ import annotations

import importlib.util
import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from secondorder.curvature import (
    ggn,
    ggn_diagonal,
    hessian,
    hessian_blocks,
    hessian_diagonal,
    layer_hessians,
    per_sample_hz,
    saddle_report,
    supports_fast_path,
)
from secondorder.losses import get_loss
from secondorder.models import ACTIVATIONS, logistic_regression, mlp
from secondorder.objective import MemoryError_
from secondorder.report.diagnostics_figures import plot_saddle_report

f64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices: one thread is as fast and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- references -------------------------------------------------------------------------------


def flat_fn(model, X, y, loss, l2=0.0):
    """θ ↦ mean loss + (l2/2)‖W‖² with θ ordered as model.parameters()."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [s.numel() for s in shapes]
    lo = get_loss(loss)

    def unflat(t):
        return {n: c.view(s) for n, c, s in zip(names, torch.split(t, sizes), shapes)}

    def f(t):
        ps = unflat(t)
        out = functional_call(model, ps, (X,))
        reg = sum(0.5 * l2 * (v**2).sum() for v in ps.values() if v.ndim >= 2)
        return lo.per_sample(out, y).mean() + reg

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return f, theta, unflat


def reference_hessian(model, X, y, loss, l2=0.0):
    f, theta, _ = flat_fn(model, X, y, loss, l2)
    return torch.func.hessian(f)(theta)


def rel(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def make_targets(loss, N, k, g):
    if loss == "cross_entropy":
        return torch.randint(0, k, (N,), generator=g)
    if loss == "logistic":
        return torch.randint(0, 2, (N,), generator=g).to(f64)
    return torch.randn(N, k, generator=g, dtype=f64)


TORCH_ACTS = {"nn.Sigmoid": nn.Sigmoid, "nn.Tanh": nn.Tanh, "nn.ReLU": nn.ReLU}


def make_act(name):
    return TORCH_ACTS[name]() if name in TORCH_ACTS else ACTIVATIONS[name]()


def make_mlp(widths, act, out_act=None, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b, bias=bias, dtype=f64)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g, dtype=f64) / a**0.5)
            if bias:
                lin.bias.copy_(0.5 * torch.randn(b, generator=g, dtype=f64))
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(make_act(act))
    if out_act is not None:
        layers.append(make_act(out_act))
    return nn.Sequential(*layers)


def layer_slices(model):
    out, pos = [], 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            n = sum(p.numel() for p in m.parameters())
            out.append(slice(pos, pos + n))
            pos += n
    return out


# -- the exactness grid -----------------------------------------------------------------------

ACTS = ["sigmoid", "tanh", "relu", "softplus", "identity", *TORCH_ACTS]
LOSSES = ["cross_entropy", "logistic", "mse"]
DEPTHS = [1, 2, 3, 4]
BATCHES = [1, 17, 200]


def _cases():
    cases = []
    for i, (act, loss) in enumerate(itertools.product(ACTS, LOSSES)):
        depth = DEPTHS[i % 4]
        N = BATCHES[i % 3]
        l2 = 0.0 if i % 2 else 0.03
        cases.append((act, loss, depth, N, l2, None))
    for i, act in enumerate(ACTS):  # mse with an output activation: ŷ = f(z⁽ᴸ⁾)
        out_act = ["sigmoid", "tanh", "softplus", "nn.Sigmoid"][i % 4]
        cases.append(
            (act, "mse", DEPTHS[(i + 1) % 4], BATCHES[(i + 2) % 3], 0.01 * (i % 2), out_act)
        )
    return cases


def _widths(depth, loss, seed):
    k = {"cross_entropy": 3, "logistic": 1, "mse": 2}[loss]
    hidden = [5, 4, 3][: depth - 1]
    return [4, *hidden, k]


@pytest.mark.parametrize("act,loss,depth,N,l2,out_act", _cases())
def test_backprop_matches_torch_func(act, loss, depth, N, l2, out_act):
    g = torch.Generator().manual_seed(depth * 100 + N)
    widths = _widths(depth, loss, 0)
    model = make_mlp(widths, act, out_act, seed=depth + N)
    assert supports_fast_path(model) == (True, "")
    X = torch.randn(N, widths[0], generator=g, dtype=f64)
    y = make_targets(loss, N, widths[-1], g)
    y_ref = get_loss(loss).check_targets(y, widths[-1])
    H_ref = reference_hessian(model, X, y_ref, loss, l2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast path must not warn
        H = hessian(model, X, y, loss, l2, method="backprop", chunk_size=7)
        d = hessian_diagonal(model, X, y, loss, l2, method="backprop")
        lb = layer_hessians(model, X, y, loss, l2, method="backprop")
        blocks = hessian_blocks(model, X, y, loss, l2, method="backprop")
    assert rel(H, H_ref) <= 1e-10
    assert torch.equal(H, H.T)
    assert rel(d, H_ref.diagonal()) <= 1e-10
    sl = layer_slices(model)
    assert len(lb) == len(sl) == depth
    for k, s in enumerate(sl):
        assert rel(lb[k], H_ref[s, s]) <= 1e-10
    assert sorted(blocks) == [(k, l) for k in range(depth) for l in range(depth)]
    for (k, l), B in blocks.items():
        assert B.shape == (sl[k].stop - sl[k].start, sl[l].stop - sl[l].start)
        assert float((B - H_ref[sl[k], sl[l]]).norm()) <= 1e-10 * float(H_ref.norm())


def test_layer_block_order_is_weight_then_bias():
    model = make_mlp([3, 4, 2], "tanh", seed=3)
    X, y = torch.randn(9, 3, dtype=f64), torch.randint(0, 2, (9,))
    f, theta, unflat = flat_fn(model, X, y, "cross_entropy")

    def f_layer0(w, b):
        t = theta.clone()
        t = torch.cat([w.reshape(-1), b, theta[16:]])
        return f(t)

    W0, b0 = model[0].weight.detach(), model[0].bias.detach()
    HWW = torch.func.hessian(f_layer0, argnums=0)(W0, b0).reshape(12, 12)
    Hbb = torch.func.hessian(f_layer0, argnums=1)(W0, b0)
    block = layer_hessians(model, X, y)[0]
    assert rel(block[:12, :12], HWW) <= 1e-12
    assert rel(block[12:, 12:], Hbb) <= 1e-12


def test_variants_no_bias_nested_chained_flatten_and_leading_activation():
    g = torch.Generator().manual_seed(1)
    models = {
        "no bias": nn.Sequential(
            nn.Linear(6, 5, bias=False),
            nn.Tanh(),
            nn.Linear(5, 3),
            nn.Sigmoid(),
            nn.Linear(3, 2, bias=False),
        ),
        "nested + chain": nn.Sequential(
            nn.Sequential(nn.Linear(6, 4), nn.Sigmoid()),
            nn.Sequential(nn.Tanh(), nn.Identity(), nn.Linear(4, 2)),
        ),
        "flatten + leading": nn.Sequential(
            nn.Flatten(), nn.Tanh(), nn.Linear(6, 3), nn.Softplus(), nn.Linear(3, 2)
        ),
    }
    for name, model in models.items():
        model = model.to(f64)
        X = torch.randn(11, 6, generator=g, dtype=f64)
        if name.startswith("flatten"):
            X = X.view(11, 2, 3)
        y = torch.randint(0, 2, (11,), generator=g)
        assert supports_fast_path(model)[0], name
        H_ref = reference_hessian(model, X, y, "cross_entropy", 0.1)
        H = hessian(model, X, y, l2=0.1, method="backprop")
        assert rel(H, H_ref) <= 1e-10, name
        blocks = hessian_blocks(model, X, y, l2=0.1, pairs=[(1, 0)])
        s = layer_slices(model)
        assert rel(blocks[(1, 0)], H_ref[s[1], s[0]]) <= 1e-10, name


def test_float32_is_preserved_and_close():
    model = mlp([5, 6, 3], "sigmoid", seed=0, dtype=torch.float32)
    X, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    for fn in (hessian, ggn, hessian_diagonal, ggn_diagonal):
        out = fn(model, X, y, l2=0.01)
        assert out.dtype == torch.float32
        ref = fn(model.double(), X.double(), y, l2=0.01)
        model.float()
        assert rel(out.double(), ref) <= 1e-5
    assert layer_hessians(model, X.double(), y)[0].dtype == torch.float32


# -- the fast diagonal and the uninitialised outputs --------------------------------------------


@pytest.mark.parametrize(
    "widths,act,out_act,loss",
    [
        ([6, 3], "sigmoid", None, "cross_entropy"),  # one layer, cross-entropy at the output
        ([6, 5, 3], "tanh", None, "cross_entropy"),  # H_Z of the output never formed
        ([6, 5, 4, 3], "sigmoid", None, "cross_entropy"),
        ([6, 5, 4, 3, 2], "softplus", "sigmoid", "mse"),  # an output activation
        ([6, 5, 4, 1], "nn.Tanh", None, "logistic"),
        ([6, 5, 2], "relu", "tanh", "mse"),
    ],
)
def test_diagonal_paths_match_torch_func(monkeypatch, widths, act, out_act, loss):
    """Every route of the diagonal (the implicit cross-entropy H_Z, the K-GEMM and its
    fallback, the x ⊙ x row blocks, several chunks) against torch.func.hessian."""
    from secondorder.curvature import diagonal as backprop

    g = torch.Generator().manual_seed(len(widths))
    model = make_mlp(widths, act, out_act, seed=len(widths))
    N = 40
    X = torch.randn(N, widths[0], generator=g, dtype=f64)
    y = get_loss(loss).check_targets(make_targets(loss, N, widths[-1], g), widths[-1])
    H_ref = reference_hessian(model, X, y, loss, 0.02)
    G_ref = ggn(model, X, y, loss, 0.02, method="autodiff")
    for k_elems, block_bytes, chunk in ((2**22, 2**20, None), (0, 16 * 6 * 8, 7)):
        monkeypatch.setattr(backprop, "_K_ELEMENTS", k_elems)
        monkeypatch.setattr(backprop, "_SQUARE_BLOCK_BYTES", block_bytes)
        d = hessian_diagonal(model, X, y, loss, 0.02, method="backprop", chunk_size=chunk)
        assert rel(d, H_ref.diagonal()) <= 1e-10
        dg = ggn_diagonal(model, X, y, loss, 0.02, method="backprop", chunk_size=chunk)
        assert rel(dg, G_ref.diagonal()) <= 1e-10


def test_dense_outputs_start_uninitialised_and_are_fully_written(monkeypatch):
    """The dense results are allocated with torch.empty and every entry is written (the first
    chunk overwrites): poison fresh memory with NaN and compare, over several chunks."""
    from secondorder.curvature import blocks as backprop

    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    model = make_mlp([4, 5, 3, 3], "tanh", seed=2)
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(23, 4, generator=g, dtype=f64), torch.randint(0, 3, (23,), generator=g)
    H_ref = reference_hessian(model, X, y, "cross_entropy", 0.05)
    sl = layer_slices(model)
    monkeypatch.setattr(backprop.torch, "empty", poisoned)
    for min_units, chunk in itertools.product((1, 8), (None, 5)):
        monkeypatch.setattr(backprop, "_PAIR_MIN_UNITS", min_units)
        H = hessian(model, X, y, l2=0.05, chunk_size=chunk)
        assert rel(H, H_ref) <= 1e-10 and torch.equal(H, H.T)
        for k, B in enumerate(layer_hessians(model, X, y, l2=0.05, chunk_size=chunk)):
            assert rel(B, H_ref[sl[k], sl[k]]) <= 1e-10
        blocks = hessian_blocks(model, X, y, l2=0.05, pairs=[(0, 2), (1, 1)], chunk_size=chunk)
        assert rel(blocks[(0, 2)], H_ref[sl[0], sl[2]]) <= 1e-10
        assert rel(blocks[(1, 1)], H_ref[sl[1], sl[1]]) <= 1e-10


@pytest.mark.parametrize("min_units,band", [(1, 3), (1, 32), (4, 2)])
def test_pair_gemm_layer_blocks(monkeypatch, min_units, band):
    """The whole-block assembly of wide layers (pairs j ≤ j′, row bands, four-way copies) in
    every combination with the row-band one of narrow layers, over several chunks, exactly
    symmetric; GGN too."""
    from secondorder.curvature import blocks as backprop

    monkeypatch.setattr(backprop, "_PAIR_MIN_UNITS", min_units)
    monkeypatch.setattr(backprop, "_PAIR_MAX_BAND", band)
    g = torch.Generator().manual_seed(3)
    for bias in (True, False):
        model = make_mlp([7, 5, 3, 2], "sigmoid", seed=3, bias=bias)
        X, y = torch.randn(31, 7, generator=g, dtype=f64), torch.randint(0, 2, (31,), generator=g)
        H_ref = reference_hessian(model, X, y, "cross_entropy", 0.02)
        sl = layer_slices(model)
        for chunk in (None, 6):
            H = hessian(model, X, y, l2=0.02, chunk_size=chunk)
            assert rel(H, H_ref) <= 1e-10 and torch.equal(H, H.T)
            lb = layer_hessians(model, X, y, l2=0.02, chunk_size=chunk)
            for k, B in enumerate(lb):
                assert rel(B, H_ref[sl[k], sl[k]]) <= 1e-10 and torch.equal(B, B.T)
        G = ggn(model, X, y, l2=0.02)
        assert rel(G, ggn(model, X, y, l2=0.02, method="autodiff")) <= 1e-10
        assert torch.equal(G, G.T)


def test_hvp_routes_agree():
    from secondorder.curvature.autodiff import ROUTES, hessian_rows, prepare

    model = make_mlp([4, 5, 3], "sigmoid", seed=1)
    X, y = torch.randn(9, 4, dtype=f64), torch.randint(0, 3, (9,))
    H_ref = reference_hessian(model, X, y, "cross_entropy", 0.1)
    problem = prepare(model, X, y, "cross_entropy", 0.1)
    E = torch.eye(problem.n_params, dtype=f64)[3:11]
    for route in ROUTES:
        rows, taken = hessian_rows(problem.objective(), problem.theta, route)
        assert taken == route
        assert rel(rows(E), H_ref[3:11]) <= 1e-12, route


def test_finite_check_survives_overflowing_sums():
    """X is validated by one sum; a sum that overflows on finite data must not be an error."""
    model = mlp([2, 3, 2], "sigmoid", seed=0, dtype=f64)
    X = torch.tensor([[1e308, 1e308], [1e308, -1.0]], dtype=f64)
    y = torch.tensor([0, 1])
    assert hessian_diagonal(model, X, y).shape == (17,)
    for bad in (float("inf"), float("-inf"), float("nan")):
        Xb = X.clone()
        Xb[1, 1] = bad
        with pytest.raises(ValueError, match=r"NaN or inf values \(first in sample 1\)"):
            hessian_diagonal(model, Xb, y)
        with pytest.raises(ValueError, match=r"NaN or inf values \(first in sample 1\)"):
            ggn_diagonal(model, Xb, y)
    # the diagonal tests X through its result only where X reaches the GEMMs unchanged: a
    # leading tanh maps inf to 1, a Flatten keeps it
    Xi = torch.zeros(3, 2, 2, dtype=f64)
    Xi[2, 0, 1] = float("inf")
    y3 = torch.tensor([0, 1, 0])
    for pre in (nn.Tanh(), nn.Flatten()):
        net = nn.Sequential(pre, nn.Flatten(), nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2))
        with pytest.raises(ValueError, match=r"first in sample 2"):
            hessian_diagonal(net.to(f64), Xi, y3)


# -- Gauss–Newton and per-sample H_Z ----------------------------------------------------------


@pytest.mark.parametrize(
    "loss,out_act", [("cross_entropy", None), ("logistic", None), ("mse", None), ("mse", "tanh")]
)
def test_ggn_equals_jacobian_form_and_is_psd(loss, out_act):
    g = torch.Generator().manual_seed(5)
    widths = _widths(3, loss, 0)
    model = make_mlp(widths, "sigmoid", out_act, seed=2)
    N = 25
    X = torch.randn(N, widths[0], generator=g, dtype=f64)
    y = get_loss(loss).check_targets(make_targets(loss, N, widths[-1], g), widths[-1])
    _, theta, unflat = flat_fn(model, X, y, loss)
    J = torch.func.jacrev(lambda t: functional_call(model, unflat(t), (X,)))(theta)  # (N, k, P)
    out = model(X).detach()
    Hout = get_loss(loss).hessian_output(out, y) / N
    G_ref = torch.einsum("nkp,nkl,nlq->pq", J, Hout, J)
    G_ref.diagonal().add_(
        0.02
        * torch.cat(
            [torch.full((p.numel(),), float(p.ndim >= 2), dtype=f64) for p in model.parameters()]
        )
    )
    G = ggn(model, X, y, loss, 0.02)
    assert rel(G, G_ref) <= 1e-10
    assert rel(ggn_diagonal(model, X, y, loss, 0.02), G_ref.diagonal()) <= 1e-10
    ev = torch.linalg.eigvalsh(G)
    assert float(ev[0]) >= -1e-10 * float(G.norm())
    G_auto = ggn(model, X, y, loss, 0.02, method="autodiff")
    assert rel(G_auto, G_ref) <= 1e-10


def test_per_sample_hz_softmax_output_and_hidden_layers():
    model = make_mlp([4, 5, 3], "tanh", seed=4)
    N = 13
    X, y = torch.randn(N, 4, dtype=f64), torch.randint(0, 3, (N,))
    hz = per_sample_hz(model, X, y)
    assert [h.shape for h in hz] == [(N, 5, 5), (N, 3, 3)]
    p = torch.softmax(model(X).detach(), 1)
    eq83 = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / N
    assert rel(hz[1], eq83) <= 1e-14
    assert float(torch.linalg.eigvalsh(hz[1]).min()) >= -1e-15  # PSD (eqs. 84-85)
    # hidden layer: the Hessian of ℓ_i/N with respect to z⁽¹⁾, sample by sample
    W2, b2 = model[2].weight.detach(), model[2].bias.detach()
    lo = get_loss("cross_entropy")
    z1 = X @ model[0].weight.detach().T + model[0].bias.detach()
    for i in range(N):

        def ell(z, i=i):
            return lo.per_sample((torch.tanh(z) @ W2.T + b2)[None], y[i : i + 1])[0] / N

        assert rel(hz[0][i], torch.func.hessian(ell)(z1[i])) <= 1e-12
    # eq. 70: the bias block is Σ_i H_Z,i
    assert rel(layer_hessians(model, X, y)[0][20:, 20:], hz[0].sum(0)) <= 1e-12
    gz = per_sample_hz(model, X, y, ggn=True)
    assert float(torch.linalg.eigvalsh(gz[0]).min()) >= -1e-15


# -- the autodiff fallback --------------------------------------------------------------------


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 3)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(nn.functional.gelu(self.conv(x)).flatten(1))


def test_fallback_on_conv_gelu_model_matches_and_warns():
    torch.manual_seed(0)
    model = TinyConv().to(f64)
    X, y = torch.randn(12, 1, 10, dtype=f64), torch.randint(0, 3, (12,))
    ok, reason = supports_fast_path(model)
    assert not ok and "TinyConv" in reason
    H_ref = reference_hessian(model, X, y, "cross_entropy", 0.05)
    with pytest.warns(UserWarning, match="TinyConv.*autodiff"):
        H = hessian(model, X, y, l2=0.05)
    assert rel(H, H_ref) <= 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rel(hessian_diagonal(model, X, y, l2=0.05), H_ref.diagonal()) <= 1e-10
        lb = layer_hessians(model, X, y, l2=0.05)
        blocks = hessian_blocks(model, X, y, l2=0.05)
    assert [b.shape[0] for b in lb] == [8, 51]
    assert rel(lb[0], H_ref[:8, :8]) <= 1e-10 and rel(lb[1], H_ref[8:, 8:]) <= 1e-10
    assert rel(blocks[(1, 0)], H_ref[8:, :8]) <= 1e-10


def test_fallback_warning_names_the_activation():
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)).to(f64)
    X, y = torch.randn(8, 3, dtype=f64), torch.randint(0, 2, (8,))
    ok, reason = supports_fast_path(model)
    assert not ok and "layer 1 (GELU)" in reason and "σ″" in reason
    with pytest.warns(UserWarning, match=r"layer 1 \(GELU\) has no closed-form σ″"):
        H = hessian(model, X, y)
    assert rel(H, reference_hessian(model, X, y, "cross_entropy")) <= 1e-10
    with pytest.raises(ValueError, match="method='backprop'.*GELU"):
        hessian(model, X, y, method="backprop")
    with pytest.raises(ValueError, match="per_sample_hz.*GELU"):
        per_sample_hz(model, X, y)


@pytest.mark.parametrize(
    "model,expected",
    [
        (nn.Sequential(nn.Linear(2, 2), nn.Softplus(beta=2.0), nn.Linear(2, 2)), "Softplus"),
        (nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), nn.Linear(2, 2)), "Dropout"),
        (nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), "BatchNorm1d"),
        (nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), "LayerNorm"),
        (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), "groups=2"),
        (nn.Sequential(nn.Tanh()), "no nn.Linear"),
    ],
)
def test_supports_fast_path_reasons(model, expected):
    ok, reason = supports_fast_path(model)
    assert not ok and expected in reason


def test_a_flatten_after_a_linear_layer_is_a_chain():
    """Not an MLP of the Appendix B kind, but a chain of layers: the fast path covers it."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Flatten()).to(f64)
    assert supports_fast_path(model) == (True, "")
    X, y = torch.randn(5, 2, dtype=f64), torch.randint(0, 2, (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = hessian_diagonal(model, X, y)
    assert rel(d, reference_hessian(model, X, y, "cross_entropy").diagonal()) <= 1e-10


def test_shared_layers_use_the_fallback():
    lin = nn.Linear(3, 3)
    ok, reason = supports_fast_path(nn.Sequential(lin, nn.Tanh(), lin))
    assert not ok and "shared" in reason


# -- refusals and bad inputs ------------------------------------------------------------------


def test_dense_refusal_before_allocating():
    model = mlp([4, 5, 3], "sigmoid", seed=0, dtype=f64)
    X, y = torch.randn(6, 4, dtype=f64), torch.randint(0, 3, (6,))
    for fn in (hessian, ggn, layer_hessians, hessian_blocks):
        with pytest.raises(MemoryError_, match="bytes"):
            fn(model, X, y, max_bytes=1000)
    big = mlp([1000, 1000, 10], "sigmoid", seed=0)  # P ≈ 1e6: 8 TB dense
    with pytest.raises(MemoryError_, match=r"needs [\d,]+ bytes"):
        hessian(big, torch.randn(2, 1000), torch.tensor([0, 1]))


def test_bad_inputs_have_clear_messages():
    model = mlp([4, 5, 3], "sigmoid", seed=0, dtype=f64)
    X, y = torch.randn(6, 4, dtype=f64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="X must have shape"):
        hessian(model, torch.randn(4, dtype=f64), y)
    with pytest.raises(ValueError, match=r"X of shape \(6, 5\)"):
        hessian(model, torch.randn(6, 5, dtype=f64), y)
    for fn in (hessian_diagonal, layer_hessians):  # the structure's probe, no forward pass
        with pytest.raises(ValueError, match=r"X of shape \(6, 5\).*takes 4 features"):
            fn(model, torch.randn(6, 5, dtype=f64), y)
        with pytest.raises(ValueError, match=r"outputs \(N, k\), got \(1, 2, 3\)"):
            fn(model, torch.randn(6, 2, 4, dtype=f64), y)
    with pytest.raises(ValueError, match="y must hold one target per sample"):
        hessian(model, X, y[:5])
    with pytest.raises(ValueError, match="did you mean 'cross_entropy'"):
        hessian(model, X, y, loss="cross_entropi")
    with pytest.raises(ValueError, match="l2 must be"):
        hessian(model, X, y, l2=-1.0)
    with pytest.raises(ValueError, match=r"class labels in 0\.\.2"):
        hessian_diagonal(model, X, torch.tensor([0, 1, 2, 3, 0, 1]))
    with pytest.raises(ValueError, match="0 or 1"):
        hessian(mlp([4, 1], seed=0, dtype=f64), X, torch.full((6,), 2.0), loss="logistic")
    with pytest.raises(ValueError, match="method="):
        hessian(model, X, y, method="fast")
    with pytest.raises(ValueError, match="pairs"):
        hessian_blocks(model, X, y, pairs=[(0, 2)])
    with pytest.raises(ValueError, match="NaN"):
        hessian(model, X * float("nan"), y)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        hessian("model", X, y)


# -- the saddle report ------------------------------------------------------------------------


def _tanh_saddle():
    """θ = 0 of x ↦ w₂ᵀ tanh(W₁x + b₁) + b₂ with b₂ = mean(y): ∇J = 0, H = [[0, B], [Bᵀ, 0]]."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 3, generator=g, dtype=f64)
    y = (X @ torch.tensor([1.0, -2.0, 0.5], dtype=f64))[:, None]
    model = mlp([3, 2, 1], "tanh", init="zeros", dtype=f64)
    with torch.no_grad():
        model[2].bias.fill_(float(y.mean()))
    return model, X, y


def test_saddle_report_detects_constructed_saddle():
    model, X, y = _tanh_saddle()
    f, theta, _ = flat_fn(model, X, y, "mse")
    grad = torch.func.grad(f)(theta)
    H = torch.func.hessian(f)(theta)
    assert float(grad.norm()) < 1e-14
    lam = torch.linalg.eigvalsh(H)
    assert float(lam[0]) < -0.1  # autograd confirms: a saddle
    r = saddle_report(model, X, y, "mse")
    assert r.verdict == "saddle"
    assert r.lambda_min == pytest.approx(float(lam[0]), rel=1e-10)
    assert r.direction.shape == (theta.numel(),)
    assert float(r.direction.norm()) == pytest.approx(1.0)
    assert float(r.direction @ H @ r.direction) == pytest.approx(float(lam[0]), rel=1e-10)
    assert [a.fraction_negative for a in r.activations] == [0.0]  # tanh″(0) = 0
    assert all(b.lambda_min >= -1e-12 for b in r.layers)  # layer blocks are PSD here
    assert any("bilinear" in n for n in r.notes)
    # the Lanczos route gives the same answer
    r2 = saddle_report(model, X, y, "mse", dense_limit=2)
    assert r2.method == "lanczos" and r2.verdict == "saddle"
    assert r2.lambda_min == pytest.approx(r.lambda_min, rel=1e-8)
    text = r.to_text()
    assert "saddle" in text and "layer blocks" in text and "σ″" in text


def test_saddle_report_symmetric_point_and_theta(tmp_path):
    # two identical hidden sigmoid units, away from a stationary point: negative σ″ terms
    model = mlp([2, 2, 1], "sigmoid", seed=0, dtype=f64)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.5, -1.0], [1.5, -1.0]]))
        model[0].bias.fill_(0.3)
        model[2].weight.fill_(2.0)
    X = torch.randn(40, 2, dtype=f64)
    y = (X[:, 0] > 0).to(f64)
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    r = saddle_report(model, X, y, "logistic")
    f, th, _ = flat_fn(model, X, y, "logistic")
    lam = torch.linalg.eigvalsh(torch.func.hessian(f)(th))
    assert r.lambda_min == pytest.approx(float(lam[0]), rel=1e-10, abs=1e-14)
    assert 0.0 < r.activations[0].fraction_negative < 1.0
    moved = mlp([2, 2, 1], "sigmoid", seed=5, dtype=f64)
    r_theta = saddle_report(moved, X, y, "logistic", theta=theta)
    assert r_theta.lambda_min == pytest.approx(r.lambda_min, rel=1e-12)
    assert not torch.equal(torch.nn.utils.parameters_to_vector(moved.parameters()), theta)
    assert plot_saddle_report(r, tmp_path / "dense.png").stat().st_size > 0


def test_saddle_report_logistic_regression_is_convex(tmp_path):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(200, 6, generator=g, dtype=f64)
    y = (X[:, 0] + 0.3 * torch.randn(200, generator=g, dtype=f64) > 0).to(f64)
    model = logistic_regression(6, seed=1, dtype=f64)
    r = saddle_report(model, X, y, "logistic", l2=0.01)
    assert r.verdict == "locally convex" and r.lambda_min > 0
    assert r.activations == []
    r2 = saddle_report(model, X, y, "logistic", dense_limit=3)
    assert r2.verdict == "locally convex" and r2.method == "lanczos"
    path = plot_saddle_report(r2, tmp_path / "slq.png")
    assert path.exists() and path.stat().st_size > 0


def test_saddle_report_indefinite_away_from_stationarity():
    model = make_mlp([3, 6, 2], "tanh", seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    X, y = torch.randn(50, 3, dtype=f64), torch.randint(0, 2, (50,))
    r = saddle_report(model, X, y)
    assert r.verdict == "indefinite" and r.grad_norm > r.grad_tol and r.lambda_min < 0


# -- the worked example -----------------------------------------------------------------------


def test_two_layer_example_agrees(capsys):
    spec = importlib.util.spec_from_file_location(
        "two_layer_hessian", ROOT / "examples" / "two_layer_hessian.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([]) == 0
    out = capsys.readouterr().out
    assert "agree" in out and "b = d²J/dW1 dW2" in out
    model, X, y = mod.build(0)
    a, b, c = mod.by_formulas(model, X, y)
    H = mod.by_autograd(model, X, y)
    assert np.allclose(b.numpy(), H[:6, 6:].numpy(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("loss,k", [("cross_entropy", 5), ("cross_entropy", 2), ("mse", 3)])
def test_hessian_output_factor_reproduces_the_loss_hessian(loss, k):
    """L Lᵀ = H_z per sample, against torch.func's Hessian of the per-sample loss; for the
    softmax cross-entropy L has k − 1 columns (H_z has rank k − 1), also at saturated outputs."""
    fn = get_loss(loss)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, k, generator=g, dtype=f64)
    z[0, 0], z[1, -1] = 40.0, 40.0  # p ≈ e_0 and p ≈ e_k: the reflection must stay stable
    y = torch.randint(0, k, (6,), generator=g) if loss == "cross_entropy" else torch.randn(6, k)
    y = y if loss == "cross_entropy" else y.to(f64)
    L = fn.hessian_output_sqrt(z, y)
    for i in range(6):
        H = torch.func.hessian(lambda t, i=i: fn.per_sample(t[None], y[i : i + 1]).sum())(z[i])
        torch.testing.assert_close(L[i] @ L[i].T, H, rtol=1e-10, atol=1e-12)
    if loss == "cross_entropy":
        assert L.shape == (6, k, k - 1)

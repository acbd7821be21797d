"""Exact curvature of CNNs and non-Sequential models against independent torch.func references.

Every quantity of :mod:`secondorder.curvature` — the dense Hessian and Gauss–Newton matrix, their
diagonals, their per-module diagonal blocks, the Hessian blocks between modules, the matrix-free
operators and the saddle report — is compared in float64 with references built here from
``torch.func`` on the flat θ (ordered as ``model.parameters()``), for the objective

    J(θ) = (1/N) Σ_i ℓ(f(x_i; θ), y_i) + (l2/2)·‖W‖²,   ‖W‖² over parameters with ndim ≥ 2.

The models: sequential CNNs (Conv2d with strides, paddings and dilations; pooling; Flatten,
Unflatten, Identity, Dropout in eval mode) that must take the fast path, non-Sequential models
(residual and two-branch), and models with modules outside the fast path (grouped convolution,
BatchNorm, LayerNorm) whose results must still be exact.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

import secondorder.curvature as curv

f64 = torch.float64
RTOL = 1e-10


# -- models ----------------------------------------------------------------------------------------


class ResidualMLP(nn.Module):
    """x ↦ head(h₂), h₁ = h₀ + tanh(A h₀), h₂ = h₁ + relu(B h₁), h₀ = stem(x)."""

    def __init__(self, n_in: int = 5, width: int = 6, n_out: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(n_in, width)
        self.block1 = nn.Linear(width, width)
        self.block2 = nn.Linear(width, width, bias=False)
        self.head = nn.Linear(width, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        h = h + torch.tanh(self.block1(h))
        h = h + F.relu(self.block2(h))
        return self.head(h)


class ResidualCNN(nn.Module):
    """A conv stem, one residual block h + conv(tanh(h)), pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.stem(x))
        h = h + self.conv(torch.tanh(h))
        return self.head(F.avg_pool2d(h, 2).flatten(1))


class TwoBranch(nn.Module):
    """Two branches on one image — a linear map of its pixels and a strided conv — concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(64, 4)
        self.conv = nn.Conv2d(1, 2, 3, stride=2)
        self.head = nn.Linear(4 + 2 * 3 * 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.sigmoid(self.dense(x.flatten(1)))
        b = torch.tanh(self.conv(x)).flatten(1)
        return self.head(torch.cat([a, b], dim=1))


def _conv_relu_maxpool() -> nn.Module:  # the largest: P = 1,370
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 10)
    )


def _conv_stride2_nobias() -> nn.Module:  # on 2×7×7: 4×4×4, pooled 4×2×2
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def _conv_dilated_avgpool_stride1() -> nn.Module:  # 8×8 → 4×4 → 3×3
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, dilation=2),
        nn.Sigmoid(),
        nn.AvgPool2d(2, stride=1),
        nn.Flatten(),
        nn.Linear(27, 4),
    )


def _conv_maxpool_stride2_dropout() -> nn.Module:  # 8×8 → 8×8 → 3×3
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(3, stride=2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Identity(),
        nn.Linear(27, 3),
    )


def _two_convs_same_adaptive() -> nn.Module:  # 2×7×7 → 3×7×7 → 4×3×3 → 4×2×2
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding="same", dilation=2),
        nn.ReLU(),
        nn.Conv2d(3, 4, 2, stride=2),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 6),
        nn.Tanh(),
        nn.Linear(6, 3),
    )


def _unflatten_conv() -> nn.Module:  # flat 64 → 1×8×8 → 2×3×3
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 2, 3, stride=2),
        nn.ReLU(),
        nn.Identity(),
        nn.Flatten(),
        nn.Linear(18, 3),
    )


def _mlp_sigmoid() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Sigmoid(), nn.Linear(6, 3))


def _conv_groups2() -> nn.Module:  # 2×7×7 → 4×7×7 → 4×3×3
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(36, 3),
    )


def _conv_batchnorm() -> nn.Module:  # 8×8 → 6×6 → 3×3
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(27, 3),
    )


def _mlp_layernorm() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))


@dataclass(frozen=True)
class Spec:
    build: object  # () -> nn.Module
    input_shape: tuple[int, ...]
    n_out: int
    loss: str
    l2: float


#: sequential CNNs of Linear, Conv2d (groups=1) and parameter-free modules, and the MLP control:
#: the fast path covers them
FAST = {
    "conv_relu_maxpool": Spec(_conv_relu_maxpool, (1, 8, 8), 10, "cross_entropy", 0.1),
    "conv_stride2_nobias_tanh_avgpool": Spec(_conv_stride2_nobias, (2, 7, 7), 3, "mse", 0.0),
    "conv_dilation2_sigmoid_avgpool_stride1": Spec(
        _conv_dilated_avgpool_stride1, (1, 8, 8), 4, "cross_entropy", 0.05
    ),
    "conv_maxpool_stride2_dropout_identity": Spec(
        _conv_maxpool_stride2_dropout, (1, 8, 8), 3, "mse", 0.1
    ),
    "two_convs_same_adaptive_mlp_head": Spec(
        _two_convs_same_adaptive, (2, 7, 7), 3, "cross_entropy", 0.1
    ),
    "unflatten_conv_relu": Spec(_unflatten_conv, (64,), 3, "cross_entropy", 0.0),
    "mlp_sigmoid": Spec(_mlp_sigmoid, (5,), 3, "cross_entropy", 0.1),
}
#: non-Sequential models: exact through whichever route the engine takes
GENERIC = {
    "residual_mlp": Spec(ResidualMLP, (5,), 3, "cross_entropy", 0.1),
    "residual_cnn": Spec(ResidualCNN, (1, 8, 8), 3, "mse", 0.05),
    "two_branch_concat": Spec(TwoBranch, (1, 8, 8), 3, "cross_entropy", 0.1),
}
#: sequential models with a module outside the fast path: exact, fallback allowed
OTHER = {
    "conv_groups2": Spec(_conv_groups2, (2, 7, 7), 3, "cross_entropy", 0.1),
    "conv_batchnorm_eval": Spec(_conv_batchnorm, (1, 8, 8), 3, "cross_entropy", 0.1),
    "mlp_layernorm": Spec(_mlp_layernorm, (5,), 3, "mse", 0.1),
}
SPECS = {**FAST, **GENERIC, **OTHER}
N_SAMPLES = 5


def _randomise_norms(model: nn.Module, g: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics for the normalisation layers."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g, dtype=f64))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g, dtype=f64))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g, dtype=f64))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=f64))


# -- references (torch.func on the flat θ, independent of the library) -----------------------


def per_sample_loss(loss: str, out: Tensor, y: Tensor) -> Tensor:
    """ℓ_i: softmax cross-entropy on logits, or ½‖z − y‖² (the library's "mse")."""
    if loss == "cross_entropy":
        return F.cross_entropy(out, y, reduction="none")
    return 0.5 * ((out - y) ** 2).sum(-1)


@dataclass
class Case:
    name: str
    model: nn.Module
    X: Tensor
    y: Tensor
    loss: str
    l2: float
    theta: Tensor = field(init=False)
    l2_mask: Tensor = field(init=False)  # 1 on the entries of parameters with ndim ≥ 2

    def __post_init__(self) -> None:  # eager: never first formed inside a torch.func transform
        params = list(self.model.parameters())
        self.theta = torch.cat([p.detach().reshape(-1) for p in params])
        self.l2_mask = torch.cat(
            [torch.full((p.numel(),), float(p.ndim >= 2), dtype=f64) for p in params]
        )

    @property
    def args(self) -> tuple:
        """(model, X, y, loss, l2), the library's positional arguments."""
        return self.model, self.X, self.y, self.loss, self.l2

    @functools.cached_property
    def blocks(self) -> list[tuple[int, int]]:
        """(start, stop) in θ of every module's own parameters (weight, then bias)."""
        out: list[list] = []
        start = 0
        for name, p in self.model.named_parameters():
            owner = name.rpartition(".")[0]
            if out and out[-1][0] == owner:
                out[-1][2] += p.numel()
            else:
                out.append([owner, start, start + p.numel()])
            start += p.numel()
        return [(a, b) for _, a, b in out]

    def output(self, theta: Tensor) -> Tensor:
        """f(X; θ), (N, k)."""
        names = [n for n, _ in self.model.named_parameters()]
        shapes = [p.shape for p in self.model.parameters()]
        pieces = torch.split(theta, [math.prod(s) for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, pieces, shapes)}
        return functional_call(self.model, params, (self.X,))

    def objective(self, theta: Tensor) -> Tensor:
        data = per_sample_loss(self.loss, self.output(theta), self.y).mean()
        return data + 0.5 * self.l2 * (self.l2_mask * theta * theta).sum()

    @functools.cached_property
    def H(self) -> Tensor:
        """The dense Hessian of J, reverse over reverse."""
        return torch.func.jacrev(torch.func.grad(self.objective))(self.theta)

    @functools.cached_property
    def output_jacobians(self) -> Tensor:
        """∂f(x_i)/∂θ for every sample, (N, k, P)."""
        return torch.func.jacrev(self.output)(self.theta)

    @functools.cached_property
    def output_hessians(self) -> Tensor:
        """∂²ℓ_i/∂z² at z = f(x_i), (N, k, k)."""
        out = self.output(self.theta).detach()

        def loss_i(z: Tensor, y: Tensor) -> Tensor:
            return per_sample_loss(self.loss, z[None], y[None])[0]

        return torch.stack([torch.func.hessian(loss_i)(z, t) for z, t in zip(out, self.y)])

    @functools.cached_property
    def G(self) -> Tensor:
        """(1/N) Σ_i J_iᵀ H_out,i J_i + l2·diag(mask)."""
        J, Hout = self.output_jacobians, self.output_hessians
        G = torch.einsum("nkp,nkl,nlq->pq", J, Hout, J) / len(self.X)
        return G + torch.diag(self.l2 * self.l2_mask)

    def diagonal_blocks(self, M: Tensor) -> list[Tensor]:
        return [M[a:b, a:b] for a, b in self.blocks]


@functools.cache
def make_case(name: str) -> Case:
    spec = SPECS[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    with torch.random.fork_rng():
        torch.manual_seed(sum(map(ord, name)))
        model = spec.build().to(f64).eval()
    _randomise_norms(model, g)
    X = torch.randn((N_SAMPLES, *spec.input_shape), generator=g, dtype=f64)
    if spec.loss == "cross_entropy":
        y = torch.randint(0, spec.n_out, (N_SAMPLES,), generator=g)
    else:
        y = torch.randn((N_SAMPLES, spec.n_out), generator=g, dtype=f64)
    return Case(name, model, X, y, spec.loss, spec.l2)


def assert_exact(actual: Tensor, expected: Tensor) -> None:
    """Equal to rounding: rtol 1e-10 and atol 1e-10 relative to the largest reference entry."""
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale)


def call(quantity: str, case: Case, **kwargs):
    """The library's ``quantity`` on the case; a warning about the route taken is accepted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return getattr(curv, quantity)(*case.args, **kwargs)


#: the quantity → its reference from the dense H and G
EXPECTED = {
    "hessian": lambda c: c.H,
    "ggn": lambda c: c.G,
    "hessian_diagonal": lambda c: torch.diagonal(c.H),
    "ggn_diagonal": lambda c: torch.diagonal(c.G),
    "layer_hessians": lambda c: c.diagonal_blocks(c.H),
    "layer_ggns": lambda c: c.diagonal_blocks(c.G),
}
FAST_QUANTITIES = ["hessian_diagonal", "ggn_diagonal", "layer_hessians", "layer_ggns"]


def check_quantity(quantity: str, case: Case, result) -> None:
    expected = EXPECTED[quantity](case)
    if isinstance(expected, list):
        assert isinstance(result, (list, tuple)), type(result)
        assert len(result) == len(expected)
        for got, want in zip(result, expected):
            assert_exact(got, want)
    else:
        assert_exact(result, expected)


# -- the references checked against each other ---------------------------------------------------

SELF_CHECK = [
    "conv_relu_maxpool",
    "two_convs_same_adaptive_mlp_head",
    "residual_cnn",
    "mlp_sigmoid",
]


@pytest.mark.parametrize("name", SELF_CHECK)
def test_reference_hessian_by_coordinates(name):
    """Entries of H as second derivatives of t ↦ J(θ + t e_j) and mixed ones by jvp of ∇J."""
    case = make_case(name)
    P = len(case.theta)
    idx = torch.randperm(P, generator=torch.Generator().manual_seed(1))[:6].tolist()
    for j in idx:
        e = torch.zeros(P, dtype=f64)
        e[j] = 1.0

        def along(t: Tensor, e=e) -> Tensor:
            return case.objective(case.theta + t * e)

        d2 = torch.func.grad(torch.func.grad(along))(torch.zeros((), dtype=f64))
        assert_exact(d2, case.H[j, j])
        _, column = torch.func.jvp(torch.func.grad(case.objective), (case.theta,), (e,))
        assert_exact(column, case.H[:, j])


@pytest.mark.parametrize("name", SELF_CHECK)
def test_reference_ggn_products(name):
    """G v by jvp, the loss's output Hessian and vjp; H_out in closed form; G symmetric PSD."""
    case = make_case(name)
    z = case.output(case.theta).detach()
    if case.loss == "cross_entropy":
        p = torch.softmax(z, dim=1)
        closed = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        closed = torch.eye(z.shape[1], dtype=f64).expand(len(z), -1, -1)
    assert_exact(case.output_hessians, closed)
    V = torch.randn(len(case.theta), 3, generator=torch.Generator().manual_seed(2), dtype=f64)
    for v in V.T:
        out, u = torch.func.jvp(case.output, (case.theta,), (v,))
        w = torch.einsum("nkl,nl->nk", case.output_hessians, u) / len(case.X)
        _, pullback = torch.func.vjp(case.output, case.theta)
        (gv,) = pullback(w)
        assert_exact(case.G @ v, gv + case.l2 * case.l2_mask * v)
    assert_exact(case.G, case.G.T)
    assert float(torch.linalg.eigvalsh(case.G)[0]) > -1e-12 * float(case.G.abs().max())


def test_reference_ggn_is_hessian_when_linear_in_theta():
    """One conv and pooling: f is linear in θ, so H = G; l2 adds l2 on the kernel's 18
    diagonal entries, not on the 2 biases."""
    g = torch.Generator().manual_seed(3)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        ).to(f64)
    X = torch.randn(4, 1, 8, 8, generator=g, dtype=f64)
    y = torch.randint(0, 2, (4,), generator=g)
    case = Case("linear_in_theta", model, X, y, "cross_entropy", 0.1)
    assert_exact(case.H, case.G)
    unregularised = Case("linear_in_theta", model, X, y, "cross_entropy", 0.0)
    l2_part = torch.diag(torch.tensor([0.1] * 18 + [0.0] * 2, dtype=f64))
    assert_exact(case.H - unregularised.H, l2_part)
    assert case.blocks == [(0, 20)]


# -- every quantity against its reference ----------------------------------------------------------


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("quantity", list(EXPECTED))
def test_matches_reference(quantity, name):
    case = make_case(name)
    check_quantity(quantity, case, call(quantity, case))


@pytest.mark.parametrize("name", list(FAST))
@pytest.mark.parametrize("quantity", list(EXPECTED))
def test_matches_reference_in_chunks(quantity, name):
    """Samples in uneven chunks (2 + 2 + 1): the sums over chunks are the same."""
    case = make_case(name)
    check_quantity(quantity, case, call(quantity, case, chunk_size=2))


@pytest.mark.parametrize("name", list(SPECS))
def test_hessian_blocks(name):
    """All blocks between the modules by default; only those asked for with ``pairs``."""
    case = make_case(name)
    n = len(case.blocks)
    blocks = call("hessian_blocks", case)
    assert set(blocks) == {(k, l) for k in range(n) for l in range(n)}
    for (k, l), block in blocks.items():
        (a, b), (c, d) = case.blocks[k], case.blocks[l]
        assert_exact(block, case.H[a:b, c:d])
    some = call("hessian_blocks", case, pairs=[(n - 1, 0), (1, 1)])
    assert set(some) == {(n - 1, 0), (1, 1)}
    (a, b), (c, d) = case.blocks[n - 1], case.blocks[0]
    assert_exact(some[(n - 1, 0)], case.H[a:b, c:d])


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("operator", ["HessianOperator", "GGNOperator"])
def test_operator(operator, name):
    """``@ v``, ``.matvec(v)``, ``@ V`` and ``.to_dense()``."""
    case = make_case(name)
    M = case.H if operator == "HessianOperator" else case.G
    op = getattr(curv, operator)(*case.args)
    P = len(case.theta)
    assert op.shape == (P, P)
    V = torch.randn(P, 2, generator=torch.Generator().manual_seed(4), dtype=f64)
    assert_exact(op @ V[:, 0], M @ V[:, 0])
    assert_exact(op.matvec(V[:, 1]), M @ V[:, 1])
    assert_exact(op @ V, M @ V)
    assert_exact(op.to_dense(), M)


@pytest.mark.parametrize("name", list(SPECS))
def test_saddle_report(name):
    """λ_min, λ_max and the per-module extremes of the reference Hessian; the direction an
    eigenvector of λ_min; the loss and gradient norm at θ."""
    case = make_case(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        report = curv.saddle_report(*case.args)
    evals = torch.linalg.eigvalsh(case.H)
    scale = max(1.0, float(evals.abs().max()))
    assert report.n_params == len(case.theta)
    assert report.lambda_min == pytest.approx(float(evals[0]), rel=RTOL, abs=RTOL * scale)
    assert report.lambda_max == pytest.approx(float(evals[-1]), rel=RTOL, abs=RTOL * scale)
    d = report.direction.to(f64)
    assert float(d.norm()) == pytest.approx(1.0, abs=1e-12)
    assert_exact(case.H @ d, report.lambda_min * d)
    assert report.loss == pytest.approx(float(case.objective(case.theta)), rel=RTOL)
    grad = torch.func.grad(case.objective)(case.theta)
    assert report.grad_norm == pytest.approx(float(grad.norm()), rel=RTOL, abs=RTOL)
    assert [layer.n_params for layer in report.layers] == [b - a for a, b in case.blocks]
    for layer, block in zip(report.layers, case.diagonal_blocks(case.H)):
        ev = torch.linalg.eigvalsh(block)
        assert layer.lambda_min == pytest.approx(float(ev[0]), rel=RTOL, abs=RTOL * scale)
        assert layer.lambda_max == pytest.approx(float(ev[-1]), rel=RTOL, abs=RTOL * scale)


# -- the fast path: taken for sequential CNNs, refused for non-chain models -------------------


@pytest.mark.parametrize("name", list(FAST))
def test_fast_path_supported(name):
    ok, reason = curv.supports_fast_path(make_case(name).model)
    assert ok, reason


@pytest.mark.parametrize("name", list(FAST))
@pytest.mark.parametrize("quantity", FAST_QUANTITIES)
def test_fast_path_without_warning(quantity, name):
    case = make_case(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = getattr(curv, quantity)(*case.args)
    check_quantity(quantity, case, result)


@pytest.mark.parametrize("name", list(FAST))
@pytest.mark.parametrize("quantity", FAST_QUANTITIES)
def test_fast_path_forced(quantity, name):
    """``method="backprop"`` runs (no fallback to hide behind) and is exact."""
    case = make_case(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = getattr(curv, quantity)(*case.args, method="backprop")
    check_quantity(quantity, case, result)


@pytest.mark.parametrize("quantity", [*EXPECTED, "hessian_blocks"])
def test_backprop_refused_for_residual_model(quantity):
    """A residual model is no chain of modules: forcing backprop names why it cannot apply."""
    case = make_case("residual_mlp")
    with pytest.raises(ValueError, match=r"backprop") as info:
        getattr(curv, quantity)(*case.args, method="backprop")
    assert "ResidualMLP" in str(info.value) or "Sequential" in str(info.value), info.value

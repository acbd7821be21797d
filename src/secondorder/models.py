"""Models of the study: logistic regression (eqs. 15-16) and multilayer perceptrons (eqs. 19-22).

Every model is an ordinary ``torch.nn.Sequential`` of ``nn.Linear`` layers and elementwise
activation modules, so users can bring their own modules as well. The activations defined here
(and the matching ``torch.nn`` ones) can also give their first and second derivatives σ′ and σ″,
which second-order backpropagation (Appendix B, eq. 82) needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from secondorder._validation import check_choice, check_device, check_positive_int
from secondorder.linalg import MemoryError_, available_bytes

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "Composed",
    "Identity",
    "ReLU",
    "Sigmoid",
    "Softplus",
    "Tanh",
    "activation",
    "activation_derivatives",
    "cnn",
    "logistic_regression",
    "mlp",
]


class Activation(nn.Module):
    """An elementwise activation σ that also knows σ′ and σ″, and what the curvature kernels
    may skip: ``is_identity`` (σ(z) = z, the layer stays linear) and ``is_piecewise_linear``
    (σ″ ≡ 0 almost everywhere, so no σ″ terms)."""

    name: str = ""
    is_identity: bool = False
    is_piecewise_linear: bool = False

    def forward(self, z: Tensor) -> Tensor:  # noqa: D102
        raise NotImplementedError

    def derivative(self, z: Tensor) -> Tensor:
        """σ′(z), elementwise."""
        raise NotImplementedError

    def second_derivative(self, z: Tensor) -> Tensor:
        """σ″(z), elementwise."""
        raise NotImplementedError

    def derivatives(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(σ(z), σ′(z), σ″(z)) computed together, sharing intermediate results."""
        return self.forward(z), self.derivative(z), self.second_derivative(z)

    def extra_repr(self) -> str:
        return ""


class Sigmoid(Activation):
    """σ(z) = 1/(1+e^{−z}); σ′ = σ(1−σ); σ″ = σ(1−σ)(1−2σ)."""

    name = "sigmoid"

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(z)

    def derivative(self, z: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        return s * (1 - s)

    def second_derivative(self, z: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        return s * (1 - s) * (1 - 2 * s)

    def derivatives(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = torch.sigmoid(z)
        d1 = s * (1 - s)
        return s, d1, d1 * (1 - 2 * s)


class Tanh(Activation):
    """σ(z) = tanh z; σ′ = 1−σ²; σ″ = −2σ(1−σ²)."""

    name = "tanh"

    def forward(self, z: Tensor) -> Tensor:
        return torch.tanh(z)

    def derivative(self, z: Tensor) -> Tensor:
        return 1 - torch.tanh(z) ** 2

    def second_derivative(self, z: Tensor) -> Tensor:
        t = torch.tanh(z)
        return -2 * t * (1 - t * t)

    def derivatives(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = torch.tanh(z)
        d1 = 1 - t * t
        return t, d1, -2 * t * d1


class ReLU(Activation):
    """σ(z) = max(z, 0); σ′ = [z > 0]; σ″ = 0 (almost everywhere)."""

    name = "relu"
    is_piecewise_linear = True

    def forward(self, z: Tensor) -> Tensor:
        return torch.relu(z)

    def derivative(self, z: Tensor) -> Tensor:
        return (z > 0).to(z.dtype)

    def second_derivative(self, z: Tensor) -> Tensor:
        return torch.zeros_like(z)


class Softplus(Activation):
    """σ(z) = log(1+e^z); σ′ = sigmoid(z); σ″ = sigmoid(z)(1−sigmoid(z))."""

    name = "softplus"

    def forward(self, z: Tensor) -> Tensor:
        return nn.functional.softplus(z)

    def derivative(self, z: Tensor) -> Tensor:
        return torch.sigmoid(z)

    def second_derivative(self, z: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        return s * (1 - s)

    def derivatives(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = torch.sigmoid(z)
        return nn.functional.softplus(z), s, s * (1 - s)


class Identity(Activation):
    """σ(z) = z; σ′ = 1; σ″ = 0."""

    name = "identity"
    is_identity = True
    is_piecewise_linear = True

    def forward(self, z: Tensor) -> Tensor:
        return z

    def derivative(self, z: Tensor) -> Tensor:
        return torch.ones_like(z)

    def second_derivative(self, z: Tensor) -> Tensor:
        return torch.zeros_like(z)


class Composed(Activation):
    """Consecutive elementwise activations, applied first to last and composed:
    (f∘g)′ = f′(g)·g′ and (f∘g)″ = f″(g)·g′² + f′(g)·g″."""

    def __init__(self, acts: Sequence[Activation]) -> None:
        super().__init__()
        self._acts = list(acts)
        self.name = "∘".join(a.name or type(a).__name__ for a in reversed(self._acts))

    @property
    def is_identity(self) -> bool:  # type: ignore[override]
        return all(a.is_identity for a in self._acts)

    @property
    def is_piecewise_linear(self) -> bool:  # type: ignore[override]
        return all(a.is_piecewise_linear for a in self._acts)

    def forward(self, z: Tensor) -> Tensor:
        for a in self._acts:
            z = a.forward(z)
        return z

    def derivatives(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s, d1, d2 = self._acts[0].derivatives(z)
        for a in self._acts[1:]:
            s, e1, e2 = a.derivatives(s)
            d2 = e2 * d1 * d1 + e1 * d2
            d1 = e1 * d1
        return s, d1, d2

    def derivative(self, z: Tensor) -> Tensor:
        return self.derivatives(z)[1]

    def second_derivative(self, z: Tensor) -> Tensor:
        return self.derivatives(z)[2]


ACTIVATIONS: dict[str, type[Activation]] = {
    cls.name: cls for cls in (Sigmoid, Tanh, ReLU, Softplus, Identity)
}


def activation(name: str) -> Activation:
    """A new activation module by name: one of ``ACTIVATIONS``."""
    check_choice("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]()


_TORCH_EQUIVALENTS: dict[type[nn.Module], type[Activation]] = {
    nn.Sigmoid: Sigmoid,
    nn.Tanh: Tanh,
    nn.ReLU: ReLU,
    nn.Identity: Identity,
}


def activation_derivatives(module: nn.Module) -> Activation | None:
    """The :class:`Activation` equivalent to ``module`` (ours or a ``torch.nn`` one), else None.

    ``nn.Softplus`` qualifies only with ``beta=1`` and an infinite threshold-free regime is not
    assumed: its linear branch above ``threshold`` is ignored, which is exact to float precision.
    """
    if isinstance(module, Activation):
        return module
    if isinstance(module, nn.Softplus):
        return Softplus() if module.beta == 1 else None
    for torch_cls, ours in _TORCH_EQUIVALENTS.items():
        if type(module) is torch_cls:
            return ours()
    return None


def _init_linear(layer: nn.Linear, generator: torch.Generator | None, scheme: str) -> None:
    fan_in = layer.in_features
    with torch.no_grad():
        if scheme == "torch":
            bound = 1.0 / fan_in**0.5
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
        elif scheme == "xavier":
            bound = (6.0 / (fan_in + layer.out_features)) ** 0.5
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.zero_()
        elif scheme == "small-normal":
            layer.weight.normal_(0.0, 0.01, generator=generator)
            layer.bias.zero_()
        elif scheme == "zeros":
            layer.weight.zero_()
            layer.bias.zero_()


INITIALISATIONS = ("torch", "xavier", "small-normal", "zeros")


def _check_parameters_fit(widths: list[int], dtype: torch.dtype, max_bytes: int | None) -> int:
    """The bytes :func:`mlp` allocates for its parameters, refused above ``max_bytes``."""
    n_params = sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))
    item = torch.empty((), dtype=dtype).element_size()
    need = n_params * (8 if dtype == torch.float64 else 8 + item)
    limit = available_bytes() if max_bytes is None else int(max_bytes)
    if need > limit:
        raise MemoryError_(
            f"mlp(widths={widths}) has {n_params:,} parameters: building them needs "
            f"{need:,} bytes ({need / 2**30:.2f} GiB), above the {limit:,} bytes "
            f"{'available now' if max_bytes is None else 'of max_bytes'}; use narrower layers"
        )
    return need


def mlp(
    widths: Sequence[int],
    activation: str | Activation = "sigmoid",
    *,
    output_activation: str | Activation | None = None,
    init: str = "torch",
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    max_bytes: int | None = None,
) -> nn.Sequential:
    """A multilayer perceptron ``widths[0] → … → widths[-1]`` (eqs. 19-20).

    ``Z^{[l]} = W^{[l]} X^{[l-1]} + b^{[l]}``, ``X^{[l]} = σ(Z^{[l]})`` on every hidden layer. The
    last layer is linear unless ``output_activation`` is given (as in a net ŷ = f(z⁽³⁾) fitted by
    squared error); the softmax of eq. 22 belongs to the cross-entropy loss, not to the model.

    ``init`` is ``"torch"`` (PyTorch's default uniform ±1/√fan_in), ``"xavier"`` (Glorot uniform,
    zero biases), ``"small-normal"`` (weights N(0, 0.01²), zero biases: the small random start
    common in hand-written NumPy networks) or ``"zeros"``; ``seed`` makes it reproducible.

    The parameters are built in float64 and then cast: P = Σ (n_in + 1)·n_out of them need
    8P bytes, plus P·itemsize for another ``dtype``. More than ``max_bytes`` (default: the
    memory available now) is refused with :class:`~secondorder.linalg.MemoryError_` before
    anything is allocated.
    """
    widths = list(widths)
    if len(widths) < 2:
        raise ValueError(f"widths must list at least an input and an output width, got {widths}")
    for i, w in enumerate(widths):
        check_positive_int(f"widths[{i}]", w)
    check_choice("init", init, INITIALISATIONS)
    check_device("device", device)
    if isinstance(activation, str):
        check_choice("activation", activation, ACTIVATIONS)
    if isinstance(output_activation, str):
        check_choice("output_activation", output_activation, ACTIVATIONS)

    def make(act: str | Activation) -> nn.Module:
        return ACTIVATIONS[act]() if isinstance(act, str) else act

    _check_parameters_fit(widths, dtype or torch.get_default_dtype(), max_bytes)
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        linear = nn.Linear(n_in, n_out, dtype=torch.float64)
        _init_linear(linear, generator, init)
        layers.append(linear)
        if i < len(widths) - 2:
            layers.append(make(activation))
    if output_activation is not None:
        layers.append(make(output_activation))
    model = nn.Sequential(*layers)
    return model.to(dtype=dtype or torch.get_default_dtype(), device=device)


def logistic_regression(
    n_features: int,
    *,
    bias: bool = True,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Sequential:
    """Logistic regression (eqs. 15-16): one linear unit, h_θ(x) = sigmoid(θᵀx + b).

    The model outputs the logit θᵀx + b; the ``"logistic"`` loss applies the sigmoid. With
    ``bias=False`` it is exactly the seed's h_θ(X) = 1/(1+exp(−Xθ)). Initialised at zero (the
    problem is convex) unless ``seed`` is given, which draws small Gaussian weights.
    """
    check_positive_int("n_features", n_features)
    check_device("device", device)
    linear = nn.Linear(n_features, 1, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        if seed is None:
            linear.weight.zero_()
        else:
            g = torch.Generator().manual_seed(int(seed))
            linear.weight.normal_(0.0, 0.1, generator=g)
        if bias:
            linear.bias.zero_()
    return nn.Sequential(linear).to(dtype=dtype or torch.get_default_dtype(), device=device)


def cnn(
    channels: Sequence[int] = (16, 32),
    n_classes: int = 10,
    *,
    image: tuple[int, int, int] = (1, 28, 28),
    seed: int | None = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Sequential:
    """A small convolutional network on flat rows of ``c·h·w`` pixels: ``nn.Unflatten`` to
    ``image``, then per entry of ``channels`` a 3×3 convolution (padding 1), ReLU and 2×2 max
    pooling, then one linear layer to ``n_classes`` outputs. With the defaults, Fashion-MNIST's
    benchmark CNN (20,490 parameters). PyTorch's default initialisation, drawn under ``seed``
    (the global generator is left as it was; None: drawn from it).
    """
    channels = list(channels)
    if not channels:
        raise ValueError("channels must list at least one convolution's output channels")
    for i, c in enumerate(channels):
        check_positive_int(f"channels[{i}]", c)
    check_positive_int("n_classes", n_classes)
    if len(image) != 3:
        raise ValueError(f"image must be (channels, height, width), got {image}")
    for name, v in zip(("channels", "height", "width"), image):
        check_positive_int(f"image {name}", v)
    c, h, w = image
    if h >> len(channels) == 0 or w >> len(channels) == 0:
        raise ValueError(
            f"image {h}×{w} is too small for {len(channels)} poolings of 2 (each halves it)"
        )
    check_device("device", device)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        layers: list[nn.Module] = [nn.Unflatten(1, (c, h, w))]
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(c * h * w, n_classes)]
        net = nn.Sequential(*layers)
    return net.to(dtype=dtype or torch.get_default_dtype(), device=device)

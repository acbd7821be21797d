"""Which models second-order backpropagation covers, and their layout (:class:`MLPStructure`).

A supported model is an ``nn.Sequential`` (nested ones are flattened) of ``nn.Linear`` layers
(with or without bias) and elementwise activations that
:func:`secondorder.models.activation_derivatives` recognises, in any order: consecutive
activations are composed, activations before the first Linear (and an ``nn.Flatten`` there) only
transform the input, and an activation may follow the last Linear (ŷ = f(z⁽ᴸ⁾)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from secondorder.functional import parameter_groups
from secondorder.models import Activation, Composed, activation_derivatives

__all__ = [
    "LayerInfo",
    "MLPStructure",
    "analyse_mlp",
    "is_linear_map",
    "named_modules_flat",
    "theta_blocks",
]


def is_linear_map(act: Activation | None) -> bool:
    """True when σ is the identity (no activation, or σ′ ≡ 1, σ″ ≡ 0)."""
    return act is None or act.is_identity


@dataclass(frozen=True)
class LayerInfo:
    """One ``nn.Linear`` of a supported MLP and the elementwise activation after it (if any)."""

    name: str
    linear: nn.Linear
    activation: Activation | None
    n_in: int
    n_out: int
    bias: bool
    offset: int

    @property
    def n_weight(self) -> int:
        return self.n_in * self.n_out

    @property
    def n_params(self) -> int:
        return self.n_weight + (self.n_out if self.bias else 0)

    @property
    def params(self) -> slice:
        """Where this layer's (weight, bias) lie in the flat θ."""
        return slice(self.offset, self.offset + self.n_params)

    @property
    def activation_name(self) -> str:
        if self.activation is None:
            return "none"
        return self.activation.name or type(self.activation).__name__

    def weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """(W, b) detached, in ``dtype``; b is None without a bias."""
        W = self.linear.weight.detach().to(dtype)
        b = self.linear.bias.detach().to(dtype) if self.bias else None
        return W, b


@dataclass(frozen=True)
class MLPStructure:
    """What second-order backpropagation needs to know about a sequential MLP."""

    layers: tuple[LayerInfo, ...]
    preprocess: tuple[nn.Module, ...]
    n_params: int

    def input(self, X: Tensor) -> Tensor:
        """Apply the parameter-free modules before the first Linear (Flatten, activations)."""
        with torch.no_grad():
            for m in self.preprocess:
                X = m(X)
        return X

    def output_width(self, X: Tensor) -> int:
        """What applying the model to one sample checks, from the structure alone: the first
        Linear must receive (1, n_in) after the leading modules; the output width is the last
        Linear's. Raises ValueError otherwise."""
        try:
            x = self.input(X[:1])
        except Exception as exc:
            raise ValueError(
                f"the model cannot be applied to X of shape {tuple(X.shape)}: {exc}"
            ) from exc
        n_in = self.layers[0].n_in
        if x.shape[-1] != n_in:
            raise ValueError(
                f"the model cannot be applied to X of shape {tuple(X.shape)}: its first Linear "
                f"layer takes {n_in} features, got {x.shape[-1]}"
            )
        if x.ndim != 2:
            out = (*x.shape[:-1], self.layers[-1].n_out)
            raise ValueError(f"the model must map X of shape (N, ...) to outputs (N, k), got {out}")
        return self.layers[-1].n_out


def named_modules_flat(model: nn.Sequential, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The modules of an ``nn.Sequential`` in call order, nested ones flattened, with their
    dotted names."""
    out: list[tuple[str, nn.Module]] = []
    for name, m in model._modules.items():  # not named_children(): it hides repeated modules
        if m is None:
            continue
        full = f"{prefix}{name}"
        if isinstance(m, nn.Sequential):
            out.extend(named_modules_flat(m, full + "."))
        else:
            out.append((full, m))
    return out


def _finish_activation(acts: list[Activation]) -> Activation | None:
    acts = [a for a in acts if not a.is_identity]
    if not acts:
        return None
    return acts[0] if len(acts) == 1 else Composed(acts)


def _scan_modules(model: nn.Sequential) -> tuple[list[nn.Module], list[dict], str]:
    """Walk the flattened modules: (leading modules, one dict per Linear with the activation
    after it, "" or why the model is not supported)."""
    pre: list[nn.Module] = []
    layers: list[dict] = []
    pending: list[Activation] = []
    for name, m in named_modules_flat(model):
        label = f"layer {name} ({type(m).__name__})"
        if isinstance(m, nn.Linear):
            if type(m).forward is not nn.Linear.forward:
                return pre, layers, f"{label} overrides nn.Linear.forward"
            if layers:
                layers[-1]["activation"] = _finish_activation(pending)
            pending = []
            layers.append({"name": name, "linear": m, "activation": None})
            continue
        if isinstance(m, nn.Flatten):
            if layers:
                return pre, layers, f"{label} follows a Linear layer"
            pre.append(m)
            continue
        if any(True for _ in m.parameters()):
            return pre, layers, f"{label} has parameters but is not nn.Linear"
        act = activation_derivatives(m)
        if act is None:
            return (
                pre,
                layers,
                (
                    f"{label} has no closed-form σ″ (secondorder.models.activation_derivatives "
                    "does not recognise it)"
                ),
            )
        if layers:
            pending.append(act)
        else:
            pre.append(m)
    if not layers:
        return pre, layers, "the model has no nn.Linear layer"
    layers[-1]["activation"] = _finish_activation(pending)
    return pre, layers, ""


def analyse_mlp(model: nn.Module) -> tuple[MLPStructure | None, str]:
    """The :class:`MLPStructure` of ``model``, or ``(None, why it is not supported)``."""
    if not isinstance(model, nn.Sequential):
        return None, (
            f"the model is a {type(model).__name__}, not an nn.Sequential of nn.Linear layers "
            "and elementwise activations"
        )
    pre, layers, reason = _scan_modules(model)
    if reason:
        return None, reason
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:  # θ leaves them out; the layer blocks of the fast path would not
        return None, f"parameters {', '.join(frozen)} are frozen (requires_grad=False)"
    expected: list[nn.Parameter] = []
    infos: list[LayerInfo] = []
    offset = 0
    for d in layers:
        lin: nn.Linear = d["linear"]
        expected.append(lin.weight)
        if lin.bias is not None:
            expected.append(lin.bias)
        info = LayerInfo(
            d["name"],
            lin,
            d["activation"],
            lin.in_features,
            lin.out_features,
            lin.bias is not None,
            offset,
        )
        offset += info.n_params
        infos.append(info)
    actual = list(model.parameters())
    if len(actual) != len(expected) or any(a is not b for a, b in zip(actual, expected)):
        return None, "the model's parameters are shared between layers or registered out of order"
    for prev, nxt in zip(infos[:-1], infos[1:]):
        if prev.n_out != nxt.n_in:
            return None, (
                f"layer {nxt.name} expects {nxt.n_in} inputs but the layer before gives "
                f"{prev.n_out}"
            )
    return MLPStructure(tuple(infos), tuple(pre), offset), ""


def theta_blocks(model: nn.Module, struct: MLPStructure | None) -> list[tuple[str, int, int]]:
    """The "layers" of θ as ``(name, start, stop)``: one per Linear of a supported MLP, else
    one per module that owns parameters (:func:`secondorder.functional.parameter_groups`)."""
    if struct is not None:
        return [(f"Linear {ly.name}", ly.params.start, ly.params.stop) for ly in struct.layers]
    return parameter_groups(model)

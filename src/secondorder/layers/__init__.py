"""One class per layer type, and the registry that maps a module to its class.

Every engine that walks a network — the exact curvature engine and K-FAC — asks a module's
:class:`Layer` (see :mod:`secondorder.layers.base` for the protocol) and nothing else, so adding
a module type is one subclass and one :func:`register` call::

    class MyLayer(Layer):
        module_types = (MyModule,)
        ...

    register(MyLayer)

Covered: ``nn.Linear``, ``nn.Conv2d`` and ``nn.Conv1d`` (groups = 1), the elementwise
activations with closed-form σ′, σ″, ``nn.Flatten``, ``nn.Unflatten``, ``nn.Identity``,
``nn.Dropout`` (eval mode), ``nn.MaxPool2d``, ``nn.AvgPool2d`` and ``nn.AdaptiveAvgPool2d``.
"""

from __future__ import annotations

from torch import nn

from .base import KFAC_APPROXIMATIONS, Layer, diagonal_columns
from .conv import Conv1d, Conv2d
from .linear import Linear
from .parameter_free import AveragePool, Elementwise, MaxPool2d, Reshape

__all__ = [
    "KFAC_APPROXIMATIONS",
    "LAYERS",
    "AveragePool",
    "Conv1d",
    "Conv2d",
    "Elementwise",
    "Layer",
    "Linear",
    "MaxPool2d",
    "Reshape",
    "diagonal_columns",
    "layer_class",
    "make_layer",
    "register",
]

#: module type → its layer class (subclasses of a registered type are found through their MRO)
LAYERS: dict[type[nn.Module], type[Layer]] = {}


def register(cls: type[Layer]) -> type[Layer]:
    """Register a :class:`Layer` subclass for each type in its ``module_types``."""
    if not (isinstance(cls, type) and issubclass(cls, Layer)) or not cls.module_types:
        raise TypeError("register needs a Layer subclass with module_types")
    for t in cls.module_types:
        LAYERS[t] = cls
    return cls


def layer_class(module: nn.Module) -> type[Layer] | None:
    """The class registered for the module's type (or its nearest registered base)."""
    for t in type(module).__mro__:
        if t in LAYERS:
            return LAYERS[t]
    return None


def make_layer(module: nn.Module, name: str = "") -> tuple[Layer | None, str]:
    """``(layer, "")`` for a supported module, else ``(None, why)``."""
    label = f"layer {name} ({type(module).__name__})" if name else type(module).__name__
    cls = layer_class(module)
    if cls is None:
        return None, (
            f"{label} has no closed-form σ″ or Jacobian rule (no layer class; "
            "secondorder.layers.register adds one)"
        )
    why = cls.unsupported(module)
    if why:
        return None, f"{label} is not supported: {why}"
    return cls(module, name), ""


for _cls in (Linear, Conv2d, Conv1d, Elementwise, Reshape, MaxPool2d, AveragePool):
    register(_cls)

"""A network seen as a function of one flat parameter vector θ: f(X; θ).

The objective (:class:`secondorder.objective.ModelObjective`) and the autodiff curvature engine
(:mod:`secondorder.curvature.autodiff`) both differentiate the model with respect to a flat θ
ordered as ``torch.nn.utils.parameters_to_vector(model.parameters())``. :class:`FlatModel` is
that layout once: the parameters' names, shapes and sizes, the views of θ shaped like them, and
the forward pass through ``torch.func.functional_call`` (the module is never modified).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["FlatModel", "parameter_groups"]


class FlatModel:
    """The flat-θ layout of ``model`` and its forward pass f(X; θ).

    ``purpose`` completes the error for a model without parameters ("model has no parameters
    to …"). Buffers (e.g. running statistics) are passed along unchanged, moved to ``device``
    when one is given; ``device`` defaults to the first parameter's.
    """

    def __init__(
        self, model: nn.Module, purpose: str, device: torch.device | str | None = None
    ) -> None:
        params = dict(model.named_parameters())
        if not params:
            raise ValueError(f"model has no parameters to {purpose}")
        first = next(iter(params.values()))
        self.model = model
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.numels = [p.numel() for p in params.values()]
        self.n_params = sum(self.numels)
        self.params = tuple(p.detach() for p in params.values())
        self.device = torch.device(device) if device is not None else first.device
        self.buffers = {k: v.to(self.device) for k, v in model.named_buffers()}

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype the parameters promote to together."""
        return functools.reduce(torch.promote_types, (p.dtype for p in self.params))

    def theta0(self, dtype: torch.dtype | None = None, device=None) -> Tensor:
        """The model's parameters now, as one flat vector (a new tensor)."""
        theta = torch.cat([p.reshape(-1) for p in self.params])
        return theta if dtype is None and device is None else theta.to(dtype=dtype, device=device)

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Views of θ shaped like the model's parameters, by name."""
        return {
            n: t.view(s)
            for n, t, s in zip(self.names, torch.split(theta, self.numels), self.shapes)
        }

    def forward(self, theta: Tensor, X: Tensor) -> Tensor:
        """f(X; θ), computed functionally (the model is not modified)."""
        return functional_call(self.model, {**self.unflatten(theta), **self.buffers}, (X,))

    def l2_mask(self, dtype: torch.dtype, device, *, bias: bool = False) -> Tensor:
        """1 on the entries of parameters with two or more dimensions (weight matrices and
        kernels; every parameter with ``bias=True``), 0 elsewhere."""
        return torch.cat(
            [
                torch.full((n,), float(len(s) >= 2 or bias), dtype=dtype)
                for n, s in zip(self.numels, self.shapes)
            ]
        ).to(device)


def parameter_groups(model: nn.Module) -> list[tuple[str, int, int]]:
    """The blocks of θ for a generic model: one per module that owns parameters directly.

    Returns ``(module name, start, stop)`` ranges of the flat θ (the order of
    ``model.parameters()``). When the modules' parameters are not contiguous in that order,
    every parameter is its own block.
    """
    params = list(model.parameters())
    starts = [0]
    for p in params:
        starts.append(starts[-1] + p.numel())
    owner: dict[int, str] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), name or type(module).__name__)
    runs: list[list] = []
    for i, p in enumerate(params):
        o = owner[id(p)]
        if runs and runs[-1][0] == o:
            runs[-1][2] = starts[i + 1]
        else:
            runs.append([o, starts[i], starts[i + 1]])
    if len({r[0] for r in runs}) == len(runs):
        return [(o, a, b) for o, a, b in runs]
    names = [n for n, _ in model.named_parameters()]
    return [(names[i], starts[i], starts[i + 1]) for i in range(len(params))]

"""A network seen as a function of one flat parameter vector θ: f(X; θ).

The objective (:class:`secondorder.objective.ModelObjective`) and the autodiff curvature engine
(:mod:`secondorder.curvature.autodiff`) both differentiate the model with respect to a flat θ
ordered as ``torch.nn.utils.parameters_to_vector(model.parameters())`` restricted to the
trainable parameters (``requires_grad=True``; a shared parameter once). :class:`FlatModel` is
that layout once: the parameters' names, shapes and sizes, the views of θ shaped like them, and
the forward pass with θ's views swapped into the module's parameter slots and swapped back (the
module is left as it was).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from secondorder._validation import check_device

__all__ = ["FlatModel", "check_model_output", "parameter_groups", "trainable_parameters"]


class FlatModel:
    """The flat-θ layout of ``model`` and its forward pass f(X; θ).

    θ holds the trainable parameters only (``requires_grad=True``), as ``torch.optim`` sees
    them: a frozen parameter keeps its value in every forward pass and has no entry in θ. A
    parameter shared by several modules (or a module used twice) has one entry, so its gradient
    is the sum over its uses. ``purpose`` completes the error for a model without trainable
    parameters ("model has no parameters to …"). Buffers (e.g. running statistics) are passed
    along unchanged, moved to ``device`` when one is given; ``device`` defaults to the first
    parameter's. The module is never modified: a forward pass puts θ's views in its parameter
    slots and restores the original ``nn.Parameter`` objects afterwards, even on an error.
    """

    def __init__(
        self, model: nn.Module, purpose: str, device: torch.device | str | None = None
    ) -> None:
        named = list(model.named_parameters())  # each shared Parameter once
        if not named:
            raise ValueError(f"model has no parameters to {purpose}")
        params = {n: p for n, p in named if p.requires_grad}
        if not params:
            raise ValueError(
                f"model has no trainable parameters to {purpose}: every parameter has "
                "requires_grad=False"
            )
        first = next(iter(params.values()))
        self.model = model
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.numels = [p.numel() for p in params.values()]
        self.n_params = sum(self.numels)
        self.trainable = tuple(params.values())
        self.params = tuple(p.detach() for p in self.trainable)
        self.frozen_names = [n for n, p in named if not p.requires_grad]
        self.device = check_device("device", device) or first.device
        self.buffers = {k: v.to(self.device) for k, v in model.named_buffers()}
        self._slots = _parameter_slots(model, self.trainable)
        # buffers that moved to another device, in their modules' stores
        self._buffer_slots = [
            (m._buffers, key, self.buffers[f"{name}.{key}" if name else key])
            for name, m in model.named_modules()
            for key, b in m._buffers.items()
            if b is not None and self.buffers.get(f"{name}.{key}" if name else key, b) is not b
        ]

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype the parameters promote to together."""
        return functools.reduce(torch.promote_types, (p.dtype for p in self.params))

    def theta0(self, dtype: torch.dtype | None = None, device=None) -> Tensor:
        """The model's trainable parameters now, as one flat vector (a new tensor)."""
        theta = torch.cat([p.reshape(-1) for p in self.params])
        return theta if dtype is None and device is None else theta.to(dtype=dtype, device=device)

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Views of θ shaped like the model's trainable parameters, by name."""
        return {
            n: t.view(s)
            for n, t, s in zip(self.names, torch.split(theta, self.numels), self.shapes)
        }

    def forward(self, theta: Tensor, X: Tensor) -> Tensor:
        """f(X; θ): the model called with θ's views in place of its trainable parameters (and
        its frozen ones cast to θ's dtype and device); the model is left as it was."""
        views = list(self.unflatten(theta).values())
        saved: list[tuple[dict, str, object]] = []
        try:
            for store, key, index, value in self._slots:
                saved.append((store, key, store[key]))
                if index is None:  # a frozen parameter: a constant in θ's dtype
                    store[key] = value.detach().to(dtype=theta.dtype, device=theta.device)
                else:
                    store[key] = views[index]
            for store, key, value in self._buffer_slots:
                saved.append((store, key, store[key]))
                store[key] = value
            return check_model_output(self.model, self.model(X))
        finally:
            for store, key, old in reversed(saved):
                store[key] = old

    def l2_mask(self, dtype: torch.dtype, device, *, bias: bool = False) -> Tensor:
        """1 on the entries of parameters with two or more dimensions (weight matrices and
        kernels; every parameter with ``bias=True``), 0 elsewhere."""
        return torch.cat(
            [
                torch.full((n,), float(len(s) >= 2 or bias), dtype=dtype)
                for n, s in zip(self.numels, self.shapes)
            ]
        ).to(device)


def check_model_output(model: nn.Module, out, n_samples: int | None = None) -> Tensor:
    """``out`` if it is a tensor of outputs (n_samples, k); else an error naming the model.

    Without ``n_samples`` only the type is checked (the cheap test of every forward pass).
    """
    name = type(model).__name__
    if not isinstance(out, Tensor):
        hint = " (return one tensor, e.g. the logits, from forward)"
        raise TypeError(
            f"the model {name} returned a {type(out).__name__} from forward; expected a tensor "
            f"of outputs of shape (m, k){hint if isinstance(out, (tuple, list, dict)) else ''}"
        )
    if n_samples is not None and (out.ndim != 2 or out.shape[0] != n_samples):
        raise ValueError(
            f"the model {name} must map (m, ...) inputs to (m, k) outputs; for m={n_samples} "
            f"it returned shape {tuple(out.shape)}"
        )
    return out


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters θ is made of, in θ's order: each shared one once, frozen ones left out."""
    return [p for p in model.parameters() if p.requires_grad]


def _parameter_slots(
    model: nn.Module, trainable: tuple[nn.Parameter, ...]
) -> list[tuple[dict, str, int | None, Tensor]]:
    """Every (module store, name) holding a parameter, with its index in θ (None: frozen).

    Each module once, each of its slots once: a module used twice, or a Parameter registered in
    two modules, is swapped and restored exactly once per slot.
    """
    index = {id(p): i for i, p in enumerate(trainable)}
    slots = []
    for module in model.modules():  # each module object once
        for key, p in module._parameters.items():
            if p is not None:
                slots.append((module._parameters, key, index.get(id(p)), p))
    return slots


def parameter_groups(model: nn.Module) -> list[tuple[str, int, int]]:
    """The blocks of θ for a generic model: one per module that owns parameters directly.

    Returns ``(module name, start, stop)`` ranges of the flat θ (the order of
    ``model.parameters()``). When the modules' parameters are not contiguous in that order,
    every parameter is its own block.
    """
    params = trainable_parameters(model)
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
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return [(names[i], starts[i], starts[i + 1]) for i in range(len(params))]

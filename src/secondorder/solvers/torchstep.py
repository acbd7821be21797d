"""Any ``torch.optim`` optimiser as a direction rule: ``minimize(..., method="torch:Adagrad")``.

At iteration k the optimiser gets θ_k as its one (flat) parameter and ∇f(θ_k) as its
gradient, takes one ``step()``, and the displacement θ' − θ_k is the step the loop takes (a
fixed step α = 1). So one iteration of ``minimize`` is one ``optimizer.step()`` of a usual
training loop, with the optimiser's own state carried across iterations and checkpoints.
``torch.optim.LBFGS``, which needs a closure, gets one that evaluates the objective.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from secondorder._validation import closest
from secondorder.solvers.protocol import Direction, Iterate

__all__ = ["TorchOptimizerStep", "torch_optimizer_class"]


def torch_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` optimiser called ``name``; a ValueError suggests the closest."""
    choices = sorted(
        n
        for n in dir(torch.optim)
        if isinstance(getattr(torch.optim, n), type)
        and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
        and n != "Optimizer"
    )
    if name not in choices:
        raise ValueError(
            f"torch.optim has no optimiser {name!r}{closest(name, choices)}; "
            f"choose one of {choices}"
        )
    return getattr(torch.optim, name)


class TorchOptimizerStep(Direction):
    """d = θ' − θ with θ' the parameter after one step of a ``torch.optim`` optimiser."""

    name = "torch"
    requires_descent = False

    def __init__(self, cls: type[torch.optim.Optimizer], options: dict) -> None:
        super().__init__()
        self.cls = cls
        self.options = dict(options)
        try:  # refuse bad options before any evaluation
            cls([nn.Parameter(torch.zeros(1))], **self.options)
        except (TypeError, ValueError, IndexError, RuntimeError) as err:
            raise ValueError(f"torch.optim.{cls.__name__}: {err}") from None
        self.param: nn.Parameter | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._saved: dict | None = None

    def _ready(self, theta: Tensor) -> tuple[nn.Parameter, torch.optim.Optimizer]:
        if self.optimizer is None:
            self.param = nn.Parameter(theta.detach().clone())
            self.optimizer = self.cls([self.param], **self.options)
            if self._saved is not None:
                self.optimizer.load_state_dict(self._saved)
                self._saved = None
        return self.param, self.optimizer

    def compute(self, it: Iterate) -> Tensor:
        param, optimizer = self._ready(it.theta)
        with torch.no_grad():
            param.copy_(it.theta)
        param.grad = it.g.detach().clone()
        if isinstance(optimizer, torch.optim.LBFGS):

            def closure() -> Tensor:
                f, g = it.objective.value_and_grad(param.detach())
                param.grad = g.detach().clone()
                return f.detach()

            optimizer.step(closure)
        else:
            optimizer.step()
        return param.detach() - it.theta

    def initial_step(self, it: Iterate, d: Tensor, dphi0: float) -> float:
        return 1.0  # the optimiser's displacement is the whole step

    def state_dict(self) -> dict:
        live = self.optimizer.state_dict() if self.optimizer is not None else self._saved
        saved = copy.deepcopy(live)  # the optimiser goes on mutating its own tensors
        return {**super().state_dict(), "optimizer": saved}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._saved = state.get("optimizer")
        self.optimizer = None

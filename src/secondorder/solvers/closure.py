"""A torch.optim closure over a list of parameters, seen as a function of one flat vector.

:class:`FlatParams` flattens any number of parameter tensors (one dtype and device) into one
vector in the order given; :func:`loss_and_grad` runs a closure there and returns the loss and
the flat gradient, whether the closure called ``backward()`` or not; :class:`ClosureObjective`
is the :class:`~secondorder.objective.Objective` whose f, ∇f and Hessian-vector products come
from the closure, so :func:`~secondorder.solvers.minimize` can run on it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from secondorder.errors import InvalidValueError
from secondorder.objective import Objective

__all__ = ["ClosureObjective", "FlatParams", "loss_and_grad"]


class FlatParams:
    """A list of parameters seen as one flat vector."""

    def __init__(self, params: list[Tensor]) -> None:
        if not params:
            raise ValueError("the optimizer got an empty parameter list")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                f"all parameters must share one dtype and device, got {sorted(map(str, dtypes))}"
                f" on {sorted(map(str, devices))}"
            )
        for p in params:
            if torch.is_complex(p) or not p.dtype.is_floating_point:
                raise ValueError(f"parameters must be real floating tensors, got {p.dtype}")
        self.params = params
        self.numels = [p.numel() for p in params]
        self.n = sum(self.numels)
        self.dtype = params[0].dtype
        self.device = params[0].device

    def get(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    @torch.no_grad()
    def set(self, x: Tensor) -> None:
        for p, v in zip(self.params, torch.split(x, self.numels)):
            p.copy_(v.view_as(p))

    def grad(self) -> Tensor:
        return torch.cat(
            [
                torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                if p.grad is None
                else (p.grad.to_dense() if p.grad.is_sparse else p.grad).reshape(-1)
                for p in self.params
            ]
        )

    def add(self, x: Tensor, d: Tensor, alpha: float) -> Tensor:
        """x + αd computed tensor by tensor, exactly as an in-place update of each parameter
        would round it (vectorised kernels round the tail of a tensor differently)."""
        return torch.cat(
            [
                a.add(b, alpha=alpha)
                for a, b in zip(torch.split(x, self.numels), torch.split(d, self.numels))
            ]
        )

    def zero(self) -> None:
        for p in self.params:
            p.grad = None

    def split(self, v: Tensor) -> list[Tensor]:
        return [t.view_as(p) for t, p in zip(torch.split(v, self.numels), self.params)]


def loss_and_grad(
    flat: FlatParams, closure: Callable, name: str = "the optimizer"
) -> tuple[Tensor, Tensor]:
    """Run the closure at the current parameters; the loss and the flat gradient.

    A loss that carries no gradient — computed under ``torch.no_grad()`` or detached, without
    ``backward()``, or not depending on the parameters at all — is refused naming ``name``:
    its zero gradient would otherwise read as convergence, and nothing would move."""
    flat.zero()
    with torch.enable_grad():
        loss = closure()
    if not isinstance(loss, Tensor):
        raise TypeError(f"the closure must return the loss as a tensor, got {type(loss).__name__}")
    if all(p.grad is None for p in flat.params) and not loss.requires_grad:
        raise InvalidValueError(
            f"{name}: the closure's loss carries no gradient (it was computed under "
            "torch.no_grad() or detached, and no backward() set the parameters' .grad); "
            "return the loss with its graph"
        )
    if all(p.grad is None for p in flat.params):
        grads = torch.autograd.grad(loss, flat.params, allow_unused=True)
        if all(gi is None for gi in grads):
            raise InvalidValueError(
                f"{name}: the closure's loss does not depend on the optimizer's parameters; "
                "pass the parameters the loss is computed from"
            )
        g = torch.cat(
            [
                torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                if gi is None
                else gi.reshape(-1)
                for gi, p in zip(grads, flat.params)
            ]
        )
        return loss.detach(), g.detach()
    return loss.detach(), flat.grad().detach()


class ClosureObjective(Objective):
    """An Objective over the optimizer's flat parameters, evaluated through the closure."""

    def __init__(self, flat: FlatParams, closure: Callable, name: str) -> None:
        super().__init__()
        self.flat = flat
        self.closure = closure
        self.name = name
        self.n_params = flat.n
        self.dtype = flat.dtype
        self.device = flat.device

    def value_and_grad(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        self.flat.set(theta)
        self.counts.f += 1
        self.counts.g += 1
        return loss_and_grad(self.flat, self.closure, self.name)

    def value(self, theta: Tensor) -> Tensor:
        return self.value_and_grad(theta)[0]

    def hvp_at(self, theta: Tensor) -> Callable[[Tensor], Tensor]:
        flat = self.flat
        flat.set(theta)
        flat.zero()
        with torch.enable_grad():
            loss = self.closure()
            if any(p.grad is not None for p in flat.params):
                if not all(p.grad is not None and p.grad.requires_grad for p in flat.params):
                    raise RuntimeError(
                        f"{self.name} needs the loss's graph for Hessian-vector products: the "
                        "closure must return the loss without calling backward() (or call "
                        "backward(create_graph=True))"
                    )
                grads = [p.grad for p in flat.params]
            else:
                grads = torch.autograd.grad(loss, flat.params, create_graph=True, allow_unused=True)
        pairs = [(gi, p) for gi, p in zip(grads, flat.params)]

        def product(v: Tensor) -> Tensor:
            self.counts.hv += 1
            vs = flat.split(v)
            outs, ins, vv = [], [], []
            for (gi, _p), vi in zip(pairs, vs):
                if gi is not None and gi.requires_grad:
                    outs.append(gi)
                    ins.append(vi)
            if not outs:
                return torch.zeros_like(v)
            with torch.enable_grad():
                hv = torch.autograd.grad(
                    outs, flat.params, ins, retain_graph=True, allow_unused=True
                )
            for h, p in zip(hv, flat.params):
                vv.append(
                    torch.zeros(p.numel(), dtype=v.dtype, device=v.device)
                    if h is None
                    else h.reshape(-1)
                )
            return torch.cat(vv).detach()

        return product

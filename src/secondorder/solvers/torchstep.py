"""Any ``torch.optim`` optimiser as a direction rule: ``minimize(..., method="torch:Adagrad")``.

At iteration k the optimiser gets θ_k as its one (flat) parameter and ∇f(θ_k) as its
gradient, takes one ``step()``, and the displacement θ' − θ_k is the step the loop takes (a
fixed step α = 1). So one iteration of ``minimize`` is one ``optimizer.step()`` of a usual
training loop, with the optimiser's own state carried across iterations and checkpoints.
``torch.optim.LBFGS``, which needs a closure, gets one that evaluates the objective.

The options are checked before any evaluation, each against its constructor argument
(:func:`option_check`): its type as annotated, or as its default's type where there is no
annotation (a bool for a bool, a number for a number, a tuple of as many numbers for a tuple),
finite numbers, ``lr`` > 0, no negative value where the default is not negative, no
``maximize=True``. :meth:`TorchOptimizerStep.check_serves` then takes a few steps on a small
quadratic with a parameter of θ's dtype and device, so that an optimiser that cannot serve a
dense flat θ (``SparseAdam``, ``capturable=True`` off CUDA, ``Muon``) is refused before the
first iteration rather than at it.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from secondorder._validation import closest
from secondorder.errors import InvalidTypeError, InvalidValueError
from secondorder.solvers.protocol import Direction, Iterate

__all__ = ["TorchOptimizerStep", "option_check", "option_checks", "torch_optimizer_class"]


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


def _hints(cls: type) -> dict[str, Any]:
    """The constructor's type annotations, or none where they cannot be resolved."""
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - an optimiser's annotations are its own business
        return {}


def _union_args(kind: Any) -> tuple[Any, ...]:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return typing.get_args(kind)
    return (kind,)


def _kind_of(default: Any) -> Any:
    """The type a default stands for when the argument has no annotation."""
    if default is None or isinstance(default, (bool, str)):
        return Any if default is None else type(default)
    if isinstance(default, numbers.Real):
        return float
    if isinstance(default, tuple):
        return tuple[tuple(_kind_of(d) for d in default)]  # type: ignore[misc]
    return Any


def _describe(kind: Any) -> str:
    names = []
    for k in _union_args(kind):
        if k is type(None):
            names.append("None")
        elif k is bool:
            names.append("true or false")
        elif k is int:
            names.append("an integer")
        elif k is float:
            names.append("a finite number")
        elif k is str:
            names.append("a string")
        elif k is Tensor:
            names.append("a scalar tensor")
        elif typing.get_origin(k) is tuple:
            args = typing.get_args(k)
            names.append(f"a list of {len(args)} numbers" if Ellipsis not in args else "a list")
        else:
            names.append(getattr(k, "__name__", str(k)))
    return " or ".join(dict.fromkeys(names))


def _matches(value: Any, kind: Any, arg: str) -> tuple[bool, Any]:
    """Whether ``value`` is of ``kind`` (an annotation), and the value to pass (lists of a
    tuple kind become tuples); a non-finite number raises naming ``arg``."""
    if kind is Any:
        ok = value is None or isinstance(value, (bool, str, numbers.Real))
        if ok and isinstance(value, numbers.Real) and not isinstance(value, bool):
            _finite(arg, value)
        return ok, value
    for k in _union_args(kind):
        if k is type(None) and value is None:
            return True, None
        if k is bool and isinstance(value, bool):
            return True, value
        if k is str and isinstance(value, str):
            return True, value
        if isinstance(value, bool) or value is None:
            continue
        if k is int and isinstance(value, numbers.Integral):
            return True, int(value)
        if k is float and isinstance(value, numbers.Real):
            _finite(arg, value)
            return True, value
        if k is Tensor and isinstance(value, Tensor):
            if value.ndim != 0 or not value.dtype.is_floating_point:
                continue
            _finite(arg, float(value))
            return True, value
        if typing.get_origin(k) is tuple and isinstance(value, (list, tuple)):
            items = typing.get_args(k)
            if Ellipsis in items:
                items = (items[0],) * len(value)
            if len(items) != len(value):
                continue
            checked = [_matches(v, i, f"{arg}[{n}]") for n, (v, i) in enumerate(zip(value, items))]
            if all(ok for ok, _ in checked):
                return True, tuple(v for _, v in checked)
    return False, value


def _finite(arg: str, value: Any) -> None:
    if not math.isfinite(float(value)):
        raise InvalidValueError(f"{arg} must be a finite number, got {value!r}")


def _sign(value: Any) -> float | None:
    """A scalar number's value (None for anything else)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, Tensor):
        return float(value) if value.ndim == 0 else None
    return float(value) if isinstance(value, numbers.Real) else None


def option_check(param: inspect.Parameter, kind: Any) -> Callable[[str, Any], Any]:
    """The check of one constructor argument of a ``torch.optim`` optimiser, from its
    annotation ``kind`` (``Any``: from its default): returns the value to pass or raises an
    error naming the option and what it must be."""
    default = None if param.default is inspect.Parameter.empty else param.default
    if kind is Any:
        kind = _kind_of(default)
    floor = _sign(default)
    counts = int in _union_args(kind)  # a count: at least 1 unless its default is 0

    def check(arg: str, value: Any) -> Any:
        ok, value = _matches(value, kind, arg)
        if not ok:
            got = f"{value!r}" if isinstance(value, (str, numbers.Number)) else type(value).__name__
            if isinstance(value, (list, tuple)):
                got = f"{type(value).__name__} of {len(value)}: {list(value)!r}"
            raise InvalidTypeError(f"{arg} must be {_describe(kind)}, got {got}")
        number = _sign(value)
        if param.name == "lr" and (number is None or number <= 0):
            raise InvalidValueError(f"{arg} must be a finite number > 0, got {value!r}")
        if number is not None and floor is not None and floor >= 0 and number < 0:
            raise InvalidValueError(f"{arg} must be >= 0 (its default is {default}), got {value!r}")
        at_least_one = counts and (floor is None or floor >= 1)
        if at_least_one and number is not None and isinstance(value, int) and number < 1:
            raise InvalidValueError(f"{arg} must be an integer >= 1, got {value!r}")
        if param.name == "maximize" and value is True:
            raise InvalidValueError(
                f"{arg}=True would climb f, and minimize descends (negate the objective to "
                "maximise it)"
            )
        return value

    return check


def option_checks(cls: type[torch.optim.Optimizer]) -> dict[str, Callable[[str, Any], Any]]:
    """The check of every keyword argument of ``cls``'s constructor, by its name."""
    hints = _hints(cls)
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, params
    return {
        p.name: option_check(p, hints.get(p.name, Any))
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


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

    def check_serves(self, dtype: torch.dtype, device: torch.device) -> None:
        """Refuse, before any evaluation, an optimiser that cannot take steps on a dense flat
        θ of ``dtype`` on ``device``: a few steps on f(x) = ½ Σ cᵢ xᵢ² must run."""
        name = f"torch.optim.{self.cls.__name__}"
        device = torch.device(device)
        if self.options.get("capturable") and device.type not in ("cuda", "xpu", "hpu"):
            raise InvalidValueError(
                f"{name}: capturable=True needs θ on a CUDA device (it is on {device}); "
                "leave capturable out"
            )
        c = torch.tensor([1.0, 4.0, 0.5], dtype=dtype, device=device)
        param = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=dtype, device=device))

        def closure() -> Tensor:
            with torch.no_grad():
                param.grad = c * param
                return 0.5 * (c * param * param).sum()

        try:
            optimizer = self.cls([param], **self.options)
            for _ in range(3):
                closure()
                optimizer.step(closure)
        except Exception as err:  # noqa: BLE001 - the optimiser's own refusal, named below
            raise InvalidValueError(
                f"{name} cannot serve here: its step on a dense flat θ "
                f"({str(dtype).removeprefix('torch.')}, {device.type}) fails: {err}"
            ) from None

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

"""Argument checks shared by every module: errors name the argument and what was expected."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from secondorder.errors import InvalidTypeError, InvalidValueError


def closest(name: str, choices: Iterable[str]) -> str:
    """Return a ' (did you mean 'x'?)' hint for a misspelt ``name``, or ''."""
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_device(arg: str, device: Any) -> torch.device | None:
    """``device`` as a ``torch.device`` (None stays None), refused in one line when it does not
    parse, or names CUDA on a build or machine without it, or a GPU index that is not there."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidValueError(
            f"{arg}={device!r} is not a device ('cpu', 'cuda', 'cuda:N', ...): {exc}"
        ) from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise InvalidValueError(
                f"{arg}={device!r}: this PyTorch ({torch.__version__}) is built without CUDA; "
                "use 'cpu' or install a CUDA build of torch"
            )
        if not torch.cuda.is_available():
            raise InvalidValueError(f"{arg}={device!r}: no CUDA device is available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidValueError(
                f"{arg}={device!r}: there are {torch.cuda.device_count()} CUDA devices"
            )
    return dev


def check_choice(arg: str, value: Any, choices: Iterable[str]) -> str:
    """Check that ``value`` is one of ``choices``; the error suggests the closest name."""
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise InvalidValueError(
            f"{arg}={value!r} is not one of {sorted(choices)}{closest(str(value), choices)}"
        )
    return value


def check_positive(arg: str, value: Any, *, allow_zero: bool = False) -> float:
    """Check that ``value`` is a finite real number > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTypeError(f"{arg} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidValueError(f"{arg} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_positive_int(arg: str, value: Any, *, allow_zero: bool = False) -> int:
    """Check that ``value`` is an integer > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            raise InvalidTypeError(
                f"{arg} must be an integer, got {type(value).__name__}"
            ) from None
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidValueError(f"{arg} must be an integer {bound}, got {value}")
    return value


def first_index(mask: Tensor) -> tuple[int, ...] | int:
    """The index of the first True entry of ``mask`` (an int for a 1-D mask)."""
    pos = tuple(int(i) for i in torch.nonzero(mask)[0].tolist())
    return pos[0] if len(pos) == 1 else pos


def check_finite(arg: str, t: Tensor) -> None:
    """Raise ValueError when ``t`` holds NaN or inf, naming the first bad sample (row), how
    many entries are bad and the full index of the first one.

    A finite sum proves every entry finite (a NaN or an inf entry makes the sum NaN or ±inf)
    at the cost of one read; only a non-finite sum, from a bad entry or an overflow, pays for
    the elementwise test. Integer tensors are always finite.
    """
    if not t.is_floating_point() or bool(torch.isfinite(t.sum())):
        return
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return
    sample = int(bad.reshape(len(t), -1).any(1).nonzero()[0, 0])
    raise InvalidValueError(
        f"{arg} contains NaN or inf values (first in sample {sample}): {int(bad.sum())} "
        f"non-finite in all, the first at index {first_index(bad)}"
    )


def check_same_length(X: Tensor, y: Tensor) -> None:
    """Raise ValueError unless ``y`` holds one target per sample (first dimension) of ``X``."""
    if X.ndim < 1 or y.ndim < 1 or X.shape[0] != y.shape[0]:
        raise InvalidValueError(
            "y must hold one target per sample of X: X and y must have the same number of "
            f"samples (first dimension), got X {tuple(X.shape)} and y {tuple(y.shape)}"
        )


def check_shape(arg: str, out, shape) -> None:
    """What a user's function returned must be a tensor of ``shape`` (a wrong length would
    otherwise broadcast or slice silently)."""
    if not isinstance(out, torch.Tensor) or out.shape != shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InvalidValueError(f"{arg} must return a tensor of shape {tuple(shape)}, got {got}")

"""Low-level numerical helpers every layer may import: the float64 dot product and the guard
that refuses a dense tensor before it is allocated.

Nothing here knows about models, objectives or solvers, so the objective, the curvature engine
and the solvers share one copy of each kernel.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from secondorder._format import format_number
from secondorder.errors import EnvironmentFault

__all__ = ["MemoryError_", "available_bytes", "check_dense_fits", "dot64", "norm64"]


def dot64(a: Tensor, b: Tensor) -> float:
    """aᵀb accumulated in float64 (scalar bookkeeping must not inherit float32 noise)."""
    if a.dtype != torch.float64:
        a, b = a.to(torch.float64), b.to(torch.float64)
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def norm64(a: Tensor) -> float:
    """‖a‖₂ accumulated in float64."""
    return math.sqrt(dot64(a, a))


class MemoryError_(EnvironmentFault, MemoryError):
    """A dense request that would not fit; the message names the bytes and an alternative."""


def available_bytes(device: torch.device | str | None = None) -> int:
    """Memory available now where tensors on ``device`` live: the GPU's free memory for a
    CUDA device, else the host's (8 GiB where the platform cannot say)."""
    if device is not None and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 2**30


def check_dense_fits(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    what: str,
    *,
    max_bytes: int | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Refuse, before allocating, a dense tensor that would exceed ``max_bytes``.

    The default limit is half the memory available now on ``device`` (the GPU's free memory
    for CUDA, host memory otherwise). Returns the number of bytes.
    """
    n = 1
    for s in shape:
        n *= int(s)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    limit = available_bytes(device) // 2 if max_bytes is None else int(max_bytes)
    if nbytes > limit:
        where = "" if device is None else f" on {torch.device(device)}"
        raise MemoryError_(
            f"{what} of shape {tuple(shape)} in {dtype}{where} needs {nbytes:,} bytes "
            f"({format_number(nbytes / 2**30, 3)} GiB), above the limit of {limit:,} bytes; "
            "use matrix-free "
            "products instead (Objective.hvp / Objective.ggnvp, or the linear operators of "
            "secondorder.curvature), or raise max_bytes"
        )
    return nbytes

"""Data parallelism over processes with ``torch.distributed`` (gloo on the CPU, NCCL on GPUs).

Every process holds the same data, builds the same sampler with the same seed and so agrees on
the batch of every iteration (eq. 28). Process r of W takes the contiguous slice
``[⌊rn/W⌋, ⌊(r+1)n/W⌋)`` of the batch's n samples, keeping their weights in the *whole* batch,
so that the per-process sums Σ_{i∈r} w_i (·) add up to the single-process sum. Each sum over
samples is then all-reduced, one collective per request:

- ``value_and_grad``: [Σ w ℓ, ∇Σ w ℓ] in one buffer; ``value``: one number;
- each Hessian- or Gauss–Newton-vector product (``hvp``, ``ggnvp``, ``ggnvp_at``'s
  products, with ``max_samples=n`` the first n samples of the *whole* batch): one vector;
- K-FAC's factors (every layer's A and G of one update): one buffer.

The L2 term is added after the sum, once. Every process receives the same numbers and runs the
same solver on them, so the solvers are unchanged and every process holds the same θ.

:func:`data_parallel` turns a :class:`~secondorder.objective.ModelObjective` data-parallel;
:func:`curvature_sum` does the same for a function of the exact curvature engine
(``secondorder.curvature.hessian_diagonal``, ``layer_hessians``, ...). :func:`init` joins the
process group that ``torchrun`` describes in the environment, with a timeout after which a
collective whose peer died or hangs raises :class:`PeerLost` instead of waiting for ever;
:func:`check_environment` refuses a bad environment before any work.

The processes must hold the same things: :func:`data_parallel` all-gathers a digest of each
process's X, y, θ₀ and objective settings and :func:`agree` compares any named values (the
runner's resolved spec and :func:`code_version`) before the first step; a difference raises
:class:`RanksDisagree` on every process, naming what differs and on which ranks.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from secondorder.errors import InvalidTypeError, InvalidValueError

__all__ = [
    "DEFAULT_TIMEOUT",
    "TIMEOUT_ENV",
    "NullTrace",
    "PeerLost",
    "RanksDisagree",
    "Shard",
    "agree",
    "check_environment",
    "code_version",
    "curvature_sum",
    "data_parallel",
    "from_environment",
    "init",
    "is_writer",
    "local_device",
    "rank",
    "timeout_seconds",
    "world_size",
]

#: seconds a collective waits for its peers before :class:`PeerLost` (``init``'s default)
DEFAULT_TIMEOUT = 60.0
#: the environment variable that overrides :data:`DEFAULT_TIMEOUT`
TIMEOUT_ENV = "SECONDORDER_DIST_TIMEOUT"


class PeerLost(Exception):
    """A collective failed: another process of the group died, or did not answer within the
    timeout. Not a ``RuntimeError``, so that no solver mistakes it for a numerical failure and
    evaluates again."""


class RanksDisagree(InvalidValueError):
    """The processes of one data-parallel job do not hold the same spec, data or code; raised
    on every process, with the same message (``writer_only``: one process need say it)."""

    writer_only = True


# ----------------------------------------------------------------------------------------------
# The process group
# ----------------------------------------------------------------------------------------------
def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidValueError(
            f"environment variable {name} must be an integer, got {raw!r}"
        ) from None


def check_environment() -> None:
    """Refuse, before any work, an environment no process group can be built from:
    ``WORLD_SIZE`` not an integer >= 1; with ``WORLD_SIZE`` > 1, ``RANK``, ``MASTER_ADDR`` or
    ``MASTER_PORT`` missing; ``RANK`` outside [0, WORLD_SIZE); ``LOCAL_RANK`` or
    ``MASTER_PORT`` not a non-negative integer; a bad ``SECONDORDER_DIST_TIMEOUT``. Each
    error names the variable and what was expected."""
    timeout_seconds()
    n = _env_int("WORLD_SIZE", 1)
    if n < 1:
        raise InvalidValueError(f"environment variable WORLD_SIZE must be >= 1, got {n}")
    if n > 1:
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise InvalidValueError(
                f"WORLD_SIZE={n} but the environment lacks {', '.join(missing)}: launch with "
                "torchrun, or set RANK, MASTER_ADDR and MASTER_PORT for every process"
            )
    r = _env_int("RANK", 0)
    if not 0 <= r < n:
        raise InvalidValueError(
            f"environment variable RANK must lie in [0, WORLD_SIZE={n}), got {r}"
            + (" (WORLD_SIZE is unset)" if not os.environ.get("WORLD_SIZE") else "")
        )
    for name, top in (("LOCAL_RANK", None), ("MASTER_PORT", 65535)):
        v = _env_int(name, 0)
        if v < 0 or (top is not None and v > top):
            bound = f"in [0, {top}]" if top else ">= 0"
            raise InvalidValueError(f"environment variable {name} must be {bound}, got {v}")


def world_size() -> int:
    """The number of processes: the group's, else ``WORLD_SIZE`` of the environment, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's rank: the group's, else ``RANK`` of the environment, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def is_writer() -> bool:
    """Whether this process writes files (traces, checkpoints, reports): rank 0 only."""
    return rank() == 0


def timeout_seconds(timeout: float | None = None) -> float:
    """The collective timeout: ``timeout``, else ``$SECONDORDER_DIST_TIMEOUT``, else 60 s."""
    source = "timeout"
    if timeout is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if not raw:
            return DEFAULT_TIMEOUT
        source = f"environment variable {TIMEOUT_ENV}"
        try:
            timeout = float(raw)
        except ValueError:
            raise InvalidValueError(f"{source} must be a number of seconds, got {raw!r}") from None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidTypeError(
            f"{source} must be a number of seconds, got {type(timeout).__name__}"
        )
    if not (math.isfinite(timeout) and timeout > 0):
        raise InvalidValueError(
            f"{source} must be a positive, finite number of seconds, got {timeout}"
        )
    return float(timeout)


def local_device(device: torch.device | str) -> torch.device:
    """``cuda`` without an index becomes ``cuda:$LOCAL_RANK`` (one GPU per process of a
    node); any other device is returned as it is."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return device


_STATE: dict[str, Any] = {"timeout": None}


def init(
    backend: str | None = None,
    *,
    device: torch.device | str = "cpu",
    timeout: float | None = None,
) -> bool:
    """Join the process group the environment describes (``torchrun`` sets ``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); return whether one is initialised.

    Does nothing when a group exists already, or in one process (``WORLD_SIZE`` unset or 1).
    The backend is NCCL for a CUDA ``device`` and gloo otherwise; ``timeout`` (seconds, see
    :func:`timeout_seconds`) bounds every collective of the group.
    """
    seconds = timeout_seconds(timeout)
    if dist.is_initialized():
        return True
    n = _env_int("WORLD_SIZE", 1)
    if n <= 1:
        return False
    check_environment()
    device = local_device(device)
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    except Exception as err:  # the store or a peer did not answer within the timeout
        raise PeerLost(
            f"rank {os.environ['RANK']} of {n} could not join the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {seconds:g} s "
            f"({type(err).__name__}: {_first_line(err)})"
        ) from err
    _STATE["timeout"] = seconds
    atexit.register(_shutdown)
    return True


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no detail"


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Agreement: the same spec, data and code on every process
# ----------------------------------------------------------------------------------------------
def tensor_digest(*tensors: Tensor) -> str:
    """SHA-256 of tensors: dtype, shape and bytes of each (on the CPU)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype};{tuple(t.shape)};".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The package's version and a SHA-256 of its source files: equal only for the same
    code."""
    from secondorder import __version__

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{__version__}+{h.hexdigest()[:16]}"


Explain = Callable[[Any, Any], list[str]]


def agree(
    items: Mapping[str, Any],
    *,
    explain: Mapping[str, Explain] | None = None,
    group: Any = None,
) -> None:
    """Check that every process of ``group`` (the default group when None; nothing to do
    without one, or in one process) holds equal ``items`` (name → a digest or a small
    value), in one all-gather. A difference raises :class:`RanksDisagree` on every process
    naming each item that differs, the ranks whose value is not rank 0's and, through
    ``explain[name](rank 0's value, theirs)``, how."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    n = dist.get_world_size(group)
    gathered: list[Any] = [None] * n
    start = time.monotonic()
    try:
        dist.all_gather_object(gathered, dict(items), group=group)
    except Exception as err:  # a peer died, hung or never came
        raise PeerLost(
            f"rank {dist.get_rank(group)} of {n}: comparing {', '.join(items)} across the "
            f"processes failed after {time.monotonic() - start:.1f} s: another process died "
            f"or stopped responding ({type(err).__name__}: {_first_line(err)})"
        ) from err
    first = gathered[0]
    problems = []
    for name in sorted({k for g in gathered for k in g}, key=str):
        ranks = [r for r, g in enumerate(gathered) if _same(g.get(name)) != _same(first.get(name))]
        if not ranks:
            continue
        how = ""
        if explain and name in explain:
            lines = explain[name](first.get(name), gathered[ranks[0]].get(name))
            if lines:
                shown = "; ".join(lines[:5]) + (
                    f"; … ({len(lines)} in all)" if len(lines) > 5 else ""
                )
                how = f": {shown}"
        on = ", ".join(map(str, ranks))
        problems.append(
            f"the {name} of rank{'s' if len(ranks) > 1 else ''} {on} differs from rank 0's{how}"
        )
    if problems:
        raise RanksDisagree(
            f"the {n} processes disagree before the first step: "
            + "; ".join(problems)
            + " — every process must run the same spec on the same data with the same code"
        )


def _same(value: Any) -> str:
    """A canonical text of a value, so that equal specs compare equal (NaN included)."""
    return json.dumps(value, sort_keys=True, default=repr)


def _settings(objective) -> str:
    """What, besides X, y and θ₀, makes an objective's sums: loss, L2 and samplers."""
    parts = [
        type(objective.loss).__name__,
        repr(objective.l2_coefficient),
        str(objective.regularize_bias),
    ]
    for sampler in (objective.sampler, objective.curvature_sampler):
        if sampler is None:
            parts.append("None")
            continue
        scalars = {
            k: v for k, v in sorted(vars(sampler).items()) if isinstance(v, (bool, int, float, str))
        }
        parts.append(f"{type(sampler).__name__}{scalars}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# One process's share, and the sums
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """Process ``rank`` of ``world_size``: its contiguous slice of every batch and the
    all-reduced sums (``group``: a ``torch.distributed`` group, None for the default)."""

    rank: int
    world_size: int
    group: Any = None

    @classmethod
    def of_group(cls, group: Any = None) -> Shard:
        """This process's shard in ``group`` (the default group when None), which must be
        initialised (see :func:`init`)."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "torch.distributed is not initialised: call secondorder.distributed.init() "
                "(under torchrun) or torch.distributed.init_process_group first"
            )
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    def bounds(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this process among n samples: ⌊rn/W⌋ to ⌊(r+1)n/W⌋."""
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size

    def take(self, X: Tensor, y: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """This process's samples of a batch (views), with their weights in the whole batch."""
        lo, hi = self.bounds(len(X))
        return X[lo:hi], y[lo:hi], w[lo:hi]

    def sum(self, parts: tuple[Tensor, ...] | list[Tensor]) -> tuple[Tensor, ...]:
        """Every part summed over the processes, in one all-reduce of their concatenation."""
        if not parts:
            return ()
        first = parts[0]
        for p in parts[1:]:
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(
                    "the parts of one sum must share a dtype and device, got "
                    f"{first.dtype} on {first.device} and {p.dtype} on {p.device}"
                )
        flat = torch.cat([p.detach().reshape(-1) for p in parts])
        self._all_reduce(flat)
        out, pos = [], 0
        for p in parts:
            out.append(flat[pos : pos + p.numel()].view(p.shape))
            pos += p.numel()
        return tuple(out)

    def gather_rows(self, local: Tensor, n: int) -> Tensor:
        """The (n, ...) tensor whose rows [lo, hi) are each process's ``local`` rows (one
        all-reduce of a zero-padded buffer)."""
        lo, hi = self.bounds(n)
        full = local.new_zeros((n, *local.shape[1:]))
        full[lo:hi] = local
        self._all_reduce(full)
        return full

    def _all_reduce(self, buf: Tensor) -> None:
        start = time.monotonic()
        try:
            dist.all_reduce(buf, group=self.group)
        except Exception as err:  # gloo and NCCL raise RuntimeError subclasses
            limit = _STATE["timeout"]
            within = f" (timeout {limit:g} s)" if limit else ""
            raise PeerLost(
                f"data-parallel rank {self.rank} of {self.world_size}: a collective of "
                f"{buf.numel()} numbers failed after {time.monotonic() - start:.1f} s{within}: "
                f"another process died or stopped responding ({type(err).__name__}: "
                f"{_first_line(err)}); resume from the last checkpoint, on any number of "
                "processes"
            ) from err

    def curvature(
        self, fn: Callable[..., Any], model, X: Tensor, y: Tensor, loss, l2: float, **options
    ) -> Any:
        """See :func:`curvature_sum` (the whole X, y on every process)."""
        n = len(X)
        if n < self.world_size:
            raise ValueError(
                f"X has {n} samples, fewer than the {self.world_size} processes: each needs one"
            )
        lo, hi = self.bounds(n)
        share = (hi - lo) / n
        # the engine takes the mean over its samples plus (l2/2)‖W‖²: weighting this share by
        # its fraction of the samples, with the whole L2 term on rank 0 only, gives the sum
        out = fn(model, X[lo:hi], y[lo:hi], loss, l2 / share if self.rank == 0 else 0.0, **options)
        tensors, rebuild = _flatten(out)
        summed = self.sum([t * share for t in tensors])
        return rebuild(list(summed))


def _flatten(obj: Any) -> tuple[list[Tensor], Callable[[list[Tensor]], Any]]:
    """The tensors of a tensor, list, tuple or dict of them, and the inverse."""
    if isinstance(obj, Tensor):
        return [obj], lambda ts: ts.pop(0)
    if isinstance(obj, (list, tuple)):
        parts = [_flatten(v) for v in obj]
        kind = type(obj)
        return [t for p, _ in parts for t in p], lambda ts: kind(r(ts) for _, r in parts)
    if isinstance(obj, dict):
        keys = list(obj)
        parts = [_flatten(obj[k]) for k in keys]
        return (
            [t for p, _ in parts for t in p],
            lambda ts: {k: r(ts) for k, (_, r) in zip(keys, parts)},
        )
    raise TypeError(f"cannot sum a {type(obj).__name__} over processes (tensors only)")


def curvature_sum(
    fn: Callable[..., Any],
    model,
    X: Tensor,
    y: Tensor,
    loss: Any = "cross_entropy",
    l2: float = 0.0,
    *,
    group: Any = None,
    **options: Any,
) -> Any:
    """``fn(model, X, y, loss, l2, **options)`` of the exact curvature engine (a sum over the
    samples divided by their number, plus the L2 term), computed by every process on its
    share of (X, y) and summed: the same result as one process on all of X, y.

    Every process passes the same X and y. Works for ``hessian``, ``ggn``,
    ``hessian_diagonal``, ``ggn_diagonal``, ``layer_hessians`` and ``hessian_blocks``. In a
    single process (no group given, none initialised) it is ``fn`` itself, so a script
    written for torchrun also runs without it."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return fn(model, X, y, loss, l2, **options)
    return Shard.of_group(group).curvature(fn, model, X, y, loss, l2, **options)


# ----------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------
def data_parallel(objective, *, group: Any = None):
    """Make a :class:`~secondorder.objective.ModelObjective` data-parallel over ``group``
    (the default process group when None) and return it: its evaluations then use this
    process's share of each batch and sum over the processes (see the module doc).

    Every process must pass an equal objective: its X, y, θ₀, loss, L2 and samplers are
    compared across the processes first (:func:`agree`), and a difference raises
    :class:`RanksDisagree` on every process."""
    from secondorder.objective import ModelObjective

    if not isinstance(objective, ModelObjective):
        raise TypeError(
            "data_parallel needs a ModelObjective (a sum over samples), got "
            f"{type(objective).__name__}"
        )
    shard = Shard.of_group(group)
    agree(
        {
            "data (a digest of X and y)": tensor_digest(objective.X, objective.y),
            "initial θ (the model's parameters)": tensor_digest(objective.initial_theta()),
            "objective (loss, L2, samplers)": _settings(objective),
        },
        group=group,
    )
    objective.data_parallel = shard
    return objective


def from_environment(objective):
    """The objective, data-parallel when this process is one of several (a group initialised,
    or ``WORLD_SIZE`` > 1: then :func:`init` joins it); unchanged otherwise, and unchanged when
    it is not a sum over samples (every process then computes the same numbers)."""
    from secondorder.objective import ModelObjective

    if not isinstance(objective, ModelObjective):
        return objective
    if not init(device=objective.device) or dist.get_world_size() == 1:
        return objective
    return data_parallel(objective)


class NullTrace:
    """Stands for a trace file on processes that do not write (see :func:`is_writer`)."""

    def open(self) -> None:
        pass

    def append(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def finish(self, rows: list[dict[str, Any]]) -> None:
        pass

    def sync(self) -> None:
        pass

    def digest(self) -> str:
        """Nothing was written, so nothing to fingerprint (such processes save no checkpoint)."""
        return ""

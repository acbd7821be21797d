"""Checkpoints: what a solver needs to continue exactly where it stopped.

A checkpoint (``checkpoints/<solver>.pt``, written atomically with :func:`io.torch_save`) holds
θ, the solver's state, the iteration, whether the solver finished, the RNG states (torch,
NumPy's and Python's global generators and a noisy objective's own), the objective's evaluation
counts and sampling state, and the time spent so far. Everything is a tensor, number, string,
list or dict, so checkpoints load with ``weights_only=True``.

Three records make a checkpoint safe to trust:

- **identity** (``identity``: the solver's name and method, the cell and the SHA-256 of the
  resolved spec): a checkpoint copied from another solver, cell or run is refused;
- **integrity** (``digest``: a SHA-256 over every other field, tensors byte by byte): a file the
  safe loader can still parse but whose content was altered is refused;
- **the trace** by reference, not by copy (``n_rows`` and ``rows_sha256``, the SHA-256 of the
  first ``n_rows`` lines of ``trace/<solver>.jsonl``): the trace file is appended and flushed
  row by row and ``fsync``-ed before each checkpoint, so a checkpoint costs O(θ), not O(k), and
  ``checkpoint_every = 1`` stays linear in the run's length. Checkpoints of the first format,
  which embed the rows (``rows``), still load, but only with their digest: a checkpoint without
  one is refused, whatever its format, since nothing would show that it is what was saved.

Every refusal is a :class:`~secondorder.experiments.io.CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secondorder.experiments import io
from secondorder.experiments.rundir import FORMAT, lines_digest

__all__ = [
    "Checkpoint",
    "content_digest",
    "counters",
    "restore_counters",
    "rng_state",
    "seed_globals",
    "set_rng_state",
]


def rng_state(noise: torch.Generator | None) -> dict[str, Any]:
    """RNG states as tensors, lists and numbers, so checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - legacy global
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [
            str(name),
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "python": [int(version), torch.tensor(internal, dtype=torch.int64), gauss],
    }
    if noise is not None:
        state["noise"] = noise.get_state()
    return state


def seed_globals(*key: Any) -> None:
    """Seed torch's, NumPy's and Python's global generators from ``key`` (e.g. the cell's seed
    and the solver's name), so that a solver's run does not depend on what ran before it in
    the same process."""
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:4], "little")
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the legacy global generator is what users' code reads
    random.seed(seed)


def set_rng_state(state: dict[str, Any], noise: torch.Generator | None) -> None:
    """Restore what :func:`rng_state` returned (keys that are missing are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        keys = np.asarray(keys.numpy() if isinstance(keys, torch.Tensor) else keys, np.uint32)
        np.random.set_state((name, keys, pos, has_gauss, cached))  # noqa: NPY002
    if "python" in state:
        version, internal, gauss = state["python"]
        internal = internal.tolist() if isinstance(internal, torch.Tensor) else internal
        random.setstate((version, tuple(int(v) for v in internal), gauss))
    if noise is not None and "noise" in state:
        noise.set_state(state["noise"])


def counters(obj) -> dict[str, Any]:
    """The objective's evaluation counts and sampling state (its public ``counts`` and
    ``sampling_state()``), for a checkpoint."""
    # the checkpoint keys keep their historical names so that older run directories resume
    state = obj.sampling_state()
    return {
        "counts": obj.counts.as_dict(),
        "_evaluations": state["evaluations"],
        "_iteration": state["iteration"],
    }


def restore_counters(obj, saved: dict[str, Any]) -> None:
    """Put back the evaluation counts and the sampling state saved by :func:`counters`."""
    for k, v in (saved.get("counts") or {}).items():
        if hasattr(obj.counts, k):
            setattr(obj.counts, k, v)
    obj.load_sampling_state(
        {key: saved[f"_{key}"] for key in ("evaluations", "iteration") if f"_{key}" in saved}
    )


def _feed(h: Any, value: Any) -> None:
    """Feed a canonical, type-tagged encoding of ``value`` to the hash ``h``."""
    if value is None or isinstance(value, bool):
        h.update(b"N" if value is None else (b"T" if value else b"F"))
    elif isinstance(value, int):
        h.update(b"i%d;" % value)
    elif isinstance(value, float):
        # the bit pattern: equal floats hash equal, and NaN is not a special case
        h.update(b"f" + struct.pack("<d", value) if not math.isnan(value) else b"fnan")
    elif isinstance(value, str):
        data = value.encode("utf-8")
        h.update(b"s%d;" % len(data) + data)
    elif isinstance(value, bytes):
        h.update(b"b%d;" % len(value) + value)
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"t{t.dtype};{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        h.update(b"d%d;" % len(value))
        for key in sorted(value, key=str):
            _feed(h, str(key))
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(b"l%d;" % len(value))
        for item in value:
            _feed(h, item)
    else:
        raise TypeError(f"a checkpoint cannot hold a {type(value).__name__}")


def content_digest(value: Any) -> str:
    """SHA-256 of a checkpoint's content: dicts by sorted key, tensors by dtype, shape and
    bytes, numbers by value. Two contents have the same digest only if they are equal."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


@dataclass
class Checkpoint:
    """One solver's saved progress (see the module doc for what each field holds).

    ``rows`` are the trace rows up to the checkpoint: they are written to the trace file, and
    only their count and digest (``rows_sha256``) to the checkpoint. ``summary`` is the
    solver's summary entry once it finished, so that a resume can rewrite summary.json.
    """

    theta: torch.Tensor
    state: Any = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    iteration: int = 0
    finished: bool = False
    metrics_time: float = 0.0
    wall_time: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    objective: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    rows_sha256: str = ""
    summary: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        """Write the checkpoint atomically (the trace file must already hold ``rows``)."""
        content = {
            "format": FORMAT,
            "iteration": self.iteration,
            "theta": self.theta.detach().cpu(),
            "state": self.state,
            "n_rows": len(self.rows),
            "rows_sha256": self.rows_sha256,
            "finished": self.finished,
            "rng": self.rng,
            "objective": self.objective,
            "metrics_time": self.metrics_time,
            "wall_time": self.wall_time,
            "result": self.result,
            "summary": self.summary,
            "identity": self.identity,
        }
        content["digest"] = content_digest(content)
        io.torch_save(path, content)

    @classmethod
    def load(
        cls,
        path: Path,
        identity: Mapping[str, Any] | None = None,
        trace_lines: list[str] | None = None,
    ) -> Checkpoint | None:
        """The checkpoint at ``path``, or None when there is none yet.

        Refused with a :class:`CheckpointError` naming the file: content that does not match
        its digest, an ``identity`` other than the one expected, and a trace (``trace_lines``,
        the complete lines of the solver's trace file) whose first rows are not those the
        checkpoint was taken with. Without ``trace_lines`` the rows are left empty (for
        readers that want θ only).
        """
        if not path.is_file():
            return None
        ckpt = io.torch_load(path)
        if not isinstance(ckpt, dict) or "theta" not in ckpt or "iteration" not in ckpt:
            raise io.CheckpointError(f"{path} is not a secondorder checkpoint (no θ or iteration)")
        _check_digest(path, ckpt)
        _check_identity(path, ckpt.get("identity"), identity)
        if trace_lines is None:  # θ and state only: the rows are not wanted, nor checked
            rows = list(ckpt.get("rows", []))
        else:
            rows = _rows_of(path, ckpt, trace_lines)
        return cls(
            theta=ckpt["theta"],
            state=ckpt["state"],
            rows=rows,
            iteration=int(ckpt["iteration"]),
            finished=bool(ckpt.get("finished")),
            metrics_time=float(ckpt.get("metrics_time", 0.0)),
            wall_time=float(ckpt.get("wall_time", 0.0)),
            result=dict(ckpt.get("result", {})),
            rng=ckpt.get("rng", {}),
            objective=ckpt.get("objective", {}),
            identity=dict(ckpt.get("identity") or {}),
            rows_sha256=str(ckpt.get("rows_sha256", "")),
            summary=dict(ckpt.get("summary") or {}),
        )


def _check_digest(path: Path, ckpt: dict[str, Any]) -> None:
    if "digest" not in ckpt:
        raise io.CheckpointError(
            f"{path} has no digest, so nothing shows that its content is what was saved (a "
            "checkpoint is trusted only with its SHA-256); delete it to restart that solver "
            "from scratch"
        )
    content = {k: v for k, v in ckpt.items() if k != "digest"}
    try:
        ok = content_digest(content) == ckpt["digest"]
    except TypeError:
        ok = False
    if not ok:
        raise io.CheckpointError(
            f"{path}: the content does not match its digest (the file was altered or damaged); "
            "delete it to restart that solver from scratch"
        )


def _check_identity(path: Path, saved: Any, expected: Mapping[str, Any] | None) -> None:
    if not expected or not saved:
        return  # a checkpoint of the first format records no identity
    diff = [
        f"{key} {saved.get(key)!r} (expected {value!r})"
        for key, value in expected.items()
        if key in saved and saved.get(key) != value
    ]
    if diff:
        raise io.CheckpointError(
            f"{path} belongs to another solver or run: " + "; ".join(diff) + " — a checkpoint "
            "cannot be moved between solvers, cells or specs; delete it to restart that solver"
        )


def _rows_of(path: Path, ckpt: dict[str, Any], lines: list[str]) -> list[dict[str, Any]]:
    """The trace rows the checkpoint was taken with: embedded (first format) or the first
    ``n_rows`` lines of the trace file, checked against the digest."""
    if "rows" in ckpt:
        return list(ckpt["rows"])
    n = int(ckpt.get("n_rows", 0))
    if len(lines) < n or lines_digest(lines[:n]) != ckpt.get("rows_sha256"):
        raise io.CheckpointError(
            f"{path}: the trace file holds {len(lines)} rows that do not match the {n} this "
            "checkpoint was taken with (the trace was edited, truncated or replaced); restore "
            "it, or delete the checkpoint to restart that solver from scratch"
        )
    return [json.loads(line) for line in lines[:n]]

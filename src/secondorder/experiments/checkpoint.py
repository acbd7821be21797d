"""Checkpoints: what a solver needs to continue exactly where it stopped.

A checkpoint (``checkpoints/<solver>.pt``, written atomically with :func:`io.torch_save`) holds
θ, the solver's state, the iteration, the trace rows so far, whether the solver finished, the
RNG states (torch, NumPy's and Python's global generators and a noisy objective's own), the
objective's evaluation counts and sampling state, and the time spent so far. Everything is a
tensor, number, string, list or dict, so checkpoints load with ``weights_only=True``. The keys
are those of the first format, so older run directories still resume.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secondorder.experiments import io
from secondorder.experiments.rundir import FORMAT

__all__ = ["Checkpoint", "counters", "restore_counters", "rng_state", "set_rng_state"]


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


@dataclass
class Checkpoint:
    """One solver's saved progress (see the module doc for what each field holds)."""

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

    def save(self, path: Path) -> None:
        io.torch_save(
            path,
            {
                "format": FORMAT,
                "iteration": self.iteration,
                "theta": self.theta.detach().cpu(),
                "state": self.state,
                "rows": self.rows,
                "finished": self.finished,
                "rng": self.rng,
                "objective": self.objective,
                "metrics_time": self.metrics_time,
                "wall_time": self.wall_time,
                "result": self.result,
            },
        )

    @classmethod
    def load(cls, path: Path) -> Checkpoint | None:
        """The checkpoint at ``path``, or None when there is none yet."""
        if not path.is_file():
            return None
        ckpt = io.torch_load(path)
        return cls(
            theta=ckpt["theta"],
            state=ckpt["state"],
            rows=list(ckpt["rows"]),
            iteration=int(ckpt["iteration"]),
            finished=bool(ckpt.get("finished")),
            metrics_time=float(ckpt.get("metrics_time", 0.0)),
            wall_time=float(ckpt.get("wall_time", 0.0)),
            result=dict(ckpt.get("result", {})),
            rng=ckpt.get("rng", {}),
            objective=ckpt.get("objective", {}),
        )

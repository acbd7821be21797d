"""What the runner records: trace rows from the solvers' per-iteration information, and the
summary entry of a solver's result (both written to the run directory by :mod:`.rundir`)."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch

from secondorder._format import format_number

__all__ = ["final_metrics", "one_line", "result_summary", "row_from_info", "theta_from_info"]


def _num(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else None
    if isinstance(v, (np.generic,)):
        return v.item()
    return v


_ROW_KEYS = ("k", "f", "grad_norm", "step", "nfev", "ngev", "nhev", "time")
# Left out of trace rows: tensors and objects, and the solver's per-row "changed" flag, which
# minimize(..., initial_state=...) does not set on the first row after a resume (the number of
# changes is in the summary as objective_changes), so it would break trace equality.
_SKIP_INFO = frozenset(
    ("theta", "x", "g", "grad", "d", "direction", "state", "objective", "method", "changed")
)


def row_from_info(info: Any) -> dict[str, Any]:
    """A JSON-friendly trace row from the solver's per-iteration information."""
    if not isinstance(info, dict):
        info = {k: getattr(info, k) for k in dir(info) if not k.startswith("_")}
    row: dict[str, Any] = {}
    for k, v in info.items():
        if k in _SKIP_INFO:
            continue
        v = _num(v)
        if isinstance(v, (bool, int, float, str)) or v is None:
            row[k] = v
    if "k" not in row:
        for alias in ("nit", "iteration"):
            if alias in row:
                row["k"] = row[alias]
                break
    ordered = {k: row[k] for k in _ROW_KEYS if k in row}
    ordered.update({k: v for k, v in row.items() if k not in ordered})
    return ordered


def theta_from_info(info: Any) -> torch.Tensor | None:
    for key in ("theta", "x"):
        v = info.get(key) if isinstance(info, dict) else getattr(info, key, None)
        if isinstance(v, torch.Tensor):
            return v
    return None


def result_summary(res, method: str, max_iter: int) -> dict[str, Any]:
    message = str(getattr(res, "message", ""))
    if getattr(res, "status", "") == "max_iter":  # the segment's budget → the run's
        message = re.sub(
            r"maximum number of iterations \(\d+\) reached",
            f"maximum number of iterations ({max_iter}) reached",
            message,
        )
    status = getattr(res, "status", "")
    if (
        method.startswith("scipy:")
        and status == "failed"
        and int(getattr(res, "nit", 0)) >= max_iter
    ):
        status = "max_iter"  # scipy's "maximum number of iterations" is not a failure here
    out = {
        "status": status,
        "message": message,
        "success": bool(getattr(res, "success", False)),
        "nit": int(getattr(res, "nit", 0)),
        "nfev": int(getattr(res, "nfev", 0)),
        "ngev": int(getattr(res, "ngev", 0)),
        "nhev": int(getattr(res, "nhev", 0)),
        "f": float(getattr(res, "f", math.nan)),
        "grad_norm": float(getattr(res, "grad_norm", math.nan)),
    }
    for flag in ("negative_curvature", "nonfinite", "objective_changes"):
        if hasattr(res, flag):
            v = getattr(res, flag)
            out[flag] = v if isinstance(v, (bool, int)) else bool(v)
    return out


def final_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in reversed(rows):
        for k, v in r.items():
            if k not in out and k not in ("x",) and isinstance(v, (int, float)):
                out[k] = v
    return out


def one_line(name: str, cell_id: str, s: dict[str, Any]) -> str:
    """The line a finished solver logs: status, iterations, f, final metrics, seconds."""
    final = s.get("final", {})
    bits = [f"{name}: {s.get('status', '?')} after {s.get('nit', 0)} it."]
    f = final.get("f", s.get("f"))  # the last recorded iteration's f, as the report shows
    if f is not None:
        bits.append(f"f={format_number(f, 6)}")
    for key in ("train_loss", "train_accuracy", "dev_accuracy", "test_accuracy"):
        if key in final:
            bits.append(f"{key}={format_number(final[key], 4)}")
    if "solver_time" in s:
        bits.append(f"{format_number(s['solver_time'], 3)}s")
    prefix = "" if cell_id == "main" else f"[{cell_id}] "
    return prefix + ", ".join(bits)

"""Atomic file writes for run directories: JSON, CSV, text and torch files.

Every whole-file write goes through :func:`secondorder.data.download.atomic_write`: a temporary
file in the destination directory, flushed and ``fsync``-ed, then renamed onto the final name
with :func:`os.replace`. A crash, a ``SIGKILL`` or an exception in the middle of a write
therefore leaves either the old file or the new one, never a mixture.

Traces are JSON Lines files appended one row at a time (:func:`append_jsonl`); a line cut short by
a crash is ignored by :func:`read_jsonl` and the runner rewrites the file from its checkpoint on
resume.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secondorder.data.download import atomic_write, atomic_write_bytes, fsync_directory
from secondorder.errors import EnvironmentFault

__all__ = [
    "append_jsonl",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_directory",
    "jsonl_line",
    "read_json",
    "read_jsonl",
    "read_lines",
    "to_jsonable",
    "torch_load",
    "CheckpointError",
    "torch_save",
    "write_csv",
    "write_json",
    "write_jsonl",
]


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text), binary=False)


def to_jsonable(value: Any) -> Any:
    """A JSON-friendly copy: tensors and NumPy values become numbers or lists, paths strings."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 and value.ndim == 0 else value.tolist()
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _dumps(value: Any, indent: int | None) -> str:
    # NaN and inf are written as the JavaScript literals Python's json module reads back.
    return json.dumps(to_jsonable(value), indent=indent, allow_nan=True)


def write_json(path: str | os.PathLike[str], value: Any, *, indent: int | None = 2) -> Path:
    """Write ``value`` as JSON atomically (tensors and NumPy values converted)."""
    return atomic_write_text(path, _dumps(value, indent) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows as JSON Lines atomically (the whole file at once)."""
    text = "".join(jsonl_line(r) for r in rows)
    return atomic_write_text(path, text)


def jsonl_line(row: Mapping[str, Any]) -> str:
    """One row as the JSON Lines line the writers write (newline included)."""
    return _dumps(row, None) + "\n"


def append_jsonl(handle: io.TextIOBase, row: Mapping[str, Any], *, fsync: bool = False) -> str:
    """Append one row to an open JSON Lines file and flush it (``fsync`` on request); return
    the line written."""
    line = jsonl_line(row)
    handle.write(line)
    handle.flush()
    if fsync:
        os.fsync(handle.fileno())
    return line


def read_lines(path: str | os.PathLike[str]) -> list[str]:
    """The complete lines of a text file (each with its newline); a last line cut short by a
    crash (no newline) is left out."""
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    return [line + "\n" for line in lines[:-1]]


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file; a last line cut short by a crash is skipped."""
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # the unterminated last line of an interrupted append
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return rows


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(to_jsonable(value))
    return to_jsonable(value)


def write_csv(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
) -> Path:
    """Write rows as CSV atomically; columns default to the union of keys in first-seen order."""
    if columns is None:
        seen: dict[str, None] = {}
        for r in rows:
            for k in r:
                seen.setdefault(k, None)
        columns = list(seen)

    def write(f) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([_csv_cell(r.get(c, "")) for c in columns])

    return atomic_write(path, write, binary=False)


def torch_save(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save`` atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f), binary=True)


class CheckpointError(EnvironmentFault, ValueError):
    """A run file the safe loader cannot read: truncated, corrupted, or not the runner's."""


def torch_load(path: str | os.PathLike[str]) -> Any:
    """Load a file written by :func:`torch_save` with the safe ``weights_only`` loader only.

    Checkpoints written by the runner hold only tensors, numbers, strings, lists and dicts.
    Anything else (a truncated or corrupted file, or one holding arbitrary objects, which the
    full unpickler would execute) is refused with a :class:`CheckpointError` naming the file:
    run directories are shared, and loading one must never run code from it.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # every failure of the safe loader; never fall back to pickle
        first = (str(err).strip().splitlines() or [""])[0][:200]
        if "weights only load failed" in first.lower():  # torch's text advises the unsafe loader
            first = "it holds objects the safe loader refuses, or is not a torch file at all"
        raise CheckpointError(
            f"{os.fspath(path)} is not a checkpoint this library can load safely "
            f"({type(err).__name__}: {first}); it is truncated, corrupted or was not written "
            "by secondorder — delete it to restart that solver from scratch"
        ) from None

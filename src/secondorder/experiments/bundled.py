"""Where specs come from: a file path or a bundled name such as ``paper/fashion-mnist``
(the TOML files under ``secondorder/experiments/specs``)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from secondorder._validation import closest
from secondorder.experiments.schema import SpecNotFoundError
from secondorder.experiments.spec_toml import read_toml

__all__ = ["bundled_specs", "load_raw", "resolve_spec_path"]


def bundled_specs() -> dict[str, Path]:
    """Every bundled spec: ``{'paper/rosenbrock': path, ...}``."""
    root = resources.files("secondorder.experiments") / "specs"
    out: dict[str, Path] = {}
    base = Path(str(root))
    if not base.is_dir():
        return out
    for p in base.rglob("*.toml"):
        out[p.relative_to(base).with_suffix("").as_posix()] = p
    # sorted by name, not by file name: paper/fashion-mnist before paper/fashion-mnist-init
    return dict(sorted(out.items()))


def resolve_spec_path(name: str) -> Path:
    """A spec file path from a path or a bundled name (``paper/fashion-mnist``)."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    bundled = bundled_specs()
    key = name[:-5] if name.endswith(".toml") else name
    if key in bundled:
        return bundled[key]
    if p.suffix == ".toml" or os.sep in name and not key.startswith("paper/"):
        raise SpecNotFoundError(f"spec file {name} not found")
    raise SpecNotFoundError(
        f"{name!r} is neither a spec file nor a bundled spec; bundled specs are "
        f"{sorted(bundled)}{closest(key, bundled)} (see `secondorder list`)"
    )


def load_raw(name: str) -> tuple[dict[str, Any], str]:
    """The raw (unvalidated) spec and its source: the bundled name, or the file path."""
    path = resolve_spec_path(name)
    bundled = {v: k for k, v in bundled_specs().items()}
    source = bundled.get(path, str(path))
    return read_toml(path), source

"""Experiments: TOML specs, run directories with checkpoints, and the seed study's specs.

- :mod:`~secondorder.experiments.spec` — specs (files or bundled names such as
  ``paper/fashion-mnist``), validation with key paths and suggestions, sweeps, suites; built on
  :mod:`.schema` (the field checker), :mod:`.spec_tables` (what a spec may contain),
  :mod:`.spec_solvers` (solver methods and option names), :mod:`.overrides`,
  :mod:`.spec_toml` and :mod:`.bundled`;
- :mod:`~secondorder.experiments.runner` — segmented solving with checkpoints, SIGINT/SIGTERM
  handling, exact resume; with :mod:`.problems` (objective, θ₀, metrics of a cell),
  :mod:`.noisy`, :mod:`.checkpoint`, :mod:`.environment`, :mod:`.progress` and :mod:`.rows`;
- :mod:`~secondorder.experiments.rundir` — the run directory's layout, writer and reader;
- :mod:`~secondorder.experiments.io` — atomic writes of JSON, CSV, text and torch files.

>>> from secondorder.experiments import load_spec, start_run      # doctest: +SKIP
>>> run_dir = start_run(load_spec("paper/rosenbrock"), "runs/rosenbrock")  # doctest: +SKIP
"""

from secondorder.experiments.runner import resume_run, start_run
from secondorder.experiments.spec import (
    Spec,
    SpecError,
    bundled_specs,
    load_spec,
    spec_from_dict,
)

__all__ = [
    "Spec",
    "SpecError",
    "bundled_specs",
    "load_spec",
    "resume_run",
    "spec_from_dict",
    "start_run",
]

"""Experiments: TOML specs, run directories with checkpoints, and the seed study bundled.

- :mod:`~secondorder.experiments.spec` — specs (files or bundled names such as
  ``paper/fashion-mnist``), validation with key paths and suggestions, sweeps, suites;
- :mod:`~secondorder.experiments.runner` — run directories, segmented solving with
  checkpoints, SIGINT/SIGTERM handling, exact resume, progress bars;
- :mod:`~secondorder.experiments.io` — atomic writes of JSON, CSV, text and torch files;
- :mod:`~secondorder.experiments.paper` — the seed's published numbers (Tables 1-4);
- :mod:`~secondorder.experiments.commands` — the ``run``, ``resume``, ``report``,
  ``compare`` and ``list`` subcommands.

>>> from secondorder.experiments import load_spec, start_run      # doctest: +SKIP
>>> run_dir = start_run(load_spec("paper/rosenbrock"), "runs/rosenbrock")  # doctest: +SKIP
"""

from secondorder.experiments.spec import (
    Spec,
    SpecError,
    bundled_specs,
    load_spec,
    spec_from_dict,
)


def start_run(*args, **kwargs):
    """See :func:`secondorder.experiments.runner.start_run`."""
    from secondorder.experiments.runner import start_run as _start

    return _start(*args, **kwargs)


def resume_run(*args, **kwargs):
    """See :func:`secondorder.experiments.runner.resume_run`."""
    from secondorder.experiments.runner import resume_run as _resume

    return _resume(*args, **kwargs)


__all__ = [
    "Spec",
    "SpecError",
    "bundled_specs",
    "load_spec",
    "resume_run",
    "spec_from_dict",
    "start_run",
]

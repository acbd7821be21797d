"""The experiment subcommands of the ``secondorder`` command line: where running
(:mod:`secondorder.experiments`) and reporting (:mod:`secondorder.report`) meet.

``add_commands(subparsers)`` adds:

- ``run SPEC [--run-dir DIR] [--quick] [--set KEY=VALUE ...]`` — validate, run, report;
- ``resume RUN`` — finish an interrupted run from its checkpoints;
- ``report RUN... [--out DIR] [--format png|svg]`` — figures and ``report.md`` from run
  directories;
- ``compare RUN1 RUN2 ... [--out DIR]`` — several runs side by side;
- ``list`` — the bundled specs with a one-line description.

The command bodies import the experiments and the report when they run, not when the parser is
built: those pull in SciPy and Matplotlib, about a second that ``secondorder --help`` need not
wait for.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_commands", "main"]


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _options(args: argparse.Namespace):
    from secondorder.distributed import is_writer
    from secondorder.experiments.runner import RunOptions

    if not is_writer():  # data-parallel: rank 0 shows progress and messages
        return RunOptions(progress=False, log=lambda msg: None)
    return RunOptions(progress=not getattr(args, "no_progress", False))


def _report_after(run_dir: Path, args: argparse.Namespace) -> None:
    from secondorder.distributed import is_writer
    from secondorder.report import write_report

    if getattr(args, "no_report", False) or not is_writer():
        return
    (path,) = write_report([run_dir], fmt=args.format)
    print(f"report: {path}")


def cmd_run(args: argparse.Namespace) -> int:
    from secondorder.experiments.runner import start_run
    from secondorder.experiments.spec import load_spec, parse_override

    overrides = args.set

    def start(options):
        spec = load_spec(
            args.spec, quick=args.quick, overrides=[parse_override(o) for o in overrides]
        )
        return start_run(spec, args.run_dir, options)

    return _drive(start, args)


def cmd_resume(args: argparse.Namespace) -> int:
    from secondorder.experiments.runner import resume_run

    return _drive(lambda options: resume_run(args.run, options), args)


def _drive(launch, args: argparse.Namespace) -> int:
    """Run or resume, turning interruptions and errors into exit codes; report afterwards."""
    from secondorder.distributed import PeerLost
    from secondorder.experiments.runner import Interrupted, RunErrors
    from secondorder.experiments.spec import SpecError

    code = 0
    try:
        run_dir = launch(_options(args))
    except Interrupted as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    except PeerLost as err:
        _err(f"{err} (`secondorder resume RUN`)")
        return 3
    except (SpecError, FileNotFoundError) as err:
        _err(str(err))
        return 2
    except RunErrors as err:
        _err(str(err))
        run_dir, code = err.run_dir, 1
    _report_after(run_dir, args)
    print(f"run directory: {run_dir}")
    return code


def cmd_report(args: argparse.Namespace) -> int:
    from secondorder.report import write_report

    try:
        paths = write_report(args.runs, args.out, fmt=args.format, epsilon=args.epsilon)
    except FileNotFoundError as err:
        _err(str(err))
        return 2
    for p in paths:
        print(f"report: {p}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from secondorder.report import write_comparison

    if len(args.runs) < 2:
        _err("compare needs at least two run directories")
        return 2
    out = args.out or "comparison"
    try:
        path = write_comparison(args.runs, out, fmt=args.format, epsilon=args.epsilon)
    except FileNotFoundError as err:
        _err(str(err))
        return 2
    print(f"comparison: {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from secondorder.experiments.spec import SpecError, bundled_specs, read_toml

    specs = bundled_specs()
    width = max((len(n) for n in specs), default=10)
    for name, path in specs.items():
        try:
            desc = read_toml(path).get("description", "")
        except SpecError as err:
            desc = f"(unreadable: {err})"
        print(f"{name:<{width}}  {desc}")
    return 0


def _add_output_options(p) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-report", action="store_true", help="do not write the report")
    p.add_argument("--format", choices=["png", "svg"], default="png", help="figure format")


def _add_report_options(p, out_help: str, epsilon_help: str | None) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--out", default=None, help=out_help)
    p.add_argument("--format", choices=["png", "svg"], default="png")
    p.add_argument("--epsilon", type=float, default=None, help=epsilon_help)


def add_commands(subparsers) -> None:
    """Add ``run``, ``resume``, ``report``, ``compare`` and ``list`` to a subparsers object."""
    p = subparsers.add_parser(
        "run",
        help="run an experiment spec (a TOML file or a bundled name such as paper/rosenbrock)",
        description="Validate SPEC, run every solver (and sweep point) into a run directory "
        "with traces and checkpoints, then write the report.",
    )
    p.add_argument("spec", help="a TOML file, or a bundled spec name (see `secondorder list`)")
    p.add_argument("--run-dir", default=None, help="where to write (default runs/<name>-<time>)")
    p.add_argument("--quick", action="store_true", help="apply the spec's [quick] overrides")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec value, e.g. --set max_iter=5 --set sampler.batch_size=100",
    )
    _add_output_options(p)
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser(
        "resume",
        help="finish an interrupted run from its checkpoints",
        description="Continue every unfinished solver of RUN from its last checkpoint; the "
        "trace is the same as that of an uninterrupted run.",
    )
    p.add_argument("run", help="the run directory")
    _add_output_options(p)
    p.set_defaults(func=cmd_resume)

    p = subparsers.add_parser(
        "report",
        help="write figures and report.md from run directories",
        description="Read run directories (never live objects) and write report.md with "
        "figures: to RUN/report unless --out is given.",
    )
    _add_report_options(p, "output directory", "ε of eq. 29 (default: spec's)")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser(
        "compare",
        help="put several runs side by side (one table, overlaid curves)",
    )
    _add_report_options(p, "output directory (default ./comparison)", None)
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser("list", help="list the bundled specs")
    p.set_defaults(func=cmd_list)


def main(argv=None) -> int:
    """Run the experiment subcommands on their own, without the rest of the command line."""
    parser = argparse.ArgumentParser(prog="secondorder")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_commands(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)

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
import warnings
from pathlib import Path

from secondorder.errors import SecondOrderError

__all__ = ["Formatter", "add_commands", "guarded", "main", "os_error_text", "progress_wanted"]

#: a sweep larger than this many cells needs an explicit --max-cells
MAX_CELLS = 1000


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default, except where there is none to show (None, a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # identity, not equality: a default of 0 or 0.0 equals False but is worth showing
        nothing = action.default is None or action.default is False or action.default == []
        if nothing or action.default is argparse.SUPPRESS or "%(default)" in text:
            return text
        return super()._get_help_string(action)


def _err(msg: str) -> None:
    print(f"secondorder: error: {msg}", file=sys.stderr)


def os_error_text(err: OSError) -> str:
    """``[Errno 28] No space left on device: 'f'`` → ``'f: no space left on device'``."""
    if not err.strerror:
        return str(err)
    what = err.strerror[0].lower() + err.strerror[1:]
    if err.filename is None:
        return what
    names = f"{err.filename} -> {err.filename2}" if err.filename2 else str(err.filename)
    return f"{names}: {what}"


def _one_line_warnings():
    """Warnings as one line each, ``secondorder: warning: ...`` (not Python's source
    location), every distinct message once."""
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if str(message) not in shown:
            shown.add(str(message))
            print(f"secondorder: warning: {message}", file=sys.stderr)

    return show


def guarded(func, args: argparse.Namespace) -> int:
    """Run a command. The library's own errors (:class:`~secondorder.errors.SecondOrderError`)
    and the system's (:class:`OSError`: a full disk, a file that cannot be written) become one
    line on stderr and exit status 2 (bad input) or 1 (the environment); anything else is a
    bug and keeps its traceback."""
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings()
        try:
            return int(func(args) or 0)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except SecondOrderError as err:
            if not getattr(err, "writer_only", False) or _writes():
                _err(str(err))  # said once, by rank 0, where every process raises it alike
            return err.exit_code
        except FileNotFoundError as err:  # a path named on the command line
            _err(os_error_text(err))
            return 2
        except OSError as err:
            _err(os_error_text(err))
            return 1


def _writes() -> bool:
    """Whether this process speaks for the others (rank 0, or a single process)."""
    from secondorder.distributed import is_writer

    try:
        return is_writer()
    except SecondOrderError:
        return True


def progress_wanted(args: argparse.Namespace) -> bool:
    """--progress / --no-progress, else progress when stderr is a terminal."""
    flag = getattr(args, "progress", None)
    if getattr(args, "no_progress", False):
        return False
    return sys.stderr.isatty() if flag is None else bool(flag)


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
    from secondorder.experiments.overrides import key_end
    from secondorder.experiments.runner import start_run
    from secondorder.experiments.spec import load_spec, parse_override

    # the command line's own arguments are refused as such, not as a fault of the spec
    bad = [o for o in args.set if key_end(o) is None]
    if bad:
        _err(f"--set {bad[0]!r}: expected KEY=VALUE, e.g. --set max_iter=5")
        return 2
    if args.max_cells < 1:
        _err(f"--max-cells: expected a positive integer, got {args.max_cells}")
        return 2
    overrides = [parse_override(o) for o in args.set]

    def start(options):
        spec = load_spec(args.spec, quick=args.quick, overrides=overrides, max_cells=args.max_cells)
        return start_run(spec, args.run_dir, options)

    return _drive(start, args)


def cmd_resume(args: argparse.Namespace) -> int:
    from secondorder.experiments.runner import resume_run

    return _drive(lambda options: resume_run(args.run, options), args)


def _drive(launch, args: argparse.Namespace) -> int:
    """Run or resume, turning interruptions, lost peers and failed solvers into exit codes;
    report afterwards (other errors are left to :func:`guarded`)."""
    from secondorder.distributed import PeerLost, check_environment
    from secondorder.experiments.runner import Interrupted, RunErrors

    check_environment()  # a bad WORLD_SIZE, RANK or timeout: one refusal, before any work
    code = 0
    try:
        run_dir = launch(_options(args))
    except Interrupted as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    except PeerLost as err:
        _err(f"{err} (`secondorder resume RUN`)")
        return 3
    except RunErrors as err:
        _err(str(err))
        run_dir, code = err.run_dir, 1
    _report_after(run_dir, args)
    print(f"run directory: {run_dir}")
    return code


def _unwritable(err: PermissionError) -> int:
    _err(f"{os_error_text(err)}; write the report elsewhere with --out DIR")
    return 1


def cmd_report(args: argparse.Namespace) -> int:
    from secondorder.report import write_report

    try:
        paths = write_report(args.runs, args.out, fmt=args.format, epsilon=args.epsilon)
    except PermissionError as err:
        return _unwritable(err)
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
    except PermissionError as err:
        return _unwritable(err)
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


def _add_report_options(p, out_help: str, epsilon_help: str) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--out", default=None, help=out_help)
    p.add_argument("--format", choices=["png", "svg"], default="png", help="figure format")
    p.add_argument("--epsilon", type=float, default=None, help=epsilon_help)


def _parser(subparsers, name: str, help: str, description: str):
    return subparsers.add_parser(
        name, help=help, description=description, formatter_class=Formatter
    )


def _add_run_command(subparsers) -> None:
    p = _parser(
        subparsers,
        "run",
        "run an experiment spec (a TOML file or a bundled name such as paper/rosenbrock)",
        "Validate SPEC, run every solver (and sweep point) into a run directory with traces "
        "and checkpoints, then write the report. Ctrl-C stops after the current iteration; "
        "`secondorder resume RUN_DIR` continues.",
    )
    p.add_argument("spec", help="a TOML file, or a bundled spec name (see `secondorder list`)")
    p.add_argument("--run-dir", default=None, help="where to write (default runs/<name>-<time>)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="apply the spec's [quick] overrides (a warning when it has none)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec value, e.g. --set max_iter=5 --set sampler.batch_size=100",
    )
    p.add_argument(
        "--max-cells",
        type=int,
        default=MAX_CELLS,
        metavar="N",
        help="refuse, before any work, a grid of more than N cells (sweep points × seeds)",
    )
    _add_output_options(p)
    p.set_defaults(func=cmd_run)


def add_commands(subparsers) -> None:
    """Add ``run``, ``resume``, ``report``, ``compare`` and ``list`` to a subparsers object."""
    _add_run_command(subparsers)
    p = _parser(
        subparsers,
        "resume",
        "finish an interrupted run from its checkpoints",
        "Continue every unfinished solver of RUN from its last checkpoint (and retry the "
        "failed ones); the trace is the same as that of an uninterrupted run.",
    )
    p.add_argument("run", help="the run directory")
    _add_output_options(p)
    p.set_defaults(func=cmd_resume)

    p = _parser(
        subparsers,
        "report",
        "write figures and report.md from run directories",
        "Read run directories (never live objects) and write report.md with figures: to "
        "RUN/report unless --out is given.",
    )
    _add_report_options(
        p,
        "output directory (default: RUN/report)",
        "ε of eq. 29: the convergence iteration k_ε of the tables is the first k with "
        "|f_k − f_{k−1}| ≤ ε (default: the spec's report.epsilon, 1e-6 unless set)",
    )
    p.set_defaults(func=cmd_report)

    p = _parser(
        subparsers,
        "compare",
        "put several runs side by side (one table, overlaid curves)",
        "Read two or more run directories and write one report with their results in one "
        "table and their curves overlaid.",
    )
    _add_report_options(
        p,
        "output directory (default: ./comparison)",
        "ε of eq. 29 for k_ε, the first k with |f_k − f_{k−1}| ≤ ε (default: each run's own "
        "report.epsilon)",
    )
    p.set_defaults(func=cmd_compare)

    p = _parser(
        subparsers,
        "list",
        "list the bundled specs",
        "Print every bundled spec (a name for `secondorder run`) with its one-line description.",
    )
    p.set_defaults(func=cmd_list)


def main(argv=None) -> int:
    """Run the experiment subcommands on their own, without the rest of the command line."""
    parser = argparse.ArgumentParser(prog="secondorder", formatter_class=Formatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_commands(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return guarded(args.func, args)

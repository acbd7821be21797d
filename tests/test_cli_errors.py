"""The command line and the spec checker: one-line errors instead of tracebacks, help on every
command, warnings before work that cannot be what was meant."""

from __future__ import annotations

import argparse
import copy
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from secondorder import cli
from secondorder.data import download
from secondorder.errors import EnvironmentFault, InvalidValueError, ModeNote, SecondOrderError
from secondorder.experiments.io import CheckpointError
from secondorder.experiments.problems import DataCache, build_problem
from secondorder.experiments.progress import RunProgress, warning_line
from secondorder.experiments.runner import RunOptions, start_run
from secondorder.experiments.schema import RunDirError, SpecNotFoundError, SpecWarning
from secondorder.experiments.spec import SpecError, load_raw, load_spec, spec_from_dict
from secondorder.linalg import MemoryError_

QUIET = RunOptions(progress=False, log=lambda msg: None)

LOGISTIC = """\
name = "t"
max_iter = 3
metrics = ["train_loss"]
[data]
kind = "two-class-2d"
n_train = 100
n_test = 20
[model]
kind = "logistic"
[[solvers]]
method = "lbfgs"
"""


def _run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _spec_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('metrics = ["train_loss"]', 'metrics = ["train_loss", 3]', "metrics: expected a list"),
        ('metrics = ["train_loss"]', "sweep = [1, 2]", "sweep: expected a table, got a list"),
        ('kind = "logistic"', 'kind = ["logistic"]', "model.kind: expected a string"),
        ('metrics = ["train_loss"]', "seeds = [[1]]", "seeds: expected a list of integers"),
    ],
)
def test_spec_type_errors_name_their_key(tmp_path, capsys, old, new, expected):
    path = _spec_file(tmp_path, LOGISTIC.replace(old, new))
    code, err = _run_cli(capsys, "run", path, "--run-dir", str(tmp_path / "run"))
    assert code == 2 and expected in err and err.startswith("secondorder: error: invalid spec")
    assert not (tmp_path / "run").exists()


TORCH_SOLVERS_THAT_CANNOT_SERVE = [
    ('method = "torch:LBFGS"\noptions = { history_size = 0 }', "history_size must be an"),
    ('method = "torch:SparseAdam"', "SparseAdam cannot serve here"),
    ('method = "torch:Adam"\noptions = { capturable = true }', "capturable=True needs"),
    ('method = "torch:Adam"\noptions = { betas = [0.9, 0.99, 0.1] }', "betas must be a list"),
    ('method = "torch:Adam"\noptions = { maximize = "false", lr = 0.1 }', "maximize must"),
    ('method = "torch:SGD"\noptions = { lr = inf }', "lr must be a finite number"),
]


def test_torch_options_that_cannot_serve_are_refused_before_the_run_directory(tmp_path, capsys):
    for solver, expected in TORCH_SOLVERS_THAT_CANNOT_SERVE:
        path = _spec_file(tmp_path, LOGISTIC.replace('method = "lbfgs"', solver))
        code, err = _run_cli(capsys, "run", path, "--run-dir", str(tmp_path / "run"))
        assert code == 2 and expected in err and "solvers[0]" in err, err
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / "run").exists()
    # the same optimiser with options of the right types runs (lists become tuples)
    good = 'method = "torch:Adam"\noptions = { betas = [0.8, 0.99], amsgrad = true, lr = 0.01 }'
    path = _spec_file(tmp_path, LOGISTIC.replace('method = "lbfgs"', good))
    assert _run_cli(capsys, "run", path, "--run-dir", str(tmp_path / "ok"))[0] == 0


def test_a_spec_nested_thousands_deep_is_refused_in_one_line(tmp_path, capsys):
    deep_array = "[" * 5000 + "]" * 5000
    deep_table = "{a = " * 5000 + "1" + "}" * 5000
    cases = [
        (
            LOGISTIC.replace(
                'method = "lbfgs"', f'method = "lbfgs"\noptions = {{ m = {deep_array} }}'
            ),
            [],
        ),
        (LOGISTIC.replace("max_iter = 3", f"max_iter = 3\nfoo = {deep_table}"), []),
        (LOGISTIC.replace("max_iter = 3", "max_iter = 3\nfoo = " + "[" * 40 + "]" * 40), []),
        (LOGISTIC, ["--set", f"foo={deep_array}"]),
        (LOGISTIC, ["--set", ".".join(["a"] * 5000) + "=1"]),
    ]
    for text, extra in cases:
        path = _spec_file(tmp_path, text)
        code, err = _run_cli(capsys, "run", path, "--run-dir", str(tmp_path / "run"), *extra)
        assert code == 2 and "nested" in err and "32" in err, err[:500]
        assert len(err.strip().splitlines()) == 1 and len(err) < 400
        assert not (tmp_path / "run").exists()
    with pytest.raises(SpecError, match=r"foo\[0\]\[0\].*nested deeper than 32 levels"):
        deep: list = []
        for _ in range(5000):
            deep = [deep]
        spec_from_dict({**load_raw(path)[0], "foo": deep})


def _paths(d, pre=()):
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        yield (*pre, k)
        yield from _paths(v, (*pre, k))


@pytest.mark.parametrize("name", ["paper/logistic-fixed", "paper/fashion-mnist-minibatch"])
def test_no_wrongly_typed_value_crashes_the_checker(name):
    """Every key of a bundled spec replaced by values of other types: a SpecError whose every
    problem starts with a key path, never another exception."""
    raw, source = load_raw(name)
    for path in list(_paths(raw)):
        for bad in (3, "x", [1], ["a", 2], {"a": 1}, [[1]], True, [{"a": 1}]):
            r = copy.deepcopy(raw)
            target = r
            for k in path[:-1]:
                target = target[k]
            target[path[-1]] = bad
            try:
                spec_from_dict(r, source, quick=True, overrides=[("solvers.options.memory", 5)])
            except SpecError as err:
                assert all(e and not e.startswith(":") for e in err.errors), err.errors


def test_files_not_found_and_used_run_dirs_are_not_invalid_specs(tmp_path, capsys):
    code, err = _run_cli(capsys, "run", str(tmp_path / "nonexist.toml"))
    assert code == 2 and "spec file" in err and "not found" in err and "invalid spec" not in err
    with pytest.raises(SpecNotFoundError):
        load_spec(str(tmp_path / "nonexist.toml"))
    path = _spec_file(tmp_path, LOGISTIC)
    start_run(load_spec(path), tmp_path / "run", QUIET)
    code, err = _run_cli(capsys, "run", path, "--run-dir", str(tmp_path / "run"))
    assert code == 2 and "already holds a run" in err and "invalid spec" not in err
    with pytest.raises(RunDirError):
        start_run(load_spec(path), tmp_path / "run", QUIET)


@pytest.fixture
def finished_run(tmp_path):
    run = tmp_path / "run"
    start_run(load_spec(_spec_file(tmp_path, LOGISTIC)), run, QUIET)
    return run


@pytest.mark.parametrize("command", ["report", "resume", "compare"])
def test_damaged_summary_is_refused_with_its_name(finished_run, capsys, command):
    other = finished_run.parent / "other"
    shutil.copytree(finished_run, other)
    (finished_run / "summary.json").write_text("[1, 2]\n")
    argv = [command, str(finished_run)] + ([str(other)] if command == "compare" else [])
    if command == "compare":
        argv += ["--out", str(finished_run.parent / "cmp")]
    code, err = _run_cli(capsys, *argv)
    assert code == 1 and "summary.json" in err and "expected a JSON object" in err
    (finished_run / "summary.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="summary.json"):
        from secondorder.experiments.rundir import read_summary

        read_summary(finished_run)


def test_full_disk_names_the_file(tmp_path, capsys, monkeypatch):
    def full(fd):  # what fsync(2) does on a full disk: an OSError naming no file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(download.os, "fsync", full)
    path = _spec_file(tmp_path, LOGISTIC)
    code, err = _run_cli(capsys, "run", path, "--run-dir", str(tmp_path / "run"), "--no-progress")
    assert code == 1 and "no space left on device" in err.lower()
    first_file = tmp_path / "run" / "environment.json"  # the first file a run writes
    assert f"{first_file}: no space left" in err and len(err.strip().splitlines()) == 1


def test_unwritable_report_directory(finished_run, capsys, monkeypatch):
    import secondorder.report as report

    target = finished_run / "report"

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))

    monkeypatch.setattr(report, "write_report", denied)
    code, err = _run_cli(capsys, "report", str(finished_run))
    assert code == 1 and str(target) in err and "permission denied" in err and "--out" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="chmod does not stop root from writing")
def test_read_only_run_directory(finished_run, capsys):
    shutil.rmtree(finished_run / "report", ignore_errors=True)
    finished_run.chmod(0o555)
    try:
        code, err = _run_cli(capsys, "report", str(finished_run))
    finally:
        finished_run.chmod(0o755)
    assert code == 1 and "permission denied" in err


def test_a_bug_keeps_its_traceback(monkeypatch):
    def buggy(args):
        return None.attribute  # an AttributeError: not the library refusing input

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["list"].set_defaults(func=buggy)
    with pytest.raises(AttributeError):
        cli.main(["list"])


def test_error_classes():
    assert issubclass(SpecError, ValueError) and issubclass(SpecError, SecondOrderError)
    assert issubclass(CheckpointError, EnvironmentFault) and CheckpointError.exit_code == 1
    assert issubclass(MemoryError_, MemoryError) and issubclass(MemoryError_, EnvironmentFault)
    from secondorder._validation import check_positive

    with pytest.raises(InvalidValueError, match="lr must be"):
        check_positive("lr", -1.0)
    with pytest.raises(TypeError, match="lr must be a real number"):
        check_positive("lr", "x")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return dict(parser._subparsers._group_actions[0].choices)


def test_every_command_and_option_explains_itself(capsys):
    subs = _subcommands()
    assert {"run", "resume", "report", "compare", "list", "gradtest", "curvature", "data"} <= set(
        subs
    )
    assert "demo" in subs
    for name, p in subs.items():
        assert p.description, name
        for action in p._actions:
            assert action.help, (name, action.dest)
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        out = capsys.readouterr().out
        assert p.description.split()[0] in out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "Second-order optimisation" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["curvature", "--help"])
    assert "(default: 3000)" in capsys.readouterr().out  # defaults are shown


def test_gradtest_plots_are_siblings_of_the_named_file(tmp_path, capsys, monkeypatch):
    assert cli._plot_paths("./grad.png", ["gradient"]) == [Path("./grad.png")]
    assert cli._plot_paths("./out.d/grad.png", ["gradient", "hessian"]) == [
        Path("out.d/grad-gradient.png"),
        Path("out.d/grad-hessian.png"),
    ]
    monkeypatch.chdir(tmp_path)
    code = cli.main(
        ["gradtest", "--widths", "4,3,2", "--samples", "20", "--hessian"] + ["--plot", "./grad.png"]
    )
    capsys.readouterr()
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grad-gradient.png", "grad-hessian.png"]


@pytest.mark.parametrize("data", ["random", "two-class-2d"])
def test_mse_uses_one_hot_targets(data, capsys):
    widths = "2,5,2" if data == "two-class-2d" else "4,5,3"
    args = cli.build_parser().parse_args(
        ["gradtest", "--data", data, "--widths", widths, "--samples", "30", "--loss", "mse"]
    )
    objective = cli._build_problem(args)
    theta = objective.initial_theta()
    X, y, k = cli._cli_data(args)
    out = objective.model(X)
    onehot = torch.nn.functional.one_hot(y, k).to(out.dtype)
    expected = 0.5 * ((out - onehot) ** 2).sum(1).mean()
    assert torch.allclose(objective.value(theta), expected, rtol=1e-12, atol=0)
    assert (
        cli.main(
            ["gradtest", "--data", data, "--widths", widths, "--samples", "30", "--loss", "mse"]
        )
        == 0
    )
    code = cli.main(
        ["curvature", "--data", data, "--widths", widths, "--samples", "30"]
        + ["--loss", "mse", "--no-progress"]
    )
    out = capsys.readouterr()
    assert code == 0 and "verdict" in out.out.lower() and "parameters" in out.err


def test_quick_without_a_quick_table_warns(capsys, tmp_path):
    with pytest.warns(SpecWarning, match=r"no \[quick\] table"):
        load_spec("paper/rosenbrock", quick=True)
    code, err = _run_cli(
        capsys,
        "run",
        _spec_file(tmp_path, LOGISTIC),
        "--quick",
        "--run-dir",
        str(tmp_path / "r"),
        "--no-progress",
        "--no-report",
    )
    assert code == 0 and "secondorder: warning:" in err and "[quick]" in err


def test_sweep_points_defining_the_same_problem_are_reported():
    raw = spec_from_dict.__globals__["tomllib"].loads(LOGISTIC)
    raw["sampler"] = {"kind": "fixed", "batch_size": 10}
    raw["sweep"] = {"sampler.batch_size": [10, 20, 30]}
    with pytest.warns(SpecWarning, match="2 cells define the same problem") as caught:
        spec = spec_from_dict(raw)
    text = str(caught[0].message)
    assert "batch_size=10" in text and "batch_size=20" in text and "batch_size=30" not in text
    # the claim checked: 10 and 20 divide m = 100, so eq. 28 gives the full-batch objective
    cells = spec.cells()
    full = copy.deepcopy(cells[0].spec)
    full["sampler"] = {"kind": "full"}
    values = [
        build_problem(c.spec, DataCache()) for c in [*cells, type(cells[0])("f", {}, 0, full)]
    ]
    f = [float(p.objective.value(p.theta0 + 0.5)) for p in values]  # θ0 = 0 gives ln 2
    assert f[0] == pytest.approx(f[3], rel=1e-12) and f[1] == pytest.approx(f[3], rel=1e-12)
    assert f[2] != pytest.approx(f[3], rel=1e-6)  # 30 does not divide 100: another objective


def test_huge_grids_are_refused_before_any_cell_is_built(capsys, tmp_path, monkeypatch):
    raw = spec_from_dict.__globals__["tomllib"].loads(LOGISTIC)
    raw["sweep"] = {"l2": [float(i) for i in range(101)], "max_iter": list(range(1, 11))}
    import secondorder.experiments.spec as spec_module

    def never(*a, **k):
        raise AssertionError("cells were built")

    monkeypatch.setattr(spec_module, "expand_cells", never)
    with pytest.raises(SpecError, match="1,010 cells"):
        spec_from_dict(raw, max_cells=1000)
    path = tmp_path / "big.toml"
    path.write_text(
        LOGISTIC + "[sweep]\nl2 = [" + ", ".join(str(float(i)) for i in range(1001)) + "]\n"
    )
    code, err = _run_cli(capsys, "run", str(path), "--run-dir", str(tmp_path / "r"))
    assert code == 2 and "--max-cells 1001" in err and not (tmp_path / "r").exists()


def test_faithful_mode_is_a_note():
    import warnings

    from secondorder import ModelObjective, minimize
    from secondorder.data import two_class_2d
    from secondorder.models import logistic_regression
    from secondorder.sampling import make_sampler

    data = two_class_2d(seed=0, dtype=torch.float64).train
    obj = ModelObjective(
        logistic_regression(2, dtype=torch.float64),
        "logistic",
        data,
        sampler=make_sampler("reshuffled", len(data), batch_size=50),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        minimize(obj, obj.initial_theta(), method="lbfgs", max_iter=3)
    notes = [w for w in caught if issubclass(w.category, ModeNote)]
    assert notes and issubclass(ModeNote, RuntimeWarning)
    assert warning_line("L-BFGS", notes[0]).startswith("note (L-BFGS): ")


def test_overall_progress_line():
    class C:
        def __init__(self, n):
            self.spec = {"solvers": [{}] * n}

    lines = []
    rp = RunProgress([C(2), C(2)], True, lines.append)
    rp.solver(0, "a", skipped=True)
    rp.solver(0, "b")
    rp.solver(1, "a")
    rp.solver(1, "b")
    assert len(lines) == 3
    assert lines[0].startswith("solver 2/4, cell 1/2 (b), elapsed ") and "estimate" not in lines[0]
    assert lines[2].startswith("solver 4/4, cell 2/2 (b)") and "estimate" in lines[2]
    quiet = []
    RunProgress([C(1)], True, quiet.append).solver(0, "a")
    assert quiet == []  # a single solver has its own bar


def test_bad_data_directory_variable_is_named(monkeypatch, tmp_path):
    from secondorder.data import fashion_mnist as fm

    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for value in (tmp_path / "missing", tmp_path):
        monkeypatch.setenv("SECONDORDER_DATA", str(value))
        with pytest.warns(UserWarning, match="SECONDORDER_DATA"):
            assert fm.find_fashion_mnist() is None


def test_summary_json_is_still_read(finished_run):
    from secondorder.experiments.rundir import read_summary

    assert read_summary(finished_run) == json.loads((finished_run / "summary.json").read_text())


def test_compare_of_runs_on_different_problems_warns_and_says_so_at_the_top(tmp_path, capsys):
    """Runs whose data, model, loss, L2 term or sampler differ minimise different functions:
    `compare` warns in one line naming the keys and their values, and its report opens with a
    note listing them per run; runs that differ only in their solvers and budget do not."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    start_run(load_spec(_spec_file(tmp_path, LOGISTIC)), a, QUIET)
    start_run(load_spec(_spec_file(tmp_path, LOGISTIC), overrides=[("l2", 0.5)]), b, QUIET)
    other_solver = LOGISTIC.replace('method = "lbfgs"', 'method = "bfgs"\nmax_iter = 2')
    start_run(load_spec(_spec_file(tmp_path, other_solver)), c, QUIET)

    code, err = _run_cli(capsys, "compare", str(a), str(b), "--out", str(tmp_path / "ab"))
    lines = [ln for ln in err.splitlines() if ln.startswith("secondorder: warning:")]
    assert code == 0 and len(lines) == 1, err
    assert "different problems" in lines[0] and "l2 (0 in t (a); 0.5 in t (b))" in lines[0]
    top = (tmp_path / "ab" / "report.md").read_text().split("| Run |", 1)[0]
    assert "**These runs solve different problems.**" in top
    assert "| l2 | 0 | 0.5 |" in top and "| problem key | t (a) | t (b) |" in top

    code, err = _run_cli(capsys, "compare", str(a), str(c), "--out", str(tmp_path / "ac"))
    assert code == 0 and "warning" not in err
    assert "different problems" not in (tmp_path / "ac" / "report.md").read_text()

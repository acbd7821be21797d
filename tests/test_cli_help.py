"""The command line as a newcomer meets it: every default shown in --help (zeros included), and
the command line's own bad arguments refused as such, not as a fault of the spec."""

from __future__ import annotations

import argparse

import pytest

from secondorder import cli


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    return dict(cli.build_parser()._subparsers._group_actions[0].choices)


def _shows_nothing(default) -> bool:
    return default is None or default is False or default == [] or default is argparse.SUPPRESS


def test_every_default_is_shown_zeros_included(capsys):
    zero_defaults = 0
    for name, p in _subcommands().items():
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for action in p._actions:
            if _shows_nothing(action.default) or action.dest == "help":
                continue
            zero_defaults += action.default == 0
            assert f"(default: {action.default})" in out or "(default:" in (action.help or ""), (
                name,
                action.dest,
                action.default,
            )
    assert zero_defaults >= 4  # --seed, --l2, --train-iters: the defaults that used to be hidden


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--set", "max_iter"], "--set 'max_iter': expected KEY=VALUE"),
        (["--set", "solvers[GD lr=1].max_iter"], "expected KEY=VALUE"),  # = in a name only
        (["--max-cells", "0"], "--max-cells: expected a positive integer, got 0"),
    ],
)
def test_bad_command_line_arguments_are_not_called_an_invalid_spec(
    argv, expected, tmp_path, capsys
):
    code = cli.main(["run", "paper/rosenbrock", "--run-dir", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert "invalid spec" not in err
    assert err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_data_without_the_files_ends_in_the_one_line_error_of_every_command(tmp_path, capsys):
    code = cli.main(["data", "--root", str(tmp_path), "--no-download"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("secondorder: error: ") and err.count("\n") == 1, err
    assert "not found" in err


@pytest.mark.parametrize("command", ["resume", "report"])
def test_a_run_directory_that_does_not_exist_is_named_as_such(command, tmp_path, capsys):
    missing, empty = tmp_path / "nosuch", tmp_path / "empty"
    empty.mkdir()
    assert cli.main([command, str(missing)]) != 0
    assert f"{missing} does not exist" in capsys.readouterr().err
    assert cli.main([command, str(empty)]) != 0
    assert f"{empty} is not a run directory (no run.json)" in capsys.readouterr().err

"""The conclusions a report of the study's specs opens with: each measured on the run's
traces (hand-made traces here, so the answer follows the data), and the suite's report leads
with them."""

from __future__ import annotations

from pathlib import Path

import pytest

from secondorder.experiments.runner import RunOptions, start_run
from secondorder.experiments.spec import load_spec, to_toml
from secondorder.report import final_value, load_run, write_report
from secondorder.report.paper.conclusions import conclusions, sampling_noise
from secondorder.report.rundata import CellRun, RunData, SolverRun

QUIET = RunOptions(progress=False, log=lambda msg: None)


def _solver(name: str, rows: list[dict], *, seconds: float = 1.0, cap: int = 25) -> SolverRun:
    rows = [dict(r, solver_time=seconds * r["k"]) for r in rows]
    summary = {"max_iter": cap, "finished": True, "status": "max_iter"}
    return SolverRun(name, name.lower(), "x", rows, summary)


def _accuracy_rows(final: float, cap: int = 25) -> list[dict]:
    """Dev and test accuracy rising linearly to ``final`` at ``cap``, every 5 iterations."""
    return [
        {
            "k": k,
            "f": 2.0 - final * k / cap,
            "train_loss": 2.0 - final * k / cap,
            "dev_accuracy": final * k / cap,
            "test_accuracy": final * k / cap - 0.01,
        }
        for k in range(0, cap + 1, 5)
    ]


def _run(solvers: list[SolverRun], data: dict, name: str = "fashion-mnist") -> RunData:
    spec = {
        "max_iter": 25,
        "data": data,
        "model": {"kind": "mlp", "hidden": [300]},
        "metrics_every": 5,
        "report": {"paper": ["table3"]},
    }
    cell = CellRun("main", Path("."), {}, 0, spec, solvers)
    return RunData(Path("."), name, f"paper/{name}", spec, {}, {}, {}, [cell])


FM = {"kind": "fashion-mnist", "dev_size": 10000}


def _row(found, start: str):
    return next(c for c in found if c.question.startswith(start) or start in c.question)


def test_the_best_accuracy_is_found_with_its_margin_and_graded_by_the_split_size():
    solvers = [
        _solver("Gradient", _accuracy_rows(0.53)),
        _solver("NLCG", _accuracy_rows(0.76), seconds=2.5),
        _solver("Newton-CG (GGN)", _accuracy_rows(0.876), seconds=5.7),
    ]
    found = conclusions(_run(solvers, FM))
    acc = _row(found, "which method reaches the best dev accuracy within 25 iterations")
    assert acc.finding.startswith("**Newton-CG (GGN)**: dev accuracy 0.876 at k = 25")
    assert "0.116 above NLCG's 0.760" in acc.finding and "Gradient 0.530" in acc.finding
    assert "also the best" in acc.finding  # the test split agrees
    assert acc.strength.startswith("strong") and "10,000 dev samples" in acc.strength
    assert "accuracy.png" in acc.evidence
    # the same margin on 100 samples is within their sampling noise: weak evidence
    small = conclusions(_run(solvers, {"kind": "fashion-mnist", "dev_size": 100}))
    assert 3 * sampling_noise(0.876, 100) > 0.116
    assert not _row(small, "best dev accuracy").strength.startswith("strong")
    # the winner's costlier iterations, and when it passed the runner-up's final accuracy
    cost = _row(found, "what does the most accurate method cost")
    assert "5.70 s per iteration, 2.3× NLCG's 2.50 s" in cost.finding
    assert "passed NLCG's final dev accuracy 0.760 at k = 25" in cost.finding
    loss = _row(found, "lowest training loss")
    assert loss.finding.startswith("**Newton-CG (GGN)**")


def test_another_winner_another_conclusion_and_a_tie_is_said_as_such():
    solvers = [
        _solver("Gradient", _accuracy_rows(0.9)),
        _solver("NLCG", _accuracy_rows(0.7)),
    ]
    acc = _row(conclusions(_run(solvers, FM)), "best dev accuracy")
    assert acc.finding.startswith("**Gradient**") and "NLCG's 0.700" in acc.finding
    tied = [_solver("A", _accuracy_rows(0.8)), _solver("B", _accuracy_rows(0.8))]
    acc = _row(conclusions(_run(tied, FM)), "best dev accuracy")
    assert acc.finding.startswith("no single one: A and B all reach 0.800")
    assert acc.strength.startswith("weak: a tie")


def test_a_known_minimum_asks_who_reaches_it():
    def f_rows(fs):
        return [{"k": k, "f": f} for k, f in enumerate(fs)]

    newton = _solver("Newton", f_rows([1.0, 1e-3, 1e-9, 1e-20]), cap=50)
    gd = _solver("Gradient", f_rows([1.0, 0.5, 0.4, 0.3]), cap=3)
    run = _run([gd, newton], {"kind": "rosenbrock", "a": 1.0, "b": 50.0}, "rosenbrock")
    run.cells[0].spec["model"] = {}
    run.cells[0].spec["report"] = {"f_star": 0.0}
    row = _row(conclusions(run), "f − f* ≤ 1e-8")
    assert row.finding.startswith("**Newton** at k = 2; Gradient not in 3 (f − f* = 0.300)")


@pytest.fixture(scope="module")
def mini_suite(tmp_path_factory):
    base = tmp_path_factory.mktemp("suite")
    suite = base / "suite.toml"
    parts = [
        {"spec": "paper/rosenbrock", "set": {"max_iter": 30}},
        {"spec": "paper/logistic-fixed", "set": {"max_iter": 12}},
    ]
    suite.write_text(to_toml({"name": "mini", "parts": parts}))
    return start_run(load_spec(str(suite)), base / "run", QUIET)


def test_suite_report_opens_with_conclusions_computed_from_its_parts(mini_suite):
    (report,) = write_report([mini_suite])
    text = report.read_text()
    first = text.split("Environment:", 1)[0]
    assert "## Conclusions" in first
    assert "| question | what this run found | shown in | strength of the evidence |" in first
    # the answer is the run's: the part's best test accuracy, read back from its traces
    data = dict(load_run(mini_suite).parts)["logistic-fixed"]
    finals = {s.name: final_value(s.rows, "test_accuracy") for s in data.cells[0].solvers}
    best = max(finals.values())
    row = next(ln for ln in first.splitlines() if "logistic-fixed: which method reaches" in ln)
    assert f"{best:.3f}" in row
    assert "[results table](#logistic-fixed)" in row
    assert "rosenbrock: which method reaches f − f* ≤ 1e-8" in first
    assert "How many of the study's claims does this run confirm?" in first
    # a part of the suite does not repeat them
    assert text.count("## Conclusions") == 1 and "### Conclusions" not in text

"""The report's verdicts on the study's claims, its number formatter, and what its tables and
notes say about the run they describe."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from secondorder._format import format_number, format_pm, format_spec_value
from secondorder.experiments import io
from secondorder.experiments.rows import one_line
from secondorder.experiments.runner import RunOptions, start_run
from secondorder.experiments.spec import load_spec, spec_from_dict
from secondorder.report import convergence_iteration, load_run, write_comparison, write_report
from secondorder.report.paper import STUDY, summary_section
from secondorder.report.paper.verdicts import (
    CLAIMS,
    NOT_COMPARABLE,
    convergence_order,
    verdicts,
)
from secondorder.report.rundata import CellRun, RunData, SolverRun
from secondorder.report.text import show

QUIET = RunOptions(progress=False, log=lambda msg: None)


# ----------------------------------------------------------------------------------------------
# The formatter
# ----------------------------------------------------------------------------------------------
def test_format_number_uses_significant_digits_and_scientific_outside_fixed_range():
    assert format_number(4.96762e-06) == "4.968e-06"  # never "0.0000"
    assert format_number(1.00989e-21) == "1.010e-21"
    assert format_number(0.009346, 4) == "0.009346"
    assert format_number(0.1375, 4) == "0.1375"
    assert format_number(411.9, 4) == "411.9"
    assert format_number(0.0) == "0"
    assert format_number(math.inf) == "inf" and format_number(-math.inf) == "-inf"
    assert format_number(math.nan) == "nan"
    big = format_number(3.7e112)  # a diverged loss: not a 113-digit integer
    assert big == "3.700e+112" and len(big) < 12
    assert format_number(999999.7, 4) == "1.000e+06"
    assert format_number(7) == "7" and format_number(True) == "yes"
    # every float a column shows parses back to within its significant digits
    for v in (1.23456e-9, 0.00123456, 0.123456, 123.456, 123456.0, 1.23456e7):
        assert math.isclose(float(format_number(v, 4)), v, rel_tol=5e-4)


def test_mean_and_spread_of_tiny_values_keep_their_digits():
    assert format_pm(4.97e-06, 1.2e-07) == "4.970e-06 ± 1.2e-07"  # not "0.0000 ± 0.0000"
    assert show(None) == "—" and show("a|b") == "a\\|b"


def test_spec_values_print_as_written():
    assert format_spec_value(0.01) == "0.01"
    assert format_spec_value(1e-10) == "1e-10"
    assert format_spec_value(60000.0) == "60000"
    assert format_spec_value(1.2345678901) == "1.2345678901"  # not :g's "1.23457"


# ----------------------------------------------------------------------------------------------
# Rules on hand-made traces: the verdict follows the data
# ----------------------------------------------------------------------------------------------
def _solver(name, rows, method="x", paper_row=None, **summary) -> SolverRun:
    return SolverRun(name, name.lower(), method, rows, summary, paper_row=paper_row or name)


def _cells(*solvers: SolverRun, spec=None) -> list[CellRun]:
    return [CellRun("main", Path("."), {}, 0, spec or {}, list(solvers))]


def _claim(cid: str):
    return next(c for c in CLAIMS if c.id == cid)


def _f_rows(fs):
    return [{"k": k, "f": f} for k, f in enumerate(fs)]


def test_newton_fewest_iterations_confirmed_tie_or_not_from_k_eps():
    check = _claim("newton-fewest").check
    newton = _solver("Newton (LS)", _f_rows([5, 1, 0.5, 0.5]))  # k_ε = 3
    fast = _solver("NLCG", _f_rows([5, 2, 2]))  # k_ε = 2
    tie = _solver("NLCG", _f_rows([5, 1, 0.9, 0.9]))  # k_ε = 3
    slow = _solver("BFGS", _f_rows([5, 4, 3, 2, 1, 1]))  # k_ε = 5
    assert check(_cells(newton, slow), 1e-9).verdict == "confirmed"
    tied = check(_cells(newton, tie, slow), 1e-9)
    assert tied.verdict == "differs" and "tie with NLCG" in tied.ours
    assert check(_cells(newton, fast), 1e-9).verdict == "not confirmed"


def test_poor_generalisation_claim_reads_test_accuracies():
    check = _claim("poor-test").check

    def acc(name, a):
        return _solver(name, [{"k": 0, "test_accuracy": 0.5}, {"k": 5, "test_accuracy": a}])

    found = check(_cells(acc("Newton (LS)", 0.83), acc("L-BFGS", 0.51), acc("NLCG", 0.51)), 0)
    assert found.verdict == "confirmed"
    found = check(_cells(acc("Newton (LS)", 0.92), acc("L-BFGS", 0.92), acc("NLCG", 0.94)), 0)
    assert found.verdict == "not confirmed" and "L-BFGS 0.92, NLCG 0.94" in found.ours
    found = check(_cells(acc("Newton (LS)", 0.9), acc("L-BFGS", 0.5), acc("NLCG", 0.9)), 0)
    assert found.verdict == "partly"


def test_convergence_order_of_quadratic_and_linear_sequences():
    quad = [10.0 ** -(2**k) for k in range(5)]  # e_{k+1} = e_k²
    assert math.isclose(convergence_order(quad), 2.0, rel_tol=1e-9)
    lin = [0.5**k for k in range(10)]
    assert math.isclose(convergence_order(lin), 1.0, rel_tol=1e-9)
    assert convergence_order([1.0, 0.5]) is None


# ----------------------------------------------------------------------------------------------
# Whole reports
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    base = tmp_path_factory.mktemp("verdicts")
    return start_run(
        load_spec("paper/logistic-fixed", overrides=[("max_iter", 30)]), base / "fixed", QUIET
    )


def test_report_opens_with_the_citation_and_a_verdict_table(fixed):
    (report,) = write_report([fixed])
    text = report.read_text()
    head = text.split("## The run", 1)[0]
    assert "## Summary" in head and STUDY in head
    assert "| Claim of the study | where | what we found | verdict | rule |" in head
    # the tie of Newton's k_ε is computed from the traces, not written in advance
    data = load_run(fixed)
    k = {s.name: convergence_iteration(s.rows, 1e-6) for s in data.cells[0].solvers}
    others = [k["BFGS"], k["NLCG"]]
    expect = (
        "confirmed"
        if k["Newton (LS)"] < min(others)
        else "differs"
        if k["Newton (LS)"] == min(others)
        else "not confirmed"
    )
    row = next(ln for ln in head.splitlines() if ln.startswith("| Newton (LS) converges"))
    assert f"**{expect}**" in row and f"Newton (LS) {k['Newton (LS)']}" in row
    assert "seed's" not in text and "The seed" not in text
    for cid in ("same-optimum", "newton-fewest", "nols-bias"):
        assert any(c.id == cid for c, _, _ in verdicts(data, 1e-6))


def test_run_log_and_report_show_the_same_final_f(tmp_path):
    """NLCG under reshuffled batches stops when the objective changes: the log line and the
    report's table give the f of its last recorded row, and the report says why the solver's
    own final f (the same iterate on the next batch) differs."""
    spec = load_spec("paper/logistic-reshuffled", overrides=[("max_iter", 12)])
    run = start_run(spec, tmp_path / "run", QUIET)
    summary = io.read_json(run / "summary.json")["cells"]["main"]["solvers"]["NLCG"]
    assert summary["status"] == "objective_changed"
    data = load_run(run)
    rows = next(s for s in data.cells[0].solvers if s.name == "NLCG").rows
    row_f = format_number(rows[-1]["f"], 6)
    assert f"f={row_f}," in one_line("NLCG", "main", summary)
    (report,) = write_report([run])
    text = report.read_text()
    assert f"| {row_f} |" in text
    assert summary["f"] != rows[-1]["f"]
    assert "drawn for the iteration it did not take" in text


def _fm_shaped(name: str, sampler: dict, max_iter: int = 3) -> dict:
    return {
        "name": name,
        "max_iter": max_iter,
        "data": {"kind": "random", "n_train": 200, "n_test": 60, "n_features": 8, "n_classes": 10},
        "model": {"kind": "mlp", "hidden": [5]},
        "metrics": ["train_loss", "train_accuracy", "test_accuracy"],
        "l2": 0.01,
        "sampler": sampler,
        "solvers": [
            {"name": "Gradient", "method": "gd", "paper_row": "Gradient"},
            {"name": "NLCG", "method": "nlcg", "paper_row": "NLCG"},
        ],
        "report": {"paper": ["table3"]},
    }


def test_table3_states_both_iteration_counts_and_notes_fit_the_run(tmp_path):
    raw = _fm_shaped("fashion-mnist-minibatch", {"kind": "reshuffled", "batch_size": 50})
    run = start_run(spec_from_dict(raw), tmp_path / "mb", QUIET)
    (report,) = write_report([run])
    text = report.read_text()
    assert "study (it. 100)" in text and "ours (it. 3)" in text
    assert "full 60,000-sample objective" not in text and "full-batch objective, which" not in text
    assert "one fresh batch per iteration" in text
    assert "Another reading is bundled: paper/fashion-mnist-minibatch" not in text
    assert "paper/fashion-mnist-init" in text
    beside = text.split("Beside the study's published numbers", 1)[1]
    assert "k_ε" not in beside  # no table of this report has a k_ε column

    raw = _fm_shaped("fm-fixed", {"kind": "fixed", "batch_size": 50})
    run = start_run(spec_from_dict(raw), tmp_path / "fixed", QUIET)
    (report,) = write_report([run])
    text = report.read_text()
    assert "full-batch objective, which this run uses" in text
    assert "one fresh batch per iteration" not in text


def test_compare_uses_each_runs_own_epsilon(tmp_path):
    runs, eps = [], {"loose": 1e-2, "tight": 1e-12}
    for name, e in eps.items():
        raw = {
            "name": name,
            "max_iter": 15,
            "data": {"kind": "two-class-2d", "n_train": 100, "n_test": 20},
            "model": {"kind": "logistic"},
            "solvers": [{"name": "GD", "method": "gd"}],
            "report": {"epsilon": e},
        }
        runs.append(start_run(spec_from_dict(raw), tmp_path / name, QUIET))
    text = write_comparison(runs, tmp_path / "cmp").read_text()
    ks = {}
    for name, path in zip(eps, runs):
        rows = load_run(path).cells[0].solvers[0].rows
        ks[name] = convergence_iteration(rows, eps[name])
    assert ks["loose"] != ks["tight"]  # the two ε must matter on these traces
    for name in eps:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {name} |"))
        assert f"| {show(ks[name])} |" in line, line


def test_suite_report_opens_with_the_study_and_each_parts_verdicts(tmp_path):
    from secondorder.experiments.spec import to_toml

    suite = tmp_path / "suite.toml"
    parts = [
        {"spec": "paper/rosenbrock", "set": {"max_iter": 30}},
        {"spec": "paper/logistic-fixed", "set": {"max_iter": 12}},
    ]
    suite.write_text(to_toml({"name": "mini", "parts": parts}))
    run = start_run(load_spec(str(suite)), tmp_path / "run", QUIET)
    (report,) = write_report([run])
    head = report.read_text().split("Contents:", 1)[0]
    assert STUDY in head
    assert (
        "| [rosenbrock](#rosenbrock) |" in head and "| [logistic-fixed](#logistic-fixed) |" in head
    )
    data = load_run(run)
    for name, part in data.parts:
        n = len(
            verdicts(
                part,
                float(part.spec["report"]["epsilon"]),
                (1, 2) if name == "rosenbrock" else (3, 5),
            )
        )
        assert f"| [{name}](#{name}) | {n} |" in head


def _table3_run(budget: int, *, accuracy: float = 0.835, gd: float = 0.72) -> RunData:
    """A run of the three Table 3 solvers (1L) that stops at ``budget`` iterations with the
    study's accuracies (a hand-made trace: the verdict follows the iteration counts alone)."""
    spec = {
        "max_iter": budget,
        "model": {"kind": "mlp", "hidden": [300]},
        "report": {"paper": ["table3"]},
    }

    def rows(acc: float) -> list[dict]:
        return [
            {"k": k, "f": 1.0 / (k + 1), "train_accuracy": acc, "dev_accuracy": acc}
            for k in range(0, budget + 1, 5)
        ]

    solvers = [
        _solver(name, rows(a), max_iter=budget, finished=True, status="max_iter")
        for name, a in (("Gradient", gd), ("NLCG", accuracy), ("L-BFGS-B", accuracy))
    ]
    cell = CellRun("main", Path("."), {}, 0, spec, solvers)
    return RunData(Path("."), "fm", "paper/fashion-mnist", spec, {}, {}, {}, [cell])


def test_a_claim_made_at_more_iterations_than_the_run_is_not_comparable():
    """Table 3's claims are after 100 iterations: a run of 25 cannot confirm or refute them;
    the summary counts such checks as not comparable and says why."""
    short = {c.id: f for c, _, f in verdicts(_table3_run(25), 1e-6)}
    for cid in ("second-order-083", "gd-072", "beats-gd"):
        assert short[cid].verdict == NOT_COMPARABLE, (cid, short[cid])
        assert "after 100 iterations" in short[cid].reason and "25" in short[cid].reason
        assert short[cid].ours  # our numbers are still shown
    full = {c.id: f for c, _, f in verdicts(_table3_run(100), 1e-6)}
    assert full["second-order-083"].verdict == "confirmed" and not full["beats-gd"].reason
    assert full["beats-gd"].verdict == "confirmed"
    # a longer budget is read at the claim's count: still like with like
    assert verdicts(_table3_run(150), 1e-6)[0][2].verdict != NOT_COMPARABLE

    text = summary_section(_table3_run(25), 1e-6, "#")
    assert "3 not comparable" in text and "not confirmed" not in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| After 100 iterations NLCG"))
    assert "**not comparable** (the study's claim is after 100 iterations" in row


def test_a_short_run_of_the_study_is_not_comparable_in_its_report(tmp_path):
    raw = _fm_shaped("fashion-mnist", {"kind": "full"}, max_iter=4)
    raw["solvers"].append({"name": "L-BFGS-B", "method": "lbfgs", "paper_row": "L-BFGS-B"})
    run = start_run(spec_from_dict(raw), tmp_path / "fm", QUIET)
    (report,) = write_report([run])
    summary = report.read_text().split("## The run", 1)[0]
    assert "not comparable" in summary and "this run's budget is 4 iterations" in summary
    assert "**not confirmed**" not in summary

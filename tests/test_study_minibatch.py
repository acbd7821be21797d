"""studies/minibatch: the quick run end to end, and the conclusion rules on hand-made inputs."""

from __future__ import annotations

import math
import re

import pytest

from secondorder.experiments.runner import RunOptions, start_run
from secondorder.experiments.spec import load_spec, spec_from_dict
from secondorder.report import write_report
from secondorder.report.rundata import SolverRun
from secondorder.report.studies import minibatch as mb

QUIET = RunOptions(progress=False, log=lambda msg: None)


def _conclusions(text: str) -> list[list[str]]:
    block = text.split("### Conclusions", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in block.splitlines() if line.startswith("| ") and "---" not in line]
    return [r.strip("| ").split(" | ") for r in rows[1:]]


def _check_report(text: str, report_dir) -> list[list[str]]:
    rows = _conclusions(text)
    study = text.split("Second-order methods with mini-batches", 1)[1]
    for row in rows:
        for title in row[2].split("; "):
            assert f"# {title}\n" in study, title
    links = re.findall(r"\]\((figures/minibatch-[^)]+)\)", study)
    assert len(links) == 2
    for link in links:
        assert (report_dir / link).stat().st_size > 5000, link
    return rows


def test_quick_run_end_to_end(fashion_mnist, tmp_path):
    spec = load_spec("studies/minibatch", quick=True, overrides=[("max_iter", 8)])
    run = start_run(spec, tmp_path / "run", QUIET)
    (report,) = write_report([run])
    text = report.read_text()
    rows = _check_report(text, report.parent)
    assert rows[0][0].startswith("Do second-order methods with mini-batches beat")
    verdict = rows[0][1].split(":", 1)[0]
    assert verdict in {"supported", "not supported", "mixed", "not tested"}
    # every solver of every batch construction has its row in the table
    table = text.split("### Table: time and epochs to the target", 1)[1]
    for kind in ("full", "fixed", "reshuffled", "epoch"):
        assert len(re.findall(rf"^\| {kind} \| ", table, flags=re.M)) == 11


def test_synthetic_run_without_the_dataset(tmp_path):
    raw = {
        "name": "mb-random",
        "max_iter": 12,
        "metrics": ["test_accuracy"],
        "data": {"kind": "random", "n_train": 120, "n_test": 60},
        "model": {"kind": "mlp", "hidden": [6]},
        "solvers": [
            {"name": "Adam", "method": "adam", "options": {"lr": 0.05}},
            {"name": "L-BFGS (robust)", "method": "lbfgs", "options": {"robust": True}},
        ],
        "sweep": {"sampler": [{"kind": "full"}, {"kind": "epoch", "batch_size": 30, "seed": 0}]},
        "report": {"study": "minibatch"},
    }
    run = start_run(spec_from_dict(raw), tmp_path / "run", QUIET)
    (report,) = write_report([run])
    rows = _check_report(report.read_text(), report.parent)
    assert [r[0].split(" (")[0] for r in rows[:2]] == [
        "Do second-order methods with mini-batches beat mini-batch first-order methods",
        "And without sampling",
    ]


# -- rules -------------------------------------------------------------------------------------
def _solver(method: str, points: list[tuple[float, float, float]], name: str = "s") -> SolverRun:
    """Rows (solver_time, epochs, test_accuracy), with a row without metrics in between."""
    rows = []
    for k, (t, e, a) in enumerate(points):
        rows.append({"k": 2 * k, "solver_time": t, "epochs": e, "test_accuracy": a})
        rows.append({"k": 2 * k + 1, "solver_time": t + 0.01, "epochs": e})
    return SolverRun(name, name, method, rows)


def test_reach_first_row_at_target():
    s = _solver("adam", [(0.0, 0.0, 0.1), (1.0, 0.5, 0.79), (2.0, 1.0, 0.81), (3.0, 1.5, 0.85)])
    r = mb.reach(s, "epoch", 0.8)
    assert (r.time, r.epochs, r.best, r.final) == (2.0, 1.0, 0.85, 0.85)
    assert r.first_order and r.total_epochs == 1.5
    never = mb.reach(s, "epoch", 0.9)
    assert never.time is None and never.epochs is None


def test_choose_target():
    assert mb.choose_target(0.86) == mb.TARGET
    assert mb.choose_target(0.70) == math.floor(0.97 * 0.70 * 100) / 100 == 0.67
    assert mb.choose_target(None) == mb.TARGET


def _reach(method: str, time: float | None, epochs: float | None, sampler: str = "epoch"):
    return mb.Reach(method, method, sampler, time, epochs, 0.85, 0.85, 5.0, 10.0)


@pytest.mark.parametrize(
    ("rs", "verdict", "time_ratio"),
    [
        ([_reach("adam", 10.0, 2.0), _reach("kfac", 4.0, 0.5)], "supported", 0.4),
        ([_reach("sgd", 4.0, 1.0), _reach("lbfgs", 10.0, 5.0)], "refuted", 2.5),
        ([_reach("adam", 4.0, 2.0), _reach("kfac", 4.5, 0.5)], "mixed", 1.125),
        ([_reach("adam", None, None), _reach("sqn", None, None)], "untested", None),
        ([_reach("adam", None, None), _reach("hessian-free", 9.0, 3.0)], "supported", 0.0),
    ],
)
def test_hypothesis_rule(rs, verdict, time_ratio):
    h = mb.hypothesis_rule(rs)
    assert h["verdict"] == verdict
    if time_ratio is None:
        assert h["time_ratio"] is None
    else:
        assert h["time_ratio"] == pytest.approx(time_ratio)


def test_hypothesis_rule_reads_only_moving_batches():
    rs = [_reach("adam", 10.0, 2.0), _reach("kfac", 1.0, 0.1, sampler="full")]
    h = mb.hypothesis_rule(rs)
    assert h["n_second"] == 0 and h["verdict"] == "refuted"
    assert mb.hypothesis_rule(rs, frozenset({"full"}))["verdict"] == "supported"


def test_reach_table_names_the_seed_only_when_there_are_several():
    one = [_reach("adam", 1.0, 2.0), _reach("kfac", 2.0, 1.0)]
    assert "| seed |" not in mb._reach_table(one)
    two = [*one, mb.Reach("adam", "adam", "epoch", 1.5, 2.5, 0.8, 0.8, 5.0, 10.0, seed=1)]
    table = mb._reach_table(two)
    assert table.splitlines()[0].startswith("| batches | seed | solver | class |")
    assert [line.split("|")[2].strip() for line in table.splitlines()[2:]] == ["0", "0", "1"]


def test_cnn_part_quick_run_end_to_end(fashion_mnist, tmp_path):
    """studies/minibatch-cnn: the benchmark CNN (``model.kind = "cnn"``) under the moving
    batches, K-FAC and EKFAC beside SGD, Adam and Muon (first-order: the gradient alone),
    the minibatch report's rule on it."""
    spec = load_spec("studies/minibatch-cnn", quick=True, overrides=[("max_iter", 6)])
    run = start_run(spec, tmp_path / "run", QUIET)
    (report,) = write_report([run])
    text = report.read_text()
    rows = _conclusions(text)
    assert rows[0][0].startswith("Do second-order methods with mini-batches beat")
    table = text.split("### Table: time and epochs to the target", 1)[1]
    for kind in ("reshuffled", "epoch"):
        assert len(re.findall(rf"^\| {kind} \| ", table, flags=re.M)) == 8
        assert (
            len(re.findall(rf"^\| {kind} \| Muon [^|]*\| first-order \|", table, flags=re.M)) == 2
        )

"""studies/train-dev: the quick run end to end, and each conclusion rule on hand-made inputs."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from secondorder.experiments.metrics import EXTRA_METRICS
from secondorder.experiments.runner import RunOptions, start_run
from secondorder.experiments.spec import load_spec, spec_from_dict
from secondorder.models import mlp
from secondorder.objective import ModelObjective
from secondorder.report import write_report
from secondorder.report.studies import train_dev as td
from secondorder.sampling import make_sampler

QUIET = RunOptions(progress=False, log=lambda msg: None)


def _conclusion_rows(text: str) -> list[str]:
    block = text.split("### Conclusions", 1)[1].split("\n\n", 2)[1]
    return [line for line in block.splitlines() if line.startswith("| ") and "---" not in line][1:]


def _check_cited(text: str, report_dir) -> None:
    """Every conclusion names a table or figure that is a heading of the report; every
    figure linked in the study's sections exists."""
    rows = _conclusion_rows(text)
    assert rows
    study = text.split("Why are train and dev accuracy so close?", 1)[1]
    for row in rows:
        cited = row.split(" | ")[2]
        for title in cited.split("; "):
            assert f"# {title}\n" in study, title
    for link in re.findall(r"\]\((figures/train-dev-[^)]+)\)", study):
        assert (report_dir / link).stat().st_size > 5000, link


def test_quick_run_end_to_end(fashion_mnist, tmp_path):
    spec = load_spec(
        "studies/train-dev",
        quick=True,
        overrides=[("max_iter", 6), ("sweep.l2", [0.0])],
    )
    run = start_run(spec, tmp_path / "run", QUIET)
    (report,) = write_report([run])
    text = report.read_text()
    assert "### Conclusions" in text
    _check_cited(text, report.parent)
    assert len(_conclusion_rows(text)) == 6
    # the duplicates were counted from the images: integer counts for every split pair
    table = text.split("### Table: exact duplicate images", 1)[1].split("###", 1)[0]
    assert re.search(r"\| this run's splits \| dev also in train \| 1000 \| \d+ \| \d+ \|", table)
    assert "whole data set" in table


def test_report_without_fashion_mnist_says_not_measured(tmp_path):
    raw = {
        "name": "td-random",
        "max_iter": 4,
        "dtype": "float32",
        "metrics": ["train_accuracy", "test_accuracy"],
        "data": {"kind": "random", "n_train": 60, "n_test": 30},
        "model": {"kind": "mlp", "hidden": [8]},
        "solvers": [{"name": "L-BFGS", "method": "lbfgs"}],
        "report": {"study": "train-dev"},
    }
    run = start_run(spec_from_dict(raw), tmp_path / "run", QUIET)
    (report,) = write_report([run])
    text = report.read_text()
    assert "not measured: the run's data (random) is not Fashion-MNIST" in text
    # no dev split: every gap rule reports what it could not test instead of failing
    assert "not tested" in text


# -- duplicates --------------------------------------------------------------------------------
def test_duplicate_counts_hand_made():
    a, b, c, d, e = (np.full(4, v, dtype=np.float32) for v in range(5))
    splits = {
        "train": (np.stack([a, b, a, c]), np.array([0, 1, 0, 2])),
        "dev": (np.stack([d, b]), np.array([3, 7])),  # b relabelled 1 → 7
        "test": (np.stack([c, e, e]), np.array([2, 4, 4])),
    }
    got = td.duplicate_counts(splits)
    assert got["sizes"] == {"train": 4, "dev": 2, "test": 3}
    assert got["within"] == {"train": 1, "dev": 0, "test": 1}
    assert got["across"] == {("train", "dev"): 1, ("train", "test"): 1, ("dev", "test"): 0}
    assert got["relabelled"] == {("train", "dev"): 1, ("train", "test"): 0, ("dev", "test"): 0}


def test_content_hashes_see_one_pixel():
    X = np.zeros((2, 784), dtype=np.float32)
    X[1, 400] = 1 / 255
    h = td.content_hashes(X)
    assert h[0] != h[1] and td.content_hashes(X[:1]) == h[:1]


def test_leakage_rule_bound():
    counts = {"sizes": {"train": 5000, "dev": 1000}, "across": {("train", "dev"): 30}}
    explains, bound, shared = td.leakage_rule(counts)
    assert (explains, shared) == (True, 30) and bound == pytest.approx(0.03)
    counts["across"][("train", "dev")] = 5
    explains, bound, _ = td.leakage_rule(counts)
    assert not explains and bound == pytest.approx(0.005)


# -- gap rules ---------------------------------------------------------------------------------
def _run(solver="L-BFGS", width="[30]", l2=0.0, sampler="full", train=0.8, dev=0.79, **kw):
    return td.GapRun(
        solver, width, l2, sampler, train, dev, kw.get("batch"), kw.get("early"), ([], [])
    )


def test_iterations_rule():
    runs = [_run(early=0.01), _run(train=0.9, dev=0.8, early=0.02), _run(sampler="fixed")]
    grew, n, early, end = td.iterations_rule(runs)
    assert (grew, n) == (1, 2)  # the first run's gap 0.01 → 0.01 did not grow
    assert early == pytest.approx(0.015) and end == pytest.approx(0.055)


def test_sweep_rule_width_and_l2():
    runs = [
        _run(width="[30]", train=0.80, dev=0.79),
        _run(width="[300]", train=0.90, dev=0.80),
        _run(width="[30]", l2=0.01, train=0.80, dev=0.79),
        _run(width="[300]", l2=0.01, train=0.80, dev=0.795),
    ]
    up, down, pairs, diff = td.sweep_rule(runs, "width")
    assert (up, down, pairs) == (1, 0, 2) and diff == pytest.approx((0.09 - 0.005) / 2)
    up, down, pairs, diff = td.sweep_rule(runs, "l2")
    assert (up, down, pairs) == (0, 1, 2)  # the penalty closes the wide net's gap
    assert diff == pytest.approx((0.0 - 0.095) / 2)
    assert td.sweep_rule(runs[:1], "width")[2] == 0


@pytest.mark.parametrize(
    ("runs", "verdict"),
    [
        ([_run(train=0.99, dev=0.88), _run(train=0.80, dev=0.79)], "opens"),
        ([_run(train=0.99, dev=0.82), _run(train=0.85, dev=0.81)], "opens"),
        ([_run(train=0.99, dev=0.88), _run(train=0.80, dev=0.70)], "open everywhere"),
        ([_run(train=0.99, dev=0.97), _run(train=0.80, dev=0.79)], "stays closed"),
        ([_run(train=0.80, dev=0.79), _run(train=0.99, dev=0.5, sampler="fixed")], "untested"),
    ],
)
def test_fitting_rule(runs, verdict):
    assert td.fitting_rule(runs)["verdict"] == verdict


def test_fitting_rule_correlation():
    runs = [_run(train=0.8, dev=0.78), _run(train=0.9, dev=0.85), _run(train=1.0, dev=0.88)]
    got = td.fitting_rule(runs)
    gaps = [0.02, 0.05, 0.12]
    assert got["r"] == pytest.approx(float(np.corrcoef([0.8, 0.9, 1.0], gaps)[0, 1]))
    assert got["r"] > 0.9 and td.fitting_rule(runs[:2])["r"] is None


def test_batches_rule():
    runs = [
        _run(train=0.85, dev=0.80),
        _run(sampler="fixed", train=0.82, dev=0.79, batch=0.95),
        _run(sampler="reshuffled", train=0.84, dev=0.80, batch=0.845),
    ]
    got = td.batches_rule(runs)
    assert got["fixed"]["train"] == pytest.approx(-0.02)
    assert got["fixed"]["batch"] == pytest.approx(0.11) and got["fixed"]["matters"]
    assert got["reshuffled"]["train"] == pytest.approx(-0.01)
    assert not got["reshuffled"]["matters"]
    assert td.batches_rule(runs[:1]) == {}


# -- the batch_accuracy metric -----------------------------------------------------------------
def test_batch_accuracy_is_accuracy_on_the_fixed_batches():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    model = mlp([5, 7, 3], "tanh", seed=0)
    sampler = make_sampler("fixed", 40, batch_size=6, n_batches=2, seed=3)
    obj = ModelObjective(model, "cross_entropy", (X, y), sampler=sampler)
    theta = obj.initial_theta()
    got = EXTRA_METRICS["batch_accuracy"](obj, theta, None)["batch_accuracy"]
    idx = np.unique(np.concatenate(sampler.batches(0)))
    with torch.no_grad():
        pred = model(X[idx]).argmax(1)  # the module itself, not the objective's forward
    assert got == pytest.approx(float((pred == y[idx]).double().mean()))
    assert len(idx) == 12


def test_load_splits_is_the_data_the_run_fits():
    from secondorder.experiments.problems import build_problem, load_splits

    raw = {
        "name": "splits",
        "data": {"kind": "random", "n_train": 50, "n_test": 20, "seed": 3},
        "model": {"kind": "mlp", "hidden": [4]},
        "solvers": [{"method": "gd"}],
    }
    (cell,) = spec_from_dict(raw).cells()
    splits = load_splits(cell.spec)
    obj = build_problem(cell.spec).objective
    assert torch.equal(splits.train.X, obj.X) and torch.equal(splits.train.y, obj.y)
    assert len(splits.test) == 20 and splits.dev is None

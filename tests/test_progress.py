"""progress= of the long library calls: off by default, a callback or a line on stderr when
asked, and never a change of the result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from secondorder import ModelObjective, minimize
from secondorder._progress import Reporter, format_seconds
from secondorder.curvature import hessian, saddle_report
from secondorder.models import mlp


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(60, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (60,), generator=gen)
    return mlp([5, 4, 3], "tanh", seed=0, dtype=torch.float64), X, y


def test_hessian_reports_the_samples_and_is_unchanged(problem):
    model, X, y = problem
    events = []
    H = hessian(model, X, y, chunk_size=25, progress=events.append)
    assert torch.equal(H, hessian(model, X, y, chunk_size=25))
    done = [(e.done, e.total) for e in events if not e.finished]
    assert done == [(25, 60), (50, 60), (60, 60)]
    assert events[-1].finished and events[-1].stage == "done"


def test_saddle_report_counts_lanczos_steps_and_dense_limit_zero_means_never_dense(problem):
    model, X, y = problem
    events = []
    lanczos = saddle_report(model, X, y, dense_limit=0, progress=events.append)
    dense = saddle_report(model, X, y)
    assert lanczos.method == "lanczos" and dense.method == "dense"
    assert all(layer.method == "lanczos" for layer in lanczos.layers)
    reference = np.linalg.eigvalsh(hessian(model, X, y).numpy())  # the dense float64 spectrum
    assert lanczos.lambda_min == pytest.approx(reference[0], rel=1e-8, abs=1e-10)
    assert lanczos.lambda_max == pytest.approx(reference[-1], rel=1e-8)
    stages = {e.stage for e in events}
    assert "Lanczos step" in stages and any(s.startswith("block 2/2") for s in stages)
    steps = [e.done for e in events if e.stage == "Lanczos step"]
    assert steps[-1] > 1 and steps == sorted(steps)
    with pytest.raises(ValueError, match="dense_limit"):
        saddle_report(model, X, y, dense_limit=-1)


def test_minimize_progress_reports_iterations_and_keeps_the_run(problem):
    model, X, y = problem
    obj = ModelObjective(model, "cross_entropy", (X, y))
    events = []
    seen = []
    a = minimize(
        obj,
        obj.initial_theta(),
        method="lbfgs",
        max_iter=7,
        progress=events.append,
        callback=lambda info: seen.append(info["k"]),
    )
    b = minimize(obj, obj.initial_theta(), method="lbfgs", max_iter=7)
    assert torch.equal(a.theta, b.theta) and a.nit == b.nit
    ks = [e.done for e in events if not e.finished]
    assert ks == seen == list(range(a.nit + 1)) and events[0].total == 7
    with pytest.raises(TypeError, match="progress must be"):
        minimize(obj, obj.initial_theta(), method="lbfgs", max_iter=1, progress="yes")


def test_progress_true_writes_a_line_to_stderr(problem, capsys):
    model, X, y = problem
    hessian(model, X, y, progress=True)
    err = capsys.readouterr().err
    assert "hessian: 60/60" in err and "hessian: done in" in err
    hessian(model, X, y)
    assert capsys.readouterr().err == ""  # off by default


def test_reporter_and_seconds():
    assert format_seconds(3.21) == "3.2s" and format_seconds(192) == "3m12s"
    assert format_seconds(7500) == "2h05m"
    silent = Reporter(False, "x")
    silent.update(1, 2)
    silent.close()

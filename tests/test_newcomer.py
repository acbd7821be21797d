"""What a newcomer runs from the docs: the data-parallel script of docs/distributed.md also runs
in one process (``curvature_sum`` is then the engine's function itself)."""

from __future__ import annotations

import torch

from secondorder import distributed
from secondorder.curvature import hessian_diagonal, layer_hessians
from secondorder.models import mlp


def test_curvature_sum_in_one_process_is_the_function_itself():
    assert not torch.distributed.is_initialized()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)
    model = mlp([4, 5, 3], "tanh", seed=0, dtype=torch.float64)
    diag = distributed.curvature_sum(hessian_diagonal, model, X, y, "cross_entropy", 1e-3)
    assert torch.equal(diag, hessian_diagonal(model, X, y, "cross_entropy", 1e-3))
    blocks = distributed.curvature_sum(layer_hessians, model, X, y, "cross_entropy", 1e-3)
    for got, want in zip(blocks, layer_hessians(model, X, y, "cross_entropy", 1e-3)):
        assert torch.equal(got, want)


def test_the_faithful_mode_note_of_nlcg_names_what_it_remembers():
    import warnings

    from secondorder import ModelObjective, minimize
    from secondorder.data import two_class_2d
    from secondorder.errors import ModeNote
    from secondorder.models import logistic_regression
    from secondorder.sampling import ReshuffledBatches

    data = two_class_2d(seed=0, n_train=40, n_val=10)
    model = logistic_regression(2, dtype=torch.float64)
    obj = ModelObjective(model, "logistic", data.train, sampler=ReshuffledBatches(40, 10, seed=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        minimize(obj, obj.initial_theta(), method="nlcg", max_iter=2)
    notes = [str(w.message) for w in caught if issubclass(w.category, ModeNote)]
    assert len(notes) == 1 and "conjugate directions" in notes[0], notes


def test_an_unknown_method_in_a_spec_lists_the_torch_and_scipy_prefixes_too():
    import pytest

    from secondorder.experiments.spec import SpecError, spec_from_dict

    raw = {
        "name": "x",
        "data": {"kind": "two-class-2d"},
        "model": {"kind": "logistic"},
        "solvers": [{"method": "lbgfs"}],
    }
    with pytest.raises(SpecError) as err:
        spec_from_dict(raw, "x.toml")
    text = str(err.value)
    assert "'torch:<Name>'" in text and "'scipy:<name>'" in text
    assert "did you mean 'lbfgs'?" in text


def test_secondorder_list_sorts_the_bundled_specs_by_name(capsys):
    from secondorder import cli

    assert cli.main(["list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "paper/fashion-mnist" in names and "paper/fashion-mnist-init" in names
    assert names == sorted(names)


def test_the_reports_of_the_other_fashion_mnist_readings_cite_the_claim_and_figures(tmp_path):
    from secondorder.experiments.runner import RunOptions, start_run
    from secondorder.experiments.spec import spec_from_dict
    from secondorder.report import write_report

    quiet = RunOptions(progress=False, log=lambda msg: None)
    for name in ("fashion-mnist-minibatch", "fashion-mnist-init"):
        raw = {
            "name": name,
            "max_iter": 2,
            "data": {"kind": "random", "n_train": 60, "n_test": 20, "n_features": 4},
            "model": {"kind": "mlp", "hidden": [3]},
            "metrics": ["train_loss", "train_accuracy", "test_accuracy"],
            "solvers": [{"name": "NLCG", "method": "nlcg", "paper_row": "NLCG"}],
            "report": {"paper": ["table3"]},
        }
        run = start_run(spec_from_dict(raw), tmp_path / name, quiet)
        (report,) = write_report([run])
        text = report.read_text()
        assert "> The study's claim:" in text, name
        assert "The study's figures" in text and "**Figure 6**" in text, name


def test_a_short_run_has_whole_iteration_ticks_on_its_loss_figure(monkeypatch):
    from pathlib import Path

    from secondorder.report import figures
    from secondorder.report.rundata import SolverRun

    kept = []
    monkeypatch.setattr(figures, "save", lambda fig, path: kept.append(fig) or Path(path))
    rows = [{"k": k, "f": 2.0 / (k + 1), "grad_norm": 1.0 / (k + 1)} for k in range(21)]
    figures.loss_figure([("NLCG", SolverRun("NLCG", "nlcg", "nlcg", rows), "C0")], "x.png")
    kept[-1].canvas.draw()  # the ticks as a reader sees them, limits settled
    ax_it, _, ax_g = kept[-1].axes[:3]
    for ax in (ax_it, ax_g):
        ticks = [t for t in ax.get_xticks() if 0 <= t <= 20]
        assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks), ticks


def test_identical_accuracy_curves_keep_the_line_style_that_says_train_or_test(monkeypatch):
    from pathlib import Path

    from secondorder.report import figures
    from secondorder.report.rundata import SolverRun

    kept = []
    monkeypatch.setattr(figures, "save", lambda fig, path: kept.append(fig) or Path(path))
    rows = [
        {"k": k, "f": 1.0, "train_accuracy": a, "test_accuracy": a - 0.01}
        for k, a in enumerate([0.5, 0.9, 0.94, 0.94])
    ]
    a, b = (
        SolverRun("Newton (LS)", "a", "newton", rows),
        SolverRun("Newton (noLS)", "b", "newton", rows),
    )
    figures.accuracy_figure([("Newton (LS)", a, "C0"), ("Newton (noLS)", b, "C1")], "x.png")
    ax = kept[-1].axes[0]
    drawn = [ln for ln in ax.lines if len(ln.get_xdata()) == 4]
    assert len(drawn) == 4  # train and test of each solver
    first, second = drawn[:2], drawn[2:]
    for one, two, style in zip(first, second, ("-", ":")):
        assert one.get_linestyle() == two.get_linestyle() == style
        assert two.get_linewidth() < one.get_linewidth()  # the first shows on both sides
        assert two.get_markerfacecolor() == "none" and two.get_zorder() > one.get_zorder()

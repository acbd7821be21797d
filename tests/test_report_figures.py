"""What the report's figures show, read off their Matplotlib artists."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from secondorder.experiments.runner import RunOptions, start_run
from secondorder.experiments.spec import load_spec
from secondorder.report import figures, load_run, plane, write_report
from secondorder.report.diagnostics_figures import slq_window
from secondorder.report.rundata import SolverRun, final_theta
from secondorder.report.styles import series_styles

QUIET = RunOptions(progress=False, log=lambda msg: None)


@pytest.fixture
def drawn(monkeypatch):
    """The Figure objects the figure functions would save (nothing is written)."""
    out = []

    def keep(fig, path):
        fig.canvas.draw()
        out.append(fig)
        return Path(path)

    monkeypatch.setattr(figures, "save", keep)
    monkeypatch.setattr(plane, "save", keep)
    return out


def _run(name, fs, times=None, **extra) -> SolverRun:
    rows = []
    for k, f in enumerate(fs):
        r = {"k": k, "f": float(f), "grad_norm": 1.0 / (k + 1)}
        if times is not None:
            r["solver_time"] = float(times[k])
        for key, vals in extra.items():
            r[key] = float(vals[k])
        rows.append(r)
    return SolverRun(name, name.lower(), "x", rows)


def _labelled(ax):
    return {ln.get_label(): ln for ln in ax.lines if not ln.get_label().startswith("_")}


def test_identical_series_stay_distinguishable(drawn):
    fs = [1.0, 0.5, 0.25, 0.125, 0.1]
    a, b = _run("Newton (LS)", fs), _run("Newton (noLS)", fs)
    figures.loss_figure([("Newton (LS)", a, "C0"), ("Newton (noLS)", b, "C1")], "x.png")
    ax = drawn[-1].axes[0]
    lines = _labelled(ax)
    la, lb = lines["Newton (LS)"], lines["Newton (noLS)"]
    assert np.array_equal(la.get_ydata(), lb.get_ydata())  # the same data …
    assert (la.get_linestyle(), la.get_marker()) != (lb.get_linestyle(), lb.get_marker())
    assert lb.get_zorder() > la.get_zorder() and lb.get_markerfacecolor() == "none"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "Newton (LS)" in legend and "Newton (noLS)" in legend
    handles = {h.get_label(): h for h in ax.get_legend().legend_handles}
    assert handles["Newton (LS)"].get_linestyle() != handles["Newton (noLS)"].get_linestyle()
    # a third identical series differs from both
    c = _run("third", fs)
    figures.loss_figure([("a", a, "C0"), ("b", b, "C1"), ("c", c, "C2")], "y.png")
    ls = {(ln.get_linestyle(), ln.get_marker()) for ln in _labelled(drawn[-1].axes[0]).values()}
    assert len(ls) == 3


def test_a_fast_solver_gets_a_log_iteration_axis(drawn):
    slow = _run("GD", np.geomspace(10, 1e-3, 2001))
    fast = _run("Newton", [10.0 ** -(2**k) for k in range(6)])
    figures.loss_figure([("GD", slow, "C0"), ("Newton", fast, "C1")], "x.png", f_star=0.0)
    ax_it, _, ax_g = drawn[-1].axes[:3]
    assert ax_it.get_xscale() == "symlog" and ax_g.get_xscale() == "symlog"
    assert "logarithmic" in ax_it.get_xlabel()
    figures.loss_figure([("GD", slow, "C0"), ("GD2", slow, "C1")], "y.png")
    assert drawn[-1].axes[0].get_xscale() == "linear"


def test_the_floor_of_f_minus_f_star_is_drawn_and_named(drawn):
    s = _run("Newton", [1.0, 1e-4, 1e-12, 0.0], times=[3.0, 3.5, 4.0, 4.2])
    figures.loss_figure([("Newton", s, "C0")], "x.png", f_star=0.0)
    ax_it, ax_t = drawn[-1].axes[:2]
    assert min(_labelled(ax_it)["Newton"].get_ydata()) == figures.CLIP
    legend = [t.get_text() for t in ax_it.get_legend().get_texts()]
    assert any("1e-16" in t and "drawn at it" in t for t in legend)
    assert any(ln.get_ydata()[0] == figures.CLIP and len(ln.get_ydata()) == 2 for ln in ax_t.lines)
    # the time axis starts at the first recorded iterate, not at the solver's first 3 s
    assert _labelled(ax_t)["Newton"].get_xdata()[0] == 0.0
    figures.loss_figure([("Newton", _run("N", [1.0, 0.5]), "C0")], "y.png", f_star=0.0)
    legend = [t.get_text() for t in drawn[-1].axes[0].get_legend().get_texts()]
    assert not any("drawn at it" in t for t in legend)  # nothing floored, nothing said


def test_more_than_ten_series_never_repeat_a_style(drawn):
    series = [(f"s{i}", _run(f"s{i}", [1.0, 0.5 + i / 100]), figures.colour(i)) for i in range(23)]
    figures.loss_figure(series, "x.png")
    styles = [
        (ln.get_color(), ln.get_linestyle(), ln.get_marker())
        for ln in _labelled(drawn[-1].axes[0]).values()
    ]
    assert len(styles) == 23 and len(set(styles)) == 23
    assert len({figures.colour(i) for i in range(23)}) == 10  # the colour alone repeats


def test_published_values_appear_on_the_accuracy_figure(drawn):
    acc = [0.1, 0.5, 0.7]
    s = _run("NLCG", [1, 1, 1], train_accuracy=acc, dev_accuracy=acc)
    marks = [("C1", "train_accuracy", 100, 0.8363, "Table 3, it. 100")]
    marks.append(("C1", "dev_accuracy", 100, 0.8336, "Table 3, it. 100"))
    figures.accuracy_figure([("NLCG", s, "C1")], "x.png", published=marks)
    ax = drawn[-1].axes[0]
    stars = [ln for ln in ax.lines if ln.get_marker() in ("*", "D") and len(ln.get_xdata()) == 1]
    ys = sorted(float(ln.get_ydata()[0]) for ln in stars if ln.get_label().startswith("_"))
    assert ys == [0.8336, 0.8363]
    assert all(abs(float(ln.get_xdata()[0]) - 100) < 5 for ln in stars)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("study: train (Table 3, it. 100)" in t for t in legend)


def test_paths_have_distinct_starts_visible_ends_and_labels_off_the_paths(drawn):
    def fn(X, Y):
        return (1 - X) ** 2 + 50 * (Y - X**2) ** 2

    path = np.c_[
        np.linspace(-1.2, 1.0, 40), np.linspace(1.0, 1.0, 40) - np.sin(np.linspace(0, 3, 40))
    ]
    series = []
    for i, name in enumerate(("GD", "LS", "Newton")):
        rows = [{"k": k, "x": [float(a), float(b)]} for k, (a, b) in enumerate(path[: 10 + 10 * i])]
        rows.append({"k": len(rows), "x": [1.0, 1.0]})
        series.append((name, SolverRun(name, name.lower(), "x", rows), figures.colour(i)))
    figures.paths_figure(series, "x.png", fn, minimum=[1.0, 1.0])
    ax = drawn[-1].axes[0]
    singles = [ln for ln in ax.lines if len(ln.get_xdata()) == 1]
    starts = [ln for ln in singles if ln.get_markerfacecolor() == "none"]
    assert len({(ln.get_marker(), ln.get_markersize()) for ln in starts}) == 3
    minimum = next(ln for ln in singles if ln.get_label() == "minimum")
    ends = [ln for ln in singles if ln.get_marker() == "*" and ln.get_label().startswith("_")]
    assert len(ends) == 3 and all(e.get_zorder() > minimum.get_zorder() for e in ends)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("start") for t in legend) and "last iterate" in legend
    # every contour label sits away from every iterate (in axes units)
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    pts = np.concatenate([[r["x"] for r in s.rows] for _, s, _ in series])
    pts = (pts - [x0, y0]) / [x1 - x0, y1 - y0]
    labels = [t for t in ax.texts if t.get_text()]
    assert labels
    for t in labels:
        p = (np.array(t.get_position()) - [x0, y0]) / [x1 - x0, y1 - y0]
        assert np.min(np.linalg.norm(pts - p, axis=1)) >= 0.05


def test_sweeps_use_log_losses_integer_ticks_and_one_outside_legend(drawn):
    groups = [
        (
            "",
            {
                "Newton": [(10, 1e-8, 0.9), (50, 1e-7, 0.91), (100, 1e-6, 0.92)],
                "GD": [(10, 2e-8, 0.8), (50, 3e-7, 0.85), (100, 2e-6, 0.86)],
            },
        )
    ]
    figures.sweep_figure("sampler.batch_size", [10, 50, 100], groups, "x.png")
    fig = drawn[-1]
    ax_l, ax_a = fig.axes[:2]
    assert ax_l.get_yscale() == "log" and ax_a.get_yscale() == "linear"
    assert [t.get_text() for t in ax_l.get_xticklabels()] == ["10", "50", "100"]
    assert ax_l.get_legend() is None and ax_a.get_legend() is None and fig.legends
    figures.sweep_figure("l2", [0.0, 1.0], [("", {"N": [(0.0, 0.3, 0.9), (1.0, 0.5, 0.8)]})], "y")
    assert drawn[-1].axes[0].get_yscale() == "linear"  # one decade not spanned


def test_slq_density_is_cut_to_the_spectrum_and_not_floored():
    grid = np.linspace(-2, 4, 601)
    density = np.exp(-0.5 * ((grid - 1) / 0.5) ** 2)
    g, d = slq_window(grid, density, lam_min=-0.5, lam_max=2.5, sigma=0.1)
    assert g.min() >= -0.6 - 1e-12 and g.max() <= 2.6 + 1e-12
    assert np.all(np.isnan(d) | (d >= density.max() * 1e-10))
    assert not np.any(d == density.max() * 1e-10)  # no flat floor line


def test_the_study_figure_3_is_drawn_for_the_2d_problem(tmp_path, drawn):
    spec = load_spec("paper/logistic-fixed", overrides=[("max_iter", 15)])
    run = start_run(spec, tmp_path / "run", QUIET)
    (report,) = write_report([run])
    text = report.read_text()
    assert "**Figure 3**" in text
    fig3 = text.split("**Figure 3**", 1)[1].split("\n", 1)[0]
    assert "[boundary](figures/boundary.png)" in fig3
    data = load_run(run)
    cell = data.cells[0]
    nlcg = next(s for s in cell.solvers if s.name == "NLCG")
    w1, w2, b = final_theta(cell, nlcg)
    fig = next(f for f in drawn if "validation set" in f.axes[0].get_title())
    ax = fig.axes[0]
    line = next(ln for ln in ax.lines if ln.get_label().startswith("NLCG: boundary"))
    xs, ys = line.get_xdata(), line.get_ydata()
    assert np.allclose(ys, -(w1 * xs + b) / w2)
    n_points = sum(len(c.get_offsets()) for c in ax.collections)
    assert n_points == int(cell.spec["data"]["n_test"])  # the whole validation set


def test_save_draws_log_panels_without_data_or_with_one_point(tmp_path):
    fig = figures._figure(3)
    empty, one, zero = fig.subplots(1, 3)
    for ax in (empty, one, zero):
        ax.set_xscale("log")
        ax.set_yscale("log")
    one.plot([1.0], [0.5])
    zero.plot([0.0], [0.0])  # one point at 0: nothing a log axis can show
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even Matplotlib's note about the log axis
        path = figures.save(fig, tmp_path / "f.png")
    assert path.stat().st_size > 1000
    assert [ax.get_yscale() for ax in (empty, one, zero)] == ["linear", "log", "linear"]
    assert any("nothing to show" in t.get_text() for t in empty.texts)
    assert not one.texts


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("studies/preconditioning/small-net", [("max_iter", 0), ("data.n_train", 60)]),
        ("paper/rosenbrock", [("max_iter", 0)]),
    ],
)
def test_reports_of_runs_without_iterations_or_rows_are_written(tmp_path, name, overrides):
    spec = load_spec(name, quick=name.startswith("studies"), overrides=overrides)
    run = start_run(spec, tmp_path / "run", QUIET)
    for empty_traces in (False, True):
        if empty_traces:  # every solver as if it had failed before its first row
            for trace in run.rglob("trace/*.jsonl"):
                trace.write_text("")
        [report] = write_report(run)
        links = re.findall(r"\]\((figures/[^)]+\.png)\)", report.read_text())
        assert links or empty_traces
        assert all((report.parent / link).stat().st_size > 1000 for link in links)


def _fake_fashion_mnist(root: Path, n_train: int = 60_000, n_test: int = 10_000) -> Path:
    """Fashion-MNIST's four files, as large as the real ones, with random images (black and
    white: quick to compress) and labels."""
    from secondorder.data.fashion_mnist import FILES
    from secondorder.data.idx import write_idx

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        y = np.arange(n, dtype=np.uint8) % 10
        X = rng.integers(0, 2, (n, 28, 28), dtype=np.uint8) * 255
        write_idx(root / f"{FILES[f'{split}_images']}.gz", X)
        write_idx(root / f"{FILES[f'{split}_labels']}.gz", y)
    return root


@pytest.mark.slow
def test_every_bundled_report_copes_with_runs_without_iterations_or_rows(tmp_path, monkeypatch):
    from secondorder.experiments.spec import bundled_specs

    monkeypatch.setenv("SECONDORDER_DATA", str(_fake_fashion_mnist(tmp_path)))
    for name in bundled_specs():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # specs without a [quick] table say so
            spec = load_spec(name, quick=True, overrides=[])
            if spec.is_suite:
                continue  # its parts are specs by themselves
            spec = load_spec(name, quick=True, overrides=[("max_iter", 0)])
        run = start_run(spec, tmp_path / name.replace("/", "-"), QUIET)
        for empty_traces in (False, True):
            if empty_traces:  # as if every solver had failed before its first row
                for trace in run.rglob("trace/*.jsonl"):
                    trace.write_text("")
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # not even a warning about an empty panel
                [report] = write_report(run)
            for link in re.findall(r"\]\((figures/[^)]+\.png)\)", report.read_text()):
                assert (report.parent / link).stat().st_size > 1000, (name, link)


def _overlaps(a, b) -> bool:
    return not (a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0)


def test_49_series_of_7_solvers_and_7_settings_get_14_legend_entries_under_the_panels(drawn):
    """Colour stands for the solver, line style for the setting: every series has its own
    combination, the legend names each colour and each line style once (two titled columns)
    and sits outside every panel, in the loss and in the accuracy figure."""
    solvers = [f"solver {i}" for i in range(7)]
    batch = [f"sampler.batch_size={b}" for b in (10, 20, 50, 100, 200, 500, 1000)]
    labels = [(s, b) for b in batch for s in solvers]
    styles = series_styles(labels, ("solver", "sampler.batch_size"))
    assert styles.grouped
    combos = {(st["color"], str(st["ls"])) for st in styles.styles}
    assert len(combos) == 49
    assert len({st["color"] for st in styles.styles}) == 7
    assert len({str(st["ls"]) for st in styles.styles}) == 7
    series = [
        (
            f"{b}: {s}",
            _run(s, [1.0, 0.5 + i / 100, 0.4], train_accuracy=[0.5, 0.7, 0.8 + i / 1000]),
            None,
        )
        for i, (s, b) in enumerate(labels)
    ]
    figures.loss_figure(series, "x.png", styles=styles)
    figures.accuracy_figure(series, "y.png", styles=styles)
    for fig in drawn[-2:]:
        assert all(ax.get_legend() is None for ax in fig.axes)
        (leg,) = fig.legends
        texts = [t.get_text() for t in leg.get_texts()]
        assert set(solvers) | set(batch) | {"solver", "sampler.batch_size"} <= set(texts)
        assert len([t for t in texts if t]) == 7 + 7 + 2
        box = leg.get_window_extent()
        assert not any(_overlaps(box, ax.get_window_extent()) for ax in fig.axes)
        plotted = [ln for ax in fig.axes[:1] for ln in ax.lines if len(ln.get_xdata())]
        assert len(plotted) == 49


def test_series_that_cannot_be_grouped_combine_colour_and_line_style(drawn):
    """Twelve settings of one solver: colours alone would repeat after ten, so the colour and
    line style together tell the series apart, and the legend still sits outside."""
    labels = [("NLCG", f"l2={i}") for i in range(12)]
    styles = series_styles(labels)
    assert not styles.grouped
    combos = [(st["color"], str(st["ls"])) for st in styles.styles]
    assert len(set(combos)) == 12 and len({c for c, _ in combos}) == 10
    series = [(f"{b}: {s}", _run(s, [1.0, 0.5 + i / 100]), None) for i, (s, b) in enumerate(labels)]
    figures.loss_figure(series, "x.png", styles=styles)
    fig = drawn[-1]
    (leg,) = fig.legends
    assert len(leg.get_texts()) == 12 and all(ax.get_legend() is None for ax in fig.axes)
    assert not any(_overlaps(leg.get_window_extent(), ax.get_window_extent()) for ax in fig.axes)

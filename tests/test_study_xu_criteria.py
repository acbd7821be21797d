"""The bundled study ``studies/xu-criteria``: the strict-saddle test function against autograd
and scipy, its spec keys, the quick suite end to end, and every rule of the report checked
against the raw traces (or hand-made inputs) where the answer is known."""

import math
import re

import numpy as np
import pytest
import scipy.optimize
import torch

from secondorder.experiments.functions import FUNCTIONS, function_f_star, saddle_start
from secondorder.experiments.runner import RunOptions, start_run
from secondorder.experiments.schema import SpecError
from secondorder.experiments.spec import load_spec, spec_from_dict
from secondorder.objective import strict_saddle, strict_saddle_minimum
from secondorder.report import write_report
from secondorder.report.rundata import SolverRun, load_run
from secondorder.report.studies import xu_criteria as study
from secondorder.report.studies.minibatch import Reach, reach
from secondorder.report.studies.xu_criteria import MethodSweep, Setting
from secondorder.report.studies.xu_criteria_rules import twin_runs

QUIET = RunOptions(progress=False, log=lambda msg: None)
D = [-1.0, -0.01, 0.05, 1.0, 10.0]


# -- the function -----------------------------------------------------------------------------
def test_strict_saddle_hessian_at_the_origin_has_the_given_eigenvalues():
    f = strict_saddle(D, seed=3)
    x0 = torch.zeros(len(D), dtype=torch.float64)
    g = torch.func.grad(f)(x0)
    H = torch.autograd.functional.hessian(f, x0)
    assert float(g.abs().max()) == 0.0
    assert torch.allclose(torch.linalg.eigvalsh(H), torch.tensor(sorted(D), dtype=H.dtype))
    Q = f.rotation
    assert torch.allclose(Q.T @ Q, torch.eye(len(D), dtype=Q.dtype), atol=1e-12)


def test_strict_saddle_minimum_agrees_with_scipy_from_random_starts():
    q = 0.5
    f = strict_saddle(D, quartic=q, seed=1)

    def fun(x):
        t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        v = f(t)
        (g,) = torch.autograd.grad(v, t)
        return float(v.detach()), g.numpy()

    f_star = strict_saddle_minimum(D, quartic=q)
    assert f_star == pytest.approx(-(1.0 + 1e-4) / (4 * q))
    rng = np.random.default_rng(0)
    for _ in range(5):
        res = scipy.optimize.minimize(
            fun, rng.normal(size=len(D)), jac=True, method="BFGS", options={"gtol": 1e-10}
        )
        assert res.fun == pytest.approx(f_star, rel=1e-8, abs=1e-12)


def test_strict_saddle_refuses_bad_input():
    with pytest.raises(ValueError, match="eigenvalues"):
        strict_saddle([])
    with pytest.raises(ValueError, match="quartic"):
        strict_saddle([1.0, -1.0], quartic=0.0)


def test_saddle_start_has_the_asked_distance_and_zero_means_the_saddle():
    x = saddle_start(7, 1e-3, seed=2)
    assert math.isclose(float(np.linalg.norm(x)), 1e-3, rel_tol=1e-12)
    assert saddle_start(7, 0.0, seed=2) == [0.0] * 7


# -- the spec ---------------------------------------------------------------------------------
def _saddle_spec(**data):
    return {
        "name": "s",
        "max_iter": 40,
        "data": {"kind": "strict-saddle", **data},
        "solvers": [{"method": "trust-ncg"}, {"method": "gd", "line_search": "armijo"}],
    }


def test_spec_kind_strict_saddle_validates_and_reports_its_minimum():
    spec = spec_from_dict(_saddle_spec(eigenvalues=D, quartic=2.0))
    assert spec.data["data"]["x0_scale"] == 1e-3
    assert function_f_star(spec.data["data"]) == pytest.approx(strict_saddle_minimum(D, 2.0))
    assert set(FUNCTIONS) >= {"rosenbrock", "strict-saddle"}


@pytest.mark.parametrize(
    ("data", "extra", "match"),
    [
        ({"eigenvalues": []}, {}, "data.eigenvalues: needs at least one"),
        ({"quartic": 0.0}, {}, "data.quartic"),
        ({"x0_scale": -1.0}, {}, "data.x0_scale"),
        ({}, {"model": {"kind": "mlp", "hidden": [3]}}, "model: not used with data.kind"),
        ({}, {"metrics": ["test_accuracy"]}, "needs data"),
    ],
)
def test_spec_refuses_bad_saddle_keys(data, extra, match):
    with pytest.raises(SpecError, match=match):
        spec_from_dict({**_saddle_spec(**data), **extra})


def test_saddle_run_trust_region_reaches_f_star_and_gd_stays(tmp_path):
    raw = _saddle_spec(eigenvalues=D, x0_scale=0.0)
    run_dir = start_run(spec_from_dict(raw), tmp_path / "run", QUIET)
    run = load_run(run_dir)
    outcomes = {o.solver: o for o in study.saddle_outcomes(run)}
    f_star = strict_saddle_minimum(D)
    tr = outcomes["trust-ncg"]
    assert tr.reached and tr.gaps[-1] <= 1e-6 * abs(f_star)
    assert not outcomes["gd"].reached and outcomes["gd"].word == "still at the saddle"


# -- the rules on hand-made inputs ------------------------------------------------------------
def _setting(group, setting, method, time, best=0.8, final=0.8, train=0.85):
    r = Reach(f"{group} · {setting}", method, "", time, None, best, final, None, None)
    return Setting(group, setting, "p", r, train, "max_iter")


def test_fraction_fastest_gap_and_ranking():
    adam = MethodSweep("Adam", [_setting("Adam", "lr=1", "adam", t) for t in (None, 2.0, 3.0)])
    kfac = MethodSweep(
        "K-FAC", [_setting("K-FAC", f"d={i}", "kfac", t) for i, t in enumerate((1.0, None))]
    )
    ncg = MethodSweep("Newton-CG", [_setting("Newton-CG", "d=1", "newton-cg", None, best=0.7)])
    hf = MethodSweep("HF", [_setting("HF", "d=1", "hessian-free", None, best=0.75)])
    assert adam.fraction == pytest.approx(2 / 3) and adam.fastest.reach.time == 2.0
    assert adam.first_order and not kfac.first_order
    assert kfac.gap == pytest.approx(0.05)
    ranked = study.rank_second_order([adam, ncg, kfac, hf])
    assert [m.group for m in ranked] == ["K-FAC", "HF", "Newton-CG"]  # misses by best accuracy


# -- the quick suite end to end, checked against the raw traces --------------------------------
def _first_hit(trace, target):
    for row in trace:
        a = row.get("test_accuracy")
        if isinstance(a, (int, float)) and a >= target:
            return row["solver_time"]
    return None


def test_quick_suite_end_to_end(tmp_path, fashion_mnist):
    spec = load_spec("studies/xu-criteria", quick=True)
    run_dir = start_run(spec, tmp_path / "run", QUIET)
    [report] = write_report(run_dir)
    text = report.read_text()
    assert text.count("## Xu et al.'s six criteria") == 1  # not again per part
    head = text.split("## Xu et al.'s six criteria", 1)[1]
    assert head.lstrip().startswith("### Conclusions")
    for n in range(1, 7):
        assert f"| {n}. " in head, f"criterion {n} has no conclusion"
    assert "weak: one seed" in head  # the strength column says what the evidence rests on
    for title in (study.T_SUMMARY, study.T_SWEEP, study.T_SUB, study.T_SADDLE):
        assert title in text
    links = re.findall(r"!\[[^\]]*\]\((figures/xu-[^)]+)\)", text)
    assert len(links) == 3
    for link in links:
        assert (report.parent / link).stat().st_size > 1000
    run = load_run(run_dir)
    target = float(re.search(r"T is test accuracy ([0-9.]+)", text).group(1))
    settings = study.sweep_settings(run, target)
    assert len(settings) == 55  # 11 methods × 5 values
    # every setting's time to T equals the first trace row at or above T
    by_name = {s.reach.solver: s for s in settings}
    n_checked = 0
    for part in ("stochastic", "full"):
        for cell in load_run(run_dir / part).cells:
            for s in cell.solvers:
                assert by_name[s.name].reach.time == _first_hit(s.rows, target)
                n_checked += 1
    assert n_checked == 55
    # the robustness column counts the settings that reached T
    for m in study.method_sweeps(settings):
        hits = sum(s.reach.time is not None for s in m.settings)
        assert re.search(rf"\| {re.escape(m.group)} \|[^\n]*\| {hits}/5 \|", text)
    # the saddle: every "f* in k it." is the first row with f − f* ≤ 1e-6·|f*|
    f_star = strict_saddle_minimum(
        load_run(run_dir / "saddle").cells[0].spec["data"]["eigenvalues"]
    )
    for o in study.saddle_outcomes(run):
        first = next((k for k, g in zip(o.ks, o.gaps) if g <= 1e-6 * abs(f_star)), None)
        assert o.k_min == first
        assert o.f_star == pytest.approx(f_star)


def test_twin_runs_pair_identical_computations_only():
    def run(name, fs, times, method="newton-cg"):
        rows = [
            {"k": k, "f": f, "solver_time": t, "test_accuracy": 0.5 + 0.1 * k}
            for k, (f, t) in enumerate(zip(fs, times))
        ]
        return SolverRun(name, name, method, rows)

    a = run("Newton-CG · damping=0.01", [3.0, 2.0, 1.0, 0.5], [0.0, 1.0, 2.0, 3.0])
    b = run("Newton-CG", [3.0, 2.0, 1.0, 0.5], [0.0, 1.5, 3.0, 4.5])  # same f, slower clock
    c = run("ARC", [3.0, 2.5, 1.0, 0.5], [0.0, 1.0, 2.0, 3.0], method="arc")
    settings = [Setting("Newton-CG", "damping=0.01", "full", reach(a, "", 0.8), 0.9, "")]
    subs = {
        "Newton-CG": {("all", "subsample 1000"): reach(b, "all", 0.8)},
        "ARC": {("all", "all"): reach(c, "all", 0.8)},
    }
    [twin] = twin_runs(settings, subs)
    assert twin.first.time == 3.0 and twin.second.time == 4.5
    assert twin.ratio == pytest.approx(1.5)


def test_saddle_part_alone_reports_its_criterion_only(tmp_path):
    """The saddle part run by itself (no data needed): its report carries criterion 3, its
    table and figure, and no target note (nothing there is timed to a test accuracy)."""
    spec = load_spec("studies/xu-criteria/saddle", quick=True, overrides=[("max_iter", 30)])
    run_dir = start_run(spec, tmp_path / "run", QUIET)
    [report] = write_report(run_dir)
    text = report.read_text()
    assert "| 3. Escaping saddle points" in text and study.T_SADDLE in text
    assert "| 1. " not in text and "T is test accuracy" not in text
    assert (report.parent / "figures" / "xu-saddle.png").stat().st_size > 1000

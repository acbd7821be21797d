"""The bundled study ``studies/preconditioning``: its quick run end to end, the metric
``layer_block_structure`` against dense autodiff references, and every rule of its report on
hand-made inputs where the answer is known."""

import math
import re

import pytest
import torch
from torch import nn

from secondorder.experiments.metrics import EXTRA_METRICS, layer_block_structure
from secondorder.experiments.runner import RunOptions, start_run
from secondorder.experiments.spec import load_spec
from secondorder.objective import ModelObjective
from secondorder.report import write_report
from secondorder.report.rundata import CellRun, SolverRun
from secondorder.report.studies import preconditioning as study
from secondorder.report.studies.preconditioning import Config, ToTarget
from secondorder.sampling import make_sampler

QUIET = RunOptions(progress=False, log=lambda msg: None)


def _cited_figures(text: str, report_dir) -> list:
    links = re.findall(r"!\[[^\]]*\]\((figures/precond-[^)]+)\)", text)
    return [report_dir / link for link in links]


def _check_report(report, n_problems: int) -> str:
    text = report.read_text()
    assert text.count("## Preconditioning (open question 3)") == 1  # not again per part
    head = text.split("## Preconditioning (open question 3)", 1)[1]
    assert head.lstrip().startswith("### Conclusions")
    assert "| question | what this run found |" in head
    figures = _cited_figures(text, report.parent)
    # one loss figure per problem, the block figure once
    assert len(figures) == n_problems + 1
    for f in figures:
        assert f.is_file() and f.stat().st_size > 1000
    for title in (study.T_ITER, study.T_BLOCK):
        assert title in text
    return text


def test_quick_suite_end_to_end(tmp_path, fashion_mnist):
    spec = load_spec("studies/preconditioning", quick=True)
    run = start_run(spec, tmp_path / "run", QUIET)
    [report] = write_report(run)
    text = _check_report(report, n_problems=2)
    assert "fashion-mnist: Newton-CG:" in text and "small-net: Newton-CG:" in text


def test_small_net_part_end_to_end(tmp_path):
    """The synthetic part alone (no data set needed): its own report carries the study."""
    spec = load_spec(
        "studies/preconditioning/small-net",
        quick=True,
        overrides=[("max_iter", 6), ("data.n_train", 80)],
    )
    run = start_run(spec, tmp_path / "run", QUIET)
    [report] = write_report(run)
    text = _check_report(report, n_problems=1)
    assert "K-FAC beats every diagonal in" in text


# -- the metric --------------------------------------------------------------------------------
def _objective(n: int = 30, widths=(4, 5, 3), seed: int = 0, sampler=None) -> ModelObjective:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, widths[0], generator=g, dtype=torch.float64)
    y = torch.randint(0, widths[-1], (n,), generator=g)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Sigmoid()]
    model = nn.Sequential(*layers[:-1]).double()
    return ModelObjective(model, "cross_entropy", (X, y), sampler=sampler, dtype=torch.float64)


def _reference(obj: ModelObjective, theta: torch.Tensor):
    """Dense H and G of the mean loss by torch.func, independent of the curvature engine."""
    X, y, _ = obj.samples("value")

    def out(t):
        return obj.forward(t, X)

    def mean_loss(t):
        return nn.functional.cross_entropy(out(t), y)

    H = torch.func.hessian(mean_loss)(theta)
    J = torch.func.jacrev(out)(theta)  # (n, c, P)
    p = torch.softmax(out(theta), dim=1)
    Hz = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / len(X)
    G = torch.einsum("ncp,ncd,ndq->pq", J, Hz, J)
    return H, G


def _ratio(a, b):
    return float(torch.linalg.matrix_norm(a) / torch.linalg.matrix_norm(b))


def test_block_structure_matches_dense_autodiff():
    obj = _objective()
    theta = obj.initial_theta() + 0.5 * torch.randn(obj.n_params, dtype=torch.float64)
    got = layer_block_structure(obj, theta, None)
    H, G = _reference(obj, theta)
    sizes = [4 * 5 + 5, 5 * 3 + 3]
    bounds = [(0, sizes[0]), (sizes[0], sizes[0] + sizes[1])]
    blocksq = 0.0
    for layer, (a, b) in enumerate(bounds):
        Hl, Gl = H[a:b, a:b], G[a:b, a:b]
        assert got["diag_fraction_h"][layer] == pytest.approx(
            _ratio(torch.diag(torch.diagonal(Hl)), Hl), rel=1e-8
        )
        assert got["diag_fraction_ggn"][layer] == pytest.approx(
            _ratio(torch.diag(torch.diagonal(Gl)), Gl), rel=1e-8
        )
        blocksq += float(torch.linalg.matrix_norm(Hl)) ** 2
    assert got["layer_block_fraction"] == pytest.approx(
        blocksq**0.5 / float(torch.linalg.matrix_norm(H)), rel=1e-8
    )
    # the output layer's K-FAC: E_i[H_z,i] ⊗ E_i[ã ãᵀ], written out by hand
    X, y, _ = obj.samples("value")
    with torch.no_grad():
        a = torch.sigmoid(X @ theta[:20].view(5, 4).T + theta[20:25])
        p = torch.softmax(obj.forward(theta, X), dim=1)
    a_aug = torch.cat([a, torch.ones(len(X), 1, dtype=a.dtype)], dim=1)
    A = a_aug.T @ a_aug / len(X)
    Gk = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    K = torch.kron(Gk, A)  # vec(W̃) row-major: rows of W then the bias column
    idx = torch.arange(3 * 6).view(3, 6)
    order = torch.cat([idx[:, :5].reshape(-1), idx[:, 5]])
    K = K[order][:, order]
    a, b = bounds[1]
    assert got["kfac_error_ggn"][1] == pytest.approx(_ratio(G[a:b, a:b] - K, G[a:b, a:b]), 1e-8)
    assert got["kfac_error_h"][1] == pytest.approx(_ratio(H[a:b, a:b] - K, H[a:b, a:b]), 1e-8)


def test_block_structure_kfac_is_exact_for_one_sample():
    """For one sample G_l = (J ᵀ H_z J) ⊗ (ã ãᵀ) exactly, so K-FAC's error vanishes; with many
    samples it does not."""
    one = _objective(n=1)
    many = _objective(n=40)
    e1 = layer_block_structure(one, one.initial_theta(), None)["kfac_error_ggn"]
    e40 = layer_block_structure(many, many.initial_theta() * 4, None)["kfac_error_ggn"]
    assert max(e1) < 1e-10
    assert max(e40) > 1e-3


def test_block_structure_is_registered_and_refuses_what_it_cannot_do():
    assert EXTRA_METRICS["layer_block_structure"] is layer_block_structure
    big = _objective(n=4, widths=(80, 60, 3))  # 5043 parameters
    with pytest.raises(ValueError, match="layer_block_structure.*5043 parameters"):
        layer_block_structure(big, big.initial_theta(), None)
    uneven = _objective(n=10, sampler=make_sampler("fixed", 10, batch_size=4, n_batches=3))
    with pytest.raises(ValueError, match="equal sample weights"):
        layer_block_structure(uneven, uneven.initial_theta(), None)


# -- the rules ---------------------------------------------------------------------------------
def _cfg(pre, fs, ts=None, method="lbfgs"):
    ks = list(range(len(fs)))
    return Config(f"{method} {pre}", method, pre, ks, list(fs), list(ts or ks))


def test_target_is_the_best_runs_loss_at_half_its_iterations():
    best = _cfg("kfac", [4, 3, 2, 1, 0.5, 0.25, 0.1])  # final 0.1, K = 6, f(3) = 1
    other = _cfg("none", [4, 3.5, 3, 2.5, 2, 1.5, 1.2])
    assert study.target_level([other, best]) == 1
    res = study.to_target([other, best])["lbfgs"]
    assert [r.preconditioner for r in res] == ["none", "kfac"]  # table order
    none, kfac = res
    assert (kfac.iterations, kfac.seconds) == (3, 3)
    assert none.iterations is None and none.seconds is None and not none.reached
    assert kfac.final == 0.1 and kfac.per_iteration == 1
    # the second target: where "none" ends (1.2), which K-FAC passes at iteration 3
    assert study.none_level([other, best]) == 1.2
    none, kfac = study.to_target([other, best], study.none_level)["lbfgs"]
    assert (none.iterations, kfac.iterations) == (6, 3)
    assert math.isnan(study.none_level([best]))
    assert not study.to_target([best], study.none_level)["lbfgs"][0].reached


def _tt(pre, it, sec, final=1.0):
    return ToTarget("nlcg", pre, 0.5, it, sec, final, None)


def test_winner_by_iterations_and_by_seconds_differ():
    rows = [_tt("none", 10, 1.0), _tt("kfac", 4, 3.0), _tt("eq14", None, None)]
    assert study.winner(rows, "iterations").preconditioner == "kfac"
    assert study.winner(rows, "seconds").preconditioner == "none"
    assert study.winner([_tt("none", None, None)], "seconds") is None
    tie = [_tt("eq14", 4, 2.0), _tt("kfac", 4, 1.0)]
    assert study.winner(tie, "iterations").preconditioner == "kfac"


def test_slower_than_none():
    rows = [
        _tt("none", 10, 2.0),
        _tt("eq14", 5, 4.0),  # fewer iterations, more seconds
        _tt("hessian-diag", 12, 2.5),  # both more
        _tt("ggn-diag", None, None),  # misses
        _tt("kfac", 3, 1.0),  # faster
    ]
    assert study.slower_than_none(rows) == [
        ("eq14", "fewer iterations but more seconds"),
        ("hessian-diag", "more seconds"),
        ("ggn-diag", "misses the target"),
    ]
    missing = [_tt("none", None, None, 1.0), _tt("eq14", None, None, 2.0)]
    missing.append(_tt("kfac", None, None, 0.5))
    assert study.slower_than_none(missing) == [("eq14", "ends above none")]
    assert study.slower_than_none([_tt("kfac", 1, 1.0)]) == []


def test_kfac_beats_diagonals():
    beats = [_tt("kfac", 3, 1.0), _tt("eq14", 5, 1.0), _tt("ggn-diag", None, None)]
    assert study._kfac_beats_diagonals(beats)
    assert not study._kfac_beats_diagonals([_tt("kfac", 6, 1.0), _tt("eq14", 5, 1.0)])
    # nobody reaches T: the final loss decides
    low = [_tt("kfac", None, None, 0.1), _tt("eq14", None, None, 0.2)]
    assert study._kfac_beats_diagonals(low)
    assert not study._kfac_beats_diagonals([_tt("kfac", None, None, 0.3), low[1]])


def _block_cell(rows_per_solver) -> CellRun:
    solvers = [SolverRun(f"s{i}", f"s{i}", "lbfgs", rows) for i, rows in enumerate(rows_per_solver)]
    return CellRun("main", None, {}, 0, {}, solvers)


def test_block_values_and_kfac_closer():
    def row(k, rho_g, kfac):
        return {
            "k": k,
            "diag_fraction_h": rho_g,
            "diag_fraction_ggn": rho_g,
            "kfac_error_ggn": kfac,
            "kfac_error_h": kfac,
            "layer_block_fraction": 0.9,
        }

    # diagonal error √(1 − 0.6²) = 0.8: K-FAC at 0.5 is closer, at 0.9 it is not
    start = row(0, [0.6, 0.6], [0.5, 0.9])
    ends = [row(5, [0.6, 0.6], [0.9, 0.9]), row(7, [0.6, 0.6], [0.6, 0.95])]
    # rows without the metric (between its recordings) are skipped
    cell = _block_cell([[start, {"k": 3}, ends[0]], [start, ends[1], {"k": 8}]])
    blocks = study.block_values(cell)
    assert blocks["kfac_error_ggn"]["start"] == [[0.5, 0.9]]
    assert blocks["kfac_error_ggn"]["end"] == [[0.9, 0.9], [0.6, 0.95]]
    assert study.kfac_closer(blocks, "start") == (1, 2)
    # medians over runs at the end: layer 1 (0.9 + 0.6)/2 = 0.75 < 0.8; layer 2 0.925
    assert study.kfac_closer(blocks, "end") == (1, 2)
    assert math.isclose(study._per_layer_median(blocks["kfac_error_ggn"]["end"])[0], 0.75)
    worse = study.block_values(_block_cell([[row(0, [0.6, 0.6], [0.85, 0.99])]]))
    assert study.kfac_closer(worse, "start") == (0, 2)

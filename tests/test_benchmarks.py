"""The benchmark scripts still run (tiny sizes) and their solvers all make progress."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", ROOT / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_solver_benchmark_runs_every_row_and_each_lowers_the_objective(capsys, fashion_mnist):
    bench = _load("solvers")
    bench.main(["--iters", "3", "--n-train", "300", "--threads", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert "÷ torch.optim.LBFGS" in header
    names = [r.split("|")[1].strip() for r in body]
    assert names == [
        "secondorder L-BFGS",
        "secondorder NLCG",
        "torch.optim.LBFGS, one step()",
        "torch.optim.LBFGS, step() per iteration",
        "scipy L-BFGS-B (float64)",
        "scipy CG (float64)",
    ]
    # the starting objective, computed independently of the script's own evaluation
    import torch
    from torch import nn

    from secondorder.data import load_fashion_mnist
    from secondorder.models import mlp

    data = load_fashion_mnist(dtype=torch.float64)
    X, y = data.train.X[:300], data.train.y[:300]
    model = mlp([784, 300, 10], "sigmoid", seed=0, dtype=torch.float64)
    with torch.no_grad():
        w2 = sum((p**2).sum() for n, p in model.named_parameters() if n.endswith("weight"))
        f0 = float(nn.functional.cross_entropy(model(X), y) + 0.01 / (2 * 60000) * w2)
    for r in body:
        cells = [c.strip() for c in r.split("|")[1:-1]]
        iterations, f = int(cells[1]), float(cells[6])
        assert iterations >= 1 and math.isfinite(f)
        assert f < f0, (cells[0], f, f0)


# -- benchmarks/time_to_accuracy.py on synthetic data (no dataset needed) -----------------------

_TTA_ROWS = ("torch-adam", "torch-lbfgs", "lbfgs")


def _tta_args(out, *extra: str) -> list[str]:
    return [
        "--data", "synthetic", "--in-process", "--task", "1L", "--threads", "1",
        "--rows", ",".join(_TTA_ROWS), "--budget", "1", "--sweep-budget", "0.3",
        "--n-train", "400", "--n-test", "200", "--out", str(out), *extra,
    ]  # fmt: skip


def _reference_start(bench):
    """Test accuracy and training objective at θ₀, computed here in float64."""
    import torch
    from torch import nn

    from secondorder.models import mlp

    data = bench.synthetic_splits(400, 200, seed=0)
    model = mlp([784, 300, 10], "sigmoid", seed=0, dtype=torch.float64)
    with torch.no_grad():
        Xt, yt = data.test.X.double(), data.test.y
        acc = float((model(Xt).argmax(1) == yt).double().mean())
        X, y = data.train.X.double(), data.train.y
        w2 = sum((p**2).sum() for n, p in model.named_parameters() if n.endswith("weight"))
        loss = float(nn.functional.cross_entropy(model(X), y) + 0.01 / (2 * 60000) * w2)
    return acc, loss


def test_time_to_accuracy_rows_record_curves_sweeps_and_resume(tmp_path, capsys):
    import json

    bench = _load("time_to_accuracy")
    bench.main(_tta_args(tmp_path))
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "1L.json").read_text())
    assert sorted(data["rows"]) == sorted(_TTA_ROWS)
    acc0, loss0 = _reference_start(bench)
    for name, rec in data["rows"].items():
        curve = rec["curve"]
        assert rec["status"] in ("target", "budget"), (name, rec["status"], rec["message"])
        # every row starts from the same weights: its first checkpoint is θ₀
        assert curve[0]["step"] == 0
        assert curve[0]["accuracy"] == pytest.approx(acc0, abs=1e-9)
        assert curve[0]["loss"] == pytest.approx(loss0, rel=1e-5)
        assert max(p["accuracy"] for p in curve) > acc0 + 0.3, name
        times = [p["time"] for p in curve]
        assert times == sorted(times) and all(math.isfinite(t) for t in times)
        s = rec["summary"]
        hit = next((p for p in curve if p["accuracy"] >= 0.85), None)
        assert s["time_to_0.85"] == (None if hit is None else hit["time"])
        assert s["best_accuracy"] == max(p["accuracy"] for p in curve)
        assert rec["label"] in out
    # the sweep: every candidate recorded, the chosen one first by time to 85% then accuracy
    sweep = data["sweeps"]["torch-adam"]
    assert [c["lr"] for c in sweep["candidates"]] == [1e-3, 3e-3, 1e-2]

    def rank(c):
        t = c["summary"]["time_to_0.85"]
        return (math.inf if t is None else t, -c["summary"]["best_accuracy"])

    assert sweep["chosen"] == min(sweep["candidates"], key=rank)["lr"]
    assert data["rows"]["torch-adam"]["lr"] == sweep["chosen"]
    for fig in ("accuracy_time_1L.png", "accuracy_epochs_1L.png"):
        assert (tmp_path / fig).stat().st_size > 10_000
    # --resume: nothing is run again and the stored curves stay
    bench.main(_tta_args(tmp_path, "--resume"))
    again = capsys.readouterr().out
    assert again.count("stored (--resume)") == len(_TTA_ROWS)
    assert "sweep torch-adam lr=" not in again
    assert json.loads((tmp_path / "1L.json").read_text())["rows"] == data["rows"]


def test_time_to_accuracy_subprocess_row_and_width_table(tmp_path):
    bench = _load("time_to_accuracy")
    s = bench.Settings(budget=0.5, n_train=300, n_test=100, threads=1, data="synthetic")
    rec = bench.measure_in_subprocess(bench.Job(s, "nlcg", None, 0.5))
    assert rec["status"] in ("target", "budget"), rec["message"]
    assert rec["curve"][0]["step"] == 0 and len(rec["curve"]) >= 2
    assert rec["peak_memory_bytes"] is not None and rec["peak_memory_bytes"] >= 0
    table = bench.width_rows(s, ["lbfgs"], [8, 16], 0.3, tmp_path, False, bench.measure)
    line = next(row for row in table.splitlines() if row.startswith("| secondorder L-BFGS"))
    cells = [c.strip() for c in line.split("|")[2:-1]]
    assert len(cells) == 2 and all(float(c) > 0 for c in cells)


@pytest.mark.slow
def test_distributed_benchmark_times_one_and_two_processes(capsys, fashion_mnist):
    bench = _load("distributed")
    bench.main(["--n-train", "64", "--iters", "1"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "-|" not in r]
    body = [[c.strip() for c in r.split("|")[1:-1]] for r in rows[1:]]
    assert [(c[0], c[1]) for c in body] == [
        (task, n) for task in ("gradient", "L-BFGS", "Newton-CG (GGN)") for n in ("1", "2")
    ]
    for cells in body:
        seconds, speedup, efficiency = map(float, cells[2:])
        # both printed to two decimals: their rounding errors add up to 0.005 + 0.005 / n
        tol = 0.005 + 0.005 / int(cells[1]) + 1e-9
        assert seconds > 0 and abs(efficiency - speedup / int(cells[1])) <= tol


def _tiny(out, *extra: str) -> list[str]:
    return [
        "--data", "synthetic", "--in-process", "--task", "1L", "--threads", "1",
        "--rows", "lbfgs", "--budget", "0.3", "--n-train", "300", "--n-test", "100",
        "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--budget", "nan"], "--budget"),
        (["--budget", "inf"], "--budget"),
        (["--budget", "0"], "--budget"),
        (["--sweep-budget", "-1"], "--sweep-budget"),
        (["--width-budget", "nan"], "--width-budget"),
        (["--n-train", "-5"], "--n-train"),
        (["--n-train", "0"], "--n-train"),
        (["--n-test", "0"], "--n-test"),
        (["--threads", "-1"], "--threads"),
        (["--threads", "0"], "--threads"),
        (["--seed", "-1"], "--seed"),
        (["--batch-size", "0"], "--batch-size"),
        (["--device", "tpu"], "--device"),
        (["--device", "cpu:x"], "--device"),
    ],
)
def test_time_to_accuracy_refuses_bad_arguments_naming_the_flag(tmp_path, capsys, argv, flag):
    bench = _load("time_to_accuracy")
    with pytest.raises(SystemExit) as exc:
        bench.main(_tiny(tmp_path / "out", *argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}" in err or f"error: {flag}" in err, err
    assert not (tmp_path / "out" / "1L.json").exists()


def test_time_to_accuracy_checks_its_output_before_measuring_and_keeps_other_settings(
    tmp_path, capsys, monkeypatch
):
    import json

    bench = _load("time_to_accuracy")
    measured = []
    real = bench.measure
    monkeypatch.setattr(bench, "measure", lambda job, *a, **k: measured.append(job) or real(job))
    # --out an existing file; the full Fashion-MNIST asked for more images than it has
    (tmp_path / "file").write_text("x")
    for argv, expected in (
        (_tiny(tmp_path / "file"), "--out"),
        (_tiny(tmp_path / "o", "--data", "fashion-mnist", "--n-train", "70000"), "--n-train"),
    ):
        with pytest.raises(SystemExit) as exc:
            bench.main(argv)
        assert exc.value.code == 2 and expected in capsys.readouterr().err
    # results files this script cannot read back: refused naming the file, never overwritten
    out = tmp_path / "out"
    out.mkdir()
    for text in ('{"settings": {"task": "1L"}, "rows": {', "[1, 2]", '{"rows": {}}',
                 '{"settings": {}, "rows": {"lbfgs": {"curve": []}}}'):  # fmt: skip
        (out / "1L.json").write_text(text)
        for resume in ((), ("--resume",)):
            with pytest.raises(SystemExit) as exc:
                bench.main(_tiny(out, *resume))
            err = capsys.readouterr().err
            assert exc.value.code == 2 and "1L.json: not a results file" in err, err
            assert (out / "1L.json").read_text() == text
    assert not measured
    # rows of other settings stay in the file, and come back with their settings
    (out / "1L.json").unlink()
    bench.main(_tiny(out))
    first = json.loads((out / "1L.json").read_text())
    bench.main(_tiny(out, "--n-train", "200"))
    second = json.loads((out / "1L.json").read_text())
    assert second["settings"]["n_train"] == 200 and "lbfgs" in second["rows"]
    assert [b["settings"]["n_train"] for b in second["other_settings"]] == [300]
    assert second["other_settings"][0]["rows"] == first["rows"]
    n = len(measured)
    bench.main(_tiny(out, "--resume"))
    assert len(measured) == n and "stored (--resume)" in capsys.readouterr().out
    assert json.loads((out / "1L.json").read_text()) == second  # nothing new to write

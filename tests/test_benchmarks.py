"""The benchmark scripts still run (tiny sizes) and their solvers all make progress."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from conftest import require_peers

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
        (["--task", "cnn", "--widths", "8,16"], "--widths"),
        (["--task", "mlp"], "--task"),
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


# -- the CNN task and the rows added beside the first ones -------------------------------------

#: the rows that run on the CNN and are not full-batch (every new row among them)
_CNN_ROWS = (
    "torch-adamw", "torch-sgd", "torch-muon", "soap", "shampoo", "kron", "asdl-kfac",
    "adam", "kfac", "kfac-reduce", "ekfac", "kfac-optim", "kfac-optim-cnn", "kfac-precond",
    "hessian-free",
)  # fmt: skip


def _cnn_reference(bench, n_train: int, n_test: int):
    """Test accuracy and training objective at θ₀ of the documented CNN (written out here
    again, PyTorch's default initialisation under seed 0), in float64."""
    import torch
    from torch import nn

    data = bench.synthetic_splits(n_train, n_test, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(1568, 10),
    ).double()  # fmt: skip
    assert sum(p.numel() for p in model.parameters()) == 20_490
    with torch.no_grad():
        acc = float((model(data.test.X.double()).argmax(1) == data.test.y).double().mean())
        w2 = sum((p**2).sum() for n, p in model.named_parameters() if n.endswith("weight"))
        ce = nn.functional.cross_entropy(model(data.train.X.double()), data.train.y)
        loss = float(ce + 0.01 / (2 * 60000) * w2)
    return acc, loss


def test_time_to_accuracy_cnn_task_defaults_and_rows():
    bench = _load("time_to_accuracy")
    s = bench.Settings(task="cnn")
    assert s.targets == (0.90, 0.91) and s.widths == ()
    assert bench.Settings(task="1L").targets == (0.85, 0.88)
    assert bench.TASK_BUDGETS["cnn"] == (300.0, 60.0)
    cnn = bench.rows_of("cnn")
    assert set(_CNN_ROWS) <= set(cnn)
    # full-batch rows run on the MLPs only (unless --rows names them)
    assert not {"lbfgs", "scipy-lbfgsb", "torch-lbfgs", "newton-cg"} & set(cnn)
    assert "kfac-reduce" not in bench.rows_of("1L")
    new = ("torch-adamw", "torch-muon", "soap", "shampoo", "kron", "asdl-kfac", "ekfac",
           "kfac-optim", "kfac-precond")  # fmt: skip
    for task in ("1L", "2L", "cnn"):
        assert set(new) <= set(bench.rows_of(task)), task
        # every peer and every one of our fixed-step rows is tuned by a recorded sweep
        for name in new:
            if name == "kfac-optim":  # the optimiser's defaults, untuned on purpose
                assert not bench.row_by_name(name).grid(task)
                continue
            assert bench.row_by_name(name).grid(task), (name, task)
    # the CNN recipe of optim.KFAC: its damping swept, on the CNN only
    recipe = bench.row_by_name("kfac-optim-cnn")
    assert recipe.tasks == ("cnn",) and all(d is not None for _, d in recipe.grid("cnn"))
    # K-FAC rows in loops: a grid of (lr, damping) pairs, their own per task
    grid = bench.row_by_name("kfac-precond").grid("cnn")
    assert len(grid) == 9 and all(lr is not None and d is not None for lr, d in grid)
    assert grid != bench.row_by_name("kfac-precond").grid("1L")
    assert bench.row_by_name("asdl-kfac").grid("cnn") == grid  # ASDL's and ours alike
    assert all(lr is None for lr, _ in bench.row_by_name("kfac").grid("cnn"))  # damping only
    assert bench.task_list("all") == ["1L", "2L", "cnn"]
    assert bench.task_list("both") == ["1L", "2L"]


@pytest.mark.parametrize("name", _CNN_ROWS)
def test_time_to_accuracy_cnn_rows_train_from_the_same_weights(name):
    """Two epochs of each row on 256 synthetic images (mini-batches of 32): it starts at the
    common θ₀ and lowers the training objective."""
    bench = _load("time_to_accuracy")
    row = bench.row_by_name(name)
    note = row.needs() if row.needs else None
    if note:
        require_peers(note)
    s = bench.Settings(
        task="cnn", n_train=256, n_test=128, threads=1, data="synthetic", batch_size=32
    )
    # the middle learning rate of the row's sweep and its largest damping (K-FAC's first
    # steps on these blobs overshoot with less)
    lrs = sorted({lr for lr, _ in row.grid("cnn")} - {None})
    lr = lrs[len(lrs) // 2] if lrs else None
    damping = max((d for _, d in row.grid("cnn") if d is not None), default=None)
    if row.lr_from:
        lr = bench.row_by_name(row.lr_from).grid("cnn")[0][0]
    job = bench.Job(s, name, lr, 60.0, damping=damping, max_epochs=2.0)
    rec = bench.measure(job)
    assert rec["status"] in ("epochs", "target"), (rec["status"], rec["message"])
    curve = rec["curve"]
    acc0, loss0 = _cnn_reference(bench, 256, 128)
    assert curve[0]["step"] == 0
    assert curve[0]["accuracy"] == pytest.approx(acc0, abs=1e-9)
    assert curve[0]["loss"] == pytest.approx(loss0, rel=1e-5)
    assert curve[-1]["epochs"] >= 2.0 or rec["status"] == "target"
    assert curve[-1]["loss"] < loss0, (name, curve[-1]["loss"], loss0)
    assert rec["lr"] == lr and rec["damping"] == damping
    if damping is not None:
        assert rec["opts"]["damping"] == damping


def test_time_to_accuracy_cnn_sweeps_lr_and_damping_records_and_resumes(tmp_path, capsys):
    import json

    bench = _load("time_to_accuracy")
    argv = [
        "--data", "synthetic", "--in-process", "--task", "cnn", "--threads", "1",
        "--rows", "kfac-precond,torch-adam", "--budget", "0.5", "--sweep-budget", "0.1",
        "--n-train", "200", "--n-test", "100", "--out", str(tmp_path),
    ]  # fmt: skip
    bench.main(argv)
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "cnn.json").read_text())
    assert data["settings"]["task"] == "cnn" and data["settings"]["targets"] == [0.9, 0.91]
    sweep = data["sweeps"]["kfac-precond"]
    pairs = [(c["lr"], c["damping"]) for c in sweep["candidates"]]
    assert pairs == bench.row_by_name("kfac-precond").grid("cnn")

    def rank(c):
        t = c["summary"]["time_to_0.9"]
        return (math.inf if t is None else t, -c["summary"]["best_accuracy"])

    best = min(sweep["candidates"], key=rank)
    assert (sweep["chosen"], sweep["chosen_damping"]) == (best["lr"], best["damping"])
    row = data["rows"]["kfac-precond"]
    assert (row["lr"], row["damping"]) == (best["lr"], best["damping"])
    assert row["opts"]["damping"] == best["damping"]
    # an lr-only sweep keeps its old record: lrs, no damping
    assert "chosen_damping" not in data["sweeps"]["torch-adam"]
    assert "| method | lr | damping |" in out and "sweep kfac-precond lr=" in out
    assert "(chosen)" in out
    for fig in ("accuracy_time_cnn.png", "accuracy_epochs_cnn.png"):
        assert (tmp_path / fig).stat().st_size > 10_000
    bench.main([*argv, "--resume"])
    again = capsys.readouterr().out
    assert again.count("stored (--resume)") == 2 and "sweep kfac-precond lr=" not in again
    assert json.loads((tmp_path / "cnn.json").read_text())["rows"] == data["rows"]


def test_time_to_accuracy_missing_peer_packages_give_skipped_rows_with_a_note(
    tmp_path, capsys, monkeypatch
):
    import json

    import torch

    bench = _load("time_to_accuracy")
    # an import of a missing package fails: None in sys.modules makes it raise ImportError
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)
    monkeypatch.setitem(sys.modules, "asdl", None)
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    rows = "soap,shampoo,kron,asdl-kfac,torch-muon,torch-adam"
    bench.main([
        "--data", "synthetic", "--in-process", "--task", "cnn", "--threads", "1",
        "--rows", rows, "--budget", "0.3", "--sweep-budget", "0.1",
        "--n-train", "200", "--n-test", "100", "--out", str(tmp_path),
    ])  # fmt: skip
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "cnn.json").read_text())
    skipped = data["skipped"]
    assert sorted(skipped) == ["asdl-kfac", "kron", "shampoo", "soap", "torch-muon"]
    for name in ("soap", "shampoo", "kron"):
        assert "pip install pytorch-optimizer" in skipped[name]
    assert "pip install asdfghjkl" in skipped["asdl-kfac"]
    assert "Muon" in skipped["torch-muon"]
    assert list(data["rows"]) == ["torch-adam"] and not set(skipped) & set(data["sweeps"])
    for name, note in skipped.items():
        assert f"{name}: skipped — {note}" in out
        assert f"| {bench.row_by_name(name).label} | skipped: {note} |" in out


def test_time_to_accuracy_a_row_that_blows_up_is_diverged_not_an_error():
    bench = _load("time_to_accuracy")
    s = bench.Settings(task="cnn", n_train=256, n_test=128, threads=1, data="synthetic")
    rec = bench.measure(bench.Job(s, "kfac-precond", 1e6, 30.0, damping=1e-6, max_epochs=3.0))
    assert rec["status"] == "diverged", (rec["status"], rec["message"])

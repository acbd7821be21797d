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


def test_solver_benchmark_runs_every_row_and_each_lowers_the_objective(capsys):
    from secondorder.data import find_fashion_mnist

    if find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST is not installed")
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

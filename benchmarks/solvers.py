"""Quasi-Newton and conjugate-gradient solvers against their peers, in one run.

The problem is the seed study's Table 3 network: a 784-300-10 sigmoid MLP on the 60,000
Fashion-MNIST training images, softmax cross-entropy plus λ/(2m)·‖W‖² (λ = 0.01, m = 60,000),
the full objective, float32 (scipy works in float64 on a float64 copy, as its users do). Every
solver starts from the same weights and runs the same number of iterations with its stopping
tests switched off; the table gives seconds, evaluations, the final objective (all evaluated
by one float64 function) and training accuracy, and the time ratio to torch.optim.LBFGS.

    python benchmarks/solvers.py                # 100 iterations (about 10 minutes on 2 cores)
    python benchmarks/solvers.py --quick        # 20 iterations on 10,000 images
    python benchmarks/solvers.py --threads 1 --iters 50

Rows: secondorder's L-BFGS (m = 10) and NLCG (PR+), both with a strong-Wolfe search;
torch.optim.LBFGS (history 10, strong Wolfe) driven by one ``step`` call and, as it is often
used, by one ``step`` per iteration (``max_iter=1``); scipy.optimize's L-BFGS-B (maxcor 10) and
CG.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from secondorder.data import load_fashion_mnist
from secondorder.models import mlp
from secondorder.objective import ModelObjective
from secondorder.solvers import minimize

L2, L2_M = 0.01, 60_000


@dataclass
class Row:
    name: str
    seconds: float
    iterations: int
    evaluations: int
    theta: torch.Tensor


def _penalty(model: nn.Module) -> torch.Tensor:
    return sum((p**2).sum() for n, p in model.named_parameters() if n.endswith("weight"))


def _torch_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(X), y) + L2 / (2 * L2_M) * _penalty(model)


def _ours(method: str, objective: ModelObjective, theta0: torch.Tensor, iters: int, **opts) -> Row:
    t = time.perf_counter()
    res = minimize(objective, theta0.clone(), method, "wolfe", max_iter=iters, gtol=None, **opts)
    return Row("", time.perf_counter() - t, res.nit, res.nfev, res.theta.detach().clone())


def _torch_lbfgs(model: nn.Module, X, y, theta0, iters: int, per_iteration: bool) -> Row:
    torch.nn.utils.vector_to_parameters(theta0.clone(), model.parameters())
    evals = 0

    def closure():
        nonlocal evals
        evals += 1
        model.zero_grad()
        loss = _torch_loss(model, X, y)
        loss.backward()
        return loss

    common = dict(
        lr=1.0,
        history_size=10,
        line_search_fn="strong_wolfe",
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )
    t = time.perf_counter()
    if per_iteration:
        opt = torch.optim.LBFGS(model.parameters(), max_iter=1, **common)
        for _ in range(iters):
            opt.step(closure)
    else:
        opt = torch.optim.LBFGS(
            model.parameters(), max_iter=iters, max_eval=iters * 5 // 4, **common
        )
        opt.step(closure)
    seconds = time.perf_counter() - t
    n_iter = opt.state[next(iter(opt.state))]["n_iter"]
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    return Row("", seconds, n_iter, evals, theta)


def _scipy(method: str, model64: nn.Module, X64, y, theta0, iters: int) -> Row:
    from scipy.optimize import minimize as sp_minimize

    evals = 0

    def fun(x: np.ndarray):
        nonlocal evals
        evals += 1
        torch.nn.utils.vector_to_parameters(torch.from_numpy(x), model64.parameters())
        model64.zero_grad()
        loss = _torch_loss(model64, X64, y)
        loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in model64.parameters()])
        return float(loss.detach()), g.numpy().copy()

    x0 = theta0.double().numpy().copy()
    options = {"maxiter": iters, "gtol": 0.0}
    if method == "L-BFGS-B":
        options.update(maxcor=10, ftol=0.0, maxfun=iters * 5)
    t = time.perf_counter()
    res = sp_minimize(fun, x0, jac=True, method=method, options=options)
    seconds = time.perf_counter() - t
    return Row("", seconds, int(res.nit), evals, torch.from_numpy(res.x).float())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=100, help="iterations per solver")
    ap.add_argument("--n-train", type=int, default=60_000, help="training images used")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--quick", action="store_true", help="20 iterations on 10,000 images")
    args = ap.parse_args(argv)
    if args.quick:
        args.iters, args.n_train = 20, 10_000
    if args.iters < 1 or args.n_train < 1:
        ap.error("--iters and --n-train must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_fashion_mnist(dtype=torch.float32)
    X, y = data.train.X[: args.n_train], data.train.y[: args.n_train]
    model = mlp([784, 300, 10], "sigmoid", seed=0, dtype=torch.float32)
    theta0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    objective = ModelObjective(
        model, "cross_entropy", (X, y), l2=L2, l2_convention="per-sample", l2_m=L2_M
    )
    model64 = mlp([784, 300, 10], "sigmoid", seed=0, dtype=torch.float64)
    X64 = X.double()

    runs: list[tuple[str, Callable[[], Row]]] = [
        ("secondorder L-BFGS", lambda: _ours("lbfgs", objective, theta0, args.iters, memory=10)),
        ("secondorder NLCG", lambda: _ours("nlcg", objective, theta0, args.iters, variant="pr+")),
        (
            "torch.optim.LBFGS, one step()",
            lambda: _torch_lbfgs(model, X, y, theta0, args.iters, per_iteration=False),
        ),
        (
            "torch.optim.LBFGS, step() per iteration",
            lambda: _torch_lbfgs(model, X, y, theta0, args.iters, per_iteration=True),
        ),
        (
            "scipy L-BFGS-B (float64)",
            lambda: _scipy("L-BFGS-B", model64, X64, y, theta0, args.iters),
        ),
        ("scipy CG (float64)", lambda: _scipy("CG", model64, X64, y, theta0, args.iters)),
    ]
    print(
        f"784-300-10 sigmoid, {args.n_train} images, {args.iters} iterations, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        flush=True,
    )
    rows = []
    for name, run in runs:
        row = run()
        row.name = name
        rows.append(row)
        print(f"  {name}: {row.seconds:.1f} s, {row.iterations} iterations", flush=True)

    def final(theta: torch.Tensor) -> tuple[float, float]:
        torch.nn.utils.vector_to_parameters(theta.double(), model64.parameters())
        with torch.no_grad():
            f = float(_torch_loss(model64, X64, y))
            acc = float((model64(X64).argmax(1) == y).double().mean())
        return f, acc

    ref = next(r for r in rows if r.name == "torch.optim.LBFGS, one step()")
    ref_per_it = ref.seconds / max(ref.iterations, 1)
    print()
    print(
        "| solver | iterations | evaluations | s | s / iteration | ÷ torch.optim.LBFGS "
        "| f | train acc |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        f, acc = final(r.theta)
        per_it = r.seconds / max(r.iterations, 1)
        print(
            f"| {r.name} | {r.iterations} | {r.evaluations} | {r.seconds:.1f} | {per_it:.3f} | "
            f"{per_it / ref_per_it:.2f} | {f:.5f} | {acc:.4f} |"
        )


if __name__ == "__main__":
    main()

"""One process of the data-parallel tests (tests/test_distributed.py), or the same work in one
process: ``python tests/dist_worker.py OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in the environment writes ``OUT_DIR/rank<r>.pt``; :func:`scenario` is also called
in the test process itself for the single-process reference."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from secondorder import ModelObjective, distributed, minimize, mlp
from secondorder.curvature import (
    HessianOperator,
    hessian_blocks,
    hessian_diagonal,
    lanczos_eigs,
    layer_hessians,
)
from secondorder.sampling import EpochBatches, FixedBatches, Subsample

N, D, K = 61, 20, 3  # 61 samples: the shards of 2 and 3 processes are unequal
ITERS = 20


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = (X[:, :K] + 0.3 * torch.randn(N, K, generator=g, dtype=torch.float64)).argmax(1)
    return X, y


def objective(sampler=None, curvature_sampler=None) -> ModelObjective:
    """A 20-8-3 tanh network with L2 (counted once whatever the number of processes)."""
    model = mlp([D, 8, K], "tanh", seed=1, dtype=torch.float64)
    obj = ModelObjective(
        model,
        "cross_entropy",
        data(),
        l2=1e-2,
        sampler=sampler,
        curvature_sampler=curvature_sampler,
    )
    if distributed.world_size() > 1:
        distributed.data_parallel(obj)
    return obj


RUNS = {
    "lbfgs": (lambda: objective(), {"method": "lbfgs"}),
    # overlapping fixed batches: eq.-28 weights that are not uniform
    "newton-cg": (
        lambda: objective(FixedBatches(N, 16, n_batches=5, seed=3)),
        {"method": "newton-cg", "curvature": "ggn", "cg_max_iter": 8},
    ),
    "adam": (lambda: objective(EpochBatches(N, 16, seed=2)), {"method": "adam", "lr": 0.05}),
    "kfac": (
        lambda: objective(EpochBatches(N, 20, seed=4)),
        {"method": "kfac", "kind": "mc", "momentum": True, "factor_samples": 13, "lr": 0.5},
    ),
    "hessian-free": (
        lambda: objective(EpochBatches(N, 30, seed=5), Subsample(N, 17, seed=6)),
        {"method": "hessian-free", "max_cg": 5},
    ),
}


def scenario() -> dict:
    """Traces of every method, curvature by the engine, the local batch shares."""
    out: dict = {}
    for name, (make, options) in RUNS.items():
        obj = make()
        res = minimize(obj, obj.initial_theta(), max_iter=ITERS, gtol=1e-300, **options)
        out[name] = {
            "f": torch.tensor(res.trace["f"], dtype=torch.float64),
            "theta": res.theta,
            "nit": res.nit,
        }
    X, y = data()
    model = mlp([D, 8, K], "tanh", seed=1, dtype=torch.float64)
    engine = {
        "diag": (hessian_diagonal, {}),
        "layers": (layer_hessians, {}),
        "blocks": (hessian_blocks, {"pairs": [(0, 1), (1, 1)]}),
    }
    for key, (fn, opts) in engine.items():
        if distributed.world_size() > 1:
            out[key] = distributed.curvature_sum(fn, model, X, y, "cross_entropy", 1e-2, **opts)
        else:
            out[key] = fn(model, X, y, "cross_entropy", 1e-2, **opts)
    obj = objective()
    out["lanczos"] = lanczos_eigs(HessianOperator(obj), k=3, which="both")[0]
    # which samples this process saw: its share of three epoch batches
    obj = objective(EpochBatches(N, 25, seed=7))
    shares = []
    for k in range(3):
        obj.begin_iteration(k)
        shares.append(obj.samples("value")[0].clone())
    out["shares"] = shares
    out["batch_size"] = obj.batch_size
    return out


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    distributed.init(timeout=30)
    result = scenario()
    torch.save(result, Path(out_dir) / f"rank{distributed.rank()}.pt")


if __name__ == "__main__":
    main(sys.argv[1])

"""One process of the data-parallel tests (tests/test_distributed.py), or the same work in one
process. With RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment:

- ``python tests/dist_worker.py scenario OUT_DIR [NAME ...]`` writes ``OUT_DIR/rank<r>.pt``
  (:func:`scenario` is also called in the test process for the single-process reference);
- ``python tests/dist_worker.py cli FAULT AT ARGS...`` runs the command line
  ``secondorder ARGS...``; with FAULT ``kill`` or ``stop`` the last rank sends itself SIGKILL
  or SIGSTOP at its AT-th collective (a process that dies or hangs mid-run); with ``spec`` the
  last rank runs another L2 (``--set l2=0.002``) and reports another code version, with
  ``labels`` it reads other labels (ranks that disagree);
- ``python tests/dist_worker.py other-x`` makes an objective data-parallel through
  ``distributed.from_environment`` with another X on the last rank.
"""

from __future__ import annotations

import os
import signal
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
    # diagonal preconditioners: eq. 14 (per-sample gradients) and the engine's exact diagonal
    "gd-eq14": (
        lambda: objective(EpochBatches(N, 16, seed=8)),
        {"method": "gd", "preconditioner": "eq14", "lr": 0.1, "line_search": None},
    ),
    "nlcg-ggn-diag": (lambda: objective(), {"method": "nlcg", "preconditioner": "ggn-diag"}),
    "hessian-free": (
        lambda: objective(EpochBatches(N, 30, seed=5), Subsample(N, 17, seed=6)),
        {"method": "hessian-free", "max_cg": 5},
    ),
}


def scenario(names: list[str] | None = None) -> dict:
    """Traces of every method (or of ``names``), curvature by the engine, the local shares
    of three batches."""
    out: dict = {}
    for name, (make, options) in RUNS.items():
        if names and name not in names:
            continue
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


def _fault(how: str, at: int) -> None:
    """Make the last rank die (SIGKILL) or hang (SIGSTOP) at its ``at``-th collective."""
    if how == "none" or distributed.rank() != distributed.world_size() - 1:
        return
    sig = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}[how]
    original = distributed.Shard._all_reduce
    calls = [0]

    def counted(self, buf):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), sig)
        return original(self, buf)

    distributed.Shard._all_reduce = counted


def _disagree(how: str, args: list[str]) -> list[str]:
    """The last rank's arguments and code when it is to disagree with the others."""
    if distributed.rank() != distributed.world_size() - 1:
        return args
    if how == "spec":
        distributed.code_version.cache_clear()
        distributed.code_version = lambda: "0.0.0+another"
        return [*args, "--set", "l2=0.002"]
    if how == "labels":
        from secondorder.experiments import problems

        load = problems._load_data

        changed: set[int] = set()

        def other_labels(spec, cache):
            splits = load(spec, cache)
            y = splits.train.y
            if id(y) not in changed:  # the cache hands the same tensor out again
                changed.add(id(y))
                y[:5] = (y[:5] + 1) % int(y.max() + 1)
            return splits

        problems._load_data = other_labels
    return args


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    if argv[0] == "cli":
        from secondorder.cli import main as cli_main

        if argv[1] in ("spec", "labels"):
            return cli_main(_disagree(argv[1], argv[3:]))
        _fault(argv[1], int(argv[2]))
        return cli_main(argv[3:])
    if argv[0] == "other-x":
        X, y = data()
        if distributed.rank() == distributed.world_size() - 1:
            X = X.clone()
            X[0, 0] += 1e-9
        model = mlp([D, 8, K], "tanh", seed=1, dtype=torch.float64)
        obj = ModelObjective(model, "cross_entropy", (X, y), l2=1e-2)
        try:
            distributed.from_environment(obj)
        except distributed.RanksDisagree as err:
            print(f"refused: {err}", file=sys.stderr)
            return 4
        return 0
    distributed.init(timeout=30)
    result = scenario(argv[2:])
    torch.save(result, Path(argv[1]) / f"rank{distributed.rank()}.pt")
    # Leave together and skip the interpreter's finalisation: gloo's threads can still hold
    # tensors then, and freeing them there can abort the process after every result is
    # written (seen once; not reproduced in thirty runs).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Data-parallel scaling: seconds per iteration with 1 and 2 processes (one thread each).

The objective is the seed study's one-hidden-layer network on Fashion-MNIST (784-300-10,
sigmoid, cross-entropy, L2 λ/(2m)‖W‖² with λ = 0.01, m = 60,000, the full training batch);
every process holds the data, takes its share of the batch and all-reduces each sum
(:mod:`secondorder.distributed`, gloo on the CPU, NCCL with ``--device cuda``). For each number
of processes the table gives the seconds per gradient evaluation, per L-BFGS iteration and per
Newton-CG iteration with the Gauss–Newton matrix, the speed-up over one process and the
scaling efficiency (speed-up ÷ processes).

    python benchmarks/distributed.py                      # 1 and 2 processes, 60,000 images
    python benchmarks/distributed.py --procs 1,2,4 --n-train 10000
    python benchmarks/distributed.py --device cuda        # one GPU per process (NCCL)

Take timings on an otherwise idle machine: the processes compete for its cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from secondorder import ModelObjective, distributed, minimize, mlp
from secondorder.data import load_fashion_mnist

L2, L2_M = 0.01, 60_000
TASKS = ("gradient", "L-BFGS", "Newton-CG (GGN)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, work) -> tuple[float, int]:
    """(seconds, iterations) of ``work()`` between two barriers, so that every process has
    finished (the slowest process sets the time)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    _sync(device)
    t0 = time.perf_counter()
    n = work()
    _sync(device)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return time.perf_counter() - t0, n


def worker(args: argparse.Namespace) -> None:
    """One process: load the data, build the objective, time the three tasks; rank 0 writes
    the seconds per iteration to ``args.out``."""
    torch.set_num_threads(1)
    device = distributed.local_device(args.device)
    distributed.init(device=device)
    data = load_fashion_mnist(dtype=torch.float32, progress=False)
    X, y = data.train.X[: args.n_train], data.train.y[: args.n_train]
    model = mlp([784, 300, 10], "sigmoid", seed=0, dtype=torch.float32)
    obj = ModelObjective(
        model,
        "cross_entropy",
        (X, y),
        l2=L2,
        l2_convention="per-sample",
        l2_m=L2_M,
        device=device,
    )
    obj = distributed.from_environment(obj)
    theta0 = obj.initial_theta()
    obj.value_and_grad(theta0)  # warm up the kernels (and NCCL's communicators)

    def gradients() -> int:
        for _ in range(args.iters):
            obj.value_and_grad(theta0)
        return args.iters

    def solver(method: str, **options):
        def run() -> int:
            return minimize(obj, theta0, method=method, max_iter=args.iters, **options).nit

        return run

    works = {
        "gradient": gradients,
        "L-BFGS": solver("lbfgs"),
        "Newton-CG (GGN)": solver("newton-cg", curvature="ggn", cg_max_iter=10),
    }
    out = {}
    for name in TASKS:
        seconds, n = _timed(device, works[name])
        out[name] = seconds / max(n, 1)
    if distributed.is_writer():
        Path(args.out).write_text(json.dumps(out))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(n: int, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """n processes of this script (the environment torchrun would give them)."""
    port = str(_free_port())
    cmd = [sys.executable, __file__, "--worker", "--out", str(out)]
    cmd += ["--n-train", str(args.n_train), "--iters", str(args.iters), "--device", args.device]
    procs = []
    for r in range(n):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{n} processes: exit codes {codes}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", default="1,2", help="numbers of processes, e.g. 1,2,4")
    ap.add_argument("--n-train", type=int, default=60_000, help="training images (the batch)")
    ap.add_argument("--iters", type=int, default=10, help="iterations timed per task")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per process)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.n_train < 1 or args.iters < 1:
        ap.error("--n-train and --iters must be positive")
    if args.worker:
        worker(args)
        return
    try:
        procs = sorted({int(p) for p in args.procs.split(",")})
    except ValueError:
        ap.error(f"--procs must be comma-separated integers, got {args.procs!r}")
    if procs[0] < 1:
        ap.error("--procs must be positive")
    if torch.device(args.device).type == "cuda":
        gpus = torch.cuda.device_count()
        if procs[-1] > gpus:
            ap.error(f"--device cuda needs one GPU per process: {gpus} here, asked {procs[-1]}")
    times: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in procs:
            times[n] = _launch(n, args, Path(tmp) / f"{n}.json")
    base = procs[0]
    print(f"\n{args.n_train} images, {args.iters} iterations per task, device {args.device}\n")
    head = "| task | processes | s / iteration | speed-up | efficiency |"
    print(head + "\n|---|---:|---:|---:|---:|")
    for name in TASKS:
        for n in procs:
            speedup = times[base][name] / times[n][name]
            eff = speedup * base / n
            print(f"| {name} | {n} | {times[n][name]:.4f} | {speedup:.2f} | {eff:.2f} |")


if __name__ == "__main__":
    main()

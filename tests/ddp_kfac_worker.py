"""One process of the DistributedDataParallel K-FAC tests (tests/test_kfac_ddp.py), or the same
training in one process.

    python tests/ddp_kfac_worker.py OUT_DIR KIND EKFAC   (RANK, WORLD_SIZE, MASTER_* set)

writes ``OUT_DIR/rank<r>.pt``: the parameters after every step and how many inverses each
layer's refreshes computed on this process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from secondorder.optim import KFAC

STEPS, GLOBAL_BATCH = 6, 24  # 24 samples: every factor of full rank (EKFAC's bases unique)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(48, 1, 6, 6, generator=g, dtype=torch.float64)
    return X, X.flatten(1)[:, :3].argmax(1)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(18, 8),
        nn.Tanh(),
        nn.Linear(8, 3),
    ).to(torch.float64)


def train(net: nn.Module, kind: str, ekfac: bool, rank: int = 0, world: int = 1):
    """The user's loop: each process takes its share of every global batch."""
    X, y = data()
    opt = KFAC(net, lr=0.3, damping=1e-2, kind=kind, ema=0.8, inv_every=2, ekfac=ekfac)
    share = GLOBAL_BATCH // world
    trajectory = []
    for k in range(STEPS):
        start = (k * GLOBAL_BATCH) % len(X) + rank * share
        idx = torch.arange(start, start + share)
        opt.zero_grad()
        F.cross_entropy(net(X[idx]), y[idx]).backward()
        opt.step()
        trajectory.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    return trajectory, list(opt._pre.engine.refreshes)


def main(argv: list[str]) -> int:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    out, kind, ekfac = Path(argv[0]), argv[1], argv[2] == "1"
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    net = DistributedDataParallel(model())
    trajectory, refreshes = train(net, kind, ekfac, rank, world)
    torch.save({"trajectory": trajectory, "refreshes": refreshes}, out / f"rank{rank}.pt")
    dist.barrier()  # no process leaves while another still talks to it
    # leave without tearing down DDP's reducer and gloo's threads in the interpreter's
    # shutdown, where their destructors can abort the process after the work is done
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sys.exit(main(sys.argv[1:]))

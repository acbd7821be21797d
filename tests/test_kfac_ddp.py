"""K-FAC under DistributedDataParallel with 2 and 3 gloo processes: parameters bit for bit equal
across the processes, the one-process trajectory on the same global batches for deterministic
factors, and each process refreshing only its share of the layers' inverses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import ddp_kfac_worker as worker
from test_distributed import _finish, _launch_script

WORKER = str(Path(__file__).parent / "ddp_kfac_worker.py")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind,ekfac", [("exact", False), ("empirical", False), ("exact", True)])
def test_ddp_steps_are_one_process_steps_on_the_global_batches(tmp_path, world, kind, ekfac):
    procs = _launch_script(world, [sys.executable, WORKER, str(tmp_path), kind, str(int(ekfac))])
    for code, err in _finish(procs):
        assert code == 0, err[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    single, _ = worker.train(worker.model(), kind, ekfac)
    for other in ranks[1:]:
        for a, b in zip(other["trajectory"], ranks[0]["trajectory"]):
            assert torch.equal(a, b)
    # EKFAC's eigenbases amplify the rounding of the factors' average over processes
    tol = 1e-6 if ekfac else 1e-10
    for a, b in zip(ranks[0]["trajectory"], single):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 1e-2)
    # 6 steps, inverses every 2: 3 refreshes of each layer, on its owner only
    for r, res in enumerate(ranks):
        assert res["refreshes"] == [3 if j % world == r else 0 for j in range(3)]

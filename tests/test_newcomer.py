"""What a newcomer runs from the docs: the data-parallel script of docs/distributed.md also runs
in one process (``curvature_sum`` is then the engine's function itself)."""

from __future__ import annotations

import torch

from secondorder import distributed
from secondorder.curvature import hessian_diagonal, layer_hessians
from secondorder.models import mlp


def test_curvature_sum_in_one_process_is_the_function_itself():
    assert not torch.distributed.is_initialized()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)
    model = mlp([4, 5, 3], "tanh", seed=0, dtype=torch.float64)
    diag = distributed.curvature_sum(hessian_diagonal, model, X, y, "cross_entropy", 1e-3)
    assert torch.equal(diag, hessian_diagonal(model, X, y, "cross_entropy", 1e-3))
    blocks = distributed.curvature_sum(layer_hessians, model, X, y, "cross_entropy", 1e-3)
    for got, want in zip(blocks, layer_hessians(model, X, y, "cross_entropy", 1e-3)):
        assert torch.equal(got, want)

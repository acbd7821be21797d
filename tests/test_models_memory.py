"""mlp refuses, before allocating, parameters that do not fit: the error names the widths and
the bytes needed (P = Σ (n_in + 1)·n_out parameters, built in float64 then cast)."""

import pytest
import torch

from secondorder.linalg import MemoryError_
from secondorder.models import mlp


def test_hidden_layers_far_too_wide_are_refused_by_name():
    with pytest.raises(MemoryError_) as err:
        mlp([784, 1_000_000, 1_000_000, 10])
    msg = str(err.value)
    assert "mlp(widths=[784, 1000000, 1000000, 10])" in msg
    n_params = 785 * 10**6 + 1_000_001 * 10**6 + 1_000_001 * 10
    assert f"{n_params:,} parameters" in msg
    assert f"{n_params * 12:,} bytes" in msg and "available now" in msg


@pytest.mark.parametrize(("dtype", "per_param"), [(torch.float32, 12), (torch.float64, 8)])
def test_the_estimate_is_the_float64_build_plus_the_cast(dtype, per_param):
    widths = [3, 5, 2]
    n_params = 4 * 5 + 6 * 2
    need = n_params * per_param
    model = mlp(widths, dtype=dtype, max_bytes=need)
    assert sum(p.numel() for p in model.parameters()) == n_params
    with pytest.raises(MemoryError_, match=rf"needs {need} bytes .* above the {need - 1} bytes"):
        mlp(widths, dtype=dtype, max_bytes=need - 1)

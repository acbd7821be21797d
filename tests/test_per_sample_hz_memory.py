"""per_sample_hz refuses by the memory it really needs: the guard's estimate is compared with
the bytes of the result tensors and with the peak of the CPU allocations the profiler
records during the call (a chunked run used to hold every H_Z twice: the chunks and their
concatenation)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import secondorder.curvature.backprop as backprop
from secondorder import curvature
from secondorder.models import mlp
from secondorder.objective import MemoryError_

f64 = torch.float64


def _estimate(monkeypatch):
    seen = {}
    real = backprop.check_dense_fits

    def spy(shape, dtype, what, **options):
        n = 1
        for s in shape:
            n *= s
        seen[what] = n * torch.empty((), dtype=dtype).element_size()
        return real(shape, dtype, what, **options)

    monkeypatch.setattr(backprop, "check_dense_fits", spy)
    return seen


def _peak_bytes(fn):
    """The highest running total of CPU allocations minus frees recorded during fn()."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return out, peak


@pytest.mark.parametrize(
    ("widths", "act", "chunk", "ggn"),
    [([10, 30, 20, 3], "tanh", 250, False), ([6, 24, 1], "sigmoid", 100, True)],
)
def test_the_estimate_covers_the_results_and_the_peak(monkeypatch, widths, act, chunk, ggn):
    model = mlp(widths, act, seed=0, dtype=f64)
    N = 2000
    X = torch.randn(N, widths[0], dtype=f64)
    y = torch.randint(0, max(2, widths[-1]), (N,))
    loss = "logistic" if widths[-1] == 1 else "cross_entropy"
    seen = _estimate(monkeypatch)
    hz, peak = _peak_bytes(
        lambda: curvature.per_sample_hz(model, X, y, loss, ggn=ggn, chunk_size=chunk)
    )
    estimate = seen["the per-sample H_Z"]
    results = sum(h.numel() * h.element_size() for h in hz)
    assert results <= estimate
    assert peak <= estimate <= 1.5 * peak  # an upper bound, and not a loose one
    # the same H_Z in one chunk
    whole = curvature.per_sample_hz(model, X, y, loss, ggn=ggn, chunk_size=N)
    for a, b in zip(hz, whole):
        torch.testing.assert_close(a, b)


def test_max_bytes_refuses_below_the_estimate(monkeypatch):
    model = mlp([10, 30, 20, 3], "tanh", seed=0, dtype=f64)
    X, y = torch.randn(500, 10, dtype=f64), torch.randint(0, 3, (500,))
    seen = _estimate(monkeypatch)
    curvature.per_sample_hz(model, X, y, chunk_size=100)
    need = seen["the per-sample H_Z"]
    curvature.per_sample_hz(model, X, y, chunk_size=100, max_bytes=need)
    with pytest.raises(MemoryError_, match="the per-sample H_Z"):
        curvature.per_sample_hz(model, X, y, chunk_size=100, max_bytes=need - 1)

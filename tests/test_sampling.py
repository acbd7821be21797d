"""Samplers: fixed batches partition the data; reshuffled batches move and are reproducible."""

import numpy as np
import pytest

from secondorder.sampling import (
    FixedBatches,
    FullBatch,
    ReshuffledBatches,
    Subsample,
    make_sampler,
)


@pytest.mark.parametrize("m,mb", [(800, 10), (60000, 1000), (103, 10), (7, 7)])
def test_fixed_batches_are_disjoint_and_cover(m, mb):
    s = FixedBatches(m, mb, seed=1)
    batches = s.batches(0)
    assert len(batches) == -(-m // mb)
    allidx = np.concatenate(batches)
    assert len(allidx) == m and len(np.unique(allidx)) == m
    assert all(len(b) == mb for b in batches[:-1])
    for k in (1, 5, 100):
        assert all(np.array_equal(a, b) for a, b in zip(batches, s.batches(s.version(k, k))))
    w = s.weights(0)
    if m % mb == 0:
        assert w.indices is None and np.allclose(w.weights, 1 / m)
    assert np.isclose(w.weights.sum(), 1.0)


def test_fixed_batches_depend_on_seed():
    a, b = FixedBatches(100, 10, seed=1).batches(0), FixedBatches(100, 10, seed=2).batches(0)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))


def test_reshuffled_batches_change_every_iteration_and_are_reproducible():
    s = ReshuffledBatches(800, 10, n_batches=50, seed=7)
    assert s.version(3, 99) == 3
    b0, b1 = s.batches(0), s.batches(1)
    assert len(b0) == 50 and all(len(b) == 10 for b in b0)
    assert not all(np.array_equal(x, y) for x, y in zip(b0, b1))
    again = ReshuffledBatches(800, 10, n_batches=50, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(b1, again.batches(1)))
    for b in b0:
        assert len(np.unique(b)) == len(b)  # without replacement within a batch
    other = ReshuffledBatches(800, 10, n_batches=50, seed=8)
    assert not all(np.array_equal(x, y) for x, y in zip(b0, other.batches(0)))


def test_reshuffled_per_evaluation_version():
    s = ReshuffledBatches(100, 10, every="evaluation")
    assert s.version(0, 4) == 4 and s.changes == "evaluation"


def test_weights_reproduce_eq_28_with_overlaps():
    s = ReshuffledBatches(12, 5, n_batches=4, seed=0)
    batches = s.batches(2)
    w = s.weights(2)
    dense = np.zeros(12)
    dense[w.indices if w.indices is not None else np.arange(12)] = w.weights
    expected = np.zeros(12)
    for b in batches:
        expected[b] += 1 / (4 * len(b))
    assert np.allclose(dense, expected)


def test_full_and_subsample():
    assert np.array_equal(FullBatch(5).batches(0)[0], np.arange(5))
    sub = Subsample(100, 10, seed=3)
    idx = sub.batches(0)[0]
    assert len(np.unique(idx)) == 10 and np.array_equal(
        idx, Subsample(100, 10, seed=3).batches(9)[0]
    )


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: FixedBatches(10, 11), "batch_size must be at most"),
        (lambda: FixedBatches(10, 0), "batch_size"),
        (lambda: ReshuffledBatches(10, 2, n_batches=0), "n_batches"),
        (lambda: ReshuffledBatches(10, 2, every="epoch"), "every"),
        (lambda: make_sampler("fixd", 10, batch_size=2), "did you mean 'fixed'"),
        (lambda: make_sampler("full", 10, batch_size=2), "takes no options"),
        (lambda: Subsample(10, 20), "size must be at most"),
    ],
)
def test_bad_sampler_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()

"""Samplers: fixed batches partition the data; reshuffled batches move and are reproducible."""

import numpy as np
import pytest

from secondorder.linalg import MemoryError_
from secondorder.sampling import (
    EpochBatches,
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
        (lambda: EpochBatches(10, 11), "batch_size must be at most"),
        (lambda: make_sampler("epoch", 10, batch_size=0), "batch_size"),
    ],
)
def test_bad_sampler_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize("m,mb", [(103, 10), (60, 20), (5, 5)])
def test_epoch_batches_walk_a_permutation_per_epoch(m, mb):
    s = make_sampler("epoch", m, batch_size=mb, seed=3)
    R = -(-m // mb)
    for epoch in range(3):
        batches = [s.batches(epoch * R + j)[0] for j in range(R)]
        # one epoch is a partition of the data: every sample exactly once
        np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(m))
        assert all(len(b) == mb for b in batches[:-1]) and 0 < len(batches[-1]) <= mb
        for j, b in enumerate(batches):
            w = s.weights(epoch * R + j)
            np.testing.assert_array_equal(w.indices, b)
            np.testing.assert_allclose(w.weights, 1.0 / len(b))
    # a pure function of (seed, version): a fresh sampler, asked out of order, agrees
    t = EpochBatches(m, mb, seed=3)
    for k in (2 * R + 1, 0, R):
        np.testing.assert_array_equal(t.batches(k)[0], s.batches(k)[0])
    if m > mb:  # epochs differ, and so do seeds
        assert not np.array_equal(s.batches(0)[0], s.batches(R)[0])
        assert not np.array_equal(s.batches(0)[0], EpochBatches(m, mb, seed=4).batches(0)[0])
    assert s.changes == "iteration" and s.version(7) == 7


def test_an_index_table_that_cannot_fit_is_refused_before_it_is_built():
    for cls in (FixedBatches, ReshuffledBatches):
        with pytest.raises(MemoryError_, match="index batches"):
            cls(100, 10, n_batches=10**13)

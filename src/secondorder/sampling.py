"""Which samples make the objective at iteration k (section 3.3, eq. 28).

Given m samples, a batch B is a subset of size m_b drawn without replacement; R batches
B_1..B_R define the sub-sampled objective

    L_sub = (1/R) Σ_r L(X^{B_r}, y^{B_r}),                                   (eq. 28)

where L(X^B, y^B) is the mean loss over the batch. A sampler turns this into per-sample weights
w_i (summing to one) so that L_sub = Σ_i w_i ℓ_i: the objective keeps the one sum over samples.

When the objective changes
--------------------------
A sampler has a ``version(k, evaluation)``: the objective is the same function exactly while
the version stays the same. ``FullBatch`` and ``FixedBatches`` never change (version 0).
``ReshuffledBatches`` draws new batches at the start of every iteration (``every="iteration"``:
version k), or on every evaluation (``every="evaluation"``: the version is the evaluation count,
so even a line search sees a moving function, which is what breaks L-BFGS and nonlinear CG).
``EpochBatches`` is the mini-batch sampler of stochastic training: one batch per iteration,
walking through a fresh permutation of the data each epoch (iteration k takes batch k mod R of
epoch ⌊k/R⌋, R = ⌈m/m_b⌉, so every epoch sees every sample once).
Solvers call ``Objective.begin_iteration(k)`` at the top of iteration k, which returns whether
the function changed; they never pick batches themselves.

Every draw is a pure function of (seed, version), so a sampler's whole state is its
configuration: a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from secondorder._validation import check_choice, check_positive_int
from secondorder.linalg import check_dense_fits

__all__ = [
    "EpochBatches",
    "FixedBatches",
    "FullBatch",
    "ReshuffledBatches",
    "SAMPLERS",
    "SAMPLER_CLASSES",
    "SampleWeights",
    "Sampler",
    "Subsample",
    "make_sampler",
]


@dataclass(frozen=True)
class SampleWeights:
    """Distinct sample indices with weights summing to one; ``indices is None`` means all m."""

    indices: np.ndarray | None
    weights: np.ndarray

    def to_torch(self, dtype: torch.dtype, device: torch.device | str | None = None):
        """(indices as a LongTensor or None, weights as a tensor)."""
        idx = None if self.indices is None else torch.as_tensor(self.indices, device=device)
        return idx, torch.as_tensor(self.weights, dtype=dtype, device=device)


def _weights_from_batches(batches: list[np.ndarray], m: int) -> SampleWeights:
    """Eq. 28 as weights: sample i gets Σ_{r: i∈B_r} 1/(R·|B_r|)."""
    counts = np.zeros(m, dtype=np.float64)
    R = len(batches)
    for b in batches:
        np.add.at(counts, b, 1.0 / (R * len(b)))
    if np.all(counts > 0) and np.ptp(counts) <= 1e-15 * counts.max():
        return SampleWeights(None, np.full(m, 1.0 / m))
    idx = np.flatnonzero(counts)
    return SampleWeights(idx, counts[idx] / counts[idx].sum())


class Sampler:
    """Base class: decides the batches, hence the objective, at iteration k."""

    #: "never", "iteration" or "evaluation": when the objective may change
    changes: str = "never"

    def __init__(self, m: int) -> None:
        self.m = check_positive_int("m (number of samples)", m)

    def version(self, k: int, evaluation: int = 0) -> int:
        """Identifier of the function at iteration k (and evaluation count): equal ⇒ same."""
        if self.changes == "iteration":
            return k
        if self.changes == "evaluation":
            return evaluation
        return 0

    def batches(self, version: int) -> list[np.ndarray]:
        """The index batches B_1..B_R of the function with this version."""
        raise NotImplementedError

    def weights(self, version: int) -> SampleWeights:
        """Per-sample weights of eq. 28 for this version."""
        return _weights_from_batches(self.batches(version), self.m)

    def config(self) -> dict:
        """A JSON-friendly description (the sampler's whole state)."""
        raise NotImplementedError


class FullBatch(Sampler):
    """All m samples, every iteration: the plain empirical risk."""

    def batches(self, version: int) -> list[np.ndarray]:
        return [np.arange(self.m)]

    def weights(self, version: int) -> SampleWeights:
        return SampleWeights(None, np.full(self.m, 1.0 / self.m))

    def config(self) -> dict:
        return {"kind": "full", "m": self.m}


class _Batched(Sampler):
    def __init__(self, m: int, batch_size: int, n_batches: int | None, seed: int) -> None:
        super().__init__(m)
        self.batch_size = check_positive_int("batch_size", batch_size)
        if batch_size > m:
            raise ValueError(
                f"batch_size must be at most the number of samples m={m}, got {batch_size}"
            )
        self.n_batches = (
            math.ceil(m / batch_size)
            if n_batches is None
            else check_positive_int("n_batches", n_batches)
        )
        # every draw holds R index arrays of m_b entries: refuse R·m_b that cannot fit
        check_dense_fits(
            (self.n_batches, self.batch_size),
            torch.int64,
            "the index batches (n_batches × batch_size)",
        )
        self.seed = int(seed)

    def _draw(self, version: int) -> list[np.ndarray]:
        """R batches without replacement within a batch; consecutive batches walk through
        permutations of the data, so ⌈m/m_b⌉ batches cover every sample once."""
        rng = np.random.default_rng([self.seed, version])
        out: list[np.ndarray] = []
        perm = rng.permutation(self.m)
        pos = 0
        for _ in range(self.n_batches):
            if pos >= self.m:
                perm, pos = rng.permutation(self.m), 0
            b = perm[pos : pos + self.batch_size]
            pos += len(b)
            out.append(np.sort(b))
        return out

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "m": self.m,
            "batch_size": self.batch_size,
            "n_batches": self.n_batches,
            "seed": self.seed,
        }


class FixedBatches(_Batched):
    """Eq. 28 with batches drawn once and kept for the whole run (R = ⌈m/m_b⌉ by default).

    With the default R the batches partition the data (the last one may be smaller); when
    R·m_b = m exactly the objective equals the full-batch objective.
    """

    kind = "fixed"
    changes = "never"

    def __init__(self, m: int, batch_size: int, n_batches: int | None = None, seed: int = 0):
        super().__init__(m, batch_size, n_batches, seed)
        self._cached = self._draw(0)

    def batches(self, version: int) -> list[np.ndarray]:
        return [b.copy() for b in self._cached]


class ReshuffledBatches(_Batched):
    """Eq. 28 with R fresh batches of size m_b drawn every iteration (or every evaluation)."""

    kind = "reshuffled"

    def __init__(
        self,
        m: int,
        batch_size: int,
        n_batches: int | None = None,
        seed: int = 0,
        every: str = "iteration",
    ):
        super().__init__(m, batch_size, n_batches, seed)
        self.changes = check_choice("every", every, ("iteration", "evaluation"))

    def batches(self, version: int) -> list[np.ndarray]:
        return self._draw(version)

    def config(self) -> dict:
        return {**super().config(), "every": self.changes}


class EpochBatches(Sampler):
    """One mini-batch per iteration, epoch by epoch: iteration k uses batch j = k mod R of the
    permutation of epoch e = ⌊k/R⌋ (R = ⌈m/m_b⌉; the last batch of an epoch holds the
    remainder), each sample weighted 1/|B|. One draw costs O(m_b) once the epoch's
    permutation is known (one O(m) permutation per epoch, a pure function of (seed, e))."""

    kind = "epoch"
    changes = "iteration"

    def __init__(self, m: int, batch_size: int, seed: int = 0):
        super().__init__(m)
        self.batch_size = check_positive_int("batch_size", batch_size)
        if batch_size > m:
            raise ValueError(
                f"batch_size must be at most the number of samples m={m}, got {batch_size}"
            )
        self.seed = int(seed)
        self.per_epoch = math.ceil(m / batch_size)
        self._epoch: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 1])
            self._epoch = (epoch, rng.permutation(self.m))
        return self._epoch[1]

    def batches(self, version: int) -> list[np.ndarray]:
        epoch, j = divmod(int(version), self.per_epoch)
        b = self.batch_size
        return [np.sort(self._permutation(epoch)[j * b : (j + 1) * b])]

    def weights(self, version: int) -> SampleWeights:
        (idx,) = self.batches(version)
        return SampleWeights(idx, np.full(len(idx), 1.0 / len(idx)))

    def config(self) -> dict:
        return {"kind": self.kind, "m": self.m, "batch_size": self.batch_size, "seed": self.seed}


class Subsample(Sampler):
    """A fixed random subset of ``size`` samples, e.g. a separate curvature sample."""

    changes = "never"

    def __init__(self, m: int, size: int, seed: int = 0):
        super().__init__(m)
        self.size = check_positive_int("size", size)
        if size > m:
            raise ValueError(f"size must be at most the number of samples m={m}, got {size}")
        self.seed = int(seed)
        rng = np.random.default_rng([self.seed, 2**31 - 1])
        self._idx = np.sort(rng.choice(m, size=size, replace=False))

    def batches(self, version: int) -> list[np.ndarray]:
        return [self._idx.copy()]

    def config(self) -> dict:
        return {"kind": "subsample", "m": self.m, "size": self.size, "seed": self.seed}


#: every sampler by the name a spec's ``[sampler] kind`` gives it
SAMPLER_CLASSES: dict[str, type[Sampler]] = {
    "full": FullBatch,
    "fixed": FixedBatches,
    "reshuffled": ReshuffledBatches,
    "epoch": EpochBatches,
    "subsample": Subsample,
}
SAMPLERS = tuple(SAMPLER_CLASSES)


def make_sampler(kind: str, m: int, **options) -> Sampler:
    """A sampler by name: ``"full"``, ``"fixed"``, ``"reshuffled"``, ``"epoch"`` or
    ``"subsample"``."""
    check_choice("sampler", kind, SAMPLERS)
    if kind == "full" and options:
        raise TypeError(f"sampler 'full' takes no options, got {sorted(options)}")
    return SAMPLER_CLASSES[kind](m, **options)

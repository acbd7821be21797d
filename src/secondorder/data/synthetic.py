"""Small synthetic datasets for examples and tests.

:func:`two_class_2d` draws points in the plane from two overlapping, anisotropic
Gaussian clusters -- class 0 centred at (-1, -0.5), class 1 at (1, 0.8) -- so the two
classes are not linearly separable and logistic regression has a well-defined optimum.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from secondorder._validation import check_positive_int
from secondorder.data.dataset import Dataset, Splits

__all__ = ["TWO_CLASS_2D_CLUSTERS", "two_class_2d"]


def _covariance(std_major: float, std_minor: float, angle_deg: float) -> np.ndarray:
    t = math.radians(angle_deg)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return rot @ np.diag([std_major**2, std_minor**2]) @ rot.T


#: (mean, covariance) of each class of :func:`two_class_2d`.
TWO_CLASS_2D_CLUSTERS: tuple[tuple[np.ndarray, np.ndarray], ...] = (
    (np.array([-1.0, -0.5]), _covariance(1.0, 0.45, 35.0)),
    (np.array([1.0, 0.8]), _covariance(0.85, 0.5, -25.0)),
)


def _sample(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points, half of each class (class 1 gets the odd one), in random order."""
    y = np.zeros(n, dtype=np.int64)
    y[n // 2 :] = 1
    y = rng.permutation(y)
    X = np.empty((n, 2))
    for c, (mean, cov) in enumerate(TWO_CLASS_2D_CLUSTERS):
        members = y == c
        X[members] = rng.multivariate_normal(mean, cov, size=int(members.sum()))
    return X, y


def two_class_2d(
    *, n_train: int = 800, n_val: int = 100, seed: int = 0, dtype: torch.dtype = torch.float64
) -> Splits:
    """A 2-D, two-class, non-separable dataset: ``Splits(train, dev=None, test)``.

    ``train`` has ``n_train`` points and ``test`` ``n_val`` points from the same
    distribution; the classes are balanced. The two splits use independent random streams
    derived from ``seed``, so the same seed gives identical data and the test points do
    not depend on ``n_train``.
    """
    n_train = check_positive_int("n_train", n_train)
    n_val = check_positive_int("n_val", n_val)
    seed = check_positive_int("seed", seed, allow_zero=True)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"dtype must be a floating torch dtype such as torch.float64, got {dtype!r}"
        )
    train_seq, val_seq = np.random.SeedSequence(seed).spawn(2)
    parts = []
    for n, seq, name in ((n_train, train_seq, "train"), (n_val, val_seq, "test")):
        X, y = _sample(n, np.random.default_rng(seq))
        parts.append(
            Dataset(torch.from_numpy(X).to(dtype), torch.from_numpy(y), 2, f"two-class-2d/{name}")
        )
    return Splits(train=parts[0], dev=None, test=parts[1])

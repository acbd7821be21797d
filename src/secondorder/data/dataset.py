"""In-memory datasets: a feature tensor ``X`` with labels or targets ``y``.

A :class:`Dataset` holds ``m`` samples: ``X`` is a floating tensor of shape ``(m, ...)``;
``y`` holds int64 class labels of shape ``(m,)`` (classification, with ``n_classes`` set)
or floating targets of shape ``(m, k)`` (regression, ``n_classes=None``). :class:`Splits`
groups a training set with optional development and test sets. :func:`from_arrays`
builds a validated dataset from NumPy arrays, tensors or nested lists, and
:func:`stratified_split` carves a class-balanced held-out part from a dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from secondorder._validation import (
    check_choice,
    check_finite,
    check_positive_int,
    check_same_length,
    first_index,
)
from secondorder.errors import EnvironmentFault

__all__ = ["DataError", "Dataset", "Splits", "from_arrays", "stratified_split"]

TASKS = ("classification", "regression")


class DataError(EnvironmentFault, ValueError):
    """A data file is missing, corrupt or truncated, or a download failed."""


@dataclass(repr=False)
class Dataset:
    """Samples ``X`` (float, shape ``(m, ...)``) with labels or targets ``y``.

    ``y`` is int64 of shape ``(m,)`` for classification (``n_classes`` set) or floating of
    shape ``(m, k)`` for regression (``n_classes=None``).
    """

    X: torch.Tensor
    y: torch.Tensor
    n_classes: int | None
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.X, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise TypeError(
                f"Dataset needs tensors for X and y, got {type(self.X).__name__} and "
                f"{type(self.y).__name__}; use from_arrays() to convert arrays"
            )
        check_same_length(self.X, self.y)

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, X={tuple(self.X.shape)} {_dtype_name(self.X)}, "
            f"y={tuple(self.y.shape)} {_dtype_name(self.y)}, n_classes={self.n_classes})"
        )

    @property
    def n_features(self) -> int:
        """Number of features per sample (``X[0].numel()``)."""
        return math.prod(self.X.shape[1:])

    @property
    def is_classification(self) -> bool:
        """True when ``y`` holds class labels."""
        return self.n_classes is not None

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Dataset:
        """Move to ``device``; ``dtype`` applies to ``X``, and to ``y`` only when it is floating."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(
                f"dtype must be a floating torch dtype such as torch.float64, got {dtype!r}"
            )
        X = self.X.to(device=device, dtype=dtype)
        y_dtype = dtype if self.y.is_floating_point() else None
        y = self.y.to(device=device, dtype=y_dtype)
        return Dataset(X, y, self.n_classes, self.name)

    def subset(self, indices: Any) -> Dataset:
        """The samples at ``indices`` (a sequence of ints, an index/boolean tensor or a slice)."""
        if isinstance(indices, slice):
            idx: Any = indices
        else:
            if isinstance(indices, torch.Tensor):
                idx = indices.detach()
            else:
                arr = np.asarray(indices)
                if arr.size == 0:
                    arr = arr.astype(np.int64)
                if arr.dtype.kind not in "biu":
                    raise TypeError(
                        f"indices must be integers or a boolean mask, got dtype {arr.dtype}"
                    )
                if arr.dtype.kind != "b":
                    arr = arr.astype(np.int64)
                idx = torch.from_numpy(np.ascontiguousarray(arr))
            if idx.ndim != 1:
                raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
            if idx.dtype == torch.bool:
                if idx.numel() != len(self):
                    raise ValueError(
                        f"a boolean mask must have one entry per sample ({len(self)}), "
                        f"got {idx.numel()}"
                    )
            else:
                idx = idx.long()
                m = len(self)
                if idx.numel() and (int(idx.max()) >= m or int(idx.min()) < -m):
                    bad = idx[(idx >= m) | (idx < -m)][0].item()
                    raise IndexError(f"index {bad} is out of range for a dataset of {m} samples")
            idx = idx.to(self.X.device)
        return Dataset(self.X[idx], self.y[idx], self.n_classes, self.name)

    def flatten(self) -> Dataset:
        """The same samples with ``X`` reshaped to ``(m, n_features)``."""
        return Dataset(self.X.reshape(len(self), -1), self.y, self.n_classes, self.name)

    def class_counts(self) -> torch.Tensor:
        """Number of samples of each class (length ``n_classes``); classification only."""
        if self.n_classes is None:
            raise ValueError(
                f"class_counts() needs a classification dataset; {self.name or 'this dataset'} "
                "has n_classes=None (regression targets)"
            )
        return torch.bincount(self.y, minlength=self.n_classes)


@dataclass
class Splits:
    """A training set with optional development (``dev``) and ``test`` sets."""

    train: Dataset
    dev: Dataset | None = None
    test: Dataset | None = None

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Splits:
        """Apply :meth:`Dataset.to` to every split present."""
        return Splits(
            self.train.to(device, dtype),
            None if self.dev is None else self.dev.to(device, dtype),
            None if self.test is None else self.test.to(device, dtype),
        )


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _as_tensor(arg: str, value: Any) -> torch.Tensor:
    """Shape and dtype checks happen on the result; this only converts to a real tensor."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.is_complex():
            raise TypeError(f"{arg} must hold real numbers, got dtype {t.dtype}")
        return t
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{arg} must be a NumPy array, a torch tensor or a (rectangular) nested list of "
            f"numbers: {exc}"
        ) from None
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{arg} must hold real numbers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:
        arr = arr.astype(np.int64)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(np.ascontiguousarray(arr))


def from_arrays(
    X: Any,
    y: Any,
    *,
    n_classes: int | None = None,
    task: str = "classification",
    dtype: torch.dtype | None = torch.float64,
    name: str = "",
) -> Dataset:
    """Build a validated :class:`Dataset` from arrays, tensors or nested lists.

    ``X`` must have shape ``(m, n_features...)`` with finite values. For
    ``task="classification"`` ``y`` holds whole-number labels in ``0..K-1`` (``K`` is
    ``n_classes`` or ``max(y) + 1``); for ``task="regression"`` ``y`` holds finite targets
    and a 1-D ``y`` becomes ``(m, 1)``. ``dtype=None`` keeps a floating ``X``'s dtype
    (integer ``X`` gets ``torch.get_default_dtype()``). The result may share memory with
    tensor or NumPy inputs.
    """
    check_choice("task", task, TASKS)
    if n_classes is not None:
        if task == "regression":
            raise ValueError(f"n_classes must be None for task='regression', got {n_classes!r}")
        n_classes = check_positive_int("n_classes", n_classes)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"dtype must be a floating torch dtype such as torch.float64, got {dtype!r}"
        )
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    Xt = _as_tensor("X", X)
    yt = _as_tensor("y", y)
    _check_features(Xt, yt)
    if task == "classification":
        yt, K = _class_labels(yt, n_classes)
    else:
        yt, K = _regression_targets(yt), None
    if dtype is None:
        dtype = Xt.dtype if Xt.is_floating_point() else torch.get_default_dtype()
    Xt = Xt.to(dtype)
    yt = yt if task == "classification" else yt.to(dtype)
    return Dataset(Xt, yt, K, name)


def _check_features(Xt: torch.Tensor, yt: torch.Tensor) -> None:
    """X of shape (m, n_features...) with m >= 1, at least one feature and finite values, and
    one entry of y per sample."""
    if Xt.ndim < 2:
        raise ValueError(f"X must have shape (m, n_features...), got {tuple(Xt.shape)}")
    m = Xt.shape[0]
    if m == 0:
        raise ValueError(f"X is empty: shape {tuple(Xt.shape)}; need at least one sample")
    if math.prod(Xt.shape[1:]) == 0:
        raise ValueError(f"X has no features: shape {tuple(Xt.shape)}")
    if yt.ndim == 0:
        raise ValueError(f"y must have shape (m,) with m = {m} samples, got a scalar")
    check_same_length(Xt, yt)
    check_finite("X", Xt)


def _class_labels(yt: torch.Tensor, n_classes: int | None) -> tuple[torch.Tensor, int]:
    """Whole-number labels >= 0 (below ``n_classes`` when given) as int64, and the number of
    classes."""
    if yt.ndim != 1:
        raise ValueError(
            "y must be 1-D class labels of shape (m,) for task='classification', "
            f"got shape {tuple(yt.shape)}"
        )
    if yt.is_floating_point():
        bad = ~torch.isfinite(yt)
        if bad.any():
            i = first_index(bad)
            raise ValueError(
                f"y must hold integer class labels; y[{i}] = {yt[i].item()} is not finite"
            )
        bad = yt != torch.round(yt)
        if bad.any():
            i = first_index(bad)
            raise ValueError(
                f"y must hold integer class labels; y[{i}] = {yt[i].item()} is not a whole "
                "number (use task='regression' for real-valued targets)"
            )
    labels = yt.to(torch.int64)
    if (labels < 0).any():
        i = first_index(labels < 0)
        raise ValueError(f"y must hold class labels >= 0; found {labels[i].item()} at index {i}")
    if n_classes is not None and (labels >= n_classes).any():
        i = first_index(labels >= n_classes)
        raise ValueError(
            f"y has label {labels[i].item()} at index {i}, outside 0..{n_classes - 1} "
            f"for n_classes={n_classes}"
        )
    return labels, (n_classes if n_classes is not None else int(labels.max()) + 1)


def _regression_targets(yt: torch.Tensor) -> torch.Tensor:
    """Finite targets of shape (m, k); a 1-D y becomes (m, 1)."""
    if yt.ndim == 1:
        yt = yt.unsqueeze(1)
    if yt.ndim != 2:
        raise ValueError(
            f"y must have shape (m,) or (m, k) for task='regression', got shape {tuple(yt.shape)}"
        )
    check_finite("y", yt)
    return yt


def _stratified_counts(counts: np.ndarray, n_take: int) -> np.ndarray:
    """Per-class sample numbers summing to ``n_take``, proportional to ``counts``."""
    exact = counts * (n_take / counts.sum())
    take = np.floor(exact).astype(np.int64)
    short = n_take - int(take.sum())
    if short:
        # Largest remainders first; ties go to the lower class index (stable sort).
        order = np.argsort(-(exact - take), kind="stable")
        take[order[:short]] += 1
    return take


def stratified_split(
    dataset: Dataset, size: int | float, *, seed: int = 0, names: tuple[str, str] | None = None
) -> tuple[Dataset, Dataset]:
    """Split ``dataset`` into ``(rest, held_out)`` with class proportions preserved.

    ``size`` is the number of held-out samples (``1 <= size < len(dataset)``) or a fraction
    in (0, 1). Each class gives a share proportional to its count (largest-remainder
    rounding); which samples are chosen is fixed by ``seed``. Both parts keep the original
    sample order.
    """
    if dataset.n_classes is None:
        raise ValueError("stratified_split needs a classification dataset (n_classes set)")
    m = len(dataset)
    n_take = split_size("size", size, m)
    seed = check_positive_int("seed", seed, allow_zero=True)
    if n_take == 0:
        raise ValueError("size must be at least 1 sample")
    y = dataset.y.cpu().numpy()
    rng = np.random.default_rng(seed)
    counts = np.bincount(y, minlength=dataset.n_classes)
    take = _stratified_counts(counts, n_take)
    held = np.zeros(m, dtype=bool)
    for c in np.flatnonzero(take):
        members = np.flatnonzero(y == c)
        held[rng.permutation(members)[: take[c]]] = True
    rest_name, held_name = names if names is not None else (dataset.name, dataset.name)
    rest = dataset.subset(np.flatnonzero(~held))
    out = dataset.subset(np.flatnonzero(held))
    rest.name, out.name = rest_name, held_name
    return rest, out


def split_size(arg: str, size: Any, m: int) -> int:
    """Turn ``size`` (count ``0 <= size < m`` or fraction in (0, 1)) into a sample count."""
    if isinstance(size, (float, np.floating)) and not isinstance(size, bool):
        size = float(size)
        if not (0.0 < size < 1.0):
            raise ValueError(f"{arg} as a fraction must be in (0, 1), got {size!r}")
        return min(max(1, round(size * m)), m - 1)
    n = check_positive_int(arg, size, allow_zero=True)
    if n >= m:
        raise ValueError(f"{arg}={n} must be smaller than the number of samples ({m})")
    return n

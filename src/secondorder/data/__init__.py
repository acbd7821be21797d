"""Datasets for the experiments: Fashion-MNIST, a synthetic 2-D two-class problem, and
in-memory datasets built from arrays.

- :func:`load_fashion_mnist` -- 60,000/10,000 grey-scale 28x28 clothing images in 10
  classes, read from idx files found locally or downloaded (SHA-256 verified).
- :func:`two_class_2d` -- two overlapping 2-D Gaussian clusters for logistic regression.
- :func:`from_arrays` -- a validated :class:`Dataset` from NumPy arrays or tensors.
"""

from secondorder.data.dataset import DataError, Dataset, Splits, from_arrays, stratified_split
from secondorder.data.download import atomic_write_bytes, fetch
from secondorder.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    download_fashion_mnist,
    find_fashion_mnist,
    load_fashion_mnist,
)
from secondorder.data.idx import read_idx, write_idx
from secondorder.data.synthetic import two_class_2d

__all__ = [
    "FASHION_MNIST_CLASSES",
    "DataError",
    "Dataset",
    "Splits",
    "atomic_write_bytes",
    "download_fashion_mnist",
    "fetch",
    "find_fashion_mnist",
    "from_arrays",
    "load_fashion_mnist",
    "read_idx",
    "stratified_split",
    "two_class_2d",
    "write_idx",
]

"""Fashion-MNIST: 70,000 grey-scale 28x28 images of clothing in 10 classes.

The data (Xiao, Rasul & Vollgraf, 2017, https://github.com/zalandoresearch/fashion-mnist)
comes as four idx files: 60,000 training and 10,000 test images (uint8 pixels) with their
labels (uint8, 0..9); each class has 6,000 training and 1,000 test images. The class
names are in :data:`FASHION_MNIST_CLASSES`.

The files are looked for, in order, in an explicit ``root``; in ``$SECONDORDER_DATA``
(or its ``fashion-mnist`` subdirectory); in ``/usr/share/datasets/fashion-mnist`` (the
Debian package ``dataset-fashion-mnist``); and in the user cache
``$XDG_CACHE_HOME/secondorder/fashion-mnist`` (default ``~/.cache/...``), where
:func:`download_fashion_mnist` puts them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secondorder._validation import check_positive_int
from secondorder.data.dataset import DataError, Dataset, Splits, split_size, stratified_split
from secondorder.data.download import fetch
from secondorder.data.idx import read_idx

__all__ = [
    "DEFAULT_URL",
    "FASHION_MNIST_CLASSES",
    "FILES",
    "SHA256",
    "cache_dir",
    "download_fashion_mnist",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "search_dirs",
]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Base names of the four files (each may also be present gzipped, with ``.gz``).
FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_OFFICIAL_SHA256 = """
cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa  t10k-images-idx3-ubyte.gz
8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05  t10k-labels-idx1-ubyte.gz
b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7  train-images-idx3-ubyte.gz
0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056  train-labels-idx1-ubyte.gz
"""

#: SHA-256 of the official gzipped files (file name -> hex digest).
SHA256: dict[str, str] = {
    name: digest for digest, name in map(str.split, _OFFICIAL_SHA256.strip().splitlines())
}

DEFAULT_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
ENV_VAR = "SECONDORDER_DATA"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SHAPE = (28, 28)
N_CLASSES = len(FASHION_MNIST_CLASSES)

_HOW_TO_GET = (
    "To get the data another way, install the Debian package (apt-get install "
    f"dataset-fashion-mnist), or download the four files from {DEFAULT_URL} into a "
    f"directory and set {ENV_VAR} to it."
)


def cache_dir() -> Path:
    """The user cache directory for Fashion-MNIST (``$XDG_CACHE_HOME`` is respected)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "secondorder" / "fashion-mnist"


def search_dirs(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The directories searched for the files, in order."""
    if root is not None:
        root = Path(root).expanduser()
        return [root, root / "fashion-mnist"]
    dirs = []
    env = os.environ.get(ENV_VAR)
    if env:
        dirs += [Path(env).expanduser(), Path(env).expanduser() / "fashion-mnist"]
    dirs += [SYSTEM_DIR, cache_dir()]
    return dirs


def _warn_unused_env() -> None:
    """A $SECONDORDER_DATA that holds no files is a mistake to point out, not to skip."""
    env = os.environ.get(ENV_VAR)
    if not env:
        return
    where = Path(env).expanduser()
    if any(_file_paths(d) is not None for d in (where, where / "fashion-mnist")):
        return
    problem = "does not exist" if not where.exists() else "holds none of the four files"
    warnings.warn(
        f"${ENV_VAR}={env} {problem} (looked in it and its fashion-mnist subdirectory); "
        "it is ignored and the other places are searched",
        UserWarning,
        stacklevel=3,
    )


def _file_paths(directory: Path) -> dict[str, Path] | None:
    """The four files in ``directory`` (gzipped preferred), or None if any is missing."""
    found = {}
    for key, base in FILES.items():
        for name in (base + ".gz", base):
            if (directory / name).is_file():
                found[key] = directory / name
                break
        else:
            return None
    return found


def find_fashion_mnist(root: str | os.PathLike[str] | None = None) -> Path | None:
    """The directory holding the four Fashion-MNIST files, or None when not found.

    With ``root`` only ``root`` (and ``root/fashion-mnist``) is searched, and a missing
    directory or missing files raise :class:`DataError`.
    """
    if root is not None:
        root = Path(root).expanduser()
        if not root.exists():
            raise DataError(f"Fashion-MNIST directory {root} does not exist")
        if not root.is_dir():
            raise DataError(f"Fashion-MNIST root {root} is not a directory")
    if root is None:
        _warn_unused_env()
    for directory in search_dirs(root):
        if _file_paths(directory) is not None:
            return directory
    if root is not None:
        missing = [
            f"{base}(.gz)"
            for base in FILES.values()
            if not any((root / n).is_file() for n in (base, base + ".gz"))
        ]
        raise DataError(f"Fashion-MNIST files not found in {root}: missing {', '.join(missing)}")
    return None


def download_fashion_mnist(
    dest: str | os.PathLike[str] | None = None,
    *,
    base_url: str = DEFAULT_URL,
    progress: bool = True,
) -> Path:
    """Download the four gzipped files into ``dest`` (default: :func:`cache_dir`).

    Each file's SHA-256 is checked before it is moved into place; files already present
    with the right hash are skipped. Returns the directory.
    """
    dest = cache_dir() if dest is None else Path(dest).expanduser()
    for name, digest in SHA256.items():
        url = base_url.rstrip("/") + "/" + name
        fetch(url, dest / name, digest, progress, hint=_HOW_TO_GET)
    return dest


def _check_dtype(dtype: Any) -> torch.dtype:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"dtype must be a floating torch dtype such as torch.float32, got {dtype!r}"
        )
    return dtype


def _read_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
        raise DataError(
            f"{images_path}: expected uint8 images of shape (n, 28, 28), got "
            f"{images.dtype} of shape {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(
            f"{labels_path}: expected 1-D uint8 labels, got {labels.dtype} of shape {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} "
            "labels; the counts must match"
        )
    if labels.size and labels.max() >= N_CLASSES:
        i = int(np.argmax(labels >= N_CLASSES))
        raise DataError(
            f"{labels_path}: label {labels[i]} at index {i} is outside 0..{N_CLASSES - 1}"
        )
    return images, labels


def _to_dataset(
    images: np.ndarray, labels: np.ndarray, *, flatten: bool, dtype: torch.dtype, name: str
) -> Dataset:
    X = torch.from_numpy(images).to(dtype).div_(255.0)
    if flatten:
        X = X.reshape(len(images), -1)
    y = torch.from_numpy(labels.astype(np.int64))
    return Dataset(X, y, N_CLASSES, name)


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    *,
    flatten: bool = True,
    dev_size: int | float = 0,
    seed: int = 0,
    download: bool = True,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Splits:
    """Load Fashion-MNIST as :class:`Splits` (train, dev or None, test).

    Pixels are scaled to [0, 1] in ``dtype``; ``X`` has shape ``(n, 784)`` when
    ``flatten`` else ``(n, 28, 28)``; labels are int64 in 0..9. ``dev_size`` (a count, or a
    fraction in (0, 1)) carves a stratified development split out of the 60,000 training
    images, chosen by ``seed``. When the files are not found (and no ``root`` is given)
    they are downloaded to the user cache if ``download`` is true.
    """
    if not isinstance(flatten, bool):
        raise TypeError(f"flatten must be True or False, got {flatten!r}")
    if isinstance(dev_size, bool) or not isinstance(
        dev_size, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            f"dev_size must be an int or a float fraction, got {type(dev_size).__name__}"
        )
    if isinstance(dev_size, (float, np.floating)) and not 0.0 < dev_size < 1.0:
        raise ValueError(f"dev_size as a fraction must be in (0, 1), got {dev_size!r}")
    if not isinstance(dev_size, (float, np.floating)):
        check_positive_int("dev_size", dev_size, allow_zero=True)
    seed = check_positive_int("seed", seed, allow_zero=True)
    dtype = _check_dtype(dtype)

    directory = find_fashion_mnist(root)
    if directory is None:
        if not download:
            looked = "\n  ".join(str(d) for d in search_dirs())
            raise DataError(
                f"Fashion-MNIST files not found; looked in:\n  {looked}\n"
                f"Pass download=True to fetch them into {cache_dir()}. {_HOW_TO_GET}"
            )
        directory = download_fashion_mnist(cache_dir(), progress=progress)
    paths = _file_paths(directory)
    if paths is None:  # pragma: no cover - the files vanished after being found
        raise DataError(f"Fashion-MNIST files disappeared from {directory}")

    train_images, train_labels = _read_split(paths["train_images"], paths["train_labels"])
    test_images, test_labels = _read_split(paths["test_images"], paths["test_labels"])
    n_dev = split_size("dev_size", dev_size, len(train_labels))

    train = _to_dataset(
        train_images, train_labels, flatten=flatten, dtype=dtype, name="fashion-mnist/train"
    )
    test = _to_dataset(
        test_images, test_labels, flatten=flatten, dtype=dtype, name="fashion-mnist/test"
    )
    dev = None
    if n_dev:
        train, dev = stratified_split(
            train, n_dev, seed=seed, names=("fashion-mnist/train", "fashion-mnist/dev")
        )
    return Splits(train, dev, test)

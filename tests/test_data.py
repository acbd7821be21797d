"""Tests for secondorder.data: idx parsing, locating/loading/downloading Fashion-MNIST (with
small fake files and a fake server), stratified splits, the synthetic 2-D data and
from_arrays validation. Tests marked ``data`` use the real Fashion-MNIST files."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import stat
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import secondorder.data.fashion_mnist as fm
from secondorder.data import (
    FASHION_MNIST_CLASSES,
    DataError,
    Dataset,
    Splits,
    atomic_write_bytes,
    download_fashion_mnist,
    fetch,
    find_fashion_mnist,
    from_arrays,
    load_fashion_mnist,
    read_idx,
    stratified_split,
    two_class_2d,
    write_idx,
)

# ---------------------------------------------------------------------------- helpers

TYPE_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode ``array`` as idx by hand (independent of write_idx)."""
    array = np.asarray(array)
    code = TYPE_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim])
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def fake_fashion_files(
    directory: Path,
    *,
    n_train: int = 20,
    n_test: int = 10,
    gz: bool = True,
    train_labels: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, bytes]:
    """Write four small Fashion-MNIST-like idx files; return {file name: bytes written}."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    if train_labels is None:
        train_labels = np.arange(n_train) % 10
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.asarray(train_labels, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    written = {}
    for base, arr in arrays.items():
        data = idx_bytes(arr)
        name = base + ".gz" if gz else base
        if gz:
            data = gzip.compress(data, mtime=0)
        (directory / name).write_bytes(data)
        written[name] = data
    return written


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No env var, no system directory, and an empty user cache under tmp_path."""
    monkeypatch.delenv("SECONDORDER_DATA", raising=False)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system-dir")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes, length: int | None = None):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data) if length is None else length)}


def fake_urlopen(files: dict[str, bytes], calls: list[str] | None = None, length_extra: int = 0):
    def urlopen(url, *args, **kwargs):
        if calls is not None:
            calls.append(url)
        name = url.rsplit("/", 1)[-1]
        if name not in files:
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        return FakeResponse(files[name], len(files[name]) + length_extra)

    return urlopen


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


# ---------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("dtype", list(TYPE_CODES))
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, dtype, gz):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    data = idx_bytes(arr)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(data) if gz else data)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    assert out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, arr)
    out[0, 0, 0] = 1  # writable
    # write_idx produces the same bytes
    assert read_idx(write_idx(tmp_path / ("b.gz" if gz else "b"), arr)).tolist() == arr.tolist()


def test_read_idx_detects_gzip_by_magic_not_suffix(tmp_path):
    arr = np.arange(12, dtype=np.int32).reshape(3, 4)
    (tmp_path / "gz-without-suffix").write_bytes(gzip.compress(idx_bytes(arr)))
    (tmp_path / "raw-with-suffix.gz").write_bytes(idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(tmp_path / "gz-without-suffix"), arr)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "raw-with-suffix.gz")), arr)


def test_read_idx_one_dim_and_empty(tmp_path):
    (tmp_path / "v").write_bytes(idx_bytes(np.array([1, 2, 3], dtype=np.uint8)))
    assert read_idx(tmp_path / "v").tolist() == [1, 2, 3]
    (tmp_path / "e").write_bytes(idx_bytes(np.zeros((0, 28), dtype=np.uint8)))
    assert read_idx(tmp_path / "e").shape == (0, 28)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated(tmp_path, gz):
    data = idx_bytes(np.zeros((10, 28, 28), dtype=np.uint8))[:-100]
    path = tmp_path / "trunc"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError) as err:
        read_idx(path)
    msg = str(err.value)
    assert str(path) in msg and "truncated" in msg
    assert "7840" in msg and "7740" in msg  # expected and found data bytes


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "h"
    path.write_bytes(idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8))[:9])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_read_idx_trailing_bytes(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros((4, 5), dtype=np.float32)) + b"\x00\x01")
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert str(path) in str(err.value) and "trailing" in str(err.value)


@pytest.mark.parametrize(
    "header", [b"\x01\x00\x08\x01", b"\x00\x01\x08\x01", b"\x00\x00\x0a\x01", b"PK\x03\x04"]
)
def test_read_idx_bad_magic(tmp_path, header):
    path = tmp_path / "bad"
    path.write_bytes(header + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert "magic" in str(err.value) and str(path) in str(err.value)
    assert f"0x{header.hex().upper()}" in str(err.value)


def test_read_idx_zero_dims(tmp_path):
    path = tmp_path / "z"
    path.write_bytes(b"\x00\x00\x08\x00")
    with pytest.raises(DataError, match="dimensions"):
        read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path):
    good = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32)))
    path = tmp_path / "c.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert str(path) in str(err.value) and "gzip" in str(err.value)
    path.write_bytes(b"\x1f\x8b" + b"not a gzip stream at all")
    with pytest.raises(DataError, match="gzip"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError) as err:
        read_idx(tmp_path / "nope.gz")
    assert str(tmp_path / "nope.gz") in str(err.value)


# ---------------------------------------------------------------------------- find/load


def test_classes():
    assert list(FASHION_MNIST_CLASSES) == [
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
    ]


def test_load_fake_with_root(isolated):
    root = isolated / "fm"
    fake_fashion_files(root)
    assert find_fashion_mnist(root) == root
    s = load_fashion_mnist(root, download=False)
    assert isinstance(s, Splits) and s.dev is None
    assert s.train.X.shape == (20, 784) and s.test.X.shape == (10, 784)
    assert s.train.X.dtype == torch.float32 and s.train.y.dtype == torch.int64
    assert s.train.n_classes == 10 and s.test.n_classes == 10
    assert s.train.name == "fashion-mnist/train" and s.test.name == "fashion-mnist/test"
    assert float(s.train.X.min()) >= 0.0 and float(s.train.X.max()) <= 1.0
    raw = read_idx(root / "train-images-idx3-ubyte.gz")
    torch.testing.assert_close(s.train.X[3], torch.from_numpy(raw[3].reshape(-1) / 255.0).float())
    assert s.train.y.tolist() == [i % 10 for i in range(20)]

    s2 = load_fashion_mnist(str(root), flatten=False, dtype=torch.float64)
    assert s2.train.X.shape == (20, 28, 28) and s2.train.X.dtype == torch.float64


def test_load_fake_raw_files(isolated):
    root = isolated / "raw"
    fake_fashion_files(root, gz=False)
    assert load_fashion_mnist(root).test.X.shape == (10, 784)


@pytest.mark.parametrize("subdir", ["", "fashion-mnist"])
def test_find_and_load_via_env(isolated, monkeypatch, subdir):
    base = isolated / "env"
    fake_fashion_files(base / subdir if subdir else base)
    monkeypatch.setenv("SECONDORDER_DATA", str(base))
    assert find_fashion_mnist() == (base / subdir if subdir else base)
    assert len(load_fashion_mnist(download=False).train) == 20


def test_find_search_order(isolated, monkeypatch):
    env, system = isolated / "env", isolated / "system"
    cache = isolated / "cache" / "secondorder" / "fashion-mnist"
    assert find_fashion_mnist() is None
    fake_fashion_files(cache)
    assert find_fashion_mnist() == cache
    fake_fashion_files(system)
    monkeypatch.setattr(fm, "SYSTEM_DIR", system)
    assert find_fashion_mnist() == system
    fake_fashion_files(env)
    monkeypatch.setenv("SECONDORDER_DATA", str(env))
    assert find_fashion_mnist() == env


def test_incomplete_directory_is_skipped(isolated, monkeypatch):
    env = isolated / "env"
    fake_fashion_files(env)
    (env / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("SECONDORDER_DATA", str(env))
    assert find_fashion_mnist() is None
    with pytest.raises(DataError) as err:
        find_fashion_mnist(env)
    assert "t10k-labels-idx1-ubyte" in str(err.value) and str(env) in str(err.value)


def test_missing_root(isolated):
    missing = isolated / "does-not-exist"
    with pytest.raises(DataError) as err:
        find_fashion_mnist(missing)
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        load_fashion_mnist(missing)


def test_not_found_without_download(isolated):
    with pytest.raises(DataError) as err:
        load_fashion_mnist(download=False)
    msg = str(err.value)
    assert "not found" in msg and str(fm.SYSTEM_DIR) in msg and str(fm.cache_dir()) in msg
    assert "SECONDORDER_DATA" in msg and "dataset-fashion-mnist" in msg


def test_mismatched_counts(isolated):
    root = isolated / "fm"
    fake_fashion_files(root)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(19, dtype=np.uint8)))
    )
    with pytest.raises(DataError) as err:
        load_fashion_mnist(root)
    msg = str(err.value)
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    assert "20" in msg and "19" in msg


def test_labels_out_of_range(isolated):
    root = isolated / "fm"
    labels = np.arange(20) % 10
    labels[7] = 12
    fake_fashion_files(root, train_labels=labels)
    with pytest.raises(DataError) as err:
        load_fashion_mnist(root)
    assert "12" in str(err.value) and "train-labels-idx1-ubyte" in str(err.value)


def test_wrong_image_shape_or_type(isolated):
    root = isolated / "fm"
    fake_fashion_files(root)
    path = root / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((10, 28, 27), dtype=np.uint8))))
    with pytest.raises(DataError, match="28, 28"):
        load_fashion_mnist(root)
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((10, 28, 28), dtype=np.float32))))
    with pytest.raises(DataError, match="uint8"):
        load_fashion_mnist(root)


def test_corrupt_file_in_load(isolated):
    root = isolated / "fm"
    fake_fashion_files(root)
    path = root / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError) as err:
        load_fashion_mnist(root)
    assert str(path) in str(err.value)


def test_load_argument_checks(isolated):
    root = isolated / "fm"
    fake_fashion_files(root)
    with pytest.raises(ValueError, match="dev_size"):
        load_fashion_mnist(root, dev_size=20)
    with pytest.raises(ValueError, match="dev_size"):
        load_fashion_mnist(root, dev_size=-1)
    with pytest.raises(ValueError, match="dev_size"):
        load_fashion_mnist(root, dev_size=1.5)
    with pytest.raises(TypeError, match="dev_size"):
        load_fashion_mnist(root, dev_size="10")
    with pytest.raises(TypeError, match="dtype"):
        load_fashion_mnist(root, dtype=torch.int64)
    with pytest.raises(ValueError, match="seed"):
        load_fashion_mnist(root, seed=-1)


# ---------------------------------------------------------------------------- stratified split


def test_stratified_dev_split_from_load(isolated):
    root = isolated / "fm"
    labels = np.repeat(np.arange(10), [40, 40, 20, 20, 20, 20, 10, 10, 10, 10])
    fake_fashion_files(root, n_train=len(labels), train_labels=labels)
    s = load_fashion_mnist(root, dev_size=0.1, seed=3)
    assert s.dev is not None and s.dev.name == "fashion-mnist/dev"
    assert len(s.train) == 180 and len(s.dev) == 20
    assert s.dev.class_counts().tolist() == [4, 4, 2, 2, 2, 2, 1, 1, 1, 1]
    assert s.train.class_counts().tolist() == [36, 36, 18, 18, 18, 18, 9, 9, 9, 9]
    # disjoint: every train image row is different from every dev row (images are random)
    rows = {tuple(x.tolist()) for x in s.train.X[:, :16]}
    assert not any(tuple(x.tolist()) in rows for x in s.dev.X[:, :16])
    same = load_fashion_mnist(root, dev_size=20, seed=3)
    assert torch.equal(same.dev.X, s.dev.X) and torch.equal(same.train.y, s.train.y)
    other = load_fashion_mnist(root, dev_size=20, seed=4)
    assert not torch.equal(other.dev.X, s.dev.X)


def test_stratified_split_properties():
    rng = np.random.default_rng(0)
    y = rng.choice(3, size=1000, p=[0.6, 0.3, 0.1])
    ds = from_arrays(np.arange(1000)[:, None], y, name="toy")
    rest, held = stratified_split(ds, 200, seed=1)
    assert len(rest) + len(held) == 1000 and len(held) == 200
    ids_rest = set(rest.X[:, 0].long().tolist())
    ids_held = set(held.X[:, 0].long().tolist())
    assert ids_rest.isdisjoint(ids_held) and len(ids_rest | ids_held) == 1000
    expected = ds.class_counts().double() * 0.2
    assert (held.class_counts().double() - expected).abs().max() <= 1.0
    assert held.X[:, 0].tolist() == sorted(held.X[:, 0].tolist())  # original order kept
    again = stratified_split(ds, 200, seed=1)[1]
    assert torch.equal(again.X, held.X)
    assert not torch.equal(stratified_split(ds, 200, seed=2)[1].X, held.X)
    with pytest.raises(ValueError, match="size"):
        stratified_split(ds, 1000)


# ---------------------------------------------------------------------------- downloads


def test_fetch_verifies_and_writes(tmp_path, monkeypatch):
    data = b"hello world" * 1000
    calls: list[str] = []
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen({"f.bin": data}, calls))
    dest = tmp_path / "sub" / "f.bin"
    assert fetch("http://example.invalid/f.bin", dest, sha(data), progress=False) == dest
    assert dest.read_bytes() == data and calls == ["http://example.invalid/f.bin"]
    assert leftovers(dest.parent) == []
    # present with the right hash: skipped
    fetch("http://example.invalid/f.bin", dest, sha(data), progress=False)
    assert len(calls) == 1
    # present with a wrong hash: downloaded again
    dest.write_bytes(b"stale")
    fetch("http://example.invalid/f.bin", dest, sha(data), progress=False)
    assert dest.read_bytes() == data and len(calls) == 2


def test_fetch_bad_hash_leaves_nothing(tmp_path, monkeypatch):
    data = b"tampered"
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen({"f.gz": data}))
    dest = tmp_path / "f.gz"
    wrong = "0" * 64
    with pytest.raises(DataError) as err:
        fetch("http://example.invalid/f.gz", dest, wrong, progress=False)
    msg = str(err.value)
    assert "f.gz" in msg and wrong in msg and sha(data) in msg
    assert list(tmp_path.iterdir()) == []


def test_fetch_incomplete_and_network_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen({"f": b"abc"}, length_extra=5))
    with pytest.raises(DataError, match="incomplete"):
        fetch("http://example.invalid/f", tmp_path / "f", None, progress=False)
    assert list(tmp_path.iterdir()) == []

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(DataError) as err:
        fetch("http://example.invalid/f", tmp_path / "f", None, progress=False, hint="HINT")
    assert "http://example.invalid/f" in str(err.value) and "HINT" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_bytes(tmp_path):
    path = tmp_path / "d" / "x.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and [p.name for p in path.parent.iterdir()] == ["x.bin"]


def test_download_fashion_mnist_fake(isolated, monkeypatch):
    files = fake_fashion_files(isolated / "server")
    monkeypatch.setattr(fm, "SHA256", {name: sha(data) for name, data in files.items()})
    calls: list[str] = []
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(files, calls))
    dest = isolated / "dl"
    assert download_fashion_mnist(dest, base_url="http://mirror.invalid/fm", progress=False) == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(files)
    assert all(c.startswith("http://mirror.invalid/fm/") for c in calls) and len(calls) == 4
    download_fashion_mnist(dest, base_url="http://mirror.invalid/fm", progress=False)
    assert len(calls) == 4  # all present: nothing fetched


def test_download_fashion_mnist_network_error(isolated, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as err:
        download_fashion_mnist(isolated / "dl", progress=False)
    msg = str(err.value)
    assert "failed" in msg and fm.DEFAULT_URL.rstrip("/") in msg
    assert "SECONDORDER_DATA" in msg and "apt-get install dataset-fashion-mnist" in msg


def test_download_real_hashes_are_checked(isolated, monkeypatch):
    files = fake_fashion_files(isolated / "server")  # not the official bytes
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(files))
    with pytest.raises(DataError, match="SHA-256"):
        download_fashion_mnist(isolated / "dl", progress=False)
    assert list((isolated / "dl").iterdir()) == []


def test_load_downloads_to_cache_when_missing(isolated, monkeypatch):
    files = fake_fashion_files(isolated / "server", n_train=30)
    monkeypatch.setattr(fm, "SHA256", {name: sha(data) for name, data in files.items()})
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(files))
    s = load_fashion_mnist(progress=False)
    assert len(s.train) == 30
    assert find_fashion_mnist() == isolated / "cache" / "secondorder" / "fashion-mnist"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_from_local_http_server(isolated, monkeypatch):
    served = isolated / "served"
    files = fake_fashion_files(served)
    monkeypatch.setattr(fm, "SHA256", {name: sha(data) for name, data in files.items()})
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        dest = download_fashion_mnist(isolated / "dl", base_url=url, progress=False)
        assert load_fashion_mnist(dest).train.X.shape == (20, 784)
        (served / "t10k-labels-idx1-ubyte.gz").unlink()
        (dest / "t10k-labels-idx1-ubyte.gz").unlink()
        with pytest.raises(DataError) as err:
            download_fashion_mnist(dest, base_url=url, progress=False)
        assert "t10k-labels-idx1-ubyte.gz" in str(err.value) and "404" in str(err.value)
        assert leftovers(dest) == []
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------- two_class_2d


def _linearly_separable(X: np.ndarray, y: np.ndarray) -> bool:
    """Is there (w, b) with s_i (w.x_i + b) >= 1 for all i?  (LP feasibility)"""
    from scipy.optimize import linprog

    s = np.where(y == 1, 1.0, -1.0)
    A = -s[:, None] * np.hstack([X, np.ones((len(X), 1))])
    res = linprog(np.zeros(3), A_ub=A, b_ub=-np.ones(len(X)), bounds=[(None, None)] * 3)
    return res.status == 0


def test_two_class_2d():
    s = two_class_2d()
    assert s.dev is None
    assert s.train.X.shape == (800, 2) and s.test.X.shape == (100, 2)
    assert s.train.X.dtype == torch.float64 and s.train.y.dtype == torch.int64
    assert s.train.n_classes == 2 and s.test.n_classes == 2
    assert s.train.class_counts().tolist() == [400, 400]
    assert s.test.class_counts().tolist() == [50, 50]
    assert not _linearly_separable(s.train.X.numpy(), s.train.y.numpy())
    # class means near the cluster centres
    m0 = s.train.X[s.train.y == 0].mean(0)
    m1 = s.train.X[s.train.y == 1].mean(0)
    assert torch.allclose(m0, torch.tensor([-1.0, -0.5], dtype=torch.float64), atol=0.2)
    assert torch.allclose(m1, torch.tensor([1.0, 0.8], dtype=torch.float64), atol=0.2)
    # test points are new points
    assert torch.cdist(s.test.X, s.train.X).min() > 0


def test_two_class_2d_reproducible_and_independent():
    a, b, c = two_class_2d(seed=5), two_class_2d(seed=5), two_class_2d(seed=6)
    assert torch.equal(a.train.X, b.train.X) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.X, c.train.X) and not torch.equal(a.test.X, c.test.X)
    small = two_class_2d(n_train=10, n_val=7, seed=5, dtype=torch.float32)
    assert len(small.train) == 10 and len(small.test) == 7 and small.train.X.dtype == torch.float32
    assert set(small.train.y.tolist()) == {0, 1}
    # the test stream does not depend on the training size
    assert torch.equal(two_class_2d(n_train=50, seed=5).test.X, a.test.X)


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"n_train": 0}, ValueError, "n_train"),
        ({"n_val": -1}, ValueError, "n_val"),
        ({"n_train": 2.5}, TypeError, "n_train"),
        ({"seed": -3}, ValueError, "seed"),
        ({"dtype": torch.int32}, TypeError, "dtype"),
    ],
)
def test_two_class_2d_checks(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        two_class_2d(**kwargs)


# ---------------------------------------------------------------------------- from_arrays


@pytest.mark.parametrize("kind", ["numpy", "torch", "list"])
def test_from_arrays_inputs(kind):
    X = [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    y = [0, 2, 1]
    if kind == "numpy":
        X, y = np.array(X), np.array(y)
    elif kind == "torch":
        X, y = torch.tensor(X), torch.tensor(y)
    ds = from_arrays(X, y, name="t")
    assert ds.X.dtype == torch.float64 and ds.y.dtype == torch.int64
    assert ds.n_classes == 3 and ds.name == "t" and len(ds) == 3 and ds.n_features == 2
    assert ds.y.tolist() == [0, 2, 1]


def test_from_arrays_conversions():
    ds = from_arrays(np.ones((4, 3), dtype=np.float32), np.array([0.0, 1.0, 1.0, 0.0]), dtype=None)
    assert ds.X.dtype == torch.float32 and ds.y.dtype == torch.int64 and ds.n_classes == 2
    ds = from_arrays(np.ones((4, 3), dtype=np.uint8), [0, 1, 1, 0], dtype=None)
    assert ds.X.dtype == torch.get_default_dtype()
    ds = from_arrays(np.ones((4, 3)), [0, 1, 1, 0], n_classes=5, dtype=torch.float32)
    assert ds.n_classes == 5 and ds.X.dtype == torch.float32
    assert ds.class_counts().tolist() == [2, 2, 0, 0, 0]
    reg = from_arrays(np.ones((4, 3)), np.arange(4.0), task="regression")
    assert reg.y.shape == (4, 1) and reg.y.dtype == torch.float64 and reg.n_classes is None
    reg2 = from_arrays(np.ones((4, 3)), np.ones((4, 2), dtype=np.int32), task="regression")
    assert reg2.y.shape == (4, 2) and reg2.y.dtype == torch.float64
    img = from_arrays(np.zeros((2, 1, 5, 5)), [1, 0])
    assert img.n_features == 25 and img.flatten().X.shape == (2, 25)


@pytest.mark.parametrize(
    "X, y, kwargs, exc, words",
    [
        (np.ones(5), np.zeros(5), {}, ValueError, ["X", "(5,)"]),
        (np.ones((5, 2)), np.zeros(4), {}, ValueError, ["X", "y", "(5, 2)", "(4,)"]),
        (np.zeros((0, 2)), np.zeros(0), {}, ValueError, ["X", "empty"]),
        (np.ones((3, 0)), np.zeros(3), {}, ValueError, ["X", "features"]),
        (
            np.array([[0.0, 1.0], [np.nan, 2.0], [np.inf, np.nan]]),
            [0, 1, 0],
            {},
            ValueError,
            ["X", "3 non-finite", "(1, 0)"],
        ),
        (np.ones((3, 2)), [0.0, 1.5, 1.0], {}, ValueError, ["y", "1.5"]),
        (np.ones((3, 2)), [0.0, np.nan, 1.0], {}, ValueError, ["y", "nan"]),
        (np.ones((3, 2)), [[0], [1], [0]], {}, ValueError, ["y", "1-D", "(3, 1)"]),
        (np.ones((3, 2)), [0, 1, 7], {"n_classes": 3}, ValueError, ["y", "7", "n_classes=3"]),
        (np.ones((3, 2)), [0, -1, 1], {}, ValueError, ["y", "-1"]),
        (
            np.ones((3, 2)),
            [0, 1, 0],
            {"task": "clasification"},
            ValueError,
            ["task", "classification"],
        ),
        (np.ones((3, 2)), [0, 1, 0], {"n_classes": 0}, ValueError, ["n_classes"]),
        (
            np.ones((3, 2)),
            [0.0, np.nan, 1.0],
            {"task": "regression"},
            ValueError,
            ["y", "non-finite"],
        ),
        (
            np.ones((3, 2)),
            np.ones((3, 1, 1)),
            {"task": "regression"},
            ValueError,
            ["y", "(3, 1, 1)"],
        ),
        (
            np.ones((3, 2)),
            [0.0, 1.0, 2.0],
            {"task": "regression", "n_classes": 3},
            ValueError,
            ["n_classes"],
        ),
        (np.array([["a", "b"]]), [0], {}, TypeError, ["X"]),
        (np.ones((1, 2)), ["cat"], {}, TypeError, ["y"]),
        ([[1.0, 2.0], [3.0]], [0, 1], {}, TypeError, ["X"]),
        (np.ones((3, 2)), [0, 1, 0], {"dtype": torch.int64}, TypeError, ["dtype"]),
        (np.ones((3, 2)), 1, {}, ValueError, ["y"]),
    ],
)
def test_from_arrays_rejects(X, y, kwargs, exc, words):
    with pytest.raises(exc) as err:
        from_arrays(X, y, **kwargs)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


# ---------------------------------------------------------------------------- Dataset


def test_dataset_methods():
    ds = from_arrays(np.arange(12.0).reshape(6, 2), [0, 1, 2, 0, 1, 0], name="d")
    assert len(ds) == 6 and ds.n_features == 2
    assert ds.class_counts().tolist() == [3, 2, 1]
    f32 = ds.to(dtype=torch.float32)
    assert f32.X.dtype == torch.float32 and f32.y.dtype == torch.int64 and f32.name == "d"
    assert ds.to("cpu").X.device.type == "cpu"
    sub = ds.subset([4, 0])
    assert sub.y.tolist() == [1, 0] and sub.X[0].tolist() == [8.0, 9.0] and sub.n_classes == 3
    assert ds.subset(torch.tensor([5])).y.tolist() == [0]
    assert len(ds.subset(np.array([], dtype=np.int64))) == 0
    assert ds.subset(ds.y == 0).y.tolist() == [0, 0, 0]
    assert len(ds.subset(slice(1, 4))) == 3
    with pytest.raises(IndexError, match="6"):
        ds.subset([6])
    reg = from_arrays(np.ones((3, 2)), [1.0, 2.0, 3.0], task="regression")
    assert reg.to(dtype=torch.float32).y.dtype == torch.float32
    with pytest.raises(ValueError, match="classification"):
        reg.class_counts()
    assert "Dataset(name='d', X=(6, 2) float64" in repr(ds)
    with pytest.raises(ValueError, match="first dimension"):
        Dataset(torch.zeros(3, 2), torch.zeros(2, dtype=torch.int64), 2)
    splits = Splits(ds, test=ds).to(dtype=torch.float32)
    assert splits.dev is None and splits.test.X.dtype == torch.float32


# ---------------------------------------------------------------------------- real data

_REAL_DIR = find_fashion_mnist()
needs_real = pytest.mark.skipif(
    _REAL_DIR is None,
    reason="Fashion-MNIST files not found (set SECONDORDER_DATA, or apt-get install "
    "dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def real():
    return load_fashion_mnist(download=False)


@pytest.mark.data
@needs_real
def test_real_fashion_mnist(real):
    assert len(real.train) == 60_000 and len(real.test) == 10_000 and real.dev is None
    assert real.train.X.shape[1:] == (784,) and real.test.X.shape[1:] == (784,)
    assert real.train.class_counts().tolist() == [6000] * 10
    assert real.test.class_counts().tolist() == [1000] * 10
    for split in (real.train, real.test):
        assert float(split.X.min()) == 0.0 and float(split.X.max()) == 1.0
        assert split.X.dtype == torch.float32 and split.y.dtype == torch.int64


@pytest.mark.data
@needs_real
def test_real_fashion_mnist_dev_split():
    s = load_fashion_mnist(download=False, dev_size=10_000, seed=0, flatten=False)
    assert s.train.X.shape == (50_000, 28, 28) and s.dev.X.shape == (10_000, 28, 28)
    assert s.train.class_counts().tolist() == [5000] * 10
    assert s.dev.class_counts().tolist() == [1000] * 10


@pytest.mark.data
@needs_real
def test_real_files_match_official_hashes():
    from secondorder.data.download import sha256_file

    for name, digest in fm.SHA256.items():
        path = _REAL_DIR / name
        if path.is_file():
            assert sha256_file(path) == digest, name


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_mode_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = atomic_write_bytes(tmp_path / "f.bin", b"x")
        plain = tmp_path / "plain.bin"
        plain.write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask

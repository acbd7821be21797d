"""The idx reader checks the header before it reads the data: a declared size above the limit
or above what the file can hold is refused at once, and exactly the declared bytes are read
from the stream (trailing or missing data is the library's DataError naming the file). Files
are built in tmp_path, small on disk (zeros compress well)."""

import gzip
import tracemalloc

import numpy as np
import pytest

from secondorder.data.dataset import DataError
from secondorder.data.idx import read_idx


def _header(dims, code=0x08):
    return bytes([0, 0, code, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)


def _peak_during(fn):
    tracemalloc.start()
    try:
        fn()
    except DataError as exc:
        err = exc
    else:
        err = None
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, err


@pytest.mark.parametrize("gz", [False, True])
def test_a_huge_declared_size_is_refused_before_reading(tmp_path, gz):
    path = tmp_path / "huge"
    data = _header([2**31, 2**31]) + bytes(100)
    path.write_bytes(gzip.compress(data) if gz else data)
    peak, err = _peak_during(lambda: read_idx(path))
    assert err is not None and str(path) in str(err)
    assert "declares 4611686018427387904 data bytes" in str(err) and "limit" in str(err)
    assert peak < 1 << 20


def test_max_bytes_sets_the_limit(tmp_path):
    path = tmp_path / "small"
    path.write_bytes(_header([10, 10]) + bytes(100))
    assert read_idx(path, max_bytes=100).shape == (10, 10)
    with pytest.raises(DataError, match=r"declares 100 data bytes.*limit of 99 bytes"):
        read_idx(path, max_bytes=99)


def test_a_gzip_declaring_more_than_it_can_inflate_to_is_refused(tmp_path):
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(_header([1000, 1000, 100]) + bytes(1000)))  # 100 MB declared
    peak, err = _peak_during(lambda: read_idx(path))
    assert err is not None and str(path) in str(err)
    assert f"more than a {path.stat().st_size}-byte gzip file can hold" in str(err)
    assert peak < 1 << 20


def test_data_much_longer_than_declared_is_refused_without_inflating_it(tmp_path):
    path = tmp_path / "long.gz"
    path.write_bytes(gzip.compress(_header([10, 10]) + bytes(32 << 20), compresslevel=1))
    peak, err = _peak_during(lambda: read_idx(path))
    assert err is not None and str(path) in str(err) and "trailing bytes" in str(err)
    assert peak < 4 << 20  # the whole 32 MiB stream was never held


@pytest.mark.parametrize("gz", [False, True])
def test_too_short_data_names_both_sizes(tmp_path, gz):
    path = tmp_path / "short"
    data = _header([50, 40], code=0x0B) + bytes(3000)  # int16: 4000 bytes declared
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match=r"truncated: expected 4000 data bytes.*found 3000"):
        read_idx(path)


@pytest.mark.parametrize("code", [0x08, 0x0B, 0x0C, 0x0D, 0x0E])
def test_a_valid_gzip_file_is_read_exactly(tmp_path, code):
    from secondorder.data.idx import IDX_TYPES

    dtype = IDX_TYPES[code]
    arr = (np.arange(3 * 7 * 5) - 40).astype(dtype).reshape(3, 7, 5)
    path = tmp_path / "ok.gz"
    path.write_bytes(gzip.compress(_header(arr.shape, code) + arr.tobytes()))
    out = read_idx(path)
    assert out.dtype.isnative and out.flags.writeable
    np.testing.assert_array_equal(out, arr)


def test_reading_a_gzipped_file_closes_it(tmp_path):
    import gc
    import warnings

    from secondorder.data.idx import write_idx

    path = write_idx(tmp_path / "a.gz", np.arange(12, dtype=np.uint8).reshape(3, 4))
    truncated = tmp_path / "b.gz"
    truncated.write_bytes(path.read_bytes()[:-6])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        assert read_idx(path).shape == (3, 4)
        with pytest.raises(DataError, match="b.gz"):
            read_idx(truncated)  # the error path closes it too
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]

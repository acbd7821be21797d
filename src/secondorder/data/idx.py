"""Reader and writer for the idx file format (used by MNIST and Fashion-MNIST).

An idx file is a 4-byte magic number -- two zero bytes, a type code and the number of
dimensions -- followed by each dimension as a big-endian uint32 and then the array data,
big-endian, in C order. Type codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64. Files may be gzip-compressed; compression is detected from
the gzip magic bytes, not the file name.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from secondorder.data.dataset import DataError
from secondorder.data.download import atomic_write_bytes

__all__ = ["IDX_TYPES", "read_idx", "write_idx"]

#: idx type code -> big-endian NumPy dtype.
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an idx file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc}") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise DataError(
                f"{path}: corrupt or truncated gzip stream ({exc}); delete the file and "
                "obtain it again"
            ) from None
    return raw


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx file (raw or gzipped) into a native-byte-order NumPy array.

    Raises :class:`DataError` naming the file when it is missing, has a bad magic number,
    is truncated or has trailing bytes, or is a corrupt gzip stream.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(
            f"{path}: truncated: expected at least a 4-byte idx header, found {len(data)} bytes"
        )
    magic = int.from_bytes(data[:4], "big")
    zero, type_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or type_code not in IDX_TYPES:
        codes = ", ".join(f"0x{c:02X}" for c in IDX_TYPES)
        raise DataError(
            f"{path}: bad magic number 0x{magic:08X}; expected 0x0000TTDD (idx: two zero "
            f"bytes, a type code TT in {{{codes}}}, the number of dimensions DD)"
        )
    if ndim < 1:
        raise DataError(f"{path}: bad idx header: number of dimensions is 0; expected >= 1")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path}: truncated: expected a {header}-byte idx header for {ndim} dimensions, "
            f"found {len(data)} bytes"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[type_code]
    expected = math.prod(dims) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        what = "truncated" if found < expected else "trailing bytes after the data"
        raise DataError(
            f"{path}: {what}: expected {expected} data bytes after the {header}-byte header "
            f"(shape {dims} of {dtype.name}), found {found}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=math.prod(dims), offset=header)
    # Copy into native byte order; the copy is also writable (frombuffer of bytes is not).
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def _type_code(dtype: np.dtype) -> int:
    for code, t in IDX_TYPES.items():
        if t.kind == dtype.kind and t.itemsize == dtype.itemsize:
            return code
    names = ", ".join(t.newbyteorder("=").name for t in IDX_TYPES.values())
    raise TypeError(f"array dtype {dtype} cannot be stored in an idx file; use one of {names}")


def write_idx(
    path: str | os.PathLike[str], array: np.ndarray, *, compress: bool | None = None
) -> Path:
    """Write ``array`` as an idx file (gzipped when ``compress`` or the name ends in ``.gz``)."""
    path = Path(path)
    array = np.asarray(array)
    if array.ndim < 1 or array.ndim > 255:
        raise ValueError(f"array must have 1 to 255 dimensions, got shape {array.shape}")
    code = _type_code(array.dtype)
    dims = np.asarray(array.shape, dtype=">u4").tobytes()
    body = np.ascontiguousarray(array, dtype=IDX_TYPES[code]).tobytes()
    data = bytes([0, 0, code, array.ndim]) + dims + body
    if compress is None:
        compress = path.name.endswith(".gz")
    if compress:
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(path, data)
    return path

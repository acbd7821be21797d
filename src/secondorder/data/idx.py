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

__all__ = ["IDX_TYPES", "MAX_IDX_BYTES", "read_idx", "write_idx"]

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


#: the default ceiling on the data an idx file may declare (raise it with ``max_bytes``)
MAX_IDX_BYTES = 2**32
#: deflate inflates one byte to at most 1032 (RFC 1951's longest match per ~2 bits); with
#: the gzip overhead this bounds what a compressed file of a given size can hold
_DEFLATE_RATIO = 1032
#: bytes read from the stream per call, and at most counted after the data
_CHUNK = 1 << 20


def _open(path: Path):
    """(binary stream, is gzip, size on disk), or the DataError naming the file; closing the
    stream closes the file under it too."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an idx file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc}") from None
    size = os.fstat(f.fileno()).st_size
    if f.read(2) == _GZIP_MAGIC:
        f.seek(0)
        return _GzipStream(f), True, size
    f.seek(0)
    return f, False, size


class _GzipStream(gzip.GzipFile):
    """A gzip stream over an open file that it closes with itself (``GzipFile(fileobj=)``
    leaves the file open)."""

    def __init__(self, raw) -> None:
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def _read_exact(f, buf: memoryview) -> int:
    """Fill ``buf`` from ``f`` as far as the stream goes; the number of bytes read."""
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got : got + _CHUNK])
        if not n:
            break
        got += n
    return got


def _trailing(f) -> int:
    """How many bytes follow (counted up to one chunk: enough to say there are some)."""
    return len(f.read(_CHUNK))


def _header(path: Path, f) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, dims, header bytes) from the start of the stream."""
    head = f.read(4)
    if len(head) < 4:
        raise DataError(
            f"{path}: truncated: expected at least a 4-byte idx header, found {len(head)} bytes"
        )
    magic = int.from_bytes(head, "big")
    zero, type_code, ndim = int.from_bytes(head[:2], "big"), head[2], head[3]
    if zero != 0 or type_code not in IDX_TYPES:
        codes = ", ".join(f"0x{c:02X}" for c in IDX_TYPES)
        raise DataError(
            f"{path}: bad magic number 0x{magic:08X}; expected 0x0000TTDD (idx: two zero "
            f"bytes, a type code TT in {{{codes}}}, the number of dimensions DD)"
        )
    if ndim < 1:
        raise DataError(f"{path}: bad idx header: number of dimensions is 0; expected >= 1")
    header = 4 + 4 * ndim
    raw = f.read(4 * ndim)
    if len(raw) < 4 * ndim:
        raise DataError(
            f"{path}: truncated: expected a {header}-byte idx header for {ndim} dimensions, "
            f"found {4 + len(raw)} bytes"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4"))
    return IDX_TYPES[type_code], dims, header


def _check_size(path, dims, dtype, header, gz, size, max_bytes) -> int:
    """The declared data bytes, refused before reading when above ``max_bytes``, when more
    than a gzip file of this size can inflate to, or (raw) when the file is not that long."""
    expected = math.prod(dims) * dtype.itemsize
    shape = f"shape {dims} of {dtype.name}"
    if expected > max_bytes:
        raise DataError(
            f"{path}: the idx header declares {expected} data bytes ({shape}), more than the "
            f"limit of {max_bytes} bytes (max_bytes=)"
        )
    found = size - header
    if gz and expected > _DEFLATE_RATIO * size:
        raise DataError(
            f"{path}: truncated: the idx header declares {expected} data bytes ({shape}), "
            f"more than a {size}-byte gzip file can hold"
        )
    if not gz and found != expected:
        what = "truncated" if found < expected else "trailing bytes after the data"
        raise DataError(
            f"{path}: {what}: expected {expected} data bytes after the {header}-byte header "
            f"({shape}), found {found}"
        )
    return expected


def read_idx(path: str | os.PathLike[str], *, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an idx file (raw or gzipped) into a native-byte-order NumPy array.

    The header is read first and the declared size checked — at most ``max_bytes`` data bytes,
    no more than the file can hold (its length for a raw file; 1032 bytes per compressed byte
    for gzip) — before exactly that many bytes are read from the stream into the result.
    Raises :class:`DataError` naming the file when it is missing, has a bad magic number,
    declares too much, is truncated or has trailing bytes, or is a corrupt gzip stream.
    """
    path = Path(path)
    f, gz, size = _open(path)
    try:
        with f:
            dtype, dims, header = _header(path, f)
            expected = _check_size(path, dims, dtype, header, gz, size, max_bytes)
            buf = np.empty(expected, dtype=np.uint8)  # pages are touched only as data comes
            got = _read_exact(f, memoryview(buf))
            if got < expected:
                raise DataError(
                    f"{path}: truncated: expected {expected} data bytes after the "
                    f"{header}-byte header (shape {dims} of {dtype.name}), found {got}"
                )
            extra = _trailing(f)
            if extra:
                raise DataError(
                    f"{path}: trailing bytes after the data: expected {expected} data bytes "
                    f"after the {header}-byte header (shape {dims} of {dtype.name}), found "
                    f"{expected + extra}{'' if extra < _CHUNK else ' or more'}"
                )
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(
            f"{path}: corrupt or truncated gzip stream ({exc}); delete the file and obtain it again"
        ) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc}") from None
    arr = buf.view(dtype)
    if not dtype.isnative and dtype.itemsize > 1:
        arr = arr.byteswap(inplace=True)  # in place: no second copy of the data
    return arr.view(dtype.newbyteorder("=")).reshape(dims)


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

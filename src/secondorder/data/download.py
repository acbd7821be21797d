"""Downloading data files: streamed, SHA-256 verified and written atomically.

A file is streamed into a temporary file in the destination directory, its SHA-256 is
checked, and only then is it renamed onto the final name with :func:`os.replace`, so an
interrupted or corrupt download never leaves a partial file under the real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from secondorder.data.dataset import DataError

__all__ = ["atomic_write", "atomic_write_bytes", "fetch", "fsync_directory", "sha256_file"]

CHUNK_SIZE = 1 << 16
TIMEOUT_S = 60.0


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 digest of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Flush a directory entry (after a rename) to disk where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[Any], None], *, binary: bool):
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it onto ``path``.

    The temporary file is flushed and ``fsync``-ed before :func:`os.replace` (atomic on POSIX
    within one file system), so a crash leaves the old file or the new one, never a mixture.
    If ``write`` raises, the temporary file is deleted and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        mode = "wb" if binary else "w"
        kwargs = {} if binary else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **kwargs) as f:
            write(f)
            f.flush()
            # mkstemp creates 0600; give the file the mode a plain open() would (umask)
            if hasattr(os, "fchmod"):  # POSIX
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:
            # a failed write(2) (a full disk) names no file: name the one being written
            raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from err
        raise
    fsync_directory(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data), binary=True)


def fetch(
    url: str,
    dest: str | os.PathLike[str],
    sha256: str | None = None,
    progress: bool = True,
    *,
    hint: str = "",
) -> Path:
    """Download ``url`` to the file ``dest`` and return its path.

    If ``dest`` already exists with the expected ``sha256`` nothing is downloaded. The data
    is streamed into a temporary file next to ``dest`` (:func:`atomic_write`); on a hash
    mismatch the temporary file is deleted and :class:`DataError` names the file and both
    digests. Network failures raise :class:`DataError` with the URL, followed by ``hint``.
    """
    dest = Path(dest)
    expected = sha256.lower() if sha256 is not None else None
    if dest.is_file() and expected is not None and sha256_file(dest) == expected:
        return dest
    tail = f"\n{hint}" if hint else ""
    opened = []

    def stream(tmp) -> None:
        opened.append(True)
        digest = hashlib.sha256()
        _download(url, tmp, digest, dest.name, progress, tail)
        got = digest.hexdigest()
        if expected is not None and got != expected:
            raise DataError(
                f"{dest.name}: SHA-256 mismatch for the file downloaded from {url}: expected "
                f"{expected}, got {got}; the download was discarded{tail}"
            )

    try:
        return atomic_write(dest, stream, binary=True)
    except OSError as exc:
        if opened:
            raise
        raise DataError(f"cannot write {dest}: {exc}") from None


def _download(url: str, out, digest, name: str, progress: bool, tail: str) -> None:
    """Stream ``url`` into the open file ``out``, feeding ``digest``; :class:`DataError` on a
    network failure or a body shorter or longer than its Content-Length."""
    try:
        response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
        try:
            headers = getattr(response, "headers", None)
            length = headers.get("Content-Length") if headers is not None else None
            total = int(length) if length and str(length).isdigit() else None
            received = 0
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=name,
                disable=None if progress else True,
                leave=False,
            ) as bar:
                while block := response.read(CHUNK_SIZE):
                    out.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
        finally:
            response.close()
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        if isinstance(exc, urllib.error.HTTPError):
            reason = f"HTTP {exc.code} {exc.reason}"
        else:
            reason = getattr(exc, "reason", None) or exc
        raise DataError(f"download of {url} failed: {reason}{tail}") from None
    if total is not None and received != total:
        raise DataError(
            f"download of {url} failed: incomplete, got {received} of {total} bytes{tail}"
        )

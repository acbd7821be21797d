"""Downloading data files: streamed, SHA-256 verified and written atomically.

A file is streamed into a temporary file in the destination directory, its SHA-256 is
checked, and only then is it renamed onto the final name with :func:`os.replace`, so an
interrupted or corrupt download never leaves a partial file under the real name.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from secondorder.data.dataset import DataError

__all__ = ["atomic_write_bytes", "fetch", "sha256_file"]

CHUNK_SIZE = 1 << 16
TIMEOUT_S = 60.0


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 digest of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _temp_in(directory: Path, name: str):
    return tempfile.NamedTemporaryFile(
        mode="wb", dir=directory, prefix=f".{name}.", suffix=".part", delete=False
    )


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_in(path.parent, path.name)
    try:
        with tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, path)
    except BaseException:
        Path(tmp.name).unlink(missing_ok=True)
        raise
    return path


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
    is streamed into a temporary file next to ``dest``; on a hash mismatch the temporary
    file is deleted and :class:`DataError` names the file and both digests. Network
    failures raise :class:`DataError` with the URL, followed by ``hint``.
    """
    dest = Path(dest)
    expected = sha256.lower() if sha256 is not None else None
    if dest.is_file() and expected is not None and sha256_file(dest) == expected:
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_in(dest.parent, dest.name)
    except OSError as exc:
        raise DataError(f"cannot write {dest}: {exc}") from None

    tail = f"\n{hint}" if hint else ""
    digest = hashlib.sha256()
    try:
        with tmp:
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
                        desc=dest.name,
                        disable=None if progress else True,
                        leave=False,
                    ) as bar:
                        while block := response.read(CHUNK_SIZE):
                            tmp.write(block)
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
            tmp.flush()
            os.fsync(tmp.fileno())
        got = digest.hexdigest()
        if expected is not None and got != expected:
            raise DataError(
                f"{dest.name}: SHA-256 mismatch for the file downloaded from {url}: expected "
                f"{expected}, got {got}; the download was discarded{tail}"
            )
        os.replace(tmp.name, dest)
    except BaseException:
        Path(tmp.name).unlink(missing_ok=True)
        raise
    return dest

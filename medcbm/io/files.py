# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Which files are images, and checking that a path is a readable regular file without blocking.

:func:`check_image_file` looks at a path with ``os.stat``/``os.lstat`` only, so a FIFO, a socket or a
device named ``scan.png`` is reported, never opened (opening a FIFO blocks until a writer appears).
:func:`open_regular_file` then opens it with ``O_NONBLOCK`` and re-checks the opened descriptor, so a
file swapped for a FIFO in between cannot block either.

:func:`read_regular_file` reads a file once; inside :func:`serving_bytes` the readers decode those bytes
(through :func:`open_regular_file`) instead of reading the file again, so the hash that keys the feature
cache is the hash of exactly what was decoded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import stat
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TypeVar

from medcbm.io.errors import ImageReadError

__all__ = [
    "SUPPORTED_SUFFIXES",
    "supported_suffix",
    "unsupported_suffix_reason",
    "check_image_file",
    "open_regular_file",
    "read_regular_file",
    "regular_file_sha256",
    "file_sha256",
    "stream_sha256",
    "serving_bytes",
]

T = TypeVar("T")
_served = threading.local()  # path -> bytes already read by this thread (see serving_bytes)

SUPPORTED_SUFFIXES = (".dcm", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_BY_LENGTH = tuple(sorted(SUPPORTED_SUFFIXES, key=len, reverse=True))


def supported_suffix(path: str | os.PathLike[str]) -> str | None:
    """The supported suffix of ``path`` in lower case (``".nii.gz"`` counts as one), or ``None``."""
    name = os.fspath(path).lower()
    for suffix in _BY_LENGTH:
        if name.endswith(suffix):
            return suffix
    return None


def unsupported_suffix_reason(path: str | os.PathLike[str]) -> str:
    """The error reason for a file whose suffix is not supported."""
    ext = "".join(Path(os.fspath(path)).suffixes[-2:]) or "(none)"
    return f"unsupported file type '{ext}' (supported: {', '.join(SUPPORTED_SUFFIXES)})"


def _kind(mode: int) -> str | None:
    """A reason for a non-regular file type, or ``None`` for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not an image file"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    return "is not a regular file"


def _stat_reason(name: str, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symbolic link loop (the link never reaches a file)"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        if os.path.islink(name):
            return "broken symbolic link (its target does not exist)"
        return "file not found"
    if exc.errno == errno.EACCES:
        return "permission denied"
    return f"cannot access file ({exc.strerror or type(exc).__name__})"


def check_image_file(path: str | os.PathLike[str], *, check_suffix: bool = True) -> os.stat_result:
    """Check that ``path`` is an existing, non-empty regular file (after following links).

    Never opens the file. The checks, in order: folder; unsupported suffix (when ``check_suffix``);
    missing file, broken link or link loop; FIFO, socket or device; empty file.

    Args:
        path: the file.
        check_suffix: also require one of :data:`SUPPORTED_SUFFIXES`.

    Returns:
        The ``os.stat`` result of the file.

    Raises:
        ImageReadError: naming ``path`` and the reason.
    """
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except OSError as e:
        st, stat_error = None, e
    else:
        stat_error = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise ImageReadError(name, "is a folder, not an image file")
    if check_suffix and supported_suffix(name) is None:
        raise ImageReadError(name, unsupported_suffix_reason(name))
    if stat_error is not None:
        raise ImageReadError(name, _stat_reason(name, stat_error))
    assert st is not None
    kind = _kind(st.st_mode)
    if kind is not None:
        raise ImageReadError(name, kind)
    if st.st_size == 0:
        raise ImageReadError(name, "file is empty")
    return st


def open_regular_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Open ``path`` for binary reading without ever blocking; it must be a regular file.

    Args:
        path: the file.

    Returns:
        A buffered binary file object (the caller closes it).

    Raises:
        ImageReadError: ``path`` cannot be opened or is not a regular file.
    """
    name = os.fspath(path)
    data = getattr(_served, "files", {}).get(name)
    if data is not None:
        return io.BytesIO(data)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(name, flags)
    except OSError as e:
        raise ImageReadError(name, _stat_reason(name, e)) from None
    try:
        kind = _kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise ImageReadError(name, kind)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: str | os.PathLike[str]) -> bytes:
    """A regular file's bytes, checked and opened as :func:`check_image_file` and :func:`open_regular_file`
    do (a FIFO is never opened; the suffix is not checked).

    Raises:
        ImageReadError: a missing file, a folder, a non-regular file, a broken link or a link loop,
            an empty file, or a read error.
    """
    return _checked_read(path, lambda fh: fh.read())


def _checked_read(path: str | os.PathLike[str], read: Callable[[BinaryIO], T]) -> T:
    """``read`` applied to a regular file checked and opened without blocking; read errors name the file."""
    check_image_file(path, check_suffix=False)
    with open_regular_file(path) as fh:
        try:
            return read(fh)
        except OSError as e:
            raise ImageReadError(os.fspath(path), f"cannot read file ({e.strerror or type(e).__name__})") from None
        except MemoryError:
            raise ImageReadError(os.fspath(path), "file is too large to load into memory") from None


@contextlib.contextmanager
def serving_bytes(path: str | os.PathLike[str], data: bytes) -> Iterator[None]:
    """Within the block, :func:`open_regular_file` of ``path`` (in this thread) reads ``data`` from memory."""
    files = _served.__dict__.setdefault("files", {})
    name = os.fspath(path)
    files[name] = data
    try:
        yield
    finally:
        files.pop(name, None)


def regular_file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """sha256 (hex) of a regular file's bytes, checked and opened as :func:`check_image_file` and
    :func:`open_regular_file` do (a FIFO is never opened; the suffix is not checked).

    Args:
        path: the file.
        chunk: read size in bytes.

    Returns:
        64 hexadecimal characters.

    Raises:
        ImageReadError: a missing file, a folder, a non-regular file, a broken link or a link loop,
            an empty file, or a read error.
    """
    return _checked_read(path, lambda fh: stream_sha256(fh, chunk))


def stream_sha256(fh: BinaryIO, chunk: int = 1 << 20) -> str:
    """sha256 (hex) of what is left to read in an open binary file (the package's one hashing loop)."""
    h = hashlib.sha256()
    for block in iter(lambda: fh.read(chunk), b""):
        h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """sha256 (hex) of a file's bytes, without the image-file checks (weights, CSVs, data files).

    Raises:
        OSError: the file cannot be opened or read.
    """
    with open(path, "rb") as fh:
        return stream_sha256(fh, chunk)

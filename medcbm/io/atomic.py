# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Atomic file writes: a reader sees either the old file or the complete new one, never a partial one.

The data goes to a temporary file in the target's folder (same file system, so the rename is atomic),
is flushed and fsynced, then ``os.replace`` puts it in place; the folder is fsynced where the platform
allows it. On any failure the temporary file is removed and the target is left untouched.

.. code-block:: python

    from medcbm.io.atomic import atomic_write_json

    atomic_write_json("bundle/configs/metadata.json", {"version": "0.1.0"})  # 4-space indent + newline
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "JSON_INDENT"]

# The MONAI model-zoo's pretty-format hook expects 4-space JSON.
JSON_INDENT = 4


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(
    path: str | os.PathLike[str],
    mode: str = "w",
    encoding: str | None = "utf-8",
    newline: str | None = None,
    durable: bool = True,
) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for streaming; it replaces ``path`` when the block ends.

    On an exception inside the block the temporary file is removed and ``path`` is left untouched.

    Args:
        path: the target file (parent folders are created).
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        encoding: text encoding (ignored for ``"wb"``).
        newline: as for :func:`open` (``""`` for the ``csv`` module).
        durable: flush the file and its folder to disk (``False`` for rebuildable files such as cache entries:
            the replace is still atomic, only a power cut may lose the new file).

    .. code-block:: python

        with atomic_open("out/predictions.csv", newline="") as fh:
            csv.writer(fh).writerows(rows)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        if mode == "wb":
            fh: IO[Any] = os.fdopen(fd, "wb")
        else:
            fh = os.fdopen(fd, "w", encoding=encoding, newline=newline)
        with fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        if target.exists():  # keep the permissions of the file being replaced
            try:
                os.chmod(tmp, target.stat().st_mode & 0o7777)
            except OSError:
                pass
        else:  # mkstemp creates 0600; give new files the usual umask-based mode
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders are created).

    Args:
        path: the target file.
        data: the complete new content.
        durable: see :func:`atomic_open`.

    Returns:
        ``Path(path)``.

    Raises:
        OSError: the folder is not writable, the disk is full, ... (the target is then unchanged).
    """
    with atomic_open(path, "wb", durable=durable) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (``"\\n"`` line endings are kept as given).

    Args:
        path: the target file.
        text: the complete new content.
        encoding: text encoding.

    Returns:
        ``Path(path)``.
    """
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, sort_keys: bool = False) -> Path:
    """Write ``obj`` as pretty JSON (4-space indent, trailing newline) to ``path`` atomically.

    Args:
        path: the target file.
        obj: a JSON-serialisable object (NaN and infinity are rejected: they are not JSON).
        sort_keys: sort object keys.

    Returns:
        ``Path(path)``.

    Raises:
        ValueError: ``obj`` holds NaN or infinity.
        TypeError: ``obj`` is not JSON-serialisable.
    """
    text = json.dumps(obj, indent=JSON_INDENT, sort_keys=sort_keys, allow_nan=False, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")

# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Errors that name a file and give a short reason (never a DICOM header value)."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["FileReasonError", "ImageReadError", "find_read_error"]


class FileReasonError(ValueError):
    """A file or folder could not be used; ``str()`` is ``"<path>: <reason>"``.

    Attributes:
        path: the file, as the caller named it (a string).
        reason: a short, human-readable reason (never contains DICOM header values).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:  # keep both attributes through pickling (worker processes)
        return (type(self), (self.path, self.reason))


class ImageReadError(FileReasonError):
    """An image could not be read."""


def find_read_error(exc: BaseException | None) -> ImageReadError | None:
    """The :class:`ImageReadError` behind ``exc``, following ``__cause__``/``__context__``.

    MONAI's ``Compose``/``apply_transform`` (and so ``monai.data.Dataset``) re-raise a transform's
    error as ``RuntimeError("applying transform ...")`` with the original as its cause; this finds it.

    Args:
        exc: any exception (or ``None``).

    Returns:
        The first ``ImageReadError`` in the chain, or ``None``.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ImageReadError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None

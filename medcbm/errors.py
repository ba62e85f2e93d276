# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Errors a user can fix. The bundle command prints them as one line, ``medcbm: <reason>``, and exits 2.

Library code raises these; :func:`medcbm.workflows.cli.cli_errors` turns them into the one-line exit at
the command-line edge (and leaves them as ordinary exceptions for Python callers).
"""

from __future__ import annotations

from typing import Sequence

__all__ = [
    "MedcbmUserError",
    "listing",
    "BundleLoadError",
    "BackboneUnavailableError",
    "OutputDirError",
    "ModelsDirError",
    "UnknownOptionError",
]


def listing(items: Sequence[str], most: int = 5) -> str:
    """The first ``most`` items of a problem list for a one-line message, and how many more there are."""
    shown = ", ".join(items[:most])
    return shown + (f" ... and {len(items) - most} more" if len(items) > most else "")


class MedcbmUserError(Exception):
    """A problem with what the user passed or with their machine; ``str()`` is the whole message, one line."""

    exit_code = 2


class BackboneUnavailableError(MedcbmUserError, RuntimeError):
    """A hub backbone's weights are not cached and cannot be fetched (offline, proxy, gated repository)."""


class OutputDirError(MedcbmUserError, OSError):
    """The output folder cannot be created or written (it is a file, read-only, the disk is full)."""


class ModelsDirError(MedcbmUserError, FileNotFoundError):
    """``--models_dir`` is missing, not a folder, or lacks the files a bundle needs."""


class UnknownOptionError(MedcbmUserError):
    """A ``--option`` on the bundle command line that neither MONAI's runner nor the config knows."""


class BundleLoadError(MedcbmUserError, ValueError):
    """A bundle's files are missing, inconsistent or were written by an incompatible version."""

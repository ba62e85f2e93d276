# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Where the offline shared data lives, and small helpers shared by the dataset adapters."""

from __future__ import annotations

import csv
import os
from collections.abc import Container, Iterable, Iterator
from pathlib import Path

from ..io.files import file_sha256

__all__ = [
    "SHARED_DATA_ENV",
    "shared_data_root",
    "resolve_dataset_dir",
    "read_labels_csv",
    "rows_in_splits",
    "sha256_file",
    "check_file",
    "check_splits",
]

SHARED_DATA_ENV = "MEDCBM_SHARED_DATA"


def shared_data_root() -> Path | None:
    """Root folder of the offline shared data.

    ``$MEDCBM_SHARED_DATA`` when set, else ``<repo root>/../shared/data`` where the repo root is the
    parent of the ``medcbm`` package folder.

    Returns:
        The folder as an absolute path, or ``None`` when it does not exist.
    """
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        path = Path(env).expanduser()
    else:
        repo_root = Path(__file__).resolve().parents[2]
        path = repo_root.parent / "shared" / "data"
    path = path.resolve()
    return path if path.is_dir() else None


def resolve_dataset_dir(root: str | os.PathLike[str] | None, name: str) -> Path:
    """Folder of dataset ``name`` (e.g. ``"pbc_wbcatt"``).

    Args:
        root: the shared data root (holding ``name/``), or the dataset folder itself; ``None`` uses
            :func:`shared_data_root`.
        name: dataset folder name.

    Raises:
        FileNotFoundError: when the folder or its ``labels.csv`` is missing.
    """
    if root is None:
        base = shared_data_root()
        if base is None:
            raise FileNotFoundError(
                f"shared data not found: set ${SHARED_DATA_ENV} or place it at <repo>/../shared/data "
                f"(looking for the '{name}' folder)"
            )
    else:
        base = Path(root).expanduser().resolve()
    folder = base / name
    if not folder.is_dir() and base.name == name and base.is_dir():
        folder = base
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder '{name}' not found under {base}")
    if not (folder / "labels.csv").is_file():
        raise FileNotFoundError(f"dataset '{name}': labels.csv missing in {folder}")
    return folder


def read_labels_csv(folder: Path) -> list[dict[str, str]]:
    """Rows of ``folder/labels.csv`` as dicts of strings."""
    with open(folder / "labels.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def rows_in_splits(
    folder: Path, splits: Container[str], rows: Iterable[dict[str, str]] | None = None
) -> Iterator[tuple[str, dict[str, str], str]]:
    """The rows of ``folder/labels.csv`` whose ``split`` column (stripped) is one of ``splits``, in file order.

    Args:
        folder: the dataset folder.
        splits: the wanted split names.
        rows: the rows of ``folder/labels.csv`` when the caller has read them already; ``None`` reads them.

    Yields:
        ``(split, row, origin)``: the stripped split name, the row, and ``"<folder>/labels.csv:<image_id>"`` for
        error messages.
    """
    for row in read_labels_csv(folder) if rows is None else rows:
        split = row["split"].strip()
        if split in splits:
            yield split, row, f"{folder / 'labels.csv'}:{row['image_id']}"


sha256_file = file_sha256  # the data sets' name for the package's one file hash (medcbm.io.files)


def check_file(path: Path, expected_sha256: str, verify_hash: bool) -> None:
    """Raise if ``path`` is missing or (when ``verify_hash``) its SHA-256 differs from ``expected_sha256``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the hash does not match; the message names the file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"image listed in labels.csv is missing: {path}")
    if verify_hash:
        actual = sha256_file(path)
        if actual != expected_sha256.strip().lower():
            raise ValueError(f"sha256 mismatch for {path}: expected {expected_sha256}, got {actual}")


def check_splits(splits: tuple[str, ...] | list[str] | str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """Normalise ``splits`` to a tuple and reject unknown names."""
    if isinstance(splits, str):
        splits = (splits,)
    splits = tuple(splits)
    bad = [s for s in splits if s not in allowed]
    if bad:
        raise ValueError(f"unknown split(s) {bad}; expected a subset of {list(allowed)}")
    return splits

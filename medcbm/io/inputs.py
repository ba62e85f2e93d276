# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Listing user inputs: a folder, a CSV, or one image -> :class:`InputRecord` rows in a stable order.

Unreadable inputs are *not* errors here: a missing file, a folder or a FIFO listed in a CSV, a broken
symbolic link or a link loop all keep their row, and become ``status=error`` rows with a clear reason
when read (:func:`medcbm.io.files.check_image_file`). Nothing here opens an image file, so a FIFO named
``scan.png`` never blocks the listing. Errors about the listing itself are :class:`InputListError`
naming the folder or CSV.

.. code-block:: python

    from medcbm.io.inputs import list_inputs

    records = list_inputs("study/inputs.csv")   # [InputRecord(image=..., path=..., label=..., extra={...})]
"""

from __future__ import annotations

import csv
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcbm.io.errors import FileReasonError
from medcbm.io.files import SUPPORTED_SUFFIXES, supported_suffix

__all__ = ["InputRecord", "InputListError", "list_inputs"]


@dataclass
class InputRecord:
    """One input image.

    Attributes:
        image: the image as the user gave it (the CSV cell, or ``<folder>/<relative path>`` for a folder).
        path: the absolute file path; symbolic links are resolved, except a broken link or a link loop,
            which is kept as the link itself so that reading it can say so. It may not exist (reading
            it then gives an error row).
        label: the ``label`` column, stripped; ``None`` when absent or empty.
        extra: the other CSV columns (column name -> cell text).
    """

    image: str
    path: Path
    label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class InputListError(FileReasonError):
    """The input folder or CSV cannot be listed (``path``: the folder or CSV; ``reason``: why)."""


def _record_path(p: Path) -> Path:
    """Absolute path for a record: resolved, but a link that does not resolve is kept as the link."""
    try:
        return p.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, broken link, link loop (RuntimeError before Python 3.13)
        pass
    if os.path.islink(p):
        try:
            parent = p.parent.resolve()
        except (OSError, RuntimeError):
            parent = Path(os.path.abspath(p.parent))
        return parent / p.name
    try:
        return p.resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(p))


def list_inputs(source: str | os.PathLike[str]) -> list[InputRecord]:
    """List the images of a folder, a CSV, or a single image file.

    * Folder: searched recursively (symbolic links to folders are followed once) for entries whose
      suffix, case-insensitively, is one of :data:`~medcbm.io.files.SUPPORTED_SUFFIXES`; hidden
      files and folders (names starting with ``.``) are skipped; sorted by relative path.
      ``image`` is ``os.path.join(source, relative_path)``. Broken links, link loops and other
      non-regular entries with an image suffix are listed (they fail, with a reason, when read).
    * CSV (``.csv``, UTF-8 with or without BOM): a column ``image`` (absolute path, or relative to
      the CSV's folder; ``~`` is expanded) and an optional column ``label``; other columns go to
      ``extra``. Header names are matched after stripping whitespace, case-insensitively. Rows keep
      their order; every row is kept, whatever its image path points at.
    * A single supported image file: one record.

    Args:
        source: the folder, CSV or image.

    Returns:
        The records, in a stable order.

    Raises:
        InputListError: the source does not exist, a CSV is not a regular file, is empty, has no
            ``image`` column or a row with an empty ``image`` cell, or a folder holds no supported image.
    """
    given = os.fspath(source)
    p = Path(given).expanduser()
    if not p.exists():
        raise InputListError(given, "input not found (expected a folder, a CSV file or an image)")
    if p.is_dir():
        return _list_folder(given, p)
    if p.suffix.lower() == ".csv":
        return _list_csv(given, p)
    if supported_suffix(p.name) is not None:
        return [InputRecord(image=given, path=_record_path(p))]
    raise InputListError(
        given, f"not a folder, a CSV file or a supported image (supported: {', '.join(SUPPORTED_SUFFIXES)})"
    )


def _list_folder(given: str, root: Path) -> list[InputRecord]:
    found: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:  # regular files, and links os.walk could not follow (broken, loops)
            if name.startswith(".") or supported_suffix(name) is None:
                continue
            found.append(Path(os.path.relpath(os.path.join(dirpath, name), root)).as_posix())
    if not found:
        raise InputListError(given, f"no supported images found (looked for {', '.join(SUPPORTED_SUFFIXES)})")
    found.sort()
    return [InputRecord(image=os.path.join(given, rel), path=_record_path(root / rel)) for rel in found]


def _read_csv_rows(given: str, csv_path: Path) -> list[list[str]]:
    try:
        mode = os.stat(csv_path).st_mode
    except OSError as e:
        raise InputListError(given, f"cannot read CSV ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(mode):  # a FIFO would block the open below
        raise InputListError(given, "CSV is not a regular file")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            return list(csv.reader(fh))
    except UnicodeDecodeError:
        raise InputListError(given, "CSV is not UTF-8 text") from None
    except (OSError, csv.Error) as e:
        raise InputListError(given, f"cannot read CSV ({e})") from None


def _list_csv(given: str, csv_path: Path) -> list[InputRecord]:
    rows = [r for r in _read_csv_rows(given, csv_path) if any(cell.strip() for cell in r)]
    if not rows:
        raise InputListError(given, "CSV is empty (expected a header with an 'image' column)")
    header = [h.strip() for h in rows[0]]
    lowered = [h.lower() for h in header]

    def column(name: str) -> int | None:
        if name in header:
            return header.index(name)
        return lowered.index(name) if name in lowered else None

    image_col = column("image")
    if image_col is None:
        raise InputListError(given, f"CSV has no 'image' column (columns: {', '.join(header) or 'none'})")
    label_col = column("label")
    dupes = sorted({h for h in header if h and header.count(h) > 1})
    if dupes:
        raise InputListError(given, f"CSV has duplicate columns: {', '.join(dupes)}")
    body = rows[1:]
    if not body:
        raise InputListError(given, "CSV is empty (a header but no rows)")
    base = csv_path.parent
    records: list[InputRecord] = []
    for line_no, row in enumerate(body, start=2):
        cells = [c.strip() for c in row] + [""] * max(0, len(header) - len(row))
        image = cells[image_col]
        if not image:
            raise InputListError(given, f"row {line_no}: empty 'image' value")
        ip = Path(image).expanduser()
        path = _record_path(ip if ip.is_absolute() else base / ip)
        label = cells[label_col] if label_col is not None else ""
        extra = {h: cells[i] for i, h in enumerate(header) if h and i not in (image_col, label_col)}
        records.append(InputRecord(image=image, path=path, label=label or None, extra=extra))
    return records

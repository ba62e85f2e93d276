# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""What an audit reads from its input list besides the images: concept labels and location boxes.

An input CSV may carry concept labels as ``concept_<id>`` columns (1 present, 0 absent, empty unknown) next to
``label``, and boxes as a ``box`` column; every label given is used. A malformed cell is one
:class:`~medcbm.data.InputListError` naming the row and the column.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data import InputListError, InputRecord
from .location import parse_boxes

__all__ = ["concept_labels_from_records", "location_boxes_from_records"]

_TRUE, _FALSE = {"1", "1.0", "true", "yes", "present"}, {"0", "0.0", "false", "no", "absent"}


def concept_labels_from_records(
    records: Sequence[InputRecord], concept_ids: Sequence[str], source: str = "input"
) -> tuple[np.ndarray | None, list[str]]:
    """``(N, K)`` labels (1/0/NaN) from ``concept_<id>`` columns, and the labelled ids the model lacks.

    Args:
        records: the input list.
        concept_ids: the model's concepts (the label matrix's columns).
        source: the input's name, for error messages.

    Returns:
        ``(labels, unused)``: ``labels`` is ``None`` when the input has no ``concept_`` column.

    Raises:
        InputListError: a cell is not 1, 0 or empty (names the row and column).
    """
    cols = sorted({k for r in records for k in r.extra if k.lower().startswith("concept_")})
    if not cols:
        return None, []
    index = {c: i for i, c in enumerate(concept_ids)}
    L = np.full((len(records), len(concept_ids)), np.nan)
    unused = sorted({c[len("concept_") :] for c in cols if c[len("concept_") :] not in index})
    for n, rec in enumerate(records):
        for col in cols:
            cid = col[len("concept_") :]
            raw = str(rec.extra.get(col, "") or "").strip().lower()
            if raw == "" or raw in ("nan", "na", "unknown"):
                continue
            if raw in _TRUE:
                v = 1.0
            elif raw in _FALSE:
                v = 0.0
            else:
                raise InputListError(source, f"row {n + 2}, column {col}: {raw!r} is not 1, 0 or empty")
            if cid in index:
                L[n, index[cid]] = v
    return L, unused


def location_boxes_from_records(records: Sequence[InputRecord], source: str = "input") -> list[list[tuple]] | None:
    """Boxes per record from a ``box`` column (``"x0 y0 x1 y1"`` in original pixels, several separated by ``;``),
    or ``None`` when the input has no such column.

    Raises:
        InputListError: a malformed cell (names the row, the column and the reason).
    """
    col = next((k for r in records for k in r.extra if k.strip().lower() == "box"), None)
    if col is None:
        return None
    out: list[list[tuple]] = []
    for n, rec in enumerate(records):
        try:
            out.append(parse_boxes(rec.extra.get(col)))
        except ValueError as e:
            raise InputListError(source, f"row {n + 2}, column {col}: {e}") from None
    return out

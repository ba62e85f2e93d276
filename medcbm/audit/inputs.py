# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""What an audit reads from its input list besides the images: concept labels and location boxes.

An input CSV may carry concept labels next to ``label`` (``concept_<id>`` or ``<id>`` columns, read by
:mod:`medcbm.concept_labels` as training reads them), and boxes as a ``box`` column; every label given is
used. A malformed cell is one :class:`~medcbm.data.InputListError` naming the row and the column.
"""

from __future__ import annotations

from typing import Sequence


from ..concept_labels import concept_labels_from_records
from ..data import InputListError, InputRecord
from .location import parse_boxes

__all__ = ["concept_labels_from_records", "location_boxes_from_records"]  # the first re-exported


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

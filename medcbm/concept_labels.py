# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Concept labels in a user CSV, read the same way by every job (train, audit).

A concept's label sits in a column named ``concept_<id>`` or just ``<id>`` (the concept id from the bundle's
``configs/concepts.yaml``; case-insensitive). Cells: ``1``/``yes``/``y``/``true``/``present`` (present),
``0``/``no``/``n``/``false``/``absent`` (absent), empty/``nan``/``na``/``unknown`` (not known); anything else
is an :class:`~medcbm.data.InputListError` naming the CSV row and column.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .io.inputs import InputListError, InputRecord

__all__ = ["CONCEPT_PREFIX", "parse_concept_label", "concept_label_columns", "concept_labels_from_records"]

CONCEPT_PREFIX = "concept_"
_TRUE = {"1", "1.0", "yes", "y", "true", "present"}
_FALSE = {"0", "0.0", "no", "n", "false", "absent"}
_UNKNOWN = {"", "nan", "na", "unknown"}


def parse_concept_label(value: Any, where: str) -> float:
    """One cell -> 1.0 (present), 0.0 (absent) or NaN (not known).

    Raises:
        ValueError: any other value, naming ``where``.
    """
    text = "" if value is None else str(value).strip().lower()
    if text in _UNKNOWN:
        return float("nan")
    if text in _TRUE:
        return 1.0
    if text in _FALSE:
        return 0.0
    raise ValueError(f"{where}: concept label {value!r} must be 1/0, yes/no, true/false, present/absent or empty")


def concept_label_columns(
    records: Sequence[InputRecord], concept_ids: Sequence[str]
) -> tuple[dict[str, str], list[str]]:
    """``({concept id: CSV column}, unused)``: the columns that label the model's concepts, and the ids of
    ``concept_<id>`` columns the model does not have.

    Raises:
        ValueError: a concept labelled twice (``<id>`` and ``concept_<id>``).
    """
    columns = {k for r in records[:1] for k in r.extra}
    wanted = {c.lower(): c for c in concept_ids}
    found: dict[str, str] = {}
    unused = []
    for col in sorted(columns):
        key = col.strip().lower()
        cid_key = key[len(CONCEPT_PREFIX) :] if key.startswith(CONCEPT_PREFIX) else key
        if cid_key not in wanted:
            if key.startswith(CONCEPT_PREFIX):
                unused.append(cid_key)
            continue
        cid = wanted[cid_key]
        if cid in found:
            raise ValueError(f"concept {cid} is labelled by two columns, {found[cid]!r} and {col!r}")
        found[cid] = col
    return found, sorted(unused)


def concept_labels_from_records(
    records: Sequence[InputRecord], concept_ids: Sequence[str], source: str = "input"
) -> tuple[np.ndarray | None, list[str]]:
    """``(N, K)`` labels (1 / 0 / NaN) in ``concept_ids`` order, and the labelled ids the model lacks.

    Args:
        records: the CSV's rows.
        concept_ids: the model's concepts (the matrix's columns).
        source: the CSV's name, for error messages.

    Returns:
        ``(labels, unused)``; ``labels`` is ``None`` when no column labels one of the model's concepts.

    Raises:
        InputListError: a cell that is not a label, or a concept labelled twice (names the CSV, row and column).
    """
    try:
        columns, unused = concept_label_columns(records, concept_ids)
    except ValueError as e:
        raise InputListError(source, str(e)) from None
    if not columns:
        return None, unused
    out = np.full((len(records), len(concept_ids)), np.nan, dtype=np.float32)
    for k, cid in enumerate(concept_ids):
        col = columns.get(cid)
        if col is None:
            continue
        for i, rec in enumerate(records):
            try:
                out[i, k] = parse_concept_label(rec.extra.get(col), f"row {i + 2}, column {col}")
            except ValueError as e:
                raise InputListError(source, str(e)) from None
    return out, unused

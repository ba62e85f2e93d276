# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""One concept-label format for every job: ``concept_<id>`` or ``<id>`` columns, the same cell vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from medcbm.concept_labels import concept_labels_from_records
from medcbm.data import InputListError, InputRecord

IDS = ["red_area", "blue_area"]


def _records(rows):
    return [InputRecord(f"{i}.png", f"/x/{i}.png", "a", dict(r)) for i, r in enumerate(rows)]


@pytest.mark.parametrize("prefix", ["", "concept_", "Concept_"])
def test_both_column_styles_read_the_same(prefix):
    rows = [
        {f"{prefix}red_area": "yes", f"{prefix}blue_area": "0"},
        {f"{prefix}red_area": "", f"{prefix}blue_area": "y"},
    ]
    labels, unused = concept_labels_from_records(_records(rows), IDS, "in.csv")
    np.testing.assert_array_equal(labels, np.array([[1, 0], [np.nan, 1]], dtype=np.float32))
    assert unused == []


def test_unknown_concept_columns_are_reported_and_other_columns_ignored():
    rows = [{"concept_green_area": "1", "patient_group": "7", "red_area": "1"}]
    labels, unused = concept_labels_from_records(_records(rows), IDS, "in.csv")
    assert unused == ["green_area"]
    np.testing.assert_array_equal(labels, np.array([[1, np.nan]], dtype=np.float32))


def test_no_label_column_gives_none():
    assert concept_labels_from_records(_records([{"site": "x"}]), IDS, "in.csv") == (None, [])


def test_a_concept_labelled_twice_or_a_bad_cell_names_the_csv():
    with pytest.raises(InputListError, match="in.csv: concept red_area is labelled by two columns"):
        concept_labels_from_records(_records([{"red_area": "1", "concept_red_area": "0"}]), IDS, "in.csv")
    with pytest.raises(InputListError, match="in.csv: row 3, column blue_area: concept label 'maybe'"):
        concept_labels_from_records(_records([{"blue_area": "1"}, {"blue_area": "maybe"}]), IDS, "in.csv")

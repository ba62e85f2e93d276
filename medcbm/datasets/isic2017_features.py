# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Expert dermoscopic-structure labels for ISIC 2017 images (``shared/data/isic2017_features``, CC-0).

The ISIC 2018 Task 2 ground truth marks five dermoscopic attributes with pixel masks; the staged table
keeps, per image, whether each mask is non-empty (present somewhere in the lesion). It covers 1,921 of
the 2,150 ``isic2017_256`` images. :data:`EXPERT_FEATURE_CONCEPTS` maps each attribute to a concept
of ``bundles/derm_cbm/configs/concepts.yaml``, so those concepts are grounded by probes on expert labels
instead of measurements or text:

=====================  ======================  ==================================================
ISIC attribute         concept                 note
=====================  ======================  ==================================================
``pigment_network``    ``pigment_network``     typical or atypical (the label does not say which)
``negative_network``   ``negative_network``
``streaks``            ``streaks``             regular or irregular
``milia_like_cyst``    ``milia_like_cysts``
``globules``           ``dots_globules``       regular or irregular; dots are not annotated
=====================  ======================  ==================================================

Reference: Codella NCF, Rotemberg V, Tschandl P, et al. Skin lesion analysis toward melanoma detection
2018: a challenge hosted by the International Skin Imaging Collaboration (ISIC). arXiv:1902.03368.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

__all__ = [
    "EXPERT_FEATURE_CONCEPTS",
    "EXPERT_FEATURES_DIR",
    "ISIC2017_TEST_DIR",
    "isic2017_expert_labels",
    "isic2017_test_records",
]

#: Folder name of the staged table, next to ``isic2017_256``.
EXPERT_FEATURES_DIR = "isic2017_features"

#: ISIC attribute column -> derm concept id.
EXPERT_FEATURE_CONCEPTS: dict[str, str] = {
    "pigment_network": "pigment_network",
    "negative_network": "negative_network",
    "streaks": "streaks",
    "milia_like_cyst": "milia_like_cysts",
    "globules": "dots_globules",
}


def isic2017_expert_labels(folder: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Expert concept labels per image id, from ``folder/labels.csv``.

    Args:
        folder: the ``isic2017_features`` folder.

    Returns:
        ``{image_id: {"sha256": str, concept_id: 0.0 | 1.0, ...}}`` for every row of the table
        (images the table does not cover are absent).

    Raises:
        FileNotFoundError: ``labels.csv`` is missing.
        ValueError: a column is missing, a flag is not 0/1, or an image id is repeated (names the file).
    """
    path = Path(folder) / "labels.csv"
    if not path.is_file():
        raise FileNotFoundError(f"expert feature table not found: {path}")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = sorted({"image_id", "image_sha256", *EXPERT_FEATURE_CONCEPTS} - set(reader.fieldnames or ()))
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        out: dict[str, dict[str, Any]] = {}
        for row in reader:
            image_id = row["image_id"].strip()
            if image_id in out:
                raise ValueError(f"{path}: image {image_id} is listed twice")
            labels: dict[str, Any] = {"sha256": row["image_sha256"].strip().lower()}
            for column, concept in EXPERT_FEATURE_CONCEPTS.items():
                value = row[column].strip()
                if value not in ("0", "1"):
                    raise ValueError(f"{path}: {column}={value!r} for {image_id} (expected 0 or 1)")
                labels[concept] = float(value)
            out[image_id] = labels
    return out


#: Folder of the official ISIC 2017 test split (600 images, 256 px), beside ``isic2017_256``.
ISIC2017_TEST_DIR = "isic2017_test_256"


def isic2017_test_records(root: str | os.PathLike[str] | None = None, drop_near_duplicates: bool = True) -> list[dict]:
    """The official ISIC 2017 test split, with the expert structure labels where the ISIC 2018 table has them.

    Args:
        root: the ``isic2017_test_256`` folder or its parent; default the shared data root.
        drop_near_duplicates: leave out the test image of every pair in ``near_duplicates.csv``: the 12 that
            are the same lesion as a train/val image, and one image of each duplicate pair within test.

    Returns:
        One record per image: ``image``, ``label``, ``split`` (``"test"``), ``image_id``, ``sha256`` and, for the
        covered images, one ``0.0``/``1.0`` per expert concept (absent keys where not annotated).
    """
    from .paths import read_labels_csv, resolve_dataset_dir

    folder = resolve_dataset_dir(root, ISIC2017_TEST_DIR)
    dropped: set[str] = set()
    dup_path = folder / "near_duplicates.csv"
    if drop_near_duplicates and dup_path.is_file():
        with open(dup_path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                dropped.add(row["test_image_id"].strip())  # a within-test pair keeps its other image
    flags: dict[str, dict[str, float]] = {}
    flag_path = folder / "features_isic2018_task2_flags.csv"
    if flag_path.is_file():
        with open(flag_path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                flags[row["image_id"].strip()] = {c: float(row[a]) for a, c in EXPERT_FEATURE_CONCEPTS.items()}
    records = []
    for row in read_labels_csv(folder):
        image_id = row["image_id"].strip()
        if image_id in dropped:
            continue
        rec: dict[str, Any] = {
            "image": str((folder / row["file"]).resolve()),
            "label": row["label"].strip(),
            "split": "test",
            "image_id": image_id,
            "sha256": row["sha256"].strip().lower(),
        }
        rec.update(flags.get(image_id, {}))
        records.append(rec)
    return records

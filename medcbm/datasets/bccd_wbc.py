# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""BCCD single white-cell crops from another laboratory (``shared/data/bccd_wbc_dev``, MIT) as records.

A second site for the blood bundle: a different stain, camera and magnification from PBC. It is for
*measuring* site shift and adaptation only: no pretraining recipe or fit may train on it or select
hyper-parameters on it (``medcbm.pretrain.dataset_records`` does not list it). Every record has
``split="dev"`` and no concept labels.
"""

from __future__ import annotations

import os
from typing import Any

from .paths import check_file, read_labels_csv, resolve_dataset_dir

__all__ = ["BCCD_WBC_DEV", "bccd_wbc_dev_records"]

BCCD_WBC_DEV = "bccd_wbc_dev"
_CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")


def bccd_wbc_dev_records(
    root: str | os.PathLike[str] | None = None, verify_hashes: bool = False
) -> list[dict[str, Any]]:
    """Records (``image``, ``label``, ``split="dev"``, ``image_id``, ``sha256``, ``dataset``) of the BCCD crops.

    Args:
        root: shared data root (holding ``bccd_wbc_dev/``) or the folder itself; ``None`` uses
            :func:`medcbm.datasets.paths.shared_data_root`.
        verify_hashes: check every file's SHA-256 against ``labels.csv``.

    Raises:
        FileNotFoundError: the folder, its ``labels.csv`` or a listed image is missing.
        ValueError: an unknown class or a SHA-256 mismatch (names the file).
    """
    folder = resolve_dataset_dir(root, BCCD_WBC_DEV)
    records = []
    for row in read_labels_csv(folder):
        label = row["label"].strip().lower()
        if label not in _CLASSES:
            raise ValueError(f"{folder / 'labels.csv'}:{row['image_id']}: unknown class {row['label']!r}")
        path = (folder / row["file"]).resolve()
        check_file(path, row["sha256"], verify_hashes)
        records.append(
            {
                "image": str(path),
                "label": label,
                "split": "dev",
                "image_id": row["image_id"],
                "sha256": row["sha256"].strip().lower(),
                "dataset": BCCD_WBC_DEV,
            }
        )
    return records

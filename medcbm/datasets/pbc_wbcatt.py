# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""PBC white-blood-cell images with WBCAtt attributes (``shared/data/pbc_wbcatt``) as MONAI-style records.

Each record is a dict ready for ``monai.data.Dataset``: ``image`` (absolute path), ``label`` (lowercase
class name), ``split``, ``sha256``, ``image_id``, ``dataset`` and one ``0.0``/``1.0`` entry per concept of
``bundles/blood_cbm/configs/concepts.yaml``, derived from the pathologist-annotated WBCAtt attributes by
:data:`WBCATT_CONCEPT_RULES` (Tsutsui et al., NeurIPS 2023; attributes MIT, images CC BY 4.0).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .paths import check_file, check_splits, resolve_dataset_dir, rows_in_splits

__all__ = [
    "PBC_CLASSES",
    "WBCATT_ATTRIBUTE_VALUES",
    "WBCATT_CONCEPT_RULES",
    "WBCATT_CONCEPT_IDS",
    "wbcatt_concepts",
    "pbc_wbcatt_records",
]

PBC_CLASSES: tuple[str, ...] = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")

#: Every WBCAtt attribute column and its allowed values (WBCAtt v1 vocabulary).
WBCATT_ATTRIBUTE_VALUES: dict[str, frozenset[str]] = {
    "cell_size": frozenset({"big", "small"}),
    "cell_shape": frozenset({"round", "irregular"}),
    "nucleus_shape": frozenset(
        {
            "unsegmented-band",
            "unsegmented-round",
            "unsegmented-indented",
            "segmented-bilobed",
            "segmented-multilobed",
            "irregular",
        }
    ),
    "nuclear_cytoplasmic_ratio": frozenset({"low", "high"}),
    "chromatin_density": frozenset({"densely", "loosely"}),
    "cytoplasm_vacuole": frozenset({"no", "yes"}),
    "cytoplasm_texture": frozenset({"clear", "frosted"}),
    "cytoplasm_colour": frozenset({"light blue", "blue", "purple blue"}),
    "granule_type": frozenset({"small", "round", "coarse", "nil"}),
    "granule_colour": frozenset({"pink", "purple", "red", "nil"}),
    "granularity": frozenset({"yes", "no"}),
}

#: Concept id -> (WBCAtt column, attribute values meaning "concept present").
#: Must list exactly the concepts of ``bundles/blood_cbm/configs/concepts.yaml`` (checked by the tests).
#: ``granule_type=round`` has no concept of its own: it marks exactly the cells with ``granule_colour=red``
#: (700 of 3,500 in pbc_wbcatt + extra), so both are the one concept ``red_orange_granules``.
WBCATT_CONCEPT_RULES: dict[str, tuple[str, frozenset[str]]] = {
    "large_cell": ("cell_size", frozenset({"big"})),
    "irregular_cell_outline": ("cell_shape", frozenset({"irregular"})),
    "round_unsegmented_nucleus": ("nucleus_shape", frozenset({"unsegmented-round"})),
    "indented_nucleus": ("nucleus_shape", frozenset({"unsegmented-indented"})),
    "band_nucleus": ("nucleus_shape", frozenset({"unsegmented-band"})),
    "segmented_bilobed_nucleus": ("nucleus_shape", frozenset({"segmented-bilobed"})),
    "multilobed_nucleus": ("nucleus_shape", frozenset({"segmented-multilobed"})),
    "irregular_nucleus": ("nucleus_shape", frozenset({"irregular"})),
    "high_nc_ratio": ("nuclear_cytoplasmic_ratio", frozenset({"high"})),
    "loose_chromatin": ("chromatin_density", frozenset({"loosely"})),
    "cytoplasmic_vacuoles": ("cytoplasm_vacuole", frozenset({"yes"})),
    "frosted_cytoplasm": ("cytoplasm_texture", frozenset({"frosted"})),
    "pale_blue_cytoplasm": ("cytoplasm_colour", frozenset({"light blue"})),
    "blue_cytoplasm": ("cytoplasm_colour", frozenset({"blue"})),
    "purple_blue_cytoplasm": ("cytoplasm_colour", frozenset({"purple blue"})),
    "granular_cytoplasm": ("granularity", frozenset({"yes"})),
    "fine_granules": ("granule_type", frozenset({"small"})),
    "coarse_granules": ("granule_type", frozenset({"coarse"})),
    "pink_granules": ("granule_colour", frozenset({"pink"})),
    "dark_purple_granules": ("granule_colour", frozenset({"purple"})),
    "red_orange_granules": ("granule_colour", frozenset({"red"})),
}

WBCATT_CONCEPT_IDS: tuple[str, ...] = tuple(WBCATT_CONCEPT_RULES)

_SPLITS = ("train", "val", "test")

for _cid, (_col, _vals) in WBCATT_CONCEPT_RULES.items():  # import-time consistency check
    assert _col in WBCATT_ATTRIBUTE_VALUES and _vals <= WBCATT_ATTRIBUTE_VALUES[_col], _cid


def wbcatt_concepts(row: dict[str, str], origin: str = "<row>") -> dict[str, float]:
    """Binary concept labels of one WBCAtt annotation row.

    Args:
        row: mapping with the 11 WBCAtt attribute columns.
        origin: used in error messages (e.g. ``"labels.csv:BA_1.jpg"``).

    Returns:
        ``{concept_id: 1.0 | 0.0}`` for every concept in :data:`WBCATT_CONCEPT_RULES`.

    Raises:
        ValueError: an attribute column is missing or holds a value outside the WBCAtt vocabulary.
    """
    for col, allowed in WBCATT_ATTRIBUTE_VALUES.items():
        value = row.get(col)
        if value is None:
            raise ValueError(f"{origin}: missing WBCAtt column '{col}'")
        if value.strip() not in allowed:
            raise ValueError(f"{origin}: {col}={value!r} is not one of {sorted(allowed)}")
    return {cid: float(row[col].strip() in values) for cid, (col, values) in WBCATT_CONCEPT_RULES.items()}


def _records_from(folder: Path, dataset: str, splits: tuple[str, ...], verify_hashes: bool) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for split, row, origin in rows_in_splits(folder, splits):
        label = row["label"].strip().lower()
        if label not in PBC_CLASSES:
            raise ValueError(f"{origin}: unknown class {row['label']!r}")
        path = (folder / row["file"]).resolve()
        check_file(path, row["sha256"], verify_hashes)
        record: dict[str, Any] = {
            "image": str(path),
            "label": label,
            "split": split,
            "sha256": row["sha256"].strip().lower(),
            "image_id": row["image_id"],
            "dataset": dataset,
        }
        record.update(wbcatt_concepts(row, origin))
        records.append(record)
    return records


def pbc_wbcatt_records(
    root: str | os.PathLike[str] | None = None,
    splits: Sequence[str] = ("train", "val", "test"),
    include_extra: bool = False,
    verify_hashes: bool = False,
) -> list[dict[str, Any]]:
    """Records of the PBC + WBCAtt white-blood-cell set.

    Args:
        root: shared data root (holding ``pbc_wbcatt/``); ``None`` uses
            :func:`medcbm.datasets.paths.shared_data_root`. The ``pbc_wbcatt`` folder itself is accepted too.
        splits: any of ``"train"``, ``"val"``, ``"test"`` (WBCAtt official split, 600/150/250 images).
        include_extra: also add the 2,500 ``pbc_wbcatt_extra`` images (all ``train``; only when
            ``"train"`` is in ``splits``). Evaluate on ``pbc_wbcatt`` val/test only.
        verify_hashes: check every file's SHA-256 against ``labels.csv`` (slower).

    Returns:
        One dict per image, in ``labels.csv`` order (extra rows last).

    Raises:
        FileNotFoundError: the dataset folder, its ``labels.csv`` or a listed image is missing.
        ValueError: unknown split, unknown class/attribute value, or a SHA-256 mismatch (names the file).
    """
    split_t = check_splits(splits, _SPLITS)
    folder = resolve_dataset_dir(root, "pbc_wbcatt")
    records = _records_from(folder, "pbc_wbcatt", split_t, verify_hashes)
    if include_extra and "train" in split_t:
        extra = resolve_dataset_dir(folder.parent, "pbc_wbcatt_extra")
        records += _records_from(extra, "pbc_wbcatt_extra", ("train",), verify_hashes)
    return records

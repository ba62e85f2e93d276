# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""NIH ChestX-ray14, 1,000 images at 64x64 (``shared/data/nih_cxr14_nih1000_64px``) as MONAI-style records.

The class label is ``normal`` / ``abnormal`` (the source folder, ``label_abnormal``). Concept labels for
``bundles/cxr_cbm/configs/concepts.yaml`` are *weak*: they come from the 14 NIH finding labels through
:data:`FINDING_CONCEPT_RULES`. NIH labels were text-mined from radiology reports (about 90 % accurate),
and a finding implies but does not guarantee a sign (an effusion need not show a meniscus; a
consolidation need not show air bronchograms), so a ``1.0`` means "a finding that usually shows this
sign is reported" and a ``0.0`` means "no such finding is reported".

The source split is not patient-disjoint; :func:`nih_cxr14_records` drops from ``train`` and ``val``
every image of a patient who also appears in ``test``. Train and val may still share patients.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .paths import check_file, check_splits, read_labels_csv, resolve_dataset_dir, rows_in_splits

__all__ = [
    "NIH_FINDINGS",
    "CXR_CLASSES",
    "FINDING_CONCEPT_RULES",
    "CXR_CONCEPT_IDS",
    "finding_concepts",
    "nih_cxr14_records",
    "nih_cxr14_256_records",
    "nih_cxr14_overlap_dropped",
]

DATASET = "nih_cxr14_nih1000_64px"

NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)

CXR_CLASSES: tuple[str, ...] = ("normal", "abnormal")

#: Concept id -> NIH findings whose presence implies the radiographic sign (weak labels, see module doc).
#: Must list exactly the concepts of ``bundles/cxr_cbm/configs/concepts.yaml`` (checked by the tests);
#: every finding set is distinct so no two concepts get identical labels.
FINDING_CONCEPT_RULES: dict[str, tuple[str, ...]] = {
    "enlarged_cardiac_silhouette": ("Cardiomegaly",),
    "retrocardiac_air_fluid_level": ("Hernia",),
    "blunted_costophrenic_angle": ("Effusion", "Pleural_Thickening"),
    "pleural_fluid_meniscus": ("Effusion",),
    "pleural_thickening": ("Pleural_Thickening",),
    "visceral_pleural_line": ("Pneumothorax",),
    "hyperinflated_lungs": ("Emphysema",),
    "hyperlucent_lung": ("Emphysema", "Pneumothorax"),
    "volume_loss_shift": ("Atelectasis",),
    "linear_band_opacities": ("Atelectasis", "Fibrosis"),
    "lobar_consolidation": ("Consolidation",),
    "air_bronchograms": ("Consolidation", "Pneumonia"),
    "patchy_airspace_opacities": ("Infiltration", "Pneumonia"),
    "obscured_hemidiaphragm": ("Atelectasis", "Consolidation", "Effusion", "Pneumonia"),
    "perihilar_haziness": ("Edema",),
    "reticular_opacities": ("Fibrosis",),
    "focal_nodular_opacity": ("Nodule",),
    "large_mass_opacity": ("Mass",),
}

CXR_CONCEPT_IDS: tuple[str, ...] = tuple(FINDING_CONCEPT_RULES)

_SPLITS = ("train", "val", "test")

for _cid, _findings in FINDING_CONCEPT_RULES.items():  # import-time consistency check
    assert _findings and set(_findings) <= set(NIH_FINDINGS), _cid


def finding_concepts(findings: Sequence[str]) -> dict[str, float]:
    """Weak concept labels from a list of NIH findings.

    Args:
        findings: NIH finding names present in the image (empty for ``No Finding``).

    Returns:
        ``{concept_id: 1.0}`` when any implying finding is present, else ``0.0``, for every concept.

    Raises:
        ValueError: a name is not one of the 14 NIH findings.
    """
    present = set(findings)
    unknown = present - set(NIH_FINDINGS)
    if unknown:
        raise ValueError(f"unknown NIH finding(s) {sorted(unknown)}; expected names from {list(NIH_FINDINGS)}")
    return {cid: float(any(f in present for f in rule)) for cid, rule in FINDING_CONCEPT_RULES.items()}


def _findings_of(row: dict[str, str], origin: str) -> list[str]:
    findings = [f for f in NIH_FINDINGS if row[f].strip() == "1"]
    from_text = sorted(f for f in row["finding_labels"].split("|") if f and f != "No Finding")
    if sorted(findings) != from_text:
        raise ValueError(f"{origin}: finding columns {findings} disagree with finding_labels {row['finding_labels']!r}")
    return findings


def _load(root: str | os.PathLike[str] | None) -> tuple[Path, list[dict[str, str]], set[str]]:
    folder = resolve_dataset_dir(root, DATASET)
    rows = read_labels_csv(folder)
    test_patients = {r["patient_id"].strip() for r in rows if r["split"].strip() == "test"}
    return folder, rows, test_patients


def nih_cxr14_overlap_dropped(root: str | os.PathLike[str] | None = None) -> dict[str, int]:
    """How many ``train`` / ``val`` images :func:`nih_cxr14_records` drops because their patient is in ``test``.

    Returns:
        ``{"train": n_train, "val": n_val, "total": n_train + n_val}``.
    """
    _, rows, test_patients = _load(root)
    counts = {"train": 0, "val": 0}
    for r in rows:
        split = r["split"].strip()
        if split in counts and r["patient_id"].strip() in test_patients:
            counts[split] += 1
    counts["total"] = counts["train"] + counts["val"]
    return counts


def nih_cxr14_records(
    root: str | os.PathLike[str] | None = None,
    splits: Sequence[str] = ("train", "val", "test"),
    verify_hashes: bool = False,
) -> list[dict[str, Any]]:
    """Records of the NIH ChestX-ray14 1,000-image, 64x64 set, with ``test`` patients removed from train/val.

    Args:
        root: shared data root (holding ``nih_cxr14_nih1000_64px/``); ``None`` uses
            :func:`medcbm.datasets.paths.shared_data_root`. The dataset folder itself is accepted too.
        splits: any of ``"train"``, ``"val"``, ``"test"`` (source split, 600/200/200 before the drop).
        verify_hashes: check every file's SHA-256 against ``labels.csv``.

    Returns:
        One dict per kept image: ``image`` (absolute path), ``label`` (``normal``/``abnormal``), ``split``,
        ``image_id``, ``patient_id``, ``view_position``, ``sha256``, ``findings`` (list of NIH finding names),
        ``dataset`` and one weak ``0.0``/``1.0`` label per concept of :data:`FINDING_CONCEPT_RULES`.

    Raises:
        FileNotFoundError: the dataset folder, its ``labels.csv`` or a listed image is missing.
        ValueError: unknown split, inconsistent finding columns, or a SHA-256 mismatch (names the file).
    """
    split_t = check_splits(splits, _SPLITS)
    folder, rows, test_patients = _load(root)
    records: list[dict[str, Any]] = []
    for split, row, origin in rows_in_splits(folder, split_t, rows):
        if split != "test" and row["patient_id"].strip() in test_patients:
            continue
        if row["label_abnormal"].strip() not in ("0", "1"):
            raise ValueError(f"{origin}: label_abnormal must be 0 or 1, got {row['label_abnormal']!r}")
        label = "abnormal" if row["label_abnormal"].strip() == "1" else "normal"
        records.append(_record(row, folder, origin, label, row["view_position"], DATASET, verify_hashes))
    return records


def _record(
    row: dict[str, str], folder: Path, origin: str, label: str, view: str, dataset: str, verify_hashes: bool
) -> dict[str, Any]:
    """One record of an NIH labels.csv row (both NIH sets share the finding columns)."""
    findings = _findings_of(row, origin)
    path = (folder / row["file"]).resolve()
    check_file(path, row["sha256"], verify_hashes)
    record: dict[str, Any] = {
        "image": str(path),
        "label": label,
        "split": row["split"].strip(),
        "image_id": row["image_id"],
        "patient_id": row["patient_id"].strip(),
        "view_position": view.strip(),
        "sha256": row["sha256"].strip().lower(),
        "findings": findings,
        "dataset": dataset,
    }
    record.update(finding_concepts(findings))
    return record


DATASET_256 = "nih_cxr14_256"


def nih_cxr14_256_records(
    root: str | os.PathLike[str] | None = None,
    splits: Sequence[str] = ("train", "val", "test"),
    verify_hashes: bool = False,
) -> list[dict[str, Any]]:
    """Records of the 1,150-image, 256-px NIH ChestX-ray14 set (split by patient in the source).

    Same record fields as :func:`nih_cxr14_records` (``view_position`` from the ``view`` column). Patients it
    shares with the 64-px set are all in its ``train`` split, and none is in the 64-px ``test`` split.

    Raises:
        FileNotFoundError: the dataset folder, its ``labels.csv`` or a listed image is missing.
        ValueError: unknown split or label, inconsistent finding columns, or a SHA-256 mismatch (names the file).
    """
    split_t = check_splits(splits, _SPLITS)
    folder = resolve_dataset_dir(root, DATASET_256)
    records: list[dict[str, Any]] = []
    for _, row, origin in rows_in_splits(folder, split_t):
        label = row["label"].strip()
        if label not in CXR_CLASSES:
            raise ValueError(f"{origin}: label must be one of {list(CXR_CLASSES)}, got {label!r}")
        records.append(_record(row, folder, origin, label, row["view"], DATASET_256, verify_hashes))
    return records

# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Tests of the shared-data adapters (medcbm.datasets) and of the two bundle concept banks."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import pytest

from medcbm.concepts import load_concept_bank
from medcbm.datasets import (
    FINDING_CONCEPT_RULES,
    NIH_FINDINGS,
    WBCATT_CONCEPT_RULES,
    nih_cxr14_overlap_dropped,
    nih_cxr14_records,
    pbc_wbcatt_records,
    shared_data_root,
    wbcatt_concepts,
)
from medcbm.datasets.paths import SHARED_DATA_ENV

REPO = Path(__file__).resolve().parents[1]
BLOOD_YAML = REPO / "bundles" / "blood_cbm" / "configs" / "concepts.yaml"
CXR_YAML = REPO / "bundles" / "cxr_cbm" / "configs" / "concepts.yaml"

needs_data = pytest.mark.skipif(shared_data_root() is None, reason="../shared/data not present")


# ---- concept banks (no data needed) ----------------------------------------------------------------


def test_blood_bank_loads_and_matches_rules() -> None:
    bank = load_concept_bank(BLOOD_YAML)
    assert bank.classes == ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    assert 20 <= bank.num_concepts <= 28
    assert set(bank.concept_ids) == set(WBCATT_CONCEPT_RULES), "YAML concepts and WBCATT_CONCEPT_RULES differ"
    assert all(c.kind == "attribute" for c in bank.concepts)
    assert {c.group for c in bank.concepts} <= {"cell", "nucleus", "cytoplasm", "granules"}
    # every one of the 11 WBCAtt attributes is covered by at least one concept
    assert {col for col, _ in WBCATT_CONCEPT_RULES.values()} == {
        "cell_size", "cell_shape", "nucleus_shape", "nuclear_cytoplasmic_ratio", "chromatin_density",
        "cytoplasm_vacuole", "cytoplasm_texture", "cytoplasm_colour", "granule_type", "granule_colour",
        "granularity",
    }  # fmt: skip
    for concept in bank.concepts:  # texts never name a class
        assert not any(cls in concept.text.lower() for cls in bank.classes), concept.id
    assert (bank.prior != 0).any(axis=1).all(), "every class needs a prior row"


def test_cxr_bank_loads_and_matches_rules() -> None:
    bank = load_concept_bank(CXR_YAML)
    assert bank.classes == ["normal", "abnormal"]
    assert 16 <= bank.num_concepts <= 24
    assert set(bank.concept_ids) == set(FINDING_CONCEPT_RULES), "YAML concepts and FINDING_CONCEPT_RULES differ"
    covered = {f for rule in FINDING_CONCEPT_RULES.values() for f in rule}
    assert covered == set(NIH_FINDINGS), f"findings without a concept: {set(NIH_FINDINGS) - covered}"
    rule_sets = [frozenset(r) for r in FINDING_CONCEPT_RULES.values()]
    assert len(set(rule_sets)) == len(rule_sets), "two concepts would get identical weak labels"
    ab, no = bank.class_index("abnormal"), bank.class_index("normal")
    for k, concept in enumerate(bank.concepts):
        assert concept.kind == "finding"
        assert bank.prior[ab, k] == 1 and bank.prior[no, k] == -1, concept.id
        assert not any(f.lower().replace("_", " ") in concept.text.lower() for f in NIH_FINDINGS), concept.id


def test_shared_data_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path))
    assert shared_data_root() == tmp_path.resolve()
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path / "absent"))
    assert shared_data_root() is None


def test_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pbc_wbcatt"):
        pbc_wbcatt_records(root=tmp_path)
    with pytest.raises(FileNotFoundError, match="nih_cxr14_nih1000_64px"):
        nih_cxr14_records(root=tmp_path)


# ---- PBC + WBCAtt ------------------------------------------------------------------------------------


@needs_data
def test_pbc_counts_and_labels() -> None:
    bank = load_concept_bank(BLOOD_YAML)
    records = pbc_wbcatt_records()
    assert Counter(r["split"] for r in records) == {"train": 600, "val": 150, "test": 250}
    per_class = Counter((r["split"], r["label"]) for r in records)
    for cls in bank.classes:
        assert (per_class["train", cls], per_class["val", cls], per_class["test", cls]) == (120, 30, 50)
    assert len({r["image_id"] for r in records}) == 1000
    for r in records:
        assert r["label"] in bank.classes
        assert Path(r["image"]).is_absolute() and Path(r["image"]).is_file()
        assert len(r["sha256"]) == 64
        assert all(r[c] in (0.0, 1.0) for c in bank.concept_ids)
    # concepts are groundable: neither always on nor always off
    for c in bank.concept_ids:
        assert 0 < sum(r[c] for r in records) < len(records), c


@needs_data
def test_pbc_extra_and_splits() -> None:
    with_extra = pbc_wbcatt_records(splits=("train",), include_extra=True)
    assert len(with_extra) == 600 + 2500
    assert {r["split"] for r in with_extra} == {"train"}
    assert len({r["image_id"] for r in with_extra}) == 3100, "extra overlaps pbc_wbcatt"
    assert len(pbc_wbcatt_records(splits=("val",), include_extra=True)) == 150
    with pytest.raises(ValueError, match="unknown split"):
        pbc_wbcatt_records(splits=("valid",))


@needs_data
def test_pbc_hash_verification_detects_tampering(tmp_path: Path) -> None:
    src = shared_data_root() / "pbc_wbcatt"
    with open(src / "labels.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields, row = reader.fieldnames, next(reader)
    fake = tmp_path / "pbc_wbcatt"
    (fake / Path(row["file"]).parent).mkdir(parents=True)
    shutil.copyfile(src / row["file"], fake / row["file"])
    with open(fake / "labels.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerow(row)
    assert len(pbc_wbcatt_records(root=tmp_path, verify_hashes=True)) == 1
    with open(fake / row["file"], "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ValueError, match=Path(row["file"]).name):
        pbc_wbcatt_records(root=tmp_path, verify_hashes=True)
    assert len(pbc_wbcatt_records(root=tmp_path, verify_hashes=False)) == 1


def test_blood_round_red_granules_are_one_concept() -> None:
    bank = load_concept_bank(BLOOD_YAML)
    assert "large_round_granules" not in bank.concept_ids and "red_orange_granules" in bank.concept_ids
    base = {
        "cell_size": "big", "cell_shape": "round", "nucleus_shape": "segmented-bilobed",
        "nuclear_cytoplasmic_ratio": "low", "chromatin_density": "densely", "cytoplasm_vacuole": "no",
        "cytoplasm_texture": "clear", "cytoplasm_colour": "light blue", "granule_type": "round",
        "granule_colour": "red", "granularity": "yes",
    }  # fmt: skip
    labels = wbcatt_concepts(base)
    assert labels["red_orange_granules"] == 1.0 and labels["fine_granules"] == labels["coarse_granules"] == 0.0
    assert wbcatt_concepts({**base, "granule_type": "small", "granule_colour": "pink"})["red_orange_granules"] == 0.0


@needs_data
def test_blood_concepts_have_distinct_labels() -> None:
    """No two blood concepts get the same label on every staged cell (they would be one concept)."""
    records = pbc_wbcatt_records(include_extra=True)
    columns = {cid: tuple(r[cid] for r in records) for cid in WBCATT_CONCEPT_RULES}
    seen: dict[tuple, str] = {}
    for cid, col in columns.items():
        assert col not in seen, f"{cid} and {seen[col]} have identical labels"
        seen[col] = cid


# ---- NIH ChestX-ray14 ---------------------------------------------------------------------------------


@needs_data
def test_nih_counts_and_patient_disjoint() -> None:
    records = nih_cxr14_records()
    dropped = nih_cxr14_overlap_dropped()
    assert dropped["total"] == dropped["train"] + dropped["val"] > 0
    counts = Counter(r["split"] for r in records)
    assert counts == {"train": 600 - dropped["train"], "val": 200 - dropped["val"], "test": 200}
    test_patients = {r["patient_id"] for r in records if r["split"] == "test"}
    for r in records:
        if r["split"] != "test":
            assert r["patient_id"] not in test_patients, r["image_id"]
    assert Counter(r["label"] for r in records if r["split"] == "test") == {"normal": 100, "abnormal": 100}
    assert len(nih_cxr14_records(splits=("test",))) == 200
    with pytest.raises(ValueError, match="unknown split"):
        nih_cxr14_records(splits=("valid",))


@needs_data
def test_nih_concept_labels() -> None:
    bank = load_concept_bank(CXR_YAML)
    records = nih_cxr14_records()
    for r in records:
        assert r["label"] in bank.classes
        assert r["view_position"] in ("PA", "AP")
        assert set(r["findings"]) <= set(NIH_FINDINGS)
        values = [r[c] for c in bank.concept_ids]
        assert all(v in (0.0, 1.0) for v in values)
        if not r["findings"]:
            assert sum(values) == 0, r["image_id"]
        for c in bank.concept_ids:
            assert r[c] == float(bool(set(FINDING_CONCEPT_RULES[c]) & set(r["findings"]))), (r["image_id"], c)
    abnormal = [r for r in records if r["label"] == "abnormal"]
    assert all(r["findings"] for r in abnormal)
    for c in bank.concept_ids:  # every concept has at least one positive image
        assert any(r[c] == 1.0 for r in records), c


@pytest.mark.skipif(shared_data_root() is None, reason="../shared/data not present")
def test_pneumoniamnist_records_written_once_as_png(tmp_path):
    from medcbm.datasets import pneumoniamnist_records
    from medcbm.transforms import read_image

    recs = pneumoniamnist_records(splits=("val",), cache_dir=tmp_path)
    assert len(recs) == 270 and {r["label"] for r in recs} == {"normal", "abnormal"}
    ab = next(r for r in recs if r["label"] == "abnormal")
    no = next(r for r in recs if r["label"] == "normal")
    assert ab["air_bronchograms"] == 1.0 and no["air_bronchograms"] == 0.0
    assert read_image(ab["image"]).shape == (28, 28, 1)
    mtime = Path(ab["image"]).stat().st_mtime_ns
    pneumoniamnist_records(splits=("val",), cache_dir=tmp_path)
    assert Path(ab["image"]).stat().st_mtime_ns == mtime  # reused, not rewritten

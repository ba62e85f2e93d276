# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Each bundle ships a few real, licence-clean example images from its held-out test split."""

from __future__ import annotations

import csv
import hashlib
import re

import pytest
from conftest import REPO

from medcbm.concepts import load_concept_bank
from medcbm.datasets.examples import EXAMPLE_SOURCES, PER_CLASS, select_examples, write_examples
from medcbm.datasets.paths import read_labels_csv, resolve_dataset_dir, shared_data_root

BUNDLES = sorted(EXAMPLE_SOURCES)
LICENCE_WORDS = {  # what each dataset's terms ask a redistributor to state
    "blood_cbm": ("CC BY 4.0", "Acevedo", "doi:10.1016/j.dib.2020.105474"),
    "cxr_cbm": ("NIH Clinical Center", "https://nihcc.app.box.com/v/ChestXray-NIHCC", "Wang X", "CVPR 2017"),
    "derm_cbm": ("CC-0", "ISIC", "arXiv:1710.05006"),
}


def _rows(bundle: str) -> list[dict[str, str]]:
    with open(REPO / "bundles" / bundle / "examples" / "examples.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _data_root_or_skip(dataset: str):
    try:
        return resolve_dataset_dir(None, dataset)
    except FileNotFoundError:
        pytest.skip(f"{dataset} is not in the shared data root ({shared_data_root()}); set MEDCBM_SHARED_DATA")


@pytest.mark.parametrize("bundle", BUNDLES)
def test_examples_cover_every_class_with_files_whose_hashes_match(bundle):
    rows = _rows(bundle)
    folder = REPO / "bundles" / bundle / "examples"
    classes = load_concept_bank(REPO / "bundles" / bundle / "configs" / "concepts.yaml").classes
    assert list(rows[0]) == ["image", "label", "sha256"]
    assert 1 <= len(rows) <= 10
    counts = {c: sum(r["label"] == c for r in rows) for c in classes}
    assert all(1 <= n <= PER_CLASS for n in counts.values()), counts
    assert {r["label"] for r in rows} == set(classes)
    shipped = {p.name for p in folder.iterdir() if p.name not in ("examples.csv", "LICENSE")}
    assert shipped == {r["image"] for r in rows}  # no stray or missing files
    for r in rows:
        path = folder / r["image"]  # relative to the CSV
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r["sha256"], r["image"]
        assert path.stat().st_size < 64 * 1024, r["image"]
        assert re.fullmatch(rf"{re.escape(r['label'])}_\d+\.(jpg|png)", r["image"])  # no source id in the name


@pytest.mark.parametrize("bundle", BUNDLES)
def test_licence_note_and_model_card_attribution(bundle):
    note = (REPO / "bundles" / bundle / "examples" / "LICENSE").read_text(encoding="utf-8")
    for word in LICENCE_WORDS[bundle] + ("held-out test split",):
        assert word in note, f"examples/LICENSE of {bundle} lacks {word!r}"
    card = (REPO / "bundles" / bundle / "docs" / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Example images\n(.*?)(?=^## |\Z)", card, re.S | re.M)
    assert section, f"{bundle} model card has no 'Example images' section"
    assert "examples/LICENSE" in section.group(1) and LICENCE_WORDS[bundle][0] in section.group(1)
    if not EXAMPLE_SOURCES[bundle].list_source_ids:
        assert not re.search(r"\d{8}_\d{3}", note)  # NIH image indices carry patient numbers


@pytest.mark.parametrize("bundle", BUNDLES)
def test_examples_are_the_rules_pick_from_the_held_out_test_split(bundle, tmp_path):
    spec = EXAMPLE_SOURCES[bundle]
    folder = _data_root_or_skip(spec.dataset)
    source = {r["sha256"]: r for r in read_labels_csv(folder)}
    label_of = dict(spec.label_map)
    for r in _rows(bundle):
        src = source.get(r["sha256"])
        assert src is not None, f"{r['image']} is not a file of {spec.dataset}"
        assert src["split"] == spec.split and label_of[src[spec.label_column]] == r["label"], r["image"]
    picked = select_examples(bundle)
    assert [(p["image"], p["label"], p["sha256"]) for p in picked] == [
        (r["image"], r["label"], r["sha256"]) for r in _rows(bundle)
    ]
    # rebuilding reproduces the shipped folder byte for byte
    write_examples(bundle, tmp_path)
    shipped = REPO / "bundles" / bundle / "examples"
    for name in ["examples.csv", "LICENSE"] + [p["image"] for p in picked]:
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes(), name


def test_derm_test_split_is_isic_validation_not_training():
    """ISIC 2017's own validation set is medcbm's held-out test split; the adapter agrees."""
    from medcbm.datasets.dermoscopy_features import isic2017_records

    _data_root_or_skip("isic2017_256")
    test_ids = {r["image_id"] for r in isic2017_records(splits="test", expert_features=False)}
    fit_ids = {r["image_id"] for r in isic2017_records(splits=("train", "val"), expert_features=False)}
    picked = {p["source_id"] for p in select_examples("derm_cbm")}
    assert picked <= test_ids and not picked & fit_ids

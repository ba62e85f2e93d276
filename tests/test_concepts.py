# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import yaml

from medcbm.concepts import ConceptBank, ConceptBankError, load_concept_bank


def _write(tmp_path, data) -> str:
    p = tmp_path / "bank.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_valid_bank_loads_with_prior_matrix(tmp_path, small_bank_dict):
    bank = load_concept_bank(_write(tmp_path, small_bank_dict))
    assert bank.classes == ["alpha", "beta"]
    assert bank.concept_ids == ["round", "spiky", "ruler"]
    np.testing.assert_array_equal(bank.prior, [[1, -1, 0], [-1, 1, 0]])
    assert bank.class_index("BETA") == 1 and bank.class_index("Alpha") == 0
    assert bank.concept("round").citation == "Toy textbook"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["prior"].update({"gamma": {"round": 1}}), "unknown class 'gamma'"),
        (lambda d: d["concepts"].append(dict(d["concepts"][0])), "duplicate concept id 'round'"),
        (lambda d: d["concepts"][1].update(text="  "), "concept 'spiky': empty text"),
        (lambda d: d["prior"]["alpha"].update({"wobbly": 1}), "unknown concept 'wobbly'"),
        (lambda d: d["prior"]["alpha"].update({"round": 2}), "prior[alpha][round]: value 2"),
        (lambda d: d["prior"]["alpha"].update({"round": True}), "prior[alpha][round]: value True"),
        (lambda d: d["concepts"][0].update(kind="symptom"), "kind 'symptom'"),
        (lambda d: d["concepts"][0].pop("source"), "source.citation is required"),
        (lambda d: d["concepts"][0].update(id="Round Shape"), "must match"),
        (lambda d: d.pop("classes"), "missing required key 'classes'"),
    ],
)
def test_invalid_bank_names_file_and_entry(tmp_path, small_bank_dict, mutate, message):
    data = copy.deepcopy(small_bank_dict)
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConceptBankError) as err:
        load_concept_bank(path)
    assert message in str(err.value)
    assert path in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_concept_bank(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes: [a\n")
    with pytest.raises(ConceptBankError, match="not valid YAML"):
        load_concept_bank(bad)


def test_text_fingerprint_tracks_wording_and_subset(small_bank_dict):
    bank = ConceptBank.from_dict(small_bank_dict)
    changed = copy.deepcopy(small_bank_dict)
    changed["concepts"][0]["text"] = "a circular shape"
    assert ConceptBank.from_dict(changed).text_fingerprint() != bank.text_fingerprint()
    sub = bank.subset(["spiky", "round"])
    assert sub.concept_ids == ["spiky", "round"]
    np.testing.assert_array_equal(sub.prior, [[-1, 1], [1, -1]])


def test_round_trip_save(tmp_path, small_bank_dict):
    bank = ConceptBank.from_dict(small_bank_dict)
    bank.save(tmp_path / "out.yaml")
    again = load_concept_bank(tmp_path / "out.yaml")
    assert again.concept_ids == bank.concept_ids
    np.testing.assert_array_equal(again.prior, bank.prior)


@pytest.mark.parametrize("bundle", ["derm_cbm", "cxr_cbm", "blood_cbm"])
def test_shipped_concept_banks_are_valid_and_small(bundle):
    from conftest import REPO

    bank = load_concept_bank(REPO / "bundles" / bundle / "configs" / "concepts.yaml")
    assert 8 <= bank.num_concepts <= 32  # a person cannot use more than ~32 concepts in one explanation
    assert np.abs(bank.prior).sum() > 0
    for c in bank.concepts:
        assert c.citation, c.id
        for cls in bank.classes:  # concepts never name the class
            assert not re.search(rf"\b{cls.replace('_', ' ')}\b", c.text.lower()), (c.id, cls)

# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""adaptation.json: typed read / write / validation (CONTRACT.md)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from medcbm.adaptation import AdaptationSpec, AdaptationSpecError

IDS = ["blue_white_veil", "streaks", "milia_like_cysts"]


def _full() -> AdaptationSpec:
    return AdaptationSpec(
        mask=["streaks"],
        gain={"blue_white_veil": 1.8},
        reasons={"streaks": "fires at the new site", "blue_white_veil": "under-activated"},
        source_accuracy_before=0.9,
        source_accuracy_after=0.897,
        support_accuracy_before=0.4,
        support_accuracy_after=0.8,
        provenance={"bundle": {"name": "derm_cbm", "version": "0.1.0"}, "k_per_class": {"nevus": 4}},
        warnings=["class 'melanoma' has no support image"],
        missing_classes=["melanoma"],
        method={"gamma_max": 3.0},
    )


def test_round_trip_is_exact_and_indented(tmp_path):
    spec = _full()
    path = spec.write(tmp_path / "sub" / "adaptation.json")
    text = path.read_text()
    assert text.startswith('{\n    "format_version"')  # indent 4
    back = AdaptationSpec.read(path, IDS)
    assert back == spec
    assert back.to_dict() == json.loads(text)
    assert AdaptationSpec.from_dict(spec.to_dict()) == spec
    assert back.edited_concepts == ["streaks", "blue_white_veil"]
    # no temporary file left behind
    assert sorted(os.listdir(path.parent)) == ["adaptation.json"]


def test_minimal_hand_written_file_reads(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('{"mask": ["streaks"], "gain": {"blue_white_veil": 2}}')
    spec = AdaptationSpec.read(p, IDS)
    assert spec.mask == ["streaks"] and spec.gain == {"blue_white_veil": 2.0}
    assert spec.source_accuracy_after is None and spec.warnings == []


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"mask": "streaks"}', "'mask' must be a list"),
        ('{"mask": ["nope"]}', "unknown concept ids ['nope']"),
        ('{"gain": {"nope": 2.0}}', "unknown concept ids ['nope']"),
        ('{"gain": {"streaks": -1}}', "finite number >= 0"),
        ('{"gain": {"streaks": NaN}}', "non-finite"),
        ('{"gain": {"streaks": Infinity}}', "non-finite"),
        ('{"gain": {"streaks": "2"}}', "finite number >= 0"),
        ('{"gain": ["streaks"]}', "'gain' must be an object"),
        ('{"mask": ["streaks"], "gain": {"streaks": 2}}', "both masked and amplified"),
        ('{"mask": ["streaks", "streaks"]}', "more than once"),
        ('{"source_accuracy_after": 1.5}', "in [0, 1]"),
        ('{"reasons": {"streaks": 3}}', "'reasons' must be"),
        ('{"masks": ["streaks"]}', "unknown fields ['masks']"),
    ],
)
def test_bad_files_name_the_file_and_reason(tmp_path, content, needle):
    p = tmp_path / "adaptation.json"
    p.write_text(content)
    with pytest.raises(AdaptationSpecError) as e:
        AdaptationSpec.read(p, IDS)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="adaptation file not found"):
        AdaptationSpec.read(tmp_path / "none.json")


def test_constructor_validates_and_write_refuses_invalid(tmp_path):
    with pytest.raises(AdaptationSpecError):
        AdaptationSpec(gain={"a": float("inf")})
    spec = AdaptationSpec()
    spec.gain["a"] = -2.0  # mutated after construction
    with pytest.raises(AdaptationSpecError):
        spec.write(tmp_path / "a.json")
    assert not (tmp_path / "a.json").exists()


def test_apply_sets_the_network_edit():
    from medcbm.grounding import ProbeGrounding
    from medcbm.networks import ConceptBottleneckClassifier

    g = ProbeGrounding(torch.zeros(3, 4), torch.zeros(3))
    net = ConceptBottleneckClassifier(None, g, torch.ones(2, 3), torch.zeros(2), IDS, ["a", "b"])
    AdaptationSpec(mask=["streaks"], gain={"blue_white_veil": 2.0}).apply(net)
    assert net.edit_mask.tolist() == [False, True, False]
    assert net.edit_gain.tolist() == [2.0, 1.0, 1.0]
    with pytest.raises(AdaptationSpecError, match="unknown concept"):
        AdaptationSpec(mask=["x"]).apply(net)

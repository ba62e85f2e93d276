# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Tests that pin behaviour a planted bug once changed silently (issue 16, point 4); each was seen red.

1. the deletion curve follows the *predicted* class, not class 0;
2. a what-if "absent" uses the absent value (not the present one);
3. concept existence (CEM) of an adapted bundle is computed on the scores the adapted model uses;
4. a blank / noise image stays flagged in the audit when the bundle has a reference set;
5. ``yes`` / ``y`` read as present in train's concept-label columns.

Synthetic arrays, and a toy bundle fitted here on red/blue images with a tiny backbone (offline, seconds).
"""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from medcbm.audit import metrics as M
from medcbm.bundle import LoadedBundle
from medcbm.concepts import ConceptBank
from medcbm.data import InputRecord, list_inputs
from medcbm.metrics import softmax
from medcbm.audit.run import AuditOptions
from medcbm.workflows.audit import audit_bundle, explain, what_if_values
from medcbm.concept_labels import concept_labels_from_records, parse_concept_label
from test_workflows import _fit_toy_bundle


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def toy_root(tmp_path_factory, tiny_backbone_spec):
    """A bundle folder fitted on toy red/blue images (probe grounding, a reference set with a shift alarm)."""
    return _fit_toy_bundle(tmp_path_factory.mktemp("planted_toy"), tiny_backbone_spec)


def _audit_csv(root, path):
    """Every toy image with its class and concept labels (``concept_<id>`` columns)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "concept_red_area", "concept_blue_area"])
        for p in sorted((root / "imgs").glob("*.png")):
            red = p.name.startswith("reddish")
            w.writerow([str(p), "reddish" if red else "bluish", int(red), int(not red)])
    return list_inputs(path)


def _image_csv(path, images):
    path.write_text("image\n" + "".join(f"{p}\n" for p in images))
    return path


def _audit(bundle, records):
    return audit_bundle(bundle, records, AuditOptions(max_cards=0, location_concepts=0), progress=False)


# ------------------------------------------------------------------------------------------------ 1. deletion
def test_deletion_curve_follows_the_predicted_class_not_class_0():
    # every image is predicted class 1 with high confidence; class 0 is unlikely
    W = np.array([[-2.0, -2.0, 0.0], [2.0, 2.0, 0.0]])
    S = np.array([[1.0, 0.9, 0.2], [0.8, 1.0, 0.4], [0.9, 0.7, 0.9]])
    b, nu = np.zeros(2), np.zeros(3)
    p = softmax(S @ W.T + b)
    assert (p.argmax(1) == 1).all()
    res = M.deletion(S, W, b, nu, n_random=3)
    # before any deletion: the mean probability of the predicted class; after all: every concept neutral
    assert res["contribution_order"][0] == pytest.approx(p[:, 1].mean(), abs=1e-4)
    assert res["contribution_order"][0] > 0.9
    assert res["contribution_order"][-1] == pytest.approx(0.5, abs=1e-4)
    # removing the concepts in contribution order drops the predicted class's probability monotonically
    assert all(a >= c for a, c in zip(res["contribution_order"], res["contribution_order"][1:]))


def test_audit_deletion_starts_at_the_predicted_probability(toy_root, tmp_path):
    bundle = LoadedBundle.load(toy_root)
    entries, audit, _, _ = _audit(bundle, _audit_csv(toy_root, tmp_path / "in.csv"))
    ok = [e for e in entries if e["status"] == "ok"]
    assert {e["prediction"] for e in ok} == {"reddish", "bluish"}  # both classes predicted: class 0 is not enough
    assert audit["deletion"]["contribution_order"][0] == pytest.approx(
        np.mean([e["probability"] for e in ok]), abs=1e-3
    )


def test_audit_deletion_of_a_label_shifted_bundle_uses_the_offset_logits(toy_root, tmp_path, monkeypatch):
    """An adaptation's label-shift offset is part of the logits: the deletion curve gets the head bias plus it."""
    import medcbm.audit.metrics as audit_metrics

    bundle = LoadedBundle.load(toy_root)
    offset = np.array([1.5, -1.5])
    bundle.network.set_site_calibration(class_offset=offset)
    seen = {}
    real = audit_metrics.deletion

    def spy(scores, weight, bias, neutral, **kw):
        seen["bias"] = np.asarray(bias)
        return real(scores, weight, bias, neutral, **kw)

    monkeypatch.setattr(audit_metrics, "deletion", spy)
    _audit(bundle, _audit_csv(toy_root, tmp_path / "in.csv"))
    expected = bundle.network.head.bias.detach().numpy() + offset
    np.testing.assert_allclose(seen["bias"], expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ 2. what-if
def _explained(user_what_if=None):
    ids, classes = ["a", "b", "c"], ["x", "y"]
    W = np.array([[6.0, -1.0, 0.5], [-6.0, 1.0, -0.5]])
    bias = np.array([0.1, -0.1])
    neutral = np.array([0.5, 0.5, 0.5])
    scores = np.array([0.9, 0.8, 0.6])
    hi, lo = np.array([0.95, 0.9, 0.8]), np.array([0.05, 0.1, 0.2])
    contributions = (scores - neutral)[None, :] * W
    cbias = bias + W @ neutral
    e = explain("img.png", scores, contributions, cbias, W, neutral, ids, classes, hi, lo, top_k=3, n_what_if=3,
                user_what_if=user_what_if)  # fmt: skip

    def proba(s):
        return softmax((s @ W.T + bias)[None])[0]

    return e, proba, scores, neutral, hi, lo


def test_what_if_absent_uses_the_absent_value_and_present_the_present_value():
    e, proba, scores, neutral, hi, lo = _explained()
    rows = {(w["concept"], w["action"]): w for w in e["what_if"]}
    concepts = sorted({c for c, _ in rows})
    assert "a" in concepts and {a for _, a in rows} == {"off", "present", "absent"}
    for cid in concepts:
        k = "abc".index(cid)
        for action, value in (("off", neutral[k]), ("present", hi[k]), ("absent", lo[k])):
            s = scores.copy()
            s[k] = value
            p = proba(s)
            j = int(np.argmax(p))
            w = rows[(cid, action)]
            assert w["prediction"] == ["x", "y"][j] and w["probability"] == pytest.approx(p[j], abs=1e-6)
    # the strongest concept (a, present, for x): setting it absent flips the decision, present keeps it
    assert rows[("a", "absent")]["prediction"] == "y" and rows[("a", "present")]["prediction"] == "x"


def test_user_what_if_absent_uses_the_absent_value():
    e, proba, scores, _, hi, lo = _explained(user_what_if={0: "absent", 1: "present"})
    user = next(w for w in e["what_if"] if w["action"] == "user")
    s = scores.copy()
    s[0], s[1] = lo[0], hi[1]
    p = proba(s)
    assert user["prediction"] == "y" and user["probability"] == pytest.approx(p.max(), abs=1e-6)


def test_what_if_values_absent_below_present():
    ref_scores = np.linspace(0.0, 1.0, 101)[:, None] * np.array([1.0, 2.0])
    net = SimpleNamespace(neutral=torch.tensor([0.5, 1.0]), grounding=SimpleNamespace(mode="probe"))
    hi, lo, rule = what_if_values(SimpleNamespace(network=net, reference=SimpleNamespace(scores=ref_scores)))
    assert hi == pytest.approx([0.95, 1.9]) and lo == pytest.approx([0.05, 0.1]) and "percentile" in rule
    hi, lo, _ = what_if_values(SimpleNamespace(network=net, reference=None))
    assert hi.tolist() == [1.0, 1.0] and lo.tolist() == [0.0, 0.0]
    net.grounding.mode = "text"
    hi, lo, _ = what_if_values(SimpleNamespace(network=net, reference=None))
    assert hi.tolist() == [2.5, 3.0] and lo.tolist() == [-1.5, -1.0]


# ------------------------------------------------------------------------------------------------ 3. CEM, adapted
def test_concept_existence_of_an_adapted_bundle_uses_the_edited_scores(toy_root, tmp_path):
    plain = LoadedBundle.load(toy_root)
    gain = 3.0  # red_area tripled: above its neutral value on every image, bluish ones included
    adaptation = tmp_path / "adaptation.json"
    adaptation.write_text(json.dumps({"mask": [], "gain": {"red_area": gain},
                                      "provenance": {"model_fingerprint": plain.fingerprint()}}))  # fmt: skip
    bundle = LoadedBundle.load(toy_root, adaptation=adaptation)
    assert bundle.network.edit_gain.tolist() == [gain, 1.0]
    records = _audit_csv(toy_root, tmp_path / "in.csv")
    entries, audit, _, _ = _audit(bundle, records)
    ok = [e for e in entries if e["status"] == "ok"]
    assert len(ok) == len(records)
    ids = bundle.concept_ids
    S = np.array([[e["concept_scores"][k] for k in ids] for e in ok])  # what the adapted model uses
    Cp = np.array([[e["contributions"][e["prediction"]][k] for k in ids] for e in ok])
    L = np.array([[e["concept_labels"][k] for k in ids] for e in ok], dtype=np.float64)
    neutral = bundle.network.neutral.numpy().astype(np.float64)
    raw = S.copy()
    raw[:, ids.index("red_area")] /= gain  # the unedited scores
    expected = M.concept_existence(Cp, S, neutral, L)
    unedited = M.concept_existence(Cp, raw, neutral, L)
    assert expected != unedited  # the edit moves concepts across their neutral value: the two must differ
    assert audit["concept_existence"] == expected
    # grounding quality stays a property of the unedited scores
    assert audit["concept_auroc"] == M.concept_auroc(raw, L, ids)


# ------------------------------------------------------------------------------------------------ 4. blank / noise
def test_blank_and_noise_images_stay_flagged_in_the_audit_with_a_reference_set(toy_root, tmp_path, monkeypatch):
    import medcbm.engine as engine

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "blank.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    smooth = np.clip(np.add.outer(np.arange(64), np.arange(64)) * 2, 0, 255).astype(np.uint8)
    Image.fromarray(np.stack([smooth, smooth // 2, 255 - smooth], -1)).save(tmp_path / "gradient.png")
    bundle = LoadedBundle.load(toy_root)
    assert bundle.reference is not None and engine._shift_detector(bundle) is not None
    original = engine._shift_detector

    def lenient(b):  # a detector that never alarms on its score: only the image check can flag
        det = original(b)
        det.threshold_ = math.inf
        return det

    monkeypatch.setattr(engine, "_shift_detector", lenient)
    images = [tmp_path / n for n in ("blank.png", "noise.png", "gradient.png")]
    entries, _, _, _ = _audit(bundle, list_inputs(_image_csv(tmp_path / "in.csv", images)))
    by_image = {e["image"]: e for e in entries}
    for name in ("blank.png", "noise.png"):
        e = by_image[str(tmp_path / name)]
        assert e["status"] == "ok" and "shift_score" in e
        assert e["site_shift"] is True, f"{name} is not flagged"
    assert by_image[str(tmp_path / "gradient.png")]["site_shift"] is False  # the score alone flags nothing


# ------------------------------------------------------------------------------------------------ 5. yes / y
@pytest.mark.parametrize("cell", ["1", "1.0", "yes", "Yes", "YES", "y", "Y", " y ", "true", "present"])
def test_train_reads_yes_and_y_as_present(cell):
    assert parse_concept_label(cell, "here") == 1.0


@pytest.mark.parametrize("cell", ["0", "no", "n", "N", "false", "absent"])
def test_train_reads_no_and_n_as_absent(cell):
    assert parse_concept_label(cell, "here") == 0.0


def test_train_concept_label_columns_with_yes_no(tmp_path):
    bank = ConceptBank.from_dict({
        "classes": ["reddish", "bluish"],
        "concepts": [{"id": c, "text": c, "group": "colour", "kind": "finding", "source": {"citation": "toy"}}
                     for c in ("red_area", "blue_area")],
    })  # fmt: skip
    cells = [("yes", "n"), ("y", "no"), ("", "Y"), ("No", "YES")]
    records = [InputRecord(f"{i}.png", tmp_path / f"{i}.png", "reddish", {"red_area": r, "blue_area": b})
               for i, (r, b) in enumerate(cells)]  # fmt: skip
    L, _ = concept_labels_from_records(records, bank.concept_ids, "train.csv")
    assert L is not None
    np.testing.assert_array_equal(L, np.array([[1, 0], [1, 0], [np.nan, 1], [0, 1]], dtype=np.float32))

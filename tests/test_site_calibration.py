# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Site calibration and label-shift correction on synthetic concept scores with planted site effects.

Three classes, four probability-valued concepts. Class ``a`` is marked by ``a_marker`` and ``a_extra`` together,
``b`` by ``b_marker``, ``c`` by ``c_marker``. Scores are drawn on the logit scale, so a stain that inflates one
concept everywhere is a shift of that concept's logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medcbm.adaptation.reference_scores import ReferenceScores
from medcbm.networks import HeadArrays
from medcbm.adaptation import AdaptationSpec, ConceptCalibrator, LabelShiftEstimator, em_class_prior
from medcbm.adaptation.source_guard import allowed_losses
from medcbm.metrics import softmax
from medcbm.site_shift import SiteShiftDetector, concept_shift_report, looks_like_another_modality
from medcbm.adaptation.site import fit_site_adaptation
from medcbm.grounding import ProbeGrounding
from medcbm.networks import ConceptBottleneckClassifier

CLASSES = ["a", "b", "c"]
IDS = ["a_marker", "b_marker", "c_marker", "a_extra"]
C, K = 3, 4


def _head():
    W = np.zeros((C, K))
    W[0, 0], W[0, 3] = 4.0, 2.5
    W[1, 1] = W[2, 2] = 4.0
    return W, np.zeros(C)


def _scores(rng, y, shift=None, sd=0.5):
    """Logit-scale draws: a class's markers at +1.5, everything else at -1.5; ``shift`` (K,) added at the site."""
    u = np.full((len(y), K), -1.5) + rng.normal(0, sd, (len(y), K))
    u[y == 0, 0] += 3.0
    u[y == 0, 3] += 3.0
    u[y == 1, 1] += 3.0
    u[y == 2, 2] += 3.0
    if shift is not None:
        u = u + np.asarray(shift)
    return 1.0 / (1.0 + np.exp(-u))


def _source(seed=0, n=200):
    rng = np.random.default_rng(seed)
    yr = np.repeat(np.arange(C), n)
    return rng, yr, _scores(rng, yr), _scores(rng, np.repeat(np.arange(C), n))


MU = np.array([[1.0, 0, 0, 1.0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])  # class means of the Gaussian scores
SD = 0.5


def _gauss(rng, y, shift=None):
    """Unbounded Gaussian scores (class means ``MU``, sd ``SD``): :func:`_bayes_head` gives calibrated posteriors."""
    s = MU[y] + rng.normal(0, SD, (len(y), K))
    return s if shift is None else s + np.asarray(shift)


def _bayes_head():
    """The Bayes classifier of :func:`_gauss` scores under equal class priors (its probabilities are calibrated)."""
    return MU / SD**2, -(MU**2).sum(1) / (2 * SD**2)


def _acc(S, y, W, b):
    return float(((S @ W.T + b).argmax(1) == y).mean())


# ------------------------------------------------------------------------------------------------ calibration
def test_calibration_corrects_a_planted_per_concept_shift():
    rng, yr, R, U = _source()
    W, b = _head()
    y = np.repeat(np.arange(C), 100)
    S = _scores(rng, y, shift=[3.0, 0, 0, 0])  # a stain inflates a_marker on every image
    assert _acc(S, y, W, b) < 0.8  # b and c images are pulled toward a
    cal = ConceptCalibrator(concept_ids=IDS).fit(S, ReferenceScores(R, yr, U), HeadArrays.plain(W, b))
    assert [IDS[m.index] for m in cal.maps_] == ["a_marker"] and cal.refused_ == {}
    assert cal.n_unshifted_ == 3
    m = cal.maps_[0]
    assert m.shrink == 1.0 and m.intercept == pytest.approx(-3.0 * m.slope, abs=0.35)
    assert _acc(cal.transform(S), y, W, b) > 0.97
    d = cal.to_dict()
    assert d["space"] == "logit" and set(d["concepts"]) == {"a_marker"}
    assert "shifted at this site" in d["concepts"]["a_marker"]["reason"]
    # the network applies exactly the stored map (one arithmetic)
    net = _network(W, b)
    AdaptationSpec(calibration=d).apply(net)
    with torch.no_grad():
        out = net.apply_edit(torch.as_tensor(S, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(out, cal.transform(S), atol=1e-6)


def test_no_site_effect_leaves_every_concept_alone():
    rng, yr, R, U = _source()
    W, b = _head()
    S = _scores(rng, np.repeat(np.arange(C), 100))
    cal = ConceptCalibrator(concept_ids=IDS).fit(S, ReferenceScores(R, yr, U), HeadArrays.plain(W, b))
    assert cal.maps_ == [] and cal.to_dict() == {}
    np.testing.assert_allclose(cal.transform(S), S, atol=1e-9)


def test_source_guard_refuses_a_map_that_flips_source_predictions():
    rng, yr, R, U = _source()
    W, b = _head()
    y = np.repeat(np.arange(C), 100)
    # b_marker reads low at the site: its map would raise b_marker on every source image and call a and c images b
    S = _scores(rng, y, shift=[0, -4.0, 0, 0])
    cal = ConceptCalibrator(concept_ids=IDS).fit(S, ReferenceScores(R, yr, U), HeadArrays.plain(W, b))
    G = np.vstack([R, U])
    base = (G @ W.T + b).argmax(1)
    target = np.concatenate([yr, base[len(R) :]])
    after = (cal.transform(G) @ W.T + b).argmax(1)
    lost = int(((base == target) & (after != target)).sum())
    assert lost <= allowed_losses(len(G), 0.005)
    b_map = [m for m in cal.maps_ if IDS[m.index] == "b_marker"]
    assert "b_marker" in cal.refused_ or (b_map and b_map[0].shrink < 1)
    if "b_marker" in cal.refused_:
        assert cal.refused_["b_marker"].startswith("source guard:")


def _network(W, b):
    g = ProbeGrounding(torch.eye(K), torch.zeros(K))
    net = ConceptBottleneckClassifier(None, g, W, b, IDS, CLASSES)
    return net.double()


# ------------------------------------------------------------------------------------------------ label shift
def test_em_recovers_a_planted_class_prior():
    rng = np.random.default_rng(0)
    W, b = _bayes_head()
    prior = np.array([0.6, 0.3, 0.1])
    y = rng.choice(C, size=900, p=prior)
    source_prior = np.full(C, 1 / 3)
    est, _ = em_class_prior(softmax(_gauss(rng, y) @ W.T + b), source_prior)
    np.testing.assert_allclose(est, prior, atol=0.04)
    ls = LabelShiftEstimator(class_names=CLASSES).fit(_gauss(rng, y) @ W.T + b, source_prior)
    assert ls.applied_ and ls.reason_.startswith("applied")
    assert ls.offset_[0] > 0 > ls.offset_[2] and abs(ls.offset_.sum()) < 1e-9
    assert np.all(np.abs(ls.offset_) <= np.log(4) + 1e-12)


def test_label_shift_is_off_when_the_sample_is_small_unstable_or_unshifted():
    rng = np.random.default_rng(1)
    W, b = _bayes_head()
    source_prior = np.full(C, 1 / 3)
    skewed = rng.choice(C, size=300, p=[0.7, 0.2, 0.1])
    small = LabelShiftEstimator(class_names=CLASSES).fit(_gauss(rng, skewed[:40]) @ W.T + b, source_prior)
    assert not small.applied_ and "fewer than the 50" in small.reason_ and not small.offset_.any()
    # ambiguous posteriors (logits shrunk toward zero) on a small sample: the bootstrap spread is large
    vague = LabelShiftEstimator(class_names=CLASSES).fit(0.1 * (_gauss(rng, skewed[:60]) @ W.T + b), source_prior)
    assert not vague.applied_ and "unstable" in vague.reason_ and not vague.offset_.any()
    balanced = LabelShiftEstimator(class_names=CLASSES).fit(
        _gauss(rng, np.repeat(np.arange(C), 100)) @ W.T + b, source_prior
    )
    assert not balanced.applied_ and "no evidence" in balanced.reason_
    assert json.loads(json.dumps(balanced.to_dict()))["applied"] is False


def test_calibration_and_label_shift_together_keep_a_real_change_of_class_frequencies():
    """Matching marginals alone would read more 'a' images as an inflated a_marker; the alternation does not."""
    rng = np.random.default_rng(2)
    W, b = _bayes_head()
    yr = np.repeat(np.arange(C), 300)
    R, U = _gauss(rng, yr), _gauss(rng, yr)
    y = rng.choice(C, size=600, p=[0.6, 0.3, 0.1])
    S = _gauss(rng, y)  # no stain, only other class frequencies
    plain = ConceptCalibrator(concept_ids=IDS).fit(S, ReferenceScores(R, yr, U), HeadArrays.plain(W, b))
    assert plain.maps_ or plain.refused_  # matching the unweighted source would "correct" the frequencies away
    fit = fit_site_adaptation(S, ReferenceScores(R, yr, U), HeadArrays.plain(W, b), CLASSES, IDS)
    assert fit.label_shift.applied_
    np.testing.assert_allclose(fit.label_shift.site_prior_, [0.6, 0.3, 0.1], atol=0.05)
    assert fit.calibrator.maps_ == [] and fit.calibrator.refused_ == {}  # they match the re-weighted source


# ------------------------------------------------------------------------------------------------ determinism
def test_the_same_sample_gives_the_same_fit_byte_for_byte():
    rng, yr, R, U = _source()
    W, b = _head()
    S = _scores(np.random.default_rng(5), rng.choice(C, size=400, p=[0.5, 0.3, 0.2]), shift=[2.0, 0, 0, 0])

    def text():
        fit = fit_site_adaptation(S, ReferenceScores(R, yr, U), HeadArrays.plain(W, b), CLASSES, IDS)
        spec = AdaptationSpec(calibration=fit.calibration_dict(), label_shift=fit.label_shift_dict())
        return json.dumps(spec.to_dict(), indent=4)

    first = text()
    assert first == text()
    assert json.loads(first)["calibration"]["concepts"]


def test_a_prediction_does_not_depend_on_the_other_images():
    rng, yr, R, U = _source()
    W, b = _head()
    S = _scores(rng, rng.choice(C, size=300, p=[0.8, 0.15, 0.05]), shift=[3.0, 0, 0, 0])
    calibration = ConceptCalibrator(concept_ids=IDS).fit(S, ReferenceScores(R, yr, U), HeadArrays.plain(W, b)).to_dict()
    offset = {"a": 0.7, "b": -0.2, "c": -0.5}
    net = _network(W, b)
    AdaptationSpec(
        calibration=calibration, label_shift={"applied": True, "reason": "t", "logit_offset": offset}, mask=["c_marker"]
    ).apply(net)
    assert net.class_offset.abs().sum() > 0 and bool(net.calib_active)
    x = torch.as_tensor(np.log(S[:20]) - np.log1p(-S[:20]))  # the toy grounding's features are the logits
    with torch.no_grad():
        batch = net.logits_from_features(x)
        alone = torch.cat([net.logits_from_features(x[i : i + 1]) for i in range(len(x))])
        shuffled = net.logits_from_features(x.flip(0)).flip(0)
    torch.testing.assert_close(batch, alone)
    torch.testing.assert_close(batch, shuffled)
    net.reset_edit()  # deleting the file: the shipped network
    with torch.no_grad():
        torch.testing.assert_close(net.logits_from_features(x), net.head(net.grounding(x)))


# ------------------------------------------------------------------------------------------------ spec and alarms
@pytest.mark.parametrize(
    "calibration, label_shift, message",
    [
        (
            {"space": "logit", "concepts": {"a_marker": {"slope": -1.0, "intercept": 0.0, "reason": "x"}}},
            {},
            "slope > 0",
        ),
        ({"space": "logit", "concepts": {"a_marker": {"slope": 1.0, "intercept": 0.0}}}, {}, "'reason' text"),
        ({"space": "probit", "concepts": {}}, {}, "'calibration.space'"),
        ({}, {"applied": True, "reason": "x", "logit_offset": {"a": float("inf")}}, "finite number"),
        ({}, {"applied": "yes", "reason": "x"}, "'applied'"),
    ],
)
def test_a_bad_calibration_or_label_shift_in_the_file_is_refused(calibration, label_shift, message):
    from medcbm.adaptation import AdaptationSpecError

    with pytest.raises(AdaptationSpecError, match=message):
        AdaptationSpec(calibration=calibration, label_shift=label_shift)


def test_concept_shift_report_and_modality_verdict():
    rng, yr, R, _ = _source()
    S = _scores(rng, np.repeat(np.arange(C), 100), shift=[3.0, 0, 0, 0])
    rep = concept_shift_report(R, S, _scores(rng, np.repeat(np.arange(C), 100)))
    assert rep["before_calibration"]["fraction_flagged"] > 0.5 > rep["after_calibration"]["fraction_flagged"]
    det = SiteShiftDetector().fit(rng.normal(size=(300, 8)))
    assert looks_like_another_modality(det.score(rng.normal(size=(40, 8))), det) == ""
    far = np.full(40, 3.0 * det.threshold_)
    assert "another modality" in looks_like_another_modality(far, det)
    near = np.full(40, 1.5 * det.threshold_)  # every image flagged, but a stain-like distance: not refused
    assert looks_like_another_modality(near, det) == ""

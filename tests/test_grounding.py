# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Probe grounding behaviour: class-balanced fitting, Platt calibration, chance detection.

Each test is built so that one specific defect turns it red (noted per test): the rare-concept data make a
probe fitted with uniform sample weights predict "absent" for almost everything, and the balanced probe's
raw decision is then mis-scaled as a probability, which only the Platt step corrects.
"""

from __future__ import annotations

import numpy as np
import torch

from medcbm.grounding import _balanced_weights, fit_concept_probes, grounding_report

PREVALENCE = 0.1  # rare concept: class-balanced and uniform weighting disagree strongly here


def _rare_concept(n: int, seed: int, d: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Features whose first axis carries a noisy signal for one rare concept (about 10 % positive)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < PREVALENCE).astype(np.float64)
    f = rng.standard_normal((n, d))
    f[:, 0] += 1.5 * y  # overlapping classes: a calibrated probability is far from 0/1 for most images
    return f / np.linalg.norm(f, axis=1, keepdims=True), y[:, None]


def _fit_rare(seed: int = 0):
    X, Y = _rare_concept(2000, seed)
    Xv, Yv = _rare_concept(1000, seed + 1)
    Xt, Yt = _rare_concept(4000, seed + 2)  # held out: neither fit nor calibration sees it
    return fit_concept_probes(X, Y, Xv, Yv), torch.as_tensor(Xt, dtype=torch.float32), Yt[:, 0]


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def test_balanced_weights_give_each_label_value_half_the_mass():
    labels = torch.tensor([[1.0, 0.0], [0.0, float("nan")], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    w = _balanced_weights(labels)
    # concept 0: one positive, three negatives -> the positive weighs as much as all negatives together
    torch.testing.assert_close(w[:, 0], torch.tensor([0.5, 1 / 6, 1 / 6, 1 / 6], dtype=torch.float64))
    # concept 1: the unlabelled row has no weight; one negative, two positives
    torch.testing.assert_close(w[:, 1], torch.tensor([0.5, 0.0, 0.25, 0.25], dtype=torch.float64))


def test_balanced_probe_finds_the_rare_positives():
    """Catches uniform sample weights: the raw decision (threshold 0) then calls nearly every image negative."""
    probe, Xt, yt = _fit_rare()
    with torch.no_grad():
        positive = (probe.decision(Xt) > 0).numpy()[:, 0]
    recall = positive[yt == 1].mean()
    specificity = (~positive[yt == 0]).mean()
    # balanced objective: the threshold sits between the two classes, so both rates are well above chance;
    # the unweighted objective puts it near the rare class's tail (recall far below 0.5).
    assert recall > 0.6 and specificity > 0.6, (recall, specificity)


def test_platt_calibration_matches_observed_frequencies_on_held_out_data():
    """Catches a skipped Platt step: the balanced probe's raw sigmoid overstates a rare concept."""
    probe, Xt, yt = _fit_rare()
    with torch.no_grad():
        calibrated = probe(Xt).numpy()[:, 0]
        raw = torch.sigmoid(probe.decision(Xt)).numpy()[:, 0]
    rate = yt.mean()
    # the raw balanced output is centred near 0.5, far above the 10 % rate; calibration brings it back
    assert abs(raw.mean() - rate) > 0.2
    assert abs(calibrated.mean() - rate) < 0.03, (calibrated.mean(), rate)
    assert _log_loss(calibrated, yt) < _log_loss(raw, yt) - 0.1
    # reliability: in each populated third of the calibrated scores, the mean score is close to the observed rate
    edges = np.quantile(calibrated, [0, 1 / 3, 2 / 3, 1])
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (calibrated >= lo) & (calibrated <= hi)
        assert abs(calibrated[inside].mean() - yt[inside].mean()) < 0.05
    # calibration is monotone: it never reorders images
    assert np.corrcoef(np.argsort(np.argsort(calibrated)), np.argsort(np.argsort(raw)))[0, 1] > 0.999


def test_calibration_is_skipped_for_a_concept_without_both_labels_in_validation():
    X, Y = _rare_concept(400, 5)
    Xv, Yv = _rare_concept(200, 6)
    Yv[:] = 0.0  # no positive validation label: Platt scaling cannot be fitted for this concept
    probe = fit_concept_probes(X, Y, Xv, Yv)
    assert probe.calib_scale.item() == 1.0 and probe.calib_shift.item() == 0.0


def test_grounding_report_flags_too_few_labels_and_chance():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.5).astype(float)
    scores = np.stack([y + 0.3 * rng.standard_normal(300), rng.random(300), rng.random(300)], 1)
    labels = np.stack([y, (rng.random(300) < 0.5).astype(float), np.r_[np.ones(2), np.zeros(298)]], 1)
    labels[:100, 1] = np.nan
    report = grounding_report(["signal", "noise", "rare"], scores, labels)
    assert [r.groundable for r in report] == [True, False, False]
    assert report[1].n_positive + report[1].n_negative == 200  # unlabelled rows are ignored
    assert "not better than chance" in report[1].reason
    assert report[2].reason == "too few labelled examples (positive 2, negative 298)"
    assert report[2].to_dict()["auroc"] is None

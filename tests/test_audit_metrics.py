# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Model-level audit metrics on small cases whose answers are known by hand."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from medcbm.audit import metrics as M


def test_flipped_weight_is_found_as_a_prior_contradiction():
    prior = np.array([[1, -1, 0], [-1, 1, 1]], dtype=float)
    W = prior * np.array([[2.0, 1.0, 0.5], [1.5, 0.7, 0.3]])
    agree = M.prior_agreement(W, prior, ["a", "b"], ["x", "y", "z"])
    assert agree["sign_agreement"] == 1.0 and agree["contradictions"] == []
    W[1, 1] = -0.7  # class b now uses concept y against the prior
    res = M.prior_agreement(W, prior, ["a", "b"], ["x", "y", "z"])
    assert res["n_contradictions"] == 1
    c = res["contradictions"][0]
    assert (c["class"], c["concept"], c["prior"]) == ("b", "y", 1)
    assert res["sign_agreement"] == pytest.approx(4 / 5)
    assert res["cosine"] < agree["cosine"]


def test_effective_concepts_counts_and_warns_above_32(caplog):
    focused = np.zeros((2, 40))
    focused[:, 0] = 5.0
    focused[:, 1] = 0.1
    res = M.effective_concepts(focused)
    assert res["n_mass"]["max"] == 1 and res["warning"] is None
    spread = np.ones((3, 40))  # every concept carries the same share: 38 needed for 95%
    n, h = M.effective_concept_counts(spread)
    assert list(n) == [38, 38, 38] and np.allclose(h, 40)
    with caplog.at_level(logging.WARNING):
        res = M.effective_concepts(spread)
    assert res["n_over_limit"] == 3 and "more than 32" in res["warning"]
    assert "more than 32" in caplog.text


def test_cem_by_hand():
    # 2 images, 4 concepts; neutral 0.5. Contributions to the predicted class:
    contrib = np.array([[0.9, 0.5, -0.2, 0.1], [0.3, 0.0, 0.8, 0.6]])
    scores = np.array([[0.9, 0.2, 0.7, 0.6], [0.8, 0.5, 0.1, 0.9]])
    labels = np.array([[1, 0, 1, np.nan], [0, 1, 0, 1]], dtype=float)
    res = M.concept_existence(contrib, scores, np.full(4, 0.5), labels)
    # image 0: claims (labelled, contribution > 0) by size: k0 (present, label 1: ok), k1 (absent, label 0: ok)
    # image 1: k2 (absent, label 0: ok), k3 (present, label 1: ok), k0 (present, label 0: wrong)
    assert res["cem_at_1"] == pytest.approx(1.0)
    assert res["cem_at_3"] == pytest.approx((1.0 + 2 / 3) / 2, abs=1e-4)
    # the original "annotated present" definition ignores direction
    assert res["present_at_1"] == pytest.approx((1 + 0) / 2)
    assert res["present_at_3"] == pytest.approx((1 / 2 + 1 / 3) / 2, abs=1e-4)
    assert res["n_images_at_5"] == 2


def test_concept_location_hits_and_misses():
    hm = np.zeros((12, 12))
    hm[2:4, 8:10] = 1.0  # 4 hot pixels; alpha=1 keeps 12 pixels
    loc = np.zeros((12, 12), bool)
    loc[3, 9] = True
    far = np.zeros((12, 12), bool)
    far[10, 1] = True
    assert M.top_fraction_mask(hm, 1).sum() == 12
    res = M.concept_location([hm, hm], [loc, far], alphas=(1,))
    assert res["clm_at_1"] == 0.5


def test_concept_auroc_ci_and_chance():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200).astype(float)
    good = y + rng.normal(0, 0.5, 200)
    noise = rng.normal(0, 1, 200)
    labels = np.stack([y, y, np.full(200, np.nan)], 1)
    res = M.concept_auroc(np.stack([good, noise, noise], 1), labels, ["good", "noise", "unlabelled"])
    g, n = res["concepts"]["good"], res["concepts"]["noise"]
    assert g["better_than_chance"] and g["ci_low"] < g["auroc"] < g["ci_high"] and g["p_value"] < 1e-6
    assert not n["better_than_chance"] and n["ci_low"] < 0.5 < n["ci_high"]
    assert "unlabelled" not in res["concepts"] and res["n_concepts_evaluated"] == 2


def test_global_importance_matches_prior_and_labels():
    W = np.array([[2.0, -1.0], [-2.0, 1.0]])
    P = np.array([[1, 0], [-1, 0]], dtype=float)
    labels = np.array([[1, 0], [1, 0], [1, 1], [0, 1], [0, 1], [0, 0]], dtype=float)
    y = np.array([0, 0, 0, 1, 1, 1])
    res = {
        d["concept"]: d
        for d in M.global_importance(W, P, ["x", "z"], ["a", "b"], concept_labels=labels, class_labels=y)["concepts"]
    }
    assert res["x"]["cgim_prior"] == pytest.approx(1.0) and res["z"]["cgim_prior"] is None
    assert res["x"]["cgim_labels"] == pytest.approx(1.0) and res["z"]["cgim_labels"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="concept_labels must be 1, 0 or NaN"):
        M.global_importance(W, P, ["x", "z"], ["a", "b"], concept_labels=labels * 2, class_labels=y)


def test_deletion_by_contribution_drops_faster_than_random():
    rng = np.random.default_rng(1)
    W = rng.normal(0, 1, (3, 10))
    S = rng.random((50, 10))
    res = M.deletion(S, W, np.zeros(3), np.full(10, 0.5), n_random=10)
    assert res["contribution_order"][0] == res["random_order"][0]
    assert res["auc_gap"] > 0 and len(res["fraction_removed"]) == 11
    assert res["contribution_order"][-1] == pytest.approx(res["random_order"][-1], abs=1e-4)


def test_inputs_are_validated():
    with pytest.raises(ValueError, match="prior"):
        M.prior_agreement(np.zeros((2, 3)), np.zeros((3, 2)), ["a", "b"], ["x", "y", "z"])
    with pytest.raises(ValueError, match="class_names"):
        M.prior_agreement(np.zeros((2, 3)), np.zeros((2, 3)), ["a"], ["x", "y", "z"])

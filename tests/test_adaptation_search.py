# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Concept edit search on synthetic concept scores with planted site effects (METHODS.md §2)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from medcbm.adaptation.reference_scores import ReferenceScores
from medcbm.networks import HeadArrays
from medcbm.adaptation import AdaptationSpec, ConceptEditSearch
from medcbm.adaptation.baselines import T3A, lame_predict, refit_head_with_prior

C, K = 3, 6
CLASSES = ["a", "b", "c"]
IDS = ["a_marker", "b_marker", "c_marker", "confounder", "weak_c", "noise"]


def _head():
    # concept k in 0..2 marks class k; 'confounder' is evidence for b; 'weak_c' is evidence for c
    W = np.zeros((C, K))
    W[0, 0] = W[1, 1] = W[2, 2] = 4.0
    W[1, 3] = 6.0
    W[2, 4] = 6.0
    W[:, 5] = [0.1, -0.1, 0.0]
    return W, -W @ np.full(K, 0.3)


def _scores(rng, y, confound=0.0, weak_c=1.0, n_noise=0.05):
    S = np.full((len(y), K), 0.1) + rng.normal(0, n_noise, (len(y), K))
    S[np.arange(len(y)), y] += 0.6  # class markers
    S[:, 3] += 0.1  # confounder: low at the source
    S[y == 2, 4] += 0.6 * weak_c  # weak_c: present in class c
    S[:, 3] += confound  # site effect: confounder fires everywhere
    S[:, 5] = rng.uniform(0, 1, len(y))
    return np.clip(S, 0, 1)


def _setting(confound=0.6, weak_c=0.25, k=4, seed=0):
    rng = np.random.default_rng(seed)
    W, b = _head()
    yr = np.repeat(np.arange(C), 60)
    R = _scores(rng, yr)
    ys = np.repeat(np.arange(C), k)
    S = _scores(rng, ys, confound=confound, weak_c=weak_c)
    yt = np.repeat(np.arange(C), 100)
    T = _scores(rng, yt, confound=confound, weak_c=weak_c)
    return W, b, R.mean(0), R, yr, S, ys, T, yt


def _search():
    return ConceptEditSearch(class_names=CLASSES, concept_ids=IDS)


def test_planted_confounder_is_masked():
    W, b, neutral, R, yr, S, ys, T, yt = _setting(confound=0.6, weak_c=1.0)
    s = _search().fit(S, ys, HeadArrays.plain(W, b, neutral), ReferenceScores(R, yr))
    assert s.mask_.tolist() == [False, False, False, True, False, False]
    assert np.all(s.gain_ == 1.0)
    spec = s.spec_
    assert spec.mask == ["confounder"] and spec.gain == {}
    assert "mis-activated" in spec.reasons["confounder"] and "toward 'b'" in spec.reasons["confounder"]
    fixed = int((((S @ W.T + b).argmax(1) != ys) & (s.predict(S) == ys)).sum())
    assert fixed > 0 and f"fixing {fixed} and breaking 0" in spec.reasons["confounder"]
    before = ((T @ W.T + b).argmax(1) == yt).mean()
    assert before < 0.75 and (s.predict(T) == yt).mean() > 0.95
    assert spec.source_accuracy_after >= spec.source_accuracy_before - 0.005
    assert spec.support_accuracy_after > spec.support_accuracy_before


def test_planted_under_activated_concept_is_amplified():
    W, b, neutral, R, yr, S, ys, T, yt = _setting(confound=0.0, weak_c=0.1)
    W[2, 2] = 0.0  # class c is recognised by 'weak_c' alone ...
    b = -W @ np.full(K, 0.3)
    b[2] -= 0.5  # ... which at this site is too weak to win
    s = ConceptEditSearch(gamma_max=2.0, class_names=CLASSES, concept_ids=IDS).fit(
        S, ys, HeadArrays.plain(W, b, neutral), ReferenceScores(R, yr)
    )
    assert not s.mask_.any()
    assert s.gain_[4] == 2.0  # mu_s / mu_t is about 4: clipped at gamma_max
    assert np.all(s.gain_[[0, 1, 2, 3, 5]] == 1.0)
    assert list(s.spec_.gain) == ["weak_c"]
    assert "under-activated" in s.spec_.reasons["weak_c"] and "for 'c'" in s.spec_.reasons["weak_c"]
    c = yt == 2
    assert ((T[c] @ W.T + b).argmax(1) == 2).mean() < 0.3 and (s.predict(T[c]) == 2).mean() > 0.6
    assert s.spec_.source_accuracy_after >= s.spec_.source_accuracy_before - 0.005


def test_no_site_effect_means_no_edit():
    W, b, neutral, R, yr, S, ys, _, _ = _setting(confound=0.0, weak_c=1.0)
    s = _search().fit(S, ys, HeadArrays.plain(W, b, neutral), ReferenceScores(R, yr))
    assert not s.mask_.any() and np.all(s.gain_ == 1.0)
    assert s.spec_.mask == [] and s.spec_.gain == {} and s.spec_.reasons == {}


def _weak_c_setting(k):
    """Class c rests on 'weak_c' alone, which this site shows at a third of its source level: the support
    images are still all right (nothing for leave-one-out accuracy to gain), a tenth of the site's c cells
    are not."""
    W, b, neutral, R, yr, S, ys, T, yt = _setting(confound=0.0, weak_c=0.3, k=k)
    W[2, 2] = 0.0
    b = -W @ np.full(K, 0.3)
    b[2] -= 0.4
    return W, b, neutral, R, yr, S, ys, T, yt


def test_a_leave_one_out_tie_keeps_the_single_best_edit():
    W, b, neutral, R, yr, S, ys, T, yt = _weak_c_setting(k=4)
    s = _search().fit(S, ys, HeadArrays.plain(W, b, neutral), ReferenceScores(R, yr))
    assert s.spec_.support_accuracy_before == 1.0 and {x["loo_balanced_accuracy"] for x in s.loo_} == {1.0}
    assert s.spec_.mask == [] and list(s.spec_.gain) == ["weak_c"]
    assert s.spec_.method["chosen_by"].startswith("leave-one-out tie")
    before, after = ((T @ W.T + b).argmax(1) == yt).mean(), (s.predict(T) == yt).mean()
    assert before < 0.95 and after > before + 0.05
    assert s.spec_.source_accuracy_after >= s.spec_.source_accuracy_before - 0.005
    # one image per class: holding it out removes its class, leave-one-out tests nothing, no edit is kept
    W, b, neutral, R, yr, S, ys, T, yt = _weak_c_setting(k=1)
    one = _search().fit(S, ys, HeadArrays.plain(W, b, neutral), ReferenceScores(R, yr))
    assert one.spec_.gain == {} and one.spec_.method["chosen_by"] == "leave-one-out"


def test_a_shift_within_noise_proposes_nothing():
    """min_shift_z: a support mean within two source standard errors of its source level is not a candidate."""
    W, b, neutral, R, yr, S, ys, _, _ = _setting(confound=0.0, weak_c=1.0)
    strict = _search().fit(S, ys, HeadArrays.plain(W, b, neutral), ReferenceScores(R, yr))
    loose = ConceptEditSearch(class_names=CLASSES, concept_ids=IDS, min_shift_z=0.0).fit(
        S, ys, HeadArrays.plain(W, b, neutral), ReferenceScores(R, yr)
    )
    assert strict._candidates(S, ys, C, K) == [] and strict.spec_.gain == {} and not strict.mask_.any()
    assert loose._candidates(S, ys, C, K) != []
    with pytest.raises(ValueError, match="min_shift_z"):
        ConceptEditSearch(min_shift_z=-1.0)


def _source_needing_the_confounder(R, yr):
    """A source where class b is recognised by the confounder alone: masking it would call source b images a."""
    R2 = R.copy()
    R2[yr == 1, 1] = 0.1
    R2[yr == 1, 3] += 0.6
    neutral2 = R2.mean(0)
    neutral2[3] = 0.2  # masked, the confounder drops to the level of the other classes
    return R2, neutral2


def test_source_guard_refuses_a_harmful_edit():
    W, b, neutral, R, yr, S, ys, _, _ = _setting()
    # the same target site as above (masking the confounder helps there), but a source that needs it
    R2, neutral2 = _source_needing_the_confounder(R, yr)
    s = _search().fit(S, ys, HeadArrays.plain(W, b, neutral2), ReferenceScores(R2, yr))
    assert not s.mask_[3]
    rejected = {s.concept_ids_[e.index]: reason for e, reason in s.rejected_}
    assert "confounder" in rejected and "source guard" in rejected["confounder"]
    assert "confounder" in s.spec_.method["guard_rejected"]
    assert s.spec_.source_accuracy_after >= s.spec_.source_accuracy_before - 0.005
    # without the guard (tolerance 99%) the same edit is taken: the guard is what refused it
    loose = ConceptEditSearch(class_names=CLASSES, concept_ids=IDS, guard_tolerance=0.99)
    loose.fit(S, ys, HeadArrays.plain(W, b, neutral2), ReferenceScores(R2, yr))
    assert loose.mask_[3] and loose.spec_.source_accuracy_after < loose.spec_.source_accuracy_before - 0.005


def test_missing_class_is_allowed_with_a_warning():
    W, b, neutral, R, yr, S, ys, _, _ = _setting()
    keep = ys != 1
    s = _search().fit(S[keep], ys[keep], HeadArrays.plain(W, b, neutral), ReferenceScores(R, yr))
    assert s.missing_classes_ == ["b"] and s.spec_.missing_classes == ["b"]
    assert any("'b'" in w for w in s.spec_.warnings)
    assert s.mask_[3]  # the confounder is still found from a and c
    assert s.gain_[1] == 1.0  # nothing is amplified for an unseen class


def test_deterministic():
    # speed is measured by benchmarks/adaptation.py (seconds per fit), not asserted here
    W, b, neutral, R, yr, S, ys, _, _ = _setting(k=8)
    R = np.tile(R, (10, 1))
    yr = np.tile(yr, 10)
    a = _search().fit(S, ys, HeadArrays.plain(W, b, neutral), ReferenceScores(R, yr))
    bb = _search().fit(S, ys, HeadArrays.plain(W, b, neutral), ReferenceScores(R, yr))
    assert a.spec_ == bb.spec_ and a.loo_ == bb.loo_


def test_guard_counts_prediction_changes_on_unlabelled_source_images():
    W, b, neutral, R, yr, S, ys, _, _ = _setting()
    # labelled references alone: masking the confounder is harmless there, so it is taken
    assert _search().fit(S, ys, HeadArrays.plain(W, b, neutral), ReferenceScores(R, yr)).mask_[3]
    # unlabelled source images of class b that only the confounder recognises: the mask would change their
    # prediction, so the guard refuses it although no labelled reference image is lost
    U = R[yr == 1].copy()
    U[:, 1] = 0.1
    U[:, 3] += 0.6
    U = np.tile(U, (10, 1))
    s = _search().fit(S, ys, HeadArrays.plain(W, b, neutral), ReferenceScores(R, yr, U))
    assert not s.mask_[3]
    assert "source guard" in s.spec_.method["guard_rejected"]["confounder"]
    assert s.spec_.method["n_unlabelled_reference"] == len(U)
    assert ((s.transform(U) @ W.T + b).argmax(1) == (U @ W.T + b).argmax(1)).mean() >= 1 - 0.005


def test_allowed_losses_hold_the_tolerance_at_95_percent():
    from scipy.stats import beta

    from medcbm.adaptation.source_guard import allowed_losses

    assert allowed_losses(150, 0.005) == 0  # too few images to show 0.5 points: nothing may be lost
    assert allowed_losses(2150, 0.005) == 5
    for n in (700, 2150, 5000):
        k = allowed_losses(n, 0.005)
        assert beta.ppf(0.95, k + 1, n - k) <= 0.005 < beta.ppf(0.95, k + 2, n - k - 1)


def test_a_refused_gain_is_cut_down_not_dropped():
    W, b, neutral, R, yr, S, ys, T, yt = _setting(confound=0.0, weak_c=0.1)
    W[2, 2] = 0.0
    b = -W @ np.full(K, 0.3)
    b[2] -= 0.5
    # source images of class a with some 'weak_c': a gain of 2 would call them c, a gain of 1.75 would not
    row = R[yr == 0][0].copy()
    row[4] = 0.0
    z = W @ row + b
    row[4] = (z[0] - z[2]) / 11
    R2 = np.vstack([R, np.tile(row, (20, 1))])
    yr2 = np.concatenate([yr, np.zeros(20, dtype=int)])
    s = ConceptEditSearch(gamma_max=2.0, class_names=CLASSES, concept_ids=IDS).fit(
        S, ys, HeadArrays.plain(W, b, neutral), ReferenceScores(R2, yr2)
    )
    assert s.gain_[4] == 1.75 and not s.mask_.any()
    assert "cut from x2 by the source guard" in s.spec_.reasons["weak_c"]
    assert s.spec_.source_accuracy_after == s.spec_.source_accuracy_before
    c = yt == 2
    assert (s.predict(T[c]) == 2).mean() > ((T[c] @ W.T + b).argmax(1) == 2).mean() + 0.3


def test_attenuation_is_taken_where_the_full_mask_is_refused():
    W, b, neutral, R, yr, S, ys, T, yt = _setting()
    R2, neutral2 = _source_needing_the_confounder(R, yr)
    s = _search().fit(S, ys, HeadArrays.plain(W, b, neutral2), ReferenceScores(R2, yr))
    assert not s.mask_[3] and 0 < s.gain_[3] < 1
    assert "attenuated" in s.spec_.reasons["confounder"]
    assert s.spec_.source_accuracy_after >= s.spec_.source_accuracy_before - 0.005
    assert (s.predict(T) == yt).mean() > ((T @ W.T + b).argmax(1) == yt).mean() + 0.2
    # without attenuation levels, nothing safe is left for the confounder
    plain = ConceptEditSearch(attenuation_levels=(), class_names=CLASSES, concept_ids=IDS)
    assert plain.fit(S, ys, HeadArrays.plain(W, b, neutral2), ReferenceScores(R2, yr)).gain_[3] == 1.0


def test_spec_round_trips(tmp_path):
    W, b, neutral, R, yr, S, ys, _, _ = _setting()
    s = _search().fit(S, ys, HeadArrays.plain(W, b, neutral), ReferenceScores(R, yr))
    back = AdaptationSpec.read(s.spec_.write(tmp_path / "adaptation.json"), IDS)
    assert back == s.spec_


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda a: a.update(support_scores=a["support_scores"][:0], support_labels=a["support_labels"][:0]), "k = 0"),
        (lambda a: a.update(support_labels=a["support_labels"] + 5), "outside"),
        (lambda a: a.update(support_labels=a["support_labels"][:-1]), "entries"),
        (lambda a: a.update(support_scores=a["support_scores"][:, :-1]), "concepts"),
        (lambda a: a["support_scores"].__setitem__((0, 0), np.nan), "NaN"),
        (lambda a: a.update(neutral=a["neutral"][:-1]), "neutral"),
        (lambda a: a.update(reference_scores=a["reference_scores"][:, :2]), "reference scores have 2 concepts"),
        (lambda a: a.update(reference_labels=a["reference_labels"] + 5), "outside"),
        (lambda a: a.update(reference_labels=a["reference_labels"] - 1), "negative class indices"),
        (lambda a: a.update(reference_labels=a["reference_labels"].astype(str)), "integer class indices"),
    ],
)
def test_inputs_are_validated(change, needle):
    W, b, neutral, R, yr, S, ys, _, _ = _setting()
    args = dict(
        support_scores=S.copy(),
        support_labels=ys,
        weight=W,
        bias=b,
        neutral=neutral,
        reference_scores=R,
        reference_labels=yr,
    )
    change(args)
    with pytest.raises(ValueError, match=needle):
        head = HeadArrays.plain(args["weight"], args["bias"], args["neutral"])
        reference = ReferenceScores(args["reference_scores"], args["reference_labels"])
        _search().fit(args["support_scores"], args["support_labels"], head, reference)


def test_the_search_refuses_a_head_that_is_already_edited():
    W, b, neutral, R, yr, S, ys, _, _ = _setting()
    edited = dataclasses.replace(HeadArrays.plain(W, b, neutral), mask=np.arange(W.shape[1]) == 0)
    with pytest.raises(ValueError, match="without one"):
        _search().fit(S, ys, edited, ReferenceScores(R, yr))


def test_baselines_run_and_use_the_support():
    W, b, neutral, R, yr, S, ys, T, yt = _setting()
    t3a = T3A(W, b).predict(T, S, ys)
    assert t3a.shape == yt.shape
    lame = lame_predict(T @ W.T + b, T)
    assert lame.shape == yt.shape
    prior = np.sign(W[:, :5])
    prior = np.concatenate([prior, np.zeros((C, 1))], 1)
    head = refit_head_with_prior(S, ys, prior)
    assert head is not None and (head.predict(T) == yt).mean() > 0.8
    assert refit_head_with_prior(S[ys != 2], ys[ys != 2], prior) is None

# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""fit_cbm behaviour: ungroundable concepts are dropped with a reason, and the neutral value is the training mean.

The neutral value is where contributions are measured from and what a masked concept takes; the tests follow
it from the fit through the saved state into a loaded network, so a zero neutral anywhere on that path fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medcbm.concepts import ConceptBank
from medcbm.fitting import fit_cbm
from medcbm.networks import ConceptBottleneckClassifier, read_cbm_state

D = 16  # the tiny test backbone's embedding width, so a fitted state can be loaded with it
CONCEPTS = ["round", "spiky", "noise", "rare"]


def _bank() -> ConceptBank:
    source = {"citation": "Toy textbook"}
    concepts = [
        {"id": c, "text": f"a {c} thing", "group": "shape", "kind": "finding", "source": source} for c in CONCEPTS
    ]
    prior = {"alpha": {"round": 1, "spiky": -1}, "beta": {"round": -1, "spiky": 1}}
    return ConceptBank.from_dict({"name": "toy", "classes": ["alpha", "beta"], "concepts": concepts, "prior": prior})


def _split(n: int, seed: int):
    """Class beta is spiky and not round. ``noise`` is labelled at random; ``rare`` has one positive label."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    round_ = ((1 - y) + (rng.random(n) < 0.15)) % 2  # 15 % of concept labels disagree with the class
    spiky = (y + (rng.random(n) < 0.15)) % 2
    f = rng.standard_normal((n, D))
    f[:, 0] += 2.0 * round_
    f[:, 1] += 2.0 * spiky
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    labels = np.stack([round_, spiky, rng.random(n) < 0.5, np.zeros(n)], 1).astype(np.float64)
    labels[0, 3] = 1.0
    return f.astype(np.float32), y, labels


@pytest.fixture(scope="module")
def fitted():
    (Xtr, ytr, Ctr), (Xva, yva, Cva) = _split(400, 0), _split(200, 1)
    fit = fit_cbm(_bank(), Xtr, ytr, Xva, yva, Ctr, Cva, mode="probe", prior_strength=(0.0, 1.0))
    return fit, Xtr, Xva


def test_ungroundable_concepts_are_dropped_with_their_reason(fitted):
    fit, _, Xva = fitted
    assert fit.bank.concept_ids == ["round", "spiky"]
    assert set(fit.dropped) == {"noise", "rare"}
    assert fit.dropped["noise"].startswith("not better than chance (AUROC")
    assert fit.dropped["rare"].startswith("too few labelled examples (positive 1,")
    # the dropped concepts are gone from every fitted part, not only from the bank
    assert fit.grounding.num_concepts == 2 and fit.head.coef_.shape == (2, 2)
    assert fit.neutral.shape == (2,) and fit.source_class_means.shape == (2, 2)
    assert [r.concept_id for r in fit.report] == CONCEPTS  # the report still covers the whole bank
    assert fit.val_metrics["balanced_accuracy"] > 0.75


def test_keeping_ungroundable_concepts_is_an_explicit_choice():
    (Xtr, ytr, Ctr), (Xva, yva, Cva) = _split(200, 2), _split(100, 3)
    fit = fit_cbm(_bank(), Xtr, ytr, Xva, yva, Ctr, Cva, mode="probe", prior_strength=0.0, drop_ungroundable=False)
    assert fit.bank.concept_ids == CONCEPTS and fit.dropped == {}


def test_neutral_is_the_mean_training_score(fitted):
    fit, Xtr, _ = fitted
    with torch.no_grad():
        s_tr = fit.grounding(torch.as_tensor(Xtr)).numpy()
    np.testing.assert_allclose(fit.neutral, s_tr.mean(0), rtol=1e-5)
    assert np.all(fit.neutral > 0.2)  # probe scores are probabilities: a zero neutral would be far off


def _network(fit) -> ConceptBottleneckClassifier:
    return ConceptBottleneckClassifier.from_head(
        None, fit.grounding, fit.head, fit.bank.concept_ids, fit.bank.classes, fit.neutral
    )


def test_contributions_of_the_average_training_image_are_zero_and_masking_gives_the_mean(fitted):
    fit, Xtr, Xva = fitted
    net = _network(fit)
    feats = torch.as_tensor(Xtr)
    with torch.no_grad():
        contrib = net.contributions_from_scores(net.concept_scores_from_features(feats))
        # averaged over the training images every concept's contribution vanishes: a concept at its usual
        # level is no evidence either way
        torch.testing.assert_close(contrib.mean(0), torch.zeros(2, 2), atol=1e-5, rtol=0)
        assert contrib.abs().mean() > 0.05  # while single images do carry evidence
        net.set_edit(mask=["spiky"])
        masked = net.concept_scores_from_features(torch.as_tensor(Xva))
    torch.testing.assert_close(masked[:, 1], torch.full((len(Xva),), float(fit.neutral[1])))
    torch.testing.assert_close(net.contributions_from_scores(masked)[:, :, 1], torch.zeros(len(Xva), 2))


def test_saved_and_loaded_network_keeps_the_training_mean(fitted, tiny_backbone_spec, tmp_path):
    from medcbm.backbones import load_backbone
    from medcbm.bundle import CBM_FILE, LoadedBundle, Preprocessing, save_bundle_network

    fit, _, _ = fitted
    bk = load_backbone(tiny_backbone_spec)
    save_bundle_network(tmp_path / "models", fit, bk, Preprocessing.from_backbone(bk, "rgb"))
    tensors, _ = read_cbm_state(tmp_path / "models" / CBM_FILE)
    np.testing.assert_allclose(tensors["neutral"].numpy(), fit.neutral, rtol=1e-6)
    bank_file = tmp_path / "concepts.yaml"
    _bank().save(bank_file)
    net = LoadedBundle.load(tmp_path, concepts_file=bank_file, backbone=tiny_backbone_spec).network
    assert net.concepts == ["round", "spiky"]
    np.testing.assert_allclose(net.neutral.numpy(), fit.neutral, rtol=1e-6)


def test_head_prior_decides_where_the_data_cannot():
    """A strong prior pulls the head's signs to the prior even against weak data; without it the data win."""
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 2, n)
    X = np.stack([y + 1.5 * rng.standard_normal(n), rng.standard_normal(n)], 1)  # concept 0: weak evidence for beta
    prior = np.array([[1, 0], [-1, 0]])  # ... but the prior says beta should NOT show concept 0
    from medcbm.head import KnowledgePriorHead

    free = KnowledgePriorHead(prior=prior, prior_strength=0.0).fit(X, y)
    strong = KnowledgePriorHead(prior=prior, prior_strength=100.0).fit(X, y)
    assert free.coef_[1, 0] > free.coef_[0, 0]  # data alone: concept 0 is evidence for beta
    assert strong.coef_[1, 0] < 0 < strong.coef_[0, 0]  # prior dominates: signs follow the prior
    assert strong.prior_agreement() == 1.0 and free.prior_agreement() == 0.0


def _shortcut_data(n: int, seed: int, shortcut: bool):
    """Concept 0 is weak true evidence for class 1; concept 1 tracks the label only when ``shortcut`` is set."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    c0 = y + 0.8 * rng.standard_normal(n)
    c1 = (y if shortcut else rng.integers(0, 2, n)) + 0.1 * rng.standard_normal(n)
    return np.stack([c0, c1], 1), y


def test_head_selection_picks_the_prior_strength_that_wins_on_validation():
    """Selection must read the validation split: a training shortcut is only exposed there."""
    from medcbm.head import KnowledgePriorHead

    X, y = _shortcut_data(400, 0, shortcut=True)
    Xv, yv = _shortcut_data(400, 1, shortcut=False)
    # the prior endorses concept 0 and knows nothing of concept 1 (its prior term shrinks that weight)
    right = np.array([[-1, 0], [1, 0]])
    head = KnowledgePriorHead(prior=right, prior_strength=(0.0, 10.0)).fit(X, y, Xv, yv)
    curve = {s["prior_strength"]: s["val_balanced_accuracy"] for s in head.selection_}
    assert curve[10.0] > curve[0.0] + 0.1 and head.prior_strength_ == 10.0
    # a prior that contradicts data which hold up on validation is rejected the same way
    X2, y2 = _shortcut_data(400, 2, shortcut=False)
    Xv2, yv2 = _shortcut_data(400, 3, shortcut=False)
    wrong = np.array([[1, 0], [-1, 0]])  # says class 1 should NOT show concept 0
    head2 = KnowledgePriorHead(prior=wrong, prior_strength=(0.0, 10.0)).fit(X2, y2, Xv2, yv2)
    curve2 = {s["prior_strength"]: s["val_balanced_accuracy"] for s in head2.selection_}
    assert curve2[0.0] > curve2[10.0] + 0.1 and head2.prior_strength_ == 0.0
    # the kept weights are the selected fit's, not the last one visited
    np.testing.assert_allclose(head2.score(Xv2, yv2), curve2[0.0])


def test_text_grounding_without_concept_labels_keeps_every_concept():
    (Xtr, ytr, _), (Xva, yva, _) = _split(200, 4), _split(100, 5)
    emb = torch.nn.functional.normalize(torch.eye(len(CONCEPTS), D), dim=-1)  # concept k reads feature axis k
    fit = fit_cbm(_bank(), Xtr, ytr, Xva, yva, mode="auto", text_embeddings=emb, prior_strength=0.0)
    assert fit.grounding.mode == "text" and fit.bank.concept_ids == CONCEPTS
    assert fit.dropped == {} and fit.report == []  # nothing to judge grounding by: nothing is dropped
    np.testing.assert_allclose(fit.neutral, 0.0, atol=1e-5)  # text scores are centred on the training mean


def test_too_few_groundable_concepts_is_a_clear_error():
    (Xtr, ytr, Ctr), (Xva, yva, Cva) = _split(200, 6), _split(100, 7)
    Cva[:, 1] = np.random.default_rng(0).random(len(Cva)) < 0.5  # spiky labels become noise on validation
    Cva[:, 2] = np.nan  # and the noise concept is unlabelled there
    with pytest.raises(ValueError, match=r"only 1 concepts are groundable on the validation data"):
        fit_cbm(_bank(), Xtr, ytr, Xva, yva, Ctr, Cva, mode="probe", prior_strength=0.0)

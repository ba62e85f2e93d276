# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

import numpy as np
import pytest

from medcbm.head import KnowledgePriorHead


def _rule_data(n: int, seed: int):
    """Class 1 iff concept 0 is present and concept 3 absent; concepts 1, 2, 4, 5 are noise."""
    rng = np.random.default_rng(seed)
    a = (rng.random((n, 6)) < 0.5).astype(np.float64)
    y = ((a[:, 0] == 1) & (a[:, 3] == 0)).astype(np.int64)
    return a + 0.05 * rng.standard_normal(a.shape), y


def test_recovers_known_sparse_rule():
    X, y = _rule_data(600, 0)
    Xv, yv = _rule_data(200, 1)
    head = KnowledgePriorHead(prior=None, prior_strength=0.0, sparsity=0.05, l2=1e-4).fit(X, y, Xv, yv)
    Xt, yt = _rule_data(400, 2)
    assert head.score(Xt, yt) > 0.95
    w = head.coef_[1] - head.coef_[0]  # evidence for class 1 per concept
    assert w[0] > 0 and w[3] < 0
    noise = np.abs(w[[1, 2, 4, 5]])
    assert noise.max() < 0.2 * min(abs(w[0]), abs(w[3]))


def test_follows_prior_sign_where_data_cannot_decide():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    signal = y + 0.3 * rng.standard_normal(n)
    # concepts 0 and 1 are identical copies: the data cannot tell which one should carry the weight
    X = np.stack([signal, signal, rng.standard_normal(n)], axis=1)
    prior = np.array([[-1, 0, 0], [1, -1, 0]])  # class 1 should show concept 0 and not concept 1
    head = KnowledgePriorHead(prior=prior, prior_strength=1.0).fit(X, y)
    assert head.coef_[1, 0] > 0 and head.coef_[0, 0] < 0  # sign follows the prior
    assert head.coef_[1, 0] > head.coef_[1, 1]  # the weight went to the concept the prior endorses
    assert head.prior_agreement() >= 0.66
    no_prior = KnowledgePriorHead(prior=None, prior_strength=0.0).fit(X, y)
    assert no_prior.coef_[1, 0] == pytest.approx(no_prior.coef_[1, 1], rel=1e-3)  # symmetric without prior


def test_contributions_plus_bias_equal_logits_and_proba_sums_to_one():
    X, y = _rule_data(300, 3)
    head = KnowledgePriorHead(prior=np.zeros((2, 6)), prior_strength=0.1).fit(X, y)
    logits = head.decision_function(X)
    np.testing.assert_allclose((X[:, None, :] * head.coef_[None]).sum(-1) + head.intercept_, logits, atol=1e-10)
    np.testing.assert_allclose(head.predict_proba(X).sum(1), 1.0)


def test_selection_uses_validation_and_is_deterministic():
    X, y = _rule_data(300, 4)
    Xv, yv = _rule_data(100, 5)
    prior = np.zeros((2, 6))
    prior[1, 0], prior[1, 3] = 1, -1
    a = KnowledgePriorHead(prior=prior, prior_strength=(0.0, 0.1, 1.0)).fit(X, y, Xv, yv)
    b = KnowledgePriorHead(prior=prior, prior_strength=(0.0, 0.1, 1.0)).fit(X, y, Xv, yv)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    assert len(a.selection_) == 3 and a.prior_strength_ in (0.0, 0.1, 1.0)
    with pytest.raises(ValueError, match="need X_val"):
        KnowledgePriorHead(prior=prior, prior_strength=(0.0, 1.0)).fit(X, y)


def test_selection_tolerance_trades_a_little_validation_accuracy_for_the_prior():
    """A prior that contradicts the data's rule costs accuracy as it grows; within the tolerance the strongest
    prior is kept, beyond it the best candidate; the curve records agreement and contradictions per strength."""
    X, y = _rule_data(300, 6)
    Xv, yv = _rule_data(200, 7)
    prior = np.zeros((2, 6))
    prior[1, 0], prior[0, 0] = -1, 1  # wrong on purpose: the data say class 1 shows concept 0
    grid = (0.0, 0.1, 1.0, 10.0)
    exact = KnowledgePriorHead(prior=prior, prior_strength=grid).fit(X, y, Xv, yv)
    loose = KnowledgePriorHead(prior=prior, prior_strength=grid, selection_tolerance=1.0).fit(X, y, Xv, yv)
    curve = {r["prior_strength"]: r for r in exact.selection_}
    assert curve[10.0]["val_balanced_accuracy"] < curve[0.0]["val_balanced_accuracy"] - 0.05
    assert curve[0.0]["prior_contradictions"] == 2 and curve[10.0]["prior_sign_agreement"] > 0.0
    assert exact.prior_strength_ < 10.0 and loose.prior_strength_ == 10.0
    best = max(r["val_balanced_accuracy"] for r in exact.selection_)
    tol = 0.02
    mid = KnowledgePriorHead(prior=prior, prior_strength=grid, selection_tolerance=tol).fit(X, y, Xv, yv)
    chosen = curve[mid.prior_strength_]["val_balanced_accuracy"]
    assert chosen >= best - tol
    stronger = [r for r in exact.selection_ if r["prior_strength"] > mid.prior_strength_]
    assert all(r["val_balanced_accuracy"] < best - tol for r in stronger)


def test_class_balanced_weighting_helps_minority_class():
    rng = np.random.default_rng(0)
    n1, n0 = 30, 570
    X = np.concatenate([rng.normal(0.6, 1, (n1, 2)), rng.normal(0, 1, (n0, 2))])
    y = np.r_[np.ones(n1, int), np.zeros(n0, int)]
    bal = KnowledgePriorHead(prior_strength=0.0, class_balanced=True).fit(X, y)
    unbal = KnowledgePriorHead(prior_strength=0.0, class_balanced=False).fit(X, y)
    assert (bal.predict(X) == 1).sum() > (unbal.predict(X) == 1).sum()


def test_zero_shot_head_from_prior():
    prior = np.array([[1, -1], [-1, 1]])
    head = KnowledgePriorHead.from_prior(prior, concept_center=np.array([0.5, 0.5]))
    assert list(head.predict(np.array([[0.9, 0.1], [0.1, 0.9]]))) == [0, 1]


@pytest.mark.parametrize(
    "X, y, message",
    [
        (np.zeros(5), np.zeros(5), "must be 2-D"),
        (np.full((4, 2), np.nan), np.array([0, 1, 0, 1]), "NaN"),
        (np.zeros((4, 2)), np.array([0, 1, 0]), "1-D with 4 entries"),
        (np.zeros((4, 2)), np.array([0, 1, 0, 7]), "outside"),
        (np.zeros((4, 2)), np.array([0.5, 1, 0, 1]), "integer class indices"),
        (np.zeros((4, 2)), np.array([0, 0, 0, 0]), "no example of classes"),
        (np.zeros((4, 3)), np.array([0, 1, 0, 1]), "prior has 2"),
    ],
)
def test_input_validation(X, y, message):
    with pytest.raises(ValueError, match=message):
        KnowledgePriorHead(prior=np.zeros((2, 2)), prior_strength=0.0).fit(X, y)


def test_predict_before_fit_and_wrong_width():
    head = KnowledgePriorHead(prior_strength=0.0)
    with pytest.raises(RuntimeError, match="not fitted"):
        head.predict(np.zeros((1, 2)))
    X, y = _rule_data(50, 0)
    head.fit(X, y)
    with pytest.raises(ValueError, match="fitted on 6"):
        head.predict(np.zeros((1, 4)))


# ----------------------------------------------------------------- indistinguishable concepts (fitting.py)
def test_indistinguishable_concepts_by_labels_and_by_scores():
    from medcbm.fitting import indistinguishable_concepts

    rng = np.random.default_rng(0)
    lab = (rng.random((50, 4)) < 0.5).astype(float)
    lab[:, 1] = lab[:, 0]  # the same label column under two names
    lab[::3, 2] = np.nan
    lab[:, 3] = lab[:, 2]  # same, including where it is not annotated
    ids = ["a", "b", "c", "d"]
    got = indistinguishable_concepts(ids, labels=lab)
    assert [g["concepts"] for g in got] == [["a", "b"], ["c", "d"]]
    assert all("identical concept labels" in g["reason"] for g in got)
    lab[1, 3] = 1 - lab[1, 2]  # one differing image separates them
    assert [g["concepts"] for g in indistinguishable_concepts(ids, labels=lab)] == [["a", "b"]]

    s = rng.standard_normal((200, 4))
    s[:, 2] = 3 * s[:, 0] + 1 + 1e-4 * rng.standard_normal(200)  # same concept, another scale
    s[:, 3] = s[:, 1] + 0.2 * rng.standard_normal(200)  # correlated (~0.98), still distinguishable
    got = indistinguishable_concepts(ids, scores=s)
    assert [g["concepts"] for g in got] == [["a", "c"]] and "correlate at" in got[0]["reason"]
    s[:, 1] = s[:, 3] = 0.5  # constant columns have no correlation: not flagged as one concept
    assert [g["concepts"] for g in indistinguishable_concepts(ids, scores=s)] == [["a", "c"]]


def test_fit_warns_and_reports_indistinguishable_concepts(caplog):
    from medcbm.concepts import ConceptBank
    from medcbm.fitting import fit_cbm

    src = {"citation": "Toy textbook"}
    ids = ["round", "circular", "spiky"]
    concepts = [{"id": c, "text": c, "group": "shape", "kind": "finding", "source": src} for c in ids]
    bank = ConceptBank.from_dict(
        {"name": "toy", "classes": ["alpha", "beta"], "concepts": concepts, "prior": {"beta": {"round": 1}}}
    )

    def split(n, seed):
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((n, 8))
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        C = np.stack([X[:, 0] > 0, X[:, 0] > 0, X[:, 1] > 0], axis=1).astype(float)  # circular == round
        return X, C[:, 0].astype(np.int64), C

    (Xtr, ytr, Ctr), (Xva, yva, Cva) = split(300, 0), split(150, 1)
    with caplog.at_level("WARNING", logger="medcbm.fitting"):
        fitted = fit_cbm(bank, Xtr, ytr, Xva, yva, Ctr, Cva, mode="probe", prior_strength=0.0)
    assert [d["concepts"] for d in fitted.indistinguishable] == [["round", "circular"]]
    assert len(fitted.warnings) == 1 and "round and circular are indistinguishable" in fitted.warnings[0]
    assert any("indistinguishable" in r.getMessage() for r in caplog.records)

    Ctr[:5, 1] = 1 - Ctr[:5, 1]  # a few images tell the labels apart
    Cva[:5, 1] = 1 - Cva[:5, 1]
    fitted = fit_cbm(bank, Xtr, ytr, Xva, yva, Ctr, Cva, mode="probe", prior_strength=0.0)
    assert not any("identical concept labels" in d["reason"] for d in fitted.indistinguishable)

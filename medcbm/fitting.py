# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Fit a concept bottleneck (grounding + prior-constrained head) on cached features.

This is what ``configs/train.yaml`` of every bundle runs, and what built the shipped weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .concepts import ConceptBank
from .grounding import (
    ConceptGrounding,
    ConceptGroundingReport,
    TextGrounding,
    fit_concept_probes,
    grounding_report,
)
from .head import KnowledgePriorHead
from .metrics import accuracy, auroc, balanced_accuracy
from .progress import Progress, progress

__all__ = [
    "FittedCBM",
    "fit_cbm",
    "choose_grounding_mode",
    "classification_metrics",
    "indistinguishable_concepts",
    "INDISTINGUISHABLE_CORRELATION",
]

logger = logging.getLogger(__name__)

#: Two concepts whose training scores correlate above this are one concept to the head (its weights
#: between them are arbitrary, and explanations list both). A data-independent constant, not tuned.
INDISTINGUISHABLE_CORRELATION = 0.999


@dataclass
class FittedCBM:
    """Everything a fit produces: the kept concepts, grounding, head and what was measured on validation."""

    bank: ConceptBank  # restricted to the kept concepts
    grounding: ConceptGrounding
    head: KnowledgePriorHead
    neutral: np.ndarray  # (K,) mean training score: the value a masked concept takes
    source_class_means: np.ndarray  # (C, K) mean training score per class
    report: list[ConceptGroundingReport] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # concept id -> reason
    val_metrics: dict[str, Any] = field(default_factory=dict)
    indistinguishable: list[dict[str, Any]] = field(default_factory=list)  # see indistinguishable_concepts
    warnings: list[str] = field(default_factory=list)  # one sentence each, also logged


def indistinguishable_concepts(
    concept_ids: Sequence[str],
    scores: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    threshold: float = INDISTINGUISHABLE_CORRELATION,
) -> list[dict[str, Any]]:
    """Pairs of concepts a fit cannot tell apart: identical label columns, or scores correlated above ``threshold``.

    Args:
        concept_ids: the ``K`` concept ids, in column order.
        scores: ``(N, K)`` concept scores on the training data (constant columns are not compared).
        labels: ``(N, K)`` concept labels, NaN where not annotated; columns with no label are not compared.
        threshold: Pearson correlation above which two score columns count as the same concept.

    Returns:
        One dict per pair, ``{"concepts": [a, b], "reason": ...}``, in column order.
    """
    found: dict[tuple[int, int], str] = {}
    if labels is not None:
        L = np.asarray(labels, dtype=np.float64)
        annotated = np.isfinite(L).any(0)
        for a in range(L.shape[1]):
            for b in range(a + 1, L.shape[1]):
                if annotated[a] and annotated[b] and np.array_equal(L[:, a], L[:, b], equal_nan=True):
                    found[(a, b)] = "identical concept labels on the training data"
    if scores is not None and len(scores) > 2:
        S = np.asarray(scores, dtype=np.float64)
        sd = S.std(0)
        varying = np.flatnonzero(sd > 1e-12 * max(1.0, float(np.abs(S).max())))
        if len(varying) > 1:
            corr = np.corrcoef(S[:, varying], rowvar=False)
            for i, a in enumerate(varying):
                for j in range(i + 1, len(varying)):
                    b = varying[j]
                    if corr[i, j] > threshold and (a, b) not in found:
                        found[(int(a), int(b))] = f"training scores correlate at {corr[i, j]:.4f} (> {threshold})"
    return [{"concepts": [concept_ids[a], concept_ids[b]], "reason": r} for (a, b), r in sorted(found.items())]


def choose_grounding_mode(concept_labels: np.ndarray | None) -> str:
    """``probe`` when any concept label is present, else ``text``."""
    if concept_labels is not None and np.isfinite(np.asarray(concept_labels, dtype=np.float64)).any():
        return "probe"
    return "text"


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, one-vs-rest AUROC and recall (sensitivity) per class."""
    y_true = np.asarray(y_true)
    pred = proba.argmax(1)
    out: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": round(accuracy(y_true, pred), 4),
        "balanced_accuracy": round(balanced_accuracy(y_true, pred), 4),
    }
    for c, name in enumerate(class_names):
        a = auroc(y_true == c, proba[:, c])
        out[f"auroc_{name}"] = None if np.isnan(a) else round(a, 4)
    for c, name in enumerate(class_names):
        out[f"recall_{name}"] = round(float((pred[y_true == c] == c).mean()), 4) if np.any(y_true == c) else None
    return out


def fit_cbm(
    bank: ConceptBank,
    train_features: np.ndarray,
    train_y: np.ndarray,
    val_features: np.ndarray,
    val_y: np.ndarray,
    train_concepts: np.ndarray | None = None,
    val_concepts: np.ndarray | None = None,
    mode: str = "auto",
    text_embeddings: torch.Tensor | None = None,
    prior_strength: float | Sequence[float] = (0.0, 0.01, 0.1, 1.0),
    sparsity: float = 0.0,
    drop_ungroundable: bool = True,
    prior_tolerance: float = 0.0,
) -> FittedCBM:
    """Ground the concepts, drop those no better than chance, and fit the knowledge-prior head.

    Args:
        bank: the concept bank (classes, concepts, prior).
        train_features, val_features: L2-normalised image features ``(N, D)``.
        train_y, val_y: class indices.
        train_concepts, val_concepts: concept labels ``(N, K)`` in {0, 1}, NaN when not annotated.
        mode: ``probe``, ``text`` or ``auto`` (probe when concept labels exist).
        text_embeddings: ``(K, D)`` concept text embeddings (required for ``text``).
        prior_strength: candidates for the head's prior weight, chosen on validation data.
        prior_tolerance: take the strongest prior whose validation balanced accuracy is within this of the
            best candidate's (trades at most that much validation accuracy for agreement with the prior).
        drop_ungroundable: remove concepts whose grounding is not better than chance on validation
            (for ``probe`` also concepts without labels). Kept when no concept labels exist at all.
    """
    mode, Xtr, Xva = _prepare_inputs(
        bank, train_features, train_y, val_features, train_concepts, val_concepts, mode, text_embeddings
    )
    K = bank.num_concepts
    bar = progress(total=3, desc="fit", unit="step", rate=False)  # grounding, checks, head
    bar.set_postfix(f"{mode} grounding of {K} concepts")
    if mode == "probe":
        grounding: ConceptGrounding = fit_concept_probes(Xtr.numpy(), train_concepts, Xva.numpy(), val_concepts)
    else:
        grounding = TextGrounding(text_embeddings).calibrate(Xtr)

    bar.update(1)
    keep, report, dropped = _groundable_concepts(bank, grounding, Xva, val_concepts, drop_ungroundable, bar)
    sub_bank = bank.subset([bank.concept_ids[k] for k in keep])
    grounding = _subset_grounding(grounding, keep)
    with torch.no_grad():
        s_tr, s_va = grounding(Xtr).numpy(), grounding(Xva).numpy()
    same, fit_warnings = _indistinguishable_warnings(sub_bank.concept_ids, s_tr, train_concepts, keep)
    bar.set_postfix("head")
    bar.update(1)
    head = KnowledgePriorHead(
        prior=sub_bank.prior, prior_strength=prior_strength, sparsity=sparsity, selection_tolerance=prior_tolerance
    )
    head.fit(s_tr, np.asarray(train_y), s_va, np.asarray(val_y), n_classes=bank.num_classes)
    bar.update(1)
    bar.close()
    train_y = np.asarray(train_y)
    class_means = np.stack([s_tr[train_y == c].mean(0) for c in range(bank.num_classes)])
    val_metrics = classification_metrics(np.asarray(val_y), head.predict_proba(s_va), bank.classes)
    val_metrics["prior_strength"] = head.prior_strength_
    val_metrics["prior_agreement"] = round(head.prior_agreement(), 4)
    logger.info("fitted %s CBM with %d/%d concepts; validation %s", mode, len(keep), K, val_metrics)
    return FittedCBM(
        sub_bank, grounding, head, s_tr.mean(0), class_means, report, dropped, val_metrics, same, fit_warnings
    )


def _prepare_inputs(
    bank: ConceptBank,
    train_features: np.ndarray,
    train_y: np.ndarray,
    val_features: np.ndarray,
    train_concepts: np.ndarray | None,
    val_concepts: np.ndarray | None,
    mode: str,
    text_embeddings: torch.Tensor | None,
) -> tuple[str, torch.Tensor, torch.Tensor]:
    """Check :func:`fit_cbm`'s inputs, resolve ``mode="auto"`` and convert the features to float32 tensors.

    Returns:
        The grounding mode (``probe`` or ``text``) and the training and validation features.

    Raises:
        ValueError: a class without training images, or a mode whose inputs are missing or unknown.
    """
    missing = [bank.classes[c] for c in range(bank.num_classes) if not np.any(np.asarray(train_y) == c)]
    if missing:
        raise ValueError(f"the training data has no image of class(es) {missing}; every class needs examples")
    if mode == "auto":
        mode = choose_grounding_mode(train_concepts)
    Xtr = torch.as_tensor(np.asarray(train_features, dtype=np.float32))
    Xva = torch.as_tensor(np.asarray(val_features, dtype=np.float32))
    if mode == "probe" and (train_concepts is None or val_concepts is None):
        raise ValueError("probe grounding needs concept labels for the training and validation images")
    if mode == "text" and text_embeddings is None:
        raise ValueError("text grounding needs the concept text embeddings of this backbone")
    if mode not in ("probe", "text"):
        raise ValueError(f"unknown grounding mode {mode!r}")
    return mode, Xtr, Xva


def _groundable_concepts(
    bank: ConceptBank,
    grounding: ConceptGrounding,
    Xva: torch.Tensor,
    val_concepts: np.ndarray | None,
    drop_ungroundable: bool,
    bar: Progress[Any],
) -> tuple[list[int], list[ConceptGroundingReport], dict[str, str]]:
    """Which concepts to keep: all, unless validation concept labels show some no better than chance.

    Args:
        bank: the full concept bank.
        grounding: the grounding of all its concepts.
        Xva: validation features.
        val_concepts: validation concept labels (NaN where not annotated), or ``None``.
        drop_ungroundable: whether concepts the report marks ungroundable are dropped.
        bar: the fit's progress bar, closed without a summary when too few concepts remain.

    Returns:
        The kept concept indices, the grounding report (empty without labels) and the dropped ids with reasons.

    Raises:
        ValueError: when fewer than two concepts are groundable.
    """
    keep = list(range(bank.num_concepts))
    report: list[ConceptGroundingReport] = []
    dropped: dict[str, str] = {}
    if val_concepts is not None and np.isfinite(np.asarray(val_concepts, dtype=np.float64)).any():
        with torch.no_grad():
            sv = grounding(Xva).numpy()
        report = grounding_report(bank.concept_ids, sv, val_concepts)
        if drop_ungroundable:
            keep = [k for k, r in enumerate(report) if r.groundable]
            dropped = {r.concept_id: r.reason for r in report if not r.groundable}
            if len(keep) < 2:
                bar.close(summary=False)
                raise ValueError(f"only {len(keep)} concepts are groundable on the validation data: {dropped}")
    return keep, report, dropped


def _indistinguishable_warnings(
    concept_ids: Sequence[str], s_tr: np.ndarray, train_concepts: np.ndarray | None, keep: list[int]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The kept concepts the head cannot tell apart, and one logged warning per pair.

    Args:
        concept_ids: the kept concept ids.
        s_tr: ``(N, K_kept)`` training concept scores.
        train_concepts: ``(N, K)`` training concept labels over all concepts, or ``None``.
        keep: indices of the kept concepts in ``train_concepts``' columns.

    Returns:
        The pairs (see :func:`indistinguishable_concepts`) and the warnings.
    """
    same = indistinguishable_concepts(
        concept_ids, s_tr, None if train_concepts is None else np.asarray(train_concepts)[:, keep]
    )
    fit_warnings = [
        f"concepts {a} and {b} are indistinguishable ({item['reason']}); the head cannot tell them apart: "
        "merge them or fix their labels"
        for item in same
        for a, b in [item["concepts"]]
    ]
    for w in fit_warnings:
        logger.warning(w)
    return same, fit_warnings


def _subset_grounding(g: ConceptGrounding, keep: list[int]) -> ConceptGrounding:
    idx = torch.as_tensor(keep, dtype=torch.long)
    tensors = {k: v.index_select(0, idx) for k, v in g.tensors().items()}
    return ConceptGrounding.from_tensors(g.mode, tensors)

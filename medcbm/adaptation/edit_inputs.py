# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Checking and converting the arrays :meth:`medcbm.adaptation.ConceptEditSearch.fit` takes (shapes, finiteness,
class indices) into one typed bundle of float64 / int64 arrays."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__: list[str] = []

_EPS = 1e-6


def _as_2d(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _as_labels(y: Any, n: int, n_classes: int | None, name: str) -> np.ndarray:
    """``y`` as ``(n,)`` int64 class indices in ``[0, n_classes)`` (``None``: only checked to be non-negative)."""
    a = np.asarray(y)
    if a.ndim != 1 or len(a) != n:
        raise ValueError(f"{name} must be 1-D with {n} entries, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer class indices, got dtype {a.dtype}")
    if a.size and n_classes is None and a.min() < 0:
        raise ValueError(f"{name} has negative class indices")
    if a.size and n_classes is not None and (a.min() < 0 or a.max() >= n_classes):
        raise ValueError(f"{name} has class indices outside [0, {n_classes - 1}]")
    return a.astype(np.int64)


class _FitData(NamedTuple):
    """:meth:`ConceptEditSearch.fit`'s inputs, checked and as float64 / int64 arrays."""

    W: np.ndarray  # (C, K) head weight
    b: np.ndarray  # (C,) head bias plus any label-shift offset
    neutral: np.ndarray  # (K,)
    S: np.ndarray  # (n, K) support scores
    y: np.ndarray  # (n,) support labels
    R: np.ndarray  # (N, K) reference scores
    yr: np.ndarray  # (N,) reference labels
    U: np.ndarray  # (M, K) unlabelled reference scores (M = 0 when none)
    mus: np.ndarray  # (C, K) source class means


def _fit_inputs(
    support_scores: Any, support_labels: Any, head: Any, reference: Any, source_class_means: Any
) -> _FitData:
    """Check and convert :meth:`ConceptEditSearch.fit`'s arguments (documented there) against the head.

    Raises:
        ValueError: shapes or values that do not fit together, an edited head, or an empty support set.
    """
    if head.has_edit:
        raise ValueError("the edit is searched from a head without one (remove the loaded adaptation first)")
    W, n0 = head.weight, head.neutral
    C, K = W.shape
    reference.check_head(head)
    S = _as_2d(support_scores, "support_scores")
    if S.shape[0] == 0:
        raise ValueError("the support set is empty (k = 0): give at least one labelled image per class")
    if S.shape[1] != K:
        raise ValueError(f"support_scores has {S.shape[1]} concepts, the head has {K}")
    y = _as_labels(support_labels, len(S), C, "support_labels")
    R, yr = reference.scores, reference.labels
    if source_class_means is None:
        mus = np.tile(n0, (C, 1))  # a class absent from the reference set keeps the neutral value
        for c in np.unique(yr):
            mus[c] = R[yr == c].mean(0)
    else:
        mus = _as_2d(source_class_means, "source_class_means")
        if mus.shape != (C, K):
            raise ValueError(f"source_class_means must be {(C, K)}, got {mus.shape}")
    return _FitData(W, head.bias + head.offset, n0, S, y, R, yr, reference.unlabelled, mus)


def _source_spread(R: np.ndarray, yr: np.ndarray, C: int) -> np.ndarray:
    """``(C, K)`` source standard deviation per class (the pooled one for a class with fewer than 2 references),
    floored at ``_EPS``."""
    sds = np.tile(R.std(0), (C, 1))
    for c in np.unique(yr):
        if (yr == c).sum() >= 2:
            sds[c] = R[yr == c].std(0, ddof=1)
    return np.maximum(sds, _EPS)

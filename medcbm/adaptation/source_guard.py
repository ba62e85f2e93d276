# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The source guard shared by the concept edit and the site calibration: which source images it checks, what counts
as a loss on them, and how many losses a tolerance allows (a one-sided Clopper-Pearson bound)."""

from __future__ import annotations

import numpy as np

__all__ = ["allowed_losses", "guard_set"]


def allowed_losses(n: int, tolerance: float, confidence: float = 0.95) -> int:
    """Largest number of lost source images out of ``n`` whose one-sided Clopper-Pearson upper bound on the loss
    rate (at ``confidence``) is at most ``tolerance``; 0 when even no loss cannot show it (small ``n``)."""
    from scipy.stats import beta

    best = 0
    for k in range(n):
        if float(beta.ppf(confidence, k + 1, n - k)) > tolerance:
            break
        best = k
    return best


def guard_set(
    R: np.ndarray, yr: np.ndarray, U: np.ndarray, W: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The source guard's images and what counts as a loss on them (shared with the concept calibration).

    Labelled reference images are held to their labels, unlabelled ones to the unedited head's own prediction.

    Args:
        R, yr: ``(N, K)`` labelled reference scores and their ``(N,)`` labels.
        U: ``(M, K)`` unlabelled reference scores.
        W, b: the head, ``(C, K)`` / ``(C,)``.

    Returns:
        ``G`` ``(N + M, K)`` (``R`` then ``U``), its unedited logits ``(N + M, C)`` and the target class of each row.
    """
    G = np.vstack([R, U])
    logits = G @ W.T + b
    target = np.concatenate([yr, logits[len(R) :].argmax(1)]).astype(np.int64)
    return G, logits, target

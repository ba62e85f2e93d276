# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Peers the concept edit is compared with (benchmarks/adaptation.py): T3A, LAME, head re-fits.

All act on cached representations (concept scores or features) and return class indices; none changes
the shipped bundle. T3A and LAME are unsupervised test-time methods, here seeded with the labelled support
set where the method allows it; the re-fits use the support labels directly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..head import KnowledgePriorHead
from ..metrics import softmax

__all__ = ["T3A", "lame_predict", "refit_head_with_prior", "linear_probe_refit"]


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class T3A:
    """Test-time template adjuster (Iwasawa & Matsuo, NeurIPS 2021), on any representation ``h``.

    Class prototypes start as the normalised head weights (plus, here, the labelled support images);
    each test image joins the support of its pseudo-label, the ``filter_k`` lowest-entropy members per
    class are kept, and the image is classified by its similarity to the prototypes. Streaming, in input
    order, as in the paper.

    Args:
        weight: ``(C, K)`` head weights acting on ``h`` (the initial templates).
        bias: ``(C,)`` head bias (pseudo-labels and entropies come from ``h @ W.T + b``).
        filter_k: kept support members per class (the paper's M; ``None`` keeps all).
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray, filter_k: int | None = 20):
        self.W = np.asarray(weight, dtype=np.float64)
        self.b = np.asarray(bias, dtype=np.float64)
        self.filter_k = filter_k

    def predict(
        self, h: np.ndarray, support_h: np.ndarray | None = None, support_y: np.ndarray | None = None
    ) -> np.ndarray:
        h = np.asarray(h, dtype=np.float64)
        C = self.W.shape[0]
        # members per class: (vector, entropy); labelled support members get entropy 0 (kept first)
        members: list[list[tuple[np.ndarray, float]]] = [[(_normalise(self.W[c : c + 1])[0], np.inf)] for c in range(C)]
        if support_h is not None and len(support_h):
            for v, c in zip(_normalise(np.asarray(support_h, dtype=np.float64)), np.asarray(support_y)):
                members[int(c)].append((v, 0.0))
        out = np.empty(len(h), dtype=np.int64)
        for i, x in enumerate(h):
            p = softmax((x @ self.W.T + self.b)[None])[0]
            c = int(p.argmax())
            ent = float(-(p * np.log(p + 1e-12)).sum())
            members[c].append((_normalise(x[None])[0], ent))
            if self.filter_k is not None:
                members[c].sort(key=lambda m: m[1])
                members[c] = members[c][: self.filter_k + 1]
            protos = np.stack([_normalise(np.mean([m[0] for m in ms], 0)[None])[0] for ms in members])
            out[i] = int(np.argmax(_normalise(x[None])[0] @ protos.T))
        return out


def lame_predict(logits: np.ndarray, h: np.ndarray, knn: int = 5, max_iter: int = 100, tol: float = 1e-8) -> np.ndarray:
    """LAME (Boudiaf et al., CVPR 2022): Laplacian-regularised adjustment of the output probabilities.

    Maximises ``sum_i z_i . log p_i - KL(z_i || p_i) + sum_ij w_ij z_i . z_j`` over assignments ``z`` with a
    kNN affinity ``w`` on the (normalised) representation ``h``; the fixed point is
    ``z_i ∝ p_i * exp(sum_j w_ij z_j)``. Returns class indices of the adjusted assignments.
    """
    p = softmax(np.asarray(logits, dtype=np.float64))
    x = _normalise(np.asarray(h, dtype=np.float64))
    n = len(x)
    if n <= 1:
        return p.argmax(1)
    k = min(knn, n - 1)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    Wa = np.zeros((n, n))
    Wa[np.repeat(np.arange(n), k), nn.ravel()] = 1.0
    Wa = np.maximum(Wa, Wa.T)  # symmetric kNN graph
    logp = np.log(p + 1e-12)
    z = p.copy()
    for _ in range(max_iter):
        new = softmax(logp + Wa @ z)
        if np.abs(new - z).max() < tol:
            z = new
            break
        z = new
    return z.argmax(1)


def refit_head_with_prior(
    support_scores: np.ndarray,
    support_y: np.ndarray,
    prior: np.ndarray,
    prior_strength: float = 1.0,
    n_classes: int | None = None,
) -> KnowledgePriorHead | None:
    """Few-shot re-fit of the knowledge-prior head on the support concept scores (no validation split: one
    fixed ``prior_strength``). ``None`` when a class has no support image (the head cannot be fitted)."""
    C = n_classes or np.asarray(prior).shape[0]
    if len(np.unique(support_y)) < C:
        return None
    return KnowledgePriorHead(prior=prior, prior_strength=float(prior_strength)).fit(
        support_scores, support_y, n_classes=C
    )


def linear_probe_refit(
    support_features: np.ndarray, support_y: np.ndarray, C: float = 1.0, classes: Sequence[int] | None = None
):
    """A plain multinomial logistic regression on the support features (the reference, not a CBM)."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(support_y)) < 2:
        return None
    return LogisticRegression(C=C, max_iter=2000, class_weight="balanced").fit(
        _normalise(np.asarray(support_features, dtype=np.float64)), np.asarray(support_y)
    )

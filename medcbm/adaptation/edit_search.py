# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Training-free concept edit search (METHODS.md §2): mask mis-activated concepts, amplify under-activated ones.

Everything works on cached, *unedited* concept scores; no gradient, no weight change. For a support image
``i`` of class ``y_i`` let ``y'_i`` be its most-confused wrong class under the unedited head (the runner-up
logit). The edit's effect on the margin ``z[y_i] - z[y'_i]`` is exact because the head is linear:

- **mask** ``k`` (``a_k <- neutral_k``) gains ``delta_k = mean_i (a_ik - neutral_k) * (W[y'_i,k] - W[y_i,k])``;
  a concept is a mask candidate when ``delta_k > 0`` *and* it is mis-activated: over-activated versus the
  source class means (``mean_i a_ik - mu_s[y_i,k] > 0``) in a way that pushes toward ``y'_i`` on average;
- **amplify** ``k`` by ``gamma_k = clip(mu_s[y*,k] / mu_t[y*,k], 1, gamma_max)`` where ``y*`` is the support
  class whose logit the concept raises most (``W[y*,k] > 0``, largest in its column) and the concept fell
  below its source level for that class (``mu_t < mu_s``); it gains
  ``(gamma_k - 1) * mean_i a_ik * (W[y_i,k] - W[y'_i,k])`` and is a candidate when that is positive.

Candidates are ranked by their margin gain. How many masks and gains to keep is chosen by leave-one-out
balanced accuracy on the support set (ties: fewer edits). The **source guard** then adds the chosen edits
one by one in rank order and rejects any whose cumulative effect lowers accuracy on the source reference
set by more than ``guard_tolerance`` (0.5 points): it counts the reference images the edits turn from
correct to wrong, so fixes elsewhere cannot offset them. Every kept or rejected edit carries a reason.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .spec import AdaptationSpec

__all__ = ["ConceptEditSearch", "ConceptEdit", "edited_scores"]

logger = logging.getLogger(__name__)

_EPS = 1e-6


@dataclass(frozen=True)
class ConceptEdit:
    """One proposed edit: ``op`` is ``"mask"`` or ``"gain"``; ``value`` the gain factor (1 for a mask)."""

    index: int
    op: str
    value: float
    margin_gain: float
    target_class: int  # mask: the class most pushed toward; gain: the class it serves


def edited_scores(scores: np.ndarray, mask: np.ndarray, gain: np.ndarray, neutral: np.ndarray) -> np.ndarray:
    """The network's edit on numpy scores: masked concepts take ``neutral``, others are multiplied by ``gain``."""
    return np.where(mask[None, :], neutral[None, :], scores * gain[None, :])


def _as_2d(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _as_labels(y: Any, n: int, n_classes: int, name: str) -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1 or len(a) != n:
        raise ValueError(f"{name} must be 1-D with {n} entries, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer class indices, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= n_classes):
        raise ValueError(f"{name} has class indices outside [0, {n_classes - 1}]")
    return a.astype(np.int64)


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    classes = np.unique(y)
    return float(np.mean([(pred[y == c] == c).mean() for c in classes])) if len(classes) else float("nan")


class ConceptEditSearch:
    """Find a concept mask and gains from a few labelled target images (estimator style).

    Args:
        gamma_max: largest gain factor.
        guard_tolerance: largest allowed fraction of source reference images the edit turns from correct to wrong
            (0.005 = 0.5 points; this also bounds the accuracy drop).
        mask_grid / gain_grid: candidate numbers of masks / gains, chosen by leave-one-out on the support set.
        class_names / concept_ids: for the reasons and the spec (defaults: ``class<i>`` / ``concept<k>``).

    Attributes (after :meth:`fit`):
        mask_: ``(K,)`` bool; gain_: ``(K,)`` float; edits_: kept :class:`ConceptEdit`; rejected_: list of
        ``(ConceptEdit, reason)`` refused by the source guard; reasons_: concept id -> text; spec_:
        :class:`~medcbm.adaptation.spec.AdaptationSpec` (no provenance: the workflow adds it);
        loo_: leave-one-out table; missing_classes_ / warnings_; fit_seconds_.

    Example::

        search = ConceptEditSearch(class_names=bundle.class_names, concept_ids=bundle.concept_ids)
        search.fit(support_scores, support_y, W, b, neutral, ref.scores, ref.labels)
        network.set_edit(torch.as_tensor(search.mask_), torch.as_tensor(search.gain_))
    """

    def __init__(
        self,
        gamma_max: float = 3.0,
        guard_tolerance: float = 0.005,
        mask_grid: Sequence[int] = (0, 1, 2, 4, 8),
        gain_grid: Sequence[int] = (0, 1, 2, 4, 8),
        class_names: Sequence[str] | None = None,
        concept_ids: Sequence[str] | None = None,
    ):
        if not (math.isfinite(gamma_max) and gamma_max >= 1):
            raise ValueError(f"gamma_max must be a finite number >= 1, got {gamma_max}")
        if not (0 <= guard_tolerance < 1):
            raise ValueError(f"guard_tolerance must be in [0, 1), got {guard_tolerance}")
        for name, grid in (("mask_grid", mask_grid), ("gain_grid", gain_grid)):
            if not grid or any(int(m) != m or m < 0 for m in grid):
                raise ValueError(f"{name} must be a non-empty list of counts >= 0, got {grid}")
        self.gamma_max = float(gamma_max)
        self.guard_tolerance = float(guard_tolerance)
        self.mask_grid = sorted({int(m) for m in mask_grid})
        self.gain_grid = sorted({int(m) for m in gain_grid})
        self.class_names = list(class_names) if class_names is not None else None
        self.concept_ids = list(concept_ids) if concept_ids is not None else None

    # ------------------------------------------------------------------ public API
    def fit(
        self,
        support_scores: np.ndarray,
        support_labels: np.ndarray,
        weight: np.ndarray,
        bias: np.ndarray,
        neutral: np.ndarray,
        reference_scores: np.ndarray,
        reference_labels: np.ndarray,
        source_class_means: np.ndarray | None = None,
    ) -> "ConceptEditSearch":
        """Search the edit.

        Args:
            support_scores: ``(n, K)`` UNEDITED concept scores of the labelled target images.
            support_labels: ``(n,)`` class indices.
            weight / bias: the head, ``(C, K)`` / ``(C,)``.
            neutral: ``(K,)`` value a masked concept takes (the network's ``neutral``).
            reference_scores / reference_labels: the source reference set ``(N, K)`` / ``(N,)`` (unedited),
                for the source guard (and the source class means when not given).
            source_class_means: ``(C, K)`` mean source score per class; computed from the reference set
                when ``None`` (a class absent there falls back to ``neutral``).

        Raises:
            ValueError: shapes or values that do not fit together, or an empty support set.
        """
        t0 = time.perf_counter()
        W = _as_2d(weight, "weight")
        C, K = W.shape
        b = np.asarray(bias, dtype=np.float64).reshape(-1)
        n0 = np.asarray(neutral, dtype=np.float64).reshape(-1)
        if b.shape != (C,) or n0.shape != (K,):
            raise ValueError(f"bias {b.shape} / neutral {n0.shape} do not match a head of shape {(C, K)}")
        S = _as_2d(support_scores, "support_scores")
        if S.shape[0] == 0:
            raise ValueError("the support set is empty (k = 0): give at least one labelled image per class")
        if S.shape[1] != K:
            raise ValueError(f"support_scores has {S.shape[1]} concepts, the head has {K}")
        y = _as_labels(support_labels, len(S), C, "support_labels")
        R = _as_2d(reference_scores, "reference_scores")
        if R.shape[1] != K or len(R) == 0:
            raise ValueError(f"reference_scores must be (N > 0, {K}), got {R.shape}")
        yr = _as_labels(reference_labels, len(R), C, "reference_labels")
        if source_class_means is None:
            mus = np.tile(n0, (C, 1))
            for c in np.unique(yr):
                mus[c] = R[yr == c].mean(0)
        else:
            mus = _as_2d(source_class_means, "source_class_means")
            if mus.shape != (C, K):
                raise ValueError(f"source_class_means must be {(C, K)}, got {mus.shape}")
        self.class_names_ = self.class_names or [f"class{c}" for c in range(C)]
        self.concept_ids_ = self.concept_ids or [f"concept{k}" for k in range(K)]
        if len(self.class_names_) != C or len(self.concept_ids_) != K:
            raise ValueError(
                f"{len(self.class_names_)} class names / {len(self.concept_ids_)} concept ids for a head of {(C, K)}"
            )
        self._W, self._b, self._neutral, self._mus = W, b, n0, mus

        present = np.unique(y)
        self.missing_classes_ = [self.class_names_[c] for c in range(C) if c not in set(present.tolist())]
        self.warnings_ = [
            f"class {name!r} has no support image: no edit was chosen for it, and the edit is not checked on it "
            "at this site (only on the source reference set)"
            for name in self.missing_classes_
        ]
        if len(S) < 2:
            self.warnings_.append("only one support image: leave-one-out is impossible, no edit is made")

        z = S @ W.T + b
        zw = z.copy()
        zw[np.arange(len(y)), y] = -np.inf
        y2 = zw.argmax(1)  # most-confused wrong class
        self._prep = self._per_image_terms(S, y, y2)

        # leave-one-out over the grid of (number of masks, number of gains)
        ref_logits = R @ W.T + b
        base_ref_correct = int((ref_logits.argmax(1) == yr).sum())
        allowed_drop = int(math.floor(self.guard_tolerance * len(R) + 1e-9))
        self._guard_ctx = (R, yr, ref_logits, base_ref_correct, allowed_drop)
        grid = [(m, g) for m in self.mask_grid for g in self.gain_grid]
        loo_pred = np.zeros((len(grid), len(S)), dtype=np.int64)
        for i in range(len(S)):
            keep = np.ones(len(S), dtype=bool)
            keep[i] = False
            masks, gains = self._candidates(keep, y, C, K)
            admitted, _ = self._guard(self._merge(masks[: max(self.mask_grid)], gains[: max(self.gain_grid)]))
            am = [e for e in admitted if e.op == "mask"]
            ag = [e for e in admitted if e.op == "gain"]
            for j, (m, g) in enumerate(grid):
                a = self._apply_row(S[i], am[:m] + ag[:g])
                loo_pred[j, i] = int(np.argmax(W @ a + b))
        before_pred = z.argmax(1)
        loo_acc = (
            [_balanced_accuracy(y, loo_pred[j]) for j in range(len(grid))]
            if len(S) >= 2
            else [float("nan")] * len(grid)
        )
        self.loo_ = [
            {"n_mask": m, "n_gain": g, "loo_balanced_accuracy": round(a, 4) if a == a else None}
            for (m, g), a in zip(grid, loo_acc)
        ]
        if len(S) >= 2:
            best = max(range(len(grid)), key=lambda j: (round(loo_acc[j], 9), -(grid[j][0] + grid[j][1]), -grid[j][1]))
        else:
            best = grid.index((self.mask_grid[0], self.gain_grid[0]))
        self.n_mask_, self.n_gain_ = grid[best]

        masks, gains = self._candidates(np.ones(len(S), dtype=bool), y, C, K)
        admitted, self.rejected_ = self._guard(self._merge(masks[: max(self.mask_grid)], gains[: max(self.gain_grid)]))
        am = [e for e in admitted if e.op == "mask"][: self.n_mask_]
        ag = [e for e in admitted if e.op == "gain"][: self.n_gain_]
        # guard the chosen subset again: an edit admitted after one that is no longer chosen may now harm
        self.edits_, refused = self._guard(self._merge(am, ag))
        self.rejected_ += refused
        self.mask_ = np.zeros(K, dtype=bool)
        self.gain_ = np.ones(K)
        for e in self.edits_:
            if e.op == "mask":
                self.mask_[e.index] = True
            else:
                self.gain_[e.index] = e.value

        edited_ref = edited_scores(R, self.mask_, self.gain_, n0) @ W.T + b
        edited_sup = edited_scores(S, self.mask_, self.gain_, n0) @ W.T + b
        self.reasons_ = {self.concept_ids_[e.index]: self._reason(e, S, y) for e in self.edits_}
        self.spec_ = AdaptationSpec(
            mask=[self.concept_ids_[k] for k in np.flatnonzero(self.mask_)],
            gain={self.concept_ids_[k]: float(round(self.gain_[k], 6)) for k in np.flatnonzero(self.gain_ != 1.0)},
            reasons=self.reasons_,
            source_accuracy_before=round(base_ref_correct / len(R), 6),
            source_accuracy_after=round(float((edited_ref.argmax(1) == yr).mean()), 6),
            support_accuracy_before=round(float((before_pred == y).mean()), 6),
            support_accuracy_after=round(float((edited_sup.argmax(1) == y).mean()), 6),
            warnings=list(self.warnings_),
            missing_classes=list(self.missing_classes_),
            method={
                "name": "concept mask/gain search (METHODS.md section 2)",
                "gamma_max": self.gamma_max,
                "guard_tolerance": self.guard_tolerance,
                "mask_grid": self.mask_grid,
                "gain_grid": self.gain_grid,
                "chosen_n_mask": self.n_mask_,
                "chosen_n_gain": self.n_gain_,
                "support_loo_balanced_accuracy_before": round(_balanced_accuracy(y, before_pred), 6),
                "support_loo_balanced_accuracy_after": self.loo_[best]["loo_balanced_accuracy"],
                "guard_rejected": {
                    self.concept_ids_[e.index]: reason for e, reason in self.rejected_
                },
                "n_support": int(len(S)),
                "n_reference": int(len(R)),
            },
        )
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def transform(self, scores: np.ndarray) -> np.ndarray:
        """Apply the found edit to unedited scores ``(N, K)``."""
        self._check_fitted()
        return edited_scores(_as_2d(scores, "scores"), self.mask_, self.gain_, self._neutral)

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """Class indices after the edit."""
        return np.argmax(self.transform(scores) @ self._W.T + self._b, axis=1)

    # ------------------------------------------------------------------ internals
    def _check_fitted(self) -> None:
        if not hasattr(self, "mask_"):
            raise RuntimeError("this ConceptEditSearch is not fitted yet; call fit() first")

    def _per_image_terms(self, S: np.ndarray, y: np.ndarray, y2: np.ndarray) -> dict[str, np.ndarray]:
        W, n0, mus = self._W, self._neutral, self._mus
        dW = W[y2] - W[y]  # (n, K): weight toward the wrong class minus toward the true one
        return {
            "S": S,
            "mask_gain": (S - n0) * dW,  # margin gained by masking, per image
            "shift": (S - mus[y]) * dW,  # site shift, in the harmful direction when > 0
            "over": S - mus[y],  # over-activation versus the source, same classes
            "amp": -S * dW,  # margin gained per unit of (gamma - 1)
        }

    def _candidates(
        self, keep: np.ndarray, y: np.ndarray, C: int, K: int
    ) -> tuple[list[ConceptEdit], list[ConceptEdit]]:
        """Mask and gain candidates from the support images in ``keep``, best first."""
        p = self._prep
        if keep.sum() == 0:
            return [], []
        S, yk = p["S"][keep], y[keep]
        delta = p["mask_gain"][keep].mean(0)
        shift = p["shift"][keep].mean(0)
        over = p["over"][keep].mean(0)
        masks = [
            ConceptEdit(k, "mask", 1.0, float(delta[k]), -1)
            for k in range(K)
            if delta[k] > _EPS and shift[k] > _EPS and over[k] > _EPS
        ]
        masks.sort(key=lambda e: (-e.margin_gain, e.index))

        classes = np.unique(yk)
        mut = np.full((C, K), np.nan)
        for c in classes:
            mut[c] = S[yk == c].mean(0)
        Wp = self._W[classes]  # only classes seen in the support set can be served
        best_c = classes[np.argmax(Wp, axis=0)]  # (K,)
        amp = p["amp"][keep].mean(0)
        gains = []
        for k in range(K):
            c = int(best_c[k])
            w, ms, mt = self._W[c, k], self._mus[c, k], mut[c, k]
            if w <= 0 or not ms > mt:
                continue
            gamma = float(np.clip(ms / max(mt, _EPS), 1.0, self.gamma_max))
            g = (gamma - 1.0) * float(amp[k])
            if gamma > 1.0 + _EPS and g > _EPS:
                gains.append(ConceptEdit(k, "gain", gamma, g, c))
        gains.sort(key=lambda e: (-e.margin_gain, e.index))
        return masks, gains

    @staticmethod
    def _merge(masks: list[ConceptEdit], gains: list[ConceptEdit]) -> list[ConceptEdit]:
        return sorted(masks + gains, key=lambda e: (-e.margin_gain, e.index, e.op))

    def _apply_row(self, a: np.ndarray, edits: list[ConceptEdit]) -> np.ndarray:
        a = a.copy()
        for e in edits:
            a[e.index] = self._neutral[e.index] if e.op == "mask" else a[e.index] * e.value
        return a

    def _guard(self, edits: list[ConceptEdit]) -> tuple[list[ConceptEdit], list[tuple[ConceptEdit, str]]]:
        """Greedy source guard: keep an edit only if, cumulatively, it turns at most ``guard_tolerance`` of the
        source reference images from correct to wrong.

        Losses are counted, not the net accuracy change: images an edit happens to fix cannot hide images it
        breaks, so the bound carries over to other source images (a net check let edits through that lost
        several points on held-out source data while the reference accuracy stayed level).
        """
        R, yr, logits0, base_correct, allowed = self._guard_ctx
        was_correct = logits0.argmax(1) == yr
        logits = logits0.copy()
        kept: list[ConceptEdit] = []
        rejected: list[tuple[ConceptEdit, str]] = []
        for e in edits:
            col = R[:, e.index]
            new = np.full_like(col, self._neutral[e.index]) if e.op == "mask" else col * e.value
            trial = logits + np.outer(new - col, self._W[:, e.index])
            lost = int((was_correct & (trial.argmax(1) != yr)).sum())
            if lost > allowed:
                rejected.append(
                    (
                        e,
                        f"source guard: this {e.op} would turn {lost} of {len(R)} correctly classified source "
                        f"reference images wrong ({100.0 * lost / len(R):.1f} points > "
                        f"{100 * self.guard_tolerance:.1f} allowed)",
                    )
                )
                continue
            logits = trial
            kept.append(e)
        return kept, rejected

    def _reason(self, e: ConceptEdit, S: np.ndarray, y: np.ndarray) -> str:
        cid, k = self.concept_ids_[e.index], e.index
        if e.op == "mask":
            dW = self._W[:, k][None, :] - self._W[y, k][:, None]  # (n, C)
            pushed = (S[:, k] - self._neutral[k])[:, None] * dW
            pushed[np.arange(len(y)), y] = -np.inf
            toward = np.bincount(pushed.argmax(1), minlength=len(self.class_names_)).argmax()
            ms = float(np.mean(self._mus[y, k]))
            mt = float(S[:, k].mean())
            return (
                f"masked (set to its source mean {self._neutral[k]:.3g}): '{cid}' is mis-activated at this site "
                f"(support mean {mt:.3g} vs {ms:.3g} at the source for the same classes) and pushes support images "
                f"toward '{self.class_names_[toward]}' (mean margin loss {e.margin_gain:.3g} logits)"
            )
        c = e.target_class
        mt = float(S[y == c, k].mean())
        return (
            f"amplified x{e.value:.3g}: '{cid}' is evidence for '{self.class_names_[c]}' but under-activated at this "
            f"site ('{self.class_names_[c]}' support mean {mt:.3g} vs {self._mus[c, k]:.3g} at the source); "
            f"mean margin gain {e.margin_gain:.3g} logits"
        )

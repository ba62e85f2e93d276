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

- **attenuate** ``k`` (``a_k <- g * a_k``, ``g`` in ``attenuation_levels``): a softer mask for a mis-activated
  concept (over-activated and pushing toward ``y'_i``) whose full mask would also erase the evidence it still
  carries at this site (e.g. granule colour that separates two classes, only at another threshold).

Selection is greedy forward: each step takes the candidate (one per concept) that most improves the support set's
balanced accuracy (ties: class-balanced mean log-probability of the true class) and passes the source guard; a
refused gain is retried at 3/4, 1/2 and 1/4 of its step. How many steps to keep is chosen by leave-one-out balanced
accuracy on the support set (the whole search re-run without each image; ties: fewer edits, except that a tie
between none and one keeps the single best edit when every class has two support images: on a dozen images accuracy
moves in coarse steps, and support images that are already right cannot show an edit's worth). Candidates need a
shift of ``min_shift_z`` source standard errors of a support mean, so with no site effect nothing is proposed. The
**source guard** rejects any edit whose cumulative effect may cost more than ``guard_tolerance`` (0.5 points) of
source accuracy. It counts *losses*, so fixes elsewhere cannot offset them: labelled reference images (source
validation) turned from correct to wrong, and unlabelled source training images whose prediction changes. The count
allowed is the largest whose one-sided 95 % Clopper-Pearson upper bound on the loss rate stays within the tolerance,
so the promise holds for source images the guard has not seen (with fewer than ~600 reference images no loss at all
is allowed). Every kept, reduced or rejected edit carries a reason.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from ..metrics import balanced_accuracy
from ..networks import HeadArrays, edited_scores
from .edit_inputs import _as_2d, _fit_inputs, _source_spread
from .reference_scores import ReferenceScores
from .source_guard import allowed_losses, guard_set
from .spec import AdaptationSpec

__all__ = ["ConceptEditSearch", "ConceptEdit", "edited_scores"]

logger = logging.getLogger(__name__)

_EPS = 1e-6
_GAIN_BACKOFF = (1.0, 0.75, 0.5, 0.25)  # fractions of (gamma - 1) the guard tries, largest first


@dataclass(frozen=True)
class ConceptEdit:
    """One proposed edit: ``op`` is ``"mask"`` or ``"gain"``; ``value`` the gain factor (1 for a mask)."""

    index: int
    op: str
    value: float
    margin_gain: float
    target_class: int  # mask: the class most pushed toward; gain: the class it serves
    reduced_from: float | None = None  # a gain the source guard cut down from this value


def _improves(obj: np.ndarray, current: np.ndarray) -> bool:
    """Whether a (balanced accuracy, mean log-probability) pair beats ``current``: higher accuracy, or equal
    accuracy and a log-probability higher by more than noise."""
    return (round(obj[0], 9), obj[1]) > (round(current[0], 9), current[1] + _EPS)


class ConceptEditSearch:
    """Find a concept mask and gains from a few labelled target images (estimator style).

    Args:
        gamma_max: largest gain factor of an amplified concept.
        guard_tolerance: largest allowed source loss rate (0.005 = 0.5 points of accuracy), held at 95 %
            confidence on the reference images (see the module docstring).
        max_edits: most concepts one edit may change.
        attenuation_levels: gains below 1 tried on mis-activated concepts (empty: masks and amplification only).
        min_shift_z: how far (in source standard errors of a support mean) a concept must sit above (mask,
            attenuate) or below (amplify) its source level to be a candidate; with no site effect the support
            means stay within noise of the source and nothing is proposed.
        class_names / concept_ids: for the reasons and the spec (defaults: ``class<i>`` / ``concept<k>``).

    Attributes (after :meth:`fit`):
        mask_: ``(K,)`` bool; gain_: ``(K,)`` float; edits_: kept :class:`ConceptEdit`, in the order chosen;
        rejected_: list of ``(ConceptEdit, reason)`` the source guard refused; reasons_: concept id -> text;
        spec_: :class:`~medcbm.adaptation.spec.AdaptationSpec` (no provenance: the workflow adds it);
        loo_: leave-one-out table (balanced accuracy per number of edits); missing_classes_ / warnings_;
        guard_allowed_losses_; fit_seconds_.

    Example::

        search = ConceptEditSearch(class_names=bundle.class_names, concept_ids=bundle.concept_ids)
        search.fit(support_scores, support_y, bundle.head_arrays(), ReferenceScores.of_bundle(bundle))
        network.set_edit(torch.as_tensor(search.mask_), torch.as_tensor(search.gain_))
    """

    def __init__(
        self,
        gamma_max: float = 3.0,
        guard_tolerance: float = 0.005,
        max_edits: int = 8,
        attenuation_levels: Sequence[float] = (0.25, 0.5, 0.75),
        min_shift_z: float = 2.0,
        class_names: Sequence[str] | None = None,
        concept_ids: Sequence[str] | None = None,
    ):
        if not (math.isfinite(gamma_max) and gamma_max >= 1):
            raise ValueError(f"gamma_max must be a finite number >= 1, got {gamma_max}")
        if not (0 <= guard_tolerance < 1):
            raise ValueError(f"guard_tolerance must be in [0, 1), got {guard_tolerance}")
        if int(max_edits) != max_edits or max_edits < 0:
            raise ValueError(f"max_edits must be a count >= 0, got {max_edits}")
        if any(not (0 < g < 1) for g in attenuation_levels):
            raise ValueError(f"attenuation_levels must lie strictly between 0 and 1, got {list(attenuation_levels)}")
        self.gamma_max = float(gamma_max)
        self.guard_tolerance = float(guard_tolerance)
        self.max_edits = int(max_edits)
        if not (math.isfinite(min_shift_z) and min_shift_z >= 0):
            raise ValueError(f"min_shift_z must be a finite number >= 0, got {min_shift_z}")
        self.attenuation_levels = sorted({float(g) for g in attenuation_levels})
        self.min_shift_z = float(min_shift_z)
        self.class_names = list(class_names) if class_names is not None else None
        self.concept_ids = list(concept_ids) if concept_ids is not None else None

    # ------------------------------------------------------------------ public API
    def fit(
        self,
        support_scores: np.ndarray,
        support_labels: np.ndarray,
        head: HeadArrays,
        reference: ReferenceScores,
        source_class_means: np.ndarray | None = None,
    ) -> "ConceptEditSearch":
        """Search the edit.

        Args:
            support_scores: ``(n, K)`` UNEDITED concept scores of the labelled target images.
            support_labels: ``(n,)`` class indices.
            head: the head the edit is searched for, without an edit (its ``neutral`` is the value a masked
                concept takes; a site fit's label-shift offset, when set, is part of its logits).
            reference: the source reference set ``(N, K)`` / ``(N,)`` (unedited; calibrated when a site
                calibration runs before the edit) for the source guard (and the source class means when not
                given); its unlabelled sample (the bundle's training images) counts a changed prediction as a
                loss too.
            source_class_means: ``(C, K)`` mean source score per class; computed from the reference set
                when ``None`` (a class absent there falls back to ``neutral``).

        Raises:
            ValueError: shapes or values that do not fit together, or an empty support set.
        """
        t0 = time.perf_counter()
        d = _fit_inputs(support_scores, support_labels, head, reference, source_class_means)
        S, y, R, yr, U = d.S, d.y, d.R, d.yr, d.U
        C, K = d.W.shape
        self._set_names(C, K)
        self._W, self._b, self._neutral, self._mus = d.W, d.b, d.neutral, d.mus
        # per-class source spread, for the shift evidence of a candidate (a support mean vs the source mean)
        self._sds = _source_spread(R, yr, C)
        present = np.unique(y)
        self._set_support_warnings(present, len(S), C)
        base_ref_correct = self._set_guard(R, yr, U)

        before_pred = (S @ d.W.T + d.b).argmax(1)
        loo_acc, best = self._leave_one_out(S, y, C, K, before_pred)
        self.loo_ = [
            {"n_edits": t, "loo_balanced_accuracy": round(a, 4) if a == a else None} for t, a in enumerate(loo_acc)
        ]
        path, self.rejected_ = self._path(S, y, C, K)
        best = self._break_tie(best, bool(path), loo_acc, np.bincount(y, minlength=C)[present])
        if best == 0:
            self.rejected_ = []
        self._set_edit(path[:best], K)
        self.reasons_ = {self.concept_ids_[e.index]: self._reason(e, S, y) for e in self.edits_}
        self.spec_ = self._make_spec(S, y, R, yr, len(U), before_pred, base_ref_correct, best)
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

    def _set_names(self, C: int, K: int) -> None:
        """Class names and concept ids for the reasons and the spec (defaults ``class<i>`` / ``concept<k>``)."""
        self.class_names_ = self.class_names or [f"class{c}" for c in range(C)]
        self.concept_ids_ = self.concept_ids or [f"concept{k}" for k in range(K)]
        if len(self.class_names_) != C or len(self.concept_ids_) != K:
            raise ValueError(
                f"{len(self.class_names_)} class names / {len(self.concept_ids_)} concept ids for a head of {(C, K)}"
            )

    def _set_support_warnings(self, present: np.ndarray, n_support: int, C: int) -> None:
        """``missing_classes_`` and ``warnings_``: classes without support images, and a single support image."""
        self.missing_classes_ = [self.class_names_[c] for c in range(C) if c not in set(present.tolist())]
        self.warnings_ = [
            f"class {name!r} has no support image: no edit was chosen for it, and the edit is not checked on it "
            "at this site (only on the source reference set)"
            for name in self.missing_classes_
        ]
        if n_support < 2:
            self.warnings_.append("only one support image: leave-one-out is impossible, no edit is made")

    def _set_guard(self, R: np.ndarray, yr: np.ndarray, U: np.ndarray) -> int:
        """Prepare the source guard's set (``_guard_ctx``, ``guard_allowed_losses_``).

        Returns:
            How many labelled reference images the unedited head gets right.
        """
        G, g_logits, g_target = guard_set(R, yr, U, self._W, self._b)
        base_ref_correct = int((g_logits[: len(R)].argmax(1) == yr).sum())
        self.guard_allowed_losses_ = allowed_losses(len(G), self.guard_tolerance)
        self._guard_ctx = (G, g_target, g_logits, self.guard_allowed_losses_)
        return base_ref_correct

    def _leave_one_out(
        self, S: np.ndarray, y: np.ndarray, C: int, K: int, before_pred: np.ndarray
    ) -> tuple[list[float], int]:
        """Leave-one-out balanced accuracy after each number of edits: the whole search without image ``i``, then
        ``i`` scored after each step of that path.

        Args:
            S: ``(n, K)`` support scores.
            y: ``(n,)`` support labels.
            C, K: the head's shape.
            before_pred: ``(n,)`` unedited predictions (what a held-out image gets after zero steps).

        Returns:
            The accuracy for 0..``max_edits`` edits (NaN with fewer than two images) and the best number of
            edits (ties: fewer).
        """
        T = self.max_edits
        loo_pred = np.tile(before_pred, (T + 1, 1))
        if len(S) < 2:
            return [float("nan")] * (T + 1), 0
        for i in range(len(S)):
            keep = np.arange(len(S)) != i
            path, _ = self._path(S[keep], y[keep], C, K)
            for t in range(T + 1):
                loo_pred[t, i] = int(np.argmax(self._W @ self._apply_row(S[i], path[: min(t, len(path))]) + self._b))
        loo_acc = [balanced_accuracy(y, loo_pred[t]) for t in range(T + 1)]
        best = max(range(T + 1), key=lambda t: (round(loo_acc[t], 9), -t))
        return loo_acc, best

    def _break_tie(self, best: int, has_path: bool, loo_acc: list[float], counts: np.ndarray) -> int:
        """The number of edits to keep, and ``chosen_by_``: leave-one-out's choice, or one edit on a tie with none.

        A tie is no evidence against the support set's best edit: that one edit is kept where leave-one-out can
        test at all (every class seen twice, ``counts`` being the support count of each present class; with one
        image, holding it out removes its class).
        """
        self.chosen_by_ = "leave-one-out"
        if best == 0 and has_path and counts.min() >= 2 and round(loo_acc[1], 9) >= round(loo_acc[0], 9):
            best, self.chosen_by_ = 1, "leave-one-out tie: the single best support edit"
        return best

    def _set_edit(self, edits: list[ConceptEdit], K: int) -> None:
        """``edits_``, ``n_edits_`` and the network's form of them, ``mask_`` and ``gain_``."""
        self.edits_ = edits
        self.n_edits_ = len(self.edits_)
        self.mask_ = np.zeros(K, dtype=bool)
        self.gain_ = np.ones(K)
        for e in self.edits_:
            if e.op == "mask":
                self.mask_[e.index] = True
            else:
                self.gain_[e.index] = e.value

    def _make_spec(
        self,
        S: np.ndarray,
        y: np.ndarray,
        R: np.ndarray,
        yr: np.ndarray,
        n_unlabelled: int,
        before_pred: np.ndarray,
        base_ref_correct: int,
        best: int,
    ) -> AdaptationSpec:
        """The fitted edit as an :class:`AdaptationSpec`, with accuracies before / after and the search settings.

        Args:
            S, y: support scores and labels.
            R, yr: reference scores and labels.
            n_unlabelled: how many unlabelled reference images the guard used.
            before_pred: unedited support predictions.
            base_ref_correct: labelled reference images right before the edit.
            best: the number of edits kept (its row of ``loo_``).
        """
        W, b, n0 = self._W, self._b, self._neutral
        edited_ref = edited_scores(R, self.mask_, self.gain_, n0) @ W.T + b
        edited_sup = edited_scores(S, self.mask_, self.gain_, n0) @ W.T + b
        return AdaptationSpec(
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
                "name": "concept mask/gain search (METHODS.md section 2): greedy forward selection, "
                "steps chosen by leave-one-out",
                "gamma_max": self.gamma_max,
                "attenuation_levels": self.attenuation_levels,
                "min_shift_z": self.min_shift_z,
                "max_edits": self.max_edits,
                "guard_tolerance": self.guard_tolerance,
                "chosen_n_edits": self.n_edits_,
                "chosen_by": self.chosen_by_,
                "support_loo_balanced_accuracy_before": self.loo_[0]["loo_balanced_accuracy"],
                "support_loo_balanced_accuracy_after": self.loo_[best]["loo_balanced_accuracy"],
                "guard_rejected": {self.concept_ids_[e.index]: reason for e, reason in self.rejected_},
                "n_support": int(len(S)),
                "n_reference": int(len(R)),
                "n_unlabelled_reference": int(n_unlabelled),
                "guard_allowed_losses": int(self.guard_allowed_losses_),
                "guard_confidence": 0.95,
            },
        )

    def _candidates(self, S: np.ndarray, y: np.ndarray, C: int, K: int) -> list[ConceptEdit]:
        """Mask, attenuation and amplification candidates for the support images ``S`` (rules in the module doc)."""
        W, n0, mus = self._W, self._neutral, self._mus
        z = S @ W.T + self._b
        zw = z.copy()
        zw[np.arange(len(y)), y] = -np.inf
        dW = W[zw.argmax(1)] - W[y]  # (n, K): weight toward the most-confused wrong class minus the true one
        delta = ((S - n0) * dW).mean(0)  # margin gained by masking
        shift = ((S - mus[y]) * dW).mean(0)  # site shift in the harmful direction when > 0
        over = (S - mus[y]).mean(0)  # over-activation versus the source, same classes
        amp = (-S * dW).mean(0)  # margin gained per unit of (gain - 1)
        se_over = np.sqrt((self._sds[y] ** 2).mean(0) / len(y))  # standard error of ``over`` with no site effect
        out: list[ConceptEdit] = []
        classes = np.unique(y)
        best_c = classes[np.argmax(W[classes], axis=0)]  # only classes seen in the support set can be served
        # per concept, the support mean of the class it serves and that mean's standard error with no site effect
        class_means = {int(c): S[y == c].mean(0) for c in classes}
        counts = np.bincount(y, minlength=C)
        served_mean = np.array([class_means[int(c)][k] for k, c in enumerate(best_c)])
        se_served = self._sds[best_c, np.arange(K)] / np.sqrt(counts[best_c])
        for k in range(K):
            mis_activated = shift[k] > _EPS and over[k] > _EPS and over[k] >= self.min_shift_z * se_over[k]
            if mis_activated and delta[k] > _EPS:
                out.append(ConceptEdit(k, "mask", 1.0, float(delta[k]), -1))
            if mis_activated:
                for g in self.attenuation_levels:
                    out.append(ConceptEdit(k, "gain", g, (g - 1.0) * float(amp[k]), -1))
            c = int(best_c[k])
            ms, mt = mus[c, k], float(served_mean[k])
            if W[c, k] > 0 and ms - mt >= max(self.min_shift_z * se_served[k], _EPS):
                gamma = float(np.clip(ms / max(mt, _EPS), 1.0, self.gamma_max))
                if gamma > 1.0 + _EPS:
                    out.append(ConceptEdit(k, "gain", gamma, (gamma - 1.0) * float(amp[k]), c))
        return out

    def _objective(self, logits: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``(M, 2)`` balanced accuracy and class-balanced mean log-probability of the true class, for ``(M, n, C)``
        candidate logits."""
        pred = logits.argmax(2)
        lp = logits - logits.max(2, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(2, keepdims=True))
        lpy = lp[:, np.arange(len(y)), y]
        classes = np.unique(y)
        acc = np.mean([(pred[:, y == c] == c).mean(1) for c in classes], axis=0)
        ll = np.mean([lpy[:, y == c].mean(1) for c in classes], axis=0)
        return np.stack([acc, ll], 1)

    def _path(
        self, S: np.ndarray, y: np.ndarray, C: int, K: int
    ) -> tuple[list[ConceptEdit], list[tuple[ConceptEdit, str]]]:
        """Greedy forward selection on ``S``: up to ``max_edits`` edits, each the best on the support objective
        among those the source guard admits (one edit per concept)."""
        cands = self._candidates(S, y, C, K)
        logits = S @ self._W.T + self._b
        current = self._objective(logits[None], y)[0]
        guard_logits = self._guard_ctx[2]
        path: list[ConceptEdit] = []
        rejected: dict[tuple[int, str, float], tuple[ConceptEdit, str]] = {}
        used: set[int] = set()
        for _ in range(self.max_edits):
            pool = [e for e in cands if e.index not in used]
            if not pool:
                break
            idx = np.array([e.index for e in pool])
            new = np.stack([self._edit_column(S[:, e.index], e) for e in pool])  # (M, n)
            trial = logits[None] + (new - S[:, idx].T)[:, :, None] * self._W[:, idx].T[:, None, :]
            obj = self._objective(trial, y)
            # an attenuation (a partial mask) is taken only where it does strictly better than the full edits
            order = sorted(
                range(len(pool)),
                key=lambda j: (
                    -round(obj[j, 0], 9),
                    pool[j].op == "gain" and pool[j].value < 1,
                    -obj[j, 1],
                    pool[j].index,
                ),
            )
            taken = None
            for j in order:
                if not _improves(obj[j], current):
                    break
                admitted, reason, g_new = self._guard_one(pool[j], guard_logits)
                if admitted is None:
                    rejected.setdefault((pool[j].index, pool[j].op, pool[j].value), (pool[j], reason))
                    continue
                after = self._with_edit(logits, S, admitted)
                if admitted.value != pool[j].value and not _improves(self._objective(after[None], y)[0], current):
                    continue  # cut down by the guard, it no longer helps the support
                taken = (admitted, g_new, after)
                break
            if taken is None:
                break
            e, guard_logits, logits = taken
            current = self._objective(logits[None], y)[0]
            path.append(e)
            used.add(e.index)
        return path, list(rejected.values())

    def _edit_column(self, col: np.ndarray, e: ConceptEdit) -> np.ndarray:
        """Concept ``e.index``'s scores ``col`` after the edit ``e`` (the one definition of what an edit does)."""
        return np.full_like(col, self._neutral[e.index]) if e.op == "mask" else col * e.value

    def _with_edit(self, logits: np.ndarray, scores: np.ndarray, e: ConceptEdit) -> np.ndarray:
        """``logits`` of the rows ``scores`` with the edit ``e`` added (exact: the head is linear)."""
        col = scores[:, e.index]
        return logits + np.outer(self._edit_column(col, e) - col, self._W[:, e.index])

    def _apply_row(self, a: np.ndarray, edits: list[ConceptEdit]) -> np.ndarray:
        a = a.copy()
        for e in edits:
            a[e.index] = self._edit_column(a[e.index : e.index + 1], e)[0]
        return a

    def _guard_one(self, e: ConceptEdit, logits: np.ndarray) -> tuple[ConceptEdit | None, str, np.ndarray]:
        """The source guard for one more edit on top of the guard-set ``logits`` of the edits kept so far.

        Losses are counted, not the net accuracy change: images an edit happens to fix cannot hide images it
        breaks (a net check let edits through that lost several points on held-out source data while the
        reference accuracy stayed level). A refused amplification is retried with a smaller step.

        Returns:
            the admitted edit (possibly with a smaller gain) or ``None``, the refusal reason, the new logits.
        """
        G, target, logits0, allowed = self._guard_ctx
        was_correct = logits0.argmax(1) == target
        tries = [1.0 + f * (e.value - 1.0) for f in _GAIN_BACKOFF] if e.op == "gain" and e.value > 1 else [e.value]
        lost_first = None
        for value in tries:
            trial_edit = (
                e
                if value == e.value
                else replace(
                    e, value=value, reduced_from=e.value, margin_gain=e.margin_gain * (value - 1) / (e.value - 1)
                )
            )
            trial = self._with_edit(logits, G, trial_edit)
            lost = int((was_correct & (trial.argmax(1) != target)).sum())
            lost_first = lost if lost_first is None else lost_first
            if lost <= allowed:
                return trial_edit, "", trial
        what = e.op + (f" x{e.value:.3g}" if e.op == "gain" else "")
        if len(tries) > 1:
            what += f" (also at x{tries[-1]:.3g})"
        return (
            None,
            f"source guard: this {what} would turn {lost_first} of {len(G)} source reference images wrong or change "
            f"their prediction (at most {allowed} allowed: {100 * self.guard_tolerance:.1f} points at 95% "
            "confidence)",
            logits,
        )

    def _effect(self, e: ConceptEdit, S: np.ndarray, y: np.ndarray) -> tuple[str, int]:
        """This edit alone on the support images: a phrase (mean margin change, images fixed/broken) and the wrong
        class whose lead over the true class it cuts most often (-1 if none)."""
        k = e.index
        new = self._edit_column(S[:, k], e)
        z0 = S @ self._W.T + self._b
        z1 = self._with_edit(z0, S, e)

        def margin(z: np.ndarray) -> np.ndarray:
            zw = z.copy()
            zw[np.arange(len(y)), y] = -np.inf
            return z[np.arange(len(y)), y] - zw.max(1)

        fixed = int(((z0.argmax(1) != y) & (z1.argmax(1) == y)).sum())
        broken = int(((z0.argmax(1) == y) & (z1.argmax(1) != y)).sum())
        d = (new - S[:, k])[:, None] * (self._W[:, k][None, :] - self._W[y, k][:, None])  # (n, C) wrong-class lead
        d[np.arange(len(y)), y] = np.inf
        cut = d.min(1) < -_EPS
        toward = int(np.bincount(d.argmin(1)[cut], minlength=len(self.class_names_)).argmax()) if cut.any() else -1
        change = float((margin(z1) - margin(z0)).mean())
        phrase = (
            f"on the support images alone it changes the true-class margin by {change:+.3g} logits on average, "
            f"fixing {fixed} and breaking {broken}"
        )
        return phrase, toward

    def _reason(self, e: ConceptEdit, S: np.ndarray, y: np.ndarray) -> str:
        cid, k = self.concept_ids_[e.index], e.index
        effect, toward = self._effect(e, S, y)
        if e.op == "mask" or e.value < 1:
            ms = float(np.mean(self._mus[y, k]))
            mt = float(S[:, k].mean())
            what = (
                f"masked (set to its source mean {self._neutral[k]:.3g})"
                if e.op == "mask"
                else f"attenuated x{e.value:.3g} (a partial mask: it still separates classes here, at a lower level)"
            )
            push = f" and pushes support images toward '{self.class_names_[toward]}'" if toward >= 0 else ""
            return (
                f"{what}: '{cid}' is mis-activated at this site (support mean {mt:.3g} vs {ms:.3g} at the source for "
                f"the same classes){push}; {effect}"
            )
        c = e.target_class
        mt = float(S[y == c, k].mean())
        cut = f" (cut from x{e.reduced_from:.3g} by the source guard)" if e.reduced_from is not None else ""
        return (
            f"amplified x{e.value:.3g}{cut}: '{cid}' is evidence for '{self.class_names_[c]}' but under-activated at "
            f"this site ('{self.class_names_[c]}' support mean {mt:.3g} vs {self._mus[c, k]:.3g} at the source); "
            f"{effect}"
        )

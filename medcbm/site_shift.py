# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Site-shift alarm: how unlike the bundle's source images an input is, from its image features.

The score is the distance from the (L2-normalised) feature to its ``k``-th nearest neighbour among the
source reference features (Sun et al., "Out-of-distribution detection with deep nearest neighbors",
ICML 2022), measured after whitening with the reference set's Ledoit-Wolf covariance: a site-specific
backbone maps blank or foreign images into directions its source images barely use, which plain cosine
distance underrates (a black image sat closer to the blood reference than a typical BCCD cell) and
whitening exposes. The flag threshold is a high quantile (default 0.95) of the reference images' own
cross-fitted scores, so about 5% of source-like images are flagged by design. A folder where far more
are flagged looks unlike the training site: :func:`summarize_shift` says so and suggests adaptation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "SiteShiftDetector",
    "ShiftSummary",
    "summarize_shift",
    "concept_shift_report",
    "looks_like_another_modality",
]

_PREFIX = "shift."


def _normalise(x: Any, name: str, l2: bool = True) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if not l2:
        return a
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(norm, 1e-12)


class SiteShiftDetector:
    """k-th nearest-neighbour out-of-distribution score against source reference features.

    Args:
        k: which neighbour's distance is the score (Sun et al. use k = 1..50; small sets want small k).
        quantile: the threshold is this quantile of the reference set's cross-fitted scores.
        whiten: measure distances after whitening with the reference's Ledoit-Wolf covariance (shrinkage
            chosen from the data, so nothing to tune); ``False`` = plain distance of normalised features.
        chunk: query rows per distance block (bounds memory at ``chunk x N`` floats).
        l2_normalise: L2-normalise rows first (image features); ``False`` for concept scores, whose size matters.

    Attributes (after :meth:`fit`): ``center_`` (D,) and ``transform_`` (D, D) (whitening; identity without),
    ``reference_`` (N, D) transformed reference features, ``reference_scores_`` (N,) cross-fitted scores,
    ``threshold_``.
    """

    def __init__(
        self, k: int = 5, quantile: float = 0.95, whiten: bool = True, chunk: int = 1024, l2_normalise: bool = True
    ):
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        if not 0.5 <= quantile < 1:
            raise ValueError(f"quantile must be in [0.5, 1), got {quantile}")
        self.k = int(k)
        self.quantile = float(quantile)
        self.whiten = bool(whiten)
        self.chunk = int(chunk)
        self.l2_normalise = bool(l2_normalise)

    #: cross-fitting folds of the reference set (each image is scored against the other folds)
    n_folds = 5

    @property
    def min_reference_size(self) -> int:
        """The fewest reference images for which every fold leaves at least ``k`` neighbours."""
        n = self.k + 1
        while n - -(-n // self.n_folds) < self.k:
            n += 1
        return n

    def fit(self, reference_features: np.ndarray | torch.Tensor) -> "SiteShiftDetector":
        """Store the reference features and set the threshold from their cross-fitted scores."""
        ref = _normalise(reference_features, "reference_features", self.l2_normalise)
        if len(ref) < self.min_reference_size:
            raise ValueError(
                f"the reference set needs at least {self.min_reference_size} images for k = {self.k}, got {len(ref)}"
            )
        self.center_, self.transform_ = self._whitening(ref)
        self.reference_ = self._project(ref)
        self.reference_scores_ = self._cross_fitted_scores(ref)
        self.threshold_ = float(np.quantile(self.reference_scores_, self.quantile))
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "reference_"):
            raise RuntimeError("this SiteShiftDetector is not fitted; call fit() or from_tensors() first")

    def _whitening(self, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        D = ref.shape[1]
        if not self.whiten:
            return np.zeros(D, np.float32), np.eye(D, dtype=np.float32)
        from sklearn.covariance import LedoitWolf

        lw = LedoitWolf().fit(ref.astype(np.float64))
        lam, U = np.linalg.eigh(lw.covariance_)
        return lw.location_.astype(np.float32), (U / np.sqrt(np.maximum(lam, 1e-12))).astype(np.float32)

    def _cross_fitted_scores(self, ref: np.ndarray) -> np.ndarray:
        """Each reference image scored by a detector fitted without it (whitening included).

        Plain leave-one-out would reuse a whitening fitted on the scored image itself, which shrinks its
        own distances and puts the threshold too low; folds keep the scored images out of both parts.
        """
        n = len(ref)
        folds = np.arange(n) % min(self.n_folds, n)  # deterministic, interleaved
        out = np.empty(n, dtype=np.float32)
        for f in np.unique(folds):
            rest = ref[folds != f]
            if len(rest) < self.k:
                raise ValueError(f"the reference set is too small for k = {self.k} with {self.n_folds} folds")
            c, T = self._whitening(rest)
            sub = SiteShiftDetector(self.k, self.quantile, self.whiten, self.chunk, self.l2_normalise)
            sub.center_, sub.transform_ = c, T
            sub.reference_ = sub._project(rest)
            out[folds == f] = sub._kth_distance(sub._project(ref[folds == f]))
        return out

    def _project(self, q: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(q - self.center_, dtype=np.float32))
        return (t @ torch.from_numpy(np.ascontiguousarray(self.transform_, dtype=np.float32))).numpy()

    def _kth_distance(self, q: np.ndarray, exclude_self: bool = False) -> np.ndarray:
        # torch, not numpy: inside the engine, OpenBLAS threads spinning after a numpy matmul starved the
        # encoder's OpenMP threads (the whole job ran 2-3x slower); torch shares one thread pool.
        ref = torch.from_numpy(np.ascontiguousarray(self.reference_)).double()
        ref_sq = (ref**2).sum(1)
        kk = self.k + (1 if exclude_self else 0)  # self, when included, is the nearest (distance 0)
        out = np.empty(len(q), dtype=np.float32)
        for s in range(0, len(q), self.chunk):
            block = torch.from_numpy(np.ascontiguousarray(q[s : s + self.chunk])).double()
            d2 = (block**2).sum(1)[:, None] + ref_sq[None, :] - 2.0 * block @ ref.T
            kth = torch.kthvalue(d2, kk, dim=1).values.clamp_min(0.0).sqrt()
            out[s : s + self.chunk] = kth.numpy()
        return out

    def score(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Distance to the k-th nearest reference feature (whitened space), ``(N,)``; larger = less source-like."""
        self._check_fitted()
        q = _normalise(features, "features", self.l2_normalise)
        if q.shape[1] != self.reference_.shape[1]:
            raise ValueError(f"features have {q.shape[1]} dimensions, the reference set {self.reference_.shape[1]}")
        return self._kth_distance(self._project(q))

    def flag(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """``True`` where the score is above the threshold."""
        return self.score(features) > self.threshold_

    # ------------------------------------------------------------------ storage (safetensors-ready)
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors (prefix ``shift.``) that :meth:`from_tensors` restores exactly."""
        self._check_fitted()
        return {
            f"{_PREFIX}reference": torch.from_numpy(np.ascontiguousarray(self.reference_)),
            f"{_PREFIX}reference_scores": torch.from_numpy(np.ascontiguousarray(self.reference_scores_)),
            f"{_PREFIX}center": torch.from_numpy(np.ascontiguousarray(self.center_)),
            f"{_PREFIX}transform": torch.from_numpy(np.ascontiguousarray(self.transform_)),
            f"{_PREFIX}params": torch.tensor(
                [self.k, self.quantile, self.threshold_, float(self.whiten)], dtype=torch.float64
            ),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "SiteShiftDetector":
        try:
            k, q, thr, wh = tensors[f"{_PREFIX}params"].tolist()
            det = cls(k=int(k), quantile=float(q), whiten=bool(wh))
            det.center_ = tensors[f"{_PREFIX}center"].float().numpy()
            det.transform_ = tensors[f"{_PREFIX}transform"].float().numpy()
            det.reference_ = tensors[f"{_PREFIX}reference"].float().numpy()
            det.reference_scores_ = tensors[f"{_PREFIX}reference_scores"].float().numpy()
        except KeyError as e:
            raise ValueError(f"site-shift tensors are missing {e.args[0]!r}") from None
        det.threshold_ = float(thr)
        return det


@dataclass
class ShiftSummary:
    """Folder-level summary of the site-shift scores."""

    n: int
    n_flagged: int
    fraction_flagged: float
    median_score: float
    reference_median_score: float
    threshold: float
    expected_fraction: float
    looks_shifted: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in asdict(self).items()}


def summarize_shift(
    scores: np.ndarray,
    detector: SiteShiftDetector,
    alarm_fraction: float = 0.25,
    adapt_hint: str = "configs/adapt.yaml",
) -> ShiftSummary:
    """Summarise a folder's scores: fraction flagged, median score vs the reference's, and a one-line verdict.

    The folder *looks shifted* when more than ``alarm_fraction`` of its images are flagged (about
    ``1 - quantile`` = 5% are flagged on source-like images by construction).
    """
    detector._check_fitted()
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    s = s[np.isfinite(s)]
    ref_med = float(np.median(detector.reference_scores_))
    expected = 1.0 - detector.quantile
    if len(s) == 0:
        return ShiftSummary(0, 0, 0.0, float("nan"), ref_med, detector.threshold_, expected, False, "no scored image")
    flagged = int((s > detector.threshold_).sum())
    frac = flagged / len(s)
    med = float(np.median(s))
    shifted = frac > alarm_fraction
    if shifted:
        msg = (
            f"this folder looks unlike the training site: {flagged} of {len(s)} images ({100 * frac:.0f}%) are "
            f"flagged (about {100 * expected:.0f}% expected on source-like images); median shift score {med:.3f} "
            f"vs {ref_med:.3f} at the source. Predictions may be unreliable; consider adapting the bundle with "
            f"{adapt_hint} (a few labelled images per class)."
        )
    else:
        msg = (
            f"{flagged} of {len(s)} images ({100 * frac:.0f}%) flagged as unlike the training site; "
            f"median shift score {med:.3f} vs {ref_med:.3f} at the source"
        )
    return ShiftSummary(len(s), flagged, frac, med, ref_med, detector.threshold_, expected, shifted, msg)


def concept_shift_report(
    reference_scores: np.ndarray, site_scores: np.ndarray, calibrated_scores: np.ndarray, k: int = 5
) -> dict[str, Any]:
    """How unlike the source the site's *concept scores* are, before and after the site calibration.

    The image-feature alarm cannot see a calibration (it acts on concept scores), so this one is the same
    k-th-neighbour score measured on concept scores: a detector fitted on the source reference set's scores scores
    the site's raw and calibrated scores. It reports a folder; it changes no prediction.
    """
    ref = np.asarray(reference_scores, dtype=np.float32)
    det = SiteShiftDetector(k=min(k, max(1, len(ref) // 5 - 1)), l2_normalise=False).fit(ref)
    before = summarize_shift(det.score(site_scores), det)
    after = summarize_shift(det.score(calibrated_scores), det)
    return {
        "space": "concept scores",
        "threshold": round(det.threshold_, 4),
        "reference_median_score": before.to_dict()["reference_median_score"],
        "before_calibration": {k: before.to_dict()[k] for k in ("n", "fraction_flagged", "median_score")},
        "after_calibration": {k: after.to_dict()[k] for k in ("n", "fraction_flagged", "median_score")},
        "message": (
            f"concept-score shift against the source reference set: {100 * before.fraction_flagged:.0f}% of images "
            f"flagged before the site calibration, {100 * after.fraction_flagged:.0f}% after (about "
            f"{100 * before.expected_fraction:.0f}% expected on source-like images); median score "
            f"{before.median_score:.3f} -> {after.median_score:.3f} vs {before.reference_median_score:.3f} "
            "at the source"
        ),
    }


def looks_like_another_modality(
    scores: np.ndarray, detector: SiteShiftDetector, min_fraction: float = 0.95, score_ratio: float = 2.0
) -> str:
    """A reason when a site sample looks like another modality to the image-feature alarm, else ``""``.

    A stain or scanner change moves images out of the source's range; another modality (or a folder of
    unrelated images) puts nearly all of them far beyond it: at least ``min_fraction`` flagged *and* a median
    score above ``score_ratio`` times the flag threshold.
    """
    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 0:
        return ""
    frac = float((s > detector.threshold_).mean())
    med = float(np.median(s))
    if frac >= min_fraction and med > score_ratio * detector.threshold_:
        return (
            f"{100 * frac:.0f}% of the site images are flagged by the site-shift alarm with a median score "
            f"{med:.3g}, over {score_ratio:g}x the threshold {detector.threshold_:.3g}: these look like another "
            "modality or unrelated images, not this bundle's kind of image"
        )
    return ""

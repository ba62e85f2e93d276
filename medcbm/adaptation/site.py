# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Fit what an unlabelled site sample can teach: concept calibration and the label-shift offset, together.

Matching each concept's site distribution to the source's would also erase a real change in class frequencies (a
site with more neutrophils has more granular cells), and a prior estimated on uncalibrated scores mistakes a stain
for a change of classes. The two are therefore fitted in turn for a few ``rounds``: calibrate against the source
reference set re-weighted to the current estimate of the site's class frequencies, estimate those frequencies by
EM on the calibrated probabilities, repeat (each step deterministic). Nothing here looks at the images that will
be predicted; the result is stored in ``adaptation.json`` and applied image by image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .calibration import ConceptCalibrator
from ..networks import HeadArrays
from .reference_scores import ReferenceScores
from .label_shift import LabelShiftEstimator

__all__ = ["SiteFit", "fit_site_adaptation"]


@dataclass
class SiteFit:
    """What :func:`fit_site_adaptation` found.

    Attributes:
        calibrator: the fitted :class:`~medcbm.adaptation.calibration.ConceptCalibrator` (``None`` when off).
        label_shift: the fitted :class:`~medcbm.adaptation.label_shift.LabelShiftEstimator` (``None`` when off).
        offset: ``(C,)`` logit offset (zeros unless the label-shift correction is applied).
        rounds: calibration / EM rounds run.
    """

    calibrator: ConceptCalibrator | None
    label_shift: LabelShiftEstimator | None
    offset: np.ndarray
    rounds: int

    def calibrate(self, scores: np.ndarray) -> np.ndarray:
        """Scores after the calibration (unchanged without one)."""
        return self.calibrator.transform(scores) if self.calibrator is not None else np.asarray(scores, np.float64)

    def calibration_dict(self) -> dict[str, Any]:
        return self.calibrator.to_dict() if self.calibrator is not None else {}

    def label_shift_dict(self) -> dict[str, Any]:
        out = self.label_shift.to_dict() if self.label_shift is not None else {}
        if out:
            out["rounds"] = self.rounds
        return out


def fit_site_adaptation(
    site_scores: np.ndarray,
    reference: ReferenceScores,
    head: HeadArrays,
    class_names: Sequence[str] | None = None,
    concept_ids: Sequence[str] | None = None,
    calibrate: bool = True,
    label_shift: bool = True,
    rounds: int = 3,
    calibrator: ConceptCalibrator | None = None,
    estimator: LabelShiftEstimator | None = None,
) -> SiteFit:
    """Calibration and label-shift correction from unedited site scores ``(n, K)`` (module docstring).

    Args:
        site_scores: unedited concept scores of the unlabelled site sample.
        reference: the source reference set (unedited scores, labels and the bundle's source training sample,
            which the calibration guard checks too).
        head: the bundle's unedited head (:meth:`medcbm.bundle.LoadedBundle.head_arrays`).
        class_names / concept_ids: for the stored tables and reasons.
        calibrate / label_shift: switch either part off (benchmarks compare them).
        rounds: most calibration / EM alternations (stops early when the class weights no longer change).
        calibrator / estimator: configured but unfitted instances (defaults otherwise).
    """
    reference.check_head(head)
    R, yr = reference.scores, reference.labels
    C = head.weight.shape[0]
    source_prior = head.probabilities(R).mean(0)
    freq = np.maximum(np.bincount(yr, minlength=C) / len(yr), 1e-12)
    class_w = np.ones(C)
    cal: ConceptCalibrator | None = None
    ls: LabelShiftEstimator | None = None
    done = 0
    for done in range(1, max(1, int(rounds)) + 1):
        if calibrate:
            cal = _clone(calibrator, ConceptCalibrator, concept_ids=concept_ids)
            cal.fit(site_scores, reference, head, reference_weights=class_w[yr])
        if not label_shift:
            break
        S = cal.transform(site_scores) if cal is not None else np.asarray(site_scores, np.float64)
        ls = _clone(estimator, LabelShiftEstimator, class_names=class_names).fit(head.logits(S), source_prior)
        new_w = ls.site_prior_ / freq if ls.applied_ else np.ones(C)
        if not calibrate or np.allclose(new_w, class_w, rtol=0, atol=1e-6):
            break
        class_w = new_w
    offset = ls.offset_ if ls is not None else np.zeros(C)
    return SiteFit(cal, ls, np.asarray(offset, np.float64), done)


def _clone(template: Any, cls: type, **names: Any) -> Any:
    """A fresh, unfitted copy of ``template``'s settings (or a default instance), with names filled in."""
    if template is None:
        return cls(**{k: v for k, v in names.items() if v is not None})
    new = cls.__new__(cls)
    new.__dict__.update({k: v for k, v in template.__dict__.items() if not k.endswith("_")})
    for k, v in names.items():
        if v is not None and getattr(new, k, None) is None:
            setattr(new, k, list(v))
    return new

# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Training-free adaptation of a bundle to a new site (site calibration, label shift, concept edit), and the
site-shift alarm (METHODS.md §2)."""

from __future__ import annotations

from .calibration import ConceptCalibrator
from .label_shift import LabelShiftEstimator, em_class_prior
from .site import SiteFit, fit_site_adaptation
from .baselines import T3A, lame_predict, linear_probe_refit, refit_head_with_prior
from .edit_search import ConceptEdit, ConceptEditSearch, edited_scores
from .shift import ShiftSummary, SiteShiftDetector, summarize_shift
from .spec import SPEC_FORMAT_VERSION, AdaptationSpec, AdaptationSpecError

__all__ = [
    "ConceptCalibrator",
    "LabelShiftEstimator",
    "em_class_prior",
    "SiteFit",
    "fit_site_adaptation",
    "AdaptationSpec",
    "AdaptationSpecError",
    "SPEC_FORMAT_VERSION",
    "ConceptEditSearch",
    "ConceptEdit",
    "edited_scores",
    "SiteShiftDetector",
    "ShiftSummary",
    "summarize_shift",
    "T3A",
    "lame_predict",
    "refit_head_with_prior",
    "linear_probe_refit",
]

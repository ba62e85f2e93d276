# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Training-free adaptation of a bundle to a new site: site calibration, label shift, the concept edit and the
adaptation file that stores them (METHODS.md §2).

The site-shift alarm that inference runs lives beside the engine (:mod:`medcbm.site_shift`); the comparators of
``benchmarks/adaptation.py`` (T3A, LAME, head re-fit, linear probe) are in :mod:`medcbm.adaptation.baselines` and
are not part of what a bundle applies.
"""

from __future__ import annotations

from .reference_scores import ReferenceScores
from .calibration import ConceptCalibrator
from .label_shift import LabelShiftEstimator, em_class_prior
from .site import SiteFit, fit_site_adaptation
from .edit_search import ConceptEdit, ConceptEditSearch, edited_scores
from .spec import SPEC_FORMAT_VERSION, AdaptationSpec, AdaptationSpecError

__all__ = [
    "ReferenceScores",
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
]

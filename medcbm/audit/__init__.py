# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Auditing concept explanations: model-level metrics, concept activation maps and the HTML report.

The audit itself is in submodules imported by name, so that importing ``medcbm.audit`` does not load the engine:
:mod:`.explain` (one image's entry and what-ifs), :mod:`.inputs` (the input's concept-label and box columns),
:mod:`.run` (:func:`~medcbm.audit.run.audit_bundle`), :mod:`.location` (concept maps against boxes).
"""

from __future__ import annotations

from .maps import MAP_METHODS, ConceptMapper, default_map_method, denormalize, overlay
from .metrics import (
    EFFECTIVE_CONCEPT_LIMIT,
    concept_auroc,
    concept_existence,
    concept_location,
    deletion,
    effective_concept_counts,
    effective_concepts,
    global_importance,
    prior_agreement,
    top_fraction_mask,
)

__all__ = [
    "MAP_METHODS",
    "ConceptMapper",
    "default_map_method",
    "denormalize",
    "overlay",
    "EFFECTIVE_CONCEPT_LIMIT",
    "concept_auroc",
    "concept_existence",
    "concept_location",
    "deletion",
    "effective_concept_counts",
    "effective_concepts",
    "global_importance",
    "prior_agreement",
    "top_fraction_mask",
]

# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Adapters from the offline shared data (``../shared/data``) to MONAI-style record lists with concept labels."""

from __future__ import annotations

from typing import Any

from .nih_cxr14 import (
    CXR_CLASSES,
    CXR_CONCEPT_IDS,
    FINDING_CONCEPT_RULES,
    NIH_FINDINGS,
    finding_concepts,
    nih_cxr14_overlap_dropped,
    nih_cxr14_256_records,
    nih_cxr14_records,
)
from .paths import SHARED_DATA_ENV, sha256_file, shared_data_root
from .pbc_wbcatt import (
    PBC_CLASSES,
    WBCATT_ATTRIBUTE_VALUES,
    WBCATT_CONCEPT_IDS,
    WBCATT_CONCEPT_RULES,
    pbc_wbcatt_records,
    wbcatt_concepts,
)

__all__ = [
    "SHARED_DATA_ENV",
    "shared_data_root",
    "sha256_file",
    "PBC_CLASSES",
    "WBCATT_ATTRIBUTE_VALUES",
    "WBCATT_CONCEPT_RULES",
    "WBCATT_CONCEPT_IDS",
    "wbcatt_concepts",
    "pbc_wbcatt_records",
    "NIH_FINDINGS",
    "CXR_CLASSES",
    "FINDING_CONCEPT_RULES",
    "CXR_CONCEPT_IDS",
    "finding_concepts",
    "nih_cxr14_records",
    "nih_cxr14_256_records",
    "nih_cxr14_overlap_dropped",
]

from .dermoscopy_features import isic2017_records  # noqa: E402

__all__ += ["isic2017_records"]

from .pneumoniamnist import pneumoniamnist_records  # noqa: E402

__all__ += ["pneumoniamnist_records"]

from .bccd_wbc import bccd_wbc_dev_records  # noqa: E402
from .isic2017_features import EXPERT_FEATURE_CONCEPTS, isic2017_expert_labels, isic2017_test_records  # noqa: E402

__all__ += ["bccd_wbc_dev_records", "EXPERT_FEATURE_CONCEPTS", "isic2017_expert_labels", "isic2017_test_records"]

_RECORDS = {
    "pbc_wbcatt": pbc_wbcatt_records,
    "nih_cxr14": nih_cxr14_records,
    "nih_cxr14_256": nih_cxr14_256_records,
    "isic2017": isic2017_records,
    "isic2017_test": isic2017_test_records,
    "pneumoniamnist": pneumoniamnist_records,
}  # bccd_wbc_dev is left out on purpose: it measures site shift and never trains or selects anything


def dataset_records(name: str, **kwargs: Any) -> list[dict]:
    """Records (``image``, ``label``, ``split``, concept columns) of a dataset staged in ``../shared/data``."""
    if name not in _RECORDS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(_RECORDS)}")
    return _RECORDS[name](**kwargs)


__all__ += ["dataset_records"]

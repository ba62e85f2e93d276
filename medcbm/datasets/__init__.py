# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Adapters from the offline shared data (``../shared/data``) to MONAI-style record lists with concept labels."""

from __future__ import annotations

from typing import Any

from . import nih_cxr14, pbc_wbcatt
from .nih_cxr14 import *  # noqa: F403  (the adapters' public names, listed once in their __all__)
from .paths import SHARED_DATA_ENV, sha256_file, shared_data_root
from .pbc_wbcatt import *  # noqa: F403

__all__ = ["SHARED_DATA_ENV", "shared_data_root", "sha256_file", *pbc_wbcatt.__all__, *nih_cxr14.__all__]

from .dermoscopy_features import isic2017_records  # noqa: E402

__all__ += ["isic2017_records"]

from .pneumoniamnist import pneumoniamnist_records  # noqa: E402

__all__ += ["pneumoniamnist_records"]

from .bccd_wbc import bccd_wbc_dev_records  # noqa: E402
from .isic2017_features import EXPERT_FEATURE_CONCEPTS, isic2017_expert_labels, isic2017_test_records  # noqa: E402

__all__ += ["bccd_wbc_dev_records", "EXPERT_FEATURE_CONCEPTS", "isic2017_expert_labels", "isic2017_test_records"]

_RECORDS = {
    "pbc_wbcatt": pbc_wbcatt.pbc_wbcatt_records,
    "nih_cxr14": nih_cxr14.nih_cxr14_records,
    "nih_cxr14_256": nih_cxr14.nih_cxr14_256_records,
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

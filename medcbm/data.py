# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Listing user inputs and generating synthetic sample inputs (compatibility module).

The code lives in :mod:`medcbm.io.inputs` (:func:`list_inputs`, :class:`InputRecord`,
:class:`InputListError`) and :mod:`medcbm.io.samples` (:func:`make_sample_inputs`,
:func:`write_synthetic_dicom`, :func:`is_sample_path`); this module re-exports them so that
``from medcbm.data import ...`` keeps working.

.. code-block:: python

    from medcbm.data import list_inputs, make_sample_inputs

    paths = make_sample_inputs("cxr", "/tmp/samples")   # PNG, DICOM (MONOCHROME1/2), NIfTI
    records = list_inputs("/tmp/samples")               # sorted InputRecord list
"""

from __future__ import annotations

from medcbm.io.inputs import InputListError, InputRecord, list_inputs
from medcbm.io.samples import SAMPLE_MODALITIES, is_sample_path, make_sample_inputs, write_synthetic_dicom

__all__ = [
    "InputRecord",
    "InputListError",
    "SAMPLE_MODALITIES",
    "list_inputs",
    "make_sample_inputs",
    "write_synthetic_dicom",
    "is_sample_path",
]

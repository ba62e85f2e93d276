# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Files in and out: image readers (MONAI ``ImageReader`` s), input listing, atomic writes, samples.

* :mod:`medcbm.io.readers`: :class:`ClinicalDicomReader` (its rules in :mod:`medcbm.io.dicom`),
  :class:`ClinicalNiftiReader`, :class:`ClinicalPILReader`, :func:`read_image`, the pixel budget (override
  ``medcbm.io.readers.MAX_IMAGE_SIDE`` / ``MAX_IMAGE_PIXELS``).
* :mod:`medcbm.io.files`: supported suffixes; regular-file checks that never block.
* :mod:`medcbm.io.inputs`: :func:`list_inputs` -> :class:`InputRecord` rows.
* :mod:`medcbm.io.atomic`: :func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`.
* :mod:`medcbm.io.samples`: synthetic sample images and DICOM files.
* :mod:`medcbm.io.errors`: :class:`ImageReadError` (and :func:`find_read_error` behind MONAI's wrapping).
"""

from __future__ import annotations

from medcbm.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from medcbm.io.errors import FileReasonError, ImageReadError, find_read_error
from medcbm.io.files import SUPPORTED_SUFFIXES, check_image_file, supported_suffix
from medcbm.io.inputs import InputListError, InputRecord, list_inputs
from medcbm.io.readers import (
    READER_VERSION,
    ClinicalDicomReader,
    ClinicalImageReader,
    ClinicalNiftiReader,
    ClinicalPILReader,
    check_pixel_budget,
    read_image,
    reader_for,
)

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "FileReasonError",
    "ImageReadError",
    "find_read_error",
    "SUPPORTED_SUFFIXES",
    "check_image_file",
    "supported_suffix",
    "InputListError",
    "InputRecord",
    "list_inputs",
    "READER_VERSION",
    "ClinicalDicomReader",
    "ClinicalImageReader",
    "ClinicalNiftiReader",
    "ClinicalPILReader",
    "check_pixel_budget",
    "read_image",
    "reader_for",
]

# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Training-free adaptation of a bundle to a new site, and the site-shift alarm (METHODS.md §2)."""

from __future__ import annotations

from .spec import SPEC_FORMAT_VERSION, AdaptationSpec, AdaptationSpecError

__all__ = ["AdaptationSpec", "AdaptationSpecError", "SPEC_FORMAT_VERSION"]

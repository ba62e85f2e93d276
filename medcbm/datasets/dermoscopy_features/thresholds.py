# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Concept thresholds fitted on training measurements, and the binary concept labels they give.

:func:`fit_abcd_thresholds` takes a percentile of each measure over the *training* images only;
:func:`abcd_concept_labels` turns one image's measures into labels of :data:`~.constants.MEASURED_CONCEPTS`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from .constants import COLOUR_PRESENCE_FRACTION, DEFAULT_PERCENTILES, MEASURED_CONCEPTS

__all__ = ["abcd_concept_labels", "fit_abcd_thresholds"]


def fit_abcd_thresholds(
    measures: Sequence[Mapping[str, Any]],
    percentiles: Mapping[str, float] | None = None,
    min_colour_fraction: float = COLOUR_PRESENCE_FRACTION,
) -> dict[str, float]:
    """Fit the concept thresholds on *training* measurements (never on validation or test data).

    Each measure in ``percentiles`` (default :data:`DEFAULT_PERCENTILES`) gets the given percentile of
    its training distribution; colour fractions (``frac_*``, including ``frac_blue_white_veil``) never
    go below ``min_colour_fraction`` (a colour must cover a visible part of the lesion). Count-like
    measures with many zeros (``dots_irregularity`` is 0 with fewer than 3 dots) can get a threshold of
    0, which then means "any". ``colour_count`` is fixed at 2.5 by definition: the ABCD rule's
    "multiple colours" means three or more of the six colours. Images whose segmentation failed are
    left out of the fit when any succeeded.

    Args:
        measures: dicts from :func:`measure_abcd` for the training images.
        percentiles: measure name -> percentile in [0, 100]; merged over the defaults.
        min_colour_fraction: floor for ``frac_*`` thresholds.

    Returns:
        measure name -> threshold; a measure strictly above its threshold is a positive concept.
    """
    pct = dict(DEFAULT_PERCENTILES)
    if percentiles:
        pct.update(percentiles)
    rows = [m for m in measures if bool(m.get("segmentation_ok", True))] or list(measures)
    if not rows:
        raise ValueError("fit_abcd_thresholds needs at least one training measurement")
    thresholds: dict[str, float] = {"colour_count": 2.5}
    for key, q in pct.items():
        values = np.array([float(m[key]) for m in rows if _finite(m.get(key))], dtype=np.float64)
        if not values.size:
            raise ValueError(f"no finite values of {key!r} to fit a threshold on")
        thr = float(np.percentile(values, q))
        if key.startswith("frac_"):
            thr = max(thr, float(min_colour_fraction))
        thresholds[key] = thr
    return thresholds


def abcd_concept_labels(
    measures: Mapping[str, Any],
    thresholds: Mapping[str, float],
    unknown_if_failed: bool = True,
) -> dict[str, float]:
    """Binary labels (1.0 / 0.0) of the measured concepts of :data:`MEASURED_CONCEPTS`.

    Args:
        measures: a dict from :func:`measure_abcd` (or a cached row of it).
        thresholds: from :func:`fit_abcd_thresholds`; a measure strictly above its threshold is positive.
        unknown_if_failed: when the segmentation failed (``segmentation_ok`` false), return NaN
            ("unknown") for every concept instead of labels measured on the fallback ellipse.

    Returns:
        concept id -> 1.0, 0.0 or NaN.
    """
    failed = not _truthy(measures.get("segmentation_ok", True))
    out: dict[str, float] = {}
    for cid, key in MEASURED_CONCEPTS.items():
        if key not in thresholds:
            raise KeyError(f"no threshold for {key!r} (concept {cid!r}); fit with fit_abcd_thresholds")
        value = measures.get(key)
        if key == "frac_dark_brown_or_black" and value is None:
            value = float(measures["frac_dark_brown"]) + float(measures["frac_black"])
        if (failed and unknown_if_failed) or not _finite(value):
            out[cid] = float("nan")
        else:
            out[cid] = 1.0 if float(value) > float(thresholds[key]) else 0.0
    return out


def _finite(value: Any) -> bool:
    """Whether ``value`` converts to a finite float (``None``, NaN, infinity and text like ``""`` do not)."""
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _truthy(value: Any) -> bool:
    """``value`` as a bool; a string (from the CSV cache) is true when ``"1"``, ``"true"`` or ``"yes"``, any case."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)

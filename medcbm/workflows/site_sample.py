# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The unlabelled site sample of ``configs/adapt.yaml --site_images``: listed, checked and encoded.

Checked before anything is fitted, each problem ending the job with one line that names the folder or CSV and the
files: too few images (``min_images``, 30 by default), the same file or the same content twice, unreadable files,
blank, noise-like or wrong-colour images (the engine's image checks), and a sample the site-shift alarm places far
outside the bundle's modality. Labels in a site CSV are not expected: they are ignored with a warning (labelled
images belong in ``--support``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..site_shift import looks_like_another_modality
from ..data import InputRecord, list_inputs
from ..engine import PredictionEngine
from ..errors import MedcbmUserError, listing
from ..io.errors import FileReasonError

__all__ = ["SiteSample", "SiteSampleError", "read_site_sample", "encode_site_sample", "MIN_SITE_IMAGES"]

logger = logging.getLogger(__name__)
MIN_SITE_IMAGES = 30


class SiteSampleError(MedcbmUserError, ValueError):
    """The site sample cannot be used; the message names the folder or CSV and the reason."""


@dataclass
class SiteSample:
    """The listed site images.

    Attributes:
        source: the folder or CSV as given; records: its images in a stable order; warnings: for the file.
        features: ``(n, D)`` after :func:`encode_site_sample`; content_sha256: one per record;
        alarm_flagged: how many the image-feature alarm flags (``None`` without a reference set).
    """

    source: str
    records: list[InputRecord]
    warnings: list[str] = field(default_factory=list)
    features: np.ndarray | None = None
    content_sha256: list[str] = field(default_factory=list)
    alarm_flagged: int | None = None

    def provenance(self) -> dict[str, Any]:
        """Name, size and one order-free hash of the sample's contents (not every image: samples are large)."""
        h = hashlib.sha256("\n".join(sorted(self.content_sha256)).encode()).hexdigest()
        return {"site_sample": Path(self.source).name, "n_site_images": len(self.records), "site_images_sha256": h}


def read_site_sample(site: str | Path, min_images: int = MIN_SITE_IMAGES) -> SiteSample:
    """List and check a site folder or CSV before any image is read.

    Raises:
        SiteSampleError: not listable, fewer than ``min_images`` images, or the same file listed twice.
    """
    given = str(site)
    try:
        records = list_inputs(given)
    except FileReasonError as e:
        raise SiteSampleError(f"{given}: {e.reason}") from None
    warnings = []
    labelled = [r for r in records if r.label]
    if labelled:
        warnings.append(
            f"{given}: {len(labelled)} site images carry a label; labels are not used from the site sample (it is "
            "unlabelled by design) and were ignored; give labelled images with --support"
        )
        for w in warnings:
            logger.warning("%s", w)
    seen: dict[str, str] = {}
    dupes = []
    for r in records:
        key = str(r.path)
        if key in seen:
            dupes.append(r.image)
        seen.setdefault(key, r.image)
    if dupes:
        raise SiteSampleError(f"{given}: the same image is listed more than once: {listing(dupes)}")
    if len(records) < min_images:
        raise SiteSampleError(
            f"{given}: {len(records)} site images, at least {min_images} needed to estimate the site's concept "
            "distributions (lower with --min_site_images at your own risk)"
        )
    return SiteSample(given, records, warnings)


def encode_site_sample(sample: SiteSample, engine: PredictionEngine, alarm_ratio: float = 2.0) -> SiteSample:
    """Features of every site image, in listing order; one line naming the files on any bad image.

    Raises:
        SiteSampleError: unreadable files, blank / noise-like / wrong-colour images, identical contents, or a
            sample the image-feature alarm places beyond ``alarm_ratio`` times its threshold (another modality).
    """
    feats: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    quality: dict[int, str] = {}
    hashes: dict[int, str] = {}
    for ok, f, res in engine.iter_features(sample.records):
        errors.update(res.errors)
        quality.update(res.quality)
        hashes.update(res.sha256)
        if f is not None:
            feats.update({i: row for i, row in zip(ok, f.cpu().numpy())})
    n, src = len(sample.records), sample.source
    if errors:
        reasons = [errors[i] for i in sorted(errors)]
        raise SiteSampleError(f"{src}: {len(reasons)} of {n} site images cannot be read: {listing(reasons)}")
    if quality:
        bad = [f"{sample.records[i].image} ({quality[i]})" for i in sorted(quality)]
        raise SiteSampleError(f"{src}: {len(bad)} of {n} site images are unusable: {listing(bad)}; remove them")
    first: dict[str, str] = {}
    same = []
    for i, rec in enumerate(sample.records):
        h = hashes[i]
        if h in first:
            same.append(f"{rec.image} (identical content to {first[h]})")
        first.setdefault(h, rec.image)
    if same:
        raise SiteSampleError(f"{src}: the same image is listed more than once: {listing(same)}")
    sample.features = np.stack([feats[i] for i in range(n)])
    sample.content_sha256 = [hashes[i] for i in range(n)]
    det = engine.shift_detector
    if det is not None:
        scores = det.score(sample.features)
        sample.alarm_flagged = int((scores > det.threshold_).sum())
        why = looks_like_another_modality(scores, det, score_ratio=alarm_ratio)
        if why:
            raise SiteSampleError(f"{src}: {why}")
    return sample

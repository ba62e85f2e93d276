# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Feature cache: image embeddings computed once per (backbone, preprocessing, file content).

Entries are safetensors files (no pickle) under ``<root>/<namespace>/<aa>/<sha256>.safetensors``,
where ``namespace`` hashes the backbone fingerprint and the preprocessing fingerprint and
``sha256`` is the image file's content hash. A changed file, backbone or preprocessing therefore
maps to another key, and each entry also records both fingerprints, which are checked on read:
a stale or corrupt entry is never served (it counts as a miss and is rewritten).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from .io.atomic import atomic_write_bytes


__all__ = ["FeatureCache", "ExtractionResult", "default_cache_dir"]

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$MEDCBM_CACHE`` or ``~/.cache/medcbm/features``."""
    return Path(os.environ.get("MEDCBM_CACHE", Path.home() / ".cache" / "medcbm")) / "features"


class FeatureCache:
    """On-disk cache of image features for one backbone and one preprocessing.

    Args:
        root: cache folder (created on first write).
        backbone_fingerprint: from :func:`medcbm.backbones.backbone_fingerprint`.
        preprocessing_fingerprint: from the image pipeline's ``fingerprint()``.
    """

    def __init__(self, root: str | Path, backbone_fingerprint: str, preprocessing_fingerprint: str):
        self.root = Path(root)
        self.backbone_fingerprint = backbone_fingerprint
        self.preprocessing_fingerprint = preprocessing_fingerprint
        ns = hashlib.sha256(f"{backbone_fingerprint}|{preprocessing_fingerprint}".encode()).hexdigest()[:20]
        self.namespace = self.root / ns
        self.hits = 0
        self.misses = 0

    def _path(self, content_sha256: str) -> Path:
        return self.namespace / content_sha256[:2] / f"{content_sha256}.safetensors"

    def get(self, content_sha256: str) -> torch.Tensor | None:
        path = self._path(content_sha256)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                fresh = (
                    meta.get("backbone") == self.backbone_fingerprint
                    and meta.get("preprocessing") == self.preprocessing_fingerprint
                    and meta.get("content") == content_sha256
                )
                feature = f.get_tensor("feature") if fresh else None
        except Exception as e:  # a torn or foreign file: recompute, never serve it
            logger.warning("ignoring unreadable feature cache entry %s (%s)", path, e)
            feature = None
        if feature is None:
            self.misses += 1
            return None
        self.hits += 1
        return feature

    def put(self, content_sha256: str, feature: torch.Tensor) -> None:
        path = self._path(content_sha256)
        meta = {
            "backbone": self.backbone_fingerprint,
            "preprocessing": self.preprocessing_fingerprint,
            "content": content_sha256,
        }
        data = save_safetensors({"feature": feature.detach().float().cpu().contiguous()}, metadata=meta)
        atomic_write_bytes(path, data, durable=False)  # a cache entry: rebuilt if a power cut loses it


@dataclass
class ExtractionResult:
    """Features for the files that could be read, and a reason for each that could not."""

    features: np.ndarray  # (N, D), rows in the order of ``ok``
    ok: list[int]  # input indices with a feature
    errors: dict[int, str] = field(default_factory=dict)  # input index -> reason
    content_sha256: dict[int, str] = field(default_factory=dict)

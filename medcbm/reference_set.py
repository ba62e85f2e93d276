# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The source reference set a bundle ships instead of images (``models/reference.safetensors``): held-out source
validation features, unedited concept scores and labels, a sample of training features and the fitted site-shift
alarm. The adaptation's source guard, the alarm and the audit read it; ``train.yaml`` writes it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from .errors import BundleLoadError
from .io.atomic import atomic_write_bytes
from .networks import ConceptBottleneckClassifier

__all__ = ["SourceReference", "REFERENCE_FILE", "REFERENCE_FORMAT_VERSION"]

REFERENCE_FILE = "reference.safetensors"
REFERENCE_FORMAT_VERSION = "1"


@dataclass
class SourceReference:
    """Held-out source-site data a bundle carries instead of images.

    Attributes:
        features: ``(N, D)`` encoder features of the source validation split.
        scores: ``(N, K)`` unedited concept scores of the same images.
        labels: ``(N,)`` class indices.
        train_features: ``(M, D)`` a sample of source training features (the site-shift alarm's reference).
        split: a description of where the images came from.
        concept_ids, class_names: the order of ``scores`` columns and label values.
        backbone_fingerprint, preprocessing_fingerprint: what produced the features.
    """

    features: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    train_features: np.ndarray
    split: str
    concept_ids: list[str]
    class_names: list[str]
    backbone_fingerprint: str = ""
    preprocessing_fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    shift_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # the fitted site-shift detector

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.features.shape[0] != n or self.scores.shape[0] != n:
            raise ValueError(
                f"reference set: {self.features.shape[0]} feature rows, {self.scores.shape[0]} score rows and "
                f"{n} labels must agree"
            )
        if self.scores.ndim != 2 or self.scores.shape[1] != len(self.concept_ids):
            raise ValueError(f"reference set: scores {self.scores.shape} do not match {len(self.concept_ids)} concepts")

    def accuracy(self, network: ConceptBottleneckClassifier) -> float:
        """Accuracy of ``network``'s head (with its current edit) on the reference scores."""
        device = network.head.weight.device
        with torch.no_grad():
            s = torch.as_tensor(self.scores, dtype=torch.float32, device=device)
            pred = network.logits_from_scores(network.apply_edit(s)).argmax(1).cpu().numpy()
        return float((pred == self.labels).mean()) if len(self.labels) else float("nan")

    def unlabelled_scores(self, network: ConceptBottleneckClassifier) -> np.ndarray:
        """Unedited concept scores ``(M, K)`` of the training-feature sample (float64; no labels are stored):
        the source guard checks that an edit leaves their predictions alone."""
        if len(self.train_features) == 0:
            return np.zeros((0, len(self.concept_ids)))
        device = network.head.weight.device
        with torch.no_grad():
            f = torch.as_tensor(np.asarray(self.train_features), dtype=torch.float32, device=device)
            return network.concept_scores_from_features(f, edited=False).double().cpu().numpy()

    def save(self, path: str | Path) -> Path:
        """Write atomically to a safetensors file (no pickle)."""
        path = Path(path)
        tensors = {
            "val.features": torch.as_tensor(self.features, dtype=torch.float16).contiguous(),
            "val.scores": torch.as_tensor(self.scores, dtype=torch.float32).contiguous(),
            "val.labels": torch.as_tensor(self.labels, dtype=torch.int64).contiguous(),
            "train.features": torch.as_tensor(self.train_features, dtype=torch.float16).contiguous(),
            **{k: v.contiguous() for k, v in self.shift_tensors.items()},
        }
        meta = {
            "format_version": REFERENCE_FORMAT_VERSION,
            "split": self.split,
            "concept_ids": self.concept_ids,
            "class_names": self.class_names,
            "backbone_fingerprint": self.backbone_fingerprint,
            "preprocessing_fingerprint": self.preprocessing_fingerprint,
            "extra": self.extra,
        }
        return atomic_write_bytes(path, save_safetensors(tensors, metadata={"medcbm_reference": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | Path) -> "SourceReference":
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("medcbm_reference")
                if raw is None:
                    raise BundleLoadError(f"{path}: not a medcbm reference set (no 'medcbm_reference' metadata)")
                t = {k: f.get_tensor(k) for k in f.keys()}
        except BundleLoadError:
            raise
        except Exception as e:
            raise BundleLoadError(f"{path}: cannot read the reference set ({type(e).__name__}: {e})") from e
        meta = json.loads(raw)
        if meta.get("format_version") != REFERENCE_FORMAT_VERSION:
            raise BundleLoadError(
                f"{path}: reference format {meta.get('format_version')!r}, this medcbm reads "
                f"{REFERENCE_FORMAT_VERSION!r}; re-fit with configs/train.yaml"
            )
        return cls(
            features=t["val.features"].float().numpy(),
            scores=t["val.scores"].float().numpy(),
            labels=t["val.labels"].numpy(),
            train_features=t["train.features"].float().numpy(),
            split=meta.get("split", ""),
            concept_ids=list(meta["concept_ids"]),
            class_names=list(meta["class_names"]),
            backbone_fingerprint=meta.get("backbone_fingerprint", ""),
            preprocessing_fingerprint=meta.get("preprocessing_fingerprint", ""),
            extra=meta.get("extra", {}),
            shift_tensors={k: v for k, v in t.items() if k.startswith("shift.")},
        )

    def site_shift_detector(self) -> Any:
        """The fitted :class:`~medcbm.site_shift.SiteShiftDetector` stored with this set (fitted on the
        training features when the file predates it), or ``None`` without training features."""
        from .site_shift import SiteShiftDetector

        if self.shift_tensors:
            return SiteShiftDetector.from_tensors(self.shift_tensors)
        if self.train_features is None or len(self.train_features) == 0:
            return None
        return SiteShiftDetector().fit(self.train_features)

# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Load and save a bundle's concept bottleneck network (``models/backbone`` + ``models/cbm.safetensors``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backbones import Backbone
from ..bundle import BACKBONE_DIR, CBM_FILE, LoadedBundle, Preprocessing
from ..fitting import FittedCBM
from ..networks import ConceptBottleneckClassifier, save_cbm_state

__all__ = ["load_bundle_network", "save_bundle_network", "default_backbone_spec", "CBM_FILE", "BACKBONE_DIR"]

logger = logging.getLogger(__name__)


def default_backbone_spec(models_dir: str | Path) -> str:
    return f"local-dir:{Path(models_dir) / BACKBONE_DIR}"


def load_bundle_network(
    models_dir: str | Path,
    concepts_file: str | Path,
    backbone: str | None = None,
    pretrained: str | None = None,
    channel_mode: str | None = None,
    adaptation: str | Path | None = None,
) -> ConceptBottleneckClassifier:
    """The network of a models folder (see :meth:`medcbm.bundle.LoadedBundle.load` for the whole bundle:
    preprocessing, concept bank, reference set)."""
    models_dir = Path(models_dir)
    return LoadedBundle.load(
        models_dir.parent,
        models_dir=models_dir,
        backbone=backbone,
        pretrained=pretrained,
        adaptation=adaptation,
        channel_mode=channel_mode,
        concepts_file=concepts_file,
    ).network


def save_bundle_network(
    models_dir: str | Path,
    fitted: FittedCBM,
    backbone: Backbone,
    preprocessing: Preprocessing,
    text_embeddings: torch.Tensor | None = None,
    summary: dict[str, Any] | None = None,
) -> Path:
    """Write ``models_dir/cbm.safetensors`` for ``fitted`` on ``backbone`` (whose weights are not copied)."""
    net = ConceptBottleneckClassifier.from_head(
        None, fitted.grounding, fitted.head, fitted.bank.concept_ids, fitted.bank.classes, fitted.neutral
    )
    meta = {
        "backbone_spec": backbone.spec if not backbone.spec.startswith("local-dir:") else "local-dir",
        "backbone_pretrained": backbone.pretrained,
        "backbone_fingerprint": backbone.fingerprint,
        "concept_text_fingerprint": fitted.bank.text_fingerprint(),
        "preprocessing": preprocessing.to_dict(),
        "prior_strength": fitted.head.prior_strength_,
        "dropped_concepts": fitted.dropped,
        "grounding_report": [r.to_dict() for r in fitted.report],
        "val_metrics": fitted.val_metrics,
    }
    if summary:
        meta.update(summary)
    extra = {"source_class_means": torch.as_tensor(np.asarray(fitted.source_class_means, dtype=np.float32))}
    return save_cbm_state(Path(models_dir) / CBM_FILE, net, meta, text_embeddings=text_embeddings, extra_tensors=extra)

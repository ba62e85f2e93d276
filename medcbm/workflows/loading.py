# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The train job's view of a models folder: its default backbone spec and its network (writing the fit is
:func:`medcbm.bundle.save_bundle_network`, beside the reader)."""

from __future__ import annotations

import logging
from pathlib import Path


from ..bundle import BACKBONE_DIR, CBM_FILE, LoadedBundle, save_bundle_network
from ..networks import ConceptBottleneckClassifier

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

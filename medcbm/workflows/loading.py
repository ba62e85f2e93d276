# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Load and save a bundle's concept bottleneck network (``models/backbone`` + ``models/cbm.safetensors``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backbones import Backbone, load_backbone
from ..concepts import ConceptBank, load_concept_bank
from ..fitting import FittedCBM
from ..grounding import ConceptGrounding, TextGrounding
from ..head import KnowledgePriorHead
from ..networks import ConceptBottleneckClassifier, read_cbm_state, save_cbm_state
from ..transforms import ClinicalImagePipeline

__all__ = ["load_bundle_network", "save_bundle_network", "default_backbone_spec", "CBM_FILE", "BACKBONE_DIR"]

logger = logging.getLogger(__name__)
CBM_FILE = "cbm.safetensors"
BACKBONE_DIR = "backbone"


def default_backbone_spec(models_dir: str | Path) -> str:
    return f"local-dir:{Path(models_dir) / BACKBONE_DIR}"


def _attach(net: ConceptBottleneckClassifier, backbone: Backbone, channel_mode: str, info: dict[str, Any]) -> None:
    net.backbone_spec = backbone.spec
    net.backbone_fingerprint = backbone.fingerprint
    net.channel_mode = channel_mode
    net.pipeline = ClinicalImagePipeline(channel_mode, backbone.image_size, backbone.mean, backbone.std)
    net.model_info = info


def load_bundle_network(
    models_dir: str | Path,
    concepts_file: str | Path,
    backbone: str | None = None,
    pretrained: str | None = None,
    channel_mode: str = "rgb",
    adaptation: str | Path | None = None,
) -> ConceptBottleneckClassifier:
    """Build a bundle's network for inference.

    With the bundle's own backbone (default ``local-dir:<models_dir>/backbone``) the fitted grounding and
    head in ``models/cbm.safetensors`` are used. With another backbone (e.g. ``hf-hub:yyupenn/whylesionclip``)
    the stored fit is stale: concepts are grounded zero-shot by text and the head comes from the prior
    alone, with a warning to re-fit with ``configs/train.yaml``.

    Args:
        models_dir: the bundle's ``models`` folder (or one written by ``train.yaml``).
        concepts_file: the bundle's ``concepts.yaml``.
        backbone: open_clip spec overriding the bundle's backbone.
        pretrained: open_clip pretrained tag or file, for a plain model-name backbone.
        channel_mode: ``rgb`` or ``grey`` (X-ray).
        adaptation: optional ``adaptation.json`` (mask / gain) applied as the test-time edit.

    The returned module has ``pipeline`` (path -> encoder input), ``targets``, ``concepts`` and ``model_info``.
    """
    models_dir = Path(models_dir)
    bank = load_concept_bank(concepts_file)
    cbm_path = models_dir / CBM_FILE
    state = read_cbm_state(cbm_path) if cbm_path.is_file() else None
    stored_spec = state[1].get("backbone_spec") if state else None
    if backbone:
        spec = backbone
    elif stored_spec and stored_spec != "local-dir":  # fitted on a hub backbone by train.yaml
        spec, pretrained = stored_spec, pretrained or state[1].get("backbone_pretrained")
    else:
        spec = default_backbone_spec(models_dir)
    bk = load_backbone(spec, pretrained=pretrained)
    info: dict[str, Any] = {"backbone": spec, "models_dir": str(models_dir)}
    if state is not None and state[1].get("backbone_fingerprint") == bk.fingerprint:
        tensors, meta = state
        net = _network_from_state(bk, bank, tensors, meta, cbm_path)
        info.update(
            fit="trained",
            cbm_file=str(cbm_path),
            grounding=meta["grounding_mode"],
            trained_on=meta.get("trained_on", ""),
        )
    else:
        if state is not None:
            logger.warning(
                "%s was fitted on another backbone than %s: grounding concepts zero-shot by text with a "
                "prior-only head. Re-fit on your data with configs/train.yaml for calibrated predictions.",
                cbm_path,
                spec,
            )
        net = zero_shot_network(bk, bank)
        info.update(fit="zero-shot prior head", grounding="text")
    _attach(net, bk, channel_mode, info)
    if adaptation:
        apply_adaptation(net, adaptation)
    net.eval()
    return net


def zero_shot_network(bk: Backbone, bank: ConceptBank) -> ConceptBottleneckClassifier:
    """Text grounding from the backbone's text tower and a head built from the prior alone."""
    grounding = TextGrounding(bk.encode_texts(bank.texts))
    head = KnowledgePriorHead.from_prior(bank.prior, scale=1.0)
    return ConceptBottleneckClassifier.from_head(bk.image_encoder(), grounding, head, bank.concept_ids, bank.classes)


def _network_from_state(
    bk: Backbone, bank: ConceptBank, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path
) -> ConceptBottleneckClassifier:
    ids = meta["concept_ids"]
    unknown = [c for c in ids if c not in bank.concept_ids]
    if unknown:
        raise ValueError(
            f"{path} uses concepts {unknown} that are not in the concept bank {bank.path}; re-fit the model"
        )
    if [c.lower() for c in meta["class_names"]] != [c.lower() for c in bank.classes]:
        raise ValueError(f"{path} predicts {meta['class_names']} but the concept bank has {bank.classes}")
    sub = bank.subset(ids)
    g_tensors = {k[len("grounding.") :]: v for k, v in tensors.items() if k.startswith("grounding.")}
    grounding = ConceptGrounding.from_tensors(meta["grounding_mode"], g_tensors)
    if isinstance(grounding, TextGrounding) and meta.get("concept_text_fingerprint") != sub.text_fingerprint():
        # Concept wording changed since the fit: its stored text embeddings are stale.
        logger.warning("concept texts changed since %s was fitted: recomputing their text embeddings", path)
        grounding.text_embeddings.copy_(bk.encode_texts(sub.texts))
    net = ConceptBottleneckClassifier(
        bk.image_encoder(),
        grounding,
        tensors["head.weight"],
        tensors["head.bias"],
        ids,
        bank.classes,
        tensors.get("neutral"),
    )
    if "extra.source_class_means" in tensors:
        net.register_buffer("source_class_means", tensors["extra.source_class_means"])
    return net


def apply_adaptation(net: ConceptBottleneckClassifier, path: str | Path) -> None:
    """Apply ``adaptation.json`` (``mask``: concept ids, ``gain``: concept id -> factor) as the test-time edit."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"adaptation file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    mask, gain = spec.get("mask", []), spec.get("gain", {})
    if not isinstance(mask, list) or not isinstance(gain, dict):
        raise ValueError(f"{path}: 'mask' must be a list of concept ids and 'gain' an object concept_id -> factor")
    try:
        net.set_edit(mask, {k: float(v) for k, v in gain.items()})
    except KeyError as e:
        raise ValueError(f"{path}: {e.args[0]}") from None
    net.model_info["adaptation"] = str(path)


def save_bundle_network(
    models_dir: str | Path,
    fitted: FittedCBM,
    backbone: Backbone,
    channel_mode: str,
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
        "preprocessing": {"channel_mode": channel_mode, **backbone.preprocessing()},
        "prior_strength": fitted.head.prior_strength_,
        "dropped_concepts": fitted.dropped,
        "grounding_report": [r.to_dict() for r in fitted.report],
        "val_metrics": fitted.val_metrics,
    }
    if summary:
        meta.update(summary)
    extra = {"source_class_means": torch.as_tensor(np.asarray(fitted.source_class_means, dtype=np.float32))}
    return save_cbm_state(Path(models_dir) / CBM_FILE, net, meta, text_embeddings=text_embeddings, extra_tensors=extra)

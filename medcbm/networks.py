# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The concept bottleneck network: image -> encoder -> grounding -> test-time edit -> linear head.

``forward(image)`` returns class logits as one tensor, so MONAI's ``verify_net_in_out`` and
``ckpt_export`` work. Concept scores, per-concept contributions and features are separate methods.
The fitted parts (grounding, head, concept text embeddings, source statistics) are saved in one
safetensors file with JSON metadata; the encoder weights live in an open_clip ``local-dir:`` folder.
"""

from __future__ import annotations

import json
import logging
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from .grounding import ConceptGrounding
from .head import KnowledgePriorHead
from .io.atomic import atomic_write_bytes

__all__ = [
    "ConceptBottleneckClassifier",
    "save_cbm_state",
    "read_cbm_state",
    "calibrate_scores",
    "CBM_FORMAT_VERSION",
    "HeadArrays",
    "edited_scores",
]

logger = logging.getLogger(__name__)
CBM_FORMAT_VERSION = "1"


def calibrate_scores(scores: torch.Tensor, slope: torch.Tensor, intercept: torch.Tensor, logit: bool) -> torch.Tensor:
    """The site calibration's arithmetic (the one definition): per concept ``u -> slope * u + intercept``, where ``u``
    is the score's logit (``logit=True``, scores in (0, 1), clamped to [1e-6, 1 - 1e-6]) or the score itself."""
    slope, intercept = slope.to(scores.dtype), intercept.to(scores.dtype)
    if logit:
        u = torch.logit(scores.clamp(1e-6, 1.0 - 1e-6))
        return torch.sigmoid(u * slope + intercept)
    return scores * slope + intercept


class ConceptBottleneckClassifier(torch.nn.Module):
    """Knowledge-prior concept bottleneck model.

    Args:
        encoder: module mapping images ``(B, 3, H, W)`` to L2-normalised features ``(B, D)``;
            ``None`` for a network that takes cached features (see :meth:`from_features`).
        grounding: features -> concept scores ``(B, K)``.
        head_weight: ``(C, K)`` linear head; ``head_bias``: ``(C,)``.
        concept_ids: the ``K`` concept ids; ``class_names``: the ``C`` class names.
        neutral: ``(K,)`` value a masked concept takes (its source-site mean); zeros by default.

    Attributes:
        targets: class names, in logit order (torchxrayvision naming).
        concepts: concept ids, in score order.
    """

    def __init__(
        self,
        encoder: torch.nn.Module | None,
        grounding: ConceptGrounding,
        head_weight: torch.Tensor | np.ndarray,
        head_bias: torch.Tensor | np.ndarray,
        concept_ids: Sequence[str],
        class_names: Sequence[str],
        neutral: torch.Tensor | np.ndarray | None = None,
    ):
        super().__init__()
        W = torch.as_tensor(np.asarray(head_weight), dtype=torch.float32)
        b = torch.as_tensor(np.asarray(head_bias), dtype=torch.float32)
        K = grounding.num_concepts
        if W.shape != (len(class_names), K) or b.shape != (len(class_names),):
            raise ValueError(
                f"head weight {tuple(W.shape)} / bias {tuple(b.shape)} do not match "
                f"{len(class_names)} classes x {K} concepts"
            )
        if len(concept_ids) != K:
            raise ValueError(f"{len(concept_ids)} concept ids for a grounding with {K} concepts")
        self.encoder = encoder
        self.grounding = grounding
        self.head = torch.nn.Linear(K, len(class_names))
        with torch.no_grad():
            self.head.weight.copy_(W)
            self.head.bias.copy_(b)
        self.concepts = list(concept_ids)
        self.targets = list(class_names)
        self.register_buffer("edit_mask", torch.zeros(K, dtype=torch.bool))
        self.register_buffer("edit_gain", torch.ones(K))
        neutral_t = torch.zeros(K) if neutral is None else torch.as_tensor(np.asarray(neutral), dtype=torch.float32)
        self.register_buffer("neutral", neutral_t)
        # site adaptation (adaptation.json), not part of the fit: non-persistent, so the saved state is unchanged
        self.register_buffer("calib_active", torch.zeros((), dtype=torch.bool), persistent=False)
        self.register_buffer("calib_logit", torch.zeros((), dtype=torch.bool), persistent=False)
        self.register_buffer("calib_slope", torch.ones(K), persistent=False)
        self.register_buffer("calib_intercept", torch.zeros(K), persistent=False)
        self.register_buffer("class_offset", torch.zeros(len(class_names)), persistent=False)

    # ------------------------------------------------------------------ the data path
    def features(self, image: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            raise RuntimeError("this network has no encoder; pass features to the *_from_features methods")
        return self.encoder(image)

    def concept_scores_from_features(self, features: torch.Tensor, edited: bool = True) -> torch.Tensor:
        scores = self.grounding(features)
        return self.apply_edit(scores) if edited else scores

    def calibrate(self, scores: torch.Tensor) -> torch.Tensor:
        """The site calibration on concept scores ``(B, K)``: per concept ``u -> slope * u + intercept`` where ``u``
        is the score's logit (``calib_logit``) or the score itself; the identity (scores returned untouched) unless
        an adaptation set one. Row by row: an image's result never depends on the other rows."""
        if not bool(self.calib_active):
            return scores
        return calibrate_scores(scores, self.calib_slope, self.calib_intercept, bool(self.calib_logit))

    def apply_edit(self, scores: torch.Tensor) -> torch.Tensor:
        """The test-time adaptation on concept scores ``(B, K)``: the site calibration (:meth:`calibrate`), then the
        edit: masked concepts take their neutral value, the others are scaled by their gain (identity by default)."""
        scores = self.calibrate(scores)
        return torch.where(self.edit_mask, self.neutral.to(scores.dtype), scores * self.edit_gain)

    def logits_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, C)`` of (already edited) concept scores: the head plus the label-shift offset
        (zeros unless an adaptation set one)."""
        return self.head(scores) + self.class_offset.to(scores.dtype)

    def concept_scores(self, image: torch.Tensor, edited: bool = True) -> torch.Tensor:
        """Concept scores ``(B, K)``, after the test-time edit unless ``edited=False``."""
        return self.concept_scores_from_features(self.features(image), edited)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, C)``."""
        return self.logits_from_scores(self.concept_scores(image))

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits_from_scores(self.concept_scores_from_features(features))

    def contributions_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """``(B, C, K)``: ``W[c, k] * (a_k - neutral_k)``; summed over ``k`` plus :meth:`contribution_bias`
        equals the logits exactly.

        Contributions are measured from each concept's neutral value (its mean score at the source site,
        the exact SHAP value of a linear head), so a concept at its usual level contributes nothing and a
        masked concept contributes exactly zero. Without a reference (zero-shot) ``neutral`` is 0.
        """
        return (scores - self.neutral)[:, None, :] * self.head.weight[None, :, :]

    def contribution_bias(self) -> torch.Tensor:
        """``(C,)``: ``b + W @ neutral`` (plus the label-shift offset of an adaptation), the logit of an image whose
        every concept sits at its neutral value."""
        return self.head.bias + self.head.weight @ self.neutral + self.class_offset

    def contributions(self, image: torch.Tensor) -> torch.Tensor:
        return self.contributions_from_scores(self.concept_scores(image))

    def head_arrays(self) -> "HeadArrays":
        """The head, current edit and label-shift offset as float64 numpy arrays (see :class:`HeadArrays`)."""

        def f64(x: torch.Tensor) -> np.ndarray:
            return x.detach().double().cpu().numpy()

        return HeadArrays(
            f64(self.head.weight), f64(self.head.bias), f64(self.neutral), f64(self.class_offset),
            self.edit_mask.detach().cpu().numpy().astype(bool), f64(self.edit_gain),
        )  # fmt: skip

    # ------------------------------------------------------------------ test-time edit
    def set_edit(
        self,
        mask: Sequence[str] | torch.Tensor | None = None,
        gain: dict[str, float] | torch.Tensor | None = None,
    ) -> "ConceptBottleneckClassifier":
        """Mask concepts (score -> ``neutral``) and/or scale them by a gain; by concept id or as K-vectors."""
        K = len(self.concepts)
        m = torch.zeros(K, dtype=torch.bool)
        g = torch.ones(K)
        if isinstance(mask, torch.Tensor):
            m = mask.to(torch.bool).reshape(K)
        elif mask:
            for cid in mask:
                m[self._concept_index(cid)] = True
        if isinstance(gain, torch.Tensor):
            g = gain.float().reshape(K)
        elif gain:
            for cid, factor in gain.items():
                if not np.isfinite(factor) or factor < 0:
                    raise ValueError(f"gain for concept {cid!r} must be a finite non-negative number, got {factor}")
                g[self._concept_index(cid)] = float(factor)
        self.edit_mask.copy_(m.to(self.edit_mask.device))
        self.edit_gain.copy_(g.to(self.edit_gain.device))
        return self

    def set_site_calibration(
        self,
        slope: torch.Tensor | np.ndarray | None = None,
        intercept: torch.Tensor | np.ndarray | None = None,
        logit_space: bool = True,
        class_offset: torch.Tensor | np.ndarray | None = None,
    ) -> "ConceptBottleneckClassifier":
        """Set the site calibration (per-concept ``slope`` / ``intercept`` ``(K,)``, in logit space or on the scores)
        and the label-shift ``class_offset`` ``(C,)`` added to the logits; ``None`` = identity / zeros."""
        K, C = len(self.concepts), len(self.targets)
        a = torch.ones(K) if slope is None else torch.as_tensor(np.asarray(slope), dtype=torch.float32).reshape(K)
        b = torch.zeros(K) if intercept is None else torch.as_tensor(np.asarray(intercept), dtype=torch.float32)
        o = torch.zeros(C) if class_offset is None else torch.as_tensor(np.asarray(class_offset), dtype=torch.float32)
        b, o = b.reshape(K), o.reshape(C)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all() and torch.isfinite(o).all()) or (a <= 0).any():
            raise ValueError("site calibration slopes must be finite and > 0 (monotone); intercepts and offsets finite")
        active = bool((a != 1).any() or (b != 0).any())
        self.calib_active.fill_(active)
        self.calib_logit.fill_(bool(logit_space))
        self.calib_slope.copy_(a.to(self.calib_slope.device))
        self.calib_intercept.copy_(b.to(self.calib_intercept.device))
        self.class_offset.copy_(o.to(self.class_offset.device))
        return self

    def site_adaptation_tensors(self) -> dict[str, torch.Tensor]:
        """The calibration and offset buffers when any is set (empty for the shipped network): fingerprinted with the
        fit, since they change predictions but are not part of the saved state."""
        if not bool(self.calib_active) and not bool((self.class_offset != 0).any()):
            return {}
        names = ("calib_logit", "calib_slope", "calib_intercept", "class_offset")
        return {n: getattr(self, n).detach().cpu() for n in names}

    def reset_edit(self) -> "ConceptBottleneckClassifier":
        """Remove the edit, the site calibration and the label-shift offset: the shipped network."""
        self.set_site_calibration()
        return self.set_edit(None, None)

    def _concept_index(self, cid: str) -> int:
        try:
            return self.concepts.index(cid)
        except ValueError:
            raise KeyError(f"unknown concept id {cid!r}; this model has {self.concepts}") from None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_head(
        cls,
        encoder: torch.nn.Module | None,
        grounding: ConceptGrounding,
        head: KnowledgePriorHead,
        concept_ids: Sequence[str],
        class_names: Sequence[str],
        neutral: np.ndarray | None = None,
    ) -> "ConceptBottleneckClassifier":
        return cls(encoder, grounding, head.coef_, head.intercept_, concept_ids, class_names, neutral)


def save_cbm_state(
    path: str | Path,
    network: ConceptBottleneckClassifier,
    metadata: dict[str, Any],
    text_embeddings: torch.Tensor | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the fitted parts of ``network`` (not the encoder) to a safetensors file, atomically.

    ``metadata`` must hold at least ``backbone_fingerprint``, ``concept_text_fingerprint`` and the
    preprocessing; the grounding mode, concept ids and class names are added here.
    """
    path = Path(path)
    tensors = {f"grounding.{k}": v for k, v in network.grounding.tensors().items()}
    tensors["head.weight"] = network.head.weight.detach().cpu().contiguous()
    tensors["head.bias"] = network.head.bias.detach().cpu().contiguous()
    tensors["neutral"] = network.neutral.detach().cpu().contiguous()
    if text_embeddings is not None:
        tensors["text_embeddings"] = text_embeddings.detach().float().cpu().contiguous()
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = torch.as_tensor(v).detach().float().cpu().contiguous()
    meta = dict(metadata)
    meta.update(
        format_version=CBM_FORMAT_VERSION,
        grounding_mode=network.grounding.mode,
        concept_ids=network.concepts,
        class_names=network.targets,
    )
    return atomic_write_bytes(path, save_safetensors(tensors, metadata={"medcbm": json.dumps(meta)}))


def read_cbm_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_cbm_state`: ``(tensors, metadata)``. No pickle involved."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"concept bottleneck weights not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        raw_meta = (f.metadata() or {}).get("medcbm")
        if raw_meta is None:
            raise ValueError(f"{path}: not a medcbm concept bottleneck file (no 'medcbm' metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads(raw_meta)


@dataclass(frozen=True)
class HeadArrays:
    """The network's head in numpy (float64): the one array view of its arithmetic that the edit search, the
    audit, the adaptation runner and the benchmarks compute with. It mirrors the network's torch methods exactly
    (``tests/test_model_core.py`` checks that they agree).

    Attributes:
        weight: ``(C, K)``; bias: ``(C,)``; neutral: ``(K,)`` the concepts' neutral (source mean) values;
        offset: ``(C,)`` the label-shift offset of an adaptation (zeros without one);
        mask, gain: ``(K,)`` the test-time edit (no concept masked, gains 1 without one).
    """

    weight: np.ndarray
    bias: np.ndarray
    neutral: np.ndarray
    offset: np.ndarray
    mask: np.ndarray
    gain: np.ndarray

    @classmethod
    def plain(cls, weight: Any, bias: Any, neutral: Any = None) -> "HeadArrays":
        """A head with no edit and no offset (``neutral`` zeros when not given), checked for shape and finiteness.

        Raises:
            ValueError: ``weight`` is not 2-D, or ``bias`` / ``neutral`` do not match it, or a value is not finite.
        """
        w = np.asarray(weight, dtype=np.float64)
        if w.ndim != 2:
            raise ValueError(f"head weight must be 2-D (classes, concepts), got shape {w.shape}")
        C, K = w.shape
        b = np.asarray(bias, dtype=np.float64).reshape(-1)
        n0 = np.zeros(K) if neutral is None else np.asarray(neutral, dtype=np.float64).reshape(-1)
        if b.shape != (C,) or n0.shape != (K,):
            raise ValueError(f"bias {b.shape} / neutral {n0.shape} do not match a head of shape {(C, K)}")
        if not (np.isfinite(w).all() and np.isfinite(b).all() and np.isfinite(n0).all()):
            raise ValueError("the head holds NaN or infinite values")
        return cls(w, b, n0, np.zeros(C), np.zeros(K, dtype=bool), np.ones(K))

    def with_offset(self, offset: Any) -> "HeadArrays":
        """The same head with the label-shift ``offset`` ``(C,)`` (a site fit's) in place of its own."""
        return dataclasses.replace(self, offset=np.asarray(offset, dtype=np.float64).reshape(self.bias.shape))

    @property
    def has_edit(self) -> bool:
        """Whether a concept is masked or scaled."""
        return bool(self.mask.any() or np.any(self.gain != 1.0))

    def edit(self, scores: np.ndarray) -> np.ndarray:
        """The edit on ``(N, K)`` scores: masked concepts take their neutral value, the others are scaled (a site
        calibration, when one is set, comes before it: :meth:`medcbm.adaptation.SiteFit.calibrate`)."""
        return edited_scores(np.asarray(scores, dtype=np.float64), self.mask, self.gain, self.neutral)

    def logits(self, scores: np.ndarray) -> np.ndarray:
        """``(N, C)`` logits of (already edited) scores: the head plus the offset."""
        return np.asarray(scores, dtype=np.float64) @ self.weight.T + self.bias + self.offset

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """``(N, C)`` softmax of :meth:`logits`."""
        from .metrics import softmax

        return softmax(self.logits(scores), axis=1)

    def contributions(self, scores: np.ndarray) -> np.ndarray:
        """``(N, C, K)``: ``W[c, k] * (a_k - neutral_k)``; summed over ``k`` plus :meth:`contribution_bias` they are
        the logits."""
        return (np.asarray(scores, dtype=np.float64) - self.neutral)[:, None, :] * self.weight[None]

    def contribution_bias(self) -> np.ndarray:
        """``(C,)``: the logit of an image whose every concept sits at its neutral value."""
        return self.bias + self.weight @ self.neutral + self.offset


def edited_scores(scores: np.ndarray, mask: np.ndarray, gain: np.ndarray, neutral: np.ndarray) -> np.ndarray:
    """The network's edit on numpy scores: masked concepts take ``neutral``, others are multiplied by ``gain``."""
    return np.where(mask[None, :], neutral[None, :], scores * gain[None, :])

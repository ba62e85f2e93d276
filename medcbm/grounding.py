# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Concept grounding: image features -> concept scores, in two modes behind one interface.

- :class:`TextGrounding` (``mode="text"``): zero-shot, ``scale * (cos(f, t_k) - offset_k)`` with ``t_k``
  the stored text embedding of concept ``k`` (computed once; inference needs no text tower).
- :class:`ProbeGrounding` (``mode="probe"``): one class-balanced logistic regression per concept on
  frozen, L2-normalised features (KnoBo / post-hoc CBM), Platt-calibrated on validation data; the
  score is the calibrated probability that the concept is present.

:func:`grounding_report` says, per concept, whether its grounding beats chance on labelled data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from .metrics import auroc, auroc_lower_bound

__all__ = [
    "ConceptGrounding",
    "TextGrounding",
    "ProbeGrounding",
    "ConceptGroundingReport",
    "fit_concept_probes",
    "grounding_report",
    "GROUNDING_MODES",
]

GROUNDING_MODES = ("text", "probe")


class ConceptGrounding(torch.nn.Module):
    """Maps L2-normalised image features ``(B, D)`` to concept scores ``(B, K)``."""

    mode: str = ""

    @property
    def num_concepts(self) -> int:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors that fully describe this grounding (saved with safetensors)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    @staticmethod
    def from_tensors(mode: str, tensors: dict[str, torch.Tensor]) -> "ConceptGrounding":
        if mode == "text":
            g: ConceptGrounding = TextGrounding(tensors["text_embeddings"])
        elif mode == "probe":
            g = ProbeGrounding(tensors["weight"], tensors["bias"])
        else:
            raise ValueError(f"unknown grounding mode {mode!r}; expected one of {GROUNDING_MODES}")
        g.load_state_dict(tensors)
        return g


class TextGrounding(ConceptGrounding):
    """Zero-shot grounding by scaled cosine similarity to concept text embeddings.

    Args:
        text_embeddings: ``(K, D)`` concept text embeddings (normalised here).
        scale: multiplies the cosine (CLIP's logit scale is 100).
    """

    mode = "text"

    def __init__(self, text_embeddings: torch.Tensor, scale: float = 10.0):
        super().__init__()
        emb = torch.nn.functional.normalize(torch.as_tensor(text_embeddings, dtype=torch.float32), dim=-1)
        self.register_buffer("text_embeddings", emb)
        self.register_buffer("scale", torch.full((emb.shape[0],), float(scale)))
        self.register_buffer("offset", torch.zeros(emb.shape[0]))

    @property
    def num_concepts(self) -> int:
        return int(self.text_embeddings.shape[0])

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.text_embeddings.dtype) @ self.text_embeddings.T

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * (self.cosine(features) - self.offset)

    def calibrate(self, features: torch.Tensor) -> "TextGrounding":
        """Centre and scale each concept's cosine on unlabelled reference features (no labels used).

        Raw cosines differ by a concept-specific offset, which a prior-only head would read as
        evidence; centring on the reference set's mean and dividing by its spread removes that.
        """
        cos = self.cosine(features)
        self.offset.copy_(cos.mean(0))
        self.scale.copy_(1.0 / cos.std(0).clamp_min(1e-6))
        return self


class ProbeGrounding(ConceptGrounding):
    """Per-concept linear probes with Platt calibration; scores are probabilities in [0, 1]."""

    mode = "probe"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        weight = torch.as_tensor(weight, dtype=torch.float32)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32))
        self.register_buffer("calib_scale", torch.ones(weight.shape[0]))
        self.register_buffer("calib_shift", torch.zeros(weight.shape[0]))

    @property
    def num_concepts(self) -> int:
        return int(self.weight.shape[0])

    def decision(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.weight.dtype) @ self.weight.T + self.bias

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.calib_scale * self.decision(features) + self.calib_shift)


@dataclass
class ConceptGroundingReport:
    """How well one concept is grounded on labelled data (validation split)."""

    concept_id: str
    n_positive: int
    n_negative: int
    auroc: float
    auroc_lower_bound: float
    groundable: bool
    reason: str

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("auroc", "auroc_lower_bound"):
            d[k] = None if math.isnan(d[k]) else round(d[k], 4)
        return d


def grounding_report(
    concept_ids: Sequence[str], scores: np.ndarray, labels: np.ndarray, min_examples: int = 3
) -> list[ConceptGroundingReport]:
    """Per concept: AUROC of its scores against labels (NaN = unlabelled) and whether it beats chance.

    A concept is *groundable* when the one-sided 95% lower bound of its AUROC exceeds 0.5.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    out = []
    for k, cid in enumerate(concept_ids):
        known = ~np.isnan(labels[:, k])
        y, s = labels[known, k] > 0.5, scores[known, k]
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        if min(n_pos, n_neg) < min_examples:
            out.append(
                ConceptGroundingReport(
                    cid,
                    n_pos,
                    n_neg,
                    float("nan"),
                    float("nan"),
                    False,
                    f"too few labelled examples (positive {n_pos}, negative {n_neg})",
                )
            )
            continue
        a, lb = auroc(y, s), auroc_lower_bound(y, s)
        ok = lb > 0.5
        reason = "better than chance" if ok else f"not better than chance (AUROC {a:.3f}, lower bound {lb:.3f})"
        out.append(ConceptGroundingReport(cid, n_pos, n_neg, a, lb, ok, reason))
    return out


def _balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    known = ~torch.isnan(labels)
    y = torch.nan_to_num(labels, nan=0.0)
    pos = (known & (y > 0.5)).double()
    neg = (known & (y <= 0.5)).double()
    n_pos, n_neg = pos.sum(0).clamp_min(1), neg.sum(0).clamp_min(1)
    return 0.5 * pos / n_pos + 0.5 * neg / n_neg


def _lbfgs(params: list[torch.Tensor], closure_loss, max_iter: int) -> None:
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = closure_loss()
        loss.backward()
        return loss

    opt.step(closure)


def fit_concept_probes(
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    val_features: np.ndarray | torch.Tensor,
    val_labels: np.ndarray,
    l2_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
    max_iter: int = 300,
) -> ProbeGrounding:
    """Fit one balanced, L2-regularised logistic probe per concept; select L2 and calibrate on validation.

    Args:
        features: ``(N, D)`` L2-normalised training features.
        labels: ``(N, K)`` concept labels in {0, 1}; NaN where a concept is not annotated.
        val_features, val_labels: the validation split, used to pick the L2 strength per concept
            (by AUROC) and to fit Platt calibration; never the test split.
        l2_grid: candidate L2 strengths (penalty ``l2 * ||w||^2``).

    Concepts with too few labels keep a zero probe (constant 0.5 score); :func:`grounding_report`
    flags them.
    """
    X = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    Xv = torch.as_tensor(np.asarray(val_features), dtype=torch.float64)
    Y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    Yv = np.asarray(val_labels, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"features {tuple(X.shape)} and labels {tuple(Y.shape)} must be (N, D) and (N, K)")
    if Xv.shape[1] != X.shape[1] or Yv.shape[1] != Y.shape[1]:
        raise ValueError("validation features/labels do not match the training shapes")
    K, D = Y.shape[1], X.shape[1]
    sample_w = _balanced_weights(Y)
    target = torch.nan_to_num(Y, nan=0.0)
    best_auc = np.full(K, -np.inf)
    best_w, best_b = torch.zeros(K, D, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
    w = torch.zeros(K, D, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    for l2 in sorted(l2_grid, reverse=True):  # warm start from strong to weak regularisation

        def loss_fn():
            z = X @ w.T + b
            bce = torch.nn.functional.binary_cross_entropy_with_logits(z, target, reduction="none")
            return (bce * sample_w).sum() + l2 * (w * w).sum()

        _lbfgs([w, b], loss_fn, max_iter)
        with torch.no_grad():
            zv = (Xv @ w.T + b).numpy()
        for k in range(K):
            known = ~np.isnan(Yv[:, k])
            a = auroc(Yv[known, k] > 0.5, zv[known, k]) if known.any() else float("nan")
            if not math.isnan(a) and a > best_auc[k] + 1e-9:
                best_auc[k] = a
                best_w[k], best_b[k] = w.detach()[k], b.detach()[k]
    for k in range(K):  # concepts without usable validation labels: take the weakest-regularised fit
        if np.isinf(best_auc[k]) and sample_w[:, k].sum() > 0:
            best_w[k], best_b[k] = w.detach()[k], b.detach()[k]
    probe = ProbeGrounding(best_w.float(), best_b.float())
    _platt_calibrate(probe, Xv, Yv)
    return probe


def _platt_calibrate(probe: ProbeGrounding, Xv: torch.Tensor, Yv: np.ndarray, max_iter: int = 100) -> None:
    z = (Xv @ probe.weight.double().T + probe.bias.double()).detach()
    known = torch.as_tensor(~np.isnan(Yv))
    y = torch.as_tensor(np.nan_to_num(Yv, nan=0.0))
    usable = (known & (y > 0.5)).sum(0).gt(0) & (known & (y <= 0.5)).sum(0).gt(0)
    a = torch.ones(z.shape[1], dtype=torch.float64, requires_grad=True)
    c = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)

    def loss_fn():
        bce = torch.nn.functional.binary_cross_entropy_with_logits(a * z + c, y, reduction="none")
        return (bce * known).sum() / known.sum().clamp_min(1) + 1e-4 * ((a - 1) ** 2).sum()

    _lbfgs([a, c], loss_fn, max_iter)
    with torch.no_grad():
        scale = torch.where(usable, a.clamp_min(1e-3), torch.ones_like(a))
        shift = torch.where(usable, c, torch.zeros_like(c))
        probe.calib_scale.copy_(scale.float())
        probe.calib_shift.copy_(shift.float())

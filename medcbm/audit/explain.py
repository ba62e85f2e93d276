# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""One image's explanation: the ``explanations.jsonl`` entry of the audit job, with its what-if scenarios.

Per image: prediction, probabilities, concept scores, every concept's contribution to every class plus the
bias (summing to the logits), the top concepts with their direction, and a what-if: a top concept switched off
(set to its neutral value), set present or absent, and the user's own intervention. What *present* and
*absent* mean per concept comes from :func:`what_if_values`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..bundle import LoadedBundle
from ..data import InputListError
from ..metrics import softmax
from ..predictions import concept_label, top_concepts
from . import metrics as M
from ..options import is_unset

__all__ = ["WHAT_IF_ACTIONS", "explain", "parse_what_if", "what_if_values"]

WHAT_IF_ACTIONS = ("off", "present", "absent")


def what_if_values(bundle: LoadedBundle) -> tuple[np.ndarray, np.ndarray, str]:
    """Per concept the score meaning *present* and *absent* (``hi``, ``lo``) and how they were chosen.

    With a source reference set: its 95th and 5th percentiles; else for probe grounding (probabilities)
    1 and 0; else the neutral value plus/minus 2 (text scores are standardised on the reference).
    """
    net = bundle.network
    neutral = net.neutral.detach().cpu().numpy().astype(np.float64)
    ref = bundle.reference
    if ref is not None and len(ref.scores):
        s = np.asarray(ref.scores, dtype=np.float64)
        return np.percentile(s, 95, axis=0), np.percentile(s, 5, axis=0), "source reference 95th / 5th percentile"
    if getattr(net.grounding, "mode", "") == "probe":
        return np.ones_like(neutral), np.zeros_like(neutral), "probability 1 / 0"
    return neutral + 2.0, neutral - 2.0, "neutral ± 2 (standardised scores)"


def parse_what_if(spec: Any, concept_ids: Sequence[str]) -> dict[int, str | float]:
    """The user's intervention as ``{concept index: off | present | absent | number}``.

    Args:
        spec: a mapping ``concept_id -> action`` or a string ``"id=action,id=action"``; empty: none.
        concept_ids: the model's concepts.

    Raises:
        InputListError: an unknown concept or action (one line naming it).
    """
    if spec == {} or is_unset(spec):
        return {}
    if isinstance(spec, str):
        try:
            spec = dict(part.split("=", 1) for part in spec.split(",") if part.strip())
        except ValueError:
            raise InputListError("what_if", f"{spec!r}: expected concept_id=off|present|absent[,...]") from None
    if not isinstance(spec, Mapping):
        raise InputListError("what_if", f"expected a mapping concept_id -> off|present|absent|number, got {spec!r}")
    out: dict[int, str | float] = {}
    for cid, action in spec.items():
        cid = str(cid).strip()
        if cid not in concept_ids:
            raise InputListError("what_if", f"unknown concept {cid!r}; this model has {list(concept_ids)}")
        a = str(action).strip().lower()
        if a in WHAT_IF_ACTIONS:
            out[list(concept_ids).index(cid)] = a
        else:
            try:
                out[list(concept_ids).index(cid)] = float(a)
            except ValueError:
                raise InputListError("what_if", f"{cid}: {action!r} is not off, present, absent or a number") from None
    return out


@dataclass(frozen=True)
class _WhatIf:
    """The head in float64 and the per-concept off / present / absent values, to replay edited scores."""

    weight: np.ndarray
    bias: np.ndarray  # the contributions' bias: logit at neutral concepts
    neutral: np.ndarray
    hi: np.ndarray
    lo: np.ndarray
    class_names: Sequence[str]

    def value(self, k: int, action: str | float) -> float:
        """The score that ``action`` sets concept ``k`` to (a number is taken as the score itself)."""
        named = {"off": self.neutral[k], "present": self.hi[k], "absent": self.lo[k]}
        return float(named.get(action, action))  # type: ignore[arg-type]

    def scenario(self, change: str, s: np.ndarray, pred: int) -> dict[str, Any]:
        """What the model predicts from the edited scores ``s``, and what becomes of the original class."""
        w = self.weight
        p = softmax(s.astype(np.float64) @ w.T.astype(np.float64) + (self.bias - w @ self.neutral))
        j = int(np.argmax(p))
        return {
            "change": change,
            "prediction": self.class_names[j],
            "probability": round(float(p[j]), 6),
            "p_original": round(float(p[pred]), 6),
        }


def _what_if_rows(
    model: _WhatIf,
    scores: np.ndarray,
    concept_ids: Sequence[str],
    tops: Sequence[tuple[str, str, float]],
    pred: int,
    user_what_if: Mapping[int, str | float] | None,
) -> list[dict[str, Any]]:
    """Each top concept switched off, set present and set absent; then the user's intervention, all at once."""
    rows = []
    base = scores.astype(np.float64)
    for cid, _, _ in tops:
        k = list(concept_ids).index(cid)
        for action in WHAT_IF_ACTIONS:
            s = base.copy()
            s[k] = model.value(k, action)
            rows.append({"concept": cid, "action": action, **model.scenario(f"{cid}: {action}", s, pred)})
    if user_what_if:
        s = base.copy()
        desc = []
        for k, action in user_what_if.items():
            s[k] = model.value(k, action)
            desc.append(f"{concept_ids[k]}: {action}")
        rows.append({"concept": None, "action": "user", **model.scenario("; ".join(desc), s, pred)})
    return rows


def _top_concept_entries(
    tops: Sequence[tuple[str, str, float]], scores: np.ndarray, neutral: np.ndarray, concept_ids: Sequence[str]
) -> list[dict[str, Any]]:
    """The ``top_concepts`` list of an entry: each concept with its label, direction, score and neutral value."""
    out = []
    for cid, d, v in tops:
        k = list(concept_ids).index(cid)
        out.append(
            {
                "concept": cid,
                "label": concept_label(cid, d),
                "direction": d,
                "contribution": v,
                "score": float(scores[k]),
                "neutral": float(neutral[k]),
            }
        )
    return out


def explain(
    image: str,
    scores: np.ndarray,
    contributions: np.ndarray,
    bias: np.ndarray,
    weight: np.ndarray,
    neutral: np.ndarray,
    concept_ids: Sequence[str],
    class_names: Sequence[str],
    hi: np.ndarray,
    lo: np.ndarray,
    top_k: int = 5,
    n_what_if: int = 3,
    user_what_if: Mapping[int, str | float] | None = None,
) -> dict[str, Any]:
    """One ``explanations.jsonl`` entry from one image's arrays (edited scores, ``(C, K)`` contributions).

    ``logits[c]`` is ``math.fsum`` of the written contributions of class ``c`` and its bias, so the written
    numbers add up exactly (the model's float32 logits agree to ~1e-6).

    Args:
        image: the image as the user gave it.
        scores: ``(K,)`` concept scores (after any edit).
        contributions: ``(C, K)`` contributions; bias: ``(C,)`` the contributions' bias.
        weight: ``(C, K)`` head weights; neutral: ``(K,)`` neutral concept values.
        concept_ids, class_names: the model's concepts and classes.
        hi, lo: per concept the score meaning present / absent (:func:`what_if_values`).
        top_k: top concepts listed; n_what_if: of them, how many get what-if scenarios.
        user_what_if: the user's intervention (:func:`parse_what_if`), applied as one extra scenario.
    """
    contrib = {
        c: {k: float(contributions[ci, ki]) for ki, k in enumerate(concept_ids)} for ci, c in enumerate(class_names)
    }
    bias_d = {c: float(bias[ci]) for ci, c in enumerate(class_names)}
    logits = np.array([math.fsum(list(contrib[c].values()) + [bias_d[c]]) for c in class_names])
    proba = softmax(logits)
    pred = int(np.argmax(logits))
    tops = top_concepts(concept_ids, contributions[pred], scores, neutral, top_k)
    n95, exp_h = M.effective_concept_counts(contributions[pred][None], 0.95)
    model = _WhatIf(weight, bias, neutral, hi, lo, class_names)
    return {
        "image": image,
        "status": "ok",
        "prediction": class_names[pred],
        "probability": round(float(proba[pred]), 6),
        "probabilities": {c: float(p) for c, p in zip(class_names, proba)},
        "logits": {c: float(v) for c, v in zip(class_names, logits)},
        "bias": bias_d,
        "concept_scores": {k: float(v) for k, v in zip(concept_ids, scores)},
        "contributions": contrib,
        "top_concepts": _top_concept_entries(tops, scores, neutral, concept_ids),
        "what_if": _what_if_rows(model, scores, concept_ids, tops[:n_what_if], pred, user_what_if),
        "effective_concepts": {"n_95": int(n95[0]), "exp_entropy": round(float(exp_h[0]), 4)},
    }

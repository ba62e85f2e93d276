# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""What a prediction says about its concepts, shared by the inference and the audit jobs.

One home for the rules both jobs' outputs follow, so ``predictions.csv`` and ``explanations.jsonl`` cannot drift
apart: which concepts drove a class (:func:`top_concepts`, measured from each concept's neutral value), how a
concept that counts because it is *absent* is named (:func:`concept_label`), and the columns and ``ok`` rows of
``predictions.csv`` (:func:`prediction_columns`, :func:`prediction_row`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # annotations only: the rules here need no bundle loading
    from .bundle import LoadedBundle

__all__ = [
    "concept_direction",
    "concept_label",
    "top_concepts",
    "format_top_concepts",
    "prediction_columns",
    "prediction_row",
]


def concept_direction(score: float, neutral: float) -> str:
    """``present`` when a concept's score is at or above its neutral (source-mean) value, else ``absent``."""
    return "present" if score >= neutral else "absent"


def concept_label(concept_id: str, direction: str) -> str:
    """How a concept is named in an explanation: ``not <id>`` when it counts because it is absent."""
    return f"not {concept_id}" if direction == "absent" else concept_id


def top_concepts(
    concept_ids: Sequence[str],
    contributions: np.ndarray,
    scores: np.ndarray,
    neutral: np.ndarray,
    top_k: int = 5,
) -> list[tuple[str, str, float]]:
    """The concepts that pushed one class up the most: ``(concept_id, direction, contribution)``.

    Contributions are measured from each concept's neutral (source-mean) value, so a concept can push a
    class up because it is *lower* than usual: its direction is then ``absent``. Only positive
    contributions are listed, largest first.

    Args:
        concept_ids: the model's concepts, in score order.
        contributions: ``(K,)`` contributions of every concept to the class.
        scores: ``(K,)`` concept scores of the image.
        neutral: ``(K,)`` neutral value per concept.
        top_k: at most this many concepts.

    Returns:
        Up to ``top_k`` ``(concept_id, direction, contribution)`` tuples.
    """
    order = np.argsort(-contributions, kind="stable")
    out = []
    for k in order[:top_k]:
        if contributions[k] <= 0:
            break
        out.append((concept_ids[k], concept_direction(scores[k], neutral[k]), float(contributions[k])))
    return out


def format_top_concepts(items: Sequence[tuple[str, str, float]]) -> str:
    """``id=value`` pairs joined by ``;``; a concept that counts because it is absent reads ``not id=value``."""
    return ";".join(f"{concept_label(cid, d)}={v:.4f}" for cid, d, v in items)


def prediction_columns(class_names: Sequence[str], concept_ids: Sequence[str] = ()) -> list[str]:
    """The contract's columns, then ``sample``, ``label``, the site-shift columns and one
    ``concept_<id>`` column per concept score (if any)."""
    return (
        ["image", "status", "error", "prediction", "probability"]
        + [f"prob_{c}" for c in class_names]
        + ["top_concepts", "sample", "label", "shift_score", "site_shift", "site_shift_reason"]
        + [f"concept_{k}" for k in concept_ids]
    )


def prediction_row(bundle: LoadedBundle, i: int, res: Any, top_k: int, concept_columns: bool) -> dict[str, Any]:
    """One ``ok`` row of ``predictions.csv`` from row ``i`` of a :class:`~medcbm.engine.BatchResult`.

    Args:
        bundle: the bundle that made the prediction (class names, concept ids, neutral values).
        i: the row within the batch result.
        res: the batch result.
        top_k: concepts listed in ``top_concepts``.
        concept_columns: add one ``concept_<id>`` column per concept score.

    Returns:
        The row's cells (strings) except ``image``, ``sample`` and ``label``.
    """
    proba = res.proba[i]
    c = int(np.argmax(proba))
    names = bundle.class_names
    row: dict[str, Any] = {
        "status": "ok",
        "error": "",
        "prediction": names[c],
        "probability": f"{proba[c]:.6f}",
    }
    for name, p in zip(names, proba):
        row[f"prob_{name}"] = f"{p:.6f}"
    neutral = bundle.network.neutral.detach().cpu().numpy()
    row["top_concepts"] = format_top_concepts(
        top_concepts(bundle.concept_ids, res.contributions[i, c], res.scores[i], neutral, top_k)
    )
    row.update(_shift_cells(res, i))
    if concept_columns:
        row.update({f"concept_{k}": f"{v:.6f}" for k, v in zip(bundle.concept_ids, res.scores[i])})
    return row


def _shift_cells(res: Any, i: int) -> dict[str, str]:
    """The site-shift cells of row ``i``: the score when the bundle has an alarm, and the flag with its reason
    (an image-quality finding flags the row even without an alarm)."""
    cells: dict[str, str] = {}
    quality = res.quality.get(res.ok[i], "")
    if res.shift_score is not None:
        cells["shift_score"] = f"{res.shift_score[i]:.4f}"
        cells["site_shift"] = "true" if bool(res.shift_flag[i]) or quality else "false"
        if quality:
            cells["site_shift_reason"] = quality
        elif cells["site_shift"] == "true":
            cells["site_shift_reason"] = "unlike the training site's images (score above the reference threshold)"
    elif quality:
        cells["site_shift"] = "true"
        cells["site_shift_reason"] = quality
    return cells

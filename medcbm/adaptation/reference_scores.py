# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The source reference set in concept-score space: what the site fit and the edit search guard against."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from .edit_inputs import _as_2d, _as_labels

__all__ = ["ReferenceScores"]


@dataclass(frozen=True)
class ReferenceScores:
    """Unedited concept scores of the bundle's source images, checked and as float64 / int64 arrays.

    Attributes:
        scores: ``(N, K)`` the labelled reference set (the source validation split a bundle carries).
        labels: ``(N,)`` its class indices.
        unlabelled: ``(M, K)`` more source images without labels (the bundle's sample of training images;
            ``M = 0`` when none); the source guards count a changed prediction there as a loss too.

    Example::

        reference = ReferenceScores.of_bundle(bundle)   # or ReferenceScores(R, y_r, U) from arrays
    """

    scores: np.ndarray
    labels: np.ndarray
    unlabelled: np.ndarray | None = None

    def __post_init__(self) -> None:
        R = _as_2d(self.scores, "reference scores")
        if len(R) == 0:
            raise ValueError("the reference set is empty")
        y = _as_labels(self.labels, len(R), None, "reference labels")  # the class range is the head's: check_head
        U = np.zeros((0, R.shape[1])) if self.unlabelled is None else _as_2d(self.unlabelled, "unlabelled scores")
        if U.shape[1] != R.shape[1]:
            raise ValueError(f"unlabelled reference scores have {U.shape[1]} concepts, the reference set {R.shape[1]}")
        object.__setattr__(self, "scores", R)
        object.__setattr__(self, "labels", y)
        object.__setattr__(self, "unlabelled", U)

    @classmethod
    def of_bundle(cls, bundle: Any) -> "ReferenceScores":
        """The reference set a :class:`~medcbm.bundle.LoadedBundle` carries, scored by its unedited network.

        Raises:
            ValueError: the bundle has no reference set (``models/reference.safetensors``).
        """
        ref = bundle.reference
        if ref is None:
            raise ValueError(f"{bundle.name}: no source reference set (models/reference.safetensors)")
        return cls(ref.scores, ref.labels, ref.unlabelled_scores(bundle.network))

    @property
    def n_concepts(self) -> int:
        return int(self.scores.shape[1])

    def check_head(self, head: Any) -> None:
        """Raise ``ValueError`` unless the scores and labels fit ``head`` (a :class:`~medcbm.networks.HeadArrays`)."""
        C, K = head.weight.shape
        if self.n_concepts != K:
            raise ValueError(f"reference scores have {self.n_concepts} concepts, the head has {K}")
        if self.labels.max() >= C:
            raise ValueError(f"reference labels hold class indices outside [0, {C - 1}]")

    def mapped(self, transform: Callable[[np.ndarray], np.ndarray]) -> "ReferenceScores":
        """The same images with ``transform`` applied to both score arrays (e.g. a site calibration)."""
        return replace(self, scores=transform(self.scores), unlabelled=transform(self.unlabelled))

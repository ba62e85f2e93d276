# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Label-shift correction from an unlabelled site sample (Saerens, Latinne & Decaestecker, Neural Computation 2002).

When a site sees other class frequencies than the source (one laboratory's cells are mostly neutrophils), the
Bayes-optimal change to a calibrated classifier is a per-class logit offset ``log(pi_t / pi_s)``. The site prior
``pi_t`` is estimated by EM on the bundle's (calibrated) probabilities of the site sample: reweight each image's
posterior by ``pi_t / pi_s``, renormalise, set ``pi_t`` to their mean, repeat. The source prior ``pi_s`` is the one
the bundle's probabilities imply at the source: their mean on the source reference set (a head fitted with class
balancing implies a flatter prior than the label counts).

The offset is centred (softmax ignores a common shift), bounded by ``max_abs_offset`` and applied only when stable:
the EM is rerun on ``n_bootstrap`` resamples of the sample (fixed seed, so the result is reproducible) and the
correction is switched off when any class's log-ratio varies by more than ``max_bootstrap_sd``, when the sample is
smaller than ``min_images``, or when no class moves by ``min_z`` bootstrap standard deviations (no evidence of a
shift). Every outcome carries a reason.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..metrics import softmax

__all__ = ["em_class_prior", "LabelShiftEstimator"]

_FLOOR = 1e-4  # smallest prior used in a log-ratio


def em_class_prior(
    proba: np.ndarray, source_prior: np.ndarray, max_iter: int = 1000, tol: float = 1e-8
) -> tuple[np.ndarray, int]:
    """The Saerens-Latinne-Decaestecker EM: the target class prior of ``(n, C)`` source-calibrated posteriors.

    Returns:
        the prior ``(C,)`` and the number of iterations run.
    """
    p = np.asarray(proba, dtype=np.float64)
    ps = np.maximum(np.asarray(source_prior, dtype=np.float64), _FLOOR)
    pt = ps.copy()
    for it in range(1, max_iter + 1):
        q = p * (pt / ps)
        q /= q.sum(1, keepdims=True)
        new = q.mean(0)
        if np.abs(new - pt).max() < tol:
            return new, it
        pt = new
    return pt, max_iter


def _log_ratio(pt: np.ndarray, ps: np.ndarray) -> np.ndarray:
    r = np.log(np.maximum(pt, _FLOOR)) - np.log(np.maximum(ps, _FLOOR))
    return r - r.mean()


class LabelShiftEstimator:
    """Estimate the site's class prior and the bounded, bootstrap-checked logit offset (module docstring).

    Args:
        max_abs_offset: bound on each class's centred offset, in logits (default ``log 4``: a 4x prior ratio).
        n_bootstrap: resamples for the stability check.
        max_bootstrap_sd: largest allowed bootstrap standard deviation of a class's log-ratio.
        min_images: smallest site sample the correction is attempted on.
        min_z: the largest class offset must reach this many bootstrap standard deviations.
        seed: the bootstrap's random seed (fixed: the same sample gives the same file).
        class_names: for the stored table (default ``class<c>``).

    Attributes (after :meth:`fit`): ``applied_``, ``reason_``, ``source_prior_``, ``site_prior_``, ``offset_``
    ``(C,)`` (zeros when not applied), ``estimated_offset_`` (before the on/off decision), ``bootstrap_sd_``,
    ``n_iter_``.
    """

    def __init__(
        self,
        max_abs_offset: float = math.log(4.0),
        n_bootstrap: int = 200,
        max_bootstrap_sd: float = 0.25,
        min_images: int = 50,
        min_z: float = 2.0,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
    ):
        if not (math.isfinite(max_abs_offset) and max_abs_offset >= 0):
            raise ValueError(f"max_abs_offset must be a finite number >= 0, got {max_abs_offset}")
        if int(n_bootstrap) != n_bootstrap or n_bootstrap < 2:
            raise ValueError(f"n_bootstrap must be an integer >= 2, got {n_bootstrap}")
        self.max_abs_offset = float(max_abs_offset)
        self.n_bootstrap = int(n_bootstrap)
        self.max_bootstrap_sd = float(max_bootstrap_sd)
        self.min_images = int(min_images)
        self.min_z = float(min_z)
        self.seed = int(seed)
        self.class_names = list(class_names) if class_names is not None else None

    def fit(self, site_logits: np.ndarray, source_prior: np.ndarray) -> "LabelShiftEstimator":
        """Estimate from the site sample's logits ``(n, C)`` (after any calibration) and the source prior ``(C,)``."""
        z = np.asarray(site_logits, dtype=np.float64)
        ps = np.asarray(source_prior, dtype=np.float64).reshape(-1)
        if z.ndim != 2 or z.shape[1] != len(ps) or len(z) == 0 or not np.isfinite(z).all():
            raise ValueError(f"site_logits must be finite (n > 0, {len(ps)}), got {z.shape}")
        if (ps < 0).any() or not math.isclose(float(ps.sum()), 1.0, abs_tol=1e-6):
            raise ValueError("source_prior must be a probability vector")
        C, n = len(ps), len(z)
        self.class_names_ = self.class_names or [f"class{c}" for c in range(C)]
        proba = softmax(z)
        self.source_prior_ = ps
        self.site_prior_, self.n_iter_ = em_class_prior(proba, ps)
        raw = _log_ratio(self.site_prior_, ps)
        self.estimated_offset_ = np.clip(raw, -self.max_abs_offset, self.max_abs_offset)
        rng = np.random.default_rng(self.seed)
        boots = np.stack(
            [_log_ratio(em_class_prior(proba[rng.integers(0, n, n)], ps)[0], ps) for _ in range(self.n_bootstrap)]
        )
        self.bootstrap_sd_ = boots.std(0, ddof=1)
        self.applied_, self.reason_ = self._decide(raw, n)
        self.offset_ = self.estimated_offset_ if self.applied_ else np.zeros(C)
        return self

    def _decide(self, raw: np.ndarray, n: int) -> tuple[bool, str]:
        """Whether to apply the offset, and why (in words)."""
        sd_max = float(self.bootstrap_sd_.max())
        worst = self.class_names_[int(self.bootstrap_sd_.argmax())]
        z = np.abs(raw) / np.maximum(self.bootstrap_sd_, 1e-9)
        if n < self.min_images:
            return False, (
                f"off: the site sample has {n} images, fewer than the {self.min_images} a class-prior estimate needs"
            )
        if sd_max > self.max_bootstrap_sd:
            return False, (
                f"off: the estimate is unstable (bootstrap sd of the log prior ratio of '{worst}' is {sd_max:.3g}, "
                f"above {self.max_bootstrap_sd:g} over {self.n_bootstrap} resamples)"
            )
        if float(z.max()) < self.min_z:
            return False, (
                "off: no evidence of a change in class frequencies (the largest log prior ratio is "
                f"{float(z.max()):.2g} bootstrap sd from zero, below {self.min_z:g})"
            )
        top = int(np.argmax(np.abs(raw)))
        clipped = " (bounded)" if np.any(np.abs(raw) > self.max_abs_offset) else ""
        return True, (
            f"applied{clipped}: the site's estimated class frequencies differ from the source's (largest change: "
            f"'{self.class_names_[top]}' {100 * self.source_prior_[top]:.1f}% -> {100 * self.site_prior_[top]:.1f}%, "
            f"{float(z[top]):.1f} bootstrap sd); the logits get log(site prior / source prior), centred and bounded "
            f"by {self.max_abs_offset:.3g}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``label_shift`` field of ``adaptation.json``."""
        names = self.class_names_

        def table(v: np.ndarray, digits: int = 6) -> dict[str, float]:
            return {c: round(float(x), digits) for c, x in zip(names, v)}

        return {
            "applied": bool(self.applied_),
            "reason": self.reason_,
            "logit_offset": table(self.offset_),
            "estimated_logit_offset": table(self.estimated_offset_),
            "source_prior": table(self.source_prior_),
            "site_prior": table(self.site_prior_),
            "bootstrap_sd": table(self.bootstrap_sd_, 4),
            "method": "EM on the bundle's calibrated probabilities (Saerens, Latinne & Decaestecker 2002); offset "
            "log(site prior / source prior), centred, bounded; source prior = mean probability on the source "
            "reference set",
            "max_abs_offset": round(self.max_abs_offset, 6),
            "n_bootstrap": self.n_bootstrap,
            "max_bootstrap_sd": self.max_bootstrap_sd,
            "min_images": self.min_images,
            "min_z": self.min_z,
            "seed": self.seed,
            "em_iterations": int(self.n_iter_),
        }

# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Per-concept calibration of concept scores from an unlabelled site sample to the source (METHODS.md §2).

A stain, scanner or exposure change can inflate or deflate one concept's score on every image of a site ("coarse
granules" everywhere), which moves every image toward the classes that concept serves. Each concept gets a
monotone affine map on standardised scores, fitted once on a sample of the site's images and stored in
``adaptation.json``; it never looks at the images being predicted.

For concept ``k`` let ``u`` be the score's logit (scores in (0, 1); the score itself otherwise). With site mean and
standard deviation ``m_t, s_t`` and the source reference set's ``m_r, s_r`` (its images optionally re-weighted per
class, so that a site with other class frequencies is matched against a source with the same frequencies; see
:mod:`medcbm.adaptation.site`), the full map is ``u -> m_r + (u - m_t) * s_r / s_t`` (scale ratio bounded by
``max_scale_ratio``). A concept whose mean and spread both sit within ``min_shift_z`` standard errors of the
source's keeps the identity.

**Source guard.** The map is meant for the site, but applied to the source reference set *as if it were the site*
it must not change that set's predictions: concepts are admitted one at a time (largest shift first), each at the
largest of 1, 3/4, 1/2, 1/4 of its step whose cumulative effect stays within the losses
:func:`~medcbm.adaptation.source_guard.allowed_losses` allows (labelled reference images turned wrong, unlabelled
source training images whose prediction changes), else refused. Every map, shrink and refusal carries a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..networks import HeadArrays, calibrate_scores
from .reference_scores import ReferenceScores
from .source_guard import allowed_losses, guard_set

__all__ = ["ConceptCalibrator", "ConceptMap", "calibration_space", "SHRINK_STEPS"]

SHRINK_STEPS = (1.0, 0.75, 0.5, 0.25)  # fractions of a map's step the source guard tries, largest first
_DIGITS = 6  # stored precision; the guard checks the rounded maps, so what is stored is what was checked


def calibration_space(*score_sets: np.ndarray) -> str:
    """``logit`` when every score lies in [0, 1] (probability groundings), else ``score``."""
    ok = all(a.size == 0 or (float(np.min(a)) >= 0.0 and float(np.max(a)) <= 1.0) for a in score_sets)
    return "logit" if ok else "score"


def _to_space(scores: np.ndarray, space: str) -> np.ndarray:
    if space == "logit":
        p = np.clip(scores, 1e-6, 1.0 - 1e-6)
        return np.log(p) - np.log1p(-p)
    return scores


def _weighted_moments(u: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Weighted mean and standard deviation per column, and the effective sample size."""
    w = w / w.sum()
    m = w @ u
    var = w @ (u - m) ** 2
    n_eff = 1.0 / float((w**2).sum())
    var *= n_eff / max(n_eff - 1.0, 1.0)
    return m, np.sqrt(np.maximum(var, 1e-12)), n_eff


@dataclass(frozen=True)
class ConceptMap:
    """One concept's calibration in the calibration space: ``u -> slope * u + intercept``."""

    index: int
    slope: float
    intercept: float
    shrink: float  # fraction of the full map kept by the source guard
    site_mean: float
    site_sd: float
    reference_mean: float
    reference_sd: float
    z: float  # the shift's evidence: largest of the mean and log-spread shifts in standard errors
    source_changes: int  # source guard losses with this map and those admitted before it


class ConceptCalibrator:
    """Fit the per-concept maps (estimator style; see the module docstring).

    Args:
        guard_tolerance: largest allowed source loss rate (0.005 = 0.5 points) at 95 % confidence.
        min_shift_z: a concept is mapped only when its site mean or spread differs from the source's by at least
            this many standard errors.
        max_scale_ratio: bound on ``s_r / s_t`` (and its inverse).
        concept_ids: for the reasons (default ``concept<k>``).

    Attributes (after :meth:`fit`): ``space_``, ``slope_`` / ``intercept_`` ``(K,)`` (identity where unmapped),
    ``maps_`` (admitted :class:`ConceptMap`, in the order admitted), ``refused_`` (concept id -> reason),
    ``n_unshifted_``, ``guard_allowed_losses_``.
    """

    def __init__(
        self,
        guard_tolerance: float = 0.005,
        min_shift_z: float = 2.0,
        max_scale_ratio: float = 3.0,
        concept_ids: Sequence[str] | None = None,
    ):
        if not 0 <= guard_tolerance < 1:
            raise ValueError(f"guard_tolerance must be in [0, 1), got {guard_tolerance}")
        if not (math.isfinite(min_shift_z) and min_shift_z >= 0):
            raise ValueError(f"min_shift_z must be a finite number >= 0, got {min_shift_z}")
        if not (math.isfinite(max_scale_ratio) and max_scale_ratio >= 1):
            raise ValueError(f"max_scale_ratio must be a finite number >= 1, got {max_scale_ratio}")
        self.guard_tolerance = float(guard_tolerance)
        self.min_shift_z = float(min_shift_z)
        self.max_scale_ratio = float(max_scale_ratio)
        self.concept_ids = list(concept_ids) if concept_ids is not None else None

    def fit(
        self,
        site_scores: np.ndarray,
        reference: ReferenceScores,
        head: HeadArrays,
        reference_weights: np.ndarray | None = None,
    ) -> "ConceptCalibrator":
        """Fit on unedited site scores ``(n, K)`` against the source reference set.

        Args:
            site_scores: unedited concept scores of the site sample.
            reference: the source reference set's unedited scores and labels (and the bundle's source training
                sample, which the guard checks too).
            head: the bundle's unedited head (any label-shift offset is part of its logits).
            reference_weights: ``(N,)`` non-negative weights of the reference images for the target moments.

        Raises:
            ValueError: shapes that do not fit together, fewer than 2 site rows, an edited head or bad weights.
        """
        S = np.asarray(site_scores, dtype=np.float64)
        reference.check_head(head)
        if head.has_edit:
            raise ValueError("the calibration is fitted on the unedited head (the edit is searched after it)")
        R, U = reference.scores, reference.unlabelled
        if S.ndim != 2 or S.shape[1] != R.shape[1]:
            raise ValueError(f"site scores {S.shape} and reference scores {R.shape} must share K")
        if len(S) < 2 or len(R) < 2 or not np.isfinite(S).all():
            raise ValueError("site and reference scores need at least 2 finite rows each")
        K = S.shape[1]
        w = np.ones(len(R)) if reference_weights is None else np.asarray(reference_weights, dtype=np.float64)
        if w.shape != (len(R),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError("reference_weights must be (N,) non-negative with a positive sum")
        self.concept_ids_ = self.concept_ids or [f"concept{k}" for k in range(K)]
        self.space_ = calibration_space(S, R, U)
        self._W, self._b = head.weight, head.bias + head.offset
        proposals = self._proposals(_to_space(S, self.space_), _to_space(R, self.space_), w)
        self._guard(proposals, R, reference.labels, U)
        return self

    def _proposals(self, us: np.ndarray, ur: np.ndarray, w: np.ndarray) -> list[dict[str, float]]:
        """Full maps of the concepts whose site distribution differs beyond noise, largest shift first."""
        mt, st = us.mean(0), np.maximum(us.std(0, ddof=1), 1e-6)
        mr, sr, n_eff = _weighted_moments(ur, w)
        n = len(us)
        z_mean = np.abs(mt - mr) / np.sqrt(st**2 / n + sr**2 / n_eff)
        log_ratio = np.log(sr / st)
        z_scale = np.abs(log_ratio) / math.sqrt(1 / (2 * (n - 1)) + 1 / (2 * max(n_eff - 1, 1)))
        self.n_unshifted_ = 0
        out = []
        for k in range(us.shape[1]):
            z = float(max(z_mean[k], z_scale[k]))
            if z < self.min_shift_z:
                self.n_unshifted_ += 1
                continue
            bound = math.log(self.max_scale_ratio)
            ratio = float(np.exp(np.clip(log_ratio[k], -bound, bound)))
            ratio = ratio if z_scale[k] >= self.min_shift_z else 1.0
            out.append(dict(k=k, z=z, ratio=ratio, mt=mt[k], st=st[k], mr=mr[k], sr=sr[k]))
        return sorted(out, key=lambda p: (-round(p["z"], 9), p["k"]))

    def _guard(self, proposals: list[dict[str, float]], R: np.ndarray, yr: np.ndarray, U: np.ndarray) -> None:
        """Admit the proposals one at a time at the largest shrink the source guard allows (module docstring)."""
        K = R.shape[1]
        G, base, target = guard_set(R, yr, U, self._W, self._b)
        was_right = base.argmax(1) == target
        allowed = self.guard_allowed_losses_ = allowed_losses(len(G), self.guard_tolerance)
        self.slope_, self.intercept_ = np.ones(K), np.zeros(K)
        self.maps_: list[ConceptMap] = []
        self.refused_: dict[str, str] = {}
        logits, first_lost = base, 0
        for p in proposals:
            k = int(p["k"])
            for i, lam in enumerate(SHRINK_STEPS):
                slope = round(1.0 + lam * (p["ratio"] - 1.0), _DIGITS)
                intercept = round(lam * (p["mr"] - p["mt"] * p["ratio"]), _DIGITS)
                col = self.map_column(G[:, k], slope, intercept)
                trial = logits + np.outer(col - G[:, k], self._W[:, k])
                lost = int((was_right & (trial.argmax(1) != target)).sum())
                first_lost = lost if i == 0 else first_lost
                if lost <= allowed:
                    self.slope_[k], self.intercept_[k], logits = slope, intercept, trial
                    G = G.copy()
                    G[:, k] = col
                    self.maps_.append(
                        ConceptMap(k, slope, intercept, lam, p["mt"], p["st"], p["mr"], p["sr"], p["z"], lost)
                    )
                    break
            else:
                self.refused_[self.concept_ids_[k]] = (
                    f"source guard: mapping '{self.concept_ids_[k]}' onto the source distribution (site mean "
                    f"{p['mt']:.3g}, sd {p['st']:.3g} vs source {p['mr']:.3g}, {p['sr']:.3g} on the {self._unit()}) "
                    f"would change {first_lost} of {len(G)} source reference predictions when applied to them as if "
                    f"they were the site (also at {SHRINK_STEPS[-1]:g} of the step; at most {allowed} allowed: "
                    f"{100 * self.guard_tolerance:.1f} points at 95% confidence)"
                )
        self._n_guard = len(G)

    def _unit(self) -> str:
        return "logit scale" if self.space_ == "logit" else "score scale"

    def map_column(self, col: np.ndarray, slope: float, intercept: float) -> np.ndarray:
        """One concept's scores after a map (through :func:`medcbm.networks.calibrate_scores`, the network's own)."""
        t = torch.from_numpy(np.ascontiguousarray(col, dtype=np.float64))[:, None]
        one = torch.tensor([slope], dtype=torch.float64), torch.tensor([intercept], dtype=torch.float64)
        return calibrate_scores(t, one[0], one[1], self.space_ == "logit")[:, 0].numpy()

    def transform(self, scores: np.ndarray) -> np.ndarray:
        """Scores ``(N, K)`` after the fitted maps (the network's arithmetic)."""
        if not hasattr(self, "slope_"):
            raise RuntimeError("this ConceptCalibrator is not fitted yet; call fit() first")
        t = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float64))
        s, c = torch.from_numpy(self.slope_), torch.from_numpy(self.intercept_)
        return calibrate_scores(t, s, c, self.space_ == "logit").numpy()

    def reason(self, m: ConceptMap) -> str:
        """Why concept ``m.index`` is mapped, how far, and what the guard did."""
        cid = self.concept_ids_[m.index]
        sign = "-" if m.intercept < 0 else "+"
        shrunk = (
            f"; the source guard kept {m.shrink:g} of the full step (the full map changed too many source predictions)"
            if m.shrink < 1
            else ""
        )
        return (
            f"'{cid}' is shifted at this site (site mean {m.site_mean:.3g}, sd {m.site_sd:.3g} vs source "
            f"{m.reference_mean:.3g}, {m.reference_sd:.3g} on the {self._unit()}; {m.z:.1f} standard errors): "
            f"mapped onto the source distribution as u -> {m.slope:.4g} u {sign} {abs(m.intercept):.4g}{shrunk}; "
            f"with the maps before it, it changes {m.source_changes} of {self._n_guard} source reference predictions "
            f"(at most {self.guard_allowed_losses_} allowed)"
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``calibration`` field of ``adaptation.json`` (``{}`` when no concept is mapped and none refused)."""
        if not self.maps_ and not self.refused_:
            return {}
        concepts = {}
        for m in sorted(self.maps_, key=lambda m: m.index):
            concepts[self.concept_ids_[m.index]] = {
                "slope": m.slope,
                "intercept": m.intercept,
                "shrink": m.shrink,
                "site_mean": round(float(m.site_mean), _DIGITS),
                "site_sd": round(float(m.site_sd), _DIGITS),
                "reference_mean": round(float(m.reference_mean), _DIGITS),
                "reference_sd": round(float(m.reference_sd), _DIGITS),
                "shift_z": round(float(m.z), 3),
                "reason": self.reason(m),
            }
        return {
            "space": self.space_,
            "method": "affine map on standardised scores (mean and spread matched to the source reference set), "
            "per concept, guarded on the source reference set",
            "concepts": concepts,
            "refused": dict(sorted(self.refused_.items())),
            "n_unshifted": int(self.n_unshifted_),
            "unshifted_reason": f"{self.n_unshifted_} concepts differ from the source by less than "
            f"{self.min_shift_z:g} standard errors in mean and spread: left as they are",
            "min_shift_z": self.min_shift_z,
            "max_scale_ratio": self.max_scale_ratio,
            "guard_tolerance": self.guard_tolerance,
            "guard_allowed_losses": int(self.guard_allowed_losses_),
            "n_guard": int(self._n_guard),
        }

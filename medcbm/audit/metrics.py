# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Model-level audit metrics of a concept bottleneck model (numpy only; definitions in the docstrings).

Notation (``docs/auditing.md``): ``N`` images, ``K`` concepts, ``C`` classes; head ``W`` (C, K), prior
``P`` (C, K) in {-1, 0, +1}; concept scores ``a`` (N, K); the contribution of concept ``k`` to class ``c``
is ``W[c, k] * (a_k - neutral_k)`` (``neutral`` = the concept's source-site mean), and contributions plus
the bias sum to the logits. Concept labels are ``(N, K)`` arrays with 1 (present), 0 (absent) and NaN
(unknown).

Every function validates its inputs and raises ``ValueError`` naming the argument and the shape it got.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np

from ..metrics import softmax

__all__ = [
    "EFFECTIVE_CONCEPT_LIMIT",
    "prior_agreement",
    "effective_concepts",
    "effective_concept_counts",
    "global_importance",
    "concept_auroc",
    "concept_existence",
    "concept_location",
    "top_fraction_mask",
    "deletion",
]

logger = logging.getLogger(__name__)

#: People cannot use more than about 32 concepts per explanation (OverlookedFactors, 2022).
EFFECTIVE_CONCEPT_LIMIT = 32


# ---------------------------------------------------------------------------------------------- helpers
def _as_2d(name: str, x: Any, shape: tuple[int | None, int | None] = (None, None)) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or any(s is not None and s != a.shape[i] for i, s in enumerate(shape)):
        want = "x".join("?" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must be a 2-D array of shape ({want}), got shape {a.shape}")
    return a


def _check_names(name: str, names: Sequence[str], n: int) -> list[str]:
    names = [str(v) for v in names]
    if len(names) != n:
        raise ValueError(f"{name} has {len(names)} entries, expected {n}")
    return names


def _check_labels(labels: Any, n: int, k: int) -> np.ndarray:
    y = _as_2d("concept_labels", labels, (n, k))
    bad = ~np.isnan(y) & (y != 0) & (y != 1)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"concept_labels must be 1, 0 or NaN; got {y[i, j]} at row {i}, concept {j}")
    return y


def _cosine(u: np.ndarray, v: np.ndarray) -> float | None:
    nu, nv = float(np.linalg.norm(u)), float(np.linalg.norm(v))
    if nu == 0.0 or nv == 0.0:
        return None
    return float(np.dot(u, v) / (nu * nv))


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


# ---------------------------------------------------------------------------------------------- the prior
def prior_agreement(
    weight: np.ndarray, prior: np.ndarray, class_names: Sequence[str], concept_ids: Sequence[str]
) -> dict[str, Any]:
    """How far the learned head agrees with the knowledge prior.

    Definitions (over the concept-class pairs where the prior has an opinion, ``P != 0``):

    - ``sign_agreement``: fraction of those pairs with ``sign(W[c, k]) == P[c, k]`` (a weight of exactly 0
      does not agree);
    - ``cosine``: cosine between ``W`` and ``P`` flattened over all pairs (1 = the head points exactly
      where the prior does); ``per_class_cosine``: the same per class row;
    - ``contradictions``: the pairs with ``sign(W) == -P``, largest ``|W|`` first: the model uses the
      concept against medical knowledge (e.g. a neutrophil *less* likely with a segmented nucleus).

    Args:
        weight: head ``W`` (C, K).
        prior: ``P`` (C, K) in {-1, 0, +1}.
        class_names, concept_ids: names of the rows and columns.
    """
    W = _as_2d("weight", weight)
    P = _as_2d("prior", prior, W.shape)
    if not np.isin(P, (-1.0, 0.0, 1.0)).all():
        raise ValueError("prior must hold only -1, 0 and +1")
    classes = _check_names("class_names", class_names, W.shape[0])
    concepts = _check_names("concept_ids", concept_ids, W.shape[1])
    known = P != 0
    signs = np.sign(W)
    n_known = int(known.sum())
    agree = int((known & (signs == P)).sum())
    contra = np.argwhere(known & (signs == -P))
    contradictions = sorted(
        (
            {
                "class": classes[c],
                "concept": concepts[k],
                "prior": int(P[c, k]),
                "weight": _r(W[c, k], 6),
                "statement": (
                    f"prior: {classes[c]} {'shows' if P[c, k] > 0 else 'does not show'} {concepts[k]}; "
                    f"the model uses it {'against' if W[c, k] < 0 else 'for'} {classes[c]}"
                ),
            }
            for c, k in contra
        ),
        key=lambda d: -abs(d["weight"] or 0.0),
    )
    return {
        "definition": "sign agreement and cosine of head weights W with the prior P over pairs where P != 0",
        "n_prior_pairs": n_known,
        "n_agree": agree,
        "sign_agreement": _r(agree / n_known) if n_known else None,
        "cosine": _r(_cosine(W.ravel(), P.ravel())),
        "per_class_cosine": {classes[c]: _r(_cosine(W[c], P[c])) for c in range(W.shape[0])},
        "n_contradictions": len(contradictions),
        "contradictions": contradictions,
    }


# ---------------------------------------------------------------------------------------------- effective concepts
def effective_concept_counts(contributions: np.ndarray, mass: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Per decision: ``(n_mass, exp_entropy)``.

    ``n_mass``: the smallest number of concepts whose ``|contribution|`` adds up to ``mass`` of the total;
    ``exp_entropy``: ``exp(H(p))`` with ``p_k = |c_k| / sum |c|`` (the "perplexity" count; 1 when one
    concept carries everything, ``K`` when all carry the same). A decision with no contribution at all
    counts 0 for both.

    Args:
        contributions: (N, K) contributions to the decided (predicted) class.
        mass: fraction of the absolute contribution to cover, in (0, 1].
    """
    A = np.abs(_as_2d("contributions", contributions))
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    total = A.sum(1)
    sorted_desc = -np.sort(-A, axis=1)
    cum = np.cumsum(sorted_desc, axis=1)
    # small relative tolerance so that e.g. exactly 95% counts as reaching 95%
    n_mass = (cum < (mass * total[:, None]) * (1 - 1e-12)).sum(1) + 1
    with np.errstate(divide="ignore", invalid="ignore"):
        p = A / total[:, None]
        h = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    exp_h = np.exp(h)
    zero = total <= 0
    n_mass = np.where(zero, 0, n_mass).astype(np.int64)
    exp_h = np.where(zero, 0.0, exp_h)
    return n_mass, exp_h


def effective_concepts(
    contributions: np.ndarray, mass: float = 0.95, limit: int = EFFECTIVE_CONCEPT_LIMIT
) -> dict[str, Any]:
    """How many concepts each decision really rests on, warned above ``limit``.

    See :func:`effective_concept_counts` for the two per-decision counts. A ``warning`` (also logged) is set
    when any decision needs more than ``limit`` concepts to cover ``mass`` of its contribution: such an
    explanation is too long for a person to check.

    Args:
        contributions: (N, K) contributions to each image's predicted class.
        mass: fraction of the absolute contribution to cover.
        limit: most concepts a reader can use (32 by default).
    """
    n_mass, exp_h = effective_concept_counts(contributions, mass)
    over = int((n_mass > limit).sum())
    warning = None
    if over:
        warning = (
            f"{over} of {len(n_mass)} decisions need more than {limit} concepts to cover {mass:.0%} of their "
            "contribution: these explanations are too long to check by eye"
        )
        logger.warning("effective concepts: %s", warning)
    summary = lambda v: {  # noqa: E731
        "mean": _r(float(np.mean(v))) if len(v) else None,
        "median": _r(float(np.median(v))) if len(v) else None,
        "max": _r(float(np.max(v))) if len(v) else None,
    }
    return {
        "definition": (
            f"per decision: the fewest concepts carrying {mass:.0%} of |contribution| to the predicted class "
            "(n_mass), and exp(entropy) of the |contribution| distribution"
        ),
        "mass": mass,
        "limit": limit,
        "n_decisions": int(len(n_mass)),
        "n_mass": summary(n_mass),
        "exp_entropy": summary(exp_h),
        "n_over_limit": over,
        "warning": warning,
    }


# ---------------------------------------------------------------------------------------------- importance
def _class_concept_frequency(labels: np.ndarray, y: np.ndarray, C: int) -> tuple[np.ndarray, np.ndarray]:
    """``F[c, k]``: fraction of labelled images of class ``c`` annotated with concept ``k``; counts too."""
    K = labels.shape[1]
    F = np.full((C, K), np.nan)
    n = np.zeros((C, K), dtype=np.int64)
    for c in range(C):
        rows = labels[y == c]
        known = ~np.isnan(rows)
        n[c] = known.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            F[c] = np.where(n[c] > 0, np.nansum(rows, 0) / np.maximum(n[c], 1), np.nan)
    return F, n


def global_importance(
    weight: np.ndarray,
    prior: np.ndarray,
    concept_ids: Sequence[str],
    class_names: Sequence[str],
    contributions: np.ndarray | None = None,
    concept_labels: np.ndarray | None = None,
    class_labels: np.ndarray | None = None,
    min_per_class: int = 3,
) -> dict[str, Any]:
    """Per concept: how much the model uses it and whether it uses it the way knowledge / data say (CGIM).

    - ``cgim_prior``: cosine between the concept's head column ``W[:, k]`` and the prior column ``P[:, k]``,
      both centred over classes (softmax ignores a constant added to every class, so only the differences
      between classes matter; the centred cosine is their correlation). ``None`` when the prior says
      nothing about the concept or its weights are constant.
    - ``cgim_labels``: the same against the concept-class frequency ``F[c, k]`` (fraction of images of class
      ``c`` annotated with concept ``k``), where labels exist for at least ``min_per_class`` images of
      every class; ``None`` otherwise.
    - ``mean_abs_contribution``: mean ``|contribution|`` to the predicted class over the audited images
      (how much the concept actually moves decisions); ``weight_spread``: the std of the centred column.

    Args:
        weight, prior: ``W`` and ``P`` (C, K).
        contributions: optional (N, K) contributions to each image's predicted class.
        concept_labels: optional (N, K) labels (1/0/NaN); ``class_labels``: (N,) class indices (-1 unknown).
    """
    W = _as_2d("weight", weight)
    P = _as_2d("prior", prior, W.shape)
    C, K = W.shape
    ids = _check_names("concept_ids", concept_ids, K)
    classes = _check_names("class_names", class_names, C)
    contrib = None if contributions is None else _as_2d("contributions", contributions, (None, K))
    F = n = None
    if concept_labels is not None:
        if class_labels is None:
            raise ValueError("class_labels are needed with concept_labels")
        y = np.asarray(class_labels).astype(np.int64).ravel()
        L = _check_labels(concept_labels, len(y), K)
        F, n = _class_concept_frequency(L[y >= 0], y[y >= 0], C)
    Wc = W - W.mean(0, keepdims=True)
    Pc = P - P.mean(0, keepdims=True)
    rows = []
    for k, cid in enumerate(ids):
        entry: dict[str, Any] = {
            "concept": cid,
            "cgim_prior": _r(_cosine(Wc[:, k], Pc[:, k])),
            "weight_spread": _r(float(np.std(W[:, k]))),
            "strongest_class": classes[int(np.argmax(W[:, k]))],
        }
        if contrib is not None:
            entry["mean_abs_contribution"] = _r(float(np.abs(contrib[:, k]).mean()) if len(contrib) else None, 6)
        if F is not None and n is not None:
            ok = bool((n[:, k] >= min_per_class).all())
            entry["cgim_labels"] = _r(_cosine(Wc[:, k], F[:, k] - F[:, k].mean())) if ok else None
            entry["label_frequency"] = {classes[c]: _r(F[c, k]) for c in range(C)} if ok else None
        rows.append(entry)
    key = "mean_abs_contribution" if contrib is not None else "weight_spread"
    ranked = sorted(rows, key=lambda d: -(d.get(key) or 0.0))
    return {
        "definition": (
            "CGIM: cosine between the class-centred head column W[:,k] and the class-centred prior column "
            "(cgim_prior) or concept-class label frequency (cgim_labels)"
        ),
        "ranked_by": key,
        "concepts": ranked,
    }


# ---------------------------------------------------------------------------------------------- concept labels
def _hanley_mcneil_se(a: float, n1: int, n2: int) -> float:
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a)) / (n1 * n2)
    return math.sqrt(max(var, 0.0))


def concept_auroc(
    scores: np.ndarray,
    concept_labels: np.ndarray,
    concept_ids: Sequence[str],
    min_examples: int = 3,
    z: float = 1.96,
) -> dict[str, Any]:
    """Per concept: AUROC of its score against the given labels, a 95% CI, and a test against chance.

    - ``auroc``: Mann-Whitney AUROC over the images where the concept is labelled;
    - ``ci_low``/``ci_high``: ``auroc ± z·SE`` with the Hanley & McNeil (1982) standard error, clipped to
      [0, 1];
    - ``p_value``: one-sided test of ``AUROC > 0.5`` with the null SE ``sqrt((n1 + n2 + 1) / (12 n1 n2))``;
    - ``better_than_chance``: ``ci_low > 0.5``.

    Concepts with fewer than ``min_examples`` positive or negative labels are listed with a reason only.
    """
    from ..metrics import auroc as _auroc

    S = _as_2d("scores", scores)
    N, K = S.shape
    ids = _check_names("concept_ids", concept_ids, K)
    L = _check_labels(concept_labels, N, K)
    per: dict[str, Any] = {}
    aucs = []
    for k, cid in enumerate(ids):
        known = ~np.isnan(L[:, k])
        y = L[known, k] > 0.5
        n1, n2 = int(y.sum()), int((~y).sum())
        if n1 + n2 == 0:
            continue  # no label for this concept at all: not evaluated, not listed
        if min(n1, n2) < min_examples:
            per[cid] = {"n_positive": n1, "n_negative": n2, "auroc": None, "reason": "too few labelled examples"}
            continue
        a = _auroc(y, S[known, k])
        se = _hanley_mcneil_se(a, n1, n2)
        se0 = math.sqrt((n1 + n2 + 1) / (12.0 * n1 * n2))
        p = 0.5 * math.erfc(((a - 0.5) / se0) / math.sqrt(2))
        lo, hi = max(0.0, a - z * se), min(1.0, a + z * se)
        per[cid] = {
            "n_positive": n1,
            "n_negative": n2,
            "auroc": _r(a),
            "ci_low": _r(lo),
            "ci_high": _r(hi),
            "p_value": float(f"{p:.3g}"),
            "better_than_chance": bool(lo > 0.5),
        }
        aucs.append(a)
    return {
        "definition": "AUROC of each concept score against its labels; 95% CI by Hanley-McNeil; chance = 0.5",
        "n_concepts_evaluated": len(aucs),
        "mean_auroc": _r(float(np.mean(aucs))) if aucs else None,
        "n_better_than_chance": sum(1 for v in per.values() if v.get("better_than_chance")),
        "concepts": per,
    }


def concept_existence(
    contributions: np.ndarray,
    scores: np.ndarray,
    neutral: np.ndarray,
    concept_labels: np.ndarray,
    ls: Sequence[int] = (1, 3, 5),
) -> dict[str, Any]:
    """CEM@l: of the top-``l`` concepts behind each prediction, the fraction whose claim the labels confirm.

    Per image, the *claims* are the labelled concepts with a positive contribution to the predicted class,
    ranked by contribution (largest first); the top ``l`` are checked. A concept whose score is above its
    neutral value (or at it) claims *presence* (confirmed by label 1); one below claims *absence* (``not <id>``,
    confirmed by label 0), because a concept that counts by being absent is evidence of absence.
    ``cem_at_l`` is the mean over images with at least one claim of (confirmed claims / claims checked).
    ``present_at_l`` is the original definition: fraction of the same top-``l`` annotated present, whatever
    the direction. Concepts without a label on an image are not ranked for that image.

    Args:
        contributions: (N, K) contributions to each image's predicted class.
        scores: (N, K) concept scores; ``neutral``: (K,) neutral values.
        concept_labels: (N, K) 1/0/NaN.
        ls: the cut-offs ``l``.
    """
    Cn = _as_2d("contributions", contributions)
    N, K = Cn.shape
    S = _as_2d("scores", scores, (N, K))
    nu = np.asarray(neutral, dtype=np.float64).ravel()
    if nu.shape != (K,):
        raise ValueError(f"neutral must have shape ({K},), got {nu.shape}")
    L = _check_labels(concept_labels, N, K)
    if not ls or any(int(v) < 1 for v in ls):
        raise ValueError(f"ls must be positive integers, got {list(ls)}")
    out: dict[str, Any] = {
        "definition": (
            "CEM@l: mean over images of the fraction of the top-l positively contributing labelled concepts "
            "whose direction (present if score >= neutral, else absent) the label confirms"
        )
    }
    for top_l in ls:
        conf, pres, used = [], [], 0
        for i in range(N):
            cand = np.flatnonzero(~np.isnan(L[i]) & (Cn[i] > 0))
            if cand.size == 0:
                continue
            top = cand[np.argsort(-Cn[i, cand], kind="stable")][: int(top_l)]
            claims_present = S[i, top] >= nu[top]
            lab = L[i, top] > 0.5
            conf.append(float(np.mean(claims_present == lab)))
            pres.append(float(np.mean(lab)))
            used += 1
        out[f"cem_at_{top_l}"] = _r(float(np.mean(conf))) if conf else None
        out[f"present_at_{top_l}"] = _r(float(np.mean(pres))) if pres else None
        out[f"n_images_at_{top_l}"] = used
    return out


def top_fraction_mask(heatmap: np.ndarray, alpha: float) -> np.ndarray:
    """Boolean mask of the ``round(alpha * H * W / 12)`` highest pixels of a 2-D map (ties broken by order)."""
    m = np.asarray(heatmap, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {m.shape}")
    n = max(1, min(m.size, int(round(alpha * m.size / 12.0))))
    flat = np.zeros(m.size, dtype=bool)
    flat[np.argsort(-m.ravel(), kind="stable")[:n]] = True
    return flat.reshape(m.shape)


def concept_location(
    heatmaps: Sequence[np.ndarray] | np.ndarray,
    locations: Sequence[np.ndarray] | np.ndarray,
    alphas: Sequence[float] = (1, 3, 6),
) -> dict[str, Any]:
    """CLM@α: is the annotated location among the top ``α·H·W/12`` pixels of the concept's map?

    A location is a boolean mask of the map's size (a point is a one-pixel mask). It is a *hit* when any of
    its pixels falls in the top set. ``precision_at_α`` is the stricter companion: the mean fraction of the
    top set that lies inside the location.

    Args:
        heatmaps: (N, H, W) concept maps, upsampled to the image.
        locations: (N, H, W) boolean masks.
        alphas: the α values (1, 3, 6 in the literature: 1/12, 1/4 and 1/2 of the image).
    """
    if len(heatmaps) != len(locations):
        raise ValueError(f"{len(heatmaps)} heatmaps for {len(locations)} locations")
    out: dict[str, Any] = {
        "definition": "CLM@a: fraction of maps whose top a*H*W/12 pixels include the annotated location",
        "n": len(heatmaps),
    }
    for a in alphas:
        hits, prec = [], []
        for h, loc in zip(heatmaps, locations):
            loc = np.asarray(loc, dtype=bool)
            if loc.shape != np.shape(h):
                raise ValueError(f"location mask shape {loc.shape} differs from heatmap shape {np.shape(h)}")
            if not loc.any():
                continue
            top = top_fraction_mask(h, a)
            hits.append(bool((top & loc).any()))
            prec.append(float((top & loc).sum() / top.sum()))
        key = f"{a:g}"
        out[f"clm_at_{key}"] = _r(float(np.mean(hits))) if hits else None
        out[f"precision_at_{key}"] = _r(float(np.mean(prec))) if prec else None
    return out


# ---------------------------------------------------------------------------------------------- faithfulness
def deletion(
    scores: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    neutral: np.ndarray,
    n_random: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Deletion curves: probability of the predicted class as concepts are removed (set to neutral).

    For each image the concepts are removed one at a time, (a) in order of their contribution to the
    predicted class, largest first, and (b) in ``n_random`` random orders (seeded); the curves are averaged
    over images (and random orders). ``auc_*`` is the area under the curve over the fraction of concepts
    removed (trapezoid on [0, 1]). A faithful explanation drops the probability faster than chance:
    ``auc_contribution < auc_random`` (``auc_gap = auc_random - auc_contribution > 0``).

    Args:
        scores: (N, K) concept scores; ``weight`` (C, K), ``bias`` (C,), ``neutral`` (K,): the linear head.
    """
    S = _as_2d("scores", scores)
    N, K = S.shape
    W = _as_2d("weight", weight, (None, K))
    b = np.asarray(bias, dtype=np.float64).ravel()
    nu = np.asarray(neutral, dtype=np.float64).ravel()
    if b.shape != (W.shape[0],) or nu.shape != (K,):
        raise ValueError(f"bias must be ({W.shape[0]},) and neutral ({K},); got {b.shape} and {nu.shape}")
    if N == 0:
        return {"n": 0, "definition": "no images"}
    rng = np.random.default_rng(seed)
    logits = S @ W.T + b
    pred = logits.argmax(1)
    contrib = (S - nu) * W[pred]  # (N, K) contributions to the predicted class

    def curve(order: np.ndarray) -> np.ndarray:
        # order: (N, K) concept indices; returns (N, K + 1) probability of the predicted class
        cur = S.copy()
        out = np.empty((N, K + 1))
        out[:, 0] = softmax(cur @ W.T + b)[np.arange(N), pred]
        for step in range(K):
            idx = order[:, step]
            cur[np.arange(N), idx] = nu[idx]
            out[:, step + 1] = softmax(cur @ W.T + b)[np.arange(N), pred]
        return out

    by_contrib = curve(np.argsort(-contrib, axis=1, kind="stable")).mean(0)
    rand = np.mean([curve(np.argsort(rng.random((N, K)), axis=1)).mean(0) for _ in range(n_random)], axis=0)
    x = np.linspace(0.0, 1.0, K + 1)
    trap = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    auc_c, auc_r = float(trap(by_contrib, x)), float(trap(rand, x))
    return {
        "definition": (
            "mean probability of the predicted class after removing (setting to neutral) the first j concepts, "
            "by contribution order and by random order; areas over the fraction removed"
        ),
        "n": N,
        "fraction_removed": [_r(v) for v in x],
        "contribution_order": [_r(v) for v in by_contrib],
        "random_order": [_r(v) for v in rand],
        "auc_contribution": _r(auc_c),
        "auc_random": _r(auc_r),
        "auc_gap": _r(auc_r - auc_c),
    }

# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Lesion segmentation of dermoscopy images (step 1 of the package docstring) and the mask geometry it shares.

:func:`segment_lesion` suppresses hair, thresholds CIE-L* with Otsu inside the field of view, removes the
dark lens frame and keeps the large, central components; the small helpers here (float RGB conversion,
radius map, fallback ellipse, hair mask, principal axes) are also used by the ABCD and structure measures.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["segment_lesion"]


def _as_float_rgb(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` as float64 in [0, 1], shape (H, W, 3); grey and RGBA inputs are converted."""
    arr = np.asarray(rgb)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if arr.size and arr.max() > 1.0 + 1e-6:
        arr = arr / 255.0
    return np.clip(arr, 0.0, 1.0)


def _radius_map(shape: tuple[int, int]) -> np.ndarray:
    """Distance of each pixel from the image centre, in units of the shorter side."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    return np.hypot((yy - (h - 1) / 2.0), (xx - (w - 1) / 2.0)) / float(min(h, w))


def _ellipse_mask(shape: tuple[int, int], fy: float = 0.3, fx: float = 0.3) -> np.ndarray:
    """Centred ellipse with semi-axes ``fy * H`` and ``fx * W``: the fallback lesion mask."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    return ((yy - cy) / max(fy * h, 1.0)) ** 2 + ((xx - cx) / max(fx * w, 1.0)) ** 2 <= 1.0


def _hair_and_lightness(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L* of ``img``, L* with thin dark structures (hair) closed, and the hair mask."""
    from skimage.color import rgb2lab
    from skimage.morphology import closing, disk

    lab = rgb2lab(img)
    lightness = lab[..., 0]
    radius = max(2, int(round(min(img.shape[:2]) / 64)))  # 4 px at 256
    closed = closing(lightness, disk(radius))
    hair = (closed - lightness) > 12.0
    return lab, closed, hair


def _field_of_view(lightness: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels inside the dermoscope's field of view (not the dark vignetting / lens frame).

    Two kinds of frame are removed: near-black surroundings of a circular lens (L* < 10) connected to the
    image border, and dark vignetting (L* below the lesion ``threshold``) flooded from the image
    corners but only in the outer band (beyond 0.42 of the shorter side from the centre), so a lesion
    that reaches the band is trimmed there rather than discarded.
    """
    from scipy import ndimage as ndi
    from skimage.morphology import disk

    h, w = lightness.shape
    r = _radius_map((h, w))
    frame = np.zeros((h, w), dtype=bool)
    hard = (lightness < 10.0) & (r > 0.25)
    soft = (lightness < threshold) & (r > 0.42)
    for cand in (hard, soft):
        labels, _ = ndi.label(cand, structure=np.ones((3, 3)))
        on_border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        on_border = on_border[on_border > 0]
        if on_border.size:
            frame |= np.isin(labels, on_border)
    if frame.any():  # the soft edge of the frame
        frame = ndi.binary_dilation(frame, structure=disk(max(1, int(round(min(h, w) / 85)))))
    return ~frame


def segment_lesion(rgb: np.ndarray, return_info: bool = False) -> np.ndarray | tuple[np.ndarray, dict]:
    """Segment the (single, roughly central) lesion of a dermoscopy image.

    Args:
        rgb: (H, W, 3) image, uint8 or float in [0, 1].
        return_info: also return a dict with ``ok`` (False when the centred-ellipse fallback was used),
            ``threshold`` (Otsu L*), ``fov`` (field-of-view mask) and ``hair`` (hair mask).

    Returns:
        Boolean lesion mask of shape (H, W) (and the info dict when ``return_info``). Never raises on
        image content: failures return a centred ellipse covering ~28% of the frame with ``ok=False``.
    """
    img = _as_float_rgb(rgb)
    h, w = img.shape[:2]
    info: dict[str, Any] = {"ok": False, "threshold": float("nan"), "reason": ""}
    fallback = _ellipse_mask((h, w))
    try:
        mask, info = _segment(img, info)
    except Exception as e:  # noqa: BLE001 - robustness is the contract here
        info["reason"] = f"segmentation error: {type(e).__name__}: {e}"
        mask = None
    if mask is None:
        mask = fallback
        info["ok"] = False
        info.setdefault("fov", np.ones((h, w), dtype=bool))
        info.setdefault("hair", np.zeros((h, w), dtype=bool))
    return (mask, info) if return_info else mask


def _segment(img: np.ndarray, info: dict[str, Any]) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The segmentation of :func:`segment_lesion`: the mask, or ``None`` with ``info["reason"]`` set."""
    from scipy import ndimage as ndi
    from skimage.filters import gaussian, threshold_otsu
    from skimage.measure import label, regionprops
    from skimage.morphology import disk

    h, w = img.shape[:2]
    n = h * w
    lab, closed, hair = _hair_and_lightness(img)
    info["hair"] = hair
    smooth = gaussian(closed, sigma=max(1.0, min(h, w) / 128.0), preserve_range=True)
    r = _radius_map((h, w))
    core = r < 0.45
    core_values = smooth[core & (smooth >= 10.0)]
    if core_values.size < 0.05 * n or float(np.ptp(core_values)) < 5.0:
        info["reason"] = "flat or empty image"
        info["fov"] = np.ones((h, w), dtype=bool)
        return None, info
    thr = float(threshold_otsu(core_values))
    fov = _field_of_view(smooth, thr)
    info["fov"] = fov
    # Otsu again restricted to the field of view (the frame can bias the first estimate)
    fov_core = fov & (r < 0.5)
    if fov_core.sum() > 0.05 * n:
        vals = smooth[fov_core]
        if float(np.ptp(vals)) >= 5.0:
            thr = float(threshold_otsu(vals))
    info["threshold"] = thr
    dark = (smooth < thr) & fov
    rad = max(1, int(round(min(h, w) / 100)))
    dark = ndi.binary_opening(dark, structure=disk(rad))
    labels = label(dark, connectivity=2)
    sizes = np.bincount(labels.ravel())
    small = np.flatnonzero(sizes <= max(16, int(0.002 * n)))
    labels[np.isin(labels, small)] = 0
    if labels.max() == 0:
        info["reason"] = "no dark region"
        return None, info
    scored = []
    for reg in regionprops(labels):
        coords = reg.coords
        mean_r = float(r[coords[:, 0], coords[:, 1]].mean())
        # large and central: a ring of vignetting or a corner shadow has a large mean radius
        scored.append((reg.area * math.exp(-((mean_r / 0.25) ** 2)), mean_r, reg.label))
    scored.sort(reverse=True)
    best_score = scored[0][0]
    # fragmented lesions (regression, multicomponent): keep other central, substantial pieces too
    keep = [lab for score, mean_r, lab in scored if score >= 0.25 * best_score and mean_r < 0.35]
    keep = keep or [scored[0][2]]
    mask = np.isin(labels, keep)
    pad = 2 * rad  # closing near the image border must not erode the mask
    mask = ndi.binary_closing(np.pad(mask, pad), structure=disk(2 * rad))[pad:-pad, pad:-pad]
    mask = ndi.binary_fill_holes(mask)
    frac = mask.sum() / float(n)
    if frac < 0.003:
        info["reason"] = f"lesion too small ({frac:.4f} of the frame)"
        return None, info
    if frac > 0.95 * max(fov.mean(), 1e-6):
        info["reason"] = f"lesion fills the field of view ({frac:.3f})"
        return None, info
    info["ok"] = True
    return mask.astype(bool), info


def _principal_axes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroid and principal axes of the pixels of ``mask`` (one shared definition for both asymmetries).

    Args:
        mask: (H, W) boolean mask with at least one pixel.

    Returns:
        ``(centre, offsets, axes)``: the (y, x) centroid, each pixel's (y, x) offset from it, and the
        eigenvectors of the pixel covariance as columns (ascending eigenvalue, from ``np.linalg.eigh``).
    """
    coords = np.argwhere(mask).astype(np.float64)
    centre = coords.mean(axis=0)
    d = coords - centre
    _, vecs = np.linalg.eigh(d.T @ d / len(d))
    return centre, d, vecs

# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Structure measures of a segmented lesion (steps 6-10 of the package docstring).

Blue-white veil, dark dots / globules and their irregularity, border sharpness and the asymmetry of colours
and structures, all on the Shades-of-Gray normalised image with the parameters of
:data:`~.constants.STRUCTURE_PARAMS` (lengths given for a 256-pixel short image side, scaled with the image).
:func:`.abcd.measure_abcd` gathers its per-image arrays into a :class:`_LesionArrays` and calls
:func:`_structure_measures`, which never raises.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from .constants import _STRUCTURE_KEYS, ABCD_COLOURS, STRUCTURE_PARAMS
from .segmentation import _principal_axes


@dataclass(frozen=True)
class _LesionArrays:
    """The per-image arrays that :func:`.abcd.measure_abcd` has computed and the structure measures share.

    Attributes:
        norm: (H, W, 3) Shades-of-Gray normalised RGB in [0, 1].
        lab: (H, W, 3) CIE-L*a*b* of ``norm``.
        mask: (H, W) lesion mask.
        lesion_px: lesion pixels off hair (the whole lesion when hair covers most of it).
        colour_map: ABCD colour index of each pixel of ``mask`` (-1 for none, and outside the mask).
        skin_px: the skin ring around the lesion (or all skin in the field of view).
        fov: the dermoscope's field of view.
        hair: the hair mask.
    """

    norm: np.ndarray
    lab: np.ndarray
    mask: np.ndarray
    lesion_px: np.ndarray
    colour_map: np.ndarray
    skin_px: np.ndarray
    fov: np.ndarray
    hair: np.ndarray


def _disk(radius: float) -> np.ndarray:
    """A disk footprint of ``radius`` rounded to whole pixels, at least 1."""
    from skimage.morphology import disk

    return disk(max(1, int(round(radius))))


def _components(cand: np.ndarray) -> tuple[np.ndarray, int, dict[str, np.ndarray]]:
    """8-connected components of ``cand`` with per-component shape statistics from image moments.

    Returns the label image, the number of components and arrays (one entry per component, label
    ``i + 1`` at index ``i``): ``area``, centroid ``cy`` / ``cx``, ``ecc`` (eccentricity of the ellipse
    with the same second moments, each pixel counted as a unit square) and ``fill`` (area / area of that
    ellipse: 1 for a disk, lower for ragged or branched shapes).
    """
    from scipy import ndimage as ndi

    labels, n = ndi.label(cand, structure=np.ones((3, 3)))
    if n == 0:
        return labels, 0, {}
    idx = labels.ravel()
    yy, xx = np.indices(cand.shape, dtype=np.float64)
    yy, xx = yy.ravel(), xx.ravel()
    area = np.bincount(idx, minlength=n + 1)[1:].astype(np.float64)
    cy = np.bincount(idx, yy, minlength=n + 1)[1:] / area
    cx = np.bincount(idx, xx, minlength=n + 1)[1:] / area
    syy = np.bincount(idx, yy * yy, minlength=n + 1)[1:] / area - cy**2 + 1.0 / 12.0
    sxx = np.bincount(idx, xx * xx, minlength=n + 1)[1:] / area - cx**2 + 1.0 / 12.0
    sxy = np.bincount(idx, yy * xx, minlength=n + 1)[1:] / area - cy * cx
    half_tr = 0.5 * (syy + sxx)
    disc = np.sqrt(np.maximum(half_tr**2 - (syy * sxx - sxy**2), 0.0))
    l1 = np.maximum(half_tr + disc, 1e-12)
    l2 = np.clip(half_tr - disc, 1e-12, None)
    stats = {
        "area": area,
        "cy": cy,
        "cx": cx,
        "ecc": np.sqrt(np.clip(1.0 - l2 / l1, 0.0, 1.0)),
        "fill": area / (4.0 * math.pi * np.sqrt(l1 * l2)),
    }
    return labels, n, stats


def _round_blobs(tophat: np.ndarray, interior: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """Small, compact, round-to-oval components of ``tophat >= blob_min_contrast`` centred in ``interior``.

    Returns the label image, the labels kept (1-based) and the component statistics of the kept blobs.
    """
    p = STRUCTURE_PARAMS
    labels, n, st = _components(tophat >= p["blob_min_contrast"])
    if n == 0:
        return labels, np.zeros(0, dtype=int), {}
    h, w = interior.shape
    yi = np.clip(np.rint(st["cy"]).astype(int), 0, h - 1)
    xi = np.clip(np.rint(st["cx"]).astype(int), 0, w - 1)
    keep = (
        (st["area"] >= p["blob_min_area"] * scale**2)
        & (st["area"] <= p["blob_max_area"] * scale**2)
        & (st["ecc"] <= p["blob_max_eccentricity"])
        & (st["fill"] >= p["blob_min_fill"])
        & interior[yi, xi]
    )
    return labels, np.flatnonzero(keep) + 1, {k: v[keep] for k, v in st.items()}


def _half_histogram_distance(side: np.ndarray, classes: np.ndarray, n_classes: int) -> float:
    """Total-variation distance (0..1) between the class histograms of ``side`` and ``~side``."""
    a = np.bincount(classes[side], minlength=n_classes).astype(np.float64)
    b = np.bincount(classes[~side], minlength=n_classes).astype(np.float64)
    if a.sum() < 1 or b.sum() < 1:
        return 0.0
    return float(0.5 * np.abs(a / a.sum() - b / b.sum()).sum())


def _structure_measures(arrays: _LesionArrays) -> dict[str, float]:
    """Blue-white veil, dots / globules, border sharpness and colour-structure asymmetry.

    See steps 6-10 of the package docstring. Never raises: a failure returns NaN for every structure
    measure (with a warning), so one odd image cannot stop the measurement of a whole dataset.

    Args:
        arrays: the per-image arrays of :func:`.abcd.measure_abcd`.

    Returns:
        measure name -> value for each of ``_STRUCTURE_KEYS``.
    """
    try:
        return _structure_measures_impl(arrays)
    except Exception as e:  # noqa: BLE001 - robustness is the contract here
        warnings.warn(f"structure measures failed: {type(e).__name__}: {e}", stacklevel=3)
        return {k: float("nan") for k in _STRUCTURE_KEYS}


def _structure_measures_impl(arrays: _LesionArrays) -> dict[str, float]:
    """The structure measures of :func:`_structure_measures`, which may raise.

    Args:
        arrays: the per-image arrays of :func:`.abcd.measure_abcd`.

    Returns:
        measure name -> value, in the order of ``_STRUCTURE_KEYS``.
    """
    h, w = arrays.mask.shape
    scale = min(h, w) / 256.0  # lengths in STRUCTURE_PARAMS are for a 256-pixel short side
    L = arrays.lab[..., 0]
    lesion_l = float(np.median(L[arrays.lesion_px])) if arrays.lesion_px.any() else 0.0
    out: dict[str, float] = {"frac_blue_white_veil": _blue_white_veil(arrays, lesion_l)}
    dark_th, bright_th = _tophats(L, scale)
    dot_labels, kept_dots, dot_stats = _round_blobs(dark_th, _dot_interior(arrays.mask, arrays.fov, scale), scale)
    out["dot_count"] = float(len(kept_dots))
    out["dots_irregularity"] = _dots_irregularity(arrays.mask, dot_stats, len(kept_dots))
    out["border_sharpness"] = _border_sharpness(arrays, lesion_l, scale)
    dots_px = np.isin(dot_labels, kept_dots) if len(kept_dots) else np.zeros_like(arrays.mask)
    out["colour_structure_asymmetry"] = _colour_structure_asymmetry(arrays, dark_th, bright_th, dots_px)
    return out


def _blue_white_veil(arrays: _LesionArrays, lesion_l: float) -> float:
    """Step 6: the largest confluent area of bluish-whitish pixels over the lesion area.

    A pixel is veil-coloured by the two-feature rule of Celebi et al. 2008 (normalised blue, red drop
    below the skin) and lighter than the lesion's median L* (the whitish film).

    Args:
        arrays: the per-image arrays of :func:`.abcd.measure_abcd`.
        lesion_l: median L* of the lesion pixels off hair.

    Returns:
        area of the largest 8-connected veil component / lesion area (0 without veil).
    """
    from scipy import ndimage as ndi

    p = STRUCTURE_PARAMS
    L = arrays.lab[..., 0]
    skin_px, lesion_px = arrays.skin_px, arrays.lesion_px
    total = max(int(lesion_px.sum()), 1)
    rgb255 = arrays.norm * 255.0  # the rule's thresholds are in 0-255 RGB
    skin_r = float(np.mean(rgb255[..., 0][skin_px])) if skin_px.any() else float(np.median(rgb255[..., 0]))
    norm_blue = rgb255[..., 2] / np.maximum(rgb255.sum(axis=-1), 1e-6)
    red_drop = skin_r - rgb255[..., 0]
    veil = (
        lesion_px
        & (norm_blue >= p["veil_min_norm_blue"])
        & (red_drop >= p["veil_red_drop_min"])
        & (red_drop <= p["veil_red_drop_max"])
        & (L >= lesion_l)
    )
    veil = ndi.binary_opening(veil, structure=np.ones((2, 2)))
    vlab, nv = ndi.label(veil, structure=np.ones((3, 3)))
    # only the largest component counts, so scattered bluish pixels do not add up to a veil
    return float(np.bincount(vlab.ravel())[1:].max()) / total if nv else 0.0


def _tophats(L: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Step 7: black and white top-hats of L* with a disk of ``tophat_radius``.

    Args:
        L: (H, W) CIE-L* of the normalised image.
        scale: short image side / 256.

    Returns:
        ``(dark, bright)``: the black top-hat (closing - L*, dark structures narrower than the disk) and
        the white top-hat of the hair-closed L* (closed first, so gaps between hairs do not look bright).
    """
    from scipy import ndimage as ndi

    p = STRUCTURE_PARAMS
    radius = p["tophat_radius"] * scale
    dark_th = ndi.grey_closing(L, footprint=_disk(radius)) - L
    l_hairless = ndi.grey_closing(L, footprint=_disk(p["hair_close_radius"] * scale))
    bright_th = l_hairless - ndi.grey_opening(l_hairless, footprint=_disk(radius))
    return dark_th, bright_th


def _dot_interior(mask: np.ndarray, fov: np.ndarray, scale: float) -> np.ndarray:
    """Step 7: where a dot's centroid may lie: ``interior_erosion`` inside the outline, in the field of view.

    Args:
        mask: (H, W) lesion mask.
        fov: (H, W) field-of-view mask.
        scale: short image side / 256.

    Returns:
        (H, W) boolean mask; the whole lesion (in the field of view) when the erosion leaves nothing.
    """
    from scipy import ndimage as ndi

    interior = ndi.binary_erosion(mask, structure=_disk(STRUCTURE_PARAMS["interior_erosion"] * scale))
    if not interior.any():
        interior = mask
    return interior & fov


def _dots_irregularity(mask: np.ndarray, dot_stats: dict[str, np.ndarray], n_dots: int) -> float:
    """Step 8: uneven sizes plus uneven placement of the dots / globules.

    Args:
        mask: (H, W) lesion mask.
        dot_stats: component statistics of the kept dots (``area``, ``cy``, ``cx``) from :func:`_round_blobs`.
        n_dots: the number of kept dots.

    Returns:
        coefficient of variation of the dot areas + distance of the dots' mean position from the lesion
        centroid in lesion radii; 0 with fewer than ``dots_min_count`` dots.
    """
    if n_dots < STRUCTURE_PARAMS["dots_min_count"]:
        return 0.0
    area = dot_stats["area"]
    size_cv = float(np.std(area) / max(np.mean(area), 1e-6))
    my, mx = np.argwhere(mask).mean(axis=0)
    radius_lesion = math.sqrt(max(float(mask.sum()), 1.0) / math.pi)
    offset = math.hypot(float(np.mean(dot_stats["cy"])) - my, float(np.mean(dot_stats["cx"])) - mx) / radius_lesion
    return size_cv + offset


def _border_sharpness(arrays: _LesionArrays, lesion_l: float, scale: float) -> float:
    """Step 9: the maximum L* gradient next to the outline over the skin - lesion contrast.

    Args:
        arrays: the per-image arrays of :func:`.abcd.measure_abcd`.
        lesion_l: median L* of the lesion pixels off hair (fallback of the inner-ring lightness).
        scale: short image side / 256.

    Returns:
        the mean over the usable outline pixels, per pixel of a 256-pixel side (0 without an outline).
    """
    from scipy import ndimage as ndi

    p = STRUCTURE_PARAMS
    mask, hair, skin_px, L = arrays.mask, arrays.hair, arrays.skin_px, arrays.lab[..., 0]
    h, w = mask.shape
    smooth = ndi.gaussian_filter(L, sigma=p["edge_sigma"] * scale)
    gy, gx = np.gradient(smooth)
    gmax = ndi.maximum_filter(np.hypot(gy, gx), footprint=_disk(p["edge_search_radius"] * scale))
    outline = mask & ~ndi.binary_erosion(mask, structure=np.ones((3, 3)))
    # leave out outline pixels on hair, at the frame or at the image edge: their gradient is not the lesion's
    margin = max(3, int(round(3 * scale)))
    valid_area = ndi.binary_erosion(arrays.fov, structure=_disk(margin)) & ~ndi.binary_dilation(hair, iterations=2)
    valid_area[:margin] = valid_area[-margin:] = False
    valid_area[:, :margin] = valid_area[:, -margin:] = False
    edge = outline & valid_area
    if edge.sum() < 10:
        edge = outline
    band = _disk(max(3.0, min(h, w) / 25.0))
    inner = mask & ~ndi.binary_erosion(mask, structure=band) & ~hair
    inner_l = float(np.median(L[inner])) if inner.any() else lesion_l
    skin_l = float(np.median(L[skin_px])) if skin_px.any() else inner_l
    contrast = max(abs(skin_l - inner_l), p["edge_min_contrast"])
    # per pixel of a 256-pixel image side, so that the value does not depend on the resolution
    return scale * float(np.mean(gmax[edge])) / contrast if edge.any() else 0.0


def _colour_structure_asymmetry(
    arrays: _LesionArrays, dark_th: np.ndarray, bright_th: np.ndarray, dots_px: np.ndarray
) -> float:
    """Step 10: asymmetry of colours and structures about the principal axes.

    Args:
        arrays: the per-image arrays of :func:`.abcd.measure_abcd`.
        dark_th: black top-hat of L* (:func:`_tophats`).
        bright_th: white top-hat of the hair-closed L*.
        dots_px: pixels of the dots kept in step 7.

    Returns:
        the mean over the two principal axes of the halves' total-variation distance, averaged over the
        colour and the structure histograms (0 = halves alike, at most 1); 0 for tiny lesions.
    """
    mask, hair = arrays.mask, arrays.hair
    # The hair mask also catches dark dots (both are narrow dark structures), so dots are given back.
    pixels = mask & ~(hair & ~dots_px)
    if pixels.sum() < 0.2 * mask.sum():
        pixels = mask
    ys, xs = np.nonzero(pixels)
    if len(ys) < 40:
        return 0.0
    colours = arrays.colour_map[ys, xs].astype(np.int64)
    colours[colours < 0] = len(ABCD_COLOURS)  # "none of the six"
    thr = STRUCTURE_PARAMS["structure_min_contrast"]
    struct = np.full(len(ys), 2, dtype=np.int64)  # 0 dark, 1 bright, 2 neither (dark wins)
    struct[bright_th[ys, xs] >= thr] = 1
    struct[dark_th[ys, xs] >= thr] = 0
    centre, _, vecs = _principal_axes(mask)  # axes of the outline, so that both asymmetries share them
    rel = np.stack([ys, xs], axis=1).astype(np.float64) - centre
    values = []
    for k in range(2):
        side = rel @ vecs[:, 1 - k] > 0  # the two halves on either side of principal axis k
        if side.sum() < 20 or (~side).sum() < 20:
            values.append(0.0)
            continue
        tv_colour = _half_histogram_distance(side, colours, len(ABCD_COLOURS) + 1)
        tv_struct = _half_histogram_distance(side, struct, 3)
        values.append(0.5 * (tv_colour + tv_struct))
    return float(np.mean(values))

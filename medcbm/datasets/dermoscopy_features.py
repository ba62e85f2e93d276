# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Measured ABCD features of dermoscopy images and the concept labels derived from them.

The dermoscopy concept bank (``bundles/derm_cbm/configs/concepts.yaml``) has concepts that can be
*measured* from the image instead of annotated by a dermatologist. This module measures thirteen of
them (:data:`MEASURED_CONCEPTS`) with classical image analysis (scikit-image / SciPy only) so that they
can serve as weak concept labels for grounding and as a sanity check of concept scores:

``asymmetric_shape``, ``irregular_border``, ``multiple_colours``, ``blue_grey_areas``,
``dark_brown_or_black_areas``, ``large_diameter``, ``light_brown_colour``, ``white_areas``, ``red_areas``
(ABCD rule) and ``blue_white_veil``, ``irregular_dots_globules``, ``sharp_demarcation``,
``asymmetric_colours_structures`` (7-point checklist, 3-point checklist, signs of seborrhoeic keratosis).

Pipeline (:func:`measure_abcd`):

1. :func:`segment_lesion`: hair suppression (grey closing, as in DullRazor), Otsu threshold of CIE-L*
   inside the central field of view, removal of the dark vignetting/lens frame connected to the image
   corners, morphological cleanup, choice of the component that is large *and* central, hole filling.
   If nothing plausible is found, a centred ellipse is returned and ``segmentation_ok`` is ``False``.
2. Asymmetry: the mask is reflected about its two principal axes (through the centroid); for each axis
   ``1 - |A ∩ reflect(A)| / |A|`` (0 = mirror symmetric, 1 = no overlap); ``asymmetry`` is the mean of
   the two axes, ``asymmetry_max`` the larger (the ABCD rule scores each axis).
3. Border: ``border_irregularity = 1 - 4πA/P²`` (0 for a disk, towards 1 for ragged outlines).
4. Colour: the image is colour-normalised with Shades of Gray (Minkowski p = 6) over the field of view,
   converted to CIE-L*a*b* (D65), and each lesion pixel is assigned at most one of the six ABCD colours
   by the rules in :data:`COLOUR_RULES` (lightness relative to the surrounding skin, hue angle and
   chroma). ``frac_<colour>`` is the fraction of (non-hair) lesion pixels of that colour and
   ``colour_count`` counts colours whose fraction exceeds :data:`COLOUR_PRESENCE_FRACTION`.
5. ``area_fraction``: lesion area / image area (the images carry no physical scale, so "large diameter"
   means large in the frame).

Structure measures (steps 6-10; parameters in :data:`STRUCTURE_PARAMS`, lengths given for a 256-pixel
short image side and scaled with the image, all on the Shades-of-Gray normalised image):

6. ``frac_blue_white_veil`` (blue-whitish veil, a major criterion of the 7-point checklist): a lesion
   pixel is veil-coloured when, in 0-255 RGB, its normalised blue ``B / (R + G + B)`` is at least 0.3
   and its red is 51 to 194 below the mean red of the surrounding skin (the two-feature rule of the
   decision tree of Celebi et al. 2008), and its L* is at least the lesion's median L* (the whitish
   film: lighter than the rest of the lesion). After a 2 x 2 opening, the measure is the area of the
   largest 8-connected veil component over the lesion area, so only a *confluent* veil scores high.
7. Top-hats of L* with a disk of radius 4 px: the black top-hat (closing - L*) marks dark structures
   narrower than ~9 px, the white top-hat of the hair-closed L* bright ones. Dots / globules are the
   8-connected components of black top-hat >= 10 L* that are 3-64 px in area, round to oval
   (eccentricity of the moment ellipse <= 0.9) and compact (area / moment-ellipse area >= 0.6; this
   excludes hairs and pigment-network lines), with the centroid >= 3 px inside the outline.
   ``dot_count`` is their number (an auxiliary measure, not a concept).
8. ``dots_irregularity`` (irregular dots/globules, a minor criterion of the 7-point checklist: "of
   various sizes, irregularly distributed"): with at least 3 dots, the coefficient of variation of the
   dot areas plus the distance between the dots' mean position and the lesion centroid in units of
   the lesion's equivalent radius ``sqrt(A/π)`` (evenly spread dots of one size score ~0); 0 with fewer
   than 3 dots.
9. ``border_sharpness`` (sharp demarcation, Braun et al. 2002): L* is smoothed with a Gaussian
   (σ = 1 px) and the maximum gradient magnitude within 2 px of each outline pixel is averaged over
   the outline (pixels in the field of view, off hair, >= 3 px from the image edge), then divided by the
   skin - lesion contrast (median L* of the skin ring minus median L* of the lesion's inner ring, floor
   5 L*). Unit 1/px at a 256-pixel side: about ``1 / (s √(2π))`` for an edge blurred over a scale of
   ``s`` px (~0.35 for a step, lower for a gradual fade into the skin).
10. ``colour_structure_asymmetry`` (asymmetry of colours and structures, 3-point checklist; the colour
    and structure part of the ABCD asymmetry): each lesion pixel (hair left out, dots of step 7 kept)
    gets a colour class (one of the six ABCD colours or none) and a structure class (dark: black
    top-hat >= 10 L*; bright: white top-hat >= 10 L*; neither). For each principal axis the lesion is
    cut into the two halves on either side of it, and the total-variation distance between the halves'
    class histograms is averaged over colour and structure; the measure is the mean over the two axes
    (0 = halves alike, at most 1).

Not measured: ``milia_like_cysts`` and ``comedo_like_openings`` were tried as counts of round bright
(white top-hat) and sharp-rimmed dark (black top-hat) blobs; on the ISIC 2017 training split neither
count separated seborrhoeic keratosis from melanoma (AUC 0.50 and 0.49), against the bank's prior, so
they were dropped rather than tuned. The other bank concepts (networks, streaks, vessels, ...) have no
measurement here.

Binary concept labels come from :func:`abcd_concept_labels` with thresholds fitted by
:func:`fit_abcd_thresholds` on the *training* measurements only (a percentile of each measure, see
:data:`DEFAULT_PERCENTILES`). :func:`isic2017_records` builds the ISIC 2017 manifest (train / carved val
/ held-out test) with cached measurements and concept labels.

References:
    Stolz W et al. ABCD rule of dermatoscopy. Eur J Dermatol 1994;4:521-527.
    Barata C, Celebi ME, Marques JS. Improving dermoscopy image classification using color constancy.
    IEEE J Biomed Health Inform 2015;19(3):1146-1152 (Shades of Gray for dermoscopy).
    Lee T et al. DullRazor: a software approach to hair removal from images. Comput Biol Med 1997.
    Argenziano G et al. Epiluminescence microscopy for the diagnosis of doubtful melanocytic skin
    lesions: comparison of the ABCD rule of dermatoscopy and a new 7-point checklist based on pattern
    analysis. Arch Dermatol 1998;134(12):1563-1570.
    Celebi ME et al. Automatic detection of blue-white veil and related structures in dermoscopy images.
    Comput Med Imaging Graph 2008;32(8):670-677.
    Braun RP et al. Dermoscopy of pigmented seborrheic keratosis: a morphological study. Arch Dermatol
    2002;138(12):1556-1560.
    Soyer HP et al. Three-point checklist of dermoscopy. Dermatology 2004;208(1):27-31.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "ABCD_COLOURS",
    "COLOUR_PARAMS",
    "COLOUR_PRESENCE_FRACTION",
    "COLOUR_RULES",
    "DEFAULT_PERCENTILES",
    "ISIC2017_CLASSES",
    "MEASURED_CONCEPTS",
    "MEASURE_KEYS",
    "MEASURE_VERSION",
    "STRUCTURE_PARAMS",
    "abcd_concept_labels",
    "classify_colours",
    "fit_abcd_thresholds",
    "isic2017_records",
    "measure_abcd",
    "segment_lesion",
]

#: Bump when the measurement algorithm changes: cached rows with another version are re-measured.
MEASURE_VERSION = "3"

ISIC2017_CLASSES = ("nevus", "melanoma", "seborrheic_keratosis")

#: The six colours of the ABCD rule of dermoscopy (Stolz et al. 1994).
ABCD_COLOURS = ("white", "red", "light_brown", "dark_brown", "blue_grey", "black")

#: A colour counts towards ``colour_count`` when it covers more than this fraction of the lesion.
COLOUR_PRESENCE_FRACTION = 0.02

#: Parameters of the colour rules of :func:`classify_colours` (CIE-L*a*b*, D65, after Shades-of-Gray).
COLOUR_PARAMS: dict[str, float] = {
    "black_max_l": 18.0,  # black: L* below this
    "white_min_dl": 0.0,  # white: L* above the skin's median L* plus this ...
    "white_max_c": 20.0,  # ... and chroma below this
    "blue_grey_min_dl": 12.0,  # blue-grey: L* at least this much darker than the skin ...
    "blue_grey_max_b": 2.0,  # ... and b* below this (bluish) ...
    "blue_grey_max_c": 9.0,  # ... or chroma below this (grey)
    "red_min_a": 20.0,  # red: a* above this ...
    "red_max_hue": 35.0,  # ... and hue angle below this (or above 330 degrees)
    "brown_hue_min": 40.0,  # brown hues: [min, max) degrees
    "brown_hue_max": 100.0,
    "dark_brown_max_l": 45.0,  # dark brown: L* below this, light brown: above
    "dark_brown_min_c": 9.0,
    "light_brown_min_c": 12.0,
    "light_brown_min_dl": 6.0,  # light brown: at least this much darker than the skin
}

#: Human-readable colour definitions applied by :func:`classify_colours`. ``L``, ``a``, ``b`` are
#: CIE-L*a*b* (D65) values after Shades-of-Gray normalisation, ``C = sqrt(a² + b²)`` the chroma,
#: ``h = atan2(b, a)`` the hue angle in degrees, ``Ls`` the median L* of the skin around the lesion.
#: Rules are applied in this order; a pixel takes the first colour whose rule it meets, or none.
COLOUR_RULES: dict[str, str] = {
    "black": "L < 18",
    "white": "L > Ls and C < 20 (lighter than the surrounding skin, nearly achromatic)",
    "blue_grey": "L >= 18 and L < Ls - 12 and (b < 2 or C < 9) (darker than skin, bluish or grey)",
    "red": "L >= 18 and L < Ls + 4 and a > 20 and (h < 35 or h > 330)",
    "dark_brown": "18 <= L < 45 and 40 <= h < 100 and C >= 9",
    "light_brown": "45 <= L < Ls - 6 and 40 <= h < 100 and C >= 12",
}

#: The concept ids that get labels from measurement, with the measure that drives each.
MEASURED_CONCEPTS: dict[str, str] = {
    "asymmetric_shape": "asymmetry",
    "irregular_border": "border_irregularity",
    "multiple_colours": "colour_count",
    "blue_grey_areas": "frac_blue_grey",
    "dark_brown_or_black_areas": "frac_dark_brown_or_black",
    "large_diameter": "area_fraction",
    "light_brown_colour": "frac_light_brown",
    "white_areas": "frac_white",
    "red_areas": "frac_red",
    "blue_white_veil": "frac_blue_white_veil",
    "irregular_dots_globules": "dots_irregularity",
    "sharp_demarcation": "border_sharpness",
    "asymmetric_colours_structures": "colour_structure_asymmetry",
}

#: Parameters of the structure measures of :func:`measure_abcd` (steps 6-11 of the module docstring).
#: Lengths are pixels and areas square pixels at a 256-pixel short image side (scaled with the image);
#: contrasts are CIE-L* units on the Shades-of-Gray normalised image.
STRUCTURE_PARAMS: dict[str, float] = {
    "tophat_radius": 4.0,  # structuring disk of the top-hats: structures narrower than ~9 px
    "hair_close_radius": 2.0,  # grey closing before the white top-hat (gaps between hairs are not bright)
    "interior_erosion": 3.0,  # dots must lie this far inside the lesion outline
    "blob_min_contrast": 10.0,  # black top-hat above this forms a candidate dot / globule
    "blob_min_area": 3.0,  # smaller candidates are noise (JPEG, sensor)
    "blob_max_area": 64.0,  # larger ones are areas, not dots (~ the disk of the top-hat)
    "blob_max_eccentricity": 0.9,  # round to oval, not a hair or a network line
    "blob_min_fill": 0.6,  # area / area of the moment ellipse: compact, not ragged
    "dots_min_count": 3.0,  # fewer dark blobs cannot be "irregularly distributed"
    "veil_min_norm_blue": 0.3,  # blue-white veil (after Celebi et al. 2008): B / (R + G + B) >= this ...
    "veil_red_drop_min": 51.0,  # ... and R at least this much (0-255) below the skin's mean R ...
    "veil_red_drop_max": 194.0,  # ... but not more than this
    "edge_sigma": 1.0,  # Gaussian smoothing of L* before the border gradient
    "edge_search_radius": 2.0,  # the gradient maximum is taken within this distance of the outline
    "edge_min_contrast": 5.0,  # floor of the skin - lesion L* contrast that normalises the gradient
    "structure_min_contrast": 10.0,  # dark / bright structure pixels for the colour-structure asymmetry
}

#: Percentile of the training distribution used as the positive threshold of each measure
#: (a value strictly above it is positive). ``colour_count`` is not a percentile: see
#: :func:`fit_abcd_thresholds`. Colour fractions also never go below :data:`COLOUR_PRESENCE_FRACTION`.
DEFAULT_PERCENTILES: dict[str, float] = {
    "asymmetry": 60.0,
    "border_irregularity": 60.0,
    "area_fraction": 70.0,
    "frac_blue_grey": 75.0,
    "frac_dark_brown_or_black": 60.0,
    "frac_light_brown": 40.0,
    "frac_white": 80.0,
    "frac_red": 80.0,
    "frac_blue_white_veil": 80.0,
    "dots_irregularity": 75.0,
    "border_sharpness": 60.0,
    "colour_structure_asymmetry": 60.0,
}

#: The structure measures (steps 6-10 of the module docstring); NaN if their computation failed.
_STRUCTURE_KEYS: tuple[str, ...] = (
    "frac_blue_white_veil",
    "dot_count",
    "dots_irregularity",
    "border_sharpness",
    "colour_structure_asymmetry",
)

#: Float measures returned by :func:`measure_abcd` (plus the bool ``segmentation_ok``).
MEASURE_KEYS: tuple[str, ...] = (
    "asymmetry",
    "asymmetry_max",
    "border_irregularity",
    "colour_count",
    *(f"frac_{c}" for c in ABCD_COLOURS),
    "frac_dark_brown_or_black",
    "area_fraction",
    *_STRUCTURE_KEYS,
)


# ---------------------------------------------------------------------------------------------------
# segmentation
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# measures
# ---------------------------------------------------------------------------------------------------


def _asymmetry(mask: np.ndarray) -> tuple[float, float]:
    """Per-principal-axis reflection mismatch ``1 - |A ∩ reflect(A)| / |A|``, (mean, max)."""
    coords = np.argwhere(mask).astype(np.float64)
    if len(coords) < 10:
        return 0.0, 0.0
    centre = coords.mean(axis=0)
    d = coords - centre
    cov = d.T @ d / len(d)
    _, vecs = np.linalg.eigh(cov)
    h, w = mask.shape
    values = []
    for k in range(2):
        e = vecs[:, k]
        reflect = 2.0 * np.outer(e, e) - np.eye(2)  # reflection about the line through centre along e
        p = d @ reflect.T + centre
        yi = np.rint(p[:, 0]).astype(int)
        xi = np.rint(p[:, 1]).astype(int)
        inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        hit = np.zeros(len(p), dtype=bool)
        hit[inside] = mask[yi[inside], xi[inside]]
        values.append(1.0 - hit.mean())
    return float(np.mean(values)), float(np.max(values))


def _border_irregularity(mask: np.ndarray) -> float:
    """``1 - 4πA/P²`` of the mask (perimeter by 8-neighbour contour length)."""
    from skimage.measure import perimeter

    area = float(mask.sum())
    if area < 10:
        return 0.0
    per = float(perimeter(mask, neighborhood=8))
    if per <= 0:
        return 0.0
    return float(np.clip(1.0 - 4.0 * math.pi * area / per**2, 0.0, 1.0))


def _shades_of_gray(img: np.ndarray, region: np.ndarray, p: float = 6.0) -> np.ndarray:
    """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004; Barata et al. 2015 for dermoscopy)."""
    px = img[region] if region.any() else img.reshape(-1, 3)
    illum = np.power(np.mean(np.power(np.clip(px, 1e-6, 1.0), p), axis=0), 1.0 / p)
    illum = illum / max(np.linalg.norm(illum), 1e-6)
    gain = 1.0 / (illum * math.sqrt(3.0))
    return np.clip(img * gain[None, None, :], 0.0, 1.0)


def classify_colours(lab: np.ndarray, skin_lightness: float) -> np.ndarray:
    """Assign each pixel one ABCD colour by :data:`COLOUR_RULES`.

    Args:
        lab: (..., 3) CIE-L*a*b* values of colour-normalised pixels.
        skin_lightness: median L* of the surrounding skin (``Ls`` in the rules).

    Returns:
        int array of shape ``lab.shape[:-1]``: index into :data:`ABCD_COLOURS`, or -1 for none.
    """
    p = COLOUR_PARAMS
    L, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    C = np.hypot(a, b)
    hue = np.degrees(np.arctan2(b, a)) % 360.0
    Ls = float(skin_lightness)
    out = np.full(L.shape, -1, dtype=np.int8)
    idx = {c: i for i, c in enumerate(ABCD_COLOURS)}
    warm = (hue >= p["brown_hue_min"]) & (hue < p["brown_hue_max"])
    not_black = L >= p["black_max_l"]
    rules = [
        ("black", ~not_black),
        ("white", (L > Ls + p["white_min_dl"]) & (C < p["white_max_c"])),
        (
            "blue_grey",
            not_black & (L < Ls - p["blue_grey_min_dl"]) & ((b < p["blue_grey_max_b"]) | (C < p["blue_grey_max_c"])),
        ),
        ("red", not_black & (L < Ls + 4.0) & (a > p["red_min_a"]) & ((hue < p["red_max_hue"]) | (hue > 330.0))),
        ("dark_brown", not_black & (L < p["dark_brown_max_l"]) & warm & (C >= p["dark_brown_min_c"])),
        (
            "light_brown",
            (L >= p["dark_brown_max_l"]) & (L < Ls - p["light_brown_min_dl"]) & warm & (C >= p["light_brown_min_c"]),
        ),
    ]
    for name, cond in rules:
        out[(out < 0) & cond] = idx[name]
    return out


def _disk(radius: float) -> np.ndarray:
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


def _structure_measures(
    norm: np.ndarray,
    lab: np.ndarray,
    mask: np.ndarray,
    lesion_px: np.ndarray,
    colour_map: np.ndarray,
    skin_px: np.ndarray,
    fov: np.ndarray,
    hair: np.ndarray,
) -> dict[str, float]:
    """Blue-white veil, dots / globules, border sharpness and colour-structure asymmetry.

    See steps 6-10 of the module docstring; ``colour_map`` holds the ABCD colour index of each pixel
    of ``mask`` (-1 for none). Never raises: a failure returns NaN for every structure measure.
    """
    try:
        return _structure_measures_impl(norm, lab, mask, lesion_px, colour_map, skin_px, fov, hair)
    except Exception as e:  # noqa: BLE001 - robustness is the contract here
        warnings.warn(f"structure measures failed: {type(e).__name__}: {e}", stacklevel=3)
        return {k: float("nan") for k in _STRUCTURE_KEYS}


def _structure_measures_impl(
    norm: np.ndarray,
    lab: np.ndarray,
    mask: np.ndarray,
    lesion_px: np.ndarray,
    colour_map: np.ndarray,
    skin_px: np.ndarray,
    fov: np.ndarray,
    hair: np.ndarray,
) -> dict[str, float]:
    from scipy import ndimage as ndi

    p = STRUCTURE_PARAMS
    h, w = mask.shape
    scale = min(h, w) / 256.0
    L = lab[..., 0]
    total = max(int(lesion_px.sum()), 1)
    out: dict[str, float] = {}

    # 6. blue-white veil: largest confluent area of bluish-whitish pixels (Celebi et al. 2008 rule)
    rgb255 = norm * 255.0
    skin_r = float(np.mean(rgb255[..., 0][skin_px])) if skin_px.any() else float(np.median(rgb255[..., 0]))
    norm_blue = rgb255[..., 2] / np.maximum(rgb255.sum(axis=-1), 1e-6)
    red_drop = skin_r - rgb255[..., 0]
    lesion_l = float(np.median(L[lesion_px])) if lesion_px.any() else 0.0
    veil = (
        lesion_px
        & (norm_blue >= p["veil_min_norm_blue"])
        & (red_drop >= p["veil_red_drop_min"])
        & (red_drop <= p["veil_red_drop_max"])
        & (L >= lesion_l)
    )
    veil = ndi.binary_opening(veil, structure=np.ones((2, 2)))
    vlab, nv = ndi.label(veil, structure=np.ones((3, 3)))
    out["frac_blue_white_veil"] = float(np.bincount(vlab.ravel())[1:].max()) / total if nv else 0.0

    # 7. top-hats; dark dots / globules inside the lesion
    radius = p["tophat_radius"] * scale
    interior = ndi.binary_erosion(mask, structure=_disk(p["interior_erosion"] * scale))
    if not interior.any():
        interior = mask
    interior = interior & fov
    dark_th = ndi.grey_closing(L, footprint=_disk(radius)) - L  # black top-hat: dark, narrower than the disk
    l_hairless = ndi.grey_closing(L, footprint=_disk(p["hair_close_radius"] * scale))
    bright_th = l_hairless - ndi.grey_opening(l_hairless, footprint=_disk(radius))  # white top-hat
    dlabels, kept_dark, dst = _round_blobs(dark_th, interior, scale)
    n_dots = len(kept_dark)
    out["dot_count"] = float(n_dots)

    # 8. irregular dots / globules: uneven sizes or uneven placement
    if n_dots >= p["dots_min_count"]:
        area = dst["area"]
        size_cv = float(np.std(area) / max(np.mean(area), 1e-6))
        my, mx = np.argwhere(mask).mean(axis=0)
        radius_lesion = math.sqrt(max(float(mask.sum()), 1.0) / math.pi)
        offset = math.hypot(float(np.mean(dst["cy"])) - my, float(np.mean(dst["cx"])) - mx) / radius_lesion
        out["dots_irregularity"] = size_cv + offset
    else:
        out["dots_irregularity"] = 0.0

    # 9. border sharpness: max L* gradient next to the outline / skin-lesion contrast
    smooth = ndi.gaussian_filter(L, sigma=p["edge_sigma"] * scale)
    gy, gx = np.gradient(smooth)
    gmax = ndi.maximum_filter(np.hypot(gy, gx), footprint=_disk(p["edge_search_radius"] * scale))
    outline = mask & ~ndi.binary_erosion(mask, structure=np.ones((3, 3)))
    margin = max(3, int(round(3 * scale)))
    valid_area = ndi.binary_erosion(fov, structure=_disk(margin)) & ~ndi.binary_dilation(hair, iterations=2)
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
    out["border_sharpness"] = scale * float(np.mean(gmax[edge])) / contrast if edge.any() else 0.0

    # 10. asymmetry of colours and structures about the principal axes. The hair mask also catches dark
    # dots (both are narrow dark structures), so dots found in step 7 are given back to the lesion.
    dots_px = np.isin(dlabels, kept_dark) if n_dots else np.zeros_like(mask)
    pixels = mask & ~(hair & ~dots_px)
    if pixels.sum() < 0.2 * mask.sum():
        pixels = mask
    ys, xs = np.nonzero(pixels)
    if len(ys) < 40:
        out["colour_structure_asymmetry"] = 0.0
        return out
    colours = colour_map[ys, xs].astype(np.int64)
    colours[colours < 0] = len(ABCD_COLOURS)  # "none of the six"
    thr = p["structure_min_contrast"]
    struct = np.full(len(ys), 2, dtype=np.int64)
    struct[bright_th[ys, xs] >= thr] = 1
    struct[dark_th[ys, xs] >= thr] = 0
    coords = np.argwhere(mask).astype(np.float64)
    centre = coords.mean(axis=0)
    d = coords - centre
    _, vecs = np.linalg.eigh(d.T @ d / len(d))
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
    out["colour_structure_asymmetry"] = float(np.mean(values))
    return out


def measure_abcd(rgb: np.ndarray, mask: np.ndarray | None = None) -> dict[str, Any]:
    """Measure asymmetry, border, colours, size and structures of the lesion in ``rgb``.

    Args:
        rgb: (H, W, 3) image, uint8 or float in [0, 1].
        mask: optional precomputed lesion mask; segmented with :func:`segment_lesion` when omitted.

    Returns:
        dict with floats ``asymmetry``, ``asymmetry_max``, ``border_irregularity``, ``colour_count``,
        ``frac_<colour>`` for each of :data:`ABCD_COLOURS`, ``frac_dark_brown_or_black``,
        ``area_fraction``, the structure measures ``frac_blue_white_veil``, ``dot_count``,
        ``dots_irregularity``, ``border_sharpness``, ``colour_structure_asymmetry`` (steps 6-10 of the
        module docstring; NaN only if their computation raised), ``skin_lightness`` and the bool
        ``segmentation_ok``. Never raises on image content.
    """
    from scipy import ndimage as ndi
    from skimage.color import rgb2lab
    from skimage.morphology import disk

    img = _as_float_rgb(rgb)
    h, w = img.shape[:2]
    if mask is None:
        mask, info = segment_lesion(img, return_info=True)
        ok = bool(info["ok"])
        fov, hair = info["fov"], info["hair"]
    else:
        mask = np.asarray(mask, dtype=bool)
        ok = bool(mask.any())
        fov = np.ones((h, w), dtype=bool)
        _, _, hair = _hair_and_lightness(img)
    if not mask.any():
        mask = _ellipse_mask((h, w))
        ok = False
    out: dict[str, Any] = {}
    out["asymmetry"], out["asymmetry_max"] = _asymmetry(mask)
    out["border_irregularity"] = _border_irregularity(mask)

    norm = _shades_of_gray(img, fov)
    lab = rgb2lab(norm)
    ring = ndi.binary_dilation(mask, structure=disk(max(3, int(round(min(h, w) / 25))))) & ~mask & fov & ~hair
    skin_px = ring if ring.sum() >= 50 else (fov & ~mask & ~hair)
    skin_l = float(np.median(lab[..., 0][skin_px])) if skin_px.any() else 70.0
    lesion_px = mask & ~hair
    if lesion_px.sum() < 0.2 * mask.sum():  # hair everywhere: use the whole lesion
        lesion_px = mask
    colour_map = np.full((h, w), -1, dtype=np.int8)
    colour_map[mask] = classify_colours(lab[mask], skin_l)
    colours = colour_map[lesion_px]
    total = max(int(lesion_px.sum()), 1)
    count = 0
    for i, name in enumerate(ABCD_COLOURS):
        frac = float(np.count_nonzero(colours == i)) / total
        out[f"frac_{name}"] = frac
        count += int(frac > COLOUR_PRESENCE_FRACTION)
    out["colour_count"] = float(count)
    out["frac_dark_brown_or_black"] = out["frac_dark_brown"] + out["frac_black"]
    out["area_fraction"] = float(mask.sum()) / float(h * w)
    out.update(_structure_measures(norm, lab, mask, lesion_px, colour_map, skin_px, fov, hair))
    out["skin_lightness"] = skin_l
    out["segmentation_ok"] = ok
    return out


# ---------------------------------------------------------------------------------------------------
# thresholds and concept labels
# ---------------------------------------------------------------------------------------------------


def fit_abcd_thresholds(
    measures: Sequence[Mapping[str, Any]],
    percentiles: Mapping[str, float] | None = None,
    min_colour_fraction: float = COLOUR_PRESENCE_FRACTION,
) -> dict[str, float]:
    """Fit the concept thresholds on *training* measurements (never on validation or test data).

    Each measure in ``percentiles`` (default :data:`DEFAULT_PERCENTILES`) gets the given percentile of
    its training distribution; colour fractions (``frac_*``, including ``frac_blue_white_veil``) never
    go below ``min_colour_fraction`` (a colour must cover a visible part of the lesion). Count-like
    measures with many zeros (``dots_irregularity`` is 0 with fewer than 3 dots) can get a threshold of
    0, which then means "any". ``colour_count`` is fixed at 2.5 by definition: the ABCD rule's
    "multiple colours" means three or more of the six colours. Images whose segmentation failed are
    left out of the fit when any succeeded.

    Args:
        measures: dicts from :func:`measure_abcd` for the training images.
        percentiles: measure name -> percentile in [0, 100]; merged over the defaults.
        min_colour_fraction: floor for ``frac_*`` thresholds.

    Returns:
        measure name -> threshold; a measure strictly above its threshold is a positive concept.
    """
    pct = dict(DEFAULT_PERCENTILES)
    if percentiles:
        pct.update(percentiles)
    rows = [m for m in measures if bool(m.get("segmentation_ok", True))] or list(measures)
    if not rows:
        raise ValueError("fit_abcd_thresholds needs at least one training measurement")
    thresholds: dict[str, float] = {"colour_count": 2.5}
    for key, q in pct.items():
        values = np.array([float(m[key]) for m in rows if _finite(m.get(key))], dtype=np.float64)
        if not values.size:
            raise ValueError(f"no finite values of {key!r} to fit a threshold on")
        thr = float(np.percentile(values, q))
        if key.startswith("frac_"):
            thr = max(thr, float(min_colour_fraction))
        thresholds[key] = thr
    return thresholds


def abcd_concept_labels(
    measures: Mapping[str, Any],
    thresholds: Mapping[str, float],
    unknown_if_failed: bool = True,
) -> dict[str, float]:
    """Binary labels (1.0 / 0.0) of the measured concepts of :data:`MEASURED_CONCEPTS`.

    Args:
        measures: a dict from :func:`measure_abcd` (or a cached row of it).
        thresholds: from :func:`fit_abcd_thresholds`; a measure strictly above its threshold is positive.
        unknown_if_failed: when the segmentation failed (``segmentation_ok`` false), return NaN
            ("unknown") for every concept instead of labels measured on the fallback ellipse.

    Returns:
        concept id -> 1.0, 0.0 or NaN.
    """
    failed = not _truthy(measures.get("segmentation_ok", True))
    out: dict[str, float] = {}
    for cid, key in MEASURED_CONCEPTS.items():
        if key not in thresholds:
            raise KeyError(f"no threshold for {key!r} (concept {cid!r}); fit with fit_abcd_thresholds")
        value = measures.get(key)
        if key == "frac_dark_brown_or_black" and value is None:
            value = float(measures["frac_dark_brown"]) + float(measures["frac_black"])
        if (failed and unknown_if_failed) or not _finite(value):
            out[cid] = float("nan")
        else:
            out[cid] = 1.0 if float(value) > float(thresholds[key]) else 0.0
    return out


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


# ---------------------------------------------------------------------------------------------------
# ISIC 2017 manifest with cached measurements
# ---------------------------------------------------------------------------------------------------

_CACHE_FIELDS = ("sha256", "image_id", "measure_version", *MEASURE_KEYS, "skin_lightness", "segmentation_ok")


def _resolve_isic_root(root: str | os.PathLike | None) -> Path:
    from medcbm.datasets.paths import resolve_dataset_dir  # lazy: keeps this module importable alone

    return resolve_dataset_dir(root, "isic2017_256")


def _default_cache_dir() -> Path:
    return Path(os.path.expanduser("~")) / ".cache" / "medcbm"


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    out: dict[str, dict[str, Any]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row.get("measure_version") != MEASURE_VERSION or not row.get("sha256"):
                    continue
                try:
                    m: dict[str, Any] = {k: float(row[k]) for k in (*MEASURE_KEYS, "skin_lightness")}
                except (KeyError, TypeError, ValueError):
                    continue  # a damaged or older row: measure again
                m["segmentation_ok"] = _truthy(row.get("segmentation_ok"))
                out[row["sha256"]] = m
    except (OSError, csv.Error) as e:
        warnings.warn(f"ignoring unreadable measurement cache {path}: {e}", stacklevel=3)
        return {}
    return out


def _write_cache(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(_CACHE_FIELDS), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (int(bool(row[k])) if k == "segmentation_ok" else row[k]) for k in _CACHE_FIELDS})
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _attach_expert_labels(base: list[dict[str, Any]], data_root: Path, folder: str | os.PathLike | bool) -> None:
    """Add the expert structure concepts to each record (NaN where the table has no row)."""
    import logging

    from medcbm.datasets.isic2017_features import (
        EXPERT_FEATURE_CONCEPTS,
        EXPERT_FEATURES_DIR,
        isic2017_expert_labels,
    )

    path = data_root.parent / EXPERT_FEATURES_DIR if folder is True else Path(folder)
    table: dict[str, dict[str, Any]] = {}
    if (path / "labels.csv").is_file():
        table = isic2017_expert_labels(path)
    elif folder is not True:
        raise FileNotFoundError(f"expert feature table not found: {path / 'labels.csv'}")
    else:
        logging.getLogger(__name__).info(
            "no %s next to %s: expert concepts left unlabelled", EXPERT_FEATURES_DIR, data_root
        )
    for b in base:
        row = table.get(b["image_id"])
        if row is not None and row["sha256"] != b["sha256"]:
            raise ValueError(
                f"{path / 'labels.csv'}: {b['image_id']} has image_sha256 {row['sha256']}, "
                f"but {b['image']} hashes to {b['sha256']}"
            )
        for concept in EXPERT_FEATURE_CONCEPTS.values():
            b[concept] = row[concept] if row is not None else float("nan")


def _carve_val(train_rows: Sequence[Mapping[str, Any]], val_fraction: float, seed: int) -> set[str]:
    """Image ids moved from the original train split to "val", stratified by class, deterministic."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    by_class: dict[str, list[str]] = {}
    for r in train_rows:
        by_class.setdefault(r["label"], []).append(r["image_id"])
    for cls in sorted(by_class):
        ids = sorted(by_class[cls])
        n_val = int(round(len(ids) * val_fraction))
        if val_fraction > 0 and len(ids) > 1:
            n_val = min(max(n_val, 1), len(ids) - 1)
        order = rng.permutation(len(ids))
        chosen.update(ids[i] for i in order[:n_val])
    return chosen


def isic2017_records(
    root: str | os.PathLike | None = None,
    splits: Sequence[str] | str = ("train", "val", "test"),
    cache_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.15,
    seed: int = 0,
    return_thresholds: bool = False,
    expert_features: str | os.PathLike | bool = True,
) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], dict[str, float]]:
    """The ISIC 2017 manifest with measured ABCD features, measured and expert concept labels.

    Splits: the dataset's own ``val`` split (150 images) is the held-out ``"test"`` split here; ``"val"``
    (for model selection) is carved out of the original ``train`` split, stratified by class and
    deterministic in ``seed``; the rest is ``"train"``. Concept thresholds are fitted on the carved
    ``"train"`` part only, whatever ``splits`` asks for. A train image byte-identical to a test image
    (ISIC 2017 has one: ISIC_0012970 = ISIC_0012127) or to another train image is dropped.

    Measurements of all images are cached in ``cache_dir/isic2017_abcd.csv`` (default
    ``~/.cache/medcbm``), keyed by the SHA-256 of the image bytes and :data:`MEASURE_VERSION`, so a
    changed file or algorithm is re-measured; the cache is written atomically.

    Args:
        root: the folder holding ``labels.csv`` (or its parent); default
            ``medcbm.datasets.paths.shared_data_root() / "isic2017_256"``.
        splits: which of ``"train"``, ``"val"``, ``"test"`` to return.
        cache_dir: folder of the measurement cache.
        val_fraction: fraction of each class of the original train split moved to ``"val"``.
        seed: seed of the stratified carve.
        return_thresholds: also return the fitted thresholds.
        expert_features: the ``isic2017_features`` folder of expert structure labels
            (:mod:`medcbm.datasets.isic2017_features`); ``True`` looks for it next to the image folder
            (absent: the expert concepts are NaN for every image), ``False`` leaves them out.

    Returns:
        One dict per image, sorted by split then image id: ``image`` (absolute path), ``label`` (class
        name), ``split``, ``image_id``, ``sha256``, ``dataset``, ``age``, ``sex``, the measures of
        :func:`measure_abcd` and the concept labels of :data:`MEASURED_CONCEPTS` (NaN when the
        segmentation failed), and the expert concepts of
        :data:`~medcbm.datasets.isic2017_features.EXPERT_FEATURE_CONCEPTS` (NaN for images the expert
        table does not cover); with ``return_thresholds`` a ``(records, thresholds)`` tuple.

    Raises:
        ValueError: an expert label's image hash differs from the image's (names both files).
    """
    import logging
    import time

    from medcbm.datasets.paths import check_splits, sha256_file

    log = logging.getLogger(__name__)
    wanted = check_splits(splits, ("train", "val", "test"))
    data_root = _resolve_isic_root(root)
    with open(data_root / "labels.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    base: list[dict[str, Any]] = []
    for r in rows:
        label = str(r["diagnosis"]).strip()
        if label not in ISIC2017_CLASSES:
            raise ValueError(f"{data_root / 'labels.csv'}: unknown diagnosis {label!r} for {r.get('image_id')}")
        orig = str(r["split"]).strip()
        if orig not in ("train", "val"):
            raise ValueError(f"{data_root / 'labels.csv'}: unknown split {orig!r} for {r.get('image_id')}")
        path = (data_root / r["file"]).resolve()
        base.append(
            {
                "image": str(path),
                "label": label,
                "split": "test" if orig == "val" else "train",
                "image_id": r["image_id"],
                "dataset": "isic2017_256",
                "age": float(r["age_approximate"]) if _finite(r.get("age_approximate")) else float("nan"),
                "sex": (r.get("sex") or "").strip() or "unknown",
            }
        )
    for b in base:
        if not Path(b["image"]).is_file():
            raise FileNotFoundError(f"image listed in labels.csv is missing: {b['image']}")
        b["sha256"] = sha256_file(b["image"])
    # byte-identical copies: a training image equal to a held-out test image would leak it
    test_sha = {b["sha256"] for b in base if b["split"] == "test"}
    seen: set[str] = set()
    kept: list[dict[str, Any]] = []
    for b in sorted(base, key=lambda b: (b["split"] != "test", b["image_id"])):
        if b["split"] != "test" and (b["sha256"] in test_sha or b["sha256"] in seen):
            log.info("dropping %s (%s): byte-identical to an image already kept", b["image_id"], b["split"])
            continue
        seen.add(b["sha256"])
        kept.append(b)
    base = kept
    val_ids = _carve_val([b for b in base if b["split"] == "train"], val_fraction, seed)
    for b in base:
        if b["image_id"] in val_ids:
            b["split"] = "val"

    cache_path = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    cache_path = cache_path / "isic2017_abcd.csv"
    cache = _read_cache(cache_path)
    new = 0
    t0 = time.perf_counter()
    for b in base:
        sha = b["sha256"]
        m = cache.get(sha)
        if m is None:
            m = measure_abcd(_load_rgb(Path(b["image"])))
            cache[sha] = {k: m[k] for k in (*MEASURE_KEYS, "skin_lightness", "segmentation_ok")}
            new += 1
            if new % 250 == 0:
                log.info("measured %d images (%.1f s)", new, time.perf_counter() - t0)
        b.update(cache[sha])
    if new:
        log.info("measured %d images in %.1f s; caching in %s", new, time.perf_counter() - t0, cache_path)
        by_sha = {b["sha256"]: b for b in base}
        _write_cache(
            cache_path,
            (
                {
                    **cache[sha],
                    "sha256": sha,
                    "image_id": by_sha.get(sha, {}).get("image_id", ""),
                    "measure_version": MEASURE_VERSION,
                }
                for sha in sorted(cache)
            ),
        )
    thresholds = fit_abcd_thresholds([b for b in base if b["split"] == "train"])
    for b in base:
        b.update(abcd_concept_labels(b, thresholds))
    if expert_features is not False:
        _attach_expert_labels(base, data_root, expert_features)
    order = {"train": 0, "val": 1, "test": 2}
    out = sorted((b for b in base if b["split"] in wanted), key=lambda b: (order[b["split"]], b["image_id"]))
    return (out, thresholds) if return_thresholds else out

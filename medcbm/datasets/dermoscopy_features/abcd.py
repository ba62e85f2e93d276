# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""ABCD measures of a dermoscopy image: asymmetry, border, colours, size (steps 2-5 of the package docstring).

:func:`measure_abcd` is the entry point: it segments the lesion (:mod:`.segmentation`), measures the
outline and the ABCD colours here, and adds the structure measures of :mod:`.structures`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .constants import ABCD_COLOURS, COLOUR_PARAMS, COLOUR_PRESENCE_FRACTION
from .segmentation import _as_float_rgb, _ellipse_mask, _hair_and_lightness, _principal_axes, segment_lesion
from .structures import _LesionArrays, _structure_measures

__all__ = ["classify_colours", "measure_abcd"]


def _asymmetry(mask: np.ndarray) -> tuple[float, float]:
    """Per-principal-axis reflection mismatch ``1 - |A ∩ reflect(A)| / |A|``, (mean, max)."""
    if np.count_nonzero(mask) < 10:
        return 0.0, 0.0
    centre, d, vecs = _principal_axes(mask)
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
    out.update(_structure_measures(_LesionArrays(norm, lab, mask, lesion_px, colour_map, skin_px, fov, hair)))
    out["skin_lightness"] = skin_l
    out["segmentation_ok"] = ok
    return out

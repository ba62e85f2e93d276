# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Constants of the measured dermoscopy features: colours, concepts, parameters, measure keys.

Shared by every module of :mod:`medcbm.datasets.dermoscopy_features`; the measurement algorithm is
described in the package docstring.
"""

from __future__ import annotations

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

#: Parameters of the structure measures of :func:`measure_abcd` (steps 6-10 of the package docstring).
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

#: The structure measures (steps 6-10 of the package docstring); NaN if their computation failed.
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

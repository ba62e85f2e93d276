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

Modules of this package (everything public is re-exported here, so import from the package):

* :mod:`.constants`: colours, colour rules, measured concepts, parameters, :data:`MEASURE_KEYS`.
* :mod:`.segmentation`: :func:`segment_lesion` (step 1) and the mask geometry it shares.
* :mod:`.abcd`: :func:`measure_abcd` and :func:`classify_colours` (steps 2-5).
* :mod:`.structures`: the structure measures (steps 6-10).
* :mod:`.thresholds`: :func:`fit_abcd_thresholds`, :func:`abcd_concept_labels`.
* :mod:`.cache`: the CSV cache of measurements keyed by image hash and :data:`MEASURE_VERSION`.
* :mod:`.isic2017_manifest`: :func:`isic2017_records`.

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

from .abcd import classify_colours, measure_abcd
from .constants import (
    ABCD_COLOURS,
    COLOUR_PARAMS,
    COLOUR_PRESENCE_FRACTION,
    COLOUR_RULES,
    DEFAULT_PERCENTILES,
    ISIC2017_CLASSES,
    MEASURE_KEYS,
    MEASURE_VERSION,
    MEASURED_CONCEPTS,
    STRUCTURE_PARAMS,
)
from .isic2017_manifest import isic2017_records
from .segmentation import segment_lesion
from .thresholds import abcd_concept_labels, fit_abcd_thresholds

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

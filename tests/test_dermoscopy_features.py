# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Measured ABCD features: segmentation, measures, thresholds, the ISIC 2017 manifest, the derm concept bank."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medcbm.concepts import load_concept_bank
from medcbm.datasets import dermoscopy_features as df
from medcbm.datasets.dermoscopy_features import cache as df_cache
from medcbm.datasets.dermoscopy_features import isic2017_manifest as df_manifest
from medcbm.datasets.dermoscopy_features import structures as df_structures

REPO = Path(__file__).resolve().parents[1]
DERM_BANK = REPO / "bundles" / "derm_cbm" / "configs" / "concepts.yaml"
H = W = 256
SKIN = (222, 184, 165)
BROWN = (120, 72, 45)


# ---- synthetic images ------------------------------------------------------------------------------


def _grid() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:H, 0:W]
    return yy - (H - 1) / 2.0, xx - (W - 1) / 2.0


def _ellipse(ry: float = 45, rx: float = 65, cy: float = 0, cx: float = 0) -> np.ndarray:
    yy, xx = _grid()
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _paint(mask: np.ndarray, colour=BROWN, background=SKIN, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.empty((H, W, 3), dtype=np.float64)
    img[:] = background
    img[mask] = colour
    img += rng.normal(0, 3.0, img.shape)  # mild sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def _irregular_blob() -> np.ndarray:
    yy, xx = _grid()
    theta = np.arctan2(yy, xx)
    radius = 55 + 14 * np.sin(7 * theta) + 9 * np.sin(3 * theta + 1.0) + 6 * np.cos(11 * theta)
    return np.hypot(yy, xx) <= radius


def _lopsided() -> np.ndarray:
    return _ellipse(40, 40) | _ellipse(22, 30, cy=30, cx=45)


def _vignetted(img: np.ndarray) -> np.ndarray:
    """Darken outside a centred circle to near-black corners, as a dermoscope's vignetting does."""
    yy, xx = _grid()
    r = np.hypot(yy, xx) / (W / 2.0)
    gain = np.clip(1.0 - (r - 0.9) / 0.25, 0.06, 1.0)
    return np.clip(img * gain[..., None], 0, 255).astype(np.uint8)


# ---- segmentation ----------------------------------------------------------------------------------


def test_segment_dark_ellipse_on_skin():
    truth = _ellipse()
    mask, info = df.segment_lesion(_paint(truth), return_info=True)
    assert mask.dtype == bool and mask.shape == (H, W)
    assert info["ok"]
    assert _iou(mask, truth) > 0.9


def test_segmentation_ignores_dark_corners():
    truth = _ellipse(30, 38)
    img = _vignetted(_paint(truth))
    mask, info = df.segment_lesion(img, return_info=True)
    assert info["ok"]
    assert _iou(mask, truth) > 0.85
    corners = np.zeros((H, W), dtype=bool)
    for sy in (slice(0, 30), slice(H - 30, H)):
        for sx in (slice(0, 30), slice(W - 30, W)):
            corners[sy, sx] = True
    assert not (mask & corners).any()
    assert not info["fov"][corners].any()  # the corners are recognised as outside the field of view


def test_segmentation_prefers_central_lesion_over_border_blob():
    truth = _ellipse(30, 30)
    img = _paint(truth)
    edge = _ellipse(25, 25, cy=-110, cx=-110)  # a dark smudge in a corner
    img[edge] = (60, 40, 30)
    mask = df.segment_lesion(img)
    assert _iou(mask, truth) > 0.85


@pytest.mark.parametrize(
    "img",
    [
        np.full((H, W, 3), 200, dtype=np.uint8),  # flat skin, no lesion
        np.zeros((H, W, 3), dtype=np.uint8),  # all black
        np.full((H, W, 3), np.nan),  # garbage floats
    ],
    ids=["flat", "black", "nan"],
)
def test_segmentation_fallback_never_crashes(img):
    mask, info = df.segment_lesion(img, return_info=True)
    assert not info["ok"] and info["reason"]
    assert mask.shape == (H, W) and mask.any()
    m = df.measure_abcd(img)
    assert m["segmentation_ok"] is False
    assert all(math.isfinite(m[k]) for k in df.MEASURE_KEYS)


def test_segment_accepts_float_and_grey_input():
    truth = _ellipse()
    img = _paint(truth)
    assert _iou(df.segment_lesion(img.astype(np.float32) / 255.0), truth) > 0.9
    grey = img.mean(axis=-1).astype(np.uint8)
    assert _iou(df.segment_lesion(grey), truth) > 0.9


# ---- measures --------------------------------------------------------------------------------------


def test_measures_keys_and_ranges():
    m = df.measure_abcd(_paint(_ellipse()))
    for k in df.MEASURE_KEYS:
        assert isinstance(m[k], float), k
        assert math.isfinite(m[k]), k
    assert isinstance(m["segmentation_ok"], bool) and m["segmentation_ok"]
    for k in ("asymmetry", "asymmetry_max", "border_irregularity", "area_fraction"):
        assert 0.0 <= m[k] <= 1.0
    assert 0.0 <= sum(m[f"frac_{c}"] for c in df.ABCD_COLOURS) <= 1.0 + 1e-9
    assert m["area_fraction"] == pytest.approx(_ellipse().mean(), rel=0.1)


def test_symmetric_ellipse_has_low_asymmetry():
    m = df.measure_abcd(_paint(_ellipse(40, 70)))
    assert m["asymmetry"] < 0.05
    assert m["asymmetry_max"] < 0.08


def test_lopsided_shape_more_asymmetric_than_ellipse():
    ell = df.measure_abcd(_paint(_ellipse(40, 70)))
    lop = df.measure_abcd(_paint(_lopsided()))
    assert lop["asymmetry"] > ell["asymmetry"] + 0.1


def test_irregular_blob_has_higher_border_irregularity():
    ell = df.measure_abcd(_paint(_ellipse()))
    blob = df.measure_abcd(_paint(_irregular_blob()))
    assert blob["border_irregularity"] > ell["border_irregularity"] + 0.1


def test_blue_grey_patch_detected():
    lesion = _ellipse(50, 60)
    img = _paint(lesion)
    patch = lesion & _ellipse(25, 30, cx=20)
    img[patch] = (95, 105, 125)  # slate blue-grey
    m = df.measure_abcd(img)
    assert m["segmentation_ok"]
    assert m["frac_blue_grey"] > 0.2
    plain = df.measure_abcd(_paint(lesion))
    assert plain["frac_blue_grey"] < 0.02
    labels = df.abcd_concept_labels(m, df.fit_abcd_thresholds([plain, m]))
    assert labels["blue_grey_areas"] == 1.0


def test_colour_rules_on_reference_pixels():
    from skimage.color import rgb2lab

    skin_l = 75.0
    refs = {
        "black": (20, 15, 15),
        "dark_brown": (95, 55, 30),
        "light_brown": (170, 115, 70),
        "blue_grey": (90, 100, 120),
        "red": (190, 60, 60),
        "white": (245, 245, 245),
    }
    lab = rgb2lab(np.array([list(refs.values())], dtype=np.float64) / 255.0)[0]
    got = df.classify_colours(lab, skin_l)
    assert [df.ABCD_COLOURS[i] for i in got] == list(refs)
    assert set(df.COLOUR_RULES) == set(df.ABCD_COLOURS)


def test_multicoloured_lesion_counts_colours():
    lesion = _ellipse(60, 70)
    img = _paint(lesion, colour=(170, 115, 70))  # light brown
    yy, xx = _grid()
    img[lesion & (xx < -25)] = (70, 40, 25)  # dark brown
    img[lesion & (xx > 30)] = (90, 100, 120)  # blue-grey
    img[lesion & (yy > 30) & (np.abs(xx) < 20)] = (15, 12, 12)  # black
    m = df.measure_abcd(img)
    assert m["colour_count"] >= 3
    one = df.measure_abcd(_paint(lesion, colour=(170, 115, 70)))
    assert one["colour_count"] <= 2


def test_measure_with_given_mask():
    truth = _ellipse()
    m = df.measure_abcd(_paint(truth), mask=truth)
    assert m["area_fraction"] == pytest.approx(truth.mean())
    assert m["segmentation_ok"]


# ---- structure measures ----------------------------------------------------------------------------

STRUCTURE_KEYS = (
    "frac_blue_white_veil",
    "dot_count",
    "dots_irregularity",
    "border_sharpness",
    "colour_structure_asymmetry",
)
LIGHT_BROWN = (170, 120, 85)
DOT = (60, 40, 30)


def _disk_at(cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = _grid()
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _dotted(centres_radii, colour=DOT) -> np.ndarray:
    img = _paint(_ellipse(60, 70), colour=LIGHT_BROWN).astype(np.float64)
    for (cy, cx), r in centres_radii:
        img[_disk_at(cy, cx, r)] = colour
    return np.clip(img, 0, 255).astype(np.uint8)


def test_structure_keys_are_measured_and_documented():
    assert set(STRUCTURE_KEYS) <= set(df.MEASURE_KEYS)
    for cid, key in (
        ("blue_white_veil", "frac_blue_white_veil"),
        ("irregular_dots_globules", "dots_irregularity"),
        ("sharp_demarcation", "border_sharpness"),
        ("asymmetric_colours_structures", "colour_structure_asymmetry"),
    ):
        assert df.MEASURED_CONCEPTS[cid] == key
        assert key in df.DEFAULT_PERCENTILES
        assert key in df.__doc__ and cid in df.__doc__
    m = df.measure_abcd(_paint(_ellipse()))
    for k in STRUCTURE_KEYS:
        assert isinstance(m[k], float) and math.isfinite(m[k]) and m[k] >= 0.0, k


def test_blue_white_veil_needs_a_confluent_bluish_whitish_area():
    lesion = _ellipse(60, 70)
    img = _paint(lesion).astype(np.float64)
    patch = lesion & _ellipse(30, 35, cx=15)
    img[patch] = (120, 140, 175)  # bluish, lighter than the brown lesion
    veil = df.measure_abcd(np.clip(img, 0, 255).astype(np.uint8))
    assert veil["segmentation_ok"]
    assert veil["frac_blue_white_veil"] > 0.15
    plain = df.measure_abcd(_paint(lesion))
    assert plain["frac_blue_white_veil"] < 0.01
    # the same colour scattered as isolated specks is not a confluent veil
    specks = _paint(lesion).astype(np.float64)
    yy, xx = _grid()
    grid = lesion & (np.mod(np.rint(yy), 8) < 2) & (np.mod(np.rint(xx), 8) < 2)
    specks[grid] = (120, 140, 175)
    scattered = df.measure_abcd(np.clip(specks, 0, 255).astype(np.uint8))
    assert scattered["frac_blue_white_veil"] < 0.02
    thr = df.fit_abcd_thresholds([plain, scattered, veil])
    assert thr["frac_blue_white_veil"] >= df.COLOUR_PRESENCE_FRACTION
    assert df.abcd_concept_labels(veil, thr)["blue_white_veil"] == 1.0
    assert df.abcd_concept_labels(plain, thr)["blue_white_veil"] == 0.0


def test_dots_are_counted_and_hair_is_not():
    centres = [((-30, -30), 2.5), ((-20, 25), 2.5), ((10, -40), 2.5), ((25, 10), 2.5), ((0, 0), 2.5)]
    m = df.measure_abcd(_dotted(centres))
    assert m["dot_count"] == 5
    assert df.measure_abcd(_paint(_ellipse(60, 70), colour=LIGHT_BROWN))["dot_count"] == 0
    hairy = _paint(_ellipse(60, 70), colour=LIGHT_BROWN)
    yy, xx = _grid()
    hairy[np.abs(yy - 0.4 * xx - 5) < 1.0] = (40, 30, 25)  # one long thin dark hair across the lesion
    assert df.measure_abcd(hairy)["dot_count"] <= 1


def test_irregular_dots_score_higher_than_regular_dots():
    ring = [((35 * np.sin(t), 45 * np.cos(t)), 2.5) for t in np.linspace(0, 2 * np.pi, 8, endpoint=False)]
    regular = df.measure_abcd(_dotted(ring))
    clustered = [((-20, 30), 1.3), ((-10, 40), 3.5), ((5, 35), 1.5), ((20, 45), 4.0), ((-25, 50), 2.0)]
    irregular = df.measure_abcd(_dotted(clustered))  # mixed sizes, all on one side
    assert regular["dot_count"] >= 6 and irregular["dot_count"] >= 4
    assert regular["dots_irregularity"] < 0.3
    assert irregular["dots_irregularity"] > regular["dots_irregularity"] + 0.5
    two = df.measure_abcd(_dotted(clustered[:2]))
    assert two["dots_irregularity"] == 0.0  # fewer than 3 dots cannot be irregularly distributed
    thr = df.fit_abcd_thresholds([regular, two, irregular], percentiles={"dots_irregularity": 50.0})
    assert df.abcd_concept_labels(irregular, thr)["irregular_dots_globules"] == 1.0
    assert df.abcd_concept_labels(regular, thr)["irregular_dots_globules"] == 0.0


def _edge_image(blur: float) -> np.ndarray:
    from scipy import ndimage as ndi

    alpha = _ellipse(55, 65).astype(np.float64)
    if blur > 0:
        alpha = ndi.gaussian_filter(alpha, blur)
    img = np.array(SKIN, dtype=np.float64) * (1 - alpha[..., None]) + np.array(BROWN) * alpha[..., None]
    img += np.random.default_rng(0).normal(0, 3.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_sharp_edge_scores_higher_than_blurred_edge():
    sharp, soft, softer = (df.measure_abcd(_edge_image(b)) for b in (0.0, 2.0, 4.0))
    assert all(m["segmentation_ok"] for m in (sharp, soft, softer))
    assert sharp["border_sharpness"] > 0.25
    assert sharp["border_sharpness"] > soft["border_sharpness"] + 0.08
    assert soft["border_sharpness"] > softer["border_sharpness"] + 0.02
    # normalised by contrast: a fainter but equally sharp lesion is about as sharp
    faint = _paint(_ellipse(55, 65), colour=(170, 120, 90))
    assert df.measure_abcd(faint)["border_sharpness"] == pytest.approx(sharp["border_sharpness"], rel=0.25)
    thr = df.fit_abcd_thresholds([sharp, soft, softer])
    assert df.abcd_concept_labels(sharp, thr)["sharp_demarcation"] == 1.0
    assert df.abcd_concept_labels(softer, thr)["sharp_demarcation"] == 0.0


def test_colour_structure_asymmetry():
    lesion = _ellipse(60, 70)
    yy, xx = _grid()
    two_tone = _paint(lesion, colour=(70, 40, 25))  # dark brown ...
    two_tone[lesion & (xx > 0)] = (90, 100, 120)  # ... and a blue-grey half
    concentric = _paint(lesion, colour=(90, 100, 120))
    concentric[_ellipse(30, 35)] = (70, 40, 25)  # dark centre, blue-grey rim: symmetric
    uniform = df.measure_abcd(_paint(lesion))
    halves = df.measure_abcd(two_tone)
    rings = df.measure_abcd(concentric)
    assert uniform["colour_structure_asymmetry"] < 0.03
    assert rings["colour_structure_asymmetry"] < 0.05
    assert halves["colour_structure_asymmetry"] > 0.2  # about one axis: colour distance ~1, averaged
    assert halves["asymmetry"] < 0.05  # the outline itself is symmetric
    # structures: dots on one half only
    right = [(cy, cx) for cy in range(-48, 49, 12) for cx in range(10, 70, 12) if (cy / 55) ** 2 + (cx / 65) ** 2 < 0.8]
    one_side = df.measure_abcd(_dotted([(c, 3.0) for c in right]))
    both_sides = df.measure_abcd(_dotted([(c, 3.0) for c in right] + [((cy, -cx), 3.0) for cy, cx in right]))
    assert one_side["dot_count"] >= 15
    assert one_side["colour_structure_asymmetry"] > both_sides["colour_structure_asymmetry"] + 0.03
    thr = df.fit_abcd_thresholds([uniform, rings, halves])
    assert df.abcd_concept_labels(halves, thr)["asymmetric_colours_structures"] == 1.0


def test_structure_failure_gives_nan_not_a_crash(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("synthetic failure")

    monkeypatch.setattr(df_structures, "_structure_measures_impl", boom)
    with pytest.warns(UserWarning, match="structure measures failed"):
        m = df.measure_abcd(_paint(_ellipse()))
    assert m["segmentation_ok"]
    assert all(math.isnan(m[k]) for k in STRUCTURE_KEYS)
    assert math.isfinite(m["asymmetry"])
    thr = df.fit_abcd_thresholds(_fake_measures(50))
    lab = df.abcd_concept_labels(m, thr)
    assert math.isnan(lab["sharp_demarcation"]) and math.isnan(lab["blue_white_veil"])
    assert lab["asymmetric_shape"] in (0.0, 1.0)


# ---- thresholds and labels -------------------------------------------------------------------------


def _fake_measures(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        m = {k: float(rng.uniform(0, 1)) for k in df.MEASURE_KEYS}
        m["colour_count"] = float(rng.integers(1, 6))
        m["frac_dark_brown_or_black"] = m["frac_dark_brown"] + m["frac_black"]
        m["segmentation_ok"] = True
        out.append(m)
    return out


def test_fit_thresholds_percentiles_and_floor():
    train = _fake_measures(200)
    thr = df.fit_abcd_thresholds(train)
    assert set(df.MEASURED_CONCEPTS.values()) <= set(thr)
    assert thr["colour_count"] == 2.5
    vals = np.array([m["asymmetry"] for m in train])
    assert thr["asymmetry"] == pytest.approx(np.percentile(vals, df.DEFAULT_PERCENTILES["asymmetry"]))
    zeros = [dict(m, frac_white=0.0) for m in train]
    assert df.fit_abcd_thresholds(zeros)["frac_white"] == df.COLOUR_PRESENCE_FRACTION
    custom = df.fit_abcd_thresholds(train, percentiles={"asymmetry": 90.0})
    assert custom["asymmetry"] > thr["asymmetry"]
    failed = [dict(m, segmentation_ok=False, asymmetry=100.0) for m in train[:5]]
    assert df.fit_abcd_thresholds(train + failed)["asymmetry"] == pytest.approx(thr["asymmetry"])
    with pytest.raises(ValueError):
        df.fit_abcd_thresholds([])


def test_concept_labels_binary_and_unknown_when_failed():
    train = _fake_measures(100)
    thr = df.fit_abcd_thresholds(train)
    lab = df.abcd_concept_labels(train[0], thr)
    assert set(lab) == set(df.MEASURED_CONCEPTS)
    assert all(v in (0.0, 1.0) for v in lab.values())
    assert df.abcd_concept_labels(dict(train[0], colour_count=3.0), thr)["multiple_colours"] == 1.0
    assert df.abcd_concept_labels(dict(train[0], colour_count=2.0), thr)["multiple_colours"] == 0.0
    failed = dict(train[0], segmentation_ok=False)
    assert all(math.isnan(v) for v in df.abcd_concept_labels(failed, thr).values())
    assert all(v in (0.0, 1.0) for v in df.abcd_concept_labels(failed, thr, unknown_if_failed=False).values())
    with pytest.raises(KeyError):
        df.abcd_concept_labels(train[0], {"asymmetry": 0.1})


# ---- ISIC 2017 manifest on a tiny fake copy --------------------------------------------------------


def _fake_isic(root: Path, n_train: dict[str, int], n_val: dict[str, int]) -> Path:
    folder = root / "isic2017_256"
    rows = []
    k = 0
    for split, counts in (("train", n_train), ("val", n_val)):
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        for cls, n in counts.items():
            for _ in range(n):
                iid = f"ISIC_{k:07d}"
                rel = f"images/{split}/{iid}.png"
                shape = _ellipse(25 + (k % 5) * 6, 35 + (k % 7) * 4) if k % 3 else _lopsided()
                Image.fromarray(_paint(shape, seed=k)).save(folder / rel)
                rows.append(
                    {
                        "image_id": iid,
                        "file": rel,
                        "split": split,
                        "diagnosis": cls,
                        "age_approximate": str(30 + k % 40),
                        "sex": "female" if k % 2 else "male",
                    }
                )
                k += 1
    with open(folder / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder


def test_isic2017_records_splits_cache_and_thresholds(tmp_path, monkeypatch):
    folder = _fake_isic(
        tmp_path,
        {"nevus": 10, "melanoma": 6, "seborrheic_keratosis": 4},
        {"nevus": 2, "melanoma": 1, "seborrheic_keratosis": 1},
    )
    cache = tmp_path / "cache"
    recs, thr = df.isic2017_records(root=tmp_path, cache_dir=cache, val_fraction=0.25, seed=0, return_thresholds=True)
    assert len(recs) == 24
    by_split = {s: [r for r in recs if r["split"] == s] for s in ("train", "val", "test")}
    assert len(by_split["test"]) == 4  # the dataset's own val split is the held-out test
    val_counts = {c: sum(r["label"] == c for r in by_split["val"]) for c in df.ISIC2017_CLASSES}
    assert val_counts == {"nevus": 2, "melanoma": 2, "seborrheic_keratosis": 1}  # stratified, round(n * 0.25)
    r0 = recs[0]
    assert Path(r0["image"]).is_absolute() and Path(r0["image"]).is_file()
    keys = ("label", "split", "sha256", "image_id", "segmentation_ok", *df.MEASURE_KEYS, *df.MEASURED_CONCEPTS)
    for key in keys:
        assert key in r0, key
    assert thr == df.fit_abcd_thresholds(by_split["train"])  # fitted on the carved train part only
    assert (cache / "isic2017_abcd.csv").is_file()
    assert not list(cache.glob("*.tmp"))

    # deterministic carve, splits filter
    again = df.isic2017_records(root=folder, cache_dir=cache, val_fraction=0.25, seed=0, splits=("val",))
    assert [r["image_id"] for r in again] == [r["image_id"] for r in by_split["val"]]
    other = df.isic2017_records(root=folder, cache_dir=cache, val_fraction=0.25, seed=1, splits="val")
    assert {r["image_id"] for r in other} != {r["image_id"] for r in by_split["val"]}

    # cached: nothing is re-measured; a changed file is
    calls = []
    real = df.measure_abcd

    def counting(rgb, mask=None):
        calls.append(1)
        return real(rgb, mask)

    monkeypatch.setattr(df_manifest, "measure_abcd", counting)  # where isic2017_records looks it up
    df.isic2017_records(root=folder, cache_dir=cache, val_fraction=0.25)
    assert calls == []
    changed = Path(by_split["test"][0]["image"])
    Image.fromarray(_paint(_irregular_blob(), seed=99)).save(changed)
    recs2 = df.isic2017_records(root=folder, cache_dir=cache, val_fraction=0.25)
    assert len(calls) == 1
    new = next(r for r in recs2 if r["image"] == str(changed))
    assert new["sha256"] != by_split["test"][0]["sha256"]
    with pytest.raises(ValueError):
        df.isic2017_records(root=folder, cache_dir=cache, splits=("holdout",))


def test_cache_of_other_version_is_ignored(tmp_path, monkeypatch):
    _fake_isic(tmp_path, {"nevus": 3, "melanoma": 2, "seborrheic_keratosis": 2}, {"nevus": 1})
    cache = tmp_path / "cache"
    df.isic2017_records(root=tmp_path, cache_dir=cache)
    monkeypatch.setattr(df_cache, "MEASURE_VERSION", "999")  # the version the cache reads and writes
    calls = []
    real = df.measure_abcd
    monkeypatch.setattr(df_manifest, "measure_abcd", lambda rgb, mask=None: calls.append(1) or real(rgb, mask))
    df.isic2017_records(root=tmp_path, cache_dir=cache)
    assert len(calls) == 8


def test_train_copy_of_a_test_image_is_dropped(tmp_path):
    import shutil

    counts = {"nevus": 4, "melanoma": 3, "seborrheic_keratosis": 2}
    folder = _fake_isic(tmp_path, counts, {"nevus": 1, "melanoma": 1})
    with open(folder / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    test_row = next(r for r in rows if r["split"] == "val")
    train_row = next(r for r in rows if r["split"] == "train")
    shutil.copyfile(folder / test_row["file"], folder / train_row["file"])
    recs = df.isic2017_records(root=folder, cache_dir=tmp_path / "cache")
    ids = {r["image_id"] for r in recs}
    assert test_row["image_id"] in ids and train_row["image_id"] not in ids
    assert len(recs) == len(rows) - 1
    assert len({r["sha256"] for r in recs}) == len(recs)


# ---- expert structure labels (isic2017_features) ----------------------------------------------------

_EXPERT_COLUMNS = ("pigment_network", "negative_network", "streaks", "milia_like_cyst", "globules")


def _fake_expert_table(root: Path, rows: list[dict]) -> Path:
    folder = root / "isic2017_features"
    folder.mkdir(parents=True, exist_ok=True)
    fields = ["image_id", "split", "diagnosis", *_EXPERT_COLUMNS, "n_features", "image_file", "image_sha256"]
    with open(folder / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return folder


def test_expert_table_parsing_and_errors(tmp_path):
    from medcbm.datasets.isic2017_features import EXPERT_FEATURE_CONCEPTS, isic2017_expert_labels

    assert tuple(EXPERT_FEATURE_CONCEPTS) == _EXPERT_COLUMNS
    row = {"image_id": "ISIC_1", "image_sha256": "AB", **{c: "0" for c in _EXPERT_COLUMNS}, "streaks": "1"}
    labels = isic2017_expert_labels(_fake_expert_table(tmp_path / "a", [row]))
    assert labels["ISIC_1"]["streaks"] == 1.0 and labels["ISIC_1"]["dots_globules"] == 0.0
    assert labels["ISIC_1"]["sha256"] == "ab"
    with pytest.raises(ValueError, match="expected 0 or 1"):
        isic2017_expert_labels(_fake_expert_table(tmp_path / "b", [{**row, "globules": "yes"}]))
    with pytest.raises(ValueError, match="listed twice"):
        isic2017_expert_labels(_fake_expert_table(tmp_path / "c", [row, row]))
    bad = tmp_path / "d" / "isic2017_features"
    bad.mkdir(parents=True)
    (bad / "labels.csv").write_text("image_id,image_sha256,streaks\nISIC_1,ab,1\n")
    with pytest.raises(ValueError, match="missing column"):
        isic2017_expert_labels(bad)
    with pytest.raises(FileNotFoundError):
        isic2017_expert_labels(tmp_path / "absent")


def test_isic2017_records_carry_expert_labels(tmp_path):
    from medcbm.datasets.isic2017_features import EXPERT_FEATURE_CONCEPTS

    folder = _fake_isic(tmp_path, {"nevus": 3, "melanoma": 2, "seborrheic_keratosis": 2}, {"nevus": 1, "melanoma": 1})
    cache = tmp_path / "cache"
    plain = df.isic2017_records(root=folder, cache_dir=cache)
    assert all(math.isnan(r[c]) for r in plain for c in EXPERT_FEATURE_CONCEPTS.values())  # no table: unlabelled
    covered = plain[:4]
    rows = []
    for i, r in enumerate(covered):
        flags = {c: str((i >> j) & 1) for j, c in enumerate(_EXPERT_COLUMNS)}
        rows.append({"image_id": r["image_id"], "image_sha256": r["sha256"], **flags})
    _fake_expert_table(tmp_path, rows)
    recs = {r["image_id"]: r for r in df.isic2017_records(root=folder, cache_dir=cache)}
    for i, r in enumerate(covered):
        for j, (column, concept) in enumerate(EXPERT_FEATURE_CONCEPTS.items()):
            assert recs[r["image_id"]][concept] == float((i >> j) & 1), (column, i)
    others = [v for k, v in recs.items() if k not in {r["image_id"] for r in covered}]
    assert others and all(math.isnan(v["streaks"]) for v in others)
    # measured concepts are still there
    assert all(k in recs[covered[0]["image_id"]] for k in df.MEASURED_CONCEPTS)
    no_expert = df.isic2017_records(root=folder, cache_dir=cache, expert_features=False)
    assert "streaks" not in no_expert[0]
    rows[0]["image_sha256"] = "0" * 64
    _fake_expert_table(tmp_path, rows)
    with pytest.raises(ValueError, match="hashes to"):
        df.isic2017_records(root=folder, cache_dir=cache)
    with pytest.raises(FileNotFoundError):
        df.isic2017_records(root=folder, cache_dir=cache, expert_features=tmp_path / "nowhere")


def test_real_expert_table_matches_its_readme():
    from medcbm.datasets.isic2017_features import isic2017_expert_labels
    from medcbm.datasets.paths import shared_data_root

    root = shared_data_root()
    if root is None or not (root / "isic2017_features" / "labels.csv").is_file():
        pytest.skip("../shared/data/isic2017_features not present")
    labels = isic2017_expert_labels(root / "isic2017_features")
    assert len(labels) == 1921
    with open(root / "isic2017_features" / "labels.csv", newline="") as fh:
        train_ids = {r["image_id"] for r in csv.DictReader(fh) if r["split"] == "train"}
    assert len(train_ids) == 1800
    assert sum(labels[i]["pigment_network"] for i in train_ids) == 1075
    assert sum(labels[i]["milia_like_cysts"] for i in train_ids) == 485


# ---- concept bank ----------------------------------------------------------------------------------


def test_derm_concept_bank_loads_with_measured_ids():
    bank = load_concept_bank(DERM_BANK)
    assert bank.classes == ["nevus", "melanoma", "seborrheic_keratosis"]
    assert set(df.MEASURED_CONCEPTS) <= set(bank.concept_ids)
    from medcbm.datasets.isic2017_features import EXPERT_FEATURE_CONCEPTS

    expert = set(EXPERT_FEATURE_CONCEPTS.values())
    assert expert <= set(bank.concept_ids) and not expert & set(df.MEASURED_CONCEPTS)
    assert 16 <= bank.num_concepts <= 28
    class_words = re.compile(r"melanom|\bnevus|\bnevi\b|\bnaev|kerato|seborr|\bmole|malignan|benign|cancer", re.I)
    for c in bank.concepts:
        assert not class_words.search(c.text), c.id
        assert c.quote, c.id
    assert set(np.unique(bank.prior)) <= {-1, 0, 1}
    mel = bank.prior[bank.class_index("melanoma")]
    ids = bank.concept_ids
    for cid in ("asymmetric_shape", "irregular_border", "multiple_colours", "blue_grey_areas"):
        assert mel[ids.index(cid)] == 1
    assert bank.prior[bank.class_index("seborrheic_keratosis"), ids.index("milia_like_cysts")] == 1
    assert mel[ids.index("negative_network")] == 1 and mel[ids.index("streaks")] == 1
    assert bank.prior[bank.class_index("seborrheic_keratosis"), ids.index("pigment_network")] == -1
    assert all(v == 0 for v in bank.prior[:, ids.index("ruler_or_ink_marks")])


# ---- real data -------------------------------------------------------------------------------------


def _isic_folder() -> Path | None:
    from medcbm.datasets.paths import shared_data_root

    root = shared_data_root()
    if root is None or not (root / "isic2017_256" / "labels.csv").is_file():
        return None
    return root / "isic2017_256"


@pytest.mark.skipif(
    _isic_folder() is None,
    reason="ISIC 2017 data not present (set MEDCBM_SHARED_DATA or place it at <repo>/../shared/data/isic2017_256)",
)
def test_real_isic_images_measure_sensibly():
    folder = _isic_folder()
    with open(folder / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    picked = rows[:: len(rows) // 20][:20]
    results = []
    for r in picked:
        with Image.open(folder / r["file"]) as im:
            rgb = np.asarray(im.convert("RGB"))
        mask, info = df.segment_lesion(rgb, return_info=True)
        m = df.measure_abcd(rgb, mask=mask if info["ok"] else None)
        assert all(math.isfinite(m[k]) for k in df.MEASURE_KEYS), r["image_id"]
        results.append((info["ok"], m))
    ok = [m for good, m in results if good]
    assert len(ok) >= 18, f"segmentation failed on {20 - len(ok)} of 20 real images"
    area = np.array([m["area_fraction"] for m in ok])
    assert (area > 0.005).all() and (area < 0.9).all()
    assert np.median(area) > 0.03
    colours = np.array([m["colour_count"] for m in ok])
    assert colours.min() >= 1  # a pigmented lesion shows at least one ABCD colour

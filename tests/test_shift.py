# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Site-shift alarm: synthetic behaviour, storage, and the shipped bundles on blank / noise / foreign images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medcbm.site_shift import SiteShiftDetector, summarize_shift

REPO = Path(__file__).resolve().parents[1]


def _clusters(rng, n, shift=0.0, d=16):
    centres = np.eye(d)[:3] * 3
    x = centres[rng.integers(0, 3, n)] + rng.normal(0, 0.3, (n, d))
    x[:, 5] += shift
    return x


def test_threshold_flags_about_the_quantile_on_source_like_data_and_most_of_a_shifted_set():
    rng = np.random.default_rng(0)
    det = SiteShiftDetector(k=5, quantile=0.95).fit(_clusters(rng, 600))
    same = det.flag(_clusters(rng, 1000)).mean()
    assert 0.01 < same < 0.12
    assert det.flag(_clusters(rng, 300, shift=3.0)).mean() > 0.8
    s = summarize_shift(det.score(_clusters(rng, 300, shift=3.0)), det)
    assert s.looks_shifted and "configs/adapt.yaml" in s.message
    s = summarize_shift(det.score(_clusters(rng, 300)), det)
    assert not s.looks_shifted and s.fraction_flagged < 0.25
    assert s.to_dict()["n"] == 300


def test_round_trip_through_tensors_and_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    rng = np.random.default_rng(1)
    det = SiteShiftDetector(k=3).fit(_clusters(rng, 200))
    save_file(det.to_tensors(), str(tmp_path / "s.safetensors"))
    back = SiteShiftDetector.from_tensors(load_file(str(tmp_path / "s.safetensors")))
    q = _clusters(rng, 50, shift=0.7)
    np.testing.assert_allclose(back.score(q), det.score(q), rtol=1e-5)
    assert back.threshold_ == pytest.approx(det.threshold_) and back.k == 3
    with pytest.raises(ValueError, match="missing"):
        SiteShiftDetector.from_tensors({})


def test_validation():
    with pytest.raises(ValueError, match="at least 7 images for k = 5"):
        SiteShiftDetector(k=5).fit(np.random.default_rng(0).normal(size=(6, 4)))
    SiteShiftDetector(k=5).fit(np.random.default_rng(0).normal(size=(7, 4)))  # every fold keeps 5 neighbours
    with pytest.raises(RuntimeError, match="not fitted"):
        SiteShiftDetector().score(np.ones((1, 4)))
    det = SiteShiftDetector(k=1).fit(np.random.default_rng(0).normal(size=(20, 4)))
    with pytest.raises(ValueError, match="dimensions"):
        det.score(np.ones((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        det.score(np.full((1, 4), np.nan))


# ------------------------------------------------------------------ real bundles
def _odd_images(tmp_path: Path, data: Path, bundle: str) -> dict[str, Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = {
        "black": np.zeros((256, 256, 3), np.uint8),
        "white": np.full((256, 256, 3), 255, np.uint8),
        "noise": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
    }
    paths = {}
    for name, arr in out.items():
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(arr).save(paths[name])
    foreign = {
        "blood_cbm": sorted((data / "nih_cxr14_nih1000_64px").rglob("*.png"))[:1]
        + sorted((data / "isic2017_256").rglob("*.jpg"))[:1],
        "derm_cbm": sorted((data / "nih_cxr14_nih1000_64px").rglob("*.png"))[:1]
        + sorted((data / "pbc_wbcatt").rglob("*.jpg"))[:1],
        "cxr_cbm": sorted((data / "isic2017_256").rglob("*.jpg"))[:1]
        + sorted((data / "pbc_wbcatt").rglob("*.jpg"))[:1],
    }[bundle]
    for i, p in enumerate(foreign):
        paths[f"foreign{i}"] = p
    return paths


def _reference_records(bundle: str):
    if bundle == "blood_cbm":
        from medcbm.datasets import pbc_wbcatt_records

        return pbc_wbcatt_records(splits=("train",))
    if bundle == "cxr_cbm":
        from medcbm.datasets import nih_cxr14_records

        return nih_cxr14_records(splits=("train",))
    from medcbm.datasets.dermoscopy_features import isic2017_records

    return isic2017_records(splits=("train",))[:600]


@pytest.mark.parametrize("bundle", ["blood_cbm", "derm_cbm", "cxr_cbm"])  # feature kNN alone, retrained backbones
def test_shipped_bundles_flag_blank_white_noise_and_foreign_images(tmp_path, bundle):
    from medcbm.datasets.paths import shared_data_root
    from medcbm.engine import extract_features
    from medcbm.features import FeatureCache, default_cache_dir
    from medcbm.bundle import LoadedBundle

    data = shared_data_root()
    if data is None:
        pytest.skip("../shared/data not found (set MEDCBM_SHARED_DATA): needs source images for the reference")
    root = REPO / "bundles" / bundle
    b = LoadedBundle.load(root)
    if b.info.get("fit") != "trained":
        pytest.skip(f"{bundle} has no fitted backbone here")
    torch.set_num_threads(1)
    encoder, pipeline = b.network.features, b.preprocessing.pipeline()
    cache = FeatureCache(default_cache_dir(), b.backbone.fingerprint, b.preprocessing.fingerprint())
    recs = _reference_records(bundle)[:600]
    ref = extract_features([r["image"] for r in recs], encoder, pipeline, cache).features
    det = SiteShiftDetector().fit(ref)
    odd = _odd_images(tmp_path, data, bundle)
    res = extract_features(list(odd.values()), encoder, pipeline)
    assert not res.errors
    flags = det.flag(res.features)
    scores = det.score(res.features)
    not_flagged = [name for name, f in zip(odd, flags) if not f]
    assert not not_flagged, f"{bundle}: not flagged {not_flagged}; scores {scores}, threshold {det.threshold_:.3f}"

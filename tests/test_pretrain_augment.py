# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Tests of the site-shift augmentation (medcbm.augment) and of the pretraining recipes that use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medcbm.augment import AUGMENT_STEPS, SiteShiftAugment
from medcbm.pretrain import load_recipe

REPO = Path(__file__).resolve().parents[1]
S = 32


def _disk(n: int = 2, side: int = 64, radius: float = 8.0) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    d = (((yy - (side - 1) / 2) ** 2 + (xx - (side - 1) / 2) ** 2) <= radius**2).float()
    return d.expand(n, 3, side, side).clone()


def _pink(n: int = 4, side: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    base = torch.tensor([0.85, 0.6, 0.7]).view(1, 3, 1, 1)
    return (base * (0.6 + 0.4 * torch.rand(n, 1, side, side, generator=g))).clamp(0, 1)


def _hf_energy(x: torch.Tensor) -> float:
    return float((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., 1:] - x[..., :-1]).abs().mean())


FULL = {
    "geometry": {"zoom": [0.5, 2.0], "translate": 0.1, "rotate": 180, "flip": True, "vflip": True},
    "stain": {"prob": 1.0},
    "colour": {"prob": 1.0},
    "greyscale": {"prob": 0.2},
    "contrast": {"prob": 1.0},
    "histogram": {"prob": 0.5},
    "illumination": {"prob": 1.0},
    "resolution": {"prob": 0.5},
    "blur": {"prob": 0.5},
    "jpeg": {"prob": 0.5},
    "noise": {"prob": 0.5},
}


def test_every_step_is_in_the_full_config() -> None:
    assert set(FULL) == set(AUGMENT_STEPS)


def test_deterministic_under_seed_shapes_and_range() -> None:
    x = _pink()
    a = SiteShiftAugment(FULL, S, seed=3)(x)
    b = SiteShiftAugment(FULL, S, seed=3)(x)
    c = SiteShiftAugment(FULL, S, seed=4)(x)
    assert a.shape == (4, 3, S, S) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    aug = SiteShiftAugment(FULL, S, seed=3)
    assert not torch.allclose(aug(x), aug(x)), "successive batches draw new parameters"


def test_no_steps_is_a_plain_resize() -> None:
    x = _pink()
    y = SiteShiftAugment({}, S)(x)
    ref = torch.nn.functional.interpolate(x, size=(S, S), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(y, ref.clamp(0, 1), atol=1e-6)


@pytest.mark.parametrize("zoom, ratio", [(2.0, 4.0), (0.5, 0.25)])
def test_zoom_scales_the_object_area(zoom: float, ratio: float) -> None:
    x = _disk()
    geo = {"zoom": [zoom, zoom], "padding_mode": "zeros"}
    base = SiteShiftAugment({"geometry": {"padding_mode": "zeros"}}, S)(x)
    out = SiteShiftAugment({"geometry": geo}, S)(x)
    assert float(out.sum() / base.sum()) == pytest.approx(ratio, rel=0.15)


def test_translate_moves_the_object_off_centre() -> None:
    x = _disk(n=8)
    out = SiteShiftAugment({"geometry": {"translate": 0.25, "padding_mode": "zeros"}}, S, seed=0)(x)
    grid = torch.arange(S, dtype=torch.float32)
    m = out[:, 0]
    cy = (m.sum(2) * grid).sum(1) / m.sum((1, 2))
    cx = (m.sum(1) * grid).sum(1) / m.sum((1, 2))
    offset = torch.hypot(cy - (S - 1) / 2, cx - (S - 1) / 2)
    assert float(offset.max()) > 2.0


def test_stain_changes_colour_not_structure() -> None:
    x = _pink()
    out = SiteShiftAugment({"stain": {"prob": 1.0, "sigma": 0.3, "bias": 0.05}}, 64)(x)
    assert float((out - x).abs().mean()) > 0.01
    lum_in, lum_out = x.mean(1).flatten(1), out.mean(1).flatten(1)
    for a, b in zip(lum_in, lum_out):
        assert float(np.corrcoef(a.numpy(), b.numpy())[0, 1]) > 0.9


def test_hue_keeps_grey_and_saturation_zero_makes_grey() -> None:
    grey = torch.full((2, 3, 64, 64), 0.5)
    out = SiteShiftAugment({"colour": {"prob": 1.0, "hue_degrees": 90, "saturation": [1.0, 1.0]}}, 64)(grey)
    assert torch.allclose(out, grey, atol=1e-5)
    pink = _pink()
    out = SiteShiftAugment({"colour": {"prob": 1.0, "hue_degrees": 90, "saturation": [1.0, 1.0]}}, 64)(pink)
    assert float((out - pink).abs().mean()) > 0.02
    out = SiteShiftAugment({"colour": {"prob": 1.0, "hue_degrees": 0, "saturation": [0.0, 0.0]}}, 64)(pink)
    assert float((out - out.mean(1, keepdim=True)).abs().max()) < 1e-5


def test_greyscale_makes_equal_channels() -> None:
    out = SiteShiftAugment({"greyscale": {"prob": 1.0}}, 64)(_pink())
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])


def test_contrast_changes_intensity() -> None:
    x = _pink()
    out = SiteShiftAugment({"contrast": {"prob": 1.0, "gamma": [2.0, 2.0], "contrast": [1, 1], "brightness": 0}}, 64)(x)
    assert float(out.mean()) < float(x.mean()) - 0.05  # gamma 2 darkens mid-tones


def test_illumination_makes_a_flat_image_uneven() -> None:
    flat = torch.full((4, 3, 64, 64), 0.6)
    out = SiteShiftAugment({"illumination": {"prob": 1.0, "vignette": [0.4, 0.4]}}, 64)(flat)
    assert float(out[:, :, 32, 32].mean()) > float(out[:, :, 0, 0].mean())  # vignetting darkens corners
    assert float(out.flatten(1).std(1).min()) > 0.01


@pytest.mark.parametrize("step", ["blur", "resolution"])
def test_blur_and_resolution_remove_detail(step: str) -> None:
    x = (torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)) > 0.5).float().expand(2, 3, 64, 64)
    params = {"blur": {"prob": 1.0, "sigma": [1.5, 1.5]}, "resolution": {"prob": 1.0, "factor": [3.0, 3.0]}}[step]
    out = SiteShiftAugment({step: params}, 64)(x.clone())
    assert _hf_energy(out) < 0.5 * _hf_energy(x)


def test_jpeg_low_quality_loses_more_than_high_quality() -> None:
    x = _pink()
    low = SiteShiftAugment({"jpeg": {"prob": 1.0, "quality": [10, 10]}}, 64)(x)
    high = SiteShiftAugment({"jpeg": {"prob": 1.0, "quality": [95, 95]}}, 64)(x)
    assert float((low - x).abs().mean()) > float((high - x).abs().mean()) > 0.0


def test_noise_and_grey_mode() -> None:
    flat = torch.full((2, 3, 64, 64), 0.5)
    out = SiteShiftAugment({"noise": {"prob": 1.0, "std": 0.1}}, 64, seed=1)(flat)
    assert float(out.std()) > 0.01
    out = SiteShiftAugment(FULL, S, channel_mode="grey", seed=1)(_pink())
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_probability_zero_leaves_images_alone() -> None:
    x = _pink()
    off = {k: {"prob": 0.0} for k in AUGMENT_STEPS if k != "geometry"}
    assert torch.allclose(SiteShiftAugment(off, 64)(x), x, atol=1e-6)


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown augmentation step"):
        SiteShiftAugment({"sharpen": {}}, S)
    with pytest.raises(ValueError, match="reversed"):
        SiteShiftAugment({"blur": {"prob": 1.0, "sigma": [2.0, 1.0]}}, S)(_pink())
    with pytest.raises(ValueError, match="batch"):
        SiteShiftAugment({}, S)(torch.rand(3, 8, 8))


@pytest.mark.parametrize("name", ["blood", "derm", "cxr"])
def test_recipes_load_and_their_augmentation_runs(name: str) -> None:
    recipe = load_recipe(REPO / "configs" / "pretrain" / f"{name}.yaml")
    aug = recipe["train"].get("augment", {})
    assert recipe["train"]["init_trunk"] == "imagenet" and recipe["model_cfg"]["vision_cfg"]["image_size"] >= 224
    size = int(recipe["model_cfg"]["vision_cfg"]["image_size"])
    load = int(recipe["train"].get("load_size", 2 * size))
    out = SiteShiftAugment(aug, size, recipe["channel_mode"], seed=0)(torch.rand(2, 3, load, load))
    assert out.shape == (2, 3, size, size)
    if recipe["channel_mode"] == "grey":
        assert "colour" not in aug and "stain" not in aug
        assert not aug.get("geometry", {}).get("flip"), "no flips on chest radiographs"

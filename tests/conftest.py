# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Shared fixtures: tiny open_clip backbones built in the test (no network), concept banks, paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}


def bundle_command(bundle: str, config: str, *args: str) -> list[str]:
    """The contract's ``python -m monai.bundle run`` command for ``bundles/<bundle>/configs/<config>``."""
    import sys

    b = f"bundles/{bundle}"
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--bundle_root",
        b,
        "--config_file",
        f"{b}/configs/{config}",
        "--meta_file",
        f"{b}/configs/metadata.json",
        *args,
    ]


def build_tiny_backbone(folder: Path, seed: int = 0, name: str = "medcbm-test-tiny") -> str:
    """Register a tiny model config with open_clip, build it, save it as a local-dir folder; return its spec."""
    import open_clip

    from medcbm.backbones import save_local_dir

    cfg_dir = folder.parent / f"{folder.name}_open_clip_cfg"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / f"{name}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    save_local_dir(model, TINY_CFG, folder)
    return f"local-dir:{folder}"


@pytest.fixture(scope="session")
def tiny_backbone_spec(tmp_path_factory) -> str:
    return build_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone") / "backbone")


@pytest.fixture
def small_bank_dict() -> dict:
    return {
        "name": "toy",
        "classes": ["alpha", "beta"],
        "concepts": [
            {
                "id": "round",
                "text": "a round shape",
                "group": "shape",
                "kind": "attribute",
                "source": {"citation": "Toy textbook", "quote": "round things"},
            },
            {
                "id": "spiky",
                "text": "spiky outline",
                "group": "shape",
                "kind": "finding",
                "source": {"citation": "Toy textbook"},
            },
            {
                "id": "ruler",
                "text": "a ruler mark",
                "group": "artifact",
                "kind": "artifact",
                "source": {"citation": "Toy textbook"},
            },
        ],
        "prior": {"alpha": {"round": 1, "spiky": -1}, "beta": {"spiky": 1, "round": -1}},
    }

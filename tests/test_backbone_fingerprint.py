# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""A backbone's identity follows its values, not the formatting of its config file."""

from __future__ import annotations

import json
import shutil

from medcbm.backbones import LOCAL_DIR, backbone_fingerprint


def test_reindenting_the_config_keeps_the_fingerprint_and_a_value_change_does_not(tiny_backbone_spec, tmp_path):
    folder = tmp_path / "bk"
    shutil.copytree(tiny_backbone_spec[len(LOCAL_DIR) :], folder)
    spec = f"{LOCAL_DIR}{folder}"
    before = backbone_fingerprint(spec)
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=4) + "\n")
    assert backbone_fingerprint(spec) == before
    cfg["preprocess_cfg"]["resize_mode"] = "longest"
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=4) + "\n")
    assert backbone_fingerprint(spec) != before
    # the weights are still hashed byte for byte
    (folder / "open_clip_model.safetensors").write_bytes((folder / "open_clip_model.safetensors").read_bytes() + b" ")
    assert backbone_fingerprint(spec) != before

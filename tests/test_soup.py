# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""medcbm.soup: the uniform weight average of backbones of one recipe, and its refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_backbone
from medcbm.backbones import load_backbone
from medcbm.soup import uniform_soup


def _tag(folder, seed: int, recipe: str = "r") -> None:
    """Give a tiny backbone the provenance block pretrain writes."""
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    cfg["medcbm_pretraining"] = {"recipe": recipe, "dataset": "d", "seed": seed, "seconds": 10.0, "best_epoch": 1}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))


@pytest.fixture
def ingredients(tmp_path):
    folders = []
    for seed in (0, 1, 2):
        build_tiny_backbone(tmp_path / f"seed{seed}", seed=seed)
        _tag(tmp_path / f"seed{seed}", seed)
        folders.append(tmp_path / f"seed{seed}")
    return folders


def test_soup_is_the_mean_of_the_weights_and_loads(ingredients, tmp_path):
    summary = uniform_soup(ingredients, tmp_path / "soup")
    states = [load_file(str(f / "open_clip_model.safetensors")) for f in ingredients]
    soup = load_file(str(tmp_path / "soup" / "open_clip_model.safetensors"))
    differing = [k for k, v in soup.items() if v.is_floating_point() and not torch.equal(states[0][k], states[1][k])]
    assert len(differing) > 10  # the seeds differ, so the average below means something
    for key in differing:
        torch.testing.assert_close(soup[key], sum(s[key] for s in states) / 3)
    assert summary["seed"] == [0, 1, 2] and summary["seconds"] == 30.0
    assert len({i["sha256"] for i in summary["soup"]["ingredients"]}) == 3
    bk = load_backbone(f"local-dir:{tmp_path / 'soup'}")
    assert bk.encode_images(torch.zeros(1, 3, 32, 32)).shape == (1, 16)
    log = json.loads((tmp_path / "soup" / "training_log.json").read_text())
    assert log["recipe"] == "r" and log["soup"]["method"] == "uniform weight average"


def test_soup_refuses_other_recipes_and_single_ingredients(ingredients, tmp_path):
    _tag(ingredients[2], 2, recipe="another")
    with pytest.raises(ValueError, match="recipe 'another' differs"):
        uniform_soup(ingredients, tmp_path / "soup")
    with pytest.raises(ValueError, match="at least two"):
        uniform_soup(ingredients[:1], tmp_path / "soup")
    with pytest.raises(FileNotFoundError, match="not a local-dir backbone"):
        uniform_soup([ingredients[0], tmp_path], tmp_path / "soup")
    assert not (tmp_path / "soup").exists()  # nothing half-written

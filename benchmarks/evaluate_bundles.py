# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Held-out evaluation of the shipped bundles, each next to a black-box linear probe on the same backbone.

    python benchmarks/evaluate_bundles.py [--bundle blood_cbm cxr_cbm derm_cbm] [--out results.json]

Held-out splits (never used for fitting or selection):
- blood_cbm: PBC ``test`` split of ``pbc_wbcatt`` (accuracy, balanced accuracy, per-attribute accuracy
  against the WBCAtt annotations);
- cxr_cbm: the NIH subset's ``test`` split (AUROC for abnormal); train/val images of test patients dropped;
- derm_cbm: ISIC 2017 ``validation`` split (balanced accuracy, melanoma AUROC); selection data carved from train.
The linear probe is a multinomial logistic regression on the frozen features, its L2 strength chosen on
the same validation split the CBM used. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from common import BUNDLES, REPO, bundle_split_features, nan_safe

from medcbm.fitting import classification_metrics
from medcbm.head import KnowledgePriorHead
from medcbm.metrics import balanced_accuracy
from medcbm.workflows import load_bundle_network


def linear_probe(X, y, Xv, yv, n_classes, grid=(1e-4, 1e-3, 1e-2, 1e-1)):
    best = None
    for l2 in grid:
        h = KnowledgePriorHead(prior=None, prior_strength=0.0, l2=l2).fit(X, y, n_classes=n_classes)
        s = balanced_accuracy(yv, h.predict(Xv))
        if best is None or s > best[0]:
            best = (s, l2, h)
    return best[2], best[1]


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
    net = load_bundle_network(
        models,
        REPO / "bundles" / bundle / "configs" / "concepts.yaml",
        channel_mode=BUNDLES[bundle]["channel_mode"],
    )
    tr, va, te = (data["splits"][s] for s in ("train", "val", "test"))
    with torch.no_grad():
        f = torch.as_tensor(te["X"])
        scores = net.concept_scores_from_features(f)
        proba = torch.softmax(net.head(scores), 1).numpy()
        scores = scores.numpy()
    probe, l2 = linear_probe(tr["X"], tr["y"], va["X"], va["y"], bank.num_classes)
    probe_proba = probe.predict_proba(te["X"])
    res = {
        "bundle": bundle,
        "model": net.model_info,
        "n": {s: int(len(data["splits"][s]["y"])) for s in ("train", "val", "test")},
        "concepts_used": len(net.concepts),
        "concepts_in_bank": bank.num_concepts,
        "cbm_test": classification_metrics(te["y"], proba, bank.classes),
        "linear_probe_test": classification_metrics(te["y"], probe_proba, bank.classes),
        "linear_probe_l2": l2,
    }
    key = {"blood_cbm": "accuracy", "cxr_cbm": "auroc_abnormal", "derm_cbm": "balanced_accuracy"}[bundle]
    res["headline_metric"] = key
    res["cbm_minus_probe_points"] = 100 * (res["cbm_test"][key] - res["linear_probe_test"][key])
    if bundle == "blood_cbm":
        res["wbcatt_attribute_accuracy_test"] = wbcatt_attribute_accuracy(net, scores, te["C"], bank)
    # concept grounding on the held-out split where concept labels exist
    from medcbm.grounding import grounding_report

    ids = [bank.concept_ids.index(c) for c in net.concepts]
    rep = grounding_report(net.concepts, scores, te["C"][:, ids])
    res["concept_auroc_test"] = {r.concept_id: r.auroc for r in rep}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", nargs="+", default=["blood_cbm", "cxr_cbm", "derm_cbm"])
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--models-dir", default=None, help="evaluate this models folder (one bundle) instead")
    args = ap.parse_args()
    results = nan_safe({b: evaluate(b, args.models_dir) for b in args.bundle})
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Write the measured held-out figures into each bundle's model card and metadata ``eval_metrics``.

    python benchmarks/evaluate_bundles.py --out benchmarks/results/evaluate_bundles.json
    python benchmarks/update_model_cards.py benchmarks/results/evaluate_bundles.json

The card section between ``<!-- METRICS: ... -->`` and ``<!-- /METRICS -->`` is regenerated; nothing
else is touched, so the cards never carry numbers that the evaluation did not produce.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START = "<!-- METRICS: filled from benchmarks/evaluate_bundles.py -->"
END = "<!-- /METRICS -->"
HELD_OUT = {
    "blood_cbm": "PBC `pbc_wbcatt` test split (250 images, 50 per class)",
    "cxr_cbm": "NIH ChestX-ray14 subset `test` split (200 images, 100 normal / 100 abnormal)",
    "derm_cbm": "ISIC 2017 validation split, held out as test (150 images: 78 nevus / 30 melanoma / 42 SK)",
}


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}"


def _auc(v):
    return "n/a" if v is None else f"{v:.3f}"


def render(bundle: str, r: dict) -> str:
    cbm, lp = r["cbm_test"], r["linear_probe_test"]
    rows = [
        ("accuracy (%)", _pct(cbm["accuracy"]), _pct(lp["accuracy"])),
        ("balanced accuracy (%)", _pct(cbm["balanced_accuracy"]), _pct(lp["balanced_accuracy"])),
    ]
    for k in cbm:
        if k.startswith("auroc_") and not (bundle == "cxr_cbm" and k == "auroc_normal"):
            rows.append((f"AUROC {k[6:]}", _auc(cbm[k]), _auc(lp[k])))
    for k in cbm:
        if k.startswith("recall_"):
            rows.append((f"sensitivity {k[7:]} (%)", _pct(cbm[k]), _pct(lp[k])))
    lines = [
        START,
        "",
        f"Held-out data: {HELD_OUT[bundle]}; never used for training or selection.",
        "Measured with `python benchmarks/evaluate_bundles.py` (results in `benchmarks/results/`).",
        "",
        "| metric | concept bottleneck (this bundle) | linear probe, same backbone (black box) |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += [
        "",
        f"Headline metric `{r['headline_metric']}`: CBM minus probe = {r['cbm_minus_probe_points']:+.2f} points. "
        f"Concepts used by the fitted model: {r['concepts_used']} of {r['concepts_in_bank']}.",
        "",
    ]
    if "wbcatt_attribute_accuracy_test" in r:
        att = r["wbcatt_attribute_accuracy_test"]
        lines += [
            "Concept accuracy against the WBCAtt expert attributes (test split; the attribute value read off the "
            "concept scores):",
            "",
            "| attribute | accuracy (%) |",
            "|---|---|",
        ]
        lines += [f"| {k} | {_pct(v['accuracy'])} |" for k, v in att.items() if isinstance(v, dict)]
        lines += [f"| **mean of 11 attributes** | **{_pct(att['mean_attribute_accuracy'])}** |", ""]
    lines += [
        "Concept grounding on the held-out split (AUROC of each concept score against its label; n/a where "
        "the split has fewer than 3 positive or negative labels):",
        "",
        "| concept | AUROC |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | {_auc(v)} |" for k, v in r["concept_auroc_test"].items()]
    lines += ["", END]
    return "\n".join(lines)


def main(path: str) -> None:
    results = json.loads(Path(path).read_text())
    for bundle, r in results.items():
        card = REPO / "bundles" / bundle / "docs" / "README.md"
        text = card.read_text()
        pattern = re.compile(re.escape(START) + r"(.*?" + re.escape(END) + r")?", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{card}: no metrics marker")
        card.write_text(pattern.sub(lambda _: render(bundle, r), text, count=1))
        meta_path = REPO / "bundles" / bundle / "configs" / "metadata.json"
        meta = json.loads(meta_path.read_text())
        meta["eval_metrics"] = {
            "held_out_split": HELD_OUT[bundle],
            "cbm": {k: v for k, v in r["cbm_test"].items() if k != "n"},
            "linear_probe_same_backbone": {k: v for k, v in r["linear_probe_test"].items() if k != "n"},
            "n_test": r["cbm_test"]["n"],
        }
        if "wbcatt_attribute_accuracy_test" in r:
            meta["eval_metrics"]["wbcatt_mean_attribute_accuracy"] = r["wbcatt_attribute_accuracy_test"][
                "mean_attribute_accuracy"
            ]
        meta_path.write_text(json.dumps(meta, indent=4) + "\n")
        print(f"updated {card} and {meta_path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(REPO / "benchmarks" / "results" / "evaluate_bundles.json"))

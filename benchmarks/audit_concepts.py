# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Concept-label audit of each shipped bundle on its held-out test split: concept AUROC and CEM@1/3/5.

    python benchmarks/audit_concepts.py [--bundle blood_cbm cxr_cbm derm_cbm] [--threads 2]

Real concept labels: WBCAtt attributes (blood), NIH findings mapped to concepts (cxr, weak labels), and for
dermoscopy both the measured ABCD/structure labels of ``isic2017_records`` and the expert dermoscopic
structures of ``isic2017_features`` (globules -> irregular_dots_globules, streaks -> irregular_streaks,
milia_like_cyst -> milia_like_cysts; pigment_network and negative_network have no single concept in the
bank). Concepts a bundle dropped as ungroundable are listed with the reason, not hidden.
Writes ``benchmarks/results/audit_concepts_<bundle>.json``; re-run after the backbones are retrained.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from common import BUNDLES, REPO, nan_safe

from medcbm.bundle import LoadedBundle
from medcbm.concepts import load_concept_bank
from medcbm.data import InputRecord
from medcbm.datasets.paths import shared_data_root
from medcbm.pretrain import dataset_records
from medcbm.workflows.audit import audit_bundle

EXPERT_DERM = {"globules": "irregular_dots_globules", "streaks": "irregular_streaks", "milia_like_cyst": "milia_like_cysts"}


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(int(float(v)))


def _records(recs: list[dict], concept_ids: list[str]) -> list[InputRecord]:
    return [
        InputRecord(image=str(r["image"]), path=Path(r["image"]), label=r["label"],
                    extra={f"concept_{k}": _cell(r.get(k)) for k in concept_ids if k in r})
        for r in recs
    ]


def _expert_derm(recs: list[dict]) -> list[InputRecord]:
    path = shared_data_root() / "isic2017_features" / "labels.csv"
    with open(path, newline="") as f:
        flags = {row["image_id"]: row for row in csv.DictReader(f)}
    out = []
    for r in recs:
        row = flags.get(r["image_id"], {})
        extra = {f"concept_{cid}": (row[src] if row else "") for src, cid in EXPERT_DERM.items()}
        out.append(InputRecord(image=str(r["image"]), path=Path(r["image"]), label=r["label"], extra=extra))
    return out


def _summary(entries, audit) -> dict:
    keep = ("n_images", "n_ok", "n_errors", "accuracy", "concept_auroc", "concept_existence",
            "concept_labels_not_in_model", "dropped_concepts")
    return {k: audit.get(k) for k in keep}


def run(bundle_name: str, concepts_file: str | None = None) -> dict:
    spec = BUNDLES[bundle_name]
    t0 = time.perf_counter()
    bundle = LoadedBundle.load(REPO / "bundles" / bundle_name, concepts_file=concepts_file)
    recs = [r for r in dataset_records(spec["dataset"], **spec["dataset_args"]) if r["split"] == "test"]
    bank_ids = [c.id for c in load_concept_bank(concepts_file or REPO / "bundles" / bundle_name / "configs" / "concepts.yaml").concepts]
    out: dict = {"bundle": bundle_name, "version": bundle.version, "split": "test", "n": len(recs),
                 "concepts_file": str(concepts_file) if concepts_file else "configs/concepts.yaml",
                 "backbone": bundle.info.get("backbone"), "label_sets": {}}
    sets = {"dataset": _records(recs, bank_ids)}
    if bundle_name == "derm_cbm":
        sets = {"measured": sets["dataset"], "expert_structures": _expert_derm(recs)}
    for name, records in sets.items():
        entries, audit, _, _ = audit_bundle(bundle, records, max_cards=0, batch_size=32)
        out["label_sets"][name] = _summary(entries, audit)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", nargs="+", default=list(BUNDLES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concepts-file", default=None, help="concept bank to load the bundle with (default its own)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = REPO / "benchmarks" / "results"
    for b in args.bundle:
        try:
            res = run(b, args.concepts_file)
        except Exception as e:  # one bundle failing (e.g. mid-retraining) must not hide the others
            res = {"bundle": b, "error": f"{type(e).__name__}: {e}"}
        (results / f"audit_concepts_{b}.json").write_text(json.dumps(nan_safe(res), indent=2) + "\n")
        print(json.dumps({k: v for k, v in res.items() if k != "label_sets"}))
        for name, s in res.get("label_sets", {}).items():
            ca, cem = s.get("concept_auroc") or {}, s.get("concept_existence") or {}
            print(f"  {name}: mean concept AUROC {ca.get('mean_auroc')} over {ca.get('n_concepts_evaluated')} concepts "
                  f"({ca.get('n_better_than_chance')} > chance); CEM@1/3/5 {cem.get('cem_at_1')} {cem.get('cem_at_3')} "
                  f"{cem.get('cem_at_5')}")


if __name__ == "__main__":
    main()

# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Concept-label audit of each shipped bundle on its held-out test split: concept AUROC and CEM@1/3/5.

    python benchmarks/audit_concepts.py [--bundle blood_cbm cxr_cbm derm_cbm] [--threads 2]

Real concept labels: WBCAtt attributes (blood), NIH findings mapped to concepts (cxr, weak labels), and for
dermoscopy two label sets reported apart: the ABCD/colour features measured from image and lesion mask, and the
expert dermoscopic structures (``medcbm.datasets.isic2017_features.EXPERT_FEATURE_CONCEPTS``:
pigment_network, negative_network, streaks, milia_like_cysts, dots_globules) on the official ISIC 2017 test
split, and the measured features on the official validation split (the test split's images are not
measured). Concepts a bundle dropped as ungroundable are listed with the reason.
Writes ``benchmarks/results/audit_concepts_<bundle>.json``; re-run after the backbones are retrained.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from common import BUNDLES, REPO, bundle_records, nan_safe

from medcbm.bundle import LoadedBundle
from medcbm.concepts import load_concept_bank
from medcbm.data import InputRecord
from medcbm.datasets.isic2017_features import EXPERT_FEATURE_CONCEPTS
from medcbm.audit.run import AuditOptions, audit_bundle


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(int(float(v)))


def _records(recs: list[dict], concept_ids: list[str]) -> list[InputRecord]:
    return [
        InputRecord(
            image=str(r["image"]),
            path=Path(r["image"]),
            label=r["label"],
            extra={f"concept_{k}": _cell(r.get(k)) for k in concept_ids if k in r},
        )
        for r in recs
    ]


def _summary(entries, audit) -> dict:
    keep = (
        "n_images",
        "n_ok",
        "n_errors",
        "accuracy",
        "concept_auroc",
        "concept_existence",
        "concept_labels_not_in_model",
        "dropped_concepts",
    )
    return {k: audit.get(k) for k in keep}


def _git_commit(bundle_name: str) -> str | None:
    """Last commit that changed the bundle's models folder (which fit these figures describe)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%h", "--", f"bundles/{bundle_name}/models"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run(bundle_name: str, concepts_file: str | None = None) -> dict:
    t0 = time.perf_counter()
    bundle = LoadedBundle.load(REPO / "bundles" / bundle_name, concepts_file=concepts_file)
    splits = bundle_records(bundle_name)
    recs = splits["test"]
    bank_ids = [
        c.id
        for c in load_concept_bank(
            concepts_file or REPO / "bundles" / bundle_name / "configs" / "concepts.yaml"
        ).concepts
    ]
    out: dict = {
        "bundle": bundle_name,
        "version": bundle.version,
        "split": "test",
        "n": len(recs),
        "concepts_file": str(concepts_file) if concepts_file else "configs/concepts.yaml",
        "backbone": bundle.info.get("backbone"),
        "models_commit": _git_commit(bundle_name),
        "concepts_used": bundle.concept_ids,
        "label_sets": {},
    }
    sets = {"dataset": _records(recs, bank_ids)}
    if bundle_name == "derm_cbm":
        expert = set(EXPERT_FEATURE_CONCEPTS.values())
        sets = {
            "measured": _records(splits["isic2017_official_val"], [k for k in bank_ids if k not in expert]),
            "expert_structures": _records(recs, [k for k in bank_ids if k in expert]),
        }
        out["split_of"] = {"measured": "isic2017_official_val", "expert_structures": "test"}
    for name, records in sets.items():
        entries, audit, _, _ = audit_bundle(bundle, records, AuditOptions(max_cards=0), batch_size=32)
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
            print(
                f"  {name}: mean concept AUROC {ca.get('mean_auroc')} over {ca.get('n_concepts_evaluated')} concepts "
                f"({ca.get('n_better_than_chance')} > chance); CEM@1/3/5 {cem.get('cem_at_1')} {cem.get('cem_at_3')} "
                f"{cem.get('cem_at_5')}"
            )


if __name__ == "__main__":
    main()

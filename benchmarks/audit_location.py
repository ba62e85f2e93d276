# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Concept location (CLM@1/3/6) of the blood bundle on real smear fields: BCCD test fields and their WBC boxes.

    python benchmarks/audit_location.py [--concepts-file FILE] [--threads 2]

``../shared/data/bccd_test72``: 72 whole microscope fields (640 x 480 JPEG) with WBC boxes. Each field goes
through the audit job exactly as a user's CSV would (``image`` plus ``box`` = the field's WBC boxes in original
pixels): the maps of its top concepts (by contribution to the predicted class) are read back into original
pixels through the bundle's preprocessing and checked against the boxes, "for the cell as a whole". The blood
bundle resizes the short side and centre-crops, so the model never sees the left and right edges of a field:
only the visible area is ranked, and boxes with less than half their area in it are not counted (the JSON says
how many). Baselines (random, centre, shuffled maps) are in the same JSON; see ``medcbm.audit.location``.
Note the shift: the bundle was fitted on single, centred PBC cells, not on whole fields.

Writes ``benchmarks/results/audit_location_<bundle>.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from common import REPO, nan_safe

from medcbm.bundle import LoadedBundle
from medcbm.data import InputRecord
from medcbm.datasets.paths import shared_data_root
from medcbm.io.atomic import atomic_write_json
from medcbm.audit.run import AuditOptions, audit_bundle

DATASET = "bccd_test72"


def field_records(folder: Path) -> tuple[list[InputRecord], int]:
    """One record per field (image named ``images/<file>``), ``box`` = its WBC boxes; and the WBC box count."""
    if not (folder / "labels.csv").is_file() or not (folder / "boxes.csv").is_file():
        raise FileNotFoundError(f"{folder}: expected labels.csv and boxes.csv (the {DATASET} data set)")
    boxes: dict[str, list[str]] = defaultdict(list)
    n_wbc = 0
    with open(folder / "boxes.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["cell_type"].strip().upper() == "WBC":
                boxes[row["file"]].append(f"{row['xmin']} {row['ymin']} {row['xmax']} {row['ymax']}")
                n_wbc += 1
    records = []
    with open(folder / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            records.append(
                InputRecord(image=row["file"], path=folder / row["file"], extra={"box": "; ".join(boxes[row["file"]])})
            )
    return records, n_wbc


def _git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%h", "--", str(path)], cwd=REPO, capture_output=True, text=True, timeout=30
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def concepts_at(bundle_name: str, spec: str) -> Path:
    """``git:REV`` -> the bundle's ``configs/concepts.yaml`` at that revision (a temporary copy); else the path."""
    if not spec.startswith("git:"):
        return Path(spec)
    rel = f"bundles/{bundle_name}/configs/concepts.yaml"
    out = subprocess.run(["git", "show", f"{spec[4:]}:{rel}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise FileNotFoundError(f"{rel} at {spec[4:]}: {out.stderr.strip()}")
    tmp = Path(tempfile.mkdtemp(prefix="medcbm_concepts_")) / "concepts.yaml"
    tmp.write_text(out.stdout)
    return tmp


def run(bundle_name: str, concepts_file: str | None, location_concepts: int) -> dict:
    root = shared_data_root()
    if root is None or not (root / DATASET).is_dir():
        raise FileNotFoundError(f"shared data folder with {DATASET}/ not found (set MEDCBM_SHARED_DATA)")
    t0 = time.perf_counter()
    bank = concepts_at(bundle_name, concepts_file) if concepts_file else None
    bundle = LoadedBundle.load(REPO / "bundles" / bundle_name, concepts_file=bank)
    records, n_wbc = field_records(root / DATASET)
    entries, audit, _, _ = audit_bundle(
        bundle, records, AuditOptions(max_cards=0, location_concepts=location_concepts), batch_size=16
    )
    ok = [e for e in entries if e.get("status") == "ok"]
    return {
        "bundle": bundle_name,
        "version": bundle.version,
        "models_commit": _git_commit(REPO / "bundles" / bundle_name / "models"),
        "concepts_file": str(concepts_file) if concepts_file else "configs/concepts.yaml",
        "backbone": bundle.info.get("backbone"),
        "data": f"{DATASET}: {len(records)} fields, {n_wbc} WBC boxes (original pixels)",
        "preprocessing": bundle.preprocessing.to_dict(),
        "location_concepts_per_field": location_concepts,
        "n_fields": len(records),
        "n_errors": len(records) - len(ok),
        "predicted_class_per_field": dict(Counter(e["prediction"] for e in ok).most_common()),
        "concept_location": audit.get("concept_location"),
        "seconds": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="blood_cbm")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--concepts-file",
        default=None,
        help="concept bank to load the bundle with: a path or git:REV (that revision's bank); default its own",
    )
    ap.add_argument("--location-concepts", type=int, default=3, help="top concepts per field whose maps are checked")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = run(args.bundle, args.concepts_file, args.location_concepts)
    out = args.out or REPO / "benchmarks" / "results" / f"audit_location_{args.bundle}.json"
    atomic_write_json(out, nan_safe(res))
    loc = res["concept_location"] or {}
    base = loc.get("baselines", {})
    print(f"{res['bundle']}: {loc.get('n')} maps on {loc.get('n_images_used')} fields; boxes {loc.get('boxes')}")
    for a in (1, 3, 6):
        row = [f"{k} {loc.get(f'{k}_at_{a}')}" for k in ("clm", "precision", "coverage")]
        ref = [f"{b}: clm {base[b].get(f'clm_at_{a}')} cov {base[b].get(f'coverage_at_{a}')}" for b in base]
        print(f"  @{a}: " + ", ".join(row) + " | " + "; ".join(ref))
    print(json.dumps({k: res[k] for k in ("n_fields", "n_errors", "predicted_class_per_field", "seconds")}))


if __name__ == "__main__":
    main()

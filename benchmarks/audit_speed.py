# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Audit seconds per image and peak memory on real held-out images, per bundle (CPU).

    python benchmarks/audit_speed.py [--bundle blood_cbm cxr_cbm derm_cbm] [--n 100] [--threads 2] [--cards 24]

Each bundle runs in its own process (so peak resident memory is its own): ``AuditRunner`` end to end on
``n`` test images (reading, encoder, concepts, metrics, concept maps for ``cards`` images, report.html).
Writes ``benchmarks/results/audit_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BUNDLES, REPO


def one(bundle: str, n: int, threads: int, cards: int, concepts_file: str | None = None) -> dict:
    import torch

    from medcbm.bundle import LoadedBundle
    from medcbm.data import InputRecord
    from medcbm.pretrain import dataset_records
    from medcbm.workflows.audit import AuditRunner

    torch.set_num_threads(threads)
    spec = BUNDLES[bundle]
    recs = [r for r in dataset_records(spec["dataset"], **spec["dataset_args"]) if r["split"] == "test"][:n]
    t0 = time.perf_counter()
    b = LoadedBundle.load(REPO / "bundles" / bundle, concepts_file=concepts_file)
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "in.csv"
        csv_path.write_text("image,label\n" + "".join(f"{r['image']},{r['label']}\n" for r in recs))
        t1 = time.perf_counter()
        AuditRunner(
            REPO / "bundles" / bundle,
            Path(tmp) / "out",
            input=csv_path,
            bundle=b,
            max_cards=cards,
            progress=False,
            exit_on_error=False,
        ).run()
        audit_s = time.perf_counter() - t1
        report_mb = (Path(tmp) / "out" / "report.html").stat().st_size / 2**20
    _ = InputRecord  # keep the import: records are built by the runner from the CSV
    return {
        "bundle": bundle,
        "n_images": len(recs),
        "cards": min(cards, len(recs)),
        "threads": threads,
        "load_seconds": round(load_s, 2),
        "audit_seconds": round(audit_s, 2),
        "seconds_per_image": round(audit_s / max(len(recs), 1), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "report_mb": round(report_mb, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", nargs="+", default=list(BUNDLES))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cards", type=int, default=24)
    ap.add_argument("--concepts-file", default=None, help="concept bank to load the bundle with (default its own)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args.bundle[0], args.n, args.threads, args.cards, args.concepts_file)))
        return
    out = {"n": args.n, "threads": args.threads, "cards": args.cards, "bundles": {}}
    for b in args.bundle:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--bundle",
            b,
            "--n",
            str(args.n),
            "--threads",
            str(args.threads),
            "--cards",
            str(args.cards),
        ] + (["--concepts-file", args.concepts_file] if args.concepts_file else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            out["bundles"][b] = {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
        else:
            out["bundles"][b] = json.loads(p.stdout.strip().splitlines()[-1])
        print(json.dumps(out["bundles"][b]))
    path = REPO / "benchmarks" / "results" / "audit_speed.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if old.get("n") == out["n"] and old.get("cards") == out["cards"]:  # keep other bundles' earlier results
        out["bundles"] = {**old.get("bundles", {}), **out["bundles"]}
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Sanity check of the measured ABCD concepts on ISIC 2017; prints JSON.

For each of the nine measured concepts: prevalence in the carved train split, the positive rate per
class in train and in the held-out test split (thresholds fitted on train only), whether the per-class
rates agree with the derm concept bank's prior (a +1 class should show the concept more often than a
-1 class), and the melanoma-vs-nevus AUC of the underlying continuous measure.

Usage::

    python benchmarks/derm_abcd_concepts.py [--root DATA] [--cache-dir DIR] [--val-fraction 0.15] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from medcbm.concepts import load_concept_bank  # noqa: E402
from medcbm.metrics import auroc  # noqa: E402
from medcbm.datasets.dermoscopy_features import (  # noqa: E402
    ISIC2017_CLASSES,
    MEASURE_KEYS,
    MEASURED_CONCEPTS,
    isic2017_records,
)

__all__ = ["main", "summarise"]

BANK = REPO / "bundles" / "derm_cbm" / "configs" / "concepts.yaml"


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC of positives scoring above negatives (ties count half)."""
    return auroc(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.concatenate([pos, neg]))


def _rate(records: Sequence[dict[str, Any]], cid: str) -> tuple[float, int]:
    vals = np.array([r[cid] for r in records], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    return (float(vals.mean()) if vals.size else float("nan")), int(vals.size)


def _r(x: float, nd: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


def summarise(records: Sequence[dict[str, Any]], thresholds: dict[str, float]) -> dict[str, Any]:
    """The JSON summary for ``records`` from :func:`isic2017_records` (all splits)."""
    bank = load_concept_bank(BANK)
    by = {
        (s, c): [r for r in records if r["split"] == s and r["label"] == c]
        for s in ("train", "val", "test")
        for c in ISIC2017_CLASSES
    }
    train = [r for r in records if r["split"] == "train"]
    concepts: dict[str, Any] = {}
    agree = total = 0
    for cid, key in MEASURED_CONCEPTS.items():
        rates = {c: _rate(by[("train", c)], cid)[0] for c in ISIC2017_CLASSES}
        rates_test = {c: _rate(by[("test", c)], cid)[0] for c in ISIC2017_CLASSES}
        k = bank.concept_ids.index(cid)
        prior = {c: int(bank.prior[bank.class_index(c), k]) for c in ISIC2017_CLASSES}
        checks = []
        for cp in ISIC2017_CLASSES:
            for cn in ISIC2017_CLASSES:
                if prior[cp] == 1 and prior[cn] == -1:
                    ok = rates[cp] > rates[cn]
                    checks.append({"more_in": cp, "than_in": cn, "ok": bool(ok)})
                    agree += int(ok)
                    total += 1
        mel = np.array([r[key] for r in by[("train", "melanoma")]], dtype=np.float64)
        nev = np.array([r[key] for r in by[("train", "nevus")]], dtype=np.float64)
        concepts[cid] = {
            "measure": key,
            "threshold": _r(thresholds[key], 4),
            "prevalence_train": _r(_rate(train, cid)[0]),
            "rate_train": {c: _r(v) for c, v in rates.items()},
            "rate_test": {c: _r(v) for c, v in rates_test.items()},
            "prior": prior,
            "prior_checks": checks,
            "auc_melanoma_vs_nevus_train": _r(_auc(mel, nev)),
        }
    means = {
        key: {c: _r(float(np.mean([r[key] for r in by[("train", c)]])), 4) for c in ISIC2017_CLASSES}
        for key in MEASURE_KEYS
    }
    counts = {s: {c: len(by[(s, c)]) for c in ISIC2017_CLASSES} for s in ("train", "val", "test")}
    seg_ok = float(np.mean([bool(r["segmentation_ok"]) for r in records]))
    return {
        "dataset": "isic2017_256",
        "counts": counts,
        "segmentation_ok_rate": _r(seg_ok),
        "prior_agreement": {"agree": agree, "total": total},
        "concepts": concepts,
        "measure_means_train": means,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="shared data root or the isic2017_256 folder")
    ap.add_argument("--cache-dir", default=None, help="measurement cache folder (default ~/.cache/medcbm)")
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    t0 = time.perf_counter()
    records, thresholds = isic2017_records(
        root=args.root,
        cache_dir=args.cache_dir,
        val_fraction=args.val_fraction,
        seed=args.seed,
        return_thresholds=True,
    )
    out = summarise(records, thresholds)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
